"""The Triton kernels (portable_bn._backends.triton_kernels) against NumPy float64 references.

On a machine without CUDA the kernels run in Triton's interpreter mode on CPU tensors
(``TRITON_INTERPRET=1`` is set before triton is imported); with CUDA they run compiled on the
GPU. Every shape also runs with a smaller tile (32 elements for the small shapes, 512 for the
two large ones), so that channels span many tiles of different scales and the merge of the
per-tile partials is exercised on small shapes.
"""

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from portable_bn._backends import triton_kernels as tk  # noqa: E402

if not torch.cuda.is_available() and type(tk._moments_kernel).__name__ != "InterpretedFunction":
    pytest.skip(  # triton decorates its own helpers at import, so a reload would not help
        "triton was imported before TRITON_INTERPRET=1 was set; set it in the environment", allow_module_level=True
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4, 3, 50), (7, 5, 1), (2, 3, 1000), (1, 2, 5000), (33, 2, 3)]
DTYPES = [torch.float32, torch.float64]
SMALL_TILE = 32
"""A tiny tile: on the small shapes, channels then span many tiles (the interpreter runs one
program at a time, so the two large shapes get 512 instead)."""
CASES = (
    [pytest.param(shape, tk._TILE, id=f"{shape}") for shape in SHAPES]
    + [pytest.param(shape, SMALL_TILE, id=f"{shape}-tile{SMALL_TILE}") for shape in SHAPES if np.prod(shape) < 1000]
    + [pytest.param(shape, 512, id=f"{shape}-tile512") for shape in SHAPES if np.prod(shape) >= 1000]
)


@pytest.fixture
def tile(request, monkeypatch):
    """``_TILE`` set to the case's tile for the test (``indirect`` parameter)."""
    monkeypatch.setattr(tk, "_TILE", request.param)
    return request.param


def _data(kind, shape, dtype, seed=0):
    """float64 NumPy data of ``kind``, rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    a, c, b = shape
    x = rng.standard_normal(shape) * 2.0 + 0.5
    if kind == "offset":
        x = 1e4 + rng.standard_normal(shape)
    elif kind == "constant":
        x[:, 0, :] = 12345.678 if dtype == torch.float64 else 0.1
    elif kind == "huge":
        x = 3e300 + 1e299 * rng.standard_normal(shape)
        x[:, -1, :] = 1e307 * rng.standard_normal((a, b))
    elif kind == "mixed":
        # 1e-3..1e9 along rows and pieces of 16; past the default tile, a millionth of that
        ia, ic, ib = np.arange(a)[:, None, None], np.arange(c)[None, :, None], np.arange(b)[None, None, :]
        x = x * 10.0 ** (((ia + ib // 16 + ic) % 5) * 3 - 3 - 6 * (ib >= tk._TILE))
    return x.astype(np.float32 if dtype == torch.float32 else np.float64).astype(np.float64)


def _tensor(x, dtype):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def _channels(x):
    """(C, A*B) rows of a NumPy (A, C, B) array."""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def _expected_scale(x):
    """The contract's channel scale: 2**-floor(log2(max|x|)), exponent clamped to [0, 1022]."""
    m = np.abs(_channels(x)).max(axis=1)
    e = np.clip(np.frexp(m)[1] - 1, 0, 1022)
    return np.ldexp(1.0, -e)


def _reference(rows, shift):
    """Per-channel float64 mean, mean less ``shift`` and variance of ``(C, n)`` rows from exactly
    rounded sums: the mean by ``math.fsum`` (and the offset as ``fsum`` of the rows and ``n``
    copies of ``-shift``, since the rounded mean less the shift would carry the mean's
    rounding, about ``eps * |mean|``), then M2 by ``math.fsum`` of the squared deviations about
    the mean."""
    n = rows.shape[1]
    mean = np.array([math.fsum(r) / n for r in rows])
    off = np.array([math.fsum([*r, *np.full(n, -t)]) / n for r, t in zip(rows, shift, strict=True)])
    var = np.array([math.fsum((r - m) ** 2) / n for r, m in zip(rows, mean, strict=True)])
    return mean, off, var


