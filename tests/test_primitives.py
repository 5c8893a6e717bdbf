"""Every backend's primitives equal the pure array-API ones, on the same data.

The primitive set a call gets (``_dispatch.primitives``) is compared, primitive by
primitive, with ``_dispatch.pure`` (what Dask and array-api-strict run): reductions to the
rounding of a sum (minima and maxima exactly), elementwise results to the dtype's tolerance.
One suite for every backend: NumPy's tiles, PyTorch's ``addcmul``, JAX's route and GPU
orders, CuPy's kernels on a GPU. Shapes reach several tiles and channel groups, short and
long rows, channels last, and inputs the accelerated primitives hand back to the pure ones
(strided arrays).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import portable_bn as pbn
from portable_bn import _agnostic, _dispatch
from portable_bn._compat import array_namespace
from portable_bn._recipe import make_recipe
from portable_bn.testing import LARGE_SHAPES, hard_data, max_error, reference_moments, sample, tolerance

SHAPES = [
    ((6, 4), 1),
    ((4, 3, 7), 1),
    ((5, 3, 4, 6), 1),
    ((4, 5, 6, 3), -1),
    ((3, 4, 5), 0),
    *((s, 1) for s in LARGE_SHAPES),
]


def _full(combo):
    if combo.dtype_name not in ("float32", "float64"):
        pytest.skip("the primitives see the compute dtype: float32 or float64")


def _setup(combo, shape, axis, seed=0):
    x = combo.asarray(sample(shape, seed=seed, axis=axis))
    recipe = make_recipe(tuple(shape), axis)
    xp = array_namespace(x)
    return x, xp, recipe, _dispatch.primitives(xp, x, recipe), _dispatch.pure(xp)


def _vectors(combo, recipe, seed):
    rng = np.random.default_rng(seed)
    c = recipe.num_channels
    scale = combo.asarray(2.0 ** rng.integers(-3, 3, c))  # powers of two, as the prescale
    shift = combo.asarray(rng.normal(size=c))
    mult, add = combo.asarray(rng.uniform(0.5, 2.0, c)), combo.asarray(rng.normal(size=c))
    return scale, shift, mult, add


def _sums_close(got, want, bound, dtype_name, what):
    """Sums in different orders agree to the dtype's tolerance of the sum of the terms' sizes."""
    got, want, bound = (np.asarray(v, dtype=np.float64) for v in (got, want, bound))
    assert got.shape == want.shape, what
    assert np.all(np.abs(got - want) <= tolerance(dtype_name) * np.maximum(bound, 1.0)), what


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_reductions_equal_the_pure_ones(vcombo, shape, axis):
    _full(vcombo)
    x, _, recipe, prims, pure = _setup(vcombo, shape, axis)
    scale, shift, _, _ = _vectors(vcombo, recipe, 1)
    host = vcombo.to_numpy(x)
    sizes = np.sum(np.abs(np.moveaxis(host, axis, 0).reshape(recipe.num_channels, -1)), axis=1)
    shrink = 2.0 ** -(recipe.count_per_channel - 1).bit_length()
    got, want = prims.first_pass(x, recipe, shrink), pure.first_pass(x, recipe, shrink)
    for what, g, w in zip(("min", "max"), got[:2], want[:2], strict=True):
        np.testing.assert_array_equal(vcombo.to_numpy(g), vcombo.to_numpy(w), err_msg=what)
    _sums_close(vcombo.to_numpy(got[2]), vcombo.to_numpy(want[2]), sizes * shrink, vcombo.dtype_name, "shrunk sum")
    for s, k in ((None, None), (None, shift), (scale, shift)):
        got, want = prims.shifted_sums(x, recipe, s, k), pure.shifted_sums(x, recipe, s, k)
        terms = host if s is None else host * np.reshape(vcombo.to_numpy(s), recipe.param_shape)
        if k is not None:
            terms = terms - np.reshape(vcombo.to_numpy(k), recipe.param_shape)
        size = np.sum(np.abs(np.moveaxis(terms, axis, 0).reshape(recipe.num_channels, -1)), axis=1)
        _sums_close(vcombo.to_numpy(got[0]), vcombo.to_numpy(want[0]), size, vcombo.dtype_name, "sum")
        _sums_close(
            vcombo.to_numpy(got[1]), vcombo.to_numpy(want[1]), size * np.abs(terms).max(), vcombo.dtype_name, "squares"
        )
    grad = vcombo.asarray(np.random.default_rng(2).normal(size=shape))
    grad_sizes = np.sum(np.abs(np.moveaxis(vcombo.to_numpy(grad), axis, 0).reshape(recipe.num_channels, -1)), axis=1)
    for k, s in ((None, None), (shift, None), (shift, scale)):
        got, want = prims.product_sums(grad, x, recipe, k, s), pure.product_sums(grad, x, recipe, k, s)
        _sums_close(vcombo.to_numpy(got[0]), vcombo.to_numpy(want[0]), grad_sizes, vcombo.dtype_name, "sum(g)")
        bound = grad_sizes * (np.abs(host).max() + 3.0) * 8.0
        _sums_close(vcombo.to_numpy(got[1]), vcombo.to_numpy(want[1]), bound, vcombo.dtype_name, "sum(g * x)")


def _block_statistics(combo, moments, count):
    """Mean and biased variance of a block-moments result, in the input's units, on the host."""
    shift, mean, m2, scale = (None if v is None else np.asarray(combo.to_numpy(v), dtype=np.float64) for v in moments)
    scale = np.ones_like(mean) if scale is None else scale
    mean = mean if shift is None else shift + mean
    return mean / scale, m2 / count / scale / scale


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_block_moments_equal_the_pure_ones_and_the_reference(vcombo, shape, axis):
    """The block-moments primitive (a compiled kernel where the backend has one) gives the
    mean and variance of the pure primitive and of the float64 reference, to the dtype's
    tolerance, and its scale is a power of two."""
    _full(vcombo)
    x, _, recipe, prims, pure = _setup(vcombo, shape, axis, seed=7)
    count, ref_mean, ref_m2 = reference_moments(vcombo.to_numpy(x), axis=axis)
    ref_var = ref_m2 / count
    tol = tolerance(vcombo.dtype_name)
    for primitives in (prims, pure):
        got = primitives.block_moments(x, recipe)
        if got[3] is not None:
            mantissa, _ = np.frexp(np.asarray(vcombo.to_numpy(got[3]), dtype=np.float64))
            assert np.all(mantissa == 0.5), "scale: powers of two"
        mean, var = _block_statistics(vcombo, got, count)
        spread = np.maximum(np.abs(ref_mean), np.sqrt(ref_var))
        assert np.all(np.abs(mean - ref_mean) <= tol * spread), primitives
        assert np.all(np.abs(var - ref_var) <= tol * ref_var), primitives


