"""Bad input: a clear TypeError/ValueError naming the argument, and nothing changed."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn.testing import max_error, sample, tolerance


def _vec(value=1.0, dtype=np.float64, n=3):
    return np.full(n, value, dtype=dtype)


X = sample((4, 3, 5), seed=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": X.astype(np.int64)}, TypeError, r"x must have a real floating dtype.*int64"),
        ({"x": X.astype(np.complex128)}, TypeError, r"x must have a real floating dtype.*complex128"),
        ({"x": X.tolist()}, TypeError, r"x must be an array of a supported library.*list"),
        ({"x": X[0, 0]}, ValueError, r"x must have at least 2 dimensions.*\(5,\)"),
        ({"axis": 3}, ValueError, r"axis must be in \[-3, 3\).*got 3"),
        ({"axis": 1.0}, TypeError, r"axis must be an int.*float"),
        ({"axis": True}, TypeError, r"axis must be an int.*bool"),
        ({"weight": _vec(n=4)}, ValueError, r"weight must have shape \(3,\).*along axis 1, got shape \(4,\)"),
        ({"bias": _vec(n=2)}, ValueError, r"bias must have shape \(3,\).*got shape \(2,\)"),
        ({"running_mean": _vec(n=4), "running_var": _vec()}, ValueError, r"running_mean must have shape \(3,\)"),
        ({"running_mean": _vec(), "running_var": _vec(n=1)}, ValueError, r"running_var must have shape \(3,\)"),
        ({"running_mean": _vec(), "running_var": np.ones((3, 1))}, ValueError, r"running_var must have shape \(3,\)"),
        ({"weight": np.ones(3, dtype=np.int32)}, TypeError, r"weight must have a real floating dtype, got int32"),
        ({"weight": _vec(dtype=np.float32)}, TypeError, r"weight must have dtype float64 to match x, got float32"),
        (
            {"running_mean": _vec()},
            ValueError,
            r"running_mean and running_var must be given together, got only running_mean",
        ),
        ({"running_var": _vec()}, ValueError, r"got only running_var"),
        ({"eps": 0.0}, ValueError, r"eps must be > 0 in training, got 0.0"),
        ({"eps": -1e-5, "training": False}, ValueError, r"eps must be >= 0, got -1e-05"),
        ({"eps": "1e-5"}, TypeError, r"eps must be a real number, got str"),
        ({"eps": float("nan")}, ValueError, r"eps must be finite"),
        ({"momentum": None}, TypeError, r"momentum must be a real number, got NoneType"),
        ({"momentum": float("inf")}, ValueError, r"momentum must be finite"),
        ({"training": 1}, TypeError, r"training must be True or False, got int"),
        (
            {"x": X[:1, :, :1]},
            ValueError,
            r"Expected more than 1 value per channel when training, got input size \(1, 3, 1\)",
        ),
        ({"training": False}, ValueError, r"running_mean and running_var are required when training=False"),
    ],
)
def test_batch_norm_rejects(kwargs, error, match):
    args = {"x": X, "training": True, **kwargs}
    x = args.pop("x")
    snapshot = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=match):
        pbn.batch_norm(x, **args)
    for key, value in snapshot.items():
        np.testing.assert_array_equal(args[key], value)


def test_eps_zero_is_allowed_in_eval():
    result = pbn.batch_norm(X, _vec(0.0), _vec(1.0), training=False, eps=0.0)
    np.testing.assert_array_equal(result.output, X)


def test_half_input_accepts_float32_parameters_only():
    x16 = X.astype(np.float16)
    pbn.batch_norm(x16, _vec(dtype=np.float32), _vec(dtype=np.float32), training=True)
    pbn.batch_norm(x16, _vec(dtype=np.float16), _vec(dtype=np.float16), training=True)
    with pytest.raises(TypeError, match=r"running_mean must have dtype float16 or float32 to match x, got float64"):
        pbn.batch_norm(x16, _vec(), _vec(), training=True)


def test_mixed_libraries_are_named():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"weight is a torch array but x is a numpy array"):
        pbn.batch_norm(X, weight=torch.ones(3, dtype=torch.float64), training=True)
    with pytest.raises(TypeError, match=r"running_mean is a numpy array but x is a torch array"):
        pbn.batch_norm(torch.ones(4, 3, dtype=torch.float64), _vec(), _vec())


def test_mixed_devices_are_named():
    xp = pytest.importorskip("array_api_strict")
    x = xp.asarray(X, device=xp.Device("device1"))
    weight = xp.ones(3, dtype=xp.float64)
    with pytest.raises(ValueError, match=r"weight is on device .*CPU_DEVICE.* but x is on device .*device1"):
        pbn.batch_norm(x, weight=weight, training=True)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"bias is on device meta but x is on device cpu"):
        pbn.batch_norm(torch.ones(4, 3), bias=torch.ones(3, device="meta"), training=True)


def test_channel_errors_on_every_backend(vcombo):
    x = vcombo.asarray(sample((4, 3, 2), seed=1))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        pbn.batch_norm(x, weight=vcombo.asarray(np.ones(4), x.dtype), training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        pbn.batch_norm(vcombo.asarray(np.ones((1, 3))), training=True)


# ---------------------------------------------------------------- backward
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"grad_output": X[:2]}, ValueError, r"grad_output must have the shape of x \(4, 3, 5\), got \(2, 3, 5\)"),
        ({"grad_output": X.astype(np.float32)}, TypeError, r"grad_output must have the dtype of x \(float64\)"),
        ({"grad_output": X.tolist()}, TypeError, r"grad_output must be an array"),
        ({"mean": _vec(n=4)}, ValueError, r"mean must have shape \(3,\)"),
        ({"invstd": _vec(n=2)}, ValueError, r"invstd must have shape \(3,\)"),
        ({"weight": _vec(n=5)}, ValueError, r"weight must have shape \(3,\)"),
        ({"axis": -4}, ValueError, r"axis must be in \[-3, 3\)"),
    ],
)
def test_backward_rejects(kwargs, error, match):
    args = {"grad_output": X, "x": X, "weight": None, "mean": _vec(), "invstd": _vec(), **kwargs}
    with pytest.raises(error, match=match):
        pbn.batch_norm_backward(
            args.pop("grad_output"), args.pop("x"), args.pop("weight"), args.pop("mean"), args.pop("invstd"), **args
        )


def test_backward_mixed_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"grad_output is a torch array but x is a numpy array"):
        pbn.batch_norm_backward(torch.ones(4, 3, 5, dtype=torch.float64), X, None, _vec(), _vec())


# ----------------------------------------------------------------- modules
def _snapshot(module):
    return {key: value for key, value in vars(module).items()}


def _assert_unchanged(module, snapshot):
    now = vars(module)
    assert now.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert now[key] is value, f"{key} was rebound by a failed call"


@pytest.mark.parametrize(
    ("cls", "x", "error", "match"),
    [
        (pbn.BatchNorm2d, np.ones((4, 3, 5)), ValueError, r"expected 4D input \(got 3D input\)"),
        (pbn.BatchNorm1d, np.ones((4, 3, 5, 2)), ValueError, r"expected 2D or 3D input \(got 4D input\)"),
        (pbn.BatchNorm3d, np.ones((4, 3, 5, 2)), ValueError, r"expected 5D input \(got 4D input\)"),
        (pbn.BatchNorm1d, np.ones((4, 5)), ValueError, r"BatchNorm1d\(3\) expects 3 channels along axis 1"),
        (pbn.BatchNorm1d, np.ones((1, 3)), ValueError, r"Expected more than 1 value per channel when training"),
        (pbn.BatchNorm1d, np.ones((4, 3), dtype=np.int16), TypeError, r"x must have a real floating dtype"),
        (
            pbn.BatchNorm1d,
            np.ones((4, 3), dtype=np.float32),
            TypeError,
            r"BatchNorm1d holds float64 parameters, so x must have dtype float64, got float32",
        ),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_call_rejects_and_changes_nothing(cls, x, error, match, momentum):
    module = cls(3, momentum=momentum, xp=np, dtype="float64")
    module(np.ones((2, 3) + (1,) * (cls._ranks[0] - 2)) * np.arange(2.0).reshape((2, 1) + (1,) * (cls._ranks[0] - 2)))
    snapshot = _snapshot(module)
    state = {k: np.array(v, copy=True) for k, v in module.state_dict().items()}
    with pytest.raises(error, match=match):
        module(x)
    _assert_unchanged(module, snapshot)
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    assert int(module.num_batches_tracked) == 1


def test_failed_first_call_does_not_create_parameters():
    module = pbn.BatchNorm2d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(np.ones((1, 3, 1, 1)))
    assert module.xp is None and module.weight is None and module.num_batches_tracked is None


def test_module_on_wrong_library_is_named():
    torch = pytest.importorskip("torch")
    module = pbn.BatchNorm1d(3, xp=np)
    snapshot = _snapshot(module)
    with pytest.raises(TypeError, match=r"BatchNorm1d holds numpy arrays but x is a torch array"):
        module(torch.ones(4, 3))
    _assert_unchanged(module, snapshot)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_features": 0}, ValueError, r"num_features must be a positive int, got 0"),
        ({"num_features": 3.0}, ValueError, r"num_features must be a positive int, got 3.0"),
        ({"eps": -1.0}, ValueError, r"eps must be >= 0, got -1.0"),
        ({"momentum": "0.1"}, TypeError, r"momentum must be a real number, got str"),
        ({"affine": None}, TypeError, r"affine must be True or False"),
        ({"track_running_stats": 0}, TypeError, r"track_running_stats must be True or False"),
        ({"axis": "1"}, TypeError, r"axis must be an int"),
        ({"xp": "numpy"}, TypeError, r"xp must be an array library module"),
        ({"xp": np, "dtype": "int32"}, TypeError, r"dtype must be a real floating dtype of"),
        ({"xp": np, "dtype": "float8"}, TypeError, r"dtype 'float8' is not a dtype of"),
        ({"device": "cpu"}, ValueError, r"device needs xp"),
        ({"xp": np, "device": "gpu"}, ValueError, r"cannot create parameters on device='gpu'"),
    ],
)
def test_module_constructor_rejects(kwargs, error, match):
    args = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=match):
        pbn.BatchNorm2d(args.pop("num_features"), **args)


def test_train_mode_must_be_bool():
    module = pbn.BatchNorm1d(3)
    with pytest.raises(TypeError, match="mode must be True or False"):
        module.train("no")
    assert module.training is True


def test_integer_like_axis_is_accepted():
    """Any integer type names the channel axis (the plain-int shortcut must not reject the others)."""
    expected = pbn.batch_norm(X, _vec(0.0, n=5), _vec(n=5), training=True, axis=-1)
    got = pbn.batch_norm(X, _vec(0.0, n=5), _vec(n=5), training=True, axis=np.int64(-1))
    np.testing.assert_array_equal(got.output, expected.output)
    with pytest.raises(ValueError, match=r"axis must be in \[-3, 3\).*got -4"):
        pbn.batch_norm(X, training=True, axis=np.int8(-4))


def test_shape_shortcut_only_for_plain_array_types():
    """Validation skips the unknown-size scan only for types whose sizes are Python ints;
    a subclass (a stand-in for torch's fake tensors, with symbolic sizes) keeps it."""
    from portable_bn._compat import has_int_shape

    class Sub(np.ndarray):
        pass

    expected = pbn.batch_norm(X, training=True).output  # registers NumPy's array type
    assert has_int_shape(X)
    assert not has_int_shape(X.view(Sub))
    assert max_error(pbn.batch_norm(X.view(Sub), training=True).output, expected) <= tolerance("float64")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask": np.ones((4, 5))}, TypeError, r"mask must be a boolean array \(True = valid\), got dtype float64"),
        (
            {"mask": np.ones((4, 3, 5), dtype=bool)},
            ValueError,
            r"mask must have the shape of x without its channel axis 1, \(4, 5\), got \(4, 3, 5\)",
        ),
        ({"mask": [[True] * 5] * 4}, TypeError, r"mask must be an array of a supported library.*list"),
        ({"virtual_batch_size": 0}, ValueError, r"virtual_batch_size must be a positive int or None, got 0"),
        ({"virtual_batch_size": True}, ValueError, r"virtual_batch_size must be a positive int or None, got True"),
        ({"virtual_batch_size": 2.0}, ValueError, r"virtual_batch_size must be a positive int or None, got 2.0"),
        (
            {"virtual_batch_size": 2, "axis": 0, "running_mean": _vec(0.0, n=4), "running_var": _vec(n=4)},
            ValueError,
            r"virtual_batch_size splits the batch axis 0",
        ),
        (
            {"virtual_batch_size": 2, "axis": 0, "x": X, "running_mean": None, "running_var": None},
            ValueError,
            r"virtual_batch_size splits the batch axis 0",
        ),
        ({"virtual_batch_size": 3, "x": X[:4, :, :1]}, ValueError, r"got a virtual batch of size \(1, 3, 1\)"),
        ({"sync": "gloo"}, TypeError, r"sync must be a reducer such as .*TorchProcessGroup.*got str"),
    ],
)
def test_masked_ghost_and_sync_arguments_are_checked(kwargs, error, match):
    args = {"x": X, "training": True, "running_mean": _vec(0.0), "running_var": _vec(), **kwargs}
    x = args.pop("x")
    snapshot = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=match):
        pbn.batch_norm(x, **args)
    for key, value in snapshot.items():
        np.testing.assert_array_equal(args[key], value)


