"""JAX fast path: training statistics and backward sums by the cheapest exact route, chosen under ``jax.jit``.

Why it exists: XLA's CPU reductions do not fuse the elementwise work that feeds
them, so the agnostic corrected two-pass algorithm stores ``x - mean0`` and
reads it twice; and a full-size array returned by ``jax.lax.cond`` is stored
too. Here the statistics come from ``mean(x)`` and ``mean(x**2)`` (two reads of
``x`` and no full-size intermediate) wherever that is as accurate
(:func:`._agnostic.one_pass_statistics`); otherwise from the corrected
two-pass algorithm, prescaled where that shows overflow or a constant channel
(the agnostic path's own rule). The choice is value-dependent, so it is made by
``jax.lax.cond`` (no Python ``if`` on traced values; only the branch taken
runs, under ``vmap`` all of them). Only per-channel vectors cross a ``cond``:
``x - mean0`` is formed afterwards (:func:`._agnostic.recentered`) and fuses
into the output's loop. XLA then reads ``x`` three times and writes once, where
the textbook code reads four times and writes twice.

The backward's sums (:func:`backward_sums`) take the same kind of route:
``sum(g * xhat)`` as ``(sum(g * x) - mean * sum(g)) * invstd``, reductions of
the inputs themselves, where every channel has ``|mean| * invstd <= 1`` (the
extra error in ``grad_weight`` is then at most that of rounding ``sum(g)``,
which ``grad_bias`` has anyway); else ``xhat`` is formed and summed as in the
agnostic code. The textbook code stores ``xhat`` and reads it back; this reads
``g`` three times and ``x`` twice and writes once (measured: 0.65 to 0.77 x
the textbook backward under ``jit``, float32, the benchmark's shapes).
(Computing the agnostic sums behind ``jax.lax.optimization_barrier`` also
avoids storing ``xhat``, but XLA's reduction with the per-channel broadcasts
inside was 1.5 x slower on 7x7 images.)

That is the CPU route. On GPUs XLA turned those conditionals into selects, so
every branch ran (1.3 to 2 x the textbook code on an H100); there
:func:`._agnostic.fused_statistics` runs instead (chosen by
``jax.lax.platform_dependent`` when the computation is lowered): always
prescaled, with the prescale's ``min``/``max`` and the sum for ``mean0`` taken
in one pass and the corrected algorithm's two sums in a second, each pass a set
of reductions of one input that XLA can compute together (measured 1.13 to 1.41
x the textbook code, which reads ``x`` as often; per call that is 17 to 69 us).
Which reductions XLA is given is chosen by shape and dtype (:func:`gpu_passes`):
for large float32 inputs pass 1 is one variadic ``lax.reduce`` (XLA emits a
final-reduction kernel for each separate reduction); where XLA's own order of
reducing the axes leaves the GPU idle (rows too short or too few), both passes
reduce the batch axes first (:func:`batch_first_layout`).

``tests/test_jax.py`` checks which branch each kind of data takes, and that
every branch equals the float64 reference and the agnostic path
(``FAST_PATHS = False``).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import jax

from . import _agnostic
from ._recipe import Recipe


def _vectors(
    xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float, *, prescale: bool
) -> tuple[_agnostic.Statistics, _agnostic.Centered]:
    """The agnostic statistics with the full-size values dropped (and a prescale of ones
    where there is none, so every branch returns the same structure)."""
    stats, centered = _agnostic.batch_statistics(xp, x_compute, recipe, eps, prescale=prescale, want_var=True)
    if centered.prescale is None:
        centered = centered._replace(prescale=xp.ones_like(centered.mean0))
    return stats, centered._replace(values=None)


def _two_pass(xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float) -> Any:
    quick = _vectors(xp, x_compute, recipe, eps, prescale=False)
    return jax.lax.cond(
        _agnostic.needs_prescale(xp, quick[0]),
        lambda: _vectors(xp, x_compute, recipe, eps, prescale=True),
        lambda: quick,
    )


def _cpu_statistics(xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float) -> Any:
    one_pass = _agnostic.one_pass_statistics(xp, x_compute, recipe, eps)
    return jax.lax.cond(
        _agnostic.one_pass_unsafe(xp, one_pass[0]),
        lambda: _two_pass(xp, x_compute, recipe, eps),
        lambda: one_pass,
    )


def variadic_first_pass(xp: ModuleType, x_compute: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
    """:func:`._agnostic.first_pass` as ONE variadic ``lax.reduce``. XLA on a GPU
    splits a large reduction into a partial and a final kernel; it merged the separate
    reductions' partial kernels into one but kept a final kernel for each (read from
    the compiled HLO); this has one of each. The same minima
    and maxima; the sum in another order, so it may differ in the last bits
    (``mean0`` need only be close: the second pass's residual corrects it).

    The input has its gradient stopped: ``lax.reduce`` with a general computation
    has no derivative rule, and none is needed. The scale is a power of two (zero
    derivative) and ``mean0`` only centres the second pass, whose results do not
    depend on it to first order (``mean = mean0 + mean(x - mean0)``, and the
    variance is stationary in ``mean0``)."""
    x_values = jax.lax.stop_gradient(x_compute)
    inf = float("inf")

    def combine(left: tuple[Any, ...], right: tuple[Any, ...]) -> tuple[Any, ...]:
        return (jax.lax.min(left[0], right[0]), jax.lax.max(left[1], right[1]), jax.lax.add(left[2], right[2]))

    zero = xp.zeros((), dtype=x_values.dtype)
    operands = (x_values, x_values, x_values * shrink)
    low, high, shrunk_total = jax.lax.reduce(operands, (zero + inf, zero - inf, zero), combine, recipe.reduce_axes)
    return low, high, shrunk_total


def _batch_first(xp: ModuleType, arrays: tuple[Any, ...], reducers: tuple[Any, ...], recipe: Recipe) -> tuple[Any, ...]:
    """Per-channel reductions of full-size ``arrays`` (``reducers``: ``xp.min``,
    ``xp.max`` or ``xp.sum``), over the axes before the channel axis first (a column
    reduction of the array viewed as ``(A, C * B)``) and then over the axes after it
    (a row reduction of the ``(C, B)`` partials). The barrier keeps XLA from merging the
    two stages back into its own order, which reduces the rows of ``B`` first."""
    outer = math.prod(arrays[0].shape[: recipe.channel_axis])
    partials = tuple(
        reduce(xp.reshape(array, (outer, -1)), axis=0) for array, reduce in zip(arrays, reducers, strict=True)
    )
    partials = jax.lax.optimization_barrier(partials)
    channels = recipe.num_channels
    return tuple(
        reduce(xp.reshape(partial, (channels, -1)), axis=1) for partial, reduce in zip(partials, reducers, strict=True)
    )


def batch_first_first_pass(xp: ModuleType, x_compute: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
    """:func:`._agnostic.first_pass` reduced batch axes first (:func:`_batch_first`): the same
    minima and maxima, the sum in another order."""
    low, high, shrunk_total = _batch_first(
        xp, (x_compute, x_compute, x_compute * shrink), (xp.min, xp.max, xp.sum), recipe
    )
    return low, high, shrunk_total


def batch_first_sums(xp: ModuleType, arrays: tuple[Any, ...], recipe: Recipe) -> tuple[Any, ...]:
    """The per-channel sums of ``arrays`` (:data:`._agnostic.ChannelSums`), batch axes first."""
    return _batch_first(xp, arrays, (xp.sum,) * len(arrays), recipe)


#: Inputs of at least this many elements are "large": the variadic first pass (float32), and
#: the batch-first order where :func:`batch_first_layout` says so.
LARGE_FROM = 2**20

#: Batch-first below this many rows (``A * C``) in XLA's own order: too few to fill the GPU.
FEW_ROWS = 1024

#: Batch-first for rows (``B``) shorter than this in XLA's own order.
SHORT_ROW = 64


def batch_first_layout(shape: tuple[int, ...], recipe: Recipe) -> bool:
    """Whether the GPU statistics reduce the batch axes first (:func:`_batch_first`).

    XLA's own order for a reduction over every axis but the channel's reduces the rows
    of ``B`` (the elements after the channel axis) first, then the ``A`` rows of
    partials (the axes before it). Measured on an H200 (the fourth GPU session, XLA's
    kernel times through CUPTI, float32/float64, microseconds per training forward;
    the textbook code: 44/73, 26/65, 15/30, 27/63):

    =====================  ==========  ===========  ===========
    input (A, C, B)        XLA order   batch first  rule
    =====================  ==========  ===========  ===========
    (256, 512, 49)         53 / 116    39 / 113     short rows
    (8, 32, 16384)         39 / 94     26 / 63      few rows
    (64, 256, 196)         21 / 43     29 / 54      XLA order
    (32, 64, 3136)         31 / 75     75 / 128     XLA order
    =====================  ==========  ===========  ===========

    Both columns with the three-reduction pass 1. Rows of 49 elements leave most of a warp's
    lanes idle and 256 rows do not fill the GPU's 132 multiprocessors; where neither
    holds, XLA's order was faster. Only for large inputs (:data:`LARGE_FROM`): a small
    call's cost is its kernel count, and the barrier adds kernels; and only where both
    sides of the channel axis have more than one element. Other shapes were not
    measured; the thresholds are the mechanisms' rough bounds. End to end (synchronised
    calls, interleaved in one process with XLA's order): float32 0.98 and 1.03 x the
    textbook code on the two batch-first shapes, where XLA's order took 1.06 and 1.12;
    float64 1.28 and 0.99, where it took 1.32 and 1.23."""
    outer = math.prod(shape[: recipe.channel_axis])
    inner = math.prod(shape[recipe.channel_axis + 1 :])
    if outer < 2 or inner < 2 or outer * recipe.num_channels * inner < LARGE_FROM:
        return False
    return outer * recipe.num_channels < FEW_ROWS or inner < SHORT_ROW


def gpu_passes(
    xp: ModuleType, x_compute: Any, recipe: Recipe
) -> tuple[_agnostic.FirstPass, _agnostic.ChannelSums | None]:
    """Pass 1 and pass 2's sums of the GPU statistics for ``x_compute``: batch first
    where :func:`batch_first_layout` says so; else :func:`variadic_first_pass` for
    large float32 inputs; else :func:`._agnostic.first_pass` (three reductions).

    The variadic rule was measured on an H200 in the third GPU session, when pass 1
    had four reductions (a plain and a shrunk sum; both variants traced in one
    process, interleaved; two runs): on three of the four ResNet-like shapes the
    variadic reduce took the training forward from 11 XLA kernels to 8 (7 either way
    on (8, 32, 128, 128)); float32 was between 0.2 % slower and 4.7 % faster; float64
    between 2.4 % slower and 4 % faster on those three and 15 to 36 % slower on
    (8, 32, 128, 128); the (2, 4, 3, 3) call went from 3 kernels to 4 and was 5 to 8 %
    slower. Sizes between 72 and 2**20 elements were not measured."""
    if batch_first_layout(tuple(x_compute.shape), recipe):
        return batch_first_first_pass, batch_first_sums
    if x_compute.dtype == xp.float32 and math.prod(x_compute.shape) >= LARGE_FROM:
        return variadic_first_pass, None
    return _agnostic.first_pass, None


def train_statistics(
    xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float
) -> tuple[_agnostic.Statistics, _agnostic.Centered]:
    """Batch statistics and the centred values, as :func:`._agnostic.batch_statistics`
    with ``prescale=True`` returns them (float32/float64 input, a non-empty batch):
    the ``lax.cond`` route on the CPU, :func:`._agnostic.fused_statistics` elsewhere."""
    first, sums = gpu_passes(xp, x_compute, recipe)
    stats, centered = jax.lax.platform_dependent(
        cpu=lambda: _cpu_statistics(xp, x_compute, recipe, eps),
        default=lambda: _agnostic.fused_statistics(xp, x_compute, recipe, eps, first=first, sums=sums),
    )
    return stats, _agnostic.recentered(xp, x_compute, centered, recipe)


def backward_sums(xp: ModuleType, grad: Any, x: Any, mean: Any, invstd: Any, recipe: Recipe) -> tuple[Any, Any]:
    """``sum(g)`` and ``sum(g * xhat)`` for :func:`._agnostic.backward` (its ``sums``
    hook), the arrays in the compute dtype."""
    axes = recipe.reduce_axes

    def one_pass() -> tuple[Any, Any]:
        grad_bias = xp.sum(grad, axis=axes)
        return grad_bias, (xp.sum(grad * x, axis=axes) - mean * grad_bias) * invstd

    def centred() -> tuple[Any, Any]:
        xhat = (x - xp.reshape(mean, recipe.param_shape)) * xp.reshape(invstd, recipe.param_shape)
        return xp.sum(grad, axis=axes), xp.sum(grad * xhat, axis=axes)

    # NaN statistics fail the test and take the centred sums, as in the agnostic code.
    unsafe = xp.logical_not(xp.all(xp.abs(mean * invstd) <= 1.0))
    return jax.lax.cond(unsafe, centred, one_pass)
