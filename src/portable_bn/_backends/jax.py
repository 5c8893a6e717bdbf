"""JAX: value-dependent routes by ``jax.lax.cond`` on the CPU, and GPU orders for the reductions.

Why: under ``jax.jit`` a Python ``if`` on values is impossible, so the shared algorithm's
choice between its routes (:func:`portable_bn._agnostic.batch_statistics`,
:func:`~portable_bn._agnostic.backward_sums`) is a ``jax.lax.cond`` (:meth:`JaxPrimitives.branch`).
On the CPU it pays: only the branch taken runs, and only per-channel vectors cross it, so XLA
reads ``x`` three times and writes once where the textbook code reads four times and writes
twice. On GPUs XLA turns such conditionals into selects that run every branch (1.3 to 2 x the
textbook code on an H100), so there the careful side alone is lowered
(``jax.lax.platform_dependent``): the prescaled route, and the backward's centred sums.

On GPUs the reductions are also ordered for XLA (:func:`gpu_first_pass`,
:func:`gpu_shifted_sums`): for large float32 inputs pass 1 is one variadic ``lax.reduce``
(XLA emits a final-reduction kernel for each separate reduction); where XLA's own order of
reducing the axes leaves the GPU idle (rows too short or too few), both passes reduce the
batch axes first (:func:`batch_first_layout`). The CPU keeps the plain reductions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax

from .._agnostic import ShiftedSums
from .._primitives import Primitives
from .._recipe import Recipe

LARGE_FROM = 2**20
"""Inputs of at least this many elements are "large": the variadic pass 1 (float32), and the
batch-first order where :func:`batch_first_layout` says so."""

FEW_ROWS = 1024
"""Batch first below this many rows (``A * C``) in XLA's own order: too few to fill the GPU."""

SHORT_ROW = 64
"""Batch first for rows (``B``) shorter than this in XLA's own order."""


def batch_first_layout(shape: tuple[int, ...], recipe: Recipe) -> bool:
    """Whether the GPU reductions take the batch axes first (:func:`_batch_first`).

    XLA's own order for a reduction over every axis but the channel's reduces the rows of ``B``
    (the elements after the channel axis) first, then the ``A`` rows of partials. Measured on
    an H200 (XLA's kernel times through CUPTI, float32/float64, microseconds per training
    forward; the textbook code: 44/73, 26/65, 15/30, 27/63):

    =====================  ==========  ===========  ===========
    input (A, C, B)        XLA order   batch first  rule
    =====================  ==========  ===========  ===========
    (256, 512, 49)         53 / 116    39 / 113     short rows
    (8, 32, 16384)         39 / 94     26 / 63      few rows
    (64, 256, 196)         21 / 43     29 / 54      XLA order
    (32, 64, 3136)         31 / 75     75 / 128     XLA order
    =====================  ==========  ===========  ===========

    Rows of 49 elements leave most of a warp's lanes idle and 256 rows do not fill the GPU's
    132 multiprocessors; where neither holds, XLA's order was faster. Only for large inputs
    (:data:`LARGE_FROM`; a small call's cost is its kernel count, and the barrier adds kernels)
    and where both sides of the channel axis have more than one element. Other shapes were not
    measured; the thresholds are the mechanisms' rough bounds."""
    outer, inner = recipe.outer, recipe.inner
    assert outer is not None
    assert inner is not None
    if outer < 2 or inner < 2 or outer * recipe.num_channels * inner < LARGE_FROM:
        return False
    return outer * recipe.num_channels < FEW_ROWS or inner < SHORT_ROW


def _batch_first(xp: ModuleType, arrays: tuple[Any, ...], reducers: tuple[Any, ...], recipe: Recipe) -> tuple[Any, ...]:
    """Per-channel reductions of full-size ``arrays`` over the axes before the channel axis
    first (a column reduction of ``(A, C * B)``), then over those after it (a row reduction of
    the ``(C, B)`` partials). The barrier keeps XLA from merging the stages back."""
    partials = tuple(
        reduce(xp.reshape(array, (recipe.outer, -1)), axis=0) for array, reduce in zip(arrays, reducers, strict=True)
    )
    partials = jax.lax.optimization_barrier(partials)
    channels = recipe.num_channels
    return tuple(
        reduce(xp.reshape(partial, (channels, -1)), axis=1) for partial, reduce in zip(partials, reducers, strict=True)
    )


