"""The per-channel functions of the shared algorithm, traced into C (what CuPy compiles), give
NumPy's results bit for bit.

The traced body is compiled with g++ by the emulator's stand-in ``ElementwiseKernel`` (no
fused multiply-adds, as the CUDA kernels) and run on the same vectors the function gets
from NumPy: ordinary values, zeros, NaN, Inf, huge and tiny ones. Runs in the numpy session.
"""

from __future__ import annotations

import shutil
import warnings

import array_api_compat.numpy as xp
import numpy as np
import pytest

from conftest import require_backend
from portable_bn import _agnostic
from portable_bn._backends import cuda_trace


@pytest.fixture(scope="module")
def emulator():
    require_backend("numpy")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    import cuda_emulator

    return cuda_emulator


def _run_traced(emulator, fn, vectors, options):
    signature = [None if v is None else "scalar" if isinstance(v, float | int) else v.dtype for v in vectors]
    traced = cuda_trace.trace(fn, signature, options)
    program = traced.program
    kernel = emulator.ElementwiseKernel(
        ", ".join(f"{d.name} {name}" for name, d, _ in program.inputs),
        ", ".join(f"{d.name} {name}" for name, d in program.outputs),
        program.body,
        name=fn.__name__,
        options=("--fmad=false",),
        return_tuple=True,
    )
    scalars = [v for v in options.values() if isinstance(v, float | int) and not isinstance(v, bool)]
    arguments = [v if isinstance(v, np.ndarray) else np.float64(v) for v in vectors if v is not None]
    outputs = kernel(*arguments, *(np.float64(s) for s in scalars))
    return traced.rebuild([np.asarray(o) for o in outputs])


def _same(got, want, what):
    if want is None:
        assert got is None, what
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape), err_msg=what)


def _compare(emulator, fn, vectors, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = fn(xp, *vectors, **options)
    got = _run_traced(emulator, fn, vectors, options)
    if isinstance(want, tuple):
        for name, g, w in zip(getattr(want, "_fields", range(len(want))), got, want, strict=True):
            _same(g, w, f"{fn.__name__} {name}")
    else:
        _same(got, want, fn.__name__)


def _vectors(dtype, seed, *, special=True):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=12) * np.exp(rng.uniform(-5, 5, 12))
    if special:
        values[:5] = [0.0, np.nan, np.inf, 3e37, 1e-30]
    return values.astype(dtype)


