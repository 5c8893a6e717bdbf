"""Triton kernels: per-channel moments, the fused scale-and-shift and the backward sums.

What: four functions on a C-contiguous float32/float64 torch tensor viewed as ``(A, C, B)``
(``A`` elements before the channel axis, ``C`` channels, ``B`` after), with per-channel
vectors of length ``C``. :func:`block_moments` returns each channel's shift, mean relative to
that shift and M2 (sum of squared deviations) of ``x * scale`` in float64; :func:`affine` computes
``(x * scale - shift) * mult + add``; :func:`product_sums` returns ``sum(g)`` and
``sum(g * ((x - shift) * scale))``; :func:`grad_input` computes
``g * k + (x - shift) * f + c``. They are the CUDA accelerators of the moments primitive, the
fused scale-and-shift and the backward sums.

How: every kernel walks the input in tiles of ``ROWS x CT x BP`` elements (rows ``a`` x a range
of channels x a contiguous piece of ``B``), chosen in :func:`_layout` from the shape alone; a
tile is read once, with loads along the contiguous axis. The reductions write one partial
per (channel, tile) to a small float64 buffer, merged per channel by torch operations on the
same stream. Nothing is read on the host, so the calls run under
``torch.cuda.set_sync_debug_mode("error")`` and inside CUDA graph capture (once compiled: the
first call of each tile variant compiles it). Every kernel is compiled with
``enable_fp_fusion=False``: each operation rounds as written, with no fused multiply-add, as
in the interpreter.

Why tested without a GPU: on CPU machines the tests run these kernels in Triton's
interpreter mode (``TRITON_INTERPRET=1`` set before ``import triton``), where they take CPU
tensors; on a GPU machine the same tests run them compiled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096
"""Elements per tile (at most): 16 values per thread at 8 warps, so a tile stays in registers,
and large enough that the per-tile partials are a few percent of the input's traffic."""

_RUN_BYTES = 128
"""Contiguous bytes a tile should cover along the fastest axis (one full memory transaction):
when ``B`` is shorter, a tile takes several consecutive channels."""


