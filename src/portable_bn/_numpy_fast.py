"""NumPy fast path: the arithmetic of :mod:`._agnostic`, cache-blocked and in place.

Why it exists: NumPy evaluates one operation at a time, so the agnostic code
streams every full-size temporary through main memory (about 12 copies' worth
of traffic for a training forward), and broadcasting a per-channel vector
costs 2-3x a contiguous operation. Here the input is viewed as ``(A, C, B)``
(channel axis in the middle, no copy) and walked in tiles of whole channels
and rows about the size of the L2 cache (:class:`_Tiling`); the output buffer --
which we allocate, so writing into it is safe -- is the only full-size array
written. Per-channel sums are ufunc reductions, sums of products BLAS dot
products or ``einsum``, which only read (see :class:`_ChannelSums`);
per-channel vectors are "pattern rows" (repeated over
``B``) unless rows are very long, so that every elementwise step is a
contiguous vector-vector operation.

Training forward: one read-only pass for the statistics and one pass that
writes the output. The statistics are the shifted sums
``S1 = sum(x - K)``, ``S2 = sum((x - K)**2)`` with a per-channel shift ``K``
(0, or the mean of a small sample where that is off-centre), giving
``mean = K + S1/n`` and ``var = S2/n - (S1/n)**2``. This equals the agnostic
corrected two-pass algorithm up to rounding as long as ``(S1/n)**2 <= var``
(then ``S2/n <= 2 var``: the subtraction loses at most one bit); otherwise the
pass is repeated with ``K`` = that mean, which *is* the corrected two-pass
algorithm. The output is ``(x - K) * scale + (bias - r * scale)``, and, when
``|mean * scale| <= 1`` for every channel, the two-operation
``x * scale + (bias - mean * scale)``, whose extra rounding is then below one
unit in the normwise error measure. Eval forward and backward take the same
two-operation forms under the same rule, else keep the subtraction.

What the agnostic path does by power-of-two prescaling (data whose squares
could overflow) and NaN/Inf statistics are rare; this path detects them from
its sums and returns None so the caller takes the agnostic path (a
value-dependent branch, which eager NumPy allows). Sums are accumulated over
tiles in float64.

Inputs up to :data:`SMALL_BYTES` fit in the cache whole: there the agnostic
algorithm (corrected two-pass) runs untiled in about twenty NumPy calls, with
the scalars made once per (dtype, n, eps), because a small call's cost is the
number of NumPy calls, not the data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

BLOCK_BYTES = 1 << 19
"""Bytes of input per tile: the size of one core's L2 here (512 KiB). Measured faster than
256 KiB or less, where the NumPy calls are more and the contiguous segments of a tile shorter."""

SHORT_ROW = 512
"""Rows (``B``, the elements of one channel in one batch entry) shorter than this
get tiles of several rows (column sums over rows); longer rows, tiles one row
high with as many channels as fit (row sums over ``B``)."""

LONG_ROW = 4096
"""Rows at least this long use broadcasting: a stride-0 scalar over a long contiguous row costs
about what a vector does there, and a pattern row would be as large as a tile."""

TILE_ROWS = 16
"""Rows per tile wanted for short rows: column sums pay off over several rows."""

SMALL_BYTES = 1 << 17
"""Inputs up to this size sit in the L2 cache whole: no tiling, and as few NumPy
calls as possible (each costs about 1 us, which is what a small call is made of)."""

DOT_ROW = 65536
"""Longest row summed by a BLAS dot product: OpenBLAS threads dot products
only above 100000 elements."""

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_vecdot = getattr(np, "vecdot", None)  # NumPy >= 2.0


class FastForward(NamedTuple):
    output: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    batch_var: np.ndarray | None


def eligible(x: Any, *arrays: Any) -> bool:
    """Plain C-contiguous float32/float64 ndarrays (not subclasses, not half)."""
    return (
        type(x) is np.ndarray
        and x.dtype in _DTYPES
        and x.flags.c_contiguous
        and all(a is None or type(a) is np.ndarray for a in arrays)
    )


def _view(x: np.ndarray, axis: int) -> np.ndarray:
    shape = x.shape
    before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    return x.reshape(before, shape[axis], after)


class _Tiling:
    """Tiles of ``k`` whole channels by ``h`` rows of the ``(A, C, B)`` view.

    Pattern rows (at least 4 rows to share the cost of building them, and
    ``B < LONG_ROW``): per-channel vectors become rows of ``k * B`` elements,
    built once per channel group and reused down all ``A`` rows, and a tile is
    the 2-D ``(h, k*B)`` view, so each elementwise step is a contiguous
    vector-vector loop (broadcasting a ``(k, 1)`` vector over rows of 49 to
    3136 costs up to 2-3x as much). Short rows (``B < SHORT_ROW``) get
    ``TILE_ROWS`` rows per tile where they can, for the column-sum products.
    Otherwise: the ``(h, k, B)`` view and ``(k, 1)`` vectors.
    """

    def __init__(self, x3: np.ndarray) -> None:
        self.A, self.C, self.B = x3.shape
        elements = max(1, BLOCK_BYTES // x3.itemsize)
        self.pattern = self.A >= 4 and self.B < LONG_ROW
        rows_wanted = min(self.A, TILE_ROWS) if self.B < SHORT_ROW else 1
        self.k = max(1, min(self.C, elements // (self.B * rows_wanted)))
        self.h = max(1, min(self.A, elements // (self.k * self.B)))

    def groups(self) -> Iterator[slice]:
        for c0 in range(0, self.C, self.k):
            yield slice(c0, min(self.C, c0 + self.k))

    def tiles(self, array3: np.ndarray, group: slice) -> Iterator[np.ndarray]:
        """Views of ``array3``'s tiles in ``group`` (2-D for pattern rows, else 3-D), top to bottom."""
        if self.pattern:
            columns = array3.reshape(self.A, self.C * self.B)[:, group.start * self.B : group.stop * self.B]
            for a0 in range(0, self.A, self.h):
                yield columns[a0 : a0 + self.h]
        else:
            for a0 in range(0, self.A, self.h):
                yield array3[a0 : a0 + self.h, group]

    def vector(self, values: np.ndarray, group: slice) -> np.ndarray:
        """Per-channel ``values`` of a group, shaped to combine with its tiles."""
        if self.pattern:
            return np.repeat(values[group], self.B)
        return values[group, None]

    def scratch(self, dtype: Any) -> np.ndarray:
        """A tile-sized work array; :func:`_like` cuts it to a (smaller, last) tile."""
        return np.empty((self.h, self.k * self.B) if self.pattern else (self.h, self.k, self.B), dtype=dtype)


