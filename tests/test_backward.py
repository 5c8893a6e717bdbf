"""The reference backward against finite differences of the reference forward,
so that the reference (and with it every backend's backward) can fail."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn.testing import reference_backward, reference_batch_norm, sample


def _numeric_grad(f, array, h=1e-6):
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("shape", "axis"), [((4, 3), 1), ((3, 2, 4), -1), ((2, 3, 2, 2), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_backward_matches_finite_differences(training, shape, axis, affine):
    rng = np.random.default_rng(0)
    x = sample(shape, seed=1, axis=axis)
    channels = shape[axis]
    w = rng.uniform(0.5, 2.0, channels) if affine else None
    b = rng.normal(size=channels) if affine else None
    rm, rv = rng.normal(size=channels), rng.uniform(0.5, 2.0, channels)
    upstream = rng.normal(size=shape)

    def loss():
        return float(np.sum(reference_batch_norm(x, rm, rv, w, b, training=training, axis=axis)["output"] * upstream))

    fwd = reference_batch_norm(x, rm, rv, w, b, training=training, axis=axis)
    gx, gw, gb = reference_backward(upstream, x, w, fwd["mean"], fwd["invstd"], training=training, axis=axis)
    np.testing.assert_allclose(gx, _numeric_grad(loss, x), rtol=1e-6, atol=1e-7)
    if affine:
        np.testing.assert_allclose(gw, _numeric_grad(loss, w), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gb, _numeric_grad(loss, b), rtol=1e-6, atol=1e-7)
    # ours, in float64 on NumPy, against the verified reference
    ours = pbn.batch_norm_backward(upstream, x, w, fwd["mean"], fwd["invstd"], training=training, axis=axis)
    for got, want in zip(ours, (gx, gw, gb), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_backward_of_empty_batch():
    x = np.zeros((0, 3, 2))
    result = pbn.batch_norm(x, training=True)
    gi, gw, gb = pbn.batch_norm_backward(x, x, np.ones(3), result.mean, result.invstd)
    assert gi.shape == (0, 3, 2)
    np.testing.assert_array_equal(gw, np.zeros(3))
    np.testing.assert_array_equal(gb, np.zeros(3))


def test_half_backward_returns_half_input_gradient_and_float32_parameter_gradients():
    x = sample((4, 3, 5), seed=2).astype(np.float16)
    w = np.ones(3, dtype=np.float32)
    result = pbn.batch_norm(x, weight=w, training=True)
    gi, gw, gb = pbn.batch_norm_backward(np.ones_like(x), x, w, result.mean, result.invstd)
    assert (gi.dtype, gw.dtype, gb.dtype) == (np.float16, np.float32, np.float32)
    np.testing.assert_allclose(gb, np.full(3, 20.0))