@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_elementwise_primitives_equal_the_pure_ones(vcombo, shape, axis):
    _full(vcombo)
    x, _, recipe, prims, pure = _setup(vcombo, shape, axis, seed=3)
    scale, shift, mult, add = _vectors(vcombo, recipe, 4)
    tol = tolerance(vcombo.dtype_name)
    for args in (
        (scale, shift, mult, add),
        (None, shift, mult, add),
        (None, None, mult, add),
        (None, None, mult, None),
    ):
        got, want = prims.affine(x, recipe, *args), pure.affine(x, recipe, *args)
        assert got.dtype == want.dtype == x.dtype and tuple(got.shape) == tuple(x.shape)
        assert max_error(vcombo.to_numpy(got), vcombo.to_numpy(want)) <= tol
    grad = vcombo.asarray(np.random.default_rng(5).normal(size=shape))
    for k_shift in (shift, None):
        got = prims.grad_input(grad, x, recipe, mult, k_shift, add, scale)
        want = pure.grad_input(grad, x, recipe, mult, k_shift, add, scale)
        assert got.dtype == x.dtype
        assert max_error(vcombo.to_numpy(got), vcombo.to_numpy(want)) <= tol


def test_strided_and_half_inputs_take_the_pure_primitives_where_they_must(vcombo):
    """Arrays an accelerated primitive cannot take (strided views, half dtypes) give the pure
    primitives' results, and batch_norm on them equals the reference."""
    x_host = sample((6, 3, 10), seed=6)
    x = vcombo.asarray(x_host)[..., ::2]
    result = pbn.batch_norm(x, training=True)
    from portable_bn.testing import reference_batch_norm

    expected = reference_batch_norm(vcombo.to_numpy(x), training=True)
    assert max_error(vcombo.to_numpy(result.output), expected["output"]) <= tolerance(vcombo.dtype_name)


