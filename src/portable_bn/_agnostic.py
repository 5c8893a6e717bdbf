"""The one implementation: pure array-API code, no library-specific lines.

Every function takes the namespace ``xp`` and a shape :class:`~._recipe.Recipe`
already validated by the public entry points, and never writes to its
arguments. The rules implemented here are PyTorch's (see docs/semantics.rst).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from ._compat import device, multiply_add
from ._recipe import Recipe


class Statistics(NamedTuple):
    """Per-channel statistics of one forward call, in the compute dtype."""

    mean: Any
    invstd: Any
    batch_var: Any
    """Biased batch variance (training; None in eval), for the running update."""


class Centered(NamedTuple):
    """The full-size intermediate the normalization starts from."""

    values: Any
    """``x`` (possibly scaled by a power of two) minus a per-channel mean."""
    residual: Any
    """Per-channel mean of ``values`` still to subtract (None: none)."""
    invstd: Any
    """``1 / sqrt(var + eps)`` in the units of ``values``."""
    mean0: Any = None
    """Per-channel mean subtracted from the (scaled) ``x`` to give ``values`` (None: not kept)."""
    prescale: Any = None
    """Per-channel power of two ``x`` was multiplied by (None: none)."""


def recentered(xp: ModuleType, x_compute: Any, centered: Centered, recipe: Recipe) -> Centered:
    """``centered`` with its ``values`` formed again from ``x_compute`` and the
    per-channel vectors: the same operations, so the same numbers. A caller
    that must pass results through a boundary (``jax.lax.cond``) passes only the
    vectors; the full-size values are then formed where they are consumed, and
    a compiler fuses them into the output instead of storing them."""
    values = x_compute
    if centered.prescale is not None:
        values = values * xp.reshape(centered.prescale, recipe.param_shape)
    values = values - xp.reshape(centered.mean0, recipe.param_shape)
    return centered._replace(values=values)


def compute_dtype(xp: ModuleType, dtype: Any) -> Any:
    """float32 and float64 compute in themselves; float16 and bfloat16 in
    float32, so sums never overflow or lose the half-precision mantissa."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def _as(xp: ModuleType, array: Any, dtype: Any) -> Any:
    """``astype`` that costs nothing when the dtype is already right (small calls)."""
    return array if array.dtype == dtype else xp.astype(array, dtype)


def _channel(xp: ModuleType, vector: Any, recipe: Recipe, dtype: Any) -> Any:
    """A per-channel vector cast to ``dtype``, shaped to broadcast over the input."""
    return xp.reshape(_as(xp, vector, dtype), recipe.param_shape)


def power_of_two_scale(xp: ModuleType, low: Any, high: Any) -> Any:
    """Per-channel ``2**-k`` with ``k = min(max(0, floor(log2(max|x|))), 126 or 1022)``, from the
    channel minima ``low`` and maxima ``high``.

    Multiplying by it brings every channel into ``[-2, 2]`` so squares cannot
    overflow (float32 squares overflow from |x| ~ 1.8e19). Scaling by a power
    of two is exact, so ordinary data give bit-for-bit the results they would
    give unscaled; channels with |x| <= 1 get exactly 1. A channel holding Inf
    gets 0 (its statistics become NaN, as they must); NaN keeps 1. ``k`` is at
    most the exponent of the smallest normal number (126 in float32): a
    subnormal scale would be flushed to zero where a library computes with
    flush-to-zero (CuPy's kernels do), and ``2**-126`` already brings the
    largest float32 into ``[-4, 4]``.
    """
    largest = xp.maximum(high, -low)
    largest = xp.where(largest > 1.0, largest, xp.ones_like(largest))  # also NaN -> 1
    most = -math.log2(xp.finfo(largest.dtype).smallest_normal)
    return 2.0 ** -xp.minimum(xp.floor(xp.log2(largest)), xp.full_like(largest, most))


