"""pbn.fold / fuse_conv / fuse_linear: torch.nn.utils.fusion's results, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn._compat import array_namespace, device
from portable_bn.testing import max_error, sample, tolerance

STATS = {
    "weight": np.array([1.5, -0.5, 2.0, 0.25]),
    "bias": np.array([0.1, -0.2, 0.3, 1.0]),
    "running_mean": np.array([1.0, -1.0, 0.5, 3.0]),
    "running_var": np.array([2.0, 0.5, 1.5, 1e-3]),
    "num_batches_tracked": np.array(5),
}


def _module(vcombo, *, affine=True, eps=1e-5, stats=STATS, cls=pbn.BatchNorm1d):
    bn = cls(4, eps=eps, affine=affine, xp=vcombo.library, device=vcombo.device, dtype=vcombo.param_dtype)
    bn.load_state_dict(stats, strict=False)
    return bn.eval()


def _reference(stats, eps, affine=True, dtype="float64"):
    """scale and shift from the module's vectors as the module holds them (rounded to its dtype)."""
    held = {key: np.asarray(value, dtype=dtype).astype(np.float64) for key, value in stats.items()}
    weight = held["weight"] if affine else np.ones(4)
    bias = held["bias"] if affine else np.zeros(4)
    scale = weight / np.sqrt(held["running_var"] + eps)
    return scale, bias - held["running_mean"] * scale


@pytest.mark.parametrize("affine", [True, False])
def test_fold_against_a_float64_reference(vcombo, affine):
    bn = _module(vcombo, affine=affine)
    scale, shift = pbn.fold(bn)
    for value in (scale, shift):
        assert array_namespace(value) is array_namespace(bn.running_var)
        assert value.dtype == bn.running_var.dtype and device(value) == device(bn.running_var)
        assert tuple(value.shape) == (4,)
    expected_scale, expected_shift = _reference(STATS, bn.eps, affine, vcombo.param_dtype_name)
    assert max_error(vcombo.to_numpy(scale), expected_scale) <= tolerance(vcombo.param_dtype_name)
    assert max_error(vcombo.to_numpy(shift), expected_shift) <= tolerance(vcombo.param_dtype_name)


def test_fold_reproduces_the_eval_output(vcombo):
    bn = _module(vcombo, cls=pbn.BatchNorm2d)
    x = sample((3, 4, 2, 2), seed=1)
    scale, shift = (vcombo.to_numpy(v) for v in pbn.fold(bn))
    out = vcombo.to_numpy(bn(vcombo.asarray(x)))
    host_x = vcombo.to_numpy(vcombo.asarray(x))
    assert max_error(out, host_x * scale[:, None, None] + shift[:, None, None]) <= tolerance(vcombo.dtype_name)


def test_fuse_linear_against_a_float64_reference(vcombo):
    bn = _module(vcombo)
    weight = vcombo.asarray(sample((4, 3), seed=2))
    bias = vcombo.asarray(sample((1, 4), seed=3)[0])
    host_w, host_b = vcombo.to_numpy(weight), vcombo.to_numpy(bias)
    scale, shift = _reference(STATS, bn.eps, dtype=vcombo.param_dtype_name)
    for b, host in ((bias, host_b), (None, np.zeros(4))):
        fused_w, fused_b = pbn.fuse_linear(weight, b, bn)
        for value in (fused_w, fused_b):
            assert array_namespace(value) is array_namespace(weight) and device(value) == device(weight)
            assert value.dtype == weight.dtype  # bias None: the weight's dtype, as torch
        assert tuple(fused_b.shape) == (4,)
        assert max_error(vcombo.to_numpy(fused_w), host_w * scale[:, None]) <= tolerance(vcombo.dtype_name)
        assert max_error(vcombo.to_numpy(fused_b), host * scale + shift) <= tolerance(vcombo.dtype_name)


def test_fuse_conv_against_a_float64_reference(vcombo):
    bn = _module(vcombo, cls=pbn.BatchNorm2d)
    weight = vcombo.asarray(sample((4, 2, 3, 3), seed=4))
    fused_w, fused_b = pbn.fuse_conv(weight, None, bn)
    scale, shift = _reference(STATS, bn.eps, dtype=vcombo.param_dtype_name)
    expected_w = vcombo.to_numpy(weight) * scale[:, None, None, None]
    assert max_error(vcombo.to_numpy(fused_w), expected_w) <= tolerance(vcombo.dtype_name)
    assert max_error(vcombo.to_numpy(fused_b), shift) <= tolerance(vcombo.dtype_name)
    assert fused_w.dtype == weight.dtype and fused_b.dtype == weight.dtype


