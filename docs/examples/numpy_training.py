"""Train a small network with batch normalization in pure NumPy.

Linear(5 -> 8) -> BatchNorm1d(8) -> ReLU -> Linear(8 -> 1), mean squared
error, plain SGD. There is no autograd: each layer's backward is written out,
and batch normalization's comes from ``BatchNorm1d.backward``, which uses what
the module kept from its last call and stores ``weight_grad``/``bias_grad``.
"""

from __future__ import annotations

import numpy as np

import portable_bn as pbn


def make_data(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with different offsets and scales; a noisy non-linear target."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + [0.0, 1.0, -2.0, 5.0, 0.0]
    y = np.tanh(x @ rng.normal(size=(5, 1))) + 0.1 * rng.normal(size=(n, 1))
    return x, y


def init_params(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0.0, 0.5, size=(5, 8)),
        "b1": np.zeros(8),
        "w2": rng.normal(0.0, 0.5, size=(8, 1)),
        "b2": np.zeros(1),
    }


def batches(x: np.ndarray, y: np.ndarray, steps: int, size: int):
    for step in range(steps):
        start = (step * size) % len(x)
        yield x[start : start + size], y[start : start + size]


def train(steps: int = 60, lr: float = 0.1, batch_size: int = 32):
    """Return the loss of every step, the trained parameters and the BN module."""
    x_all, y_all = make_data()
    p = init_params()
    bn = pbn.BatchNorm1d(8, xp=np, dtype=np.float64)
    losses = []
    for x, y in batches(x_all, y_all, steps, batch_size):
        # forward
        h = x @ p["w1"] + p["b1"]
        z = bn(h)
        a = np.maximum(z, 0.0)
        out = a @ p["w2"] + p["b2"]
        losses.append(float(np.mean((out - y) ** 2)))
        # backward, layer by layer
        grad_out = 2.0 * (out - y) / out.size
        grad_a = grad_out @ p["w2"].T
        grad_h = bn.backward(grad_a * (z > 0.0))  # batch norm: input gradient; fills bn.weight_grad, bn.bias_grad
        grads = {"w2": a.T @ grad_out, "b2": grad_out.sum(axis=0), "w1": x.T @ grad_h, "b1": grad_h.sum(axis=0)}
        # plain SGD; parameters are rebound, never written in place
        p = {name: value - lr * grads[name] for name, value in p.items()}
        bn.weight = bn.weight - lr * bn.weight_grad
        bn.bias = bn.bias - lr * bn.bias_grad
    return losses, p, bn


def predict(x: np.ndarray, p: dict[str, np.ndarray], bn: pbn.BatchNorm1d) -> np.ndarray:
    """Inference with the running statistics."""
    z = bn.eval()(x @ p["w1"] + p["b1"])
    return np.maximum(z, 0.0) @ p["w2"] + p["b2"]


if __name__ == "__main__":
    losses, params, module = train()
    print(f"loss: step 0 {losses[0]:.4f}, step {len(losses) - 1} {losses[-1]:.4f}")
