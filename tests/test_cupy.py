"""CuPy's kernels (``_backends.cupy``) equal the pure primitives and the float64 reference, on a GPU.

Runs with PBN_BACKENDS=cupy on a machine with a CUDA device (docs/testing: GPU runs); skipped
elsewhere, where ``tests/cuda_emulator.py`` runs the same kernels on the CPU.
``test_primitives.py`` compares every primitive with the pure one; here the whole functions,
the launches a call makes, 64-bit indices, special channels and vectors that are views.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths, require_backend
from portable_bn.testing import dtype_error, max_error, reference_backward, reference_batch_norm, tolerance


@pytest.fixture
def cp():
    require_backend("cupy")
    import cupy

    return cupy


@pytest.fixture
def launches(cp, monkeypatch):
    """Names of the kernels a call launches, in order."""
    from portable_bn._backends import cupy as cupy_backend

    names: list[str] = []
    kernels, elementwise, per_channel = (
        cupy_backend._kernels,
        cupy_backend._elementwise,
        cupy_backend._per_channel_kernel,
    )

    def recorded(name, kernel):
        def launch(*args, **kwargs):
            names.append(name)
            return kernel(*args, **kwargs)

        return launch

    monkeypatch.setattr(cupy_backend, "_kernels", lambda *a: {n: recorded(n, k) for n, k in kernels(*a).items()})
    monkeypatch.setattr(cupy_backend, "_elementwise", lambda name, present: recorded(name, elementwise(name, present)))

    def traced(fn, *args):
        kernel, rebuild = per_channel(fn, *args)
        return recorded(fn.__name__.strip("_"), kernel), rebuild

    monkeypatch.setattr(cupy_backend, "_per_channel_kernel", traced)
    return names


def _compare(cp, x_host, dtype, *, training, axis=1, affine=True, running=True, momentum=0.1, skip=False):
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
        kernels, pure = both_paths(
            pbn.batch_norm, x, **arrays, training=training, momentum=momentum, axis=axis, skip_nonfinite=skip
        )
    for key, value in arrays.items():  # arguments are never written to
        assert value is None or bool(cp.all((value == before[key]) | cp.isnan(value)))
    as_host = {key: None if value is None else cp.asnumpy(value).astype(np.float64) for key, value in arrays.items()}
    expected = reference_batch_norm(
        cp.asnumpy(x).astype(np.float64), **as_host, training=training, momentum=momentum, axis=axis
    )
    tol = tolerance(dtype)
    for name in ("output", "running_mean", "running_var", "mean", "invstd"):
        got, other = getattr(kernels, name), getattr(pure, name)
        if expected[name] is None:
            assert got is None and other is None, name
            continue
        assert got.dtype == other.dtype and got.shape == other.shape, name
        if not skip:
            assert dtype_error(cp.asnumpy(got), expected[name], dtype) <= tol, name
        assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tol, name
    return kernels


TRAIN = ["block_moments", "merge_moments", "about_the_mean", "moments_vectors", "affine"]
EVAL = ["eval_vectors", "affine"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape_axis", [((16, 3), 1), ((4, 3, 7), 1), ((5, 4, 6, 3), 1), ((5, 6, 3, 4), -1), ((8, 3, 40, 40), 1)]
)
@pytest.mark.parametrize(("affine", "running"), [(True, True), (False, True), (True, False)])
def test_kernels_equal_the_pure_primitives_and_the_reference(
    cp, launches, dtype, training, shape_axis, affine, running
):
    shape, axis = shape_axis
    if not training and not running:
        pytest.skip("eval needs running statistics")
    x_host = 3.0 + 2.0 * np.random.default_rng(2).normal(size=shape)
    _compare(cp, x_host, dtype, training=training, axis=axis, affine=affine, running=running)
    assert launches == (TRAIN if training else EVAL)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
def test_backward_launches_and_values(cp, launches, dtype, training):
    rng = np.random.default_rng(3)
    x = cp.asarray(2.0 + rng.normal(size=(8, 3, 40, 40)), dtype=dtype)
    grad = cp.asarray(rng.normal(size=x.shape), dtype=dtype)
    weight = cp.asarray(rng.uniform(0.5, 2, 3), dtype=dtype)
    forward = pbn.batch_norm(x, training=True)
    launches.clear()
    kernels, pure = both_paths(
        pbn.batch_norm_backward, grad, x, weight, forward.mean, forward.invstd, training=training
    )
    assert launches == ["product_sums", "combine", "backward_vectors", "affine" if not training else "grad_input"]
    host = [cp.asnumpy(a).astype(np.float64) for a in (grad, x, weight, forward.mean, forward.invstd)]
    want = reference_backward(*host, training=training)
    for got, other, expected in zip(kernels, pure, want, strict=True):
        assert max_error(cp.asnumpy(got), expected) <= tolerance(dtype)
        assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wide_indices(cp, monkeypatch, dtype):
    """The 64-bit index kernels (used from 2**31 elements) on a small input."""
    from portable_bn._backends import cupy as cupy_backend

    monkeypatch.setattr(cupy_backend, "_WIDE_FROM", 0)
    cupy_backend._plan.cache_clear()
    try:
        _compare(cp, -1.0 + np.random.default_rng(4).normal(size=(8, 3, 40, 40)), dtype, training=True)
    finally:
        cupy_backend._plan.cache_clear()


@pytest.mark.parametrize(("dtype", "huge"), [("float32", 3e38), ("float64", 1.7e308)])
def test_constant_nan_and_inf_channels(cp, dtype, huge):
    """A constant channel gives exactly the bias (also of huge values) and invstd 1 / sqrt(eps);
    NaN and Inf make their own channel NaN and leave the others exact."""
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
    out = cp.asnumpy(result.output)
    np.testing.assert_array_equal(out[:, 1], 1.0)
    np.testing.assert_array_equal(out[:, 2], 2.0)
    assert np.isnan(out[:, 3]).all() and np.isnan(out[:, 4]).all()
    expected = reference_batch_norm(x_host[:, :1].astype(dtype).astype(np.float64), training=True)
    assert max_error(out[:, :1], expected["output"]) <= tolerance(dtype)
    np.testing.assert_allclose(cp.asnumpy(result.invstd)[1:3], 1 / np.sqrt(1e-5), rtol=tolerance(dtype))
    np.testing.assert_array_equal(cp.asnumpy(result.mean)[1:3], x_host[0, 1:3, 0].astype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_skip_nonfinite_running_update(cp, dtype):
    x_host = np.random.default_rng(9).normal(size=(6, 4, 5))
    x_host[1, 2, 3] = np.nan
    x_host[0, 3, 0] = -np.inf
    result = _compare(cp, x_host, dtype, training=True, skip=True)
    rng = np.random.default_rng(1)
    old_mean, old_var = rng.uniform(-1, 1, 4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)
    np.testing.assert_array_equal(cp.asnumpy(result.running_mean)[2:], old_mean[2:])
    np.testing.assert_array_equal(cp.asnumpy(result.running_var)[2:], old_var[2:])


def test_non_contiguous_input_and_a_module(cp):
    """Strided input, and a module's training loop with momentum=None (a 0-d factor)."""
    x_host = np.random.default_rng(5).normal(size=(8, 3, 10, 6))
    x = cp.asarray(x_host, dtype=cp.float32)[:, :, ::2, 1:]
    kernels, pure = both_paths(pbn.batch_norm, x, training=True)
    assert max_error(cp.asnumpy(kernels.output), cp.asnumpy(pure.output)) <= tolerance("float32")
    module = pbn.BatchNorm2d(3, momentum=None, xp=cp, device=x.device)
    reference = pbn.BatchNorm2d(3, momentum=None)
    for step in range(3):
        batch = x_host + step
        out = module(cp.asarray(batch, dtype=cp.float32))
        expected = reference(batch.astype(np.float32).astype(np.float64))
        assert max_error(cp.asnumpy(out), expected) <= tolerance("float32")
    np.testing.assert_allclose(cp.asnumpy(module.running_var), reference.running_var, rtol=tolerance("float32"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_strided_and_broadcast_vectors(cp, dtype):
    """Per-channel vectors that are views (every other element, a broadcast scalar) are read as
    the values they show, in training, eval and the backward."""
    rng = np.random.default_rng(10)
    x = cp.asarray(2.0 + rng.normal(size=(6, 4, 5)), dtype=dtype)
    grad = cp.asarray(rng.normal(size=(6, 4, 5)), dtype=dtype)
    weight = cp.asarray(rng.uniform(0.5, 2, 8), dtype=dtype)[::2]
    bias = cp.broadcast_to(cp.asarray(0.5, dtype=dtype), (4,))
    running_mean = cp.asarray(rng.normal(size=12), dtype=dtype)[1::3]
    running_var = cp.asarray(rng.uniform(0.5, 2, 8), dtype=dtype)[::-2]
    for training in (True, False):
        kernels, pure = both_paths(pbn.batch_norm, x, running_mean, running_var, weight, bias, training=training)
        for got, other in zip(kernels, pure, strict=True):
            assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype)
        kernels, pure = both_paths(
            pbn.batch_norm_backward, grad, x, weight, kernels.mean, kernels.invstd, training=training
        )
        for got, other in zip(kernels, pure, strict=True):
            assert max_error(cp.asnumpy(got), cp.asnumpy(other)) <= tolerance(dtype)
