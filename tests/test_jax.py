"""JAX: the functional API under jax.jit and jax.grad."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn._check import sample
from portable_bn._reference import reference_backward, reference_batch_norm


@pytest.fixture
def jnp():
    require_backend("jax")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy

    return jax.numpy


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_jit_matches_reference(jnp, training, axis):
    import jax

    host = sample((4, 3, 5) if axis == 1 else (4, 5, 3), seed=0, axis=axis)
    rm, rv, w, b = (np.linspace(0.5, 1.5, 3) + i for i in range(4))

    @jax.jit
    def step(x, rm, rv, w, b):
        return pbn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)

    result = step(*(jnp.asarray(a) for a in (host, rm, rv, w, b)))
    expected = reference_batch_norm(host, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
    for key in ("output", "running_mean", "running_var", "mean", "invstd"):
        np.testing.assert_allclose(np.asarray(getattr(result, key)), expected[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_grad_through_batch_norm_matches_analytic_backward(jnp):
    import jax

    host = sample((4, 3, 5), seed=1)
    w, b = np.array([1.5, 0.5, 2.0]), np.array([0.1, -0.2, 0.3])
    upstream = np.random.default_rng(2).normal(size=host.shape)

    def loss(x, w, b):
        return jnp.sum(pbn.batch_norm(x, weight=w, bias=b, training=True).output * upstream)

    gx, gw, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(host), jnp.asarray(w), jnp.asarray(b))
    fwd = reference_batch_norm(host, weight=w, bias=b, training=True)
    want = reference_backward(upstream, host, w, fwd["mean"], fwd["invstd"], training=True)
    for got, expected in zip((gx, gw, gb), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)


def test_running_statistics_carry_no_gradient(jnp):
    import jax

    host = sample((4, 3), seed=3)

    def running_sum(x):
        result = pbn.batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True)
        return jnp.sum(result.running_mean) + jnp.sum(result.running_var)

    np.testing.assert_array_equal(np.asarray(jax.grad(running_sum)(jnp.asarray(host))), np.zeros(host.shape))


@pytest.mark.parametrize(("offset", "spread", "constant"), [(0.0, 1e20, False), (1e4, 0.1, False), (1e15, 1.0, True)])
def test_jit_takes_the_prescaling_branch_on_hard_data(jnp, offset, spread, constant):
    """Under jit the no-prescaling shortcut is a lax.cond: hard data must take the other branch."""
    import jax

    host = offset + spread * np.random.default_rng(5).normal(size=(8, 3, 4))
    if constant:
        host[:, 1] = offset
    x = jnp.asarray(host, dtype=jnp.float32)
    bias = jnp.asarray([0.5, -1.0, 2.0], dtype=jnp.float32)
    out = jax.jit(lambda x: pbn.batch_norm(x, bias=bias, training=True).output)(x)
    expected = reference_batch_norm(np.asarray(x, dtype=np.float64), bias=np.asarray(bias), training=True)["output"]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5)
    if constant:
        np.testing.assert_array_equal(np.asarray(out)[:, 1], np.float32(-1.0))