def _like(scratch: np.ndarray, tile: np.ndarray) -> np.ndarray:
    return scratch[: tile.shape[0], : tile.shape[1]]


class _ChannelSums:
    """Per-channel sums of the tiles of one channel group, accumulated in float64.

    Pattern tiles ``(h, k*B)``: column sums (``add.reduce`` over axis 0, a
    contiguous vector add per row) into a ``k*B`` accumulator, folded to
    channels when the group ends; one-row tiles: the contiguous ``(k, B)``
    row sums. ``(h, k, B)`` tiles: sums over axes 0 and 2.

    Sums of products (:meth:`add_products`) only read their operands: BLAS
    dot products per row (``vecdot``) where rows are long, ``einsum`` column
    sums of products on several-row pattern tiles. Either replaces a product
    written to a scratch tile and summed (one pass over the tile fewer, and no
    write), and rounds no worse than the pairwise sum (measured: at most 2-5
    units of the dtype in a row's sum of squares, as pairwise summation).
    No matrix products: OpenBLAS runs those on two threads, and with the
    other core busy each call then stalls for milliseconds (measured: a
    float64 training forward 100x slower on a loaded 2-core machine);
    OpenBLAS computes a dot product of up to 100000 elements on the calling
    thread, so rows are given to ``vecdot`` only up to :data:`DOT_ROW`.
    """

    def __init__(self, tiling: _Tiling, group: slice) -> None:
        self.tiling, self.group = tiling, group
        self.channels = np.zeros(group.stop - group.start, dtype=np.float64)
        self.columns = np.zeros(self.channels.shape[0] * tiling.B, dtype=np.float64) if tiling.pattern else None

    def add(self, tile: np.ndarray) -> None:
        if self.columns is None:
            self.channels += np.add.reduce(tile, axis=(0, 2))
        elif tile.shape[0] == 1:
            self.channels += np.add.reduce(tile.reshape(-1, self.tiling.B), axis=1)
        else:
            self.columns += np.add.reduce(tile, axis=0)

    def add_products(self, a: np.ndarray, b: np.ndarray, work: np.ndarray) -> None:
        """Add ``sum(a * b)``; ``work`` (which may be ``a``) is scratch for where no
        read-only form applies (rows too long for one dot product, NumPy < 2 without ``vecdot``)."""
        rows = self.tiling.B
        if _vecdot is not None and rows <= DOT_ROW and (self.columns is None or a.shape[0] == 1):
            if self.columns is None:  # (h, k, B): a dot product per row
                self.channels += np.add.reduce(_vecdot(a, b), axis=0)
            else:  # one pattern row: (k, B) rows
                self.channels += _vecdot(a.reshape(-1, rows), b.reshape(-1, rows))
        elif self.columns is not None and a.shape[0] > 1:
            self.columns += np.einsum("ij,ij->j", a, b)
        else:
            self.add(np.multiply(a, b, out=work))

    def result(self) -> np.ndarray:
        if self.columns is not None:
            self.channels += np.add.reduce(self.columns.reshape(-1, self.tiling.B), axis=1)
        return self.channels


