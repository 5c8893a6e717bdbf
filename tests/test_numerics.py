"""Hard data: large offsets, huge magnitudes, constant channels, tiny variances,
half precision, and NaN/Inf confined to their channel (opt-in guard for the
running statistics)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn._reference import reference_backward, reference_batch_norm
from portable_bn._tolerance import max_error, tolerance

SHAPE = (8, 3, 4, 4)
HARD = {  # name -> (offset, spread): every one stays inside float32's range
    "offset-1e4": (1e4, 0.1),
    "offset-1e6": (1e6, 1.0),
    "magnitude-1e20": (0.0, 1e20),
    "offset-1e20": (1e20, 1e19),
    "magnitude-3e37": (0.0, 3e37),
    "near-largest": (-3e38, 1e37),  # beyond 2**127: the prescale would be subnormal uncapped
    "tiny-variance": (1.0, 1e-4),
}


def _hard(offset, spread, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(offset + spread * rng.normal(size=SHAPE), -3.4e38, 3.4e38)  # inside float32


def _full_precision(combo):
    if combo.dtype_name not in ("float32", "float64"):
        pytest.skip("float16/bfloat16 cannot hold this data (see test_half_precision_*)")


CONSTANT = {  # name -> value of channel 0, the other channels N(0, 1): a constant channel of a large magnitude
    "constant-4e16": 4e16,
    "constant-3e30": 3e30,
    "constant-3e38": 3e38,
}


def _hard_case(case):
    if case in HARD:
        return _hard(*HARD[case])
    host = np.random.default_rng(7).normal(size=SHAPE)
    host[:, 0] = CONSTANT[case]
    return host


def _assert_close(actual, expected, dtype_name, what):
    """Normwise error within the dtype's tolerance, where ``expected`` (float64) rounded to the
    dtype is finite; where it overflows the dtype, ``actual`` must hold the same infinity."""
    actual = np.asarray(actual, dtype=np.float64)
    with np.errstate(over="ignore"):
        rounded = np.asarray(expected, dtype=dtype_name).astype(np.float64)
    beyond = np.isinf(rounded)
    np.testing.assert_array_equal(actual[beyond], rounded[beyond], err_msg=what)
    error = max_error(actual[~beyond], np.asarray(expected)[~beyond])
    assert error <= tolerance(dtype_name), (what, error)


def _hard_call(combo, case):
    """``batch_norm`` in training on a hard data set, with running statistics and affine
    parameters; returns the arrays, the host copies of the inputs and the result."""
    x = combo.asarray(_hard_case(case))
    rng = np.random.default_rng(8)
    host = {"running_mean": rng.normal(size=3), "running_var": rng.uniform(0.5, 2.0, 3)}
    host.update(weight=np.array([1.5, 0.5, 2.0]), bias=np.array([0.1, -0.2, 0.3]))
    arrays = {key: combo.asarray(value) for key, value in host.items()}
    host = {key: combo.to_numpy(value) for key, value in arrays.items()}
    result = pbn.batch_norm(x, **arrays, training=True, momentum=0.25)
    return x, arrays, host, result


@pytest.mark.parametrize("case", [*HARD, *CONSTANT])
def test_hard_data_matches_the_float64_truth(vcombo, case):
    """Output, batch statistics and running statistics on hard data, against the float64 truth."""
    _full_precision(vcombo)
    name = vcombo.dtype_name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a running variance beyond the dtype's range
        x, _, host, result = _hard_call(vcombo, case)
        got = {key: vcombo.to_numpy(getattr(result, key)) for key in pbn.BatchNormResult._fields}
    expected = reference_batch_norm(vcombo.to_numpy(x), **host, training=True, momentum=0.25)
    assert np.isfinite(got["output"]).all()
    for key, value in got.items():
        _assert_close(value, expected[key], name, key)
    for key in ("mean", "invstd"):  # per channel, relative: a channel's statistics are not normwise
        np.testing.assert_allclose(got[key], expected[key], rtol=tolerance(name), atol=0, err_msg=key)


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
    pdt = vcombo.library.float32 if vcombo.dtype_name in ("float16", "bfloat16") else vcombo.dtype
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
    assert max_error(vcombo.to_numpy(result.running_var), expected["running_var"]) <= tolerance("float32") * 1e4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("guard", [False, True])
def test_nonfinite_input_stays_in_its_channel(vcombo, bad, guard):
    host = np.random.default_rng(3).normal(2.0, 1.5, size=SHAPE)
    host[2, 1, 0, 3] = bad
    pdt = vcombo.library.float32 if vcombo.dtype_name in ("float16", "bfloat16") else vcombo.dtype
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


def _fused_case(case, dtype_name):
    """Host data for test_fused_statistics_match_the_float64_truth."""
    if case in HARD:
        return _hard(*HARD[case])
    host = np.random.default_rng(6).normal(size=SHAPE)
    if case == "overflowing-sum":  # every value near a tenth of the largest: the plain sum overflows
        big = float(np.finfo(dtype_name).max) / 10
        host = big + (big / 10) * host
    elif case == "constant":
        host[:, 1] = 123.4375
    else:
        host[1, 1, 2, 3] = {"nan": np.nan, "inf": np.inf}[case]
    return host


@pytest.mark.parametrize("case", [*HARD, "overflowing-sum", "constant", "nan", "inf"])
def test_fused_statistics_match_the_float64_truth(vcombo, case):
    """_agnostic.fused_statistics (JAX's route on GPUs, where XLA fuses reductions of one
    input): the statistics and the output of the agnostic algorithm, on every backend and
    the hard data, a channel whose plain sum overflows, a constant channel and NaN/Inf."""
    _full_precision(vcombo)
    from portable_bn import _agnostic
    from portable_bn._compat import array_namespace
    from portable_bn._recipe import make_recipe

    host = _fused_case(case, vcombo.dtype_name)
    x = vcombo.asarray(host)
    xh = vcombo.to_numpy(x)
    if case == "overflowing-sum":
        with np.errstate(over="ignore"):
            assert not np.isfinite(np.sum(xh.astype(vcombo.dtype_name), axis=(0, 2, 3))).any()
    xp = array_namespace(x)
    recipe = make_recipe(SHAPE, 1)
    weight, bias = vcombo.asarray(np.array([1.5, 0.5, 2.0])), vcombo.asarray(np.array([0.1, -0.2, 0.3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy: invalid values in the NaN/Inf channel
        stats, centered = _agnostic.fused_statistics(xp, x, recipe, 1e-5)
        assert centered.values is None
        centered = _agnostic.recentered(xp, x, centered, recipe)
        output = vcombo.to_numpy(_agnostic.scale_and_shift(xp, centered, weight, bias, recipe, x.dtype))
        got = {name: vcombo.to_numpy(getattr(stats, name)) for name in ("mean", "invstd", "batch_var")}
    channels = [0, 2] if case in ("nan", "inf") else [0, 1, 2]
    # The reference's exact sums overflow float64 on float64's overflowing-sum data: it gets the
    # data times a power of two that brings them near 1 (exact), eps likewise, and its
    # statistics are scaled back.
    unit = 2.0 ** -np.frexp(np.max(np.abs(xh)))[1] if case == "overflowing-sum" else 1.0
    expected = reference_batch_norm(
        xh[:, channels] * unit, weight=np.array([1.5, 0.5, 2.0])[channels],
        bias=np.array([0.1, -0.2, 0.3])[channels], training=True, eps=1e-5 * unit * unit,
    )  # fmt: skip
    tol = tolerance(vcombo.dtype_name)
    assert max_error(output[:, channels], expected["output"]) <= tol
    np.testing.assert_allclose(got["mean"][channels] * unit, expected["mean"], rtol=tol, atol=0)
    np.testing.assert_allclose(got["invstd"][channels] / unit, expected["invstd"], rtol=tol, atol=0)
    biased_var = (xh[:, channels] * unit).var(axis=(0, 2, 3))
    with np.errstate(over="ignore"):
        in_range = biased_var / unit / unit <= float(np.finfo(vcombo.dtype_name).max)
        got_var = got["batch_var"][channels][in_range] * unit * unit
    np.testing.assert_allclose(got_var, biased_var[in_range], rtol=tol, atol=0)
    if case == "constant":  # exactly the bias, as in the agnostic algorithm
        np.testing.assert_array_equal(output[:, 1], vcombo.to_numpy(bias)[1])
    if case in ("nan", "inf"):
        assert np.isnan(output[:, 1]).all() and np.isnan(got["mean"][1]) and np.isnan(got["invstd"][1])
