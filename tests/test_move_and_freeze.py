"""``bn.to(xp, device=, dtype=)`` moves a module between libraries bit for bit; ``freeze()``
normalizes with the running statistics and updates nothing, whatever the mode."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn._compat import array_namespace, device
from portable_bn.testing import max_error, reference_batch_norm, sample, tolerance

FLOAT_KEYS = ("weight", "bias", "running_mean", "running_var")


def trained(combo, *, frozen=False, **options):
    """A BatchNorm1d of the combination's library after two training steps."""
    module = pbn.BatchNorm1d(3, xp=combo.library, device=combo.device, dtype=combo.param_dtype, **options)
    module.load_state_dict({"weight": [1.5, 0.5, 2.0], "bias": [0.1, -0.2, 0.3]}, strict=False)
    for seed in range(2):
        module(combo.asarray(sample((6, 3, 2), seed=seed) * 3.0 + 1.0))
    return module.freeze() if frozen else module


def host_state(module):
    return {key: np.asarray(pbn.testing._matrix.to_numpy(value)) for key, value in module.state_dict().items()}


def test_round_trip_through_numpy_is_bit_exact(vcombo):
    module = trained(vcombo, frozen=True, eps=1e-3, momentum=0.3, unbiased=False).eval()
    before = host_state(module)
    placed = {key: (array_namespace(value), device(value), value.dtype) for key, value in module.state_dict().items()}
    assert module.to(np) is module
    assert module.xp.__name__ == "array_api_compat.numpy"
    assert all(isinstance(value, np.ndarray) for value in module.state_dict().values())
    assert module.num_batches_tracked.dtype == np.int64 and module.num_batches_tracked.shape == ()
    module.to(vcombo.library, device=vcombo.device)
    after = host_state(module)
    for key, value in module.state_dict().items():
        assert (array_namespace(value), device(value), value.dtype) == placed[key], key
        np.testing.assert_array_equal(after[key], before[key], strict=True)
    assert (module.eps, module.momentum, module.unbiased, module.frozen, module.training) == (
        1e-3,
        0.3,
        False,
        True,
        False,
    )
    x = vcombo.asarray(sample((4, 3, 2), seed=5))
    expected = reference_batch_norm(
        vcombo.to_numpy(x), after["running_mean"], after["running_var"], after["weight"], after["bias"],
        training=False, eps=1e-3,
    )  # fmt: skip
    assert max_error(vcombo.to_numpy(module(x)), expected["output"]) <= tolerance(vcombo.dtype_name)