def _pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def _layout(a: int, c: int, b: int, itemsize: int) -> tuple[int, int, int, int]:
    """The tile ``(ROWS, CT, BP, num_warps)`` for an ``(a, c, b)`` view, from the shape only.

    ``BP`` covers ``b`` rounded up to a power of two, at most one tile: a large ``b`` is split
    into contiguous row pieces. When ``BP`` is shorter than one memory transaction, ``CT``
    consecutive channels share the tile, so a tile row (fixed ``a``) is a run of ``CT * b``
    contiguous elements (for ``b == 1``, a 2-D input, the channel axis itself). The remaining
    budget goes to ``ROWS`` rows of ``a``. Powers of two keep the compiled variants few."""
    bp = min(_pow2(b), _TILE)
    ct = min(_pow2(c), max(1, (_RUN_BYTES // itemsize) // bp))
    rows = min(_pow2(a), max(1, _TILE // (bp * ct)))
    return rows, ct, bp, 8 if rows * ct * bp >= 2048 else 4


def _grid(a: int, c: int, b: int, rows: int, ct: int, bp: int) -> tuple[int, int, int]:
    """Tiles along each axis; the launch grid is their product, one axis (no 65535 limit)."""
    return triton.cdiv(a, rows), triton.cdiv(c, ct), triton.cdiv(b, bp)


@triton.jit
def _tile(A, C, B, ROWS: tl.constexpr, CT: tl.constexpr, BP: tl.constexpr):  # type: ignore[no-untyped-def]
    """This program's tile: int64 offsets and mask ``(ROWS, CT, BP)``, its channels and their
    mask ``(CT,)``, its partial column, and its per-channel count of valid elements."""
    n_c = tl.cdiv(C, CT)
    n_b = tl.cdiv(B, BP)
    pid = tl.program_id(0).to(tl.int64)
    pb = pid % n_b
    rest = pid // n_b
    pc = rest % n_c
    pa = rest // n_c
    a = pa * ROWS + tl.arange(0, ROWS).to(tl.int64)
    ch = pc * CT + tl.arange(0, CT).to(tl.int64)
    b = pb * BP + tl.arange(0, BP).to(tl.int64)
    offs = (a[:, None, None] * C + ch[None, :, None]) * B + b[None, None, :]
    cmask = ch < C
    mask = (a < A)[:, None, None] & cmask[None, :, None] & (b < B)[None, None, :]
    count = tl.minimum(A - pa * ROWS, ROWS) * tl.minimum(B - pb * BP, BP)
    return offs, mask, ch, cmask, pa * n_b + pb, count.to(tl.float64)


@triton.jit
def _sum2(v):  # type: ignore[no-untyped-def]
    """Sum of a ``(ROWS, CT, BP)`` tile over rows and ``B``: one value per channel."""
    return tl.sum(tl.sum(v, axis=2), axis=0)


@triton.jit
def _moments_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    cnt_ptr,
    mean_ptr,
    corr_ptr,
    m2_ptr,
    scale_ptr,
    A,
    C,
    B,
    NB,
    ROWS: tl.constexpr,
    CT: tl.constexpr,
    BP: tl.constexpr,
    SCALED: tl.constexpr,
):
    offs, mask, ch, cmask, col, k = _tile(A, C, B, ROWS, CT, BP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    if SCALED:
        # s = 2**-e, e = floor(log2(max|x|)) clamped to [0, 1022], from the exponent bits.
        mag = tl.max(tl.max(tl.abs(x), axis=2), axis=0)
        e = (mag.to(tl.int64, bitcast=True) >> 52) - 1023
        e = tl.minimum(tl.maximum(e, 0), 1022)
        s = ((1023 - e) << 52).to(tl.float64, bitcast=True)
        v = x * s[None, :, None]
    else:
        v = x
    lo = tl.min(tl.min(tl.where(mask, v, float("inf")), axis=2), axis=0)
    hi = tl.max(tl.max(tl.where(mask, v, float("-inf")), axis=2), axis=0)
    total = _sum2(v)
    mean = total / k
    d = tl.where(mask, v - mean[None, :, None], 0.0)
    sd = _sum2(d)
    m2 = _sum2(d * d) - sd * sd / k
    corr = sd / k  # kept apart from the rounded mean: the merge adds it to an exact offset
    # A constant block (no NaN: total is NaN then) is exact: its value, no correction, and 0.
    const = (lo == hi) & (total == total)
    mean = tl.where(const, lo, mean)
    corr = tl.where(const, 0.0, corr)
    m2 = tl.where(const | (m2 < 0.0), 0.0, m2)
    out = ch * NB + col
    tl.store(cnt_ptr + out, tl.zeros_like(mean) + k, mask=cmask)
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(corr_ptr + out, corr, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)
    if SCALED:
        tl.store(scale_ptr + out, s, mask=cmask)


@triton.jit
def _product_sums_kernel(  # type: ignore[no-untyped-def]
    g_ptr,
    x_ptr,
    shift_ptr,
    scale_ptr,
    sg_ptr,
    sgv_ptr,
    A,
    C,
    B,
    NB,
    ROWS: tl.constexpr,
    CT: tl.constexpr,
    BP: tl.constexpr,
):
    offs, mask, ch, cmask, col, _ = _tile(A, C, B, ROWS, CT, BP)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    shift = tl.load(shift_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    scale = tl.load(scale_ptr + ch, mask=cmask, other=0.0).to(tl.float64)
    v = (x - shift[None, :, None]) * scale[None, :, None]
    out = ch * NB + col
    tl.store(sg_ptr + out, _sum2(g), mask=cmask)
    tl.store(sgv_ptr + out, _sum2(g * v), mask=cmask)


@triton.jit
def _affine_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    scale_ptr,
    shift_ptr,
    mult_ptr,
    add_ptr,
    out_ptr,
    A,
    C,
    B,
    ROWS: tl.constexpr,
    CT: tl.constexpr,
    BP: tl.constexpr,
):
    offs, mask, ch, cmask, _, _ = _tile(A, C, B, ROWS, CT, BP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    shift = tl.load(shift_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    mult = tl.load(mult_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    add = tl.load(add_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    tl.store(out_ptr + offs, (x * scale - shift) * mult + add, mask=mask)


@triton.jit
def _grad_input_kernel(  # type: ignore[no-untyped-def]
    g_ptr,
    x_ptr,
    k_ptr,
    shift_ptr,
    f_ptr,
    c_ptr,
    out_ptr,
    A,
    C,
    B,
    ROWS: tl.constexpr,
    CT: tl.constexpr,
    BP: tl.constexpr,
):
    offs, mask, ch, cmask, _, _ = _tile(A, C, B, ROWS, CT, BP)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    k = tl.load(k_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    shift = tl.load(shift_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    f = tl.load(f_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    c = tl.load(c_ptr + ch, mask=cmask, other=0.0)[None, :, None]
    tl.store(out_ptr + offs, g * k + (x - shift) * f + c, mask=mask)


def _check(x3: torch.Tensor, *others: torch.Tensor) -> tuple[int, int, int]:
    """``x3``'s ``(A, C, B)``, after checking (metadata only) what the kernels assume."""
    if x3.dim() != 3 or x3.dtype not in (torch.float32, torch.float64) or not x3.is_contiguous():
        raise ValueError("expected a C-contiguous float32/float64 (A, C, B) tensor")
    for other in others:
        if other.dtype != x3.dtype or other.device != x3.device:
            raise ValueError("all tensors must share x's dtype and device")
    a, c, b = x3.shape
    return a, c, b


def block_moments(
    x3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-channel ``(shift, mean, m2, scale)`` of ``x * scale`` as float64 ``(C,)`` tensors, in one read.

    ``shift`` is a value close to the channel's mean of ``x * scale`` (the first tile's rounded
    mean), ``mean`` the mean of ``x * scale - shift`` (small: of the order of a standard
    deviation or less) and ``m2`` the sum of squared deviations; the channel's mean is
    ``shift + mean``. float64 input: ``scale`` is each channel's power of two (below); float32
    input: ``scale`` is None. An empty channel has shift 0, mean NaN, M2 0 (and scale 1).

    Each tile (:func:`_layout`) is loaded once into registers and, per channel, reduced to its
    count ``k``, a rounded mean ``mean_b = sum(v)/k``, a correction ``corr_b = sum(d)/k`` with
    ``d = v - mean_b``, and ``M2_b = sum(d*d) - sum(d)**2/k``, in float64; a constant tile gives
    its value, 0 and 0 exactly. float64 input is first multiplied by the tile's power of two
    ``2**-floor(log2(max|x|))`` (when ``max|x| > 1``, exponent at most 1022), so that squares
    cannot overflow; ``scale`` is each channel's finest such power. The per-tile partials are
    brought to that scale (powers of two: exact) and merged per channel as in Chan, Golub and
    LeVeque, on offsets from ``shift``: ``off_b = (mean_b - shift) + corr_b``, where the
    subtraction of two close numbers is exact, ``mean = sum(k_b * off_b) / n`` and
    ``M2 = sum(M2_b + k_b * (off_b - mean)**2)``.

    Why the offsets: a tile's mean rounded to float64 is off by about ``eps * |mean|``, while
    the tile means differ from each other by only about ``std / sqrt(k)``; for data with a large
    offset (``1e4 + 0.1 * N(0, 1)``) merging the rounded means would lose digits of the
    between-tile part of M2. The offsets keep full relative precision, so the result has the
    accuracy of a two-pass algorithm in one pass over the data, for any magnitude; a constant
    channel gives ``shift`` equal to its value (times the scale), ``mean`` and M2 exactly 0."""
    a, c, b = _check(x3)
    scaled = x3.dtype == torch.float64
    if a * b == 0 or c == 0:
        return (
            torch.zeros((c,), dtype=torch.float64, device=x3.device),
            torch.full((c,), float("nan"), dtype=torch.float64, device=x3.device),
            torch.zeros((c,), dtype=torch.float64, device=x3.device),
            torch.ones((c,), dtype=torch.float64, device=x3.device) if scaled else None,
        )
    rows, ct, bp, warps = _layout(a, c, b, x3.element_size())
    n_a, n_c, n_b = _grid(a, c, b, rows, ct, bp)
    nb = n_a * n_b
    cnt, mean_b, corr_b, m2_b = (torch.empty((c, nb), dtype=torch.float64, device=x3.device) for _ in range(4))
    scale_b = torch.empty((c, nb), dtype=torch.float64, device=x3.device) if scaled else mean_b
    _moments_kernel[(n_a * n_c * n_b,)](
        x3,
        cnt,
        mean_b,
        corr_b,
        m2_b,
        scale_b,
        a,
        c,
        b,
        nb,
        ROWS=rows,
        CT=ct,
        BP=bp,
        SCALED=scaled,
        num_warps=warps,
        enable_fp_fusion=False,
    )
    scale = None
    if scaled:
        scale = scale_b.amin(dim=1)
        ratio = scale[:, None] / scale_b  # powers of two: exact
        mean_b = mean_b * ratio
        corr_b = corr_b * ratio
        m2_b = m2_b * ratio * ratio
    n = cnt.sum(dim=1)
    shift = mean_b[:, 0]
    off = (mean_b - shift[:, None]) + corr_b  # the subtraction: exact for close means (Sterbenz)
    mean = (cnt * off).sum(dim=1) / n
    dev = off - mean[:, None]
    m2 = (m2_b + cnt * (dev * dev)).sum(dim=1)
    return shift, mean, m2, scale


def affine(
    x3: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mult: torch.Tensor, add: torch.Tensor
) -> torch.Tensor:
    """``(x * scale - shift) * mult + add`` per channel, a new ``(A, C, B)`` tensor in x's dtype.

    One read of ``x`` and one write, tile by tile (:func:`_layout`), with the four ``(C,)``
    vectors loaded once per tile. Each operation rounds in x's dtype: the kernel is compiled
    without floating-point contraction (no fused multiply-add), so the result is the formula's
    as written, the same on every device."""
    a, c, b = _check(x3, scale, shift, mult, add)
    out = torch.empty((a, c, b), dtype=x3.dtype, device=x3.device)
    if out.numel() == 0:
        return out
    rows, ct, bp, warps = _layout(a, c, b, x3.element_size())
    n_a, n_c, n_b = _grid(a, c, b, rows, ct, bp)
    vectors = [v.contiguous() for v in (scale, shift, mult, add)]
    _affine_kernel[(n_a * n_c * n_b,)](
        x3, *vectors, out, a, c, b, ROWS=rows, CT=ct, BP=bp, num_warps=warps, enable_fp_fusion=False
    )
    return out


def product_sums(
    g3: torch.Tensor, x3: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * ((x - shift) * scale))`` as float64 ``(C,)`` tensors.

    One read of ``g`` and ``x``, tile by tile (:func:`_layout`); each tile's two sums are formed
    in float64 (the inputs converted exactly) and written as per-tile partials, which torch
    sums per channel on the same stream. Why partials rather than atomics: the result does not
    depend on the order in which tiles finish."""
    a, c, b = _check(x3, g3, shift, scale)
    if g3.shape != x3.shape or not g3.is_contiguous():
        raise ValueError("g must be a C-contiguous tensor of x's shape")
    if a * b == 0 or c == 0:
        return torch.zeros((c,), dtype=torch.float64, device=x3.device), torch.zeros(
            (c,), dtype=torch.float64, device=x3.device
        )
    rows, ct, bp, warps = _layout(a, c, b, x3.element_size())
    n_a, n_c, n_b = _grid(a, c, b, rows, ct, bp)
    nb = n_a * n_b
    sg = torch.empty((c, nb), dtype=torch.float64, device=x3.device)
    sgv = torch.empty((c, nb), dtype=torch.float64, device=x3.device)
    _product_sums_kernel[(n_a * n_c * n_b,)](
        g3,
        x3,
        shift.contiguous(),
        scale.contiguous(),
        sg,
        sgv,
        a,
        c,
        b,
        nb,
        ROWS=rows,
        CT=ct,
        BP=bp,
        num_warps=warps,
        enable_fp_fusion=False,
    )
    return sg.sum(dim=1), sgv.sum(dim=1)


def grad_input(
    g3: torch.Tensor, x3: torch.Tensor, k: torch.Tensor, shift: torch.Tensor, f: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``g * k + (x - shift) * f + c`` per channel, a new ``(A, C, B)`` tensor in x's dtype.

    One read of ``g`` and ``x`` and one write, tile by tile (:func:`_layout`), the four ``(C,)``
    vectors loaded once per tile; compiled without floating-point contraction, so every
    operation rounds in x's dtype as written."""
    a, ch, b = _check(x3, g3, k, shift, f, c)
    if g3.shape != x3.shape or not g3.is_contiguous():
        raise ValueError("g must be a C-contiguous tensor of x's shape")
    out = torch.empty((a, ch, b), dtype=x3.dtype, device=x3.device)
    if out.numel() == 0:
        return out
    rows, ct, bp, warps = _layout(a, ch, b, x3.element_size())
    n_a, n_c, n_b = _grid(a, ch, b, rows, ct, bp)
    vectors = [v.contiguous() for v in (k, shift, f, c)]
    _grad_input_kernel[(n_a * n_c * n_b,)](
        g3, x3, *vectors, out, a, ch, b, ROWS=rows, CT=ct, BP=bp, num_warps=warps, enable_fp_fusion=False
    )
    return out
