"""Hard data: large offsets, huge magnitudes, constant channels, tiny variances,
half precision, and NaN/Inf confined to their channel (opt-in guard for the
running statistics)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths, require_backend
from portable_bn.testing import (
    HARD_DATA,
    failures,
    hard_data,
    hard_data_scenario,
    max_error,
    reference_batch_norm,
    relative_error,
    tolerance,
)

SHAPE = (8, 3, 4, 4)


def _hard(offset, spread, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(offset + spread * rng.normal(size=SHAPE), -3.4e38, 3.4e38)  # inside float32


@pytest.mark.parametrize("name", list(HARD_DATA))
def test_hard_data_matches_the_float64_truth(vcombo, name):
    """Output, mean, invstd, both running statistics and all three gradients on every hard data
    set, against the float64 truth (:func:`portable_bn.testing.hard_data_scenario`)."""
    if vcombo.dtype_name not in HARD_DATA[name][1]:
        pytest.skip(f"{vcombo.dtype_name} cannot hold {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Dask computes a running variance beyond float32
        checks = list(hard_data_scenario(vcombo, name))
    assert len(checks) == 8
    assert not failures(checks)


@pytest.mark.parametrize("name", [name for name, (_, dtypes) in HARD_DATA.items() if "float32" in dtypes])
def test_every_route_matches_the_float64_truth(vcombo, name):
    """The route a lazy or GPU library takes (prescaled, pure primitives) on every backend, and
    the backend's own route, give the same statistics to the tolerance."""
    if vcombo.dtype_name not in HARD_DATA[name][1]:
        pytest.skip(f"{vcombo.dtype_name} cannot hold {name}")
    x = vcombo.asarray(hard_data(name, SHAPE, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        own, pure = both_paths(pbn.batch_norm, x, training=True)
        got = {key: [vcombo.to_numpy(getattr(r, key)) for r in (own, pure)] for key in ("output", "mean", "invstd")}
    expected = reference_batch_norm(vcombo.to_numpy(x), training=True)
    tol = tolerance(vcombo.dtype_name)
    for key, results in got.items():
        for result in results:
            error = relative_error(result, expected[key]) if key == "invstd" else max_error(result, expected[key])
            assert error <= tol, (key, error)


def _full_precision(combo):
    if combo.dtype_name not in ("float32", "float64"):
        pytest.skip("float16/bfloat16 cannot hold this data (see test_half_precision_*)")


def test_large_offsets_at_least_as_exact_as_pytorch():
    require_backend("torch")
    import torch

    for offset, spread in [(1e4, 0.1), (1e6, 1.0), (3e4, 1.0)]:
        x = _hard(offset, spread).astype(np.float32)
        expected = reference_batch_norm(x.astype(np.float64), training=True)["output"]
        ours = max_error(pbn.batch_norm(x, training=True).output, expected)
        theirs = max_error(F_batch_norm(torch, x), expected)
        assert ours <= theirs + 1e-7, (offset, spread, ours, theirs)


def F_batch_norm(torch, x):
    return torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()


def test_beyond_pytorchs_overflow():
    """|x| ~ 1e20 overflows PyTorch's CPU kernel (pytorch#162489); ours stays exact."""
    x = _hard(0.0, 1e20).astype(np.float32)
    expected = reference_batch_norm(x.astype(np.float64), training=True)["output"]
    assert max_error(pbn.batch_norm(x, training=True).output, expected) <= tolerance("float32")


def test_constant_channel_of_huge_values_gives_bias():
    x = np.random.default_rng(6).normal(size=SHAPE).astype(np.float32)
    x[:, 0] = 3e30
    bias = np.array([0.25, 0.5, 0.75], dtype=np.float32)
    out = pbn.batch_norm(x, bias=bias, training=True).output
    np.testing.assert_array_equal(out[:, 0], np.float32(0.25))


def test_constant_channel_gives_bias(vcombo):
    host = np.random.default_rng(1).normal(size=SHAPE)
    host[:, 1] = 1234.5678 if vcombo.dtype_name != "float16" else 123.45
    x = vcombo.asarray(host)
    pdt = vcombo.param_dtype
    bias = vcombo.asarray(np.array([0.5, -1.0, 2.0]), pdt)
    out = vcombo.to_numpy(
        pbn.batch_norm(x, weight=vcombo.asarray(np.full(3, 3.0), pdt), bias=bias, training=True).output
    )
    limit = 1e-6 if vcombo.dtype_name in ("float32", "float64") else 0.0  # half: exactly the rounded bias
    assert np.abs(out[:, 1] - vcombo.to_numpy(vcombo.asarray(np.array([-1.0]), vcombo.dtype))).max() <= limit


def test_half_precision_data_of_several_hundred_does_not_overflow(vcombo):
    """A float16 variance of such data overflows (300**2 > 65504); ours computes in float32."""
    if vcombo.dtype_name not in ("float16", "bfloat16"):
        pytest.skip("half-precision input only")
    x = vcombo.asarray(300.0 + 100.0 * np.random.default_rng(2).normal(size=SHAPE))
    result = pbn.batch_norm(
        x,
        vcombo.asarray(np.zeros(3), vcombo.library.float32),
        vcombo.asarray(np.ones(3), vcombo.library.float32),
        training=True,
    )
    expected = reference_batch_norm(vcombo.to_numpy(x), np.zeros(3), np.ones(3), training=True)
    assert max_error(vcombo.to_numpy(result.output), expected["output"]) <= tolerance(vcombo.dtype_name)
    assert np.isfinite(vcombo.to_numpy(result.running_var)).all()
    assert max_error(vcombo.to_numpy(result.running_var), expected["running_var"]) <= tolerance("float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("guard", [False, True])
def test_nonfinite_input_stays_in_its_channel(vcombo, bad, guard):
    host = np.random.default_rng(3).normal(2.0, 1.5, size=SHAPE)
    host[2, 1, 0, 3] = bad
    pdt = vcombo.param_dtype
    running = [vcombo.asarray(np.array(v), pdt) for v in ([0.5, 0.6, 0.7], [1.5, 1.6, 1.7])]
    x = vcombo.asarray(host)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy: invalid value in the bad channel
        result = pbn.batch_norm(x, *running, training=True, skip_nonfinite=guard)
        out = vcombo.to_numpy(result.output)
        rm, rv = vcombo.to_numpy(result.running_mean), vcombo.to_numpy(result.running_var)
    clean = reference_batch_norm(vcombo.to_numpy(x)[:, [0, 2]], [0.5, 0.7], [1.5, 1.7], training=True)
    tol = tolerance(vcombo.dtype_name)
    assert max_error(out[:, [0, 2]], clean["output"]) <= tol
    assert np.isnan(out[:, 1]).all()  # the whole channel: its mean/variance are not finite
    np.testing.assert_allclose(rm[[0, 2]], clean["running_mean"], rtol=tolerance("float32"))
    np.testing.assert_allclose(rv[[0, 2]], clean["running_var"], rtol=tolerance("float32"))
    if guard:  # the poisoned channel keeps exactly what it had
        assert rm[1] == vcombo.to_numpy(running[0])[1]
        assert rv[1] == vcombo.to_numpy(running[1])[1]
    else:
        assert not np.isfinite(rm[1]) or not np.isfinite(rv[1])


def test_module_guard_keeps_the_poisoned_channel_and_counts_the_batch():
    bn = pbn.BatchNorm1d(3, xp=np, dtype=np.float64, skip_nonfinite=True)
    good = np.random.default_rng(4).normal(size=(6, 3))
    bn(good)
    before = bn.running_mean.copy(), bn.running_var.copy()
    bad = good.copy()
    bad[0, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bn(bad)
    assert int(bn.num_batches_tracked) == 2
    assert bn.running_mean[2] == before[0][2] and bn.running_var[2] == before[1][2]
    assert bn.running_mean[0] != before[0][0]
    assert np.isfinite(bn.eval()(good)).all()  # the module still works


def test_half_module_is_lossy_but_close():
    """An all-float16 module is allowed; its running statistics round to float16."""
    x = np.random.default_rng(5).normal(1.0, 2.0, size=(16, 3)).astype(np.float16)
    bn = pbn.BatchNorm1d(3, xp=np, dtype=np.float16)
    out = bn(x)
    assert out.dtype == np.float16 and bn.running_var.dtype == np.float16
    expected = reference_batch_norm(x.astype(np.float64), np.zeros(3), np.ones(3), training=True)
    assert max_error(out, expected["output"]) <= tolerance("float16")
    np.testing.assert_allclose(bn.running_var, expected["running_var"], rtol=2e-3)


def test_accuracy_report_rows_are_within_tolerance():
    """The published accuracy table: every portable_bn cell within the suite's tolerance."""
    from portable_bn._accuracy import DATA, measure

    rows = measure()
    ours = [(impl, dtype, errors) for impl, dtype, errors in rows if impl.startswith("portable_bn numpy")]
    assert {dtype for _, dtype, _ in ours} == {"float16", "float32", "float64"}
    for impl, dtype, errors in rows:
        if impl.startswith("portable_bn"):
            assert set(errors) == {name for name, (_, dtypes) in DATA.items() if dtype in dtypes}
            assert all(error <= tolerance(dtype) for error in errors.values()), (impl, dtype, errors)