def installed(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def test_round_trip_through_every_installed_library_is_bit_exact():
    """NumPy -> torch -> JAX -> array-api-strict -> ndonnx -> NumPy, in float32 (what JAX holds
    in its default configuration)."""
    libraries = [installed(name) for name in ("torch", "jax.numpy", "array_api_strict", "ndonnx")]
    libraries = [library for library in libraries if library is not None]
    if not libraries:
        pytest.skip("no second array library installed")
    module = pbn.BatchNorm2d(4, momentum=None, xp=np)
    for seed in range(3):
        module(sample((3, 4, 2, 2), seed=seed).astype(np.float32) * 7.0 - 2.0)
    before = host_state(module)
    for library in [*libraries, np]:
        module.to(library)
        assert array_namespace(module.running_var) is pbn._compat.resolve_namespace(library)
        for key, value in host_state(module).items():
            if key == "num_batches_tracked":  # the library's default integer dtype (JAX: int32 by default)
                assert int(value) == int(before[key])
            else:
                np.testing.assert_array_equal(value, before[key], strict=True, err_msg=f"{key} in {library.__name__}")


def test_dtype_casts_the_floating_arrays_only(vcombo):
    if vcombo.param_dtype_name != "float32" or vcombo.backend in ("jax_x32", "jax_gpu"):
        pytest.skip("float32 to float64 on a library with float64")
    module = trained(vcombo)
    before = host_state(module)
    module.to(dtype="float64")
    for key in FLOAT_KEYS:
        assert getattr(module, key).dtype == vcombo.library.float64
        np.testing.assert_array_equal(host_state(module)[key], before[key].astype(np.float64))
    assert host_state(module)["num_batches_tracked"].dtype == before["num_batches_tracked"].dtype
    x = vcombo.asarray(sample((4, 3, 2), seed=2), dtype=vcombo.library.float64)
    assert module(x).dtype == vcombo.library.float64  # the module now takes float64 input


def test_torch_parameters_stay_leaves_that_require_grad():
    require_backend("torch")
    import torch

    module = pbn.BatchNorm1d(3, xp=np).to(torch, dtype=torch.float64)
    for parameter in (module.weight, module.bias):
        assert parameter.is_leaf and parameter.requires_grad and parameter.dtype == torch.float64
    assert not module.running_mean.requires_grad
    assert module.num_batches_tracked.dtype == torch.int64
    module(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    assert module.weight.grad is not None
    meta = module.to(device="meta")
    assert meta.running_var.device.type == "meta" and meta.weight.requires_grad


def test_gradients_move_and_backward_needs_a_new_call():
    module = pbn.BatchNorm1d(2, xp=np, dtype="float64")
    x = sample((4, 2), seed=0)
    module.backward(np.ones_like(module(x)))
    grad = module.weight_grad.copy()
    strict = pytest.importorskip("array_api_strict")
    module.to(strict)
    assert array_namespace(module.weight_grad) is array_namespace(module.weight)
    np.testing.assert_array_equal(np.asarray(module.weight_grad), grad)
    with pytest.raises(ValueError, match="needs a forward call first"):
        module.backward(strict.ones((4, 2), dtype=strict.float64))


def test_to_before_the_first_call():
    lazy = pbn.BatchNorm1d(2)
    assert lazy.to(dtype="float64") is lazy and lazy.xp is None
    lazy.load_state_dict({"weight": np.ones(2, dtype=np.float32)}, strict=False)
    assert lazy.weight.dtype == np.float64  # the requested dtype applies when the library is known
    created = pbn.BatchNorm1d(2).to(np, dtype="float64")
    assert created.running_var.dtype == np.float64
    with pytest.raises(ValueError, match="device needs xp"):
        pbn.BatchNorm1d(2).to(device="cpu")


def test_bad_targets_change_nothing():
    module = pbn.BatchNorm1d(2, xp=np)
    module(sample((3, 2), seed=0).astype(np.float32))
    attributes = dict(vars(module))
    with pytest.raises(TypeError, match="xp must be an array library"):
        module.to("numpy")
    with pytest.raises(TypeError, match="real floating dtype"):
        module.to(np, dtype="int32")
    with pytest.raises(TypeError, match="is not a dtype of"):
        module.to(dtype="float128x")
    assert vars(module) == attributes


# ------------------------------------------------------------------------------ freeze


def test_frozen_training_is_eval_and_updates_nothing(vcombo):
    module = trained(vcombo)
    reference = trained(vcombo).eval()
    before = host_state(module)
    assert module.freeze() is module and module.frozen and module.training
    x = vcombo.asarray(sample((5, 3, 2), seed=9) * 2.0)
    out = module(x)
    want = reference(x)
    assert max_error(vcombo.to_numpy(out), vcombo.to_numpy(want)) == 0.0
    for key, value in host_state(module).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    module.eval().train()
    assert module.frozen and module.training  # train() and eval() leave frozen alone
    module.unfreeze()
    module(x)
    assert int(host_state(module)["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 1


def test_frozen_gradients_are_those_of_eval(vcombo):
    module = trained(vcombo, frozen=True)
    x = vcombo.asarray(sample((5, 3, 2), seed=3))
    grad = vcombo.asarray(sample((5, 3, 2), seed=4))
    module(x)
    grad_input = module.backward(grad)
    reference = trained(vcombo).eval()
    reference(x)
    want_input = reference.backward(grad)
    assert max_error(vcombo.to_numpy(grad_input), vcombo.to_numpy(want_input)) == 0.0
    assert max_error(vcombo.to_numpy(module.weight_grad), vcombo.to_numpy(reference.weight_grad)) == 0.0
    assert max_error(vcombo.to_numpy(module.bias_grad), vcombo.to_numpy(reference.bias_grad)) == 0.0


def test_frozen_module_with_sync_calls_no_collective():
    class Refusing:
        size = 2

        def gather(self, packed):
            raise AssertionError("a frozen module must not synchronize")

        def sum(self, packed):
            raise AssertionError("a frozen module must not synchronize")

    module = pbn.BatchNorm1d(2, sync=Refusing(), xp=np).freeze()
    module(sample((4, 2), seed=0).astype(np.float32))
    assert int(module.num_batches_tracked) == 0


def test_freezing_needs_running_statistics():
    module = pbn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="cannot be frozen"):
        module.freeze()
    assert module.frozen is False


def test_torch_autograd_under_freeze_matches_torch_eval():
    require_backend("torch")
    import torch

    torch_bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        torch_bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        torch_bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.4]))
        torch_bn.running_var.copy_(torch.tensor([1.3, 0.7, 2.2]))
    torch_bn.eval()
    module = pbn.BatchNorm2d(3, xp=torch, dtype=torch.float64)
    module.load_state_dict(torch_bn.state_dict())
    module.freeze()  # still in training mode
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    x_torch = x.detach().clone().requires_grad_(True)
    (module(x) ** 2).sum().backward()
    (torch_bn(x_torch) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_torch.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.weight.grad, torch_bn.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.bias.grad, torch_bn.bias.grad, rtol=1e-12, atol=1e-12)
    assert int(module.num_batches_tracked) == 0


def test_torchvision_frozen_batch_norm_state_dicts_load():
    """torchvision's FrozenBatchNorm2d keeps weight, bias, running_mean and running_var (no
    counter); its output is eval-mode batch norm with those."""
    require_backend("torch")
    import torch

    try:
        from torchvision.ops import FrozenBatchNorm2d
    except (ImportError, RuntimeError):  # absent, or a build that does not fit this torch
        frozen = None
        generator = torch.Generator().manual_seed(0)
        state = {
            "weight": torch.rand(3, generator=generator, dtype=torch.float64) + 0.5,
            "bias": torch.randn(3, generator=generator, dtype=torch.float64),
            "running_mean": torch.randn(3, generator=generator, dtype=torch.float64),
            "running_var": torch.rand(3, generator=generator, dtype=torch.float64) + 0.5,
        }
    else:
        frozen = FrozenBatchNorm2d(3).double()
        with torch.no_grad():
            for buffer in frozen.buffers():
                buffer.uniform_(0.5, 1.5)
        state = frozen.state_dict()
    assert sorted(state) == ["bias", "running_mean", "running_var", "weight"]
    module = pbn.BatchNorm2d(3, xp=torch, dtype=torch.float64)
    assert module.load_state_dict(state) == ([], [])
    module.freeze()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    want = (
        frozen(x)
        if frozen is not None
        else torch.nn.functional.batch_norm(
            x, state["running_mean"], state["running_var"], state["weight"], state["bias"], training=False
        )
    )
    torch.testing.assert_close(module(x), want, rtol=1e-12, atol=1e-12)