def batch_statistics(
    xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float, *, prescale: bool, want_var: bool
) -> tuple[Statistics, Centered]:
    """Corrected two-pass batch mean and biased variance.

    Pass 1 gives ``mean0``; pass 2 reduces ``centered = x - mean0``, whose own
    mean ``residual`` is the rounding error of pass 1 (large when |mean| >>
    std in float32). Hence ``mean = mean0 + residual`` and
    ``var = mean(centered**2) - residual**2`` (exact algebra), both with an
    error set by the spread of the data rather than its offset.

    With ``prescale`` (float32/float64 input; float16/bfloat16 input computed
    in float32 cannot overflow) ``x`` is first multiplied by
    :func:`power_of_two_scale`, and ``eps`` by its square (kept above the
    smallest normal number, so a constant channel of huge values still
    divides by a positive number); a constant channel takes its value as its
    exact mean. The statistics are scaled back, exactly, before they are
    returned. ``batch_var`` (only computed if ``want_var``, i.e. for a running
    update) overflows to Inf when the true variance is beyond the dtype's
    range -- the one place such data still overflow, with NumPy's warning.

    Returns the statistics (in the input's units) and the :class:`Centered`
    intermediate (in the scaled units) that :func:`scale_and_shift` reuses.
    """
    if recipe.count_per_channel == 0:
        # An empty batch has no statistics: NaN, as NumPy's mean of nothing, but
        # without its warning. The running update is skipped by the caller.
        nan = xp.full((recipe.num_channels,), math.nan, dtype=x_compute.dtype, device=device(x_compute))
        return Statistics(nan, nan, nan), Centered(x_compute, None, nan)
    eps_scaled: Any = eps
    scale = None
    if prescale:
        low = xp.min(x_compute, axis=recipe.reduce_axes)
        high = xp.max(x_compute, axis=recipe.reduce_axes)
        scale = power_of_two_scale(xp, low, high)
        x_compute = x_compute * xp.reshape(scale, recipe.param_shape)
        eps_scaled = _scaled_epsilon(xp, eps, scale)
    mean0 = xp.mean(x_compute, axis=recipe.reduce_axes)
    if scale is not None:
        mean0 = xp.where(low == high, high * scale, mean0)  # constant channel: centered is exactly 0
    return _corrected(xp, x_compute, mean0, scale, eps_scaled, recipe, eps=eps, want_var=want_var)


def _corrected(
    xp: ModuleType,
    x_compute: Any,
    mean0: Any,
    scale: Any,
    eps_scaled: Any,
    recipe: Recipe,
    *,
    eps: float,
    want_var: bool,
    sums: ChannelSums | None = None,
) -> tuple[Statistics, Centered]:
    """The second pass of the corrected two-pass algorithm: ``x_compute`` (already
    multiplied by ``scale``, if any) centred on ``mean0``, the residual mean and the
    variance; statistics returned in the input's units. ``sums`` (default: ``xp.mean``
    of each) computes the per-channel sums of the centred values and their squares."""
    centered = x_compute - xp.reshape(mean0, recipe.param_shape)
    if sums is None:
        residual = xp.mean(centered, axis=recipe.reduce_axes)
        mean_square = xp.mean(centered * centered, axis=recipe.reduce_axes)
    else:
        count = float(recipe.count_per_channel)
        total, square_total = sums(xp, (centered, centered * centered), recipe)
        residual, mean_square = total / count, square_total / count
    batch_var = mean_square - residual * residual
    invstd = 1.0 / xp.sqrt(batch_var + eps_scaled)
    normalizer = Centered(centered, residual, invstd, mean0, scale)
    mean = mean0 + residual
    if scale is not None:  # back to the input's units (exact: powers of two, one at a time)
        mean = mean / scale
        # The floor on eps * scale**2 serves the output only (a constant channel's values are
        # exactly 0 there); the invstd returned is 1 / sqrt(var + eps) wherever the variance
        # fits the dtype, so a constant channel of huge values gets 1 / sqrt(eps). "Fits" is
        # var_s / scale**2 <= largest, tested without overflow (var_s <= 4, scale >= 2**-126).
        largest = float(xp.finfo(batch_var.dtype).max)
        fits = batch_var * 0.25 / scale <= (largest * 0.25) * scale
        var_in_range = xp.where(fits, batch_var, xp.zeros_like(batch_var)) / scale / scale
        invstd = xp.where(fits, 1.0 / xp.sqrt(var_in_range + eps), invstd * scale)
        batch_var = batch_var / scale / scale if want_var else None
    return Statistics(mean, invstd, batch_var), normalizer


def _scaled_epsilon(xp: ModuleType, eps: float, scale: Any) -> Any:
    """``eps * scale**2``, kept above the smallest normal number (a constant channel of
    huge values must still divide by a positive number)."""
    return xp.maximum(eps * scale * scale, xp.full_like(scale, xp.finfo(scale.dtype).smallest_normal))


FirstPass = Callable[[ModuleType, Any, Recipe, float], tuple[Any, Any, Any]]
"""``first(xp, x_compute, recipe, shrink)`` -> per-channel ``(min(x), max(x), sum(x * shrink))``."""

ChannelSums = Callable[[ModuleType, tuple[Any, ...], Recipe], tuple[Any, ...]]
"""``sums(xp, arrays, recipe)`` -> the per-channel sum of each full-size array."""


