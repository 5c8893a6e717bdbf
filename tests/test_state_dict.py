"""state_dict / load_state_dict across libraries and devices, resets, modes."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn._compat import array_namespace, device
from portable_bn.testing import max_error, reference_batch_norm, sample, tolerance

KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
STATE = {
    "weight": np.array([1.5, 0.5, 2.0]),
    "bias": np.array([0.1, -0.2, 0.3]),
    "running_mean": np.array([1.0, -1.0, 0.5]),
    "running_var": np.array([2.0, 0.5, 1.5]),
    "num_batches_tracked": np.array(7),
}


@pytest.mark.parametrize(
    ("affine", "track", "keys"),
    [(True, True, KEYS), (False, True, KEYS[2:]), (True, False, KEYS[:2]), (False, False, [])],
)
def test_state_dict_keys_follow_pytorch_order(affine, track, keys):
    module = pbn.BatchNorm2d(3, affine=affine, track_running_stats=track, xp=np)
    assert list(module.state_dict()) == keys


def test_numpy_state_loads_into_every_backend(vcombo):
    """A NumPy checkpoint lands in the module's library, device and dtype, and
    the eval output uses it."""
    pdt = vcombo.param_dtype
    module = pbn.BatchNorm1d(3, xp=vcombo.library, device=vcombo.device, dtype=pdt)
    missing, unexpected = module.load_state_dict(STATE)
    assert missing == [] and unexpected == []
    x_probe = vcombo.asarray(np.zeros((1, 3)))
    for key, value in module.state_dict().items():
        assert array_namespace(value) is array_namespace(x_probe), key
        assert device(value) == device(x_probe), key
        if key != "num_batches_tracked":
            assert value.dtype == pdt
            rounded = np.asarray(STATE[key], dtype=vcombo.param_dtype_name)  # the checkpoint in the module's dtype
            np.testing.assert_array_equal(vcombo.to_numpy(value), rounded)
    assert int(vcombo.to_numpy(module.num_batches_tracked)) == 7
    x = sample((4, 3), seed=1)
    module.eval()
    out = vcombo.to_numpy(module(vcombo.asarray(x)))
    host = {key: vcombo.to_numpy(value) for key, value in module.state_dict().items()}
    expected = reference_batch_norm(
        vcombo.to_numpy(vcombo.asarray(x)), host["running_mean"], host["running_var"], host["weight"], host["bias"],
        training=False,
    )  # fmt: skip
    assert max_error(out, expected["output"]) <= tolerance(vcombo.dtype_name)


def test_backend_state_loads_into_numpy(vcombo):
    """Every backend's state_dict converts into a NumPy module (DLPack or host copy)."""
    source = pbn.BatchNorm2d(3, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype)
    source(vcombo.asarray(sample((4, 3, 2, 2), seed=2)))
    target = pbn.BatchNorm2d(3, xp=np, dtype=np.float64)
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        got = getattr(target, key)
        assert isinstance(got, np.ndarray), key
        np.testing.assert_array_equal(got, vcombo.to_numpy(value).astype(got.dtype), err_msg=key)
    assert target.num_batches_tracked.dtype == np.int64


def test_lazy_module_adopts_library_device_and_dtype_of_the_state(vcombo):
    pdt = vcombo.param_dtype
    state = {k: vcombo.asarray(v, pdt) for k, v in STATE.items() if k != "num_batches_tracked"}
    module = pbn.BatchNorm1d(3)
    module.load_state_dict(state)
    assert module.xp is array_namespace(state["weight"])
    assert module.weight.dtype == pdt
    assert device(module.running_var) == device(state["weight"])
    assert int(vcombo.to_numpy(module.num_batches_tracked)) == 0  # missing counter tolerated, as PyTorch


def test_loaded_arrays_are_copies():
    source = {k: np.array(v, dtype=np.float64) for k, v in STATE.items()}
    module = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    module.load_state_dict(source)
    source["weight"][:] = 100.0
    np.testing.assert_array_equal(module.weight, STATE["weight"])


def test_strict_and_non_strict_loading():
    module = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    before = dict(vars(module))
    partial = {"weight": STATE["weight"], "extra": np.ones(3)}
    with pytest.raises(
        ValueError, match=r"missing keys \['bias', 'running_mean', 'running_var'\], unexpected keys \['extra'\]"
    ):
        module.load_state_dict(partial)
    assert all(vars(module)[k] is v for k, v in before.items())
    result = module.load_state_dict(partial, strict=False)
    assert result == pbn.IncompatibleKeys(["bias", "running_mean", "running_var"], ["extra"])
    np.testing.assert_array_equal(module.weight, STATE["weight"])
    np.testing.assert_array_equal(module.bias, np.zeros(3))