class _Reducer:
    size = 2

    def gather(self, array):
        raise AssertionError("no collective may run for an invalid call")

    def sum(self, array):
        raise AssertionError("no collective may run for an invalid call")


def test_ghost_and_sync_cannot_be_combined():
    with pytest.raises(ValueError, match="virtual_batch_size and sync cannot be combined"):
        pbn.batch_norm(X, training=True, virtual_batch_size=2, sync=_Reducer())
    with pytest.raises(ValueError, match="virtual_batch_size and sync cannot be combined"):
        pbn.BatchNorm1d(3, virtual_batch_size=2, sync=_Reducer())


def test_backward_of_virtual_batches_needs_their_statistics():
    result = pbn.batch_norm(X, training=True, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"mean must have shape \(2, 3\) \(virtual batches, channels\).*got \(3,\)"):
        pbn.batch_norm_backward(np.ones_like(X), X, None, result.mean[0], result.invstd, virtual_batch_size=2)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        pbn.batch_norm_backward(np.ones_like(X), X, None, result.mean[0], result.invstd[0], mask=np.ones((4, 5)))


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (np.ones((4, 3), dtype=bool), ValueError, r"mask must have the shape of x without its channel axis"),
        (np.ones((4, 5), dtype=np.int8), TypeError, r"mask must be a boolean array"),
    ],
)
def test_module_call_with_a_bad_mask_changes_nothing(mask, error, match):
    module = pbn.BatchNorm1d(3, xp=np, dtype="float64", sync=_Reducer())
    module.eval()
    module(X)  # eval: no collective
    module.train()
    snapshot = _snapshot(module)
    with pytest.raises(error, match=match):
        module(X, mask=mask)
    _assert_unchanged(module, snapshot)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"virtual_batch_size": 0}, ValueError, r"virtual_batch_size must be a positive int or None, got 0"),
        ({"virtual_batch_size": "4"}, ValueError, r"virtual_batch_size must be a positive int or None, got '4'"),
        ({"sync": object()}, TypeError, r"sync must be a reducer"),
    ],
)
def test_module_constructor_rejects_bad_ghost_and_sync(kwargs, error, match):
    with pytest.raises(error, match=match):
        pbn.BatchNorm2d(3, **kwargs)
