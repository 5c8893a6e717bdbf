"""Numba's kernels: each equals the pure array-API primitive on the same data, hard data included,
and the switch that turns them off works.

The kernels serve C-contiguous float32/float64 NumPy arrays above 128 KiB; the shapes here
reach each layout the kernels have: long rows cut into pieces, rows merged into blocks,
short rows as tiles of the ``(A, C * B)`` view, 2-D inputs, and channels last.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import portable_bn as pbn
from portable_bn import _dispatch
from portable_bn._backends import numpy as numpy_backend
from portable_bn._compat import array_namespace
from portable_bn._recipe import make_recipe
from portable_bn.testing import (
    HARD_DATA,
    Combination,
    hard_data_scenario,
    max_error,
    reference_backward,
    reference_batch_norm,
    reference_moments,
    tolerance,
)

pytestmark = pytest.mark.skipif(
    "numpy" not in __import__("os").environ.get("PBN_BACKENDS", "numpy").split(","),
    reason="NumPy not selected by PBN_BACKENDS",
)

SHAPES = [
    ((3, 2, 9000), 1),  # rows longer than a block: pieces
    ((64, 8, 10, 10), 1),  # rows of 100 values: several rows per block
    ((64, 16, 7, 7), 1),  # rows shorter than TILE_BELOW: tiles of the (A, C * B) view
    ((20000, 3), 1),  # 2-D: tiles
    ((6000, 4, 3), 1),  # rows shorter than PATTERN_BELOW: pattern rows in the elementwise kernels
    ((16, 40, 60), 1),  # row kernels for the elementwise forms
    ((8, 12, 12, 40), -1),  # channels last
]
DTYPES = ["float32", "float64"]


@pytest.fixture
def numba_on(monkeypatch):
    monkeypatch.setenv(numpy_backend.NUMBA_SWITCH, "1")


def _primitives(x, axis):
    recipe = make_recipe(x.shape, axis)
    xp = array_namespace(x)
    return recipe, numpy_backend.NumbaPrimitives(xp), _dispatch.pure(xp)


def _data(shape, dtype, seed, kind="offsets"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if kind == "offsets":  # a different offset and spread per row: blocks get different scales
        x = x * rng.uniform(0.1, 50.0, size=shape[:1] + (1,) * (len(shape) - 1)) + 1e4
    elif kind == "huge":
        x = x * (1e300 if dtype == "float64" else 1e37)
    elif kind == "constant":
        x = np.full(shape, 0.1)
    return np.ascontiguousarray(x.astype(dtype))


@pytest.mark.parametrize("kind", ["offsets", "huge", "constant"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_block_moments_kernel_equals_the_pure_primitive(numba_on, shape, axis, dtype, kind):
    x = _data(shape, dtype, 1, kind)
    recipe, kernels, pure = _primitives(x, axis)
    assert kernels.one_read(x)
    largest = float(np.abs(x).max())
    unit = 2.0 ** -np.floor(np.log2(largest)) if largest > 1.0 else 1.0  # a common power of two
    count, ref_mean, ref_m2 = reference_moments(x.astype(np.float64) * unit, axis=axis)  # exact scaling
    ref_var = ref_m2 / count
    tol = tolerance(dtype)
    for primitives in (kernels, pure):
        shift, mean, m2, scale = (np.asarray(v, dtype=np.float64) for v in primitives.block_moments(x, recipe))
        assert np.all(np.frexp(scale)[0] == 0.5), "powers of two"
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(m2)), "no overflow"
        ratio = unit / scale  # at most 1: no overflow
        mean, var = (shift + mean) * ratio, m2 / count * ratio * ratio
        assert np.all(np.abs(mean - ref_mean) <= tol * np.maximum(np.abs(ref_mean), np.sqrt(ref_var))), primitives
        assert np.all(np.abs(var - ref_var) <= tol * ref_var), primitives
        if kind == "constant":
            assert np.all(m2 == 0.0) and np.all(mean / unit == x.flat[0]), "a constant channel is exact"
    if kind == "offsets" and dtype == "float64":  # the hard case: no digit lost to the offset
        assert np.all(np.abs(var - ref_var) <= tol * ref_var / 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_sums_and_elementwise_kernels_equal_the_pure_primitives(numba_on, shape, axis, dtype):
    x = _data(shape, dtype, 2, "offsets")
    recipe, kernels, pure = _primitives(x, axis)
    rng = np.random.default_rng(3)
    channels = recipe.num_channels
    scale = (2.0 ** rng.integers(-3, 3, channels)).astype(dtype)
    shift = (1e4 + rng.normal(size=channels)).astype(dtype)
    mult, add = rng.uniform(0.5, 2.0, channels).astype(dtype), rng.normal(size=channels).astype(dtype)
    for args in ((scale, shift * scale, mult, add), (None, shift, mult, add), (None, None, mult, None)):
        got, want = kernels.affine(x, recipe, *args), pure.affine(x, recipe, *args)
        assert got.dtype == x.dtype and got.shape == x.shape
        np.testing.assert_array_equal(got, want)  # the same operations in the same dtype
    grad = rng.normal(size=shape).astype(dtype)
    for k_shift in (shift, None):
        got = kernels.grad_input(grad, x, recipe, mult, k_shift, add, scale)
        np.testing.assert_array_equal(got, pure.grad_input(grad, x, recipe, mult, k_shift, add, scale))
    sizes = np.abs(np.moveaxis(grad, axis, 0).reshape(channels, -1)).sum(axis=1)
    for k_shift, k_scale in ((shift, scale), (None, None)):
        got = kernels.product_sums(grad, x, recipe, k_shift, k_scale)
        want = pure.product_sums(grad, x, recipe, k_shift, k_scale)
        assert np.all(np.abs(got[0] - want[0]) <= tolerance(dtype) * sizes)
        bound = sizes * np.abs(x).max() * 8.0
        assert np.all(np.abs(got[1] - want[1]) <= tolerance(dtype) * bound)
    for array in (x, grad):
        assert array.flags.writeable  # nothing was frozen or replaced


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), SHAPES)
def test_training_and_backward_through_the_kernels_match_the_reference(numba_on, shape, axis, dtype):
    x = _data(shape, dtype, 4, "offsets")
    before = x.copy()
    channels = x.shape[axis]
    rng = np.random.default_rng(5)
    weight, bias = rng.normal(size=channels).astype(dtype), rng.normal(size=channels).astype(dtype)
    grad = rng.normal(size=shape).astype(dtype)
    running = np.zeros(channels, dtype), np.ones(channels, dtype)
    result = pbn.batch_norm(x, *running, weight, bias, training=True, axis=axis)
    expected = reference_batch_norm(x, *running, weight, bias, training=True, axis=axis)
    tol = tolerance(dtype)
    for key in ("output", "running_mean", "running_var"):
        assert max_error(getattr(result, key), expected[key]) <= tol, key
    grads = pbn.batch_norm_backward(grad, x, weight, result.mean, result.invstd, training=True, axis=axis)
    want = reference_backward(grad, x, weight, result.mean, result.invstd, training=True, axis=axis)
    for got, expect, key in zip(grads, want, ("grad_input", "grad_weight", "grad_bias"), strict=True):
        assert max_error(got, expect) <= tol, key
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("name", list(HARD_DATA))
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_data_through_the_kernels(numba_on, name, dtype):
    """Every data set of the accuracy table, at a size the kernels take (768 KiB in float32)."""
    combo = Combination("numpy", np, "cpu", dtype, values=True)
    x = np.zeros((64, 3, 32, 32), dtype=dtype)
    recipe = make_recipe(x.shape, 1)
    assert _dispatch.primitives(array_namespace(x), x, recipe).one_read(x)
    failed = [check for check in hard_data_scenario(combo, name, shape=x.shape) if not check.passed]
    assert not failed, failed


def test_the_switch_turns_the_kernels_off(monkeypatch):
    x = np.ones((64, 8, 32, 32), dtype=np.float32)
    xp, recipe = array_namespace(x), make_recipe(x.shape, 1)
    monkeypatch.setenv(numpy_backend.NUMBA_SWITCH, "1")
    on = _dispatch.primitives(xp, x, recipe)
    assert on.accelerator == "numba" and on.one_read(x)
    assert not on.one_read(x[:1, :1])  # 32 KiB: below the size the kernels take
    for off in ("0", "off", "False", "no"):
        monkeypatch.setenv(numpy_backend.NUMBA_SWITCH, off)
        prims = _dispatch.primitives(xp, x, recipe)
        assert prims.accelerator is None and not prims.one_read(x), off
    with pbn.testing.pure_primitives():
        monkeypatch.setenv(numpy_backend.NUMBA_SWITCH, "1")
        assert _dispatch.primitives(xp, x, recipe).accelerator is None
