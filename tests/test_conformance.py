"""Every (backend, device, dtype) against the NumPy float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn._compat import array_namespace, device
from portable_bn.testing import (
    MODULE_SHAPES,
    failures,
    functional_scenario,
    module_scenario,
    reference_batch_norm,
    sample,
    tolerance,
)


def assert_within(checks, dtype_name):
    """Every check within its limit (the tolerance of its dtype; ``dtype_name`` is the input's)."""
    checks = list(checks)
    assert all(check.limit <= tolerance(dtype_name) for check in checks)
    bad = failures(checks)
    assert not bad, f"checks beyond their limits: {bad}"
    return len(checks)


@pytest.mark.parametrize("kind", list(MODULE_SHAPES))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize(
    ("affine", "track"),
    [(True, True), (False, True), (True, False), (False, False)],
    ids=["aT-tT", "aF-tT", "aT-tF", "aF-tF"],
)
def test_module_steps_match_reference(vcombo, kind, momentum, affine, track):
    checked = assert_within(
        module_scenario(vcombo, kind, affine=affine, track_running_stats=track, momentum=momentum), vcombo.dtype_name
    )
    assert checked >= 5  # an output per step at least


@pytest.mark.parametrize("kind", ["1d-3D", "2d", "3d"])
def test_module_channels_last_matches_reference(vcombo, kind):
    assert_within(module_scenario(vcombo, kind, axis=-1, momentum=None), vcombo.dtype_name)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((5, 3), 1), ((4, 3, 6), 1), ((3, 4, 3, 5), 1), ((2, 3, 2, 3, 4), 1), ((4, 3, 5, 2), -1), ((3, 4, 2), 0)],
    ids=["NC", "NCL", "NCHW", "NCDHW", "NHWC", "axis0"],
)
@pytest.mark.parametrize(
    ("training", "affine", "running"),
    # eval without running statistics is an error (test_errors)
    [
        (True, True, True),
        (True, False, True),
        (True, True, False),
        (True, False, False),
        (False, True, True),
        (False, False, True),
    ],
    ids=["train-aff-run", "train-run", "train-aff", "train", "eval-aff-run", "eval-run"],
)
def test_functional_matches_reference(vcombo, shape, axis, training, affine, running):
    assert_within(
        functional_scenario(vcombo, shape, training=training, axis=axis, affine=affine, running=running),
        vcombo.dtype_name,
    )


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_functional_momentum_and_eps(vcombo, momentum, eps):
    assert_within(functional_scenario(vcombo, (4, 3, 5), training=True, momentum=momentum, eps=eps), vcombo.dtype_name)


def test_results_live_where_the_input_lives(combo):
    """Library, device and dtype of every returned array, on every device (meta too)."""
    x = combo.asarray(sample((4, 3, 2, 2), seed=1))
    pdt = combo.param_dtype
    stats = [combo.asarray(np.linspace(0.5, 1.5, 3), pdt) for _ in range(4)]
    xp = array_namespace(x)
    for training in (True, False):
        result = pbn.batch_norm(x, *stats, training=training)
        assert result.output.shape == x.shape
        assert result.output.dtype == x.dtype
        compute = x.dtype if x.dtype in (xp.float32, xp.float64) else xp.float32
        for name in ("running_mean", "running_var"):
            assert getattr(result, name).dtype == pdt
            assert getattr(result, name).shape == (3,)
        for name in ("mean", "invstd"):
            assert getattr(result, name).dtype == compute
        for value in result:
            assert array_namespace(value) is xp
            assert device(value) == device(x)
    grads = pbn.batch_norm_backward(x, x, stats[2], result.mean, result.invstd)
    assert [g.shape for g in grads] == [x.shape, (3,), (3,)]
    assert all(device(g) == device(x) for g in grads)


def test_module_created_lazily_in_input_library(combo):
    x = combo.asarray(sample((4, 3, 2, 2), seed=2))
    bn = pbn.BatchNorm2d(3)
    assert bn.weight is None and bn.xp is None and bn.state_dict() == {}
    bn(x)
    xp = array_namespace(x)
    assert bn.xp is xp
    expected_dtype = x.dtype if x.dtype in (xp.float32, xp.float64) else xp.float32
    for key, value in bn.state_dict().items():
        assert array_namespace(value) is xp, key
        assert device(value) == device(x), key
        if key != "num_batches_tracked":
            assert value.dtype == expected_dtype, key


