"""NumPy: the full-size primitives cache-blocked, each in one read of its inputs.

Why: NumPy evaluates one operation at a time, so the pure primitives stream every full-size
temporary through main memory (``x * scale - shift`` is written, then read for each sum), and
broadcasting a per-channel vector costs 2-3x a contiguous operation. Here a C-contiguous
float32/float64 array is viewed as ``(A, C, B)`` (channel axis in the middle, no copy) and
walked in tiles of whole channels and rows about the size of the L2 cache (:class:`_Tiling`):
the temporaries stay in the cache, the only full-size array written is the result, which we
allocate. Sums are ufunc reductions and, for sums of products, BLAS dot products or
``einsum`` that only read; they accumulate in float64 across tiles. Per-channel vectors are
"pattern rows" (repeated over ``B``) unless rows are long, so each elementwise step is a
contiguous vector-vector loop. Other arrays (strided, float16, subclasses) take the pure
primitives. Values are on the host, so the algorithm may choose its route by them.

Where Numba can be imported (and ``PORTABLE_BN_NUMBA`` does not switch it off),
:class:`NumbaPrimitives` replace the tiles of large arrays with compiled kernels
(:mod:`.numba_kernels`) that read each input once; Numba itself is imported at the first
array they take.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from .._primitives import Primitives
from .._recipe import Recipe

BLOCK_BYTES = 1 << 19
"""Bytes of input per tile: one core's L2 here (512 KiB). Measured faster than 256 KiB or
less, where the NumPy calls are more and the contiguous segments of a tile shorter."""

SHORT_ROW = 512
"""Rows (``B``) shorter than this get tiles of several rows (column sums over rows); longer
rows, tiles one row high with as many channels as fit (row sums over ``B``)."""

LONG_ROW = 4096
"""Rows at least this long use broadcasting: a stride-0 scalar over a long contiguous row
costs about what a vector does there, and a pattern row would be as large as a tile."""

TILE_ROWS = 16
"""Rows per tile wanted for short rows: column sums pay off over several rows."""

SMALL_BYTES = 1 << 17
"""Inputs up to this size sit in the L2 cache whole: nothing to tile. They take the pure
primitives' elementwise work (on the namespace of :func:`_lean`: a small call's cost is its
number of NumPy calls), with the sums accumulated in float64 as the tiles' are."""

DOT_ROW = 65536
"""Longest row summed by a BLAS dot product: OpenBLAS threads dot products only above
100000 elements (see :class:`_ChannelSums`)."""

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_vecdot = getattr(np, "vecdot", None)  # NumPy >= 2.0