def test_zero_variance_without_eps_is_a_clear_error(vcombo):
    """eps=0 and a zero running variance: a ValueError naming the channel where the values
    can be read; Dask (which would compute) gets the infinite scale of the division."""
    stats = {**STATS, "running_var": np.array([2.0, 0.0, 1.5, 1.0])}
    bn = _module(vcombo, eps=0.0, stats=stats)
    weight = vcombo.asarray(sample((4, 3), seed=5))
    calls = [
        lambda: pbn.fold(bn),
        lambda: pbn.fuse_linear(weight, None, bn),
        lambda: pbn.fuse_conv(vcombo.asarray(sample((4, 1, 2), seed=6)), None, bn),
    ]
    if vcombo.lazy:
        import dask

        def scheduler(*args, **kwargs):
            raise AssertionError("portable_bn triggered a Dask compute")

        with dask.config.set(scheduler=scheduler):  # nothing computes inside our calls
            scale, _ = pbn.fold(bn)
            for call in calls[1:]:
                call()
        with np.errstate(divide="ignore"):  # computed here, in the test
            assert np.isinf(vcombo.to_numpy(scale)[1])
        return
    before = vcombo.to_numpy(bn.running_var)
    for call in calls:
        with pytest.raises(ValueError, match=r"bn\.running_var \+ bn\.eps is 0 or negative in channel\(s\) \[1\]"):
            call()
    np.testing.assert_array_equal(vcombo.to_numpy(bn.running_var), before)


def test_value_less_devices_fold_without_a_check(combo):
    if combo.values:
        pytest.skip("value-less devices only (torch 'meta')")
    bn = pbn.BatchNorm1d(4, eps=0.0, xp=combo.library, device=combo.device, dtype=combo.param_dtype)
    scale, shift = pbn.fold(bn)
    assert tuple(scale.shape) == (4,) and device(shift) == device(bn.running_var)


def test_inside_jax_jit_the_check_is_left_out():
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    def scale_of(running_var):
        bn = pbn.BatchNorm1d(2, eps=0.0, xp=jnp)
        bn.running_var = running_var
        return pbn.fold(bn)[0]

    scale = jax.jit(scale_of)(jnp.asarray([4.0, 0.0], dtype=jnp.float32))
    assert float(scale[0]) == 0.5 and np.isinf(float(scale[1]))


# ------------------------------------------------------------------- PyTorch's functions


def _torch_bn(torch, cls, channels, *, affine=True, dtype=None, seed=0):
    torch.manual_seed(seed)
    bn = cls(channels, affine=affine, dtype=dtype or torch.float64)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(-2.0, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-3.0, 3.0)
        bn.running_var.uniform_(0.01, 4.0)
    return bn.eval()


def _ours(torch_bn, cls, xp):
    dtype = str(torch_bn.running_var.dtype).removeprefix("torch.")
    bn = cls(torch_bn.num_features, eps=torch_bn.eps, affine=torch_bn.affine, xp=xp, dtype=dtype)
    bn.load_state_dict(torch_bn.state_dict())
    return bn.eval()


CONVS = [
    # (conv class, BN class, spatial dims, groups)
    ("Conv1d", "BatchNorm1d", 1, 1),
    ("Conv2d", "BatchNorm2d", 2, 1),
    ("Conv3d", "BatchNorm3d", 3, 1),
    ("Conv2d", "BatchNorm2d", 2, 2),
    ("ConvTranspose1d", "BatchNorm1d", 1, 1),
    ("ConvTranspose2d", "BatchNorm2d", 2, 1),
    ("ConvTranspose3d", "BatchNorm3d", 3, 1),
]


@pytest.mark.parametrize(("conv_name", "bn_name", "dims", "groups"), CONVS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fuse_conv_equals_torch(conv_name, bn_name, dims, groups, with_bias):
    require_backend("torch")
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    transpose = "Transpose" in conv_name
    torch.manual_seed(1)
    conv = getattr(torch.nn, conv_name)(4, 6, 3, groups=groups, bias=with_bias, dtype=torch.float64).eval()
    torch_bn = _torch_bn(torch, getattr(torch.nn, bn_name), 6)
    bn = _ours(torch_bn, getattr(pbn, bn_name), torch)
    expected = fuse_conv_bn_weights(
        conv.weight, conv.bias, torch_bn.running_mean, torch_bn.running_var, torch_bn.eps,
        torch_bn.weight, torch_bn.bias, transpose,
    )  # fmt: skip
    got = pbn.fuse_conv(conv.weight, conv.bias, bn, transpose=transpose, groups=groups)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e.detach())  # the same operations: the same bits

    # and the fused convolution computes conv -> BN in eval mode
    x = torch.as_tensor(sample((2, 4, *(5,) * dims), seed=2))
    with torch.no_grad():
        reference = torch_bn(conv(x))
        fused = getattr(torch.nn.functional, conv_name.lower().replace("transpose", "_transpose"))(
            x, got[0], got[1], groups=groups
        )
    assert max_error(fused.numpy(), reference.numpy()) <= tolerance("float64")


