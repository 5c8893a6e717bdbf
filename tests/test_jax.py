"""JAX: the functional API under jax.jit and jax.grad."""

from __future__ import annotations

import numpy as np
import pytest

import portable_bn as pbn
from conftest import both_paths, require_backend
from portable_bn import _agnostic
from portable_bn._check import sample
from portable_bn._recipe import make_recipe
from portable_bn._reference import reference_backward, reference_batch_norm
from portable_bn._tolerance import max_error, tolerance


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


def _branch(jnp, x):
    """Which of the three lax.cond branches the training forward takes on ``x`` (axis 1)."""
    plan = make_recipe(tuple(x.shape), 1)
    one_pass, _ = _agnostic.one_pass_statistics(jnp, x, plan, 1e-5)
    if not bool(_agnostic.one_pass_unsafe(jnp, one_pass)):
        return "one pass"
    two_pass, _ = _agnostic.batch_statistics(jnp, x, plan, 1e-5, prescale=False, want_var=True)
    return "prescaled" if bool(_agnostic.needs_prescale(jnp, two_pass)) else "two pass"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("offset", "spread", "constant", "branches"),
    [
        (0.5, 1.0, False, ("one pass", "one pass")),  # every mean within its spread
        (300.0, 100.0, False, ("two pass", "two pass")),  # mean 3 std: one pass would cancel
        (1e4, 0.1, False, ("two pass", "two pass")),
        (0.0, 1e20, False, ("prescaled", "one pass")),  # float32 squares overflow, float64 ones do not
        (1e15, 1.0, True, ("prescaled", "prescaled")),  # a numerically constant channel
    ],
)
def test_jit_branches_on_ordinary_and_hard_data(jnp, monkeypatch, dtype, offset, spread, constant, branches):
    """Under jit the training statistics are chosen by lax.cond: one pass (mean(x), mean(x**2))
    where every mean is within its spread, else the corrected two-pass algorithm, prescaled
    where that shows overflow or a constant channel. Each branch equals the float64 reference."""
    import jax

    host = offset + spread * np.random.default_rng(5).normal(size=(8, 3, 4))
    if constant:
        host[:, 1] = offset
    x = jnp.asarray(host, dtype=getattr(jnp, dtype))
    assert _branch(jnp, x) == branches[dtype == "float64"]
    rm, rv = jnp.asarray([0.0, 1.0, -1.0], dtype=x.dtype), jnp.asarray([1.0, 2.0, 0.5], dtype=x.dtype)
    w, b = jnp.asarray([1.5, 0.5, 2.0], dtype=x.dtype), jnp.asarray([0.5, -1.0, 2.0], dtype=x.dtype)
    result = jax.jit(lambda x, rm, rv, w, b: pbn.batch_norm(x, rm, rv, w, b, training=True))(x, rm, rv, w, b)
    host_args = (np.asarray(a, dtype=np.float64) for a in (x, rm, rv, w, b))
    expected = reference_batch_norm(*host_args, training=True)
    keys = ["output", "mean", "invstd", "running_mean", "running_var"]
    if np.max(expected["running_var"]) > np.finfo(dtype).max:  # beyond the dtype: Inf, as documented
        keys.remove("running_var")
        assert np.isinf(np.asarray(result.running_var)).all()
    for key in keys:
        assert max_error(np.asarray(getattr(result, key)), expected[key]) <= tolerance(dtype), key
    if constant:
        np.testing.assert_array_equal(np.asarray(result.output)[:, 1], np.asarray(b)[1])
    # The same call through the agnostic code (traced again: FAST_PATHS is read while tracing);
    # the spy counts traces through _jax_fast.
    from portable_bn import _jax_fast

    traced = []
    train_statistics = _jax_fast.train_statistics
    monkeypatch.setattr(_jax_fast, "train_statistics", lambda *a: traced.append(1) or train_statistics(*a))
    fast, agnostic = both_paths(
        lambda *args: jax.jit(lambda x, rm, rv, w, b: pbn.batch_norm(x, rm, rv, w, b, training=True))(*args),
        x,
        rm,
        rv,
        w,
        b,
    )
    assert traced == [1]  # the fast call only
    for key in keys:
        assert max_error(np.asarray(getattr(fast, key)), np.asarray(getattr(agnostic, key))) <= tolerance(dtype), key


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("offset", "one_pass"), [(0.5, True), (1e3, False)])
def test_jit_backward_sums_on_ordinary_and_offset_data(jnp, dtype, training, offset, one_pass):
    """Under jit the backward's sum(g * xhat) is (sum(g * x) - mean * sum(g)) * invstd where every
    |mean| * invstd <= 1, else the centred sum (a lax.cond): both equal the reference and the
    agnostic path."""
    import jax

    rng = np.random.default_rng(9)
    host = offset + rng.normal(size=(8, 3, 4))
    x = jnp.asarray(host, dtype=getattr(jnp, dtype))
    grad = jnp.asarray(rng.normal(size=host.shape), dtype=x.dtype)
    weight = jnp.asarray([1.5, 0.5, 2.0], dtype=x.dtype)
    forward = pbn.batch_norm(x, training=True)
    mean, invstd = forward.mean, forward.invstd
    assert bool(jnp.all(jnp.abs(mean * invstd) <= 1.0)) == one_pass

    def backward(*args):
        return jax.jit(lambda *a: pbn.batch_norm_backward(*a, training=training))(*args)

    fast, agnostic = both_paths(backward, grad, x, weight, mean, invstd)
    host_args = [np.asarray(a, dtype=np.float64) for a in (grad, x, weight, mean, invstd)]
    want = reference_backward(*host_args, training=training)
    for got, slow, expected in zip(fast, agnostic, want, strict=True):
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
def test_gpu_passes_by_shape_and_dtype(jnp, shape, dtype, route):
    """The GPU route's choice of reductions (only shapes and dtypes decide it)."""
    import jax

    from portable_bn import _jax_fast

    x = jax.ShapeDtypeStruct(shape, getattr(jnp, dtype))
    chosen = _jax_fast.gpu_passes(jnp, x, make_recipe(shape, 1))
    expected = {
        "batch first": (_jax_fast.batch_first_first_pass, _jax_fast.batch_first_sums),
        "variadic": (_jax_fast.variadic_first_pass, None),
        "three reductions": (_agnostic.first_pass, None),
    }[route]
    assert chosen == expected