def test_bad_value_changes_nothing():
    module = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    before = dict(vars(module))
    bad = {**STATE, "running_var": np.ones(4)}  # weight, bias, running_mean convert fine first
    with pytest.raises(ValueError, match=r"state_dict\['running_var'\] must have shape \(3,\), got \(4,\)"):
        module.load_state_dict(bad)
    assert all(vars(module)[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match=r"state_dict\['num_batches_tracked'\] must have shape \(\), got \(2,\)"):
        module.load_state_dict({**STATE, "num_batches_tracked": np.array([1, 2])})
    with pytest.raises(TypeError, match=r"state_dict\['bias'\] cannot be converted"):
        module.load_state_dict({**STATE, "bias": object()})
    with pytest.raises(TypeError, match=r"state_dict must be a mapping"):
        module.load_state_dict([("weight", STATE["weight"])])
    assert all(vars(module)[k] is v for k, v in before.items())


def test_resets():
    module = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    module.load_state_dict(STATE)
    module.reset_running_stats()
    np.testing.assert_array_equal(module.weight, STATE["weight"])
    np.testing.assert_array_equal(module.running_mean, np.zeros(3))
    np.testing.assert_array_equal(module.running_var, np.ones(3))
    assert int(module.num_batches_tracked) == 0
    module.load_state_dict(STATE)
    module.reset_parameters()
    np.testing.assert_array_equal(module.weight, np.ones(3))
    np.testing.assert_array_equal(module.bias, np.zeros(3))
    np.testing.assert_array_equal(module.running_var, np.ones(3))


def test_modes_and_repr():
    module = pbn.BatchNorm3d(4, momentum=None)
    assert module.training is True
    assert module.eval() is module and module.training is False
    assert module.train() is module and module.training is True
    assert repr(module) == "BatchNorm3d(4, eps=1e-05, momentum=None, affine=True, track_running_stats=True)"


def test_eval_mode_leaves_state_alone():
    module = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    module.load_state_dict(STATE)
    before = dict(vars(module))
    module.eval()(sample((5, 3), seed=3))
    # Only the mode and what backward() needs from the last call change.
    assert all(vars(module)[k] is v for k, v in before.items() if k not in ("training", "_saved"))


def _model_state(rng):
    layer = {
        "weight": rng.uniform(0.5, 2.0, 3),
        "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3),
        "running_var": rng.uniform(0.5, 2.0, 3),
        "num_batches_tracked": np.asarray(7),
    }
    model = {"conv.weight": rng.normal(size=(3, 3, 1)), "head.bn.weight": np.ones(5)}
    model.update({f"layer1.0.bn1.{key}": value for key, value in layer.items()})
    return model, layer


def test_load_state_dict_takes_one_layer_out_of_a_model_by_prefix():
    model, layer = _model_state(np.random.default_rng(0))
    bn = pbn.BatchNorm1d(3, xp=np, dtype="float64")
    assert bn.load_state_dict(model, prefix="layer1.0.bn1.") == ([], [])
    for key, value in layer.items():
        np.testing.assert_array_equal(bn.state_dict()[key], value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("missing", r"missing keys \['layer1.0.bn1.running_var'\], unexpected keys \[\]"),
        ("unexpected", r"missing keys \[\], unexpected keys \['layer1.0.bn1.extra'\]"),
    ],
)
def test_prefix_keeps_strict_checks_within_the_prefix(change, match):
    model, _ = _model_state(np.random.default_rng(1))
    if change == "missing":
        del model["layer1.0.bn1.running_var"]
    else:
        model["layer1.0.bn1.extra"] = np.ones(3)
    bn = pbn.BatchNorm1d(3, xp=np, dtype="float64")
    before = {key: np.array(value, copy=True) for key, value in bn.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        bn.load_state_dict(model, prefix="layer1.0.bn1.")
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    result = bn.load_state_dict(model, strict=False, prefix="layer1.0.bn1.")
    assert result == ((["layer1.0.bn1.running_var"], []) if change == "missing" else ([], ["layer1.0.bn1.extra"]))


def test_prefix_must_be_a_string():
    with pytest.raises(TypeError, match="prefix must be a str, got int"):
        pbn.BatchNorm1d(3, xp=np).load_state_dict({}, prefix=1)


def test_a_torch_models_state_dict_loads_by_prefix():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).double()
    model(torch.randn(4, 2, 5, 5, dtype=torch.float64))  # one training step updates the statistics
    bn = pbn.BatchNorm2d(3, xp=np, dtype="float64")
    assert bn.load_state_dict(model.state_dict(), prefix="1.") == ([], [])
    np.testing.assert_array_equal(bn.running_var, model[1].running_var.numpy())
    assert int(bn.num_batches_tracked) == 1


def test_conversion_errors_name_the_library_in_words():
    bn = pbn.BatchNorm1d(2, xp=np)
    with pytest.raises(TypeError, match=r"state_dict\['weight'\] cannot be converted to an array of numpy: "):
        bn.load_state_dict({"weight": object()}, strict=False)