def _check_moments(x, dtype, var_tol=1e-12, mean_tol=1e-12):
    """``block_moments`` of ``x`` against :func:`_reference`: ``mean`` (relative to ``shift``)
    within ``mean_tol`` of the larger of its value and the standard deviation, ``shift + mean``
    as well up to that sum's float64 rounding, and the variance within ``var_tol`` relatively;
    a constant channel exactly (shift its value, mean and M2 0)."""
    xt = _tensor(x, dtype)
    before = xt.clone()
    shift, mean, m2, scale = tk.block_moments(xt)
    assert torch.equal(xt, before)
    c = x.shape[1]
    assert all(v.dtype == torch.float64 and v.shape == (c,) for v in (shift, mean, m2))
    rows = _channels(x)
    if dtype == torch.float64:
        assert scale.dtype == torch.float64 and scale.shape == (c,)
        scale = scale.cpu().numpy()
        np.testing.assert_array_equal(scale, _expected_scale(x))
        rows = rows * scale[:, None]  # exact: powers of two
    else:
        assert scale is None
    shift, mean, m2 = shift.cpu().numpy(), mean.cpu().numpy(), m2.cpu().numpy()
    n = rows.shape[1]
    ref_mean, ref_off, ref_var = _reference(rows, shift)
    assert np.all(np.isfinite(m2))
    zero = rows.min(axis=1) == rows.max(axis=1)  # constant: exact
    live = ~zero
    unit = np.maximum(np.abs(ref_off[live]), np.sqrt(ref_var[live]))
    mean_err = np.abs(mean[live] - ref_off[live]) / unit
    assert np.all(mean_err <= mean_tol), mean_err
    total = shift[live] + mean[live]  # within its own float64 rounding of the mean
    total_err = np.abs(total - ref_mean[live]) - 2.0**-53 * np.abs(total)
    assert np.all(total_err <= mean_tol * unit), total_err
    var = m2 / n
    np.testing.assert_array_equal(shift[zero], rows[zero, 0])
    np.testing.assert_array_equal(mean[zero], 0.0)
    np.testing.assert_array_equal(var[zero], 0.0)
    var_err = np.abs(var[live] - ref_var[live]) / ref_var[live]
    assert np.all(var_err <= var_tol), var_err
    return shift, mean, m2, scale