class _Tiling:
    """Tiles of ``k`` whole channels by ``h`` rows of the ``(A, C, B)`` view.

    Pattern rows (at least 4 rows to share the cost of building them, and ``B < LONG_ROW``):
    per-channel vectors become rows of ``k * B`` elements, built once per channel group and
    reused down all ``A`` rows, and a tile is the 2-D ``(h, k*B)`` view. Otherwise the
    ``(h, k, B)`` view and ``(k, 1)`` vectors."""

    def __init__(self, outer: int, channels: int, inner: int, itemsize: int) -> None:
        self.A, self.C, self.B = outer, channels, inner
        elements = max(1, BLOCK_BYTES // itemsize)
        self.pattern = self.A >= 4 and self.B < LONG_ROW
        rows_wanted = min(self.A, TILE_ROWS) if self.B < SHORT_ROW else 1
        self.k = max(1, min(self.C, elements // max(1, self.B * rows_wanted)))
        self.h = max(1, min(self.A, elements // max(1, self.k * self.B)))

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

    def vector(self, values: np.ndarray | None, group: slice) -> Any:
        """Per-channel ``values`` of a group, shaped to combine with its tiles (None stays None)."""
        if values is None:
            return None
        if self.pattern:
            return np.repeat(values[group], self.B)
        return values[group, None]

    def scratch(self, dtype: Any) -> np.ndarray:
        """A tile-sized work array; :func:`_like` cuts it to a (smaller, last) tile."""
        return np.empty((self.h, self.k * self.B) if self.pattern else (self.h, self.k, self.B), dtype=dtype)


@functools.lru_cache(maxsize=256)
def _tiling(outer: int, channels: int, inner: int, itemsize: int) -> _Tiling:
    return _Tiling(outer, channels, inner, itemsize)


def _like(scratch: np.ndarray, tile: np.ndarray) -> np.ndarray:
    return scratch[: tile.shape[0], : tile.shape[1]]


class _ChannelSums:
    """A per-channel reduction (``np.add``, ``np.minimum`` or ``np.maximum``) of the tiles of one
    channel group; sums accumulate in float64.

    Pattern tiles ``(h, k*B)``: column reductions (over axis 0, a contiguous vector operation
    per row) into a ``k*B`` accumulator, folded to channels when the group ends; one-row tiles:
    the contiguous ``(k, B)`` row reductions; ``(h, k, B)`` tiles: over axes 0 and 2.

    Sums of products (:meth:`add_products`) only read their operands: BLAS dot products per
    row (``vecdot``) where rows are long, ``einsum`` column sums on several-row pattern tiles;
    either replaces a product written to a scratch tile and summed, and rounds no worse than
    pairwise summation (measured: at most 2-5 units of the dtype in a row's sum of squares).
    No matrix products: OpenBLAS runs those on two threads, and with the other core busy each
    call then stalls for milliseconds; it computes a dot product of up to 100000 elements on
    the calling thread, so rows go to ``vecdot`` only up to :data:`DOT_ROW`."""

    def __init__(self, tiling: _Tiling, group: slice, ufunc: Any = np.add) -> None:
        self.tiling, self.ufunc = tiling, ufunc
        start = 0.0 if ufunc is np.add else np.inf if ufunc is np.minimum else -np.inf
        self.channels = np.full(group.stop - group.start, start)
        self.columns = np.full(self.channels.shape[0] * tiling.B, start) if tiling.pattern else None

    def add(self, tile: np.ndarray) -> None:
        reduce, into = self.ufunc.reduce, self.ufunc
        if self.columns is None:
            into(self.channels, reduce(tile, axis=(0, 2)), out=self.channels)
        elif tile.shape[0] == 1:
            into(self.channels, reduce(tile.reshape(-1, self.tiling.B), axis=1), out=self.channels)
        else:
            into(self.columns, reduce(tile, axis=0), out=self.columns)

    def add_products(self, a: np.ndarray, b: np.ndarray, work: np.ndarray) -> None:
        """Add ``sum(a * b)``; ``work`` (which may be ``a``) is scratch where no read-only form
        applies (rows too long for one dot product, NumPy < 2 without ``vecdot``)."""
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
            self.ufunc(
                self.channels, self.ufunc.reduce(self.columns.reshape(-1, self.tiling.B), axis=1), out=self.channels
            )
        return self.channels


def _vector(values: Any, dtype: Any) -> np.ndarray | None:
    """A per-channel vector as a NumPy array of ``dtype`` (None stays None)."""
    return None if values is None else np.asarray(values, dtype=dtype)


def _lean(xp: ModuleType) -> ModuleType:
    """``xp`` (array-api-compat's NumPy namespace) with its reductions taken by the ufuncs'
    ``reduce``: the same results, at about 1 us a call on per-channel vectors where
    ``np.sum``, ``np.mean`` and ``np.all`` take 2 to 5 (a small call is made of such calls);
    ``astype``, ``zeros_like`` and ``ones_like`` without array-api-compat's device checks."""
    lean = ModuleType(xp.__name__)
    lean.__dict__.update(vars(xp))

    def mean(x: Any, axis: Any = None) -> Any:
        count = x.size if axis is None else math.prod(x.shape[i] for i in axis)
        return np.add.reduce(x, axis=axis) / count

    lean.sum = lambda x, axis=None: np.add.reduce(x, axis=axis)  # type: ignore[attr-defined]
    lean.mean = mean  # type: ignore[attr-defined]
    lean.min = lambda x, axis=None: np.minimum.reduce(x, axis=axis)  # type: ignore[attr-defined]
    lean.max = lambda x, axis=None: np.maximum.reduce(x, axis=axis)  # type: ignore[attr-defined]
    lean.all = lambda x, axis=None: np.logical_and.reduce(x, axis=axis)  # type: ignore[attr-defined]
    lean.any = lambda x, axis=None: np.logical_or.reduce(x, axis=axis)  # type: ignore[attr-defined]
    lean.reshape = lambda x, shape: x.reshape(shape)  # type: ignore[attr-defined]
    lean.astype = lambda x, dtype, /, *, copy=True, device=None: x.astype(dtype, copy=copy)  # type: ignore[attr-defined]
    lean.zeros_like = lambda x, /, *, dtype=None, device=None: np.zeros_like(x, dtype=dtype)  # type: ignore[attr-defined]
    lean.ones_like = lambda x, /, *, dtype=None, device=None: np.ones_like(x, dtype=dtype)  # type: ignore[attr-defined]
    return lean


class NumpyPrimitives(Primitives):
    """Tiled primitives for C-contiguous float32/float64 ndarrays; the pure ones otherwise."""

    name = "NumPy tiles"
    eager = True
    branches = True

    def __init__(self, xp: ModuleType) -> None:
        super().__init__(_lean(xp))

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return np.errstate(over="ignore", invalid="ignore", divide="ignore")

    def shortcuts(self, x: Any) -> bool:
        return bool(x.nbytes > SMALL_BYTES)

    def first_pass(self, x: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
        if not _tileable(x):
            return super().first_pass(x, recipe, shrink)
        x3, tiling = _setup(x, recipe)
        results = [np.empty(tiling.C) for _ in range(3)]
        scratch = tiling.scratch(x.dtype)
        for group in tiling.groups():
            low, high = _ChannelSums(tiling, group, np.minimum), _ChannelSums(tiling, group, np.maximum)
            total = _ChannelSums(tiling, group)
            for tile in tiling.tiles(x3, group):
                low.add(tile)
                high.add(tile)
                total.add(np.multiply(tile, shrink, out=_like(scratch, tile)))
            for result, reduction in zip(results, (low, high, total), strict=True):
                result[group] = reduction.result()
        return results[0].astype(x.dtype), results[1].astype(x.dtype), results[2]

    def shifted_sums(self, x: Any, recipe: Recipe, scale: Any, shift: Any) -> tuple[Any, Any]:
        if not _tileable(x):
            if not _small(x):
                return super().shifted_sums(x, recipe, scale, shift)
            values = self._centred(x, recipe, scale, shift)
            axes = recipe.reduce_axes
            return np.add.reduce(values, axis=axes, dtype=np.float64), np.add.reduce(
                values * values, axis=axes, dtype=np.float64
            )
        x3, tiling = _setup(x, recipe)
        scale, shift = _vector(scale, x.dtype), _vector(shift, x.dtype)
        if shift is not None and not shift.any():
            shift = None  # a shift of zeros: no subtraction
        total, squares = np.empty(tiling.C), np.empty(tiling.C)
        scratch = tiling.scratch(x.dtype)
        for group in tiling.groups():
            sums, products = _ChannelSums(tiling, group), _ChannelSums(tiling, group)
            scale_v, shift_v = tiling.vector(scale, group), tiling.vector(shift, group)
            for tile in tiling.tiles(x3, group):
                work = _like(scratch, tile)
                if scale_v is not None:
                    tile = np.multiply(tile, scale_v, out=work)
                if shift_v is not None:
                    tile = np.subtract(tile, shift_v, out=work)
                sums.add(tile)
                products.add_products(tile, tile, work)
            total[group], squares[group] = sums.result(), products.result()
        return total, squares

    def product_sums(self, grad: Any, x: Any, recipe: Recipe, shift: Any, scale: Any) -> tuple[Any, Any]:
        if not _tileable(x, grad):
            if not (_small(x) and _small(grad)):
                return super().product_sums(grad, x, recipe, shift, scale)
            values = x if shift is None else x - self._channel(shift, recipe, x)
            if scale is not None:
                values = values * self._channel(scale, recipe, x)
            axes = recipe.reduce_axes
            return np.add.reduce(grad, axis=axes, dtype=np.float64), np.add.reduce(
                grad * values, axis=axes, dtype=np.float64
            )
        x3, tiling = _setup(x, recipe)
        g3 = grad.reshape(x3.shape)
        shift, scale = _vector(shift, x.dtype), _vector(scale, x.dtype)
        grad_total, products_total = np.empty(tiling.C), np.empty(tiling.C)
        scratch = tiling.scratch(x.dtype)
        for group in tiling.groups():
            sums, products = _ChannelSums(tiling, group), _ChannelSums(tiling, group)
            shift_v, scale_v = tiling.vector(shift, group), tiling.vector(scale, group)
            for g_tile, x_tile in zip(tiling.tiles(g3, group), tiling.tiles(x3, group), strict=True):
                work = _like(scratch, x_tile)
                if shift_v is not None:
                    x_tile = np.subtract(x_tile, shift_v, out=work)
                if scale_v is not None:
                    x_tile = np.multiply(x_tile, scale_v, out=work)
                sums.add(g_tile)
                products.add_products(x_tile, g_tile, work)
            grad_total[group], products_total[group] = sums.result(), products.result()
        return grad_total, products_total

    def affine(self, x: Any, recipe: Recipe, scale: Any, shift: Any, mult: Any, add: Any) -> Any:
        if not _tileable(x):
            return super().affine(x, recipe, scale, shift, mult, add)
        x3, tiling = _setup(x, recipe)
        vectors = [_vector(v, x.dtype) for v in (scale, shift, mult, add)]
        out3 = np.empty_like(x3)
        for group in tiling.groups():
            scale_v, shift_v, mult_v, add_v = (tiling.vector(v, group) for v in vectors)
            for tile, out in zip(tiling.tiles(x3, group), tiling.tiles(out3, group), strict=True):
                if scale_v is not None:
                    tile = np.multiply(tile, scale_v, out=out)
                if shift_v is not None:
                    tile = np.subtract(tile, shift_v, out=out)
                np.multiply(tile, mult_v, out=out)
                if add_v is not None:
                    np.add(out, add_v, out=out)
        return out3.reshape(x.shape)

    def grad_input(self, grad: Any, x: Any, recipe: Recipe, k: Any, shift: Any, f: Any, c: Any) -> Any:
        if not _tileable(x, grad):
            return super().grad_input(grad, x, recipe, k, shift, f, c)
        x3, tiling = _setup(x, recipe)
        g3 = grad.reshape(x3.shape)
        vectors = [_vector(v, x.dtype) for v in (k, shift, f, c)]
        out3 = np.empty_like(x3)
        scratch = tiling.scratch(x.dtype)
        for group in tiling.groups():
            k_v, shift_v, f_v, c_v = (tiling.vector(v, group) for v in vectors)
            for out, x_tile, g_tile in zip(
                tiling.tiles(out3, group), tiling.tiles(x3, group), tiling.tiles(g3, group), strict=True
            ):
                if shift_v is not None:
                    x_tile = np.subtract(x_tile, shift_v, out=out)
                np.multiply(x_tile, f_v, out=out)
                np.add(out, c_v, out=out)
                np.add(out, np.multiply(g_tile, k_v, out=_like(scratch, g_tile)), out=out)
        return out3.reshape(x.shape)


def _tileable(*arrays: Any) -> bool:
    """Plain C-contiguous float32/float64 ndarrays of one dtype (not subclasses, not half),
    larger than :data:`SMALL_BYTES`."""
    first = arrays[0]
    dtype = first.dtype
    if type(first) is not np.ndarray or dtype not in _DTYPES or first.nbytes <= SMALL_BYTES:
        return False
    return all(type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous for a in arrays)


def _small(x: Any) -> bool:
    """A cache-sized float32/float64 ndarray (any layout): the pure primitives' elementwise work,
    with sums accumulated in float64 as the tiles' are."""
    return type(x) is np.ndarray and x.dtype in _DTYPES and x.nbytes <= SMALL_BYTES


def _setup(x: np.ndarray, recipe: Recipe) -> tuple[np.ndarray, _Tiling]:
    assert recipe.outer is not None
    assert recipe.inner is not None
    x3 = x.reshape(recipe.outer, recipe.num_channels, recipe.inner)
    return x3, _tiling(recipe.outer, recipe.num_channels, recipe.inner, x.itemsize)


# ------------------------------------------------------------------ Numba's kernels

NUMBA_SWITCH = "PORTABLE_BN_NUMBA"
"""Environment variable: ``0`` (or ``off``, ``false``, ``no``) keeps Numba's kernels out even
where Numba is installed; read at every call."""

ROW_BLOCK = 4096
"""Values per block of the moments kernel (16-32 KiB: the block's second pass reads the L1 or
L2 cache), and the longest piece of a row one block takes."""

TILE_BELOW = 64
"""Rows (``B``) shorter than this are taken as tiles of the ``(A, C * B)`` view, vectorized
across its contiguous columns; longer rows one by one (each row's sums end in a reduction
across vector lanes, which short rows pay too often: ``7x7`` images took 1.3 to 1.8 times as
long as rows as they do as tiles, measured on the benchmark's shape)."""

TILE_VALUES = 1 << 16
"""Values per tile of the short-row kernels (256-512 KiB: one core's L2)."""

TILE_COLUMNS = 1024
"""Columns per tile of the short-row kernels at most."""

PATTERN_BELOW = 16
"""Elementwise kernels take rows shorter than this as pattern rows of the ``(A, C * B)`` view
(per-column vectors), longer rows one ``(a, c)`` row at a time (per-channel scalars)."""

ELEMENTWISE_CHUNKS = 64
"""Runs of rows an elementwise kernel deals out to its threads."""

_THREAD_TASKS = 8
"""Tasks wanted per moments or sums kernel at least: rows are cut into chunks where channels
are fewer, so that every thread has work."""


class NumbaPrimitives(NumpyPrimitives):
    """The NumPy primitives with Numba's kernels (:mod:`.numba_kernels`) for C-contiguous
    float32/float64 arrays above :data:`SMALL_BYTES`: block moments, the backward's sums and
    the fused elementwise forms, each in one parallel read. Value-dependent shortcuts are left
    out there: the exact forms cost the same in a compiled loop."""

    name = "NumPy + Numba"
    accelerator = "numba"

    def one_read(self, x: Any) -> bool:
        return _tileable(x)

    def shortcuts(self, x: Any) -> bool:
        return False if _tileable(x) else super().shortcuts(x)

    def block_moments(self, x: Any, recipe: Recipe) -> tuple[Any, Any, Any, Any]:
        if not _tileable(x):
            return super().block_moments(x, recipe)
        kernels = _numba_kernels()
        x3, bits3 = _with_bits(x, recipe)
        outer, channels, inner = x3.shape
        if inner >= TILE_BELOW:
            chunks = min(outer, -(-_THREAD_TASKS // channels))
            rows = max(1, min(outer, ROW_BLOCK // inner))
            partial = kernels.row_moments(
                x3.reshape(-1), bits3.reshape(-1), outer, channels, inner, chunks, rows, min(inner, ROW_BLOCK)
            )
            return tuple(kernels.merge_partials(partial, 1))
        rows, columns = _tile_shape(outer, channels * inner)
        partial = kernels.tile_moments(x3.reshape(outer, -1), bits3.reshape(outer, -1), rows, columns)
        return tuple(kernels.merge_partials(partial, inner))

    def product_sums(self, grad: Any, x: Any, recipe: Recipe, shift: Any, scale: Any) -> tuple[Any, Any]:
        if not _tileable(x, grad):
            return super().product_sums(grad, x, recipe, shift, scale)
        kernels = _numba_kernels()
        x3, _ = _setup(x, recipe)
        g3 = grad.reshape(x3.shape)
        outer, channels, inner = x3.shape
        shift = np.zeros(channels) if shift is None else np.asarray(shift, dtype=np.float64)
        scale = np.ones(channels) if scale is None else np.asarray(scale, dtype=np.float64)
        if inner >= TILE_BELOW:
            chunks = min(outer, -(-_THREAD_TASKS // channels))
            partial = kernels.row_product_sums(
                g3.reshape(-1), x3.reshape(-1), outer, channels, inner, shift, scale, chunks
            )
            return np.add.reduce(partial[0], axis=0), np.add.reduce(partial[1], axis=0)
        partial = kernels.column_product_sums(
            g3.reshape(outer, -1), x3.reshape(outer, -1), np.repeat(shift, inner), np.repeat(scale, inner),
            min(outer, _THREAD_TASKS), min(channels * inner, TILE_COLUMNS),
        )  # fmt: skip
        total = np.add.reduce(partial, axis=1).reshape(2, channels, inner)
        return np.add.reduce(total[0], axis=1), np.add.reduce(total[1], axis=1)

    def affine(self, x: Any, recipe: Recipe, scale: Any, shift: Any, mult: Any, add: Any) -> Any:
        if not _tileable(x):
            return super().affine(x, recipe, scale, shift, mult, add)
        x3, _ = _setup(x, recipe)
        vectors = _full_vectors(x3, (scale, 1.0), (shift, 0.0), (mult, 1.0), (add, 0.0))
        return _elementwise("affine", x3, (x3,), vectors).reshape(x.shape)

    def grad_input(self, grad: Any, x: Any, recipe: Recipe, k: Any, shift: Any, f: Any, c: Any) -> Any:
        if not _tileable(x, grad):
            return super().grad_input(grad, x, recipe, k, shift, f, c)
        x3, _ = _setup(x, recipe)
        vectors = _full_vectors(x3, (k, 1.0), (shift, 0.0), (f, 0.0), (c, 0.0))
        return _elementwise("grad_input", x3, (grad.reshape(x3.shape), x3), vectors).reshape(x.shape)


def _tile_shape(outer: int, width: int) -> tuple[int, int]:
    """Rows and columns of a short-row kernel's tile of an ``(outer, width)`` view: as many rows
    as fit (each column of a tile is a block, so taller tiles leave fewer blocks to merge),
    at least 256 columns (contiguous runs to vectorize)."""
    columns = min(width, max(256, min(TILE_COLUMNS, TILE_VALUES // max(1, outer))))
    return max(1, min(outer, TILE_VALUES // columns)), columns


def _with_bits(x: np.ndarray, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """The ``(A, C, B)`` view of ``x`` and the same memory as integers of its item size."""
    x3, _ = _setup(x, recipe)
    return x3, x3.view(np.int32 if x.dtype == np.float32 else np.int64)


def _full_vectors(x3: np.ndarray, *pairs: tuple[Any, float]) -> list[np.ndarray]:
    """Per-channel vectors in ``x3``'s dtype, a vector of ``default`` standing for None (``x * 1``
    and ``x - 0`` round to ``x``)."""
    channels = x3.shape[1]
    return [
        np.full(channels, default, dtype=x3.dtype) if v is None else np.asarray(v, dtype=x3.dtype)
        for v, default in pairs
    ]


def _elementwise(name: str, x3: np.ndarray, arrays: tuple[np.ndarray, ...], vectors: list[np.ndarray]) -> np.ndarray:
    """Kernel ``row_<name>`` (per-channel scalars) on long rows, ``tile_<name>`` (pattern rows)
    on short ones."""
    kernels = _numba_kernels()
    outer, channels, inner = x3.shape
    if inner >= PATTERN_BELOW:
        chunks = min(outer * channels, ELEMENTWISE_CHUNKS)
        return getattr(kernels, f"row_{name}")(*(a.reshape(-1) for a in arrays), channels, inner, chunks, *vectors)
    rows = (a.reshape(outer, -1) for a in arrays)
    return getattr(kernels, f"tile_{name}")(*rows, *(np.repeat(v, inner) for v in vectors))


@functools.cache
def _numba_kernels() -> ModuleType:
    from . import numba_kernels

    return numba_kernels


@functools.cache
def numba_installed() -> bool:
    """Whether Numba can be imported (looked up once, without importing it)."""
    return importlib.util.find_spec("numba") is not None


def numba_enabled() -> bool:
    """Whether Numba's kernels serve: installed, and not switched off (:data:`NUMBA_SWITCH`)."""
    switch = os.environ.get(NUMBA_SWITCH, "")
    return switch.strip().lower() not in _OFF and numba_installed()


_OFF = ("0", "off", "false", "no")

_PRIMITIVES: dict[tuple[int, bool], NumpyPrimitives] = {}


def primitives_for(xp: ModuleType, x: Any) -> Primitives:
    """The NumPy primitive set (one per namespace object): with Numba's kernels where
    :func:`numba_enabled`."""
    key = (id(xp), numba_enabled())
    found = _PRIMITIVES.get(key)
    if found is None:
        found = _PRIMITIVES[key] = NumbaPrimitives(xp) if key[1] else NumpyPrimitives(xp)
    return found