def _moments(x3: np.ndarray, tiling: _Tiling, shift: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-channel ``sum(x - shift)`` and ``sum((x - shift)**2)`` in one read of ``x``
    (``shift`` None: 0, and no subtraction)."""
    first = np.zeros(tiling.C, dtype=np.float64)
    second = np.zeros_like(first)
    scratch = tiling.scratch(x3.dtype)
    for group in tiling.groups():
        sums, squares = _ChannelSums(tiling, group), _ChannelSums(tiling, group)
        shift_v = None if shift is None else tiling.vector(shift, group)
        for tile in tiling.tiles(x3, group):
            work = _like(scratch, tile)
            if shift_v is not None:
                tile = np.subtract(tile, shift_v, out=work)
            sums.add(tile)
            squares.add_products(tile, tile, work)
        first[group], second[group] = sums.result(), squares.result()
    return first, second


def _sample_shift(x3: np.ndarray) -> np.ndarray | None:
    """Shift for :func:`_moments`: per channel, the mean of a small sample (the
    first row's first elements) where that sample is off-centre (mean**2 >
    variance), else 0; None when every channel looks centred (no subtraction).
    A poor guess costs a second pass, never accuracy (see train_forward)."""
    sample = x3[0, :, :64].astype(np.float64)  # contiguous: np.mean/np.var on the strided view cost 5x
    mean = np.add.reduce(sample, axis=1) / sample.shape[1]
    deviation = sample - mean[:, None]
    var = np.add.reduce(deviation * deviation, axis=1) / sample.shape[1]
    centred = mean * mean <= var
    if centred.all():
        return None
    return np.where(centred, 0.0, mean).astype(x3.dtype)


def _affine(
    source3: np.ndarray, out3: np.ndarray, tiling: _Tiling, shift: np.ndarray | None, scale: Any, offset: Any
) -> None:
    """``out = (source - shift) * scale + offset`` per channel; a None ``shift`` or ``offset`` is left out."""
    for group in tiling.groups():
        shift_v = None if shift is None else tiling.vector(shift, group)
        scale_v = tiling.vector(scale, group)
        offset_v = None if offset is None else tiling.vector(offset, group)
        for tile, out in zip(tiling.tiles(source3, group), tiling.tiles(out3, group), strict=True):
            if shift_v is not None:
                np.subtract(tile, shift_v, out=out)
                tile = out
            np.multiply(tile, scale_v, out=out)
            if offset_v is not None:
                np.add(out, offset_v, out=out)


def _param(value: Any, channels: int) -> np.ndarray:
    """A per-channel parameter in float64 (None: ones), for the small vector arithmetic."""
    if value is None:
        return np.ones(channels)
    return np.asarray(value, dtype=np.float64)


def train_forward(
    x: np.ndarray, weight: Any, bias: Any, *, axis: int, eps: float, want_var: bool
) -> FastForward | None:
    """Training forward, or None when the data need the agnostic path."""
    x3 = _view(x, axis)
    if x.nbytes <= SMALL_BYTES:
        return _small_train_forward(x3, weight, bias, eps=eps, want_var=want_var, shape=x.shape)
    channels = x3.shape[1]
    n = x3.shape[0] * x3.shape[2]
    dtype = x.dtype
    tiling = _Tiling(x3)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN are judged below
        # One read of x: shifted sums. Accepted when the residual mean r is within one
        # standard deviation: then S2/n = var + r**2 <= 2 var, and var = S2/n - r**2 loses
        # at most one bit -- as accurate as the corrected two-pass algorithm.
        shift = _sample_shift(x3)
        first, second = _moments(x3, tiling, shift)
        if not np.isfinite(first).all():
            return None  # NaN/Inf data
        base = np.zeros(channels) if shift is None else shift.astype(np.float64)
        residual = first / n
        batch_var = second / n - residual * residual
        if not np.all(residual * residual <= batch_var):  # also: squares that overflowed (Inf, NaN)
            # Off-centre guess (or overflow): again, shifted by the mean just found -- the
            # corrected two-pass algorithm of the agnostic path, exactly.
            shift = (base + residual).astype(dtype)
            first, second = _moments(x3, tiling, shift)
            base = shift.astype(np.float64)
            residual = first / n
            batch_var = second / n - residual * residual
        mean = base + residual
        # The agnostic path (power-of-two prescaling, exact constant channels) takes over for
        # sums that overflowed, statistics beyond the dtype's range, and channels whose spread
        # is at the rounding level of their mean (numerically constant), where this path's
        # rounding would show.
        if not (np.isfinite(second).all() and np.isfinite(batch_var.astype(dtype)).all()):
            return None
        resolution = (8 * float(np.finfo(dtype).eps)) * mean
        if np.any((batch_var <= resolution * resolution) & (mean != 0)):
            return None
        invstd = 1.0 / np.sqrt(batch_var + eps)
        scale = invstd * _param(weight, channels)
        offset = np.zeros(channels) if bias is None else _param(bias, channels)
        out3 = np.empty_like(x3)
        # The output pass (reads x, writes out). x * scale + (bias - mean * scale) rounds
        # x * scale, of size up to |(x - mean) * scale| + |mean * scale|; the added error is
        # within what the agnostic formula rounds anyway when |mean| <= std (then
        # |mean * scale| <= max|(x - mean) * scale|) or |mean * scale| <= 1 (the normwise
        # error divides by at least 1). Otherwise subtract the shift the sums were taken
        # about (a dtype value within one std of the mean): (x - K) * scale + (bias - r * scale),
        # the agnostic formula (which keeps r apart from K: K + r is not a dtype value).
        if np.all((mean * mean <= batch_var) | (np.abs(mean * scale) <= 1.0)):
            _affine(x3, out3, tiling, None, scale.astype(dtype), (offset - mean * scale).astype(dtype))
        else:
            offset = offset - residual * scale
            _affine(x3, out3, tiling, base.astype(dtype), scale.astype(dtype), offset.astype(dtype))
    return FastForward(
        out3.reshape(x.shape),
        mean.astype(dtype),
        invstd.astype(dtype),
        batch_var.astype(dtype) if want_var else None,
    )


class _SmallConstants(NamedTuple):
    per_channel: np.ndarray
    eps: np.ndarray
    resolution: np.ndarray
    largest: np.ndarray
    one: np.ndarray


@functools.lru_cache(maxsize=64)
def _small_constants(dtype: np.dtype, count: int, eps: float) -> _SmallConstants:
    """The scalars of a small call as 0-d arrays of its dtype, made once: NumPy
    converts a Python float operand on every call (about 0.8 us each)."""
    info = np.finfo(dtype)
    values = (count, eps, (8 * float(info.eps)) ** 2, float(info.max), 1.0)
    return _SmallConstants(*(np.asarray(value, dtype=dtype) for value in values))


def _small_train_forward(
    x3: np.ndarray, weight: Any, bias: Any, *, eps: float, want_var: bool, shape: tuple[int, ...]
) -> FastForward | None:
    """Training forward of a cache-sized input: the corrected two-pass algorithm of
    the agnostic path in about twenty NumPy calls, the output written over the
    centred copy. Same hand-overs as the tiled path."""
    const = _small_constants(x3.dtype, x3.shape[0] * x3.shape[2], eps)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN are judged below
        mean0 = np.add.reduce(x3, axis=(0, 2)) / const.per_channel
        centred = np.subtract(x3, mean0[:, None])
        residual = np.add.reduce(centred, axis=(0, 2)) / const.per_channel
        batch_var = np.add.reduce(centred * centred, axis=(0, 2)) / const.per_channel - residual * residual
        # Hand over NaN/Inf data and overflowed sums (the variance is then NaN or Inf), and
        # numerically constant channels (spread at the rounding level of the mean; the
        # agnostic path is exact there).
        if not ((mean0 * mean0 * const.resolution <= batch_var) & (batch_var <= const.largest)).all():
            return None
        invstd = const.one / np.sqrt(batch_var + const.eps)
        scale = invstd if weight is None else invstd * weight
        shift = residual * scale
        shift = -shift if bias is None else bias - shift
        np.multiply(centred, scale[:, None], out=centred)
        np.add(centred, shift[:, None], out=centred)
    return FastForward(centred.reshape(shape), mean0 + residual, invstd, batch_var if want_var else None)


def eval_forward(
    x: np.ndarray, mean: np.ndarray, invstd: np.ndarray, weight: Any, bias: Any, *, axis: int
) -> np.ndarray:
    """Eval forward ``(x - mean) * (invstd * weight) + bias``, one pass.

    ``x * scale + (bias - mean * scale)`` (one operation fewer) when
    ``|mean * scale| <= 1`` for every channel: it adds a rounding of a number
    of size at most 1, and the normwise error divides by at least 1.
    """
    x3 = _view(x, axis)
    channels = x3.shape[1]
    dtype = x.dtype
    if x.nbytes <= SMALL_BYTES:  # cache-sized: the agnostic formula in three NumPy calls
        scale = invstd if weight is None else invstd * weight
        out3 = np.subtract(x3, np.asarray(mean, dtype=dtype)[:, None])
        np.multiply(out3, scale[:, None], out=out3)
        if bias is not None:
            np.add(out3, bias[:, None], out=out3)
        return out3.reshape(x.shape)
    tiling = _Tiling(x3)
    mean64 = np.asarray(mean, dtype=np.float64)
    scale = np.asarray(invstd, dtype=np.float64) * _param(weight, channels)
    offset = np.zeros(channels) if bias is None else _param(bias, channels)
    out3 = np.empty_like(x3)
    with np.errstate(invalid="ignore"):  # NaN statistics: the general formula, NaN as the agnostic path
        short = bool(np.all(np.abs(mean64 * scale) <= 1.0))
    if short:
        _affine(x3, out3, tiling, None, scale.astype(dtype), (offset - mean64 * scale).astype(dtype))
    else:
        _affine(x3, out3, tiling, np.asarray(mean, dtype=dtype), scale.astype(dtype), offset.astype(dtype))
    return out3.reshape(x.shape)


def _small_backward(
    g3: np.ndarray, x3: np.ndarray, weight: Any, mean: Any, invstd: Any, *, training: bool, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`._agnostic.backward` for a cache-sized input, in about a dozen NumPy calls:
    ``dx = k * (g - sum(g)/n - (x - mean) * invstd * sum(g * xhat)/n)``, ``k = invstd * w``."""
    const = _small_constants(x3.dtype, x3.shape[0] * x3.shape[2], 0.0)
    deviation = np.subtract(x3, mean[:, None])
    grad_bias = np.add.reduce(g3, axis=(0, 2))
    grad_weight = np.add.reduce(g3 * deviation, axis=(0, 2)) * invstd
    k = invstd if weight is None else invstd * weight
    if training:
        np.multiply(deviation, (invstd * grad_weight / const.per_channel)[:, None], out=deviation)
        grad_input = np.subtract(g3, deviation, out=deviation)
        np.subtract(grad_input, (grad_bias / const.per_channel)[:, None], out=grad_input)
        np.multiply(grad_input, k[:, None], out=grad_input)
    else:
        grad_input = np.multiply(g3, k[:, None], out=deviation)
    return grad_input.reshape(shape), grad_weight, grad_bias


def backward(
    grad_output: np.ndarray, x: np.ndarray, weight: Any, mean: Any, invstd: Any, *, axis: int, training: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The analytic backward of :func:`._agnostic.backward`, tiled."""
    x3, g3 = _view(x, axis), _view(grad_output, axis)
    if x.nbytes <= SMALL_BYTES:
        return _small_backward(g3, x3, weight, mean, invstd, training=training, shape=x.shape)
    channels = x3.shape[1]
    n = x3.shape[0] * x3.shape[2]
    dtype = x.dtype
    tiling = _Tiling(x3)
    mean_d = np.asarray(mean, dtype=dtype)
    mean64 = mean_d.astype(np.float64)
    invstd64 = np.asarray(invstd, dtype=dtype).astype(np.float64)
    scratch = tiling.scratch(dtype)
    # Pass 1 (reads g and x): sum(g) and sum(g * (x - mean)). Where |mean| * invstd <= 1 for
    # every channel, as sum(g * x) - mean * sum(g), without the subtraction: that adds an error
    # of about u * |mean| * sum|g|, times invstd in grad_weight at most u * sum|g| -- what
    # rounding sum(g) (grad_bias) costs anyway.
    with np.errstate(invalid="ignore"):
        centred = bool(np.all(np.abs(mean64 * invstd64) <= 1.0))
    grad_bias = np.zeros(channels)
    grad_dot = np.zeros(channels)
    for group in tiling.groups():
        sums, products = _ChannelSums(tiling, group), _ChannelSums(tiling, group)
        mean_v = None if centred else tiling.vector(mean_d, group)
        for g_tile, x_tile in zip(tiling.tiles(g3, group), tiling.tiles(x3, group), strict=True):
            work = _like(scratch, x_tile)
            deviation = x_tile if mean_v is None else np.subtract(x_tile, mean_v, out=work)
            sums.add(g_tile)
            products.add_products(deviation, g_tile, work)
        grad_bias[group], grad_dot[group] = sums.result(), products.result()
    if centred:
        grad_dot -= mean64 * grad_bias
    grad_weight = grad_dot * invstd64
    k = invstd64 * _param(weight, channels)
    gi3 = np.empty_like(x3)
    if training:
        # dx = g * k + (x - mean) * f + c, f = -k * invstd * grad_weight / n, c = -k * sum(g) / n.
        f = -(k * invstd64 * grad_weight) / max(n, 1)
        c = -(k * grad_bias) / max(n, 1)
        # x * f + (c - mean * f) saves the subtraction; it adds a rounding of |mean * f|, within
        # what the agnostic formula rounds anyway when that is <= max(1, |c|) (it rounds c, and
        # the normwise error divides by at least 1).
        with np.errstate(invalid="ignore"):
            short = bool(np.all(np.abs(mean64 * f) <= np.maximum(1.0, np.abs(c))))
        shift = None if short else mean_d
        offset = (c - mean64 * f) if short else c
        k_d, f_d, offset_d = k.astype(dtype), f.astype(dtype), offset.astype(dtype)
        for group in tiling.groups():
            k_v, f_v, offset_v = tiling.vector(k_d, group), tiling.vector(f_d, group), tiling.vector(offset_d, group)
            shift_v = None if shift is None else tiling.vector(shift, group)
            for out, x_tile, g_tile in zip(
                tiling.tiles(gi3, group), tiling.tiles(x3, group), tiling.tiles(g3, group), strict=True
            ):
                if shift_v is not None:
                    x_tile = np.subtract(x_tile, shift_v, out=out)
                np.multiply(x_tile, f_v, out=out)
                np.add(out, offset_v, out=out)
                work = np.multiply(g_tile, k_v, out=_like(scratch, g_tile))
                np.add(out, work, out=out)
    else:
        _affine(g3, gi3, tiling, None, k.astype(dtype), None)
    param_dtype = dtype if weight is None else np.asarray(weight).dtype
    return (
        gi3.reshape(x.shape),
        grad_weight.astype(param_dtype, copy=False),
        grad_bias.astype(param_dtype, copy=False),
    )