@pytest.mark.parametrize(("shape", "tile"), CASES, indirect=["tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["normal", "offset", "constant", "mixed"])
def test_block_moments(kind, dtype, shape, tile):
    x = _data(kind, shape, dtype)
    shift, mean, m2, scale = _check_moments(x, dtype)
    if kind == "constant":  # exact: the value (times the scale) and 0
        v = x[0, 0, 0] * (1.0 if scale is None else scale[0])
        assert shift[0] == v
        assert mean[0] == 0.0
        assert m2[0] == 0.0


@pytest.mark.parametrize(("shape", "tile"), [c for c in CASES if c.values[0] != (7, 5, 1)], indirect=["tile"])
def test_block_moments_huge_float64(shape, tile):
    """Values near 1e300 and 1e307: finite M2, variance right relative to the reference."""
    _check_moments(_data("huge", shape, torch.float64), torch.float64)


@pytest.mark.parametrize(
    ("shape", "tile"),
    [pytest.param((64, 3, 1024), tk._TILE, id="(64, 3, 1024)"), pytest.param((4096, 3, 1), 256, id="(4096, 3, 1)")],
    indirect=["tile"],
)
@pytest.mark.parametrize(("offset", "spread"), [(1e4, 0.1), (1e6, 1.0), (1.0, 1e-4)], ids=["1e4", "1e6", "1"])
def test_block_moments_large_offset_float64(offset, spread, shape, tile):
    """float64 data with an offset far above its spread, over at least 16 tiles per channel: the
    tiles' means are merged as exact offsets from the shift, so the variance stays within the
    package's float64 tolerance (2**-52 * 65) of the exactly summed reference."""
    rows, ct, bp, _ = tk._layout(*shape, 8)
    n_a, _, n_b = tk._grid(*shape, rows, ct, bp)
    assert n_a * n_b >= 16
    x = offset + spread * np.random.default_rng(11).standard_normal(shape)
    _check_moments(x, torch.float64, var_tol=1.4e-14, mean_tol=1e-14)


@pytest.mark.parametrize(("shape", "tile"), [c for c in CASES if np.prod(c.values[0]) < 1000], indirect=["tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_block_moments_constant_large(dtype, shape, tile):
    """A constant channel of a large value (float64: 3.7e200, many tiles) is exact too."""
    x = _data("normal", shape, dtype)
    x[:, 1, :] = 3.7e200 if dtype == torch.float64 else np.float32(-7.25e30)
    shift, mean, m2, scale = tk.block_moments(_tensor(x, dtype))
    s = 1.0 if scale is None else scale[1].item()
    assert shift[1].item() == x[0, 1, 0] * s
    assert mean[1].item() == 0.0
    assert m2[1].item() == 0.0


@pytest.mark.parametrize("tile", [tk._TILE, SMALL_TILE], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_block_moments_nonfinite(dtype, tile):
    """Inf or NaN in a channel makes its moments NaN; the other channels are unaffected."""
    x = _data("normal", (4, 3, 50), dtype)
    x[1, 0, 7] = np.inf
    x[2, 1, 3] = np.nan
    with np.errstate(invalid="ignore"):  # the interpreter computes with NumPy: inf - inf warns
        shift, mean, m2, scale = tk.block_moments(_tensor(x, dtype))
    mean, m2 = (shift + mean).cpu().numpy(), m2.cpu().numpy()
    assert np.isnan(mean[0]) or np.isnan(m2[0])
    assert np.isnan(mean[1]) and np.isnan(m2[1])
    s = 1.0 if scale is None else scale[2].item()
    rows = _channels(x) * s
    assert abs(m2[2] / rows.shape[1] - rows[2].var()) <= 1e-12 * rows[2].var()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_block_moments_empty(dtype):
    shift, mean, m2, scale = tk.block_moments(torch.empty((0, 3, 5), dtype=dtype, device=DEVICE))
    assert (shift == 0).all() and torch.isnan(mean).all() and (m2 == 0).all()
    assert scale is None if dtype == torch.float32 else (scale == 1).all()


def _vectors(c, dtype, seed, count):
    rng = np.random.default_rng(seed)
    vs = [rng.standard_normal(c) * 3.0 for _ in range(count)]
    vs = [v.astype(np.float32 if dtype == torch.float32 else np.float64).astype(np.float64) for v in vs]
    return vs, [_tensor(v, dtype) for v in vs]


def _bcast(v):
    return v[None, :, None]


@pytest.mark.parametrize(("shape", "tile"), CASES, indirect=["tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_affine(dtype, shape, tile):
    x = _data("offset", shape, dtype, seed=1)
    (scale, shift, mult, add), tensors = _vectors(shape[1], dtype, 2, 4)
    shift = shift + 1e4 * scale  # cancels the offset: a rounding of x*scale shows relative to it
    tensors[1] = _tensor(shift, dtype)
    shift = tensors[1].cpu().double().numpy()
    xt = _tensor(x, dtype)
    before = [t.clone() for t in (xt, *tensors)]
    out = tk.affine(xt, *tensors)
    assert all(torch.equal(t, b) for t, b in zip((xt, *tensors), before, strict=True))
    assert out.dtype == dtype and out.shape == shape and out.device == xt.device
    ref = (x * _bcast(scale) - _bcast(shift)) * _bcast(mult) + _bcast(add)
    magnitude = (np.abs(x * _bcast(scale)) + np.abs(_bcast(shift))) * np.abs(_bcast(mult)) + np.abs(_bcast(add))
    eps = torch.finfo(dtype).eps
    assert np.all(np.abs(out.cpu().double().numpy() - ref) <= 2 * eps * magnitude)


@pytest.mark.parametrize(("shape", "tile"), CASES, indirect=["tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_grad_input(dtype, shape, tile):
    x = _data("offset", shape, dtype, seed=3)
    g = _data("normal", shape, dtype, seed=4)
    (k, shift, f, c), tensors = _vectors(shape[1], dtype, 5, 4)
    tensors[1] = _tensor(1e4 + shift, dtype)
    shift = tensors[1].cpu().double().numpy()
    xt, gt = _tensor(x, dtype), _tensor(g, dtype)
    before = [t.clone() for t in (gt, xt, *tensors)]
    out = tk.grad_input(gt, xt, *tensors)
    assert all(torch.equal(t, b) for t, b in zip((gt, xt, *tensors), before, strict=True))
    assert out.dtype == dtype and out.shape == shape
    ref = g * _bcast(k) + (x - _bcast(shift)) * _bcast(f) + _bcast(c)
    magnitude = np.abs(g * _bcast(k)) + (np.abs(x) + np.abs(_bcast(shift))) * np.abs(_bcast(f)) + np.abs(_bcast(c))
    eps = torch.finfo(dtype).eps
    assert np.all(np.abs(out.cpu().double().numpy() - ref) <= 2 * eps * magnitude)


@pytest.mark.parametrize(("shape", "tile"), CASES, indirect=["tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_product_sums(dtype, shape, tile):
    x = _data("offset", shape, dtype, seed=6)
    g = _data("normal", shape, dtype, seed=7)
    (shift, scale), tensors = _vectors(shape[1], dtype, 8, 2)
    tensors[0] = _tensor(1e4 + shift, dtype)
    shift = tensors[0].cpu().double().numpy()
    xt, gt = _tensor(x, dtype), _tensor(g, dtype)
    before = [t.clone() for t in (gt, xt, *tensors)]
    sum_g, sum_gv = tk.product_sums(gt, xt, *tensors)
    assert all(torch.equal(t, b) for t, b in zip((gt, xt, *tensors), before, strict=True))
    assert sum_g.dtype == sum_gv.dtype == torch.float64 and sum_g.shape == sum_gv.shape == (shape[1],)
    gv = _channels(g * ((x - _bcast(shift)) * _bcast(scale)))
    rows_g = _channels(g)
    for got, rows in ((sum_g, rows_g), (sum_gv, gv)):  # float64 sums: near the reference per channel
        assert np.all(np.abs(got.cpu().numpy() - rows.sum(axis=1)) <= 1e-13 * np.abs(rows).sum(axis=1))