def first_pass(xp: ModuleType, x_compute: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
    """:func:`fused_statistics`' first pass, three reductions of ``x_compute``:
    ``(min(x), max(x), sum(x * shrink))`` per channel."""
    axes = recipe.reduce_axes
    low, high = xp.min(x_compute, axis=axes), xp.max(x_compute, axis=axes)
    return low, high, xp.sum(x_compute * shrink, axis=axes)


def fused_statistics(
    xp: ModuleType,
    x_compute: Any,
    recipe: Recipe,
    eps: float,
    *,
    first: FirstPass = first_pass,
    sums: ChannelSums | None = None,
) -> tuple[Statistics, Centered]:
    """:func:`batch_statistics` with ``prescale=True``, in two reading passes of ``x``
    instead of three, for compilers that can compute several reductions of one input
    in one pass (XLA on GPUs).

    Pass 1 takes, side by side, ``min(x)``, ``max(x)`` (for the prescale) and the sum of
    ``x * 2**-k`` with ``2**k >= n`` (n the count per channel), which cannot overflow;
    ``mean0`` is that sum times ``2**k`` and the prescale, divided by n. Scaling by a
    power of two is exact, so this is the mean of ``x`` times the prescale, bit for bit,
    except where ``x * 2**-k`` is subnormal (``|x|`` below ``2**k`` times the smallest
    normal number), which costs ``mean0`` bits that pass 2's residual corrects. Pass 2 is
    the corrected algorithm's, on ``x`` times the prescale: ``mean0`` need not be exact,
    only close (the residual corrects it), and it is as close as the agnostic ``mean0``.
    NaN and Inf give NaN statistics, as there. Float32/float64 input, a non-empty batch.
    ``Centered.values`` is None: form it with :func:`recentered`. ``first`` computes
    pass 1 (:func:`first_pass`'s three results) and ``sums`` pass 2's two sums (default
    ``xp.mean``); a backend may compute them in other orders (:mod:`._jax_fast`).
    """
    count = recipe.count_per_channel
    shrink = 2.0 ** -(count - 1).bit_length()  # 2**-k, k = ceil(log2(n))
    low, high, shrunk_total = first(xp, x_compute, recipe, shrink)
    scale = power_of_two_scale(xp, low, high)
    mean0 = shrunk_total * (scale / shrink) / float(count)  # scale / shrink: a power of two, exact
    mean0 = xp.where(low == high, high * scale, mean0)  # constant channel: centered is exactly 0
    scaled = x_compute * xp.reshape(scale, recipe.param_shape)
    eps_scaled = _scaled_epsilon(xp, eps, scale)
    stats, centered = _corrected(xp, scaled, mean0, scale, eps_scaled, recipe, eps=eps, want_var=True, sums=sums)
    return stats, centered._replace(values=None)


def one_pass_statistics(xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float) -> tuple[Statistics, Centered]:
    """Mean and biased variance from ``mean(x)`` and ``mean(x**2)``: two reductions of
    ``x`` itself, with no full-size intermediate (a compiler reads ``x`` once for
    each, or once for both). ``Centered.values`` is None: form it with :func:`recentered`.

    Trustworthy only where ``mean**2 <= var`` for every channel (see
    :func:`one_pass_unsafe`): then ``mean(x**2) <= 2 var``, so the subtraction
    ``var = mean(x**2) - mean**2`` loses at most one bit, and leaving out the
    corrected algorithm's residual (the rounding error of the mean, about
    ``u * |mean|``) moves the output by about ``u * |mean| / std <= u``, what
    that residual's own sum rounds anyway.
    """
    mean0 = xp.mean(x_compute, axis=recipe.reduce_axes)
    batch_var = xp.mean(x_compute * x_compute, axis=recipe.reduce_axes) - mean0 * mean0
    invstd = 1.0 / xp.sqrt(batch_var + eps)
    centered = Centered(None, xp.zeros_like(mean0), invstd, mean0, xp.ones_like(mean0))
    return Statistics(mean0, invstd, batch_var), centered


def one_pass_unsafe(xp: ModuleType, stats: Statistics) -> Any:
    """0-d bool: :func:`one_pass_statistics` cannot be used -- a channel with
    ``mean**2 > var`` (cancellation), or statistics :func:`needs_prescale` rejects."""
    return xp.any(stats.mean * stats.mean > stats.batch_var) | needs_prescale(xp, stats)


def needs_prescale(xp: ModuleType, stats: Statistics) -> Any:
    """0-d bool: statistics computed without prescaling that cannot be trusted --
    a variance that overflowed (or NaN/Inf data), or a spread at the rounding
    level of the mean (a numerically constant channel, which prescaling makes
    exact)."""
    spread = xp.sqrt(stats.batch_var)
    resolution = (8 * xp.finfo(stats.mean.dtype).eps) * xp.abs(stats.mean)
    suspicious = (spread <= resolution) & (stats.mean != 0.0)
    return xp.any(~xp.isfinite(stats.batch_var)) | xp.any(suspicious)


def running_statistics(xp: ModuleType, running_mean: Any, running_var: Any, dtype: Any, eps: float) -> Statistics:
    """Eval-mode statistics from the running buffers."""
    mean = _as(xp, running_mean, dtype)
    invstd = 1.0 / xp.sqrt(_as(xp, running_var, dtype) + eps)
    return Statistics(mean, invstd, None)


def scale_and_shift(
    xp: ModuleType, centered: Centered, weight: Any | None, bias: Any | None, recipe: Recipe, out_dtype: Any
) -> Any:
    """y = (values - residual) * (invstd * weight) + bias, folded into one
    per-channel scale and shift so the full-size work is one multiply and one add."""
    dtype = centered.values.dtype
    scale = centered.invstd if weight is None else centered.invstd * _as(xp, weight, dtype)
    shift = None if bias is None else _as(xp, bias, dtype)
    if centered.residual is not None:
        shift = -centered.residual * scale if shift is None else shift - centered.residual * scale
    if shift is None:
        out = centered.values * xp.reshape(scale, recipe.param_shape)
    else:
        out = multiply_add(
            xp, centered.values, xp.reshape(scale, recipe.param_shape), xp.reshape(shift, recipe.param_shape)
        )
    return _as(xp, out, out_dtype)


def updated_running_stats(
    xp: ModuleType,
    running_mean: Any,
    running_var: Any,
    batch_mean: Any,
    batch_var: Any,
    recipe: Recipe,
    factor: Any,
    *,
    skip_nonfinite: bool = False,
) -> tuple[Any, Any]:
    """PyTorch's update: (1 - f) * old + f * new, with the UNBIASED batch variance.

    ``factor`` is a Python float (momentum) or a 0-d array (the cumulative
    average 1 / num_batches_tracked of a module with ``momentum=None``).
    With ``skip_nonfinite``, a channel whose batch mean or variance is NaN or
    Inf keeps its old values (a per-channel ``where``: no host sync, jit-safe).
    """
    if recipe.count_per_channel == 0:  # empty batch: statistics unchanged (PyTorch)
        return running_mean, running_var
    dtype = batch_mean.dtype
    unbiased_var = batch_var * (recipe.count_per_channel / (recipe.count_per_channel - 1))
    keep = 1.0 - factor
    new_mean = keep * _as(xp, running_mean, dtype) + factor * batch_mean
    new_var = keep * _as(xp, running_var, dtype) + factor * unbiased_var
    if skip_nonfinite:
        finite = xp.isfinite(batch_mean) & xp.isfinite(unbiased_var)
        new_mean = xp.where(finite, new_mean, _as(xp, running_mean, dtype))
        new_var = xp.where(finite, new_var, _as(xp, running_var, dtype))
    return (
        _as(xp, new_mean, running_mean.dtype),
        _as(xp, new_var, running_var.dtype),
    )


def backward(
    xp: ModuleType,
    grad_output: Any,
    x: Any,
    weight: Any | None,
    mean: Any,
    invstd: Any,
    recipe: Recipe,
    *,
    training: bool,
    sums: Any = None,
) -> tuple[Any, Any, Any]:
    """Analytic gradients of :func:`scale_and_shift` composed with the statistics.

    training: dx = w * invstd * (g - sum(g)/n - xhat * sum(g * xhat)/n)
    eval:     dx = g * w * invstd   (the statistics are constants)

    ``sums(xp, grad, x, mean, invstd, recipe)``, if given, returns ``sum(g)`` and
    ``sum(g * xhat)`` (all in the compute dtype) in place of the plain reductions.
    """
    dtype = compute_dtype(xp, x.dtype)
    grad = _as(xp, grad_output, dtype)
    x_c = _as(xp, x, dtype)
    xhat = (x_c - _channel(xp, mean, recipe, dtype)) * _channel(xp, invstd, recipe, dtype)
    if sums is None:
        grad_bias = xp.sum(grad, axis=recipe.reduce_axes)
        grad_weight = xp.sum(grad * xhat, axis=recipe.reduce_axes)
    else:
        grad_bias, grad_weight = sums(xp, grad, x_c, _as(xp, mean, dtype), _as(xp, invstd, dtype), recipe)
    invstd_c = _as(xp, invstd, dtype)
    scale = invstd_c if weight is None else invstd_c * _as(xp, weight, dtype)
    if training:
        count = max(recipe.count_per_channel, 1)  # n = 0: every sum is 0 and grad_input is empty
        grad = (
            grad
            - xp.reshape(grad_bias / count, recipe.param_shape)
            - xhat * xp.reshape(grad_weight / count, recipe.param_shape)
        )
    grad_input = grad * xp.reshape(scale, recipe.param_shape)
    param_dtype = dtype if weight is None else weight.dtype
    return (
        _as(xp, grad_input, x.dtype),
        _as(xp, grad_weight, param_dtype),
        _as(xp, grad_bias, param_dtype),
    )