def test_grouped_transposed_convolution_fuses():
    """torch's fuse_conv_bn_weights cannot fold a grouped transposed convolution (its weight
    holds C_out / groups channels per group); groups= does."""
    require_backend("torch")
    import torch

    torch.manual_seed(3)
    conv = torch.nn.ConvTranspose2d(4, 6, 3, groups=2, dtype=torch.float64).eval()
    torch_bn = _torch_bn(torch, torch.nn.BatchNorm2d, 6)
    bn = _ours(torch_bn, pbn.BatchNorm2d, torch)
    with pytest.raises(ValueError, match=r"weight\.shape\[1\] \* groups = 3 \* 1"):
        pbn.fuse_conv(conv.weight, conv.bias, bn, transpose=True)
    weight, bias = pbn.fuse_conv(conv.weight, conv.bias, bn, transpose=True, groups=2)
    x = torch.as_tensor(sample((2, 4, 5, 5), seed=4))
    with torch.no_grad():
        reference = torch_bn(conv(x))
        fused = torch.nn.functional.conv_transpose2d(x, weight, bias, groups=2)
    assert max_error(fused.numpy(), reference.numpy()) <= tolerance("float64")


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fuse_linear_equals_torch(with_bias, affine):
    require_backend("torch")
    import torch
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    torch.manual_seed(5)
    linear = torch.nn.Linear(3, 4, bias=with_bias, dtype=torch.float64).eval()
    torch_bn = _torch_bn(torch, torch.nn.BatchNorm1d, 4, affine=affine)
    bn = _ours(torch_bn, pbn.BatchNorm1d, torch)
    ones, zeros = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    expected = fuse_linear_bn_weights(
        linear.weight, linear.bias, torch_bn.running_mean, torch_bn.running_var, torch_bn.eps,
        torch_bn.weight if affine else ones, torch_bn.bias if affine else zeros,
    )  # fmt: skip
    got = pbn.fuse_linear(linear.weight, linear.bias, bn)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e.detach())  # the same operations: the same bits
    x = torch.as_tensor(sample((5, 3), seed=6))
    with torch.no_grad():
        reference = torch_bn(linear(x))
        fused = torch.nn.functional.linear(x, got[0], got[1])
    assert max_error(fused.numpy(), reference.numpy()) <= tolerance("float64")


@pytest.mark.parametrize("weight_dtype", ["float16", "bfloat16", "float32", "float64"])
def test_mixed_dtypes_follow_torch(weight_dtype):
    """A half-precision layer before a float32 module: torch's dtype handling, bit for bit."""
    require_backend("torch")
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

    dtype = getattr(torch, weight_dtype)
    torch_bn = _torch_bn(torch, torch.nn.BatchNorm2d, 4, dtype=torch.float32)
    bn = _ours(torch_bn, pbn.BatchNorm2d, torch)
    args = (torch_bn.running_mean, torch_bn.running_var, torch_bn.eps, torch_bn.weight, torch_bn.bias)
    conv_w = torch.as_tensor(sample((4, 2, 3, 3), seed=7)).to(dtype)
    conv_b = torch.as_tensor(sample((1, 4), seed=8)[0]).to(torch.float32)
    linear_w = torch.as_tensor(sample((4, 3), seed=9)).to(dtype)
    cases = [
        (pbn.fuse_conv(conv_w, conv_b, bn), fuse_conv_bn_weights(conv_w, conv_b, *args)),
        (pbn.fuse_conv(conv_w, None, bn), fuse_conv_bn_weights(conv_w, None, *args)),
        (pbn.fuse_linear(linear_w, conv_b, bn), fuse_linear_bn_weights(linear_w, conv_b, *args)),
        (pbn.fuse_linear(linear_w, None, bn), fuse_linear_bn_weights(linear_w, None, *args)),
    ]
    for got, expected in cases:
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == e.dtype
            assert torch.equal(g, e.detach())


