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
XLA emits a final-reduction kernel for each of pass 1's four reductions; for
large float32 inputs they are one variadic ``lax.reduce`` (:func:`gpu_first_pass`).

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


def variadic_first_pass(xp: ModuleType, x_compute: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any, Any]:
    """:func:`._agnostic.first_pass` as ONE variadic ``lax.reduce``. XLA on a GPU
    splits a large reduction into a partial and a final kernel; it merged the four
    reductions' partial kernels into one but kept four final kernels (read from
    the compiled HLO); this has one of each. The same minima
    and maxima; the sums in another order, so they may differ in the last bits
    (``mean0`` need only be close: the second pass's residual corrects it).

    The input has its gradient stopped: ``lax.reduce`` with a general computation
    has no derivative rule, and none is needed. The scale is a power of two (zero
    derivative) and ``mean0`` only centres the second pass, whose results do not
    depend on it to first order (``mean = mean0 + mean(x - mean0)``, and the
    variance is stationary in ``mean0``)."""
    x_values = jax.lax.stop_gradient(x_compute)
    inf = float("inf")

    def combine(left: tuple[Any, ...], right: tuple[Any, ...]) -> tuple[Any, ...]:
        return (
            jax.lax.min(left[0], right[0]),
            jax.lax.max(left[1], right[1]),
            jax.lax.add(left[2], right[2]),
            jax.lax.add(left[3], right[3]),
        )

    zero = xp.zeros((), dtype=x_values.dtype)
    operands = (x_values, x_values, x_values, x_values * shrink)
    init = (zero + inf, zero - inf, zero, zero)
    low, high, total, shrunk_total = jax.lax.reduce(operands, init, combine, recipe.reduce_axes)
    return low, high, total, shrunk_total


#: Inputs of at least this many elements take the variadic first pass (float32).
VARIADIC_FROM = 2**20


def gpu_first_pass(xp: ModuleType, x_compute: Any) -> Any:
    """Pass 1 of the GPU statistics for ``x_compute``: :func:`variadic_first_pass`
    for float32 inputs of at least :data:`VARIADIC_FROM` elements, else
    :func:`._agnostic.first_pass` (four reductions). Measured on an H200 (the third
    GPU session; both traced in one process, interleaved; two runs): on three of
    the four ResNet-like shapes the variadic reduce took the training forward from
    11 XLA kernels to 8 (7 either way on (8, 32, 128, 128)); float32 was between
    0.2 % slower and 4.7 % faster; float64 between 2.4 % slower and 4 % faster on
    those three and 15 to 36 % slower on (8, 32, 128, 128); the (2, 4, 3, 3) call
    went from 3 kernels to 4 and was 5 to 8 % slower. Sizes between 72 and 2**20
    elements were not measured; 2**20 is the benchmark's boundary of a large input."""
    use_variadic = x_compute.dtype == xp.float32 and math.prod(x_compute.shape) >= VARIADIC_FROM
    return variadic_first_pass if use_variadic else _agnostic.first_pass


def train_statistics(
    xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float
) -> tuple[_agnostic.Statistics, _agnostic.Centered]:
    """Batch statistics and the centred values, as :func:`._agnostic.batch_statistics`
    with ``prescale=True`` returns them (float32/float64 input, a non-empty batch):
    the ``lax.cond`` route on the CPU, :func:`._agnostic.fused_statistics` elsewhere."""
    stats, centered = jax.lax.platform_dependent(
        cpu=lambda: _cpu_statistics(xp, x_compute, recipe, eps),
        default=lambda: _agnostic.fused_statistics(xp, x_compute, recipe, eps, first=gpu_first_pass(xp, x_compute)),
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