def test_numpy_tiles_are_what_numpy_arrays_get():
    """The dispatch point: NumPy float32/float64 arrays get the tiled primitives; inside
    pure_primitives() and for an empty batch, the pure ones."""
    from portable_bn._backends.numpy import NumpyPrimitives

    x = np.ones((4, 3, 5), dtype=np.float32)
    xp = array_namespace(x)
    assert isinstance(_dispatch.primitives(xp, x, make_recipe(x.shape, 1)), NumpyPrimitives)
    assert type(_dispatch.primitives(xp, x[:0], make_recipe((0, 3, 5), 1))) is pbn._primitives.Primitives
    with pbn.testing.pure_primitives():
        assert type(_dispatch.primitives(xp, x, make_recipe(x.shape, 1))) is pbn._primitives.Primitives
    assert isinstance(_dispatch.primitives(xp, x, make_recipe(x.shape, 1)), NumpyPrimitives)


def test_pure_primitives_is_per_thread():
    """The switch is a context variable: another thread keeps its own primitives."""
    import threading

    from portable_bn._backends.numpy import NumpyPrimitives

    x = np.ones((4, 3, 5))
    xp = array_namespace(x)
    seen = []
    with pbn.testing.pure_primitives():
        thread = threading.Thread(target=lambda: seen.append(_dispatch.primitives(xp, x, make_recipe(x.shape, 1))))
        thread.start()
        thread.join()
    assert isinstance(seen[0], NumpyPrimitives)


@pytest.mark.parametrize("block_bytes", [1, 200, 1 << 14])
@pytest.mark.parametrize("shape", [(48, 3, 40, 40), (64, 48, 7, 7), (3, 5, 9000), (40, 7)])
def test_numpy_tiling_does_not_change_the_results(monkeypatch, block_bytes, shape):
    """Tiles of one row, of a few rows and of many rows, one channel group and many, pattern
    rows and broadcast ones: the same sums (to rounding) and elementwise results."""
    from portable_bn._backends import numpy as numpy_backend

    monkeypatch.setattr(numpy_backend, "BLOCK_BYTES", block_bytes)
    numpy_backend._tiling.cache_clear()
    try:
        x = sample(shape, seed=7).astype(np.float32)
        recipe = make_recipe(shape, 1)
        xp = array_namespace(x)
        tiled, pure = numpy_backend.NumpyPrimitives(xp), _dispatch.pure(xp)
        c = shape[1]
        scale, shift = np.full(c, 0.5, np.float32), np.linspace(-1, 1, c).astype(np.float32)
        sizes = np.abs(np.moveaxis(x, 1, 0).reshape(c, -1)).astype(np.float64).sum(axis=1)
        for got, want in zip(
            tiled.shifted_sums(x, recipe, scale, shift), pure.shifted_sums(x, recipe, scale, shift), strict=True
        ):
            _sums_close(got, want, sizes * 8, "float32", "sums")
        got, want = tiled.first_pass(x, recipe, 0.5), pure.first_pass(x, recipe, 0.5)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        out = tiled.affine(x, recipe, scale, shift, scale, shift)
        assert max_error(out, pure.affine(x, recipe, scale, shift, scale, shift)) <= tolerance("float32")
    finally:
        numpy_backend._tiling.cache_clear()


@pytest.mark.parametrize("name", ["N(0,1)", "1e4+0.1N", "1e20 N", "constant ch."])
def test_moments_merge_exactly(vcombo, name):
    """Moments of two halves of a batch, about different shifts and in different power-of-two
    scales, merge (Chan et al.) into the moments of the whole: the float64 reference's."""
    _full(vcombo)
    host = hard_data(name, (8, 3, 4, 4), seed=8)
    x = vcombo.asarray(host)
    xp = array_namespace(x)
    pure = _dispatch.pure(xp)
    halves = []
    for part, exponent in ((slice(0, 3), 0), (slice(3, 8), 2)):
        piece = x[part, ...]
        recipe = make_recipe(tuple(piece.shape), 1)
        sums = _agnostic.prescaled_sums(pure, piece, recipe)
        moments = _agnostic.moments_from_sums(xp, sums, recipe.count_per_channel)
        factor = vcombo.asarray(np.full(3, 2.0**-exponent))
        halves.append(_agnostic._rescaled(xp, moments, moments.scale * factor))  # the second half, coarser
    merged = _agnostic.merge_moments(xp, *halves)
    count, mean, m2 = reference_moments(vcombo.to_numpy(x))
    assert merged.count == count
    scale = vcombo.to_numpy(merged.scale)
    got_mean = (vcombo.to_numpy(merged.shift) + vcombo.to_numpy(merged.mean)) / scale
    got_m2 = vcombo.to_numpy(merged.m2) / scale / scale
    spread = np.sqrt(m2 / count)
    tol = tolerance(vcombo.dtype_name)
    assert np.all(np.abs(got_mean - mean) <= tol * np.maximum(np.abs(mean), spread)), (got_mean, mean)
    assert np.all(np.abs(got_m2 - m2) <= tol * np.maximum(m2, np.finfo(np.float64).tiny)), (got_m2, m2)


