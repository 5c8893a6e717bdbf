"""Training without autograd: module backward, and the NumPy end-to-end example
reproducing the same network trained by PyTorch autograd."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn.testing import reference_backward, reference_batch_norm, sample

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "numpy_training.py"


def load_example():
    spec = importlib.util.spec_from_file_location("numpy_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("affine", "track"), [(True, True), (False, True), (True, False)])
def test_module_backward_matches_reference(vcombo, training, affine, track):
    from portable_bn.testing import max_error, tolerance

    pdt = vcombo.param_dtype
    bn = pbn.BatchNorm2d(
        3, affine=affine, track_running_stats=track, xp=vcombo.library, device=vcombo.device, dtype=pdt
    ).train(training)
    if affine:
        bn.load_state_dict({"weight": np.array([1.5, 0.5, 2.0]), "bias": np.array([0.1, 0.2, 0.3])}, strict=False)
    x = vcombo.asarray(sample((4, 3, 2, 3), seed=0))
    bn(x)
    weight_used = None if not affine else vcombo.to_numpy(bn.weight)
    if affine:
        bn.weight = bn.weight * 2  # a later update must not change the gradient of the call
    grad = vcombo.asarray(np.random.default_rng(1).normal(size=(4, 3, 2, 3)))
    grad_input = bn.backward(grad)
    batch_stats = training or not track
    xh = vcombo.to_numpy(x)
    fwd = reference_batch_norm(xh, np.zeros(3), np.ones(3), weight_used, training=batch_stats)
    want = reference_backward(vcombo.to_numpy(grad), xh, weight_used, fwd["mean"], fwd["invstd"], training=batch_stats)
    tol = tolerance(vcombo.dtype_name)
    assert max_error(vcombo.to_numpy(grad_input), want[0]) <= tol
    if affine:
        assert max_error(vcombo.to_numpy(bn.weight_grad), want[1]) <= tol
        assert max_error(vcombo.to_numpy(bn.bias_grad), want[2]) <= tol
    else:
        assert bn.weight_grad is None and bn.bias_grad is None


def test_backward_before_forward_is_an_error():
    with pytest.raises(ValueError, match=r"BatchNorm1d.backward needs a forward call first"):
        pbn.BatchNorm1d(3).backward(np.ones((2, 3)))


def test_backward_with_wrong_shape_changes_nothing():
    bn = pbn.BatchNorm1d(3, xp=np, dtype=np.float64)
    bn(sample((4, 3), seed=2))
    bn.backward(np.ones((4, 3)))
    before = dict(vars(bn))
    with pytest.raises(ValueError, match=r"grad_output must have the shape of x \(4, 3\), got \(5, 3\)"):
        bn.backward(np.ones((5, 3)))
    assert all(vars(bn)[k] is v for k, v in before.items())


def test_numpy_example_learns():
    losses, _, _ = load_example().train()
    assert len(losses) == 60
    assert losses[-1] < 0.5 * losses[0]


def test_numpy_training_reproduces_pytorch_autograd():
    """Same init, same data, plain SGD: the losses agree at every step (float64)."""
    require_backend("torch")
    import torch

    example = load_example()
    losses, params, bn = example.train()
    x_all, y_all = example.make_data()
    init = example.init_params()
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    ).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(init["w1"].T))
        net[0].bias.copy_(torch.from_numpy(init["b1"]))
        net[3].weight.copy_(torch.from_numpy(init["w2"].T))
        net[3].bias.copy_(torch.from_numpy(init["b2"]))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch_losses = []
    for x, y in example.batches(x_all, y_all, 60, 32):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-5)
    assert max(abs(a - b) / b for a, b in zip(losses, torch_losses, strict=True)) < 1e-10  # in fact ~ rounding
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(x_all)).numpy()
    np.testing.assert_allclose(example.predict(x_all, params, bn), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.running_var, net[1].running_var.numpy(), rtol=1e-10)
