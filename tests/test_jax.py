"""JAX: the functional API under jax.jit and jax.grad."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths, require_backend
from portable_bn._recipe import make_recipe
from portable_bn.testing import (
    dtype_error,
    hard_data,
    max_error,
    reference_backward,
    reference_batch_norm,
    sample,
    tolerance,
)


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


ROUTE_DATA = [  # (offset, spread, constant channel, route)
    (0.5, 1.0, False, "quick"),  # the sampled shift is within a standard deviation of every mean
    (1e4, 0.1, False, "quick"),  # an off-centre sample gives a shift close to the mean
    (0.0, 1e20, False, "prescaled"),  # float32 squares overflow
    (1e15, 1.0, True, "prescaled"),  # a numerically constant channel
]


def _route(host, dtype):
    """The route NumPy's eager branches take on ``host`` in ``dtype``: the JAX CPU route takes
    the same decisions (the same verdicts, by lax.cond)."""
    from portable_bn._backends import numpy as numpy_backend

    taken = []
    original = numpy_backend.NumpyPrimitives.branch

    def spy(self, unsafe, careful, quick):
        taken.append(bool(unsafe))
        return original(self, unsafe, careful, quick)

    numpy_backend.NumpyPrimitives.branch = spy
    try:
        pbn.batch_norm(np.asarray(host, dtype=dtype), training=True)
    finally:
        numpy_backend.NumpyPrimitives.branch = original
    return {(False,): "quick", (True, False): "about the mean", (True, True): "prescaled"}[tuple(taken)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("offset", "spread", "constant", "route"), ROUTE_DATA)
def test_jit_routes_on_ordinary_and_hard_data(jnp, dtype, offset, spread, constant, route):
    """Under jit the training statistics take their route by lax.cond: one pass about a
    sampled shift, else about the mean found, else prescaled. Each equals the float64 reference
    and the pure primitives' route (prescaled), and a constant channel gives exactly the bias."""
    import jax

    host = offset + spread * np.random.default_rng(5).normal(size=(8, 3, 4))
    if constant:
        host[:, 1] = offset
    if dtype == "float64" and spread == 1e20:
        route = "quick"  # float64 squares of 1e20 fit
    assert _route(host, dtype) == route
    x = jnp.asarray(host, dtype=getattr(jnp, dtype))
    rm, rv = jnp.asarray([0.0, 1.0, -1.0], dtype=x.dtype), jnp.asarray([1.0, 2.0, 0.5], dtype=x.dtype)
    w, b = jnp.asarray([1.5, 0.5, 2.0], dtype=x.dtype), jnp.asarray([0.5, -1.0, 2.0], dtype=x.dtype)

    def train(*args):
        return jax.jit(lambda x, rm, rv, w, b: pbn.batch_norm(x, rm, rv, w, b, training=True))(*args)

    fast, pure = both_paths(train, x, rm, rv, w, b)
    expected = reference_batch_norm(*(np.asarray(a, dtype=np.float64) for a in (x, rm, rv, w, b)), training=True)
    for result in (fast, pure):
        for key in ("output", "mean", "invstd", "running_mean", "running_var"):
            error = dtype_error(np.asarray(getattr(result, key)), expected[key], dtype)
            assert error <= tolerance(dtype), key
    if constant:
        np.testing.assert_array_equal(np.asarray(fast.output)[:, 1], np.asarray(b)[1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("offset", "uncentred"), [(0.5, True), (1e3, False)])
def test_jit_backward_sums_on_ordinary_and_offset_data(jnp, dtype, training, offset, uncentred):
    """Under jit the backward's sum(g * xhat) is (sum(g * x) - mean * sum(g)) * invstd where every
    |mean| * invstd <= 1, else the centred sum (a lax.cond): both equal the reference and the
    pure primitives' result."""
    import jax

    rng = np.random.default_rng(9)
    host = offset + rng.normal(size=(8, 3, 4))
    x = jnp.asarray(host, dtype=getattr(jnp, dtype))
    grad = jnp.asarray(rng.normal(size=host.shape), dtype=x.dtype)
    weight = jnp.asarray([1.5, 0.5, 2.0], dtype=x.dtype)
    forward = pbn.batch_norm(x, training=True)
    mean, invstd = forward.mean, forward.invstd
    assert bool(jnp.all(jnp.abs(mean * invstd) <= 1.0)) == uncentred

    def backward(*args):
        return jax.jit(lambda *a: pbn.batch_norm_backward(*a, training=training))(*args)

    fast, pure = both_paths(backward, grad, x, weight, mean, invstd)
    host_args = [np.asarray(a, dtype=np.float64) for a in (grad, x, weight, mean, invstd)]
    want = reference_backward(*host_args, training=training)
    for got, slow, expected in zip(fast, pure, want, strict=True):
        assert got.dtype == x.dtype
        assert max_error(np.asarray(got), expected) <= tolerance(dtype)
        assert max_error(np.asarray(got), np.asarray(slow)) <= tolerance(dtype)


@pytest.mark.parametrize(
    ("shape", "dtype", "route"),
    [
        ((256, 512, 7, 7), "float32", "batch first"),  # rows of 49: too short
        ((256, 512, 7, 7), "float64", "batch first"),
        ((8, 32, 128, 128), "float32", "batch first"),  # 256 rows: too few
        ((64, 256, 14, 14), "float32", "variadic"),
        ((64, 256, 14, 14), "float64", "three reductions"),
        ((32, 64, 56, 56), "float32", "variadic"),
        ((2**20, 1), "float32", "variadic"),  # one element per row: nothing to reduce first
        ((2**20 - 1, 1), "float32", "three reductions"),
        ((4, 8, 7, 7), "float32", "three reductions"),  # short rows, but a small call
        ((2, 4, 3, 3), "float64", "three reductions"),
    ],
)
def test_gpu_first_pass_by_shape_and_dtype(jnp, monkeypatch, shape, dtype, route):
    """The GPU reductions' order (only shapes and dtypes decide it)."""
    import jax

    from portable_bn._backends import jax as jax_backend

    taken = []
    monkeypatch.setattr(jax_backend, "_batch_first", lambda *a: taken.append("batch first") or (None,) * 3)
    monkeypatch.setattr(jax_backend, "variadic_first_pass", lambda *a: taken.append("variadic") or (None,) * 3)
    x = jax.ShapeDtypeStruct(shape, getattr(jnp, dtype))
    jax.eval_shape(lambda x: jax_backend.gpu_first_pass(jnp, x, make_recipe(shape, 1), 2.0**-30) and 0, x)
    assert taken == ([] if route == "three reductions" else [route])


def test_batch_first_needs_axes_before_the_channel(jnp):
    from portable_bn._backends import jax as jax_backend

    assert not jax_backend.batch_first_layout((8, 32, 128, 128), make_recipe((8, 32, 128, 128), 0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["1e6+N", "3e37 N", "-3e38+1e37N", "constant ch.", "nan"])
def test_gpu_reductions_equal_the_pure_ones(jnp, dtype, name):
    """The GPU orders (one variadic lax.reduce; batch axes first) give the pure reductions'
    minima and maxima exactly and their sums to rounding, under jit and vmap, on ordinary,
    huge, constant and NaN data; and the statistics' gradients through the variadic pass are
    the pure ones (the shift does not enter them to first order)."""
    import jax

    from portable_bn import _agnostic
    from portable_bn._backends import jax as jax_backend
    from portable_bn._primitives import Primitives

    host = hard_data("N(0,1)" if name == "nan" else name, (8, 3, 4, 4), seed=6)
    if name == "nan":
        host[1, 1, 2, 3] = np.nan
    with np.errstate(over="ignore"):
        x = jnp.asarray(host.astype(dtype))
    recipe = make_recipe(x.shape, 1)
    shrink = 2.0**-9  # a power of two with 2**9 >= the 128 values per channel
    pure = Primitives(jnp)
    want = jax.jit(lambda x: pure.first_pass(x, recipe, shrink))(x)
    routes = {
        "variadic": lambda x: jax_backend.variadic_first_pass(jnp, x, recipe, shrink),
        "batch first": lambda x: jax_backend._batch_first(jnp, (x, x, x * shrink), (jnp.min, jnp.max, jnp.sum), recipe),
    }
    for route, first in routes.items():
        got = jax.jit(first)(x)
        for what, expected, value in zip(("min", "max", "sum"), want, got, strict=True):
            assert value.dtype == expected.dtype == x.dtype
            if what == "sum":  # summed in another order: the last bits may differ
                np.testing.assert_allclose(np.asarray(value), np.asarray(expected), rtol=tolerance(dtype), atol=0)
            else:
                np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=f"{route} {what}")
        batched = jax.vmap(first)(jnp.stack([x, -x]))
        np.testing.assert_array_equal(np.asarray(batched[1][0]), np.asarray(want[1]))  # max of x
        np.testing.assert_array_equal(np.asarray(batched[0][1]), np.asarray(-want[1]))  # min of -x
    centred = x - jnp.reshape(want[2] * 2.0**9 / recipe.count_per_channel, recipe.param_shape)
    got_sums = jax.jit(lambda c: jax_backend._batch_first(jnp, (c, c * c), (jnp.sum, jnp.sum), recipe))(centred)
    with np.errstate(invalid="ignore", over="ignore"):
        for array, value in zip((centred, centred * centred), got_sums, strict=True):
            terms = np.asarray(array, dtype=np.float64)
            total, size = np.sum(terms, axis=(0, 2, 3)), np.sum(np.abs(terms), axis=(0, 2, 3))
            np.testing.assert_allclose(np.asarray(value), total, rtol=0, atol=tolerance(dtype) * np.nanmax(size))
    if name in ("1e6+N", "constant ch."):

        class Variadic(Primitives):
            def first_pass(self, x, recipe, shrink):
                return jax_backend.variadic_first_pass(jnp, x, recipe, shrink)

        def invstd_and_mean(x, prims):
            sums = _agnostic.prescaled_sums(prims, x, recipe)
            moments = _agnostic.moments_from_sums(jnp, sums, recipe.count_per_channel)
            stats = _agnostic.statistics(jnp, moments, 1e-5, dtype=x.dtype)
            return jnp.sum(stats.invstd) + jnp.sum(stats.mean * jnp.arange(3.0))

        want_grad = jax.grad(invstd_and_mean)(x, pure)
        assert float(jnp.max(jnp.abs(want_grad))) > 0
        got_grad = jax.grad(invstd_and_mean)(x, Variadic(jnp))
        assert max_error(np.asarray(got_grad), np.asarray(want_grad)) <= tolerance(dtype)