def _counts(dtype):
    """Per-channel counts as masks and replicas give them: none, one, and many values."""
    return np.array([0, 1, 2, 7, 1000, 0, 3, 1, 64, 5, 2, 9], dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("counted", ["int", "per channel"])
def test_scale_and_shift(emulator, dtype, counted):
    rng = np.random.default_rng(0)
    low = (rng.normal(size=12) * 10.0 ** rng.integers(-3, 30, 12)).astype(dtype)
    high = low + np.abs(rng.normal(size=12)).astype(dtype) * low.dtype.type(2.0)
    high[:3] = low[:3]  # constant channels
    low[3], high[4] = -np.inf, np.nan
    total = rng.normal(size=12) * 1e3
    if counted == "per channel":  # a channel of no value: +Inf and -Inf extremes, a sum of 0
        low[0], high[0], total[0] = np.inf, -np.inf, 0.0
    count = 1000 if counted == "int" else _counts(dtype)
    _compare(
        emulator, _agnostic._scale_and_shift, [low, high, total, count], {"shrink": 2.0**-10, "dtype": np.dtype(dtype)}
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("verdict", [None, "shift", "mean"])
@pytest.mark.parametrize("variant", ["full", "no affine, no running", "scaled", "module factor", "skip", "biased"])
def test_train_vectors(emulator, dtype, verdict, variant):
    rng = np.random.default_rng(1)
    shift = _vectors(dtype, 2)
    total = rng.normal(size=12) * 3.0
    squares = total * total / 20 + np.abs(rng.normal(size=12)) * 50.0
    squares[6] = np.inf
    weight, bias = _vectors(dtype, 3, special=False), _vectors(dtype, 4, special=False)
    running_mean, running_var = _vectors(dtype, 5, special=False), np.abs(_vectors(dtype, 6, special=False))
    scale = None
    factor = 0.1
    if variant == "no affine, no running":
        weight = bias = running_mean = running_var = None
    if variant == "scaled":
        scale = (2.0 ** rng.integers(-100, 0, 12)).astype(dtype)
    if variant == "module factor":
        factor = np.asarray(1.0 / 3.0, dtype=dtype)
    vectors = [shift, total, squares, scale, weight, bias, running_mean, running_var, factor]
    options = {
        "count": 20,
        "eps": 1e-5,
        "dtype": np.dtype(dtype),
        "skip_nonfinite": variant == "skip",
        "unbiased": variant != "biased",
        "short": False,
        "verdict": verdict,
    }
    _compare(emulator, _agnostic._train_vectors, vectors, options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_vectors(emulator, dtype, affine):
    running_mean, running_var = _vectors(dtype, 7), np.abs(_vectors(dtype, 8))
    weight, bias = (_vectors(dtype, 9), _vectors(dtype, 10)) if affine else (None, None)
    options = {"eps": 0.5, "dtype": np.dtype(dtype), "short": False}
    _compare(emulator, _agnostic._eval_vectors, [running_mean, running_var, weight, bias], options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("counted", ["int", "per channel"])
def test_backward_vectors(emulator, dtype, training, affine, counted):
    mean, invstd = _vectors(dtype, 11), np.abs(_vectors(dtype, 12))
    weight = _vectors(dtype, 13) if affine else None
    grad_bias, grad_weight = _vectors("float64", 14), _vectors("float64", 15)
    count = 64 if counted == "int" else _counts("float64")
    options = {
        "dtype": np.dtype(dtype),
        "param_dtype": np.dtype(dtype),
        "training": training,
        "short": False,
    }
    _compare(emulator, _agnostic._backward_vectors, [mean, invstd, weight, grad_bias, grad_weight, count], options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", ["full", "no affine, no running", "scaled", "skip", "biased"])
def test_moments_vectors(emulator, dtype, variant):
    """Masked and synchronized statistics: counts per channel, some of no or one value."""
    rng = np.random.default_rng(2)
    count = _counts(dtype)
    shift = _vectors(dtype, 2)
    mean = (rng.normal(size=12) * 0.1).astype(dtype) * (count > 0)
    m2 = (np.abs(rng.normal(size=12)) * count).astype(dtype)
    weight, bias = _vectors(dtype, 3, special=False), _vectors(dtype, 4, special=False)
    running_mean, running_var = _vectors(dtype, 5, special=False), np.abs(_vectors(dtype, 6, special=False))
    scale = None
    if variant == "no affine, no running":
        weight = bias = running_mean = running_var = None
    if variant == "scaled":
        scale = (2.0 ** rng.integers(-100, 0, 12)).astype(dtype)
    vectors = [count, shift, mean, m2, scale, weight, bias, running_mean, running_var, 0.1]
    options = {
        "eps": 1e-5,
        "dtype": np.dtype(dtype),
        "skip_nonfinite": variant == "skip",
        "unbiased": variant != "biased",
    }
    _compare(emulator, _agnostic._moments_vectors, vectors, options)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("verdict", [None, "shift", "mean"])
def test_checked(emulator, dtype, verdict):
    rng = np.random.default_rng(3)
    total = rng.normal(size=12) * 3.0
    squares = total * total / 20 + np.abs(rng.normal(size=12)) * 50.0
    options = {"count": 20, "eps": 1e-5, "dtype": np.dtype(dtype), "verdict": verdict}
    _compare(emulator, _agnostic._checked, [_vectors(dtype, 2), total, squares, None], options)


def test_a_value_dependent_branch_is_refused():
    def branches(xp, v):
        return v if v > 0 else -v

    with pytest.raises(TypeError, match="branches on a traced value"):
        cuda_trace.trace(branches, [np.dtype("float32")], {})


def test_literals_are_exact():
    program = cuda_trace.Program()
    value = program.input(cuda_trace.FLOAT32, scalar=False)
    (value * 0.1).name  # noqa: B018 - traced for its statement
    assert "0x1.999999999999ap-4" in program.body  # 0.1 in hex: no decimal rounding on the way
