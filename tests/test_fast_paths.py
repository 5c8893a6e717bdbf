"""Every fast path equals the agnostic path (and both the float64 reference).

The NumPy fast path (``_numpy_fast``) is taken by default for C-contiguous
float32/float64 ndarrays; ``_functional.FAST_PATHS = False`` forces the
agnostic code, so the two can be compared on the same input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths
from portable_bn import _numpy_fast
from portable_bn._check import sample
from portable_bn._reference import reference_backward, reference_batch_norm
from portable_bn._tolerance import max_error, tolerance


@pytest.fixture(params=["small", "tiled"])
def path(request, monkeypatch):
    """Run a test through the small-input code (whole array at once) and through the tiled code."""
    monkeypatch.setattr(_numpy_fast, "SMALL_BYTES", 1 << 40 if request.param == "small" else 0)
    return request.param


@pytest.fixture
def tiled(monkeypatch):
    """Tests of the tiling itself: no small-input shortcut."""
    monkeypatch.setattr(_numpy_fast, "SMALL_BYTES", 0)


SHAPES = [((6, 4), 1), ((4, 3, 7), 1), ((5, 3, 4, 6), 1), ((2, 3, 2, 3, 4), 1), ((4, 5, 6, 3), -1), ((3, 4, 5), 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_numpy_fast_path_equals_agnostic_path(path, dtype, shape, axis, training, affine):
    rng = np.random.default_rng(0)
    channels = shape[axis]
    x = sample(shape, seed=1, axis=axis).astype(dtype)
    rm, rv = rng.normal(size=channels).astype(dtype), rng.uniform(0.5, 2, channels).astype(dtype)
    w = rng.uniform(0.5, 2, channels).astype(dtype) if affine else None
    b = rng.normal(size=channels).astype(dtype) if affine else None
    assert _numpy_fast.eligible(x, w, b, rm)
    fast, agnostic = both_paths(pbn.batch_norm, x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
    expected = reference_batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
    tol = tolerance(np.dtype(dtype).name)
    for name in ("output", "running_mean", "running_var", "mean", "invstd"):
        f, a = getattr(fast, name), getattr(agnostic, name)
        assert f.dtype == a.dtype and f.shape == a.shape, name
        assert max_error(f, a) <= tol, name
        assert max_error(f, expected[name]) <= tol, name
    grad = rng.normal(size=shape).astype(dtype)
    fast_grads, agnostic_grads = both_paths(
        pbn.batch_norm_backward, grad, x, w, fast.mean, fast.invstd, training=training, axis=axis
    )
    want = reference_backward(grad, x, w, fast.mean, fast.invstd, training=training, axis=axis)
    for f, a, e in zip(fast_grads, agnostic_grads, want, strict=True):
        assert f.dtype == a.dtype and f.shape == a.shape
        assert max_error(f, a) <= tol
        assert max_error(f, e) <= tol


@pytest.mark.parametrize(("offset", "spread"), [(1e4, 0.1), (1e6, 1.0), (2.0**59, 2.0**59), (0.0, 1e20), (0.0, 3e37)])
def test_hard_data_takes_a_correct_path(path, offset, spread):
    """Large offsets stay on the fast path; data whose squares or sums would
    overflow fall back to the (prescaling) agnostic path: same results."""
    x = (offset + spread * np.random.default_rng(2).normal(size=(64, 3, 8, 8))).astype(np.float32)
    fast, agnostic = both_paths(pbn.batch_norm, x, training=True)
    expected = reference_batch_norm(x.astype(np.float64), training=True)["output"]
    assert max_error(fast.output, expected) <= tolerance("float32")
    assert max_error(fast.output, agnostic.output) <= tolerance("float32")


def test_constant_and_nonfinite_channels_agree(path):
    x = np.random.default_rng(3).normal(size=(8, 4, 5)).astype(np.float32)
    x[:, 1] = 1e15
    x[:, 2] = 7.25
    bias = np.arange(4, dtype=np.float32)
    fast, agnostic = both_paths(pbn.batch_norm, x, bias=bias, training=True)
    np.testing.assert_array_equal(fast.output[:, 1:3], agnostic.output[:, 1:3])
    np.testing.assert_array_equal(fast.output[:, 1], np.float32(1.0))
    x[0, 3, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast, agnostic = both_paths(pbn.batch_norm, x, bias=bias, training=True)
    np.testing.assert_array_equal(fast.output, agnostic.output)  # NaN data: the agnostic path itself


def test_ineligible_inputs_take_the_agnostic_path():
    x = sample((4, 3, 5), seed=4)
    assert not _numpy_fast.eligible(x[:, :, ::2])  # not contiguous
    assert not _numpy_fast.eligible(x.astype(np.float16))  # computed in float32 by the agnostic path
    assert not _numpy_fast.eligible(np.ma.masked_array(x))  # a subclass
    strided = x[:, :, ::2]
    result = pbn.batch_norm(strided, training=True)
    expected = reference_batch_norm(strided, training=True)["output"]
    assert max_error(result.output, expected) <= tolerance("float64")


@pytest.mark.parametrize("block_bytes", [1, 200, 1 << 18])
@pytest.mark.parametrize("training", [True, False])
def test_blocking_does_not_change_the_result(tiled, monkeypatch, block_bytes, training):
    """Blocks of one row, of a few rows, and the real size on a multi-block input."""
    monkeypatch.setattr(_numpy_fast, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(5)
    shape = (48, 3, 40, 40)  # 1.8 MiB in float32: several real-size blocks too
    x = sample(shape, seed=6).astype(np.float32)
    w, b = rng.uniform(0.5, 2, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fast, agnostic = both_paths(pbn.batch_norm, x, rm, rv, w, b, training=training)
    expected = reference_batch_norm(x, rm, rv, w, b, training=training)
    assert max_error(fast.output, expected["output"]) <= tolerance("float32")
    assert max_error(fast.output, agnostic.output) <= tolerance("float32")
    grad = rng.normal(size=shape).astype(np.float32)
    fast_grads, agnostic_grads = both_paths(
        pbn.batch_norm_backward, grad, x, w, fast.mean, fast.invstd, training=training
    )
    want = reference_backward(grad, x, w, fast.mean, fast.invstd, training=training)
    for f, a, e in zip(fast_grads, agnostic_grads, want, strict=True):
        assert max_error(f, e) <= tolerance("float32")
        assert max_error(f, a) <= tolerance("float32")


# Tilings of _numpy_fast: (shape, what it exercises).
TILINGS = [
    ((6, 5, 7), "pattern rows, short rows: column sums"),
    ((8, 3, 600), "pattern rows, long rows: one-row tiles, dot products"),
    ((2, 3, 50), "fewer than 4 rows: broadcasting"),
    ((4, 2, 4100), "rows of at least LONG_ROW: broadcasting"),
]


def _data(shape, dtype, offset, first_row_offset):
    spread = np.linspace(0.5, 2.0, shape[1])[:, None]  # shapes (A, C, B)
    x = offset + spread * np.random.default_rng(7).standard_normal(shape)
    x[0] += first_row_offset - offset  # the sample the shift is guessed from
    return x.astype(dtype)


@pytest.fixture(params=["vecdot", "no vecdot", "rows beyond DOT_ROW"])
def products(request, monkeypatch):
    """Sums of products by BLAS dot products and einsum (NumPy >= 2), by products summed in a
    scratch tile (NumPy 1.26 has no ``vecdot``), and with rows too long for one dot product."""
    if request.param == "no vecdot":
        monkeypatch.setattr(_numpy_fast, "_vecdot", None)
    elif request.param == "rows beyond DOT_ROW":
        monkeypatch.setattr(_numpy_fast, "DOT_ROW", 4)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "what"), TILINGS)
@pytest.mark.parametrize("block_bytes", [200, 1 << 19])
@pytest.mark.parametrize(
    ("offset", "first_row_offset", "passes"),
    [
        (0.2, 0.2, 1),  # centred: one pass, no shift, x * scale + offset
        (1e4, 1e4, 1),  # off-centre, sample guesses the shift: one pass, (x - m) * scale + ...
        (300.0, 0.0, 2),  # the sample looks centred but the data are not: second pass
    ],
)
def test_tilings_and_single_pass_decision(
    tiled, products, monkeypatch, dtype, shape, what, block_bytes, offset, first_row_offset, passes
):
    monkeypatch.setattr(_numpy_fast, "BLOCK_BYTES", block_bytes)
    calls = []
    moments = _numpy_fast._moments
    monkeypatch.setattr(_numpy_fast, "_moments", lambda *a: calls.append(1) or moments(*a))
    rng = np.random.default_rng(8)
    channels = shape[1]
    x = _data(shape, dtype, offset, first_row_offset)
    w, b = rng.uniform(0.5, 2, channels).astype(dtype), rng.normal(size=channels).astype(dtype)
    rm, rv = np.full(channels, offset, dtype), rng.uniform(0.5, 2, channels).astype(dtype)
    tol = tolerance(np.dtype(dtype).name)
    for training in (True, False):
        calls.clear()
        fast, agnostic = both_paths(pbn.batch_norm, x, rm, rv, w, b, training=training, momentum=0.3)
        expected = reference_batch_norm(x, rm, rv, w, b, training=training, momentum=0.3)
        if training:  # with 2 rows, half the data at 0 is centred enough (mean**2 <= var): one pass
            assert len(calls) == (1 if shape[0] == 2 else passes), what
        for name in ("output", "running_mean", "running_var", "mean", "invstd"):
            assert max_error(getattr(fast, name), expected[name]) <= tol, (name, what)
            assert max_error(getattr(fast, name), getattr(agnostic, name)) <= tol, (name, what)
        grad = rng.normal(size=shape).astype(dtype)
        fast_grads, agnostic_grads = both_paths(
            pbn.batch_norm_backward, grad, x, w, fast.mean, fast.invstd, training=training
        )
        want = reference_backward(grad, x, w, fast.mean, fast.invstd, training=training)
        for f, a, e in zip(fast_grads, agnostic_grads, want, strict=True):
            assert max_error(f, e) <= tol, what
            assert max_error(f, a) <= tol, what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_shortcut_taken_only_for_small_mean_times_scale(tiled, dtype):
    """Running means small against the std take x * scale + offset; large ones (cancellation)
    subtract first. Both equal the reference."""
    x = sample((6, 3, 5, 5), seed=9).astype(dtype)
    for running_mean in (np.array([0.3, -0.5, 0.1]), np.array([1e4, 0.0, -3e3])):
        rm, rv = running_mean.astype(dtype), np.full(3, 0.25, dtype)
        fast, agnostic = both_paths(pbn.batch_norm, x, rm, rv, training=False)
        expected = reference_batch_norm(x, rm, rv, training=False)["output"]
        assert max_error(fast.output, expected) <= tolerance(np.dtype(dtype).name)
        assert max_error(fast.output, agnostic.output) <= tolerance(np.dtype(dtype).name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_inputs_take_the_small_code(monkeypatch, dtype):
    """Inputs up to SMALL_BYTES skip the tiling (no _Tiling is built); larger ones tile."""
    built = []
    tiling = _numpy_fast._Tiling
    monkeypatch.setattr(_numpy_fast, "_Tiling", lambda *a: built.append(1) or tiling(*a))
    rng = np.random.default_rng(10)
    small = sample((2, 4, 3, 3), seed=11).astype(dtype)
    large = sample((64, 4, 32, 32), seed=12).astype(dtype)
    assert small.nbytes <= _numpy_fast.SMALL_BYTES < large.nbytes
    for x, tiles in ((small, False), (large, True)):
        w, b = rng.uniform(0.5, 2, 4).astype(dtype), rng.normal(size=4).astype(dtype)
        rm, rv = np.zeros(4, dtype), np.ones(4, dtype)
        for training in (True, False):
            built.clear()
            result = pbn.batch_norm(x, rm, rv, w, b, training=training)
            grads = pbn.batch_norm_backward(x, x, w, result.mean, result.invstd, training=training)
            assert bool(built) == tiles
            expected = reference_batch_norm(x, rm, rv, w, b, training=training)
            want = reference_backward(x, x, w, result.mean, result.invstd, training=training)
            assert max_error(result.output, expected["output"]) <= tolerance(np.dtype(dtype).name)
            for got, ref in zip(grads, want, strict=True):
                assert max_error(got, ref) <= tolerance(np.dtype(dtype).name)
