"""The conformance scenarios catch a broken rule, on every backend.

Each test breaks one of PyTorch's rules where the shared implementation states it
(``_agnostic``) and runs a scenario of ``portable_bn.testing`` that must then fail. As every
backend's results (NumPy's tiles, PyTorch's native kernels, JAX's routes, CuPy's traced
kernels) come from that one statement of the rule, the mutation must show on each: a backend
that restated a rule on its own would pass the broken build, and fail here.
"""

from __future__ import annotations

import pytest

from portable_bn import _agnostic
from portable_bn.testing import LARGE_SHAPES, failures, functional_scenario, hard_data_scenario, module_scenario


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch):
    """CuPy compiles the per-channel functions once: a mutated rule needs fresh kernels."""
    try:
        from portable_bn._backends import cupy as cupy_backend
    except ImportError:
        return
    monkeypatch.setattr(cupy_backend, "_per_channel_cache", {})


def _biased(xp, var, count):
    return var


def test_a_biased_running_variance_is_caught(vcombo, monkeypatch):
    assert not failures(functional_scenario(vcombo, (6, 3, 5), training=True))
    monkeypatch.setattr(_agnostic, "unbiased_variance", _biased)
    assert [check.what for check in failures(functional_scenario(vcombo, (6, 3, 5), training=True))] == ["running_var"]


def test_half_precision_statistics_in_half_precision_are_caught(vcombo, monkeypatch):
    if vcombo.dtype_name not in ("float16", "bfloat16"):
        pytest.skip("the compute dtype of float32/float64 input is the input's")
    assert not failures(hard_data_scenario(vcombo, "300+100N"))
    monkeypatch.setattr(_agnostic, "compute_dtype", lambda xp, dtype: dtype)
    assert failures(hard_data_scenario(vcombo, "300+100N"))


def _without_eps(xp, running_mean, running_var, *, dtype, eps):
    return _original_running_statistics(xp, running_mean, running_var, dtype=dtype, eps=0.0)


_original_running_statistics = _agnostic.running_statistics


@pytest.mark.parametrize("shape", [(6, 3, 5), LARGE_SHAPES[0]], ids=["small", "large"])
def test_an_eval_that_ignores_eps_is_caught(vcombo, monkeypatch, shape):
    """Also on a large input, which PyTorch's native eval kernel takes on the CPU."""
    assert not failures(functional_scenario(vcombo, shape, training=False, eps=0.5))
    monkeypatch.setattr(_agnostic, "running_statistics", _without_eps)
    failed = [check.what for check in failures(functional_scenario(vcombo, shape, training=False, eps=0.5))]
    assert "invstd" in failed


def test_the_invstd_of_a_floored_eps_is_caught(vcombo, monkeypatch):
    """The invstd of a prescaled channel taken from the output's normalizer (whose eps is
    floored at the smallest normal number) instead of 1 / sqrt(var + eps)."""
    if vcombo.dtype_name not in ("float32", "float64"):
        pytest.skip("half-precision input cannot hold a constant channel of huge values")
    original = _agnostic.statistics

    def floored(xp, moments, eps, *, dtype):
        stats = original(xp, moments, eps, dtype=dtype)
        if moments.scale is None:
            return stats
        return stats._replace(invstd=stats.normalizer * _agnostic._as(xp, moments.scale, stats.normalizer.dtype))

    name = "constant 4e16" if vcombo.dtype_name == "float32" else "constant 1e300"
    assert not failures(hard_data_scenario(vcombo, name))
    monkeypatch.setattr(_agnostic, "statistics", floored)
    assert f"{name}: invstd" in [check.what for check in failures(hard_data_scenario(vcombo, name))]


def test_a_fixed_momentum_for_momentum_none_is_caught(vcombo, monkeypatch):
    assert not failures(module_scenario(vcombo, "2d", momentum=None))
    monkeypatch.setattr(_agnostic, "update_factor", lambda xp, momentum, counter, dtype: 0.1)
    assert "step 1 running_mean" in [check.what for check in failures(module_scenario(vcombo, "2d", momentum=None))]


def test_the_constant_channel_threshold():
    """A spread at or below 8 units of the precision of the mean is numerically constant; above
    it, it is not; a zero channel is not; overflowed or NaN variances are untrusted."""
    import array_api_compat.numpy as xp
    import numpy as np

    eps = float(np.finfo(np.float32).eps)
    mean = np.array([1e6, 1e6, 0.0, 1.0, 1.0], dtype=np.float64)
    spread = np.array([7.9 * eps * 1e6, 8.1 * eps * 1e6, 0.0, 1.0, 1.0])
    var = spread * spread
    var[3], var[4] = np.inf, np.nan
    np.testing.assert_array_equal(
        _agnostic.untrusted(xp, mean, var, np.dtype("float32")), [True, False, False, True, True]
    )