def test_batch_first_needs_axes_before_the_channel(jnp):
    from portable_bn import _jax_fast

    assert not _jax_fast.batch_first_layout((8, 32, 128, 128), make_recipe((8, 32, 128, 128), 0))  # nothing before C


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["offset-1e6", "magnitude-3e37", "near-largest", "overflowing-sum", "constant", "nan"])
def test_gpu_passes_equal_the_agnostic_reductions(jnp, dtype, case):
    """The GPU route's passes (one variadic lax.reduce; batch axes first) give the agnostic
    reductions' minima and maxima exactly and their sums to rounding, and the same
    statistics, under jit and vmap, on ordinary, overflowing, constant and NaN data;
    and the statistics' gradients through them are the agnostic ones (mean0 does not
    enter them to first order)."""
    import jax

    from portable_bn import _jax_fast
    from test_numerics import _fused_case

    host = _fused_case(case, dtype)
    with np.errstate(over="ignore"):
        x = jnp.asarray(host.astype(dtype))
    recipe = make_recipe(x.shape, 1)
    shrink = 2.0**-9  # any power of two with 2**9 >= the 128 values per channel
    routes = {
        "variadic": (_jax_fast.variadic_first_pass, None),
        "batch first": (_jax_fast.batch_first_first_pass, _jax_fast.batch_first_sums),
    }
    agnostic = jax.jit(lambda x: _agnostic.first_pass(jnp, x, recipe, shrink))(x)
    for route, (first, _sums) in routes.items():
        got = jax.jit(lambda x, first=first: first(jnp, x, recipe, shrink))(x)
        for name, want, value in zip(("min", "max", "shrunk sum"), agnostic, got, strict=True):
            assert value.dtype == want.dtype == x.dtype
            if name in ("min", "max"):
                np.testing.assert_array_equal(np.asarray(value), np.asarray(want), err_msg=f"{route} {name}")
            else:  # summed in another order: the last bits may differ
                np.testing.assert_allclose(np.asarray(value), np.asarray(want), rtol=tolerance(dtype), atol=0)
        batched = jax.vmap(lambda x, first=first: first(jnp, x, recipe, shrink))(jnp.stack([x, -x]))
        np.testing.assert_array_equal(np.asarray(batched[1][0]), np.asarray(agnostic[1]))  # max of x
        np.testing.assert_array_equal(np.asarray(batched[0][1]), np.asarray(-agnostic[1]))  # min of -x
    centered = x - jnp.reshape(agnostic[2] * 2.0**9 / recipe.count_per_channel, recipe.param_shape)
    got_sums = jax.jit(lambda c: _jax_fast.batch_first_sums(jnp, (c, c * c), recipe))(centered)
    with np.errstate(invalid="ignore", over="ignore"):
        for array, value in zip((centered, centered * centered), got_sums, strict=True):
            terms = np.asarray(array, dtype=np.float64)
            want, size = np.sum(terms, axis=(0, 2, 3)), np.sum(np.abs(terms), axis=(0, 2, 3))
            np.testing.assert_allclose(np.asarray(value), want, rtol=0, atol=tolerance(dtype) * np.nanmax(size))

    def statistics(x, first=_agnostic.first_pass, sums=None):
        return _agnostic.fused_statistics(jnp, x, recipe, 1e-5, first=first, sums=sums)[0]

    want = statistics(x)
    for route, (first, sums) in routes.items():
        got = jax.jit(lambda x, first=first, sums=sums: statistics(x, first, sums))(x)
        for name, value, expected in zip(want._fields, got, want, strict=True):
            np.testing.assert_allclose(
                np.asarray(value), np.asarray(expected), rtol=tolerance(dtype), atol=0, err_msg=f"{route} {name}"
            )
        batched = jax.vmap(lambda x, first=first, sums=sums: statistics(x, first, sums).invstd)(jnp.stack([x, -x]))
        np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(want.invstd), rtol=tolerance(dtype), atol=0)
    if case in ("offset-1e6", "constant"):

        def invstd_sum(x, first, sums):
            return jnp.sum(statistics(x, first, sums).invstd)

        def mean_sum(x, first, sums):
            return jnp.sum(statistics(x, first, sums).mean * jnp.arange(3.0))

        for loss in (invstd_sum, mean_sum):
            want_grad = jax.grad(loss)(x, _agnostic.first_pass, None)
            assert float(jnp.max(jnp.abs(want_grad))) > 0
            for route, (first, sums) in routes.items():
                got_grad = jax.grad(loss)(x, first, sums)
                np.testing.assert_allclose(
                    np.asarray(got_grad), np.asarray(want_grad), rtol=tolerance(dtype), atol=0, err_msg=route
                )