def test_fold_follows_the_module_and_torchs_scale():
    """fold's scale is torch's ``weight * rsqrt(running_var + eps)``; gradients reach the module."""
    require_backend("torch")
    import torch

    torch_bn = _torch_bn(torch, torch.nn.BatchNorm1d, 4, dtype=torch.float32)
    bn = _ours(torch_bn, pbn.BatchNorm1d, torch)
    scale, shift = pbn.fold(bn)
    with torch.no_grad():
        expected = torch_bn.weight * torch.rsqrt(torch_bn.running_var + torch_bn.eps)
    assert torch.equal(scale.detach(), expected)
    (scale.sum() + shift.sum()).backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None


def test_a_numpy_module_fuses_into_torch_weights():
    require_backend("torch")
    import torch

    torch_bn = _torch_bn(torch, torch.nn.BatchNorm1d, 4)
    weight = torch.as_tensor(sample((4, 3), seed=10))
    from_numpy = pbn.fuse_linear(weight, None, _ours(torch_bn, pbn.BatchNorm1d, np))
    from_torch = pbn.fuse_linear(weight, None, _ours(torch_bn, pbn.BatchNorm1d, torch))
    for a, b in zip(from_numpy, from_torch, strict=True):
        assert isinstance(a, torch.Tensor) and torch.equal(a, b.detach())


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_clear_errors():
    bn = pbn.BatchNorm1d(4, xp=np)
    w = np.ones((4, 3))
    with pytest.raises(TypeError, match=r"bn must be a portable_bn BatchNorm1d.*got dict"):
        pbn.fold({})
    with pytest.raises(ValueError, match="track_running_stats=False"):
        pbn.fold(pbn.BatchNorm1d(4, track_running_stats=False, xp=np))
    with pytest.raises(ValueError, match="holds no running statistics yet"):
        pbn.fold(pbn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"out_features=5 .* num_features=4"):
        pbn.fuse_linear(np.ones((5, 3)), None, bn)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        pbn.fuse_linear(np.ones((4, 3, 1)), None, bn)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        pbn.fuse_linear(w, np.ones(3), bn)
    with pytest.raises(TypeError, match="weight must have a real floating dtype"):
        pbn.fuse_linear(np.ones((4, 3), dtype=np.int64), None, bn)
    with pytest.raises(TypeError, match="weight must be an array"):
        pbn.fuse_linear([[1.0]], None, bn)
    with pytest.raises(ValueError, match=r"6 output channels \(weight\.shape\[0\] = 6\) but bn has num_features=4"):
        pbn.fuse_conv(np.ones((6, 4, 3)), None, bn)
    with pytest.raises(ValueError, match="transpose=True"):
        pbn.fuse_conv(np.ones((6, 4, 3)), None, bn, transpose=False)
    with pytest.raises(ValueError, match=r"at least 3 dimensions.*fuse_linear"):
        pbn.fuse_conv(w, None, bn)
    with pytest.raises(ValueError, match=r"groups=3 must divide weight\.shape\[0\]=4"):
        pbn.fuse_conv(np.ones((4, 2, 3)), None, bn, groups=3)
    with pytest.raises(TypeError, match="transpose must be True or False"):
        pbn.fuse_conv(np.ones((4, 2, 3)), None, bn, transpose=1)
    with pytest.raises(ValueError, match="groups must be >= 1"):
        pbn.fuse_conv(np.ones((4, 2, 3)), None, bn, groups=0)


def test_bias_of_another_library_is_refused():
    torch = pytest.importorskip("torch")
    bn = pbn.BatchNorm1d(4, xp=np)
    with pytest.raises(TypeError, match=r"bias must be an array of weight's library \(numpy\), got torch"):
        pbn.fuse_linear(np.ones((4, 3)), torch.ones(4), bn)


def test_arguments_are_not_changed():
    bn = _module_numpy()
    weight, bias = sample((4, 3), seed=11), sample((1, 4), seed=12)[0]
    copies = (weight.copy(), bias.copy(), {k: v.copy() for k, v in bn.state_dict().items()})
    pbn.fuse_linear(weight, bias, bn)
    pbn.fuse_conv(weight[:, :, None], bias, bn)
    pbn.fold(bn)
    np.testing.assert_array_equal(weight, copies[0])
    np.testing.assert_array_equal(bias, copies[1])
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, copies[2][key])
    assert bn.training is False


def _module_numpy():
    bn = pbn.BatchNorm1d(4, xp=np, dtype=np.float64)
    bn.load_state_dict(STATS)
    return bn.eval()