def test_module_created_eagerly_with_xp(combo):
    bn = pbn.BatchNorm1d(3, xp=combo.library, device=combo.device, dtype=combo.param_dtype)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert bn.weight.shape == (3,) and bn.weight.dtype == combo.param_dtype
    assert device(bn.running_var) == device(combo.asarray(np.zeros(1)))
    assert bn.num_batches_tracked.shape == ()
    if combo.values:
        assert combo.to_numpy(bn.running_var).tolist() == [1.0, 1.0, 1.0]
        assert combo.to_numpy(bn.bias).tolist() == [0.0, 0.0, 0.0]
        assert int(combo.to_numpy(bn.num_batches_tracked)) == 0


def test_arguments_are_never_written(vcombo):
    host = {k: np.linspace(0.5, 1.5, 3) + i for i, k in enumerate(["rm", "rv", "w", "b"])}
    x_host = sample((4, 3, 5), seed=3)
    x = vcombo.asarray(x_host)
    pdt = vcombo.param_dtype
    arrays = [vcombo.asarray(host[k], pdt) for k in ("rm", "rv", "w", "b")]
    before = [vcombo.to_numpy(a) for a in [x, *arrays]]
    result = pbn.batch_norm(x, *arrays, training=True, momentum=0.5)
    pbn.batch_norm_backward(x, x, arrays[2], result.mean, result.invstd)
    after = [vcombo.to_numpy(a) for a in [x, *arrays]]
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(vcombo.to_numpy(result.running_mean), before[1])


def test_read_only_numpy_arrays():
    x = sample((4, 3, 5), seed=4)
    stats = [np.linspace(0.5, 1.5, 3) for _ in range(4)]
    for a in [x, *stats]:
        a.setflags(write=False)
    result = pbn.batch_norm(x, *stats, training=True)
    assert np.isfinite(result.output).all()
    bn = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    bn.load_state_dict({"weight": stats[2], "bias": stats[3], "running_mean": stats[0], "running_var": stats[1]})
    read_only = bn.running_mean
    read_only.setflags(write=False)
    kept = read_only.copy()
    bn(x)
    assert bn.running_mean is not read_only  # rebound to a new array, not written
    np.testing.assert_array_equal(read_only, kept)
    assert not np.array_equal(bn.running_mean, kept)
    assert int(bn.num_batches_tracked) == 1


def test_empty_batch(vcombo):
    """N = 0 in training: empty output, running statistics unchanged, counter bumped."""
    bn = pbn.BatchNorm2d(3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype)
    bn(vcombo.asarray(sample((4, 3, 2, 2), seed=5)))
    before = {k: vcombo.to_numpy(v) for k, v in bn.state_dict().items()}
    out = bn(vcombo.asarray(np.zeros((0, 3, 2, 2))))
    assert out.shape == (0, 3, 2, 2)
    after = {k: vcombo.to_numpy(v) for k, v in bn.state_dict().items()}
    for key in ("running_mean", "running_var", "weight", "bias"):
        np.testing.assert_array_equal(after[key], before[key])
    assert int(after["num_batches_tracked"]) == 2
    result = pbn.batch_norm(vcombo.asarray(np.zeros((0, 3))), training=True)
    assert np.isnan(vcombo.to_numpy(result.mean)).all() and result.output.shape == (0, 3)


def test_one_value_per_channel_is_fine_in_eval(vcombo):
    bn = pbn.BatchNorm1d(3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype).eval()
    x_host = np.array([[1.0, 2.0, 3.0]])
    out = vcombo.to_numpy(bn(vcombo.asarray(x_host)))
    np.testing.assert_allclose(out, x_host / np.sqrt(1 + 1e-5), rtol=tolerance(vcombo.dtype_name))


def test_eval_with_buffers_removed_uses_batch_statistics(vcombo):
    bn = pbn.BatchNorm2d(3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype).eval()
    bn.running_mean = bn.running_var = None
    x = vcombo.asarray(sample((4, 3, 2, 2), seed=6))
    out = vcombo.to_numpy(bn(x))
    expected = reference_batch_norm(vcombo.to_numpy(x), training=True)["output"]
    assert np.max(np.abs(out - expected)) <= tolerance(vcombo.dtype_name) * max(1, np.abs(expected).max())
    assert int(vcombo.to_numpy(bn.num_batches_tracked)) == 0
