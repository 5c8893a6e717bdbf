"""The one implementation: pure array-API code, no library-specific lines.

Every function takes the namespace ``xp`` and a shape :class:`~._recipe.Recipe`
already validated by the public entry points, and never writes to its
arguments. The rules implemented here are PyTorch's (see docs/semantics.rst).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

from ._compat import device
from ._recipe import Recipe


class Statistics(NamedTuple):
    """Per-channel statistics of one forward call, in the compute dtype."""

    mean: Any
    invstd: Any
    batch_var: Any
    """Biased batch variance (training; None in eval), for the running update."""


def compute_dtype(xp: ModuleType, dtype: Any) -> Any:
    """float32 and float64 compute in themselves; float16 and bfloat16 in
    float32, so sums never overflow or lose the half-precision mantissa."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def _channel(xp: ModuleType, vector: Any, recipe: Recipe, dtype: Any) -> Any:
    """A per-channel vector cast to ``dtype``, shaped to broadcast over the input."""
    return xp.reshape(xp.astype(vector, dtype, copy=False), recipe.param_shape)


def batch_statistics(xp: ModuleType, x_compute: Any, recipe: Recipe, eps: float) -> tuple[Statistics, Any, Any]:
    """Corrected two-pass batch mean and biased variance.

    Pass 1 gives ``mean0``; pass 2 reduces ``centered = x - mean0``, whose own
    mean ``residual`` is the rounding error of pass 1 (large when |mean| >>
    std in float32). Hence ``mean = mean0 + residual`` and
    ``var = mean(centered**2) - residual**2`` (exact algebra), both with an
    error set by the spread of the data rather than its offset. Returns the
    statistics, ``centered`` (reused by the normalization, which folds
    ``-residual`` into its per-channel shift) and ``residual``.
    """
    if recipe.count_per_channel == 0:
        # An empty batch has no statistics: NaN, as NumPy's mean of nothing, but
        # without its warning. The running update is skipped by the caller.
        nan = xp.full((recipe.num_channels,), math.nan, dtype=x_compute.dtype, device=device(x_compute))
        return Statistics(nan, nan, nan), x_compute, None
    mean0 = xp.mean(x_compute, axis=recipe.reduce_axes)
    centered = x_compute - xp.reshape(mean0, recipe.param_shape)
    residual = xp.mean(centered, axis=recipe.reduce_axes)
    batch_var = xp.mean(centered * centered, axis=recipe.reduce_axes) - residual * residual
    invstd = 1.0 / xp.sqrt(batch_var + eps)
    return Statistics(mean0 + residual, invstd, batch_var), centered, residual


def running_statistics(xp: ModuleType, running_mean: Any, running_var: Any, dtype: Any, eps: float) -> Statistics:
    """Eval-mode statistics from the running buffers."""
    mean = xp.astype(running_mean, dtype, copy=False)
    invstd = 1.0 / xp.sqrt(xp.astype(running_var, dtype, copy=False) + eps)
    return Statistics(mean, invstd, None)


def scale_and_shift(
    xp: ModuleType,
    centered: Any,
    invstd: Any,
    weight: Any | None,
    bias: Any | None,
    recipe: Recipe,
    out_dtype: Any,
    *,
    residual: Any | None = None,
) -> Any:
    """y = (centered - residual) * (invstd * weight) + bias, folded into one
    per-channel scale and shift so the full-size work is one multiply and one
    add (``residual``: see :func:`batch_statistics`; None in eval)."""
    dtype = centered.dtype
    scale = invstd if weight is None else invstd * xp.astype(weight, dtype, copy=False)
    shift = None if bias is None else xp.astype(bias, dtype, copy=False)
    if residual is not None:
        shift = -residual * scale if shift is None else shift - residual * scale
    out = centered * xp.reshape(scale, recipe.param_shape)
    if shift is not None:
        out = out + xp.reshape(shift, recipe.param_shape)
    return xp.astype(out, out_dtype, copy=False)


def updated_running_stats(
    xp: ModuleType,
    running_mean: Any,
    running_var: Any,
    batch_mean: Any,
    batch_var: Any,
    recipe: Recipe,
    factor: Any,
) -> tuple[Any, Any]:
    """PyTorch's update: (1 - f) * old + f * new, with the UNBIASED batch variance.

    ``factor`` is a Python float (momentum) or a 0-d array (the cumulative
    average 1 / num_batches_tracked of a module with ``momentum=None``).
    """
    if recipe.count_per_channel == 0:  # empty batch: statistics unchanged (PyTorch)
        return running_mean, running_var
    dtype = batch_mean.dtype
    unbiased_var = batch_var * (recipe.count_per_channel / (recipe.count_per_channel - 1))
    keep = 1.0 - factor
    new_mean = keep * xp.astype(running_mean, dtype, copy=False) + factor * batch_mean
    new_var = keep * xp.astype(running_var, dtype, copy=False) + factor * unbiased_var
    return (
        xp.astype(new_mean, running_mean.dtype, copy=False),
        xp.astype(new_var, running_var.dtype, copy=False),
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
) -> tuple[Any, Any, Any]:
    """Analytic gradients of :func:`scale_and_shift` composed with the statistics.

    training: dx = w * invstd * (g - sum(g)/n - xhat * sum(g * xhat)/n)
    eval:     dx = g * w * invstd   (the statistics are constants)
    """
    dtype = compute_dtype(xp, x.dtype)
    grad = xp.astype(grad_output, dtype, copy=False)
    xhat = (xp.astype(x, dtype, copy=False) - _channel(xp, mean, recipe, dtype)) * _channel(xp, invstd, recipe, dtype)
    grad_bias = xp.sum(grad, axis=recipe.reduce_axes)
    grad_weight = xp.sum(grad * xhat, axis=recipe.reduce_axes)
    invstd_c = xp.astype(invstd, dtype, copy=False)
    scale = invstd_c if weight is None else invstd_c * xp.astype(weight, dtype, copy=False)
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
        xp.astype(grad_input, x.dtype, copy=False),
        xp.astype(grad_weight, param_dtype, copy=False),
        xp.astype(grad_bias, param_dtype, copy=False),
    )
