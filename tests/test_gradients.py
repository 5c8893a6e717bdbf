"""Backward accuracy in float32 against PyTorch's own float32 backward, and
JAX transformations (vmap) through the functional API."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn._accuracy import GRADIENT_DATA, gradient_case
from portable_bn.testing import max_error, reference_backward, reference_batch_norm

# ordinary, large offset, large offset and large n, moderate offset: the data of the gradient
# table that ``python -m portable_bn accuracy`` prints (docs: accuracy)
HARD_DATA = GRADIENT_DATA


@pytest.mark.parametrize(("shape", "offset", "spread"), HARD_DATA)
def test_float32_backward_is_as_close_to_float64_as_pytorchs(shape, offset, spread):
    require_backend("torch")
    import torch

    x, grad, weight, truth = gradient_case(shape, offset, spread)
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(weight).requires_grad_()
    bt = torch.zeros(shape[1], requires_grad=True)
    torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True).backward(torch.from_numpy(grad))
    theirs = [max_error(t.grad.numpy(), want) for t, want in zip((xt, wt, bt), truth, strict=True)]
    for lib, to_host in ((np, np.asarray), (torch, lambda t: t.numpy())):
        xs, gs, ws = (lib.asarray(a) for a in (x, grad, weight))
        result = pbn.batch_norm(xs, weight=ws, training=True)
        ours = pbn.batch_norm_backward(gs, xs, ws, result.mean, result.invstd)
        for name, got, want, limit in zip(("input", "weight", "bias"), ours, truth, theirs, strict=True):
            error = max_error(to_host(got), want)
            assert error <= 1.5 * limit + 2e-7, f"{lib.__name__} grad_{name}: {error:.2e} vs torch {limit:.2e}"


def test_float16_backward_accumulates_in_float32():
    """Sums of 2**16 float16 gradients would overflow/round away in float16."""
    rng = np.random.default_rng(1)
    x = (100.0 + 10.0 * rng.normal(size=(64, 2, 32, 32))).astype(np.float16)
    grad = rng.normal(size=x.shape).astype(np.float16)
    weight = np.ones(2, dtype=np.float32)
    result = pbn.batch_norm(x, weight=weight, training=True)
    gi, gw, gb = pbn.batch_norm_backward(grad, x, weight, result.mean, result.invstd)
    xh, gh = x.astype(np.float64), grad.astype(np.float64)
    fwd = reference_batch_norm(xh, weight=np.ones(2), training=True)
    want = reference_backward(gh, xh, np.ones(2), fwd["mean"], fwd["invstd"], training=True)
    assert np.isfinite(gi).all()
    assert max_error(gi, want[0]) <= 2e-3
    assert max_error(gw, want[1]) <= 1e-5 * np.abs(want[1]).max() + 1e-3
    assert max_error(gb, want[2]) <= 1e-5 * np.abs(want[2]).max() + 1e-3


def test_jax_vmap_over_independent_batches():
    require_backend("jax")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    host = np.random.default_rng(2).normal(3.0, 2.0, size=(5, 4, 3, 6))  # 5 independent (N, C, L) batches
    weight = np.array([1.5, 0.5, 2.0])

    def normalize(x):
        result = pbn.batch_norm(x, jnp.zeros(3), jnp.ones(3), jnp.asarray(weight), training=True)
        return result.output, result.running_var

    outputs, running_vars = jax.jit(jax.vmap(normalize))(jnp.asarray(host))
    for i in range(host.shape[0]):
        expected = reference_batch_norm(host[i], np.zeros(3), np.ones(3), weight, training=True)
        np.testing.assert_allclose(np.asarray(outputs[i]), expected["output"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(running_vars[i]), expected["running_var"], rtol=1e-12)

    def loss(x):
        return jnp.sum(normalize(x)[0] ** 3)

    grads = jax.vmap(jax.grad(loss))(jnp.asarray(host))
    for i in range(host.shape[0]):
        fwd = reference_batch_norm(host[i], weight=weight, training=True)
        upstream = 3.0 * fwd["output"] ** 2
        want = reference_backward(upstream, host[i], weight, fwd["mean"], fwd["invstd"], training=True)[0]
        np.testing.assert_allclose(np.asarray(grads[i]), want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_through_a_module(training):
    require_backend("torch")
    import torch

    bn = pbn.BatchNorm2d(3, xp=torch, dtype=torch.float64).train(training)
    bn.load_state_dict(
        {"running_mean": np.array([0.1, 0.2, 0.3]), "running_var": np.array([1.5, 0.5, 2.0])}, strict=False
    )
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def call(x, weight, bias):
        bn.weight, bn.bias = weight, bias
        return bn(x)

    inputs = (x, bn.weight, bn.bias)
    assert torch.autograd.gradcheck(call, inputs, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(call, inputs, eps=1e-6, atol=1e-7)


def test_backward_arguments_on_another_device():
    xp = pytest.importorskip("array_api_strict")
    x = xp.asarray(np.ones((4, 3)), device=xp.Device("device1"))
    stats = xp.ones(3, dtype=xp.float64)  # default device
    with pytest.raises(ValueError, match=r"mean is on device .*CPU_DEVICE.* but x is on device .*device1"):
        pbn.batch_norm_backward(x, x, None, stats, stats)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"grad_output is on device meta but x is on device cpu"):
        pbn.batch_norm_backward(torch.ones(4, 3, device="meta"), torch.ones(4, 3), None, torch.ones(3), torch.ones(3))