def variadic_first_pass(xp: ModuleType, x: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
    """Pass 1 (``min``, ``max``, ``sum(x * shrink)``) as ONE variadic ``lax.reduce``: XLA on a GPU
    merged separate reductions' partial kernels but kept a final kernel for each; this has one
    of each. The same minima and maxima, the sum in another order (the shift it gives need only
    be close). The input's gradient is stopped (``lax.reduce`` with a general computation has
    no derivative rule): the scale is a power of two and the statistics do not depend on the
    shift to first order."""
    values = jax.lax.stop_gradient(x)
    inf = float("inf")

    def combine(left: tuple[Any, ...], right: tuple[Any, ...]) -> tuple[Any, ...]:
        return (jax.lax.min(left[0], right[0]), jax.lax.max(left[1], right[1]), jax.lax.add(left[2], right[2]))

    zero = xp.zeros((), dtype=values.dtype)
    operands = (values, values, values * shrink)
    low, high, total = jax.lax.reduce(operands, (zero + inf, zero - inf, zero), combine, recipe.reduce_axes)
    return low, high, total


def gpu_first_pass(xp: ModuleType, x: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
    """Pass 1 on a GPU: batch first where :func:`batch_first_layout` says so; else one variadic
    reduce for float32 inputs of at least :data:`LARGE_FROM` elements (measured on an H200:
    11 XLA kernels to 8 on three ResNet-like shapes, -0.2 % to +4.7 % in speed; float64 up to
    36 % slower and a (2, 4, 3, 3) call 5 to 8 % slower with it); else three reductions."""
    if batch_first_layout(tuple(x.shape), recipe):
        return _batch_first(xp, (x, x, x * shrink), (xp.min, xp.max, xp.sum), recipe)
    if x.dtype == xp.float32 and math.prod(x.shape) >= LARGE_FROM:
        return variadic_first_pass(xp, x, recipe, shrink)
    axes = recipe.reduce_axes
    return xp.min(x, axis=axes), xp.max(x, axis=axes), xp.sum(x * shrink, axis=axes)


class JaxPrimitives(Primitives):
    """The pure primitives, ``jax.lax.cond`` for the route, and GPU orders for the reductions."""

    name = "JAX"
    branches = True

    def branch(self, unsafe: Any, careful: Callable[[], Any], quick: Callable[[], Any]) -> Any:
        """Under a trace: ``lax.cond`` on the CPU, and on other platforms the careful side alone
        (a ``cond`` becomes a select there, which runs both); both sides return the same
        structure (a missing scale or shift of :class:`~portable_bn._agnostic.ShiftedSums`
        becomes ones or zeros). Eager arrays hold their values: a plain choice, which spares
        tracing both sides at every call."""
        if not isinstance(unsafe, jax.core.Tracer):
            return careful() if bool(unsafe) else quick()
        return jax.lax.platform_dependent(
            cpu=lambda: jax.lax.cond(unsafe, lambda: _filled(self.xp, careful()), lambda: _filled(self.xp, quick())),
            default=careful,
        )

    def shortcuts(self, x: Any) -> bool:
        """Under ``jit`` the checks cost nothing next to a pass: the backward's sums of the inputs
        themselves (chosen by ``lax.cond``) save XLA storing ``xhat`` and reading it back."""
        return True

    def first_pass(self, x: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
        return _per_platform(
            x,
            cpu=lambda: super(JaxPrimitives, self).first_pass(x, recipe, shrink),
            default=lambda: gpu_first_pass(self.xp, x, recipe, shrink),
        )

    def shifted_sums(self, x: Any, recipe: Recipe, scale: Any, shift: Any) -> tuple[Any, Any]:
        def on_gpu() -> tuple[Any, Any]:
            if not batch_first_layout(tuple(x.shape), recipe):
                return super(JaxPrimitives, self).shifted_sums(x, recipe, scale, shift)
            values = self._centred(x, recipe, scale, shift)
            return _batch_first(self.xp, (values, values * values), (self.xp.sum, self.xp.sum), recipe)

        return _per_platform(x, cpu=lambda: self._cpu_shifted_sums(x, recipe, scale, shift), default=on_gpu)

    def _cpu_shifted_sums(self, x: Any, recipe: Recipe, scale: Any, shift: Any) -> tuple[Any, Any]:
        """The pure sums; under a trace, of ``x`` itself where every channel's shift is 0 (no
        scale), chosen by ``lax.cond``: the same sums (``x - 0`` is ``x``), but XLA on the CPU
        reduces ``x`` in place where the centred values, shared by two reductions, are stored
        and read back (measured 1.5 to 2 x the time of the two sums of ``x``)."""
        pure = super().shifted_sums
        if scale is not None or shift is None or not isinstance(x, jax.core.Tracer):
            return pure(x, recipe, scale, shift)
        return jax.lax.cond(
            self.xp.all(shift == 0), lambda: pure(x, recipe, None, None), lambda: pure(x, recipe, None, shift)
        )


def _per_platform(x: Any, *, cpu: Callable[[], Any], default: Callable[[], Any]) -> Any:
    """``cpu()`` on the CPU, else ``default()``: by ``jax.lax.platform_dependent`` under a trace
    (the platform is known when the computation is lowered), by the array's device when eager."""
    if isinstance(x, jax.core.Tracer):
        return jax.lax.platform_dependent(cpu=cpu, default=default)
    return cpu() if next(iter(x.devices())).platform == "cpu" else default()


def _filled(xp: ModuleType, result: Any) -> Any:
    if type(result) is tuple:
        return tuple(_filled(xp, part) for part in result)
    if isinstance(result, ShiftedSums):
        # *_like: inside shard_map, of the sums' varying type (as the other branch's vectors)
        if result.scale is None:
            result = result._replace(scale=xp.ones_like(result.total, dtype=_scale_dtype(result)))
        if result.shift is None:
            result = result._replace(shift=xp.zeros_like(result.total, dtype=_scale_dtype(result)))
    return result


def _scale_dtype(result: ShiftedSums) -> Any:
    """The dtype of the input the sums were taken of (that of a shift or scale already there)."""
    for vector in (result.shift, result.scale):
        if vector is not None:
            return vector.dtype
    return result.total.dtype


_PRIMITIVES: dict[int, JaxPrimitives] = {}


def primitives_for(xp: ModuleType, x: Any) -> Primitives:
    found = _PRIMITIVES.get(id(xp))
    if found is None:
        found = _PRIMITIVES[id(xp)] = JaxPrimitives(xp)
    return found
