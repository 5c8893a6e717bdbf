"""The CuPy fast path (``_cupy_fast``) equals the agnostic path and the float64 reference.

Runs with PBN_BACKENDS=cupy on a machine with a CUDA device (docs/testing, GPU
runs); skipped elsewhere. ``_functional.FAST_PATHS = False`` forces the
agnostic code; a spy records that the fast path ran.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths, require_backend
from portable_bn._reference import reference_backward, reference_batch_norm
from portable_bn._tolerance import max_error, tolerance


@pytest.fixture
def cp():
    require_backend("cupy")
    import cupy

    return cupy


@pytest.fixture
def spy(cp, monkeypatch):
    """Names of the fast-path functions called."""
    from portable_bn import _cupy_fast

    called: list[str] = []
    for name in ("train_forward", "eval_forward", "backward"):
        original = getattr(_cupy_fast, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(_cupy_fast, name, wrapper)
    return called


def _check(cp, x_host, dtype, *, training, axis=1, affine=True, running=True, momentum=0.1):
    """Both paths against the reference; returns the fast result."""
    channels = x_host.shape[axis]
    rng = np.random.default_rng(1)
    host = {
        "running_mean": rng.uniform(-1, 1, channels) if running else None,
        "running_var": rng.uniform(0.5, 2, channels) if running else None,
        "weight": rng.uniform(0.5, 2, channels) if affine else None,
        "bias": rng.normal(size=channels) if affine else None,
    }
    x = cp.asarray(x_host, dtype=dtype)
    arrays = {key: None if value is None else cp.asarray(value, dtype=dtype) for key, value in host.items()}
    before = {key: None if value is None else value.copy() for key, value in arrays.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast, agnostic = both_paths(pbn.batch_norm, x, **arrays, training=training, momentum=momentum, axis=axis)
    for key, value in arrays.items():  # arguments are never written to
        assert value is None or bool(cp.all((value == before[key]) | cp.isnan(value)))
    xh = cp.asnumpy(x).astype(np.float64)
    as_host = {key: None if value is None else cp.asnumpy(value).astype(np.float64) for key, value in arrays.items()}
    expected = reference_batch_norm(xh, **as_host, training=training, momentum=momentum, axis=axis)
    tol = tolerance(np.dtype(dtype).name)
    for name in ("output", "running_mean", "running_var", "mean", "invstd"):
        want = expected[name]
        got, other = getattr(fast, name), getattr(agnostic, name)
        if want is None:
            assert got is None and other is None, name
            continue
        assert got.dtype == other.dtype and got.shape == other.shape, name
        got_host, other_host = cp.asnumpy(got), cp.asnumpy(other)
        with np.errstate(invalid="ignore"):
            in_range = np.abs(want) <= np.finfo(dtype).max  # a variance beyond the dtype is Inf
        assert np.isfinite(got_host[in_range]).all(), name
        assert np.isinf(got_host[~in_range & ~np.isnan(want)]).all(), name
        assert max_error(got_host[in_range], want[in_range]) <= tol, name
        assert max_error(got_host[in_range], other_host[in_range]) <= tol, name
    return fast


@pytest.fixture(params=[True, False], ids=["fused", "separate"])
def fused(request, cp, monkeypatch):
    """Run the forward's output kernels both ways: one launch that computes the channels'
    vectors in every block (C <= _FUSED_UP_TO), and the separate vector kernel."""
    from portable_bn import _cupy_fast

    if request.param:
        monkeypatch.setattr(_cupy_fast, "_FUSED_TRAIN_GRID", 16)  # every grid _plan makes
    else:
        monkeypatch.setattr(_cupy_fast, "_FUSED_UP_TO", 0)
    return request.param


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape_axis", [((16, 3), 1), ((4, 3, 7), 1), ((5, 4, 6, 3), 1), ((5, 6, 3, 4), -1)])
@pytest.mark.parametrize(("affine", "running"), [(True, True), (False, True), (True, False)])
def test_fast_path_equals_agnostic_path(cp, spy, launches, fused, dtype, training, shape_axis, affine, running):
    shape, axis = shape_axis
    if not training and not running:
        pytest.skip("eval needs running statistics")
    x_host = 3.0 + 2.0 * np.random.default_rng(2).normal(size=shape)
    _check(cp, x_host, dtype, training=training, axis=axis, affine=affine, running=running)
    assert spy == ["train_forward" if training else "eval_forward"]
    assert launches == _KERNEL_SEQUENCES[training, fused]


@pytest.fixture(params=[False, True], ids=["index32", "index64"])
def wide(request, cp, monkeypatch):
    """Also run the kernels with 64-bit indices (taken for 2**31 elements or more)."""
    from portable_bn import _cupy_fast

    if request.param:
        monkeypatch.setattr(_cupy_fast, "_WIDE_FROM", 0)
    _cupy_fast._plan.cache_clear()
    yield request.param
    _cupy_fast._plan.cache_clear()  # before monkeypatch restores the threshold


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape_axis", [((5000, 3), 1), ((16, 2, 64, 64), 1), ((2, 3, 70000), 1), ((4, 9, 9, 40), -1), ((3, 700), 0)]
)
def test_many_blocks_per_channel(cp, spy, wide, fused, dtype, training, shape_axis):
    """Channels split over many reduction blocks, rows longer and shorter than a block."""
    shape, axis = shape_axis
    x_host = -2.0 + 0.5 * np.random.default_rng(6).normal(size=shape)
    _check(cp, x_host, dtype, training=training, axis=axis)
    assert spy == ["train_forward" if training else "eval_forward"]


@pytest.fixture
def launches(cp, monkeypatch):
    """Names of the kernels launched, in order."""
    from portable_bn import _cupy_fast

    names: list[str] = []
    compiled = _cupy_fast._kernels

    def recording(*args):
        def launcher(name, kernel):
            def launch(*launch_args):
                names.append(name)
                return kernel(*launch_args)

            return launch

        return {name: launcher(name, kernel) for name, kernel in compiled(*args).items()}

    monkeypatch.setattr(_cupy_fast, "_kernels", recording)
    return names


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_fuses_only_small_grids(cp, launches, dtype):
    """By default training saves the vector launch only where the output grid has at most one
    block per multiprocessor (a large grid would repeat the vector work in every block)."""
    for shape, fused in (((2, 4, 3, 3), True), ((32, 64, 56, 56), False)):
        launches.clear()
        pbn.batch_norm(cp.ones(shape, dtype=dtype), training=True)
        assert launches == _KERNEL_SEQUENCES[True, fused], shape
        launches.clear()
        pbn.batch_norm(cp.ones(shape, dtype=dtype), cp.zeros(shape[1], dtype), cp.ones(shape[1], dtype))
        assert launches == _KERNEL_SEQUENCES[False, True], shape


_KERNEL_SEQUENCES = {
    (True, True): ["stats1", "stats2", "train_apply"],
    (True, False): ["stats1", "stats2", "train_vectors", "apply"],
    (False, True): ["eval"],
    (False, False): ["eval_vectors", "apply"],
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape_axis", [((3, 1024, 5), 1), ((4, 1025), 1), ((2, 3, 2100), -1)])
def test_many_channels(cp, spy, launches, monkeypatch, dtype, training, shape_axis):
    """The fused output kernels hold 1024 channels' vectors in shared memory: at that limit
    they run, beyond it the separate vector kernel does."""
    from portable_bn import _cupy_fast

    monkeypatch.setattr(_cupy_fast, "_FUSED_TRAIN_GRID", 16)
    shape, axis = shape_axis
    x_host = 1.0 + np.random.default_rng(9).normal(size=shape)
    _check(cp, x_host, dtype, training=training, axis=axis)
    assert spy == ["train_forward" if training else "eval_forward"]
    assert launches == _KERNEL_SEQUENCES[training, shape[axis] <= 1024]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape_axis", [((16, 3), 1), ((5, 4, 6, 3), 1), ((5, 6, 3, 4), -1), ((16, 2, 64, 64), 1)])
def test_backward_equals_agnostic_and_reference(cp, spy, wide, dtype, training, affine, shape_axis):
    shape, axis = shape_axis
    rng = np.random.default_rng(8)
    x_host = 5.0 + 3.0 * rng.normal(size=shape)
    grad_host = rng.normal(size=shape)
    channels = shape[axis]
    weight_host = rng.uniform(0.5, 2, channels) if affine else None
    x, grad = cp.asarray(x_host, dtype=dtype), cp.asarray(grad_host, dtype=dtype)
    weight = None if weight_host is None else cp.asarray(weight_host, dtype=dtype)
    forward = pbn.batch_norm(x, weight=weight, training=True, axis=axis)
    spy.clear()
    fast, agnostic = both_paths(
        pbn.batch_norm_backward, grad, x, weight, forward.mean, forward.invstd, training=training, axis=axis
    )
    assert spy == ["backward"]
    host = [cp.asnumpy(a).astype(np.float64) for a in (grad, x, forward.mean, forward.invstd)]
    wh = None if weight is None else cp.asnumpy(weight).astype(np.float64)
    truth = reference_backward(host[0], host[1], wh, host[2], host[3], training=training, axis=axis)
    for name, got, other, want in zip(("grad_input", "grad_weight", "grad_bias"), fast, agnostic, truth, strict=True):
        assert got.dtype == other.dtype == x.dtype and got.shape == other.shape, name
        assert max_error(cp.asnumpy(got), want) <= tolerance(dtype), name
        assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype), name


@pytest.mark.parametrize(
    ("offset", "spread"),
    [(1e4, 0.1), (1e6, 1.0), (0.0, 1e20), (1e20, 1e19), (0.0, 3e37), (-3e38, 1e37), (1.0, 1e-4)],
)
def test_hard_data_in_training(cp, spy, offset, spread):
    """Offsets, squares beyond float32 (the float64 sums and the output's power of two
    keep them), values near float32's largest: the reference's answer."""
    x_host = offset + spread * np.random.default_rng(3).normal(size=(8, 3, 4, 4))
    x_host = np.clip(x_host, -3.4e38, 3.4e38)
    fast = _check(cp, x_host, "float32", training=True)
    assert spy == ["train_forward"]
    assert bool(cp.isfinite(fast.output).all())


@pytest.mark.parametrize(
    ("offset", "spread"), [(1e12, 1.0), (1e150, 1e149), (0.0, 1e150), (1.0, 1e-10), (1e-200, 1e-210), (0.0, 1e-300)]
)
def test_hard_float64_data_in_training(cp, spy, offset, spread):
    """Offsets, squares near float64's range, tiny values: the reference's answer."""
    x_host = offset + spread * np.random.default_rng(3).normal(size=(8, 3, 4, 4))
    _check(cp, x_host, "float64", training=True)
    assert spy == ["train_forward"]


@pytest.mark.parametrize(("offset", "spread"), [(0.0, 1e200), (1e300, 1e299), (-1e307, 1e306), (1.7e308, 1e292)])
def test_float64_data_beyond_the_squares_range(cp, spy, offset, spread):
    """Squares (and the reference's sums) overflow float64: the agnostic path's answer,
    which test_numerics checks against the exact values."""
    x_host = np.clip(offset + spread * np.random.default_rng(3).normal(size=(8, 3, 4, 4)), -1.79e308, 1.79e308)
    x = cp.asarray(x_host)
    running = cp.zeros(3), cp.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast, agnostic = both_paths(pbn.batch_norm, x, *running, training=True)
    assert spy == ["train_forward"]
    assert bool(cp.isfinite(fast.output).all())
    for name in ("output", "mean", "invstd"):
        assert max_error(cp.asnumpy(getattr(fast, name)), cp.asnumpy(getattr(agnostic, name))) <= tolerance(
            "float64"
        ), name


@pytest.mark.parametrize(("dtype", "huge"), [("float32", 3e38), ("float64", 1.7e308)])
def test_constant_nan_and_inf_channels(cp, spy, dtype, huge):
    """A constant channel gives exactly the bias (also of huge values) and invstd
    1 / sqrt(eps); NaN and Inf make their own channel NaN and leave the others exact."""
    x_host = np.random.default_rng(4).normal(size=(6, 5, 7))
    x_host[:, 1] = 123.4375
    x_host[:, 2] = huge
    x_host[2, 3, 4] = np.nan
    x_host[1, 4, 0] = np.inf
    x = cp.asarray(x_host, dtype=dtype)
    bias = cp.asarray(np.arange(5.0), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = pbn.batch_norm(x, bias=bias, training=True)
    assert spy == ["train_forward"]
    out = cp.asnumpy(result.output)
    np.testing.assert_array_equal(out[:, 1], 1.0)
    np.testing.assert_array_equal(out[:, 2], 2.0)
    assert np.isnan(out[:, 3]).all() and np.isnan(out[:, 4]).all()
    expected = reference_batch_norm(x_host[:, :1].astype(dtype).astype(np.float64), training=True)
    assert max_error(out[:, :1], expected["output"]) <= tolerance(dtype)
    np.testing.assert_allclose(cp.asnumpy(result.invstd)[1:3], 1 / np.sqrt(1e-5), rtol=tolerance(dtype))
    np.testing.assert_array_equal(cp.asnumpy(result.mean)[1:3], x_host[0, 1:3, 0].astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_skip_nonfinite_running_update(cp, spy, dtype):
    """Channels with NaN/Inf keep their running statistics; the others update as the
    agnostic path does."""
    x_host = np.random.default_rng(9).normal(size=(6, 4, 5))
    x_host[1, 2, 3] = np.nan
    x_host[0, 3, 0] = -np.inf
    x = cp.asarray(x_host, dtype=dtype)
    running = cp.asarray([0.5, -0.5, 1.0, 2.0], dtype=dtype), cp.asarray([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast, agnostic = both_paths(pbn.batch_norm, x, *running, training=True, skip_nonfinite=True)
    assert spy == ["train_forward"]
    for got, other, old in zip(fast[1:3], agnostic[1:3], running, strict=True):
        np.testing.assert_array_equal(cp.asnumpy(got)[2:], cp.asnumpy(old)[2:])
        assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype)


def test_non_contiguous_and_module(cp, spy):
    """Strided input, and a module's training loop with momentum=None (a 0-d factor)."""
    x_host = np.random.default_rng(5).normal(size=(8, 3, 10, 6))
    x = cp.asarray(x_host, dtype=cp.float32)[:, :, ::2, 1:]
    fast, agnostic = both_paths(pbn.batch_norm, x, training=True)
    assert max_error(cp.asnumpy(fast.output), cp.asnumpy(agnostic.output)) <= tolerance("float32")
    module = pbn.BatchNorm2d(3, momentum=None, xp=cp, device=x.device)
    reference = pbn.BatchNorm2d(3, momentum=None)
    for step in range(3):
        batch = x_host + step
        out = module(cp.asarray(batch, dtype=cp.float32))
        expected = reference(batch.astype(np.float32).astype(np.float64))
        assert max_error(cp.asnumpy(out), expected) <= tolerance("float32")
    np.testing.assert_allclose(cp.asnumpy(module.running_var), reference.running_var, rtol=tolerance("float32"))
    assert spy.count("train_forward") == 4


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strided_and_broadcast_vectors(cp, spy, dtype):
    """Per-channel vectors that are views (every other element, a broadcast scalar)
    are read as the values they show, in training, eval and the backward."""
    rng = np.random.default_rng(10)
    x = cp.asarray(2.0 + rng.normal(size=(6, 4, 5)), dtype=dtype)
    grad = cp.asarray(rng.normal(size=(6, 4, 5)), dtype=dtype)
    weight = cp.asarray(rng.uniform(0.5, 2, 8), dtype=dtype)[::2]
    bias = cp.broadcast_to(cp.asarray(0.5, dtype=dtype), (4,))
    running_mean = cp.asarray(rng.normal(size=12), dtype=dtype)[1::3]
    running_var = cp.asarray(rng.uniform(0.5, 2, 8), dtype=dtype)[::-2]
    given = [cp.asnumpy(v) for v in (weight, running_mean, running_var)]
    for training in (True, False):
        fast, agnostic = both_paths(pbn.batch_norm, x, running_mean, running_var, weight, bias, training=training)
        for got, other in zip(fast, agnostic, strict=True):
            assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype)
        fast, agnostic = both_paths(pbn.batch_norm_backward, grad, x, weight, fast.mean, fast.invstd, training=training)
        for got, other in zip(fast, agnostic, strict=True):
            assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype)
    assert spy == ["train_forward", "backward", "eval_forward", "backward"]
    for before, after in zip(given, (weight, running_mean, running_var), strict=True):
        np.testing.assert_array_equal(cp.asnumpy(after), before)