def test_merging_no_values_changes_nothing():
    xp = array_namespace(np.zeros(1))
    some = _agnostic.Moments(5, np.array([1.0]), np.array([0.5]), np.array([2.0]), None)
    none = _agnostic.Moments(0, None, np.array([0.0]), np.array([0.0]), None)
    merged = _agnostic.merge_moments(xp, some, none)
    assert merged.count == 5
    np.testing.assert_array_equal(merged.mean, some.mean)
    np.testing.assert_array_equal(merged.m2, some.m2)


def test_routes_on_eager_arrays():
    """NumPy (eager) takes the quick route on ordinary data, the pass about the mean where the
    sampled shift was off, and the prescaled route for a constant channel or overflow."""
    from portable_bn._backends.numpy import NumpyPrimitives

    taken = []
    original = NumpyPrimitives.branch

    def spy(self, unsafe, careful, quick):
        taken.append(bool(unsafe))
        return original(self, unsafe, careful, quick)

    NumpyPrimitives.branch = spy
    try:
        runs = {}
        base = np.random.default_rng(9).normal(size=(32, 3, 16))
        skewed = base.copy()
        skewed[:4, 0] += 1000.0  # the sample (the first rows) is far from the channel's mean
        constant = base.copy()
        constant[:, 2] = 1e15
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for what, data in (("quick", base), ("mean", skewed), ("prescaled", constant)):
                taken.clear()
                pbn.batch_norm(data.astype(np.float32), training=True)
                runs[what] = tuple(taken)
    finally:
        NumpyPrimitives.branch = original
    assert runs == {"quick": (False,), "mean": (True, False), "prescaled": (True, True)}


@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 7), 1), ((5, 3, 4, 6), -1), *((s, 1) for s in LARGE_SHAPES[:1])])
def test_traced_jax_primitives_equal_the_pure_ones(vcombo, shape, axis):
    """Under ``jax.jit`` JAX's primitives take other forms (a ``lax.cond`` between the sums of
    ``x`` and of ``x - shift``, GPU orders): the same sums as the pure ones, for a shift of
    zeros, a shift that is zero in some channels only, and a scale."""
    if vcombo.backend not in ("jax", "jax_x32", "jax_gpu"):
        pytest.skip("traced primitives: JAX only")
    _full(vcombo)
    import jax

    x, xp, recipe, prims, pure = _setup(vcombo, shape, axis, seed=5)
    scale, shift, _, _ = _vectors(vcombo, recipe, 6)
    partly = xp.where(xp.arange(recipe.num_channels) % 2 == 0, shift, xp.zeros_like(shift))
    host = np.asarray(vcombo.to_numpy(x), dtype=np.float64)
    for s, k in ((None, xp.zeros_like(shift)), (None, partly), (None, shift), (scale, shift)):
        got = jax.jit(lambda x, s, k: prims.shifted_sums(x, recipe, s, k))(x, s, k)
        want = pure.shifted_sums(x, recipe, s, k)
        terms = host if s is None else host * np.reshape(vcombo.to_numpy(s), recipe.param_shape)
        terms = terms - np.reshape(vcombo.to_numpy(k), recipe.param_shape)
        size = np.sum(np.abs(np.moveaxis(terms, axis, 0).reshape(recipe.num_channels, -1)), axis=1)
        _sums_close(vcombo.to_numpy(got[0]), vcombo.to_numpy(want[0]), size, vcombo.dtype_name, "sum")
        _sums_close(
            vcombo.to_numpy(got[1]), vcombo.to_numpy(want[1]), size * np.abs(terms).max(), vcombo.dtype_name, "squares"
        )
    shrink = 2.0 ** -(recipe.count_per_channel - 1).bit_length()
    got = jax.jit(lambda x: prims.first_pass(x, recipe, shrink))(x)
    want = pure.first_pass(x, recipe, shrink)
    for what, g, w in zip(("min", "max"), got[:2], want[:2], strict=True):
        np.testing.assert_array_equal(vcombo.to_numpy(g), vcombo.to_numpy(w), err_msg=what)
