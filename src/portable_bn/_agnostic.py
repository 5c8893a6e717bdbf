"""The one implementation of batch normalization: every rule, in pure array-API code.

Every function here takes the array namespace ``xp`` or a primitive set ``prims``
(:class:`._primitives.Primitives`, whose ``prims.xp`` is the namespace), and a shape
:class:`~._recipe.Recipe` already validated by the public entry points; none writes to its
arguments. The rules are PyTorch's (docs/semantics.rst), each stated once, here:

- the compute dtype (:func:`compute_dtype`), the running update (:func:`update_factor`,
  :func:`unbiased_variance`, :func:`updated_running_stats`, ``skip_nonfinite`` included),
  the empty batch (:func:`train_forward`);
- what makes statistics trustworthy (:func:`untrusted`, the numerically-constant-channel
  threshold :data:`CONSTANT_CHANNEL_ULPS`), when an output may skip a subtraction
  (:data:`SHORT_FORM_MEAN_OVER_STD`) and when a native kernel's result is kept
  (:func:`native_train_forward`, :func:`native_eval_forward`).

Statistics are per-channel moments ``(count, mean, M2)`` about a shift, of the input times a
per-channel power of two (:class:`Moments`); moments merge exactly (:func:`merge_moments`).
Full-size work goes through the primitives (reductions, the fused scale-and-shift); the
per-channel arithmetic through ``prims.per_channel``, which runs a function of this module
as it is, or compiles it (CuPy). Where a compiled kernel reads the input once for its block
moments (``prims.one_read``: Numba, Triton), those are the statistics, with no choice and
nothing to verify (:func:`one_read_moments`). Otherwise, where a backend can choose by values
(``prims.branches``: eager arrays, ``jax.lax.cond``), the statistics take the cheapest route
that is as exact; elsewhere always the prescaled two-pass route, which is exact on any data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._compat import detach, device
from ._recipe import SAMPLE_SIZE, Recipe

if TYPE_CHECKING:
    from ._primitives import NativeKernels, Primitives

# --------------------------------------------------------------------------- rules

CONSTANT_CHANNEL_ULPS = 8
"""A channel whose standard deviation is at most this many units of the dtype's precision
times its mean is numerically constant: its statistics are taken again, prescaled, which
makes a constant channel exact (its values minus its mean are exactly 0)."""

SHORT_FORM_MEAN_OVER_STD = 1.0
"""An output (or input gradient) may be computed as ``x * a + b`` instead of ``(x - m) * a + b``
where every channel has ``|mean| <= this * std`` or ``|mean * a| <= 1``: the extra rounding of
``x * a`` is then within what the longer form rounds anyway."""

NATIVE_MEAN_OVER_STD = 8.0
"""A native kernel that computes ``x * alpha + beta`` (PyTorch's CPU kernels) is kept where every
channel has ``|mean| <= this * std``: about 1.5 roundings more at 8 standard deviations
(measured), inside the conformance tolerance; beyond, the shared algorithm runs instead."""


def compute_dtype(xp: ModuleType, dtype: Any) -> Any:
    """float32 and float64 compute in themselves; float16 and bfloat16 in float32, so sums
    never overflow or lose the half-precision mantissa (PyTorch's rule)."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def update_factor(xp: ModuleType, momentum: float | None, num_batches_tracked: Any, dtype: Any) -> Any:
    """Weight of the new batch in a module's running update: ``momentum``, or, for
    ``momentum=None``, the cumulative average ``1 / num_batches_tracked`` (the counter already
    counts this batch) as a 0-d array of ``dtype`` (no host synchronisation)."""
    if momentum is not None:
        return momentum
    return 1.0 / xp.astype(num_batches_tracked, dtype)


def unbiased_variance(xp: ModuleType, var: Any, count: Any) -> Any:
    """The running variance takes the unbiased batch variance, ``var * n / (n - 1)`` (PyTorch).
    (Per-channel counts as arrays divide by at least 1: where ``n < 2`` the running statistics
    keep their values, see :func:`updated_running_stats`.)"""
    if not _per_channel(count):
        return var * (count / (count - 1))
    return var * (count / xp.maximum(count - 1.0, xp.ones_like(count)))


def updated_running_stats(
    xp: ModuleType,
    running_mean: Any,
    running_var: Any,
    batch_mean: Any,
    batch_var: Any,
    factor: Any,
    *,
    count: Any,
    skip_nonfinite: bool,
    unbiased: bool = True,
) -> tuple[Any, Any]:
    """PyTorch's update ``(1 - f) * old + f * new`` in the batch statistics' dtype, the variance
    unbiased; results in the running statistics' dtype.

    ``factor`` is a Python float (momentum) or a 0-d array (:func:`update_factor`). With
    ``unbiased=False`` the variance enters biased (Keras, Flax and ONNX store that one).
    ``count`` is a Python int (never below 2 here: the callers check), or per-channel counts
    known only as arrays (masks, replicas), where a channel of fewer than two values keeps its
    old values: it has no unbiased variance, and an empty one no statistics (PyTorch's rule for
    an empty batch; with ``unbiased=False``, only an empty one). With ``skip_nonfinite``, a
    channel whose batch mean or variance is NaN or Inf keeps
    its old values too (a per-channel ``where``: no host synchronisation)."""
    dtype = batch_mean.dtype
    old_mean, old_var = _as(xp, running_mean, dtype), _as(xp, running_var, dtype)
    new_var = unbiased_variance(xp, batch_var, count) if unbiased else batch_var
    keep = 1.0 - factor
    updated_mean = keep * old_mean + factor * batch_mean
    updated_var = keep * old_var + factor * new_var
    keep_old = None
    if _per_channel(count):
        keep_old = count < (2.0 if unbiased else 1.0)
    if skip_nonfinite:
        nonfinite = ~(xp.isfinite(batch_mean) & xp.isfinite(new_var))
        keep_old = nonfinite if keep_old is None else keep_old | nonfinite
    if keep_old is not None:
        updated_mean = xp.where(keep_old, old_mean, updated_mean)
        updated_var = xp.where(keep_old, old_var, updated_var)
    return _as(xp, updated_mean, running_mean.dtype), _as(xp, updated_var, running_var.dtype)


def untrusted(xp: ModuleType, mean: Any, var: Any, dtype: Any, offset: Any = None) -> Any:
    """Per channel: statistics taken without prescaling that cannot be used -- a variance
    beyond ``dtype``'s range (overflow, NaN or Inf data), or a spread at the rounding level of
    the mean (numerically constant: :data:`CONSTANT_CHANNEL_ULPS`); with ``offset`` (the mean of
    the values minus the shift they were summed about), also a variance below ``offset**2``,
    where ``squares / n - offset**2`` cancels. (A square that overflows only rejects more.)"""
    info = xp.finfo(dtype)
    resolution = (CONSTANT_CHANNEL_ULPS * float(info.eps)) * xp.abs(mean)
    floor = resolution * resolution
    if offset is not None:
        floor = xp.maximum(floor, offset * offset)
    return ~(var <= float(info.max)) | (var < floor)


def _short_form(xp: ModuleType, mean: Any, invstd: Any, scale: Any) -> Any:
    """Per channel: ``x * scale + (b - mean * scale)`` may stand for ``(x - mean) * scale + b``:
    ``|mean| * invstd <= T`` (:data:`SHORT_FORM_MEAN_OVER_STD`) or ``|mean * scale| <= 1``. The
    extra rounding of ``x * scale`` is then within what the longer form rounds anyway, on the
    normwise scale ``max(1, max|y|)``. (Written with ``invstd``, not ``mean**2 <= var``: squares
    of huge data overflow, and an overflow must not pass.)"""
    return (xp.abs(mean) * invstd <= SHORT_FORM_MEAN_OVER_STD) | (xp.abs(mean * scale) <= 1.0)


def _as(xp: ModuleType, array: Any, dtype: Any) -> Any:
    """``astype`` that costs nothing when the dtype is already right."""
    return array if array.dtype == dtype else xp.astype(array, dtype)


# ------------------------------------------------------------------------ moments


class ShiftedSums(NamedTuple):
    """Per-channel sums of ``c = x * scale - shift`` and of ``c**2``: what one reading pass gives."""

    shift: Any
    """Per channel, a value of the dtype close to the mean of ``x * scale`` (or None: 0)."""
    total: Any
    squares: Any
    scale: Any
    """Per-channel power of two (None: 1)."""


class Moments(NamedTuple):
    """Per-channel moments of ``x * scale``, about ``shift``."""

    count: Any
    """Values per channel (a Python int, or an array)."""
    shift: Any
    """Per-channel value of the dtype the moments are taken about (None: 0)."""
    mean: Any
    """Mean of ``x * scale - shift``."""
    m2: Any
    """Sum of the squared deviations of ``x * scale`` from its mean."""
    scale: Any
    """Per-channel power of two ``x`` was multiplied by (None: 1), so that nothing overflows."""


def moments_from_sums(xp: ModuleType, sums: ShiftedSums, count: Any) -> Moments:
    """The moments of one pass's sums: ``mean = total / n``, ``M2 = squares - total * mean``
    (0 and 0 for no values)."""
    mean = _ratio(xp, sums.total, count)
    return Moments(count, sums.shift, mean, sums.squares - sums.total * mean, sums.scale)


def merge_moments(xp: ModuleType, first: Moments, second: Moments) -> Moments:
    """Moments of the union of two sets of values (Chan, Golub and LeVeque's parallel formula):
    ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n``,
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``; about ``first``'s shift, in the finer of the
    two scales (powers of two: the rescaling is exact). A set of no values changes nothing."""
    if first.scale is not None or second.scale is not None:
        scale = _finer(xp, first.scale, second.scale)
        first, second = _rescaled(xp, first, scale), _rescaled(xp, second, scale)
    else:
        scale = None
    delta = second.mean - first.mean
    if first.shift is not None or second.shift is not None:
        delta = delta + (_zero_if_none(xp, second.shift, delta) - _zero_if_none(xp, first.shift, delta))
    count = first.count + second.count
    weight = _ratio(xp, second.count, count)
    mean = first.mean + delta * weight
    m2 = first.m2 + second.m2 + delta * delta * (first.count * weight)
    return Moments(count, first.shift, mean, m2, scale)


def _finer(xp: ModuleType, a: Any, b: Any) -> Any:
    if a is None:
        return xp.minimum(b, xp.ones_like(b))
    if b is None:
        return xp.minimum(a, xp.ones_like(a))
    return xp.minimum(a, b)


def _rescaled(xp: ModuleType, moments: Moments, scale: Any) -> Moments:
    """``moments`` of ``x * scale`` instead of ``x * moments.scale`` (``scale`` the finer)."""
    ratio = scale if moments.scale is None else scale / moments.scale
    shift = None if moments.shift is None else moments.shift * ratio
    return moments._replace(shift=shift, mean=moments.mean * ratio, m2=moments.m2 * ratio * ratio, scale=scale)


def _zero_if_none(xp: ModuleType, value: Any, like: Any) -> Any:
    return xp.zeros_like(like) if value is None else value


def _per_channel(count: Any) -> bool:
    """Whether a count is a vector (per channel, known where the data is) rather than a scalar
    (a Python int; where the per-channel arithmetic is compiled, a traced scalar of ndim 0)."""
    return getattr(count, "ndim", 0) > 0


def _ratio(xp: ModuleType, part: Any, whole: Any) -> Any:
    """``part / whole``, 0 where ``whole`` is 0 (an empty set merges as nothing)."""
    if not _per_channel(whole):
        return 0.0 if isinstance(whole, int) and whole == 0 else part / whole
    quotient = part / xp.maximum(whole, xp.ones_like(whole))
    return xp.where(whole > 0, quotient, xp.zeros_like(quotient))


class Statistics(NamedTuple):
    """Per-channel statistics of one batch, in the moments' dtype."""

    mean: Any
    var: Any
    """Biased variance; Inf where it is beyond the dtype's range."""
    invstd: Any
    """``1 / sqrt(var + eps)``."""
    normalizer: Any
    """``invstd`` in the units of ``x * scale`` (what the output multiplies ``x * scale - shift`` by)."""


def statistics(xp: ModuleType, moments: Moments, eps: float, *, dtype: Any) -> Statistics:
    """Mean, variance and ``invstd`` of the moments, in the input's units and the moments' dtype.

    Prescaled moments (``scale`` not None) are scaled back exactly. The normalizer divides by
    ``sqrt(var_s + max(eps * scale**2, smallest normal of dtype))``: the floor keeps a constant
    channel of huge values (whose scaled ``eps`` underflows) dividing by a positive number, a
    finite normalizer in the compute ``dtype``, and serves only the output, where that
    channel's values are exactly 0. The ``invstd`` returned is ``1 / sqrt(var + eps)`` wherever
    the variance fits the moments' dtype (so that channel gets ``1 / sqrt(eps)``), else the
    normalizer scaled back."""
    var_s = _ratio(xp, moments.m2, moments.count)  # no values: mean 0, variance 0
    shift = moments.shift
    mean = moments.mean if shift is None else _as(xp, shift, var_s.dtype) + moments.mean
    if moments.scale is None:
        invstd = 1.0 / xp.sqrt(var_s + eps)
        return Statistics(mean, var_s, invstd, invstd)
    scale = _as(xp, moments.scale, var_s.dtype)
    floor = xp.full_like(scale, float(xp.finfo(dtype).smallest_normal))
    normalizer = 1.0 / xp.sqrt(var_s + xp.maximum(eps * scale * scale, floor))
    # var_s / scale**2 <= largest, tested without overflow (var_s <= 4, scale >= smallest normal)
    fits = var_s * 0.25 / scale <= (float(xp.finfo(var_s.dtype).max) * 0.25) * scale
    var = xp.where(fits, var_s, xp.zeros_like(var_s)) / scale / scale
    invstd = xp.where(fits, 1.0 / xp.sqrt(var + eps), normalizer * scale)
    beyond = xp.where(var_s > 0.0, xp.full_like(var_s, math.inf), var_s)  # Inf; NaN stays NaN
    return Statistics(mean / scale, xp.where(fits, var, beyond), invstd, normalizer)


def power_of_two_scale(xp: ModuleType, low: Any, high: Any) -> Any:
    """Per-channel ``2**-k``, ``k = min(max(0, floor(log2(max|x|))), -log2(smallest normal))``,
    from the channels' minima and maxima (in the input's dtype).

    Multiplying by it brings every channel into ``[-2, 2]``, so squares cannot overflow;
    being a power of two it is exact, and channels with ``|x| <= 1`` get exactly 1. A channel
    holding Inf gets 0 (its statistics become NaN, as they must); NaN keeps 1. ``k`` stops at
    the exponent of the smallest normal number (126 in float32): a subnormal scale would be
    flushed to zero where a library computes with flush-to-zero, and ``2**-126`` already brings
    the largest float32 into ``[-4, 4]``."""
    largest = xp.maximum(high, -low)
    largest = xp.where(largest > 1.0, largest, xp.ones_like(largest))  # also NaN -> 1
    most = -math.log2(float(xp.finfo(largest.dtype).smallest_normal))
    return 2.0 ** -xp.minimum(xp.floor(xp.log2(largest)), xp.full_like(largest, most))


# --------------------------------------------------------------- the routes to a batch's sums


def batch_statistics(
    prims: Primitives, x: Any, recipe: Recipe, finish: Callable[[ShiftedSums, str | None], Any]
) -> tuple[ShiftedSums, Any]:
    """The sums of a non-empty batch ``x`` (in its compute dtype), about a shift close enough to
    the mean that its moments lose at most a bit, and ``finish(sums, verdict)`` of them: the
    per-channel vectors, with a field ``unsafe`` saying where the ``verdict`` rejects them.

    Without value-dependent choices: the prescaled route (:func:`prescaled_sums`), exact on any
    data (verdict None). With them: one reading pass about a guessed shift
    (:func:`sample_shift`), kept unless the guess was off by more than a standard deviation or
    :func:`untrusted` rejects the statistics (verdict ``"shift"``); then a pass about the mean
    just found (the corrected two-pass algorithm), kept unless :func:`untrusted` rejects it
    (verdict ``"mean"``); then the prescaled route. Returns the sums and the vectors, ``unsafe``
    None."""
    xp = prims.xp

    def prescaled() -> tuple[ShiftedSums, Any]:
        sums = prescaled_sums(prims, x, recipe)
        return sums, finish(sums, None)

    if not prims.branches:
        return prescaled()
    quick = shifted_sums(prims, x, recipe, None, sample_shift(xp, x, recipe))
    quick_vectors = finish(quick, "shift")

    def about_the_mean() -> tuple[ShiftedSums, Any]:
        again = shifted_sums(prims, x, recipe, None, quick_vectors.mean)
        vectors = finish(again, "mean")
        return prims.branch(xp.any(vectors.unsafe), prescaled, lambda: (again, vectors._replace(unsafe=None)))

    return prims.branch(
        xp.any(quick_vectors.unsafe), about_the_mean, lambda: (quick, quick_vectors._replace(unsafe=None))
    )


def one_read_moments(prims: Primitives, x: Any, recipe: Recipe, count: Any) -> Moments:
    """The moments of a non-empty batch ``x`` (in its compute dtype) from the backend's compiled
    block-moments kernel (``prims.one_read(x)``): exact on any data in one read, so no route is
    chosen and nothing verified. They are taken about their mean rounded to the dtype, the
    value the output subtracts (:func:`_about_the_mean`)."""
    shift, mean, m2, scale = prims.block_moments(x, recipe)
    shift, mean = prims.per_channel(_about_the_mean, shift, mean, dtype=x.dtype)
    return Moments(count, shift, mean, m2, scale)


def _about_the_mean(xp: ModuleType, shift: Any, mean: Any, *, dtype: Any) -> tuple[Any, Any]:
    """A mean about ``shift`` (None: 0) retaken about itself rounded to ``dtype``: that value,
    and the mean's remainder (the difference of two close numbers: exact)."""
    rounded = _as(xp, mean if shift is None else shift + mean, dtype)
    if shift is None:
        return rounded, mean - _as(xp, rounded, mean.dtype)
    return rounded, (shift - _as(xp, rounded, shift.dtype)) + mean


def shifted_sums(prims: Primitives, x: Any, recipe: Recipe, scale: Any, shift: Any) -> ShiftedSums:
    total, squares = prims.shifted_sums(x, recipe, scale, shift)
    return ShiftedSums(shift, total, squares, scale)


def sample_shift(xp: ModuleType, x: Any, recipe: Recipe) -> Any:
    """A guess of each channel's mean: the mean of the batch where a channel has no more values
    than a sample holds, else of a few values (:attr:`~._recipe.Recipe.sample_index`) where
    those are off-centre (``mean**2 > var`` among them), else 0 (no subtraction)."""
    count = recipe.count_per_channel
    if count is not None and count <= SAMPLE_SIZE:
        return xp.mean(x, axis=recipe.reduce_axes)
    sample = x[recipe.sample_index]
    mean = xp.mean(sample, axis=recipe.reduce_axes)
    deviation = sample - xp.reshape(mean, recipe.param_shape)
    var = xp.mean(deviation * deviation, axis=recipe.reduce_axes)
    return xp.where(mean * mean <= var, xp.zeros_like(mean), mean)


def _verdict(xp: ModuleType, moments: Moments, mean: Any, var: Any, verdict: str | None, dtype: Any) -> Any:
    """Per channel, where statistics taken about a shift are rejected (:func:`untrusted`; None:
    never): with ``"shift"`` (a guessed shift), also where it was off by more than a standard
    deviation."""
    if verdict is None:
        return None
    return untrusted(xp, mean, var, dtype, moments.mean if verdict == "shift" else None)


def prescaled_sums(prims: Primitives, x: Any, recipe: Recipe) -> ShiftedSums:
    """The sums of ``x * scale - shift``, ``scale`` from :func:`power_of_two_scale`, in two
    reading passes of ``x``.

    Pass 1 takes ``min(x)``, ``max(x)`` and the sum of ``x * 2**-k`` with ``2**k >= n``, which
    cannot overflow; ``shift`` is that sum times ``2**k * scale / n`` (the mean of ``x * scale``,
    up to rounding: the sums correct it), and for a constant channel its exact value. Pass 2
    sums ``x * scale - shift`` and its square: values in ``[-4, 4]``."""
    count = recipe.count_per_channel
    assert count is not None  # symbolic sizes take the moments route (local_moments)
    shrink = 2.0 ** -(count - 1).bit_length()
    low, high, shrunk_total = prims.first_pass(x, recipe, shrink)
    scale, shift = prims.per_channel(_scale_and_shift, low, high, shrunk_total, count, shrink=shrink, dtype=x.dtype)
    return shifted_sums(prims, x, recipe, scale, shift)


def _scale_and_shift(
    xp: ModuleType, low: Any, high: Any, shrunk_total: Any, count: Any, *, shrink: float, dtype: Any
) -> tuple[Any, Any]:
    low, high = _as(xp, low, dtype), _as(xp, high, dtype)  # values of x: exact
    scale = power_of_two_scale(xp, low, high)
    mean = _ratio(xp, shrunk_total * _as(xp, scale / shrink, shrunk_total.dtype), count)
    shift = xp.where(low == high, high * scale, _as(xp, mean, dtype))  # a constant channel: exactly
    return scale, shift


# ---------------------------------------------------------------------------- forward


class Result(NamedTuple):
    """Output, new running statistics (or the given ones, or None), mean and invstd."""

    output: Any
    running_mean: Any
    running_var: Any
    mean: Any
    invstd: Any


class _TrainVectors(NamedTuple):
    mean: Any
    invstd: Any
    running_mean: Any
    running_var: Any
    mult: Any
    add: Any
    short_mult: Any
    short_add: Any
    short: Any
    unsafe: Any


def _train_vectors(
    xp: ModuleType,
    shift: Any,
    total: Any,
    squares: Any,
    scale: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    factor: Any,
    *,
    count: int,
    eps: float,
    dtype: Any,
    skip_nonfinite: bool,
    unbiased: bool = True,
    short: bool,
    verdict: str | None,
) -> _TrainVectors:
    """Everything per channel after the sums: statistics, the running update, the output's
    ``mult`` and ``add`` for ``(x * scale - shift) * mult + add`` (with ``short``, also those of
    ``x * mult + add`` and whether they may serve everywhere), and where ``verdict`` rejects
    the statistics (:func:`_verdict`)."""
    moments = moments_from_sums(xp, ShiftedSums(shift, total, squares, scale), count)
    return _vectors_of_moments(
        xp, moments, weight, bias, running_mean, running_var, factor,
        eps=eps, dtype=dtype, skip_nonfinite=skip_nonfinite, unbiased=unbiased, short=short, verdict=verdict,
    )  # fmt: skip


def _vectors_of_moments(
    xp: ModuleType,
    moments: Moments,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    factor: Any,
    *,
    eps: float,
    dtype: Any,
    skip_nonfinite: bool,
    unbiased: bool = True,
    short: bool,
    verdict: str | None,
) -> _TrainVectors:
    stats = statistics(xp, moments, eps, dtype=dtype)
    unsafe = _verdict(xp, moments, stats.mean, stats.var, verdict, dtype)
    mult = stats.normalizer if weight is None else stats.normalizer * _as(xp, weight, stats.mean.dtype)
    add = -moments.mean * mult if bias is None else _as(xp, bias, mult.dtype) - moments.mean * mult
    short_mult = short_add = short_ok = None
    if short:
        short_mult = stats.invstd if weight is None else stats.invstd * _as(xp, weight, stats.mean.dtype)
        short_add = -stats.mean * short_mult if bias is None else _as(xp, bias, mult.dtype) - stats.mean * short_mult
        short_ok = xp.all(_short_form(xp, stats.mean, stats.invstd, short_mult))
    mean, invstd = _as(xp, stats.mean, dtype), _as(xp, stats.invstd, dtype)
    if running_mean is not None:
        running_mean, running_var = updated_running_stats(
            xp,
            detach(xp, running_mean),
            detach(xp, running_var),
            detach(xp, mean),
            detach(xp, _as(xp, stats.var, dtype)),
            factor,
            count=moments.count,
            skip_nonfinite=skip_nonfinite,
            unbiased=unbiased,
        )
    return _TrainVectors(mean, invstd, running_mean, running_var, mult, add, short_mult, short_add, short_ok, unsafe)


def train_forward(
    prims: Primitives,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    recipe: Recipe,
    *,
    factor: Any,
    eps: float,
    skip_nonfinite: bool,
    unbiased: bool = True,
) -> Result:
    """Normalize with the batch statistics; update the running ones (if given) with ``factor``."""
    xp = prims.xp
    dtype = compute_dtype(xp, x.dtype)
    x_compute = _as(xp, x, dtype)
    count = recipe.count_per_channel
    if count == 0:  # an empty batch has no statistics: NaN, and the running ones stay (PyTorch)
        nan = xp.full((recipe.num_channels,), math.nan, dtype=dtype, device=device(x))
        return Result(xp.empty_like(x), running_mean, running_var, nan, nan)

    def finish(sums: ShiftedSums, verdict: str | None) -> _TrainVectors:
        return prims.per_channel(
            _train_vectors,
            *sums,
            weight,
            bias,
            running_mean,
            running_var,
            factor,
            count=count,
            eps=eps,
            dtype=dtype,
            skip_nonfinite=skip_nonfinite,
            unbiased=unbiased,
            short=short,
            verdict=verdict,
        )

    short = prims.eager and prims.shortcuts(x_compute)
    with prims.quiet():
        if prims.one_read(x_compute):
            moments = one_read_moments(prims, x_compute, recipe, count)
            vectors = prims.per_channel(
                _moments_vectors, *moments, weight, bias, running_mean, running_var, factor,
                eps=eps, dtype=dtype, skip_nonfinite=skip_nonfinite, unbiased=unbiased, short=short,
            )  # fmt: skip
            scale, shift = moments.scale, moments.shift
        else:
            sums, vectors = batch_statistics(prims, x_compute, recipe, finish)
            scale, shift = sums.scale, sums.shift
        if short and bool(vectors.short):
            output = prims.affine(x_compute, recipe, None, None, vectors.short_mult, vectors.short_add)
        else:
            output = prims.affine(x_compute, recipe, scale, shift, vectors.mult, vectors.add)
    if running_mean is not None:
        running_mean, running_var = vectors.running_mean, vectors.running_var
    return Result(_as(xp, output, x.dtype), running_mean, running_var, vectors.mean, vectors.invstd)


# ------------------------------------------------- masks, replicas and virtual batches


def ghost_groups(batch: int, size: int) -> list[slice]:
    """The virtual batches of ghost batch norm: consecutive groups of ``size`` samples along
    the batch axis (axis 0), the last holding what remains (as ``torch.split``). Each is
    normalized with its own statistics and updates the running ones as one batch, in order."""
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)] or [slice(0, 0)]


def valid_positions(xp: ModuleType, mask: Any, recipe: Recipe) -> Any:
    """A mask of the input's shape without the channel axis, broadcastable against the input."""
    return xp.expand_dims(mask, axis=recipe.channel_axis)


def valid_count(xp: ModuleType, mask: Any, recipe: Recipe, dtype: Any) -> Any:
    """The valid values of each channel (the mask's True count, the same for every channel),
    as a vector of C values of ``dtype``: computed where the data is, no host read."""
    count = xp.astype(xp.sum(xp.astype(mask, xp.int32)), dtype)
    return xp.zeros((recipe.num_channels,), dtype=dtype, device=device(mask)) + count


def symbolic_count(xp: ModuleType, x: Any, recipe: Recipe, dtype: Any) -> Any:
    """n for an input with symbolic sizes, as a vector of C values of ``dtype``: counted in the
    graph (as :func:`valid_count` counts a mask), since the sizes are known only when it runs."""
    ones = xp.ones_like(x, dtype=xp.int32)
    return xp.astype(xp.sum(ones, axis=recipe.reduce_axes), dtype)


def symbolic_shrink(xp: ModuleType, count: Any) -> Any:
    """:func:`prescaled_sums`'s ``2**-k`` with ``2**k >= n`` for a count known only as an array:
    ``2**-ceil(log2 n)`` (a rounded log2 at a power of two gives ``k`` or ``k + 1``: either keeps
    the sum of ``x * 2**-k`` from overflowing, which is all the shrink is for)."""
    largest = xp.maximum(xp.max(count), xp.ones_like(count[0]))
    return xp.pow(xp.full((), 2.0, dtype=count.dtype, device=device(count)), -xp.ceil(xp.log2(largest)))


class _Checked(NamedTuple):
    mean: Any
    unsafe: Any


def _checked(
    xp: ModuleType, shift: Any, total: Any, squares: Any, scale: Any, *, count: int, eps: float, dtype: Any,
    verdict: str | None,
) -> _Checked:  # fmt: skip
    moments = moments_from_sums(xp, ShiftedSums(shift, total, squares, scale), count)
    stats = statistics(xp, moments, eps, dtype=dtype)
    return _Checked(stats.mean, _verdict(xp, moments, stats.mean, stats.var, verdict, dtype))


def local_moments(prims: Primitives, x: Any, recipe: Recipe, *, eps: float, valid: Any, count: Any) -> Moments:
    """The moments of the batch ``x`` (in its compute dtype), or of its values where ``valid``
    holds, ``count`` per channel: those by the prescaled route (:func:`prescaled_sums`, its
    reductions restricted to the valid values), the batch's by :func:`batch_statistics`. No
    values: count 0, mean 0, M2 0 (what merges as nothing)."""
    xp = prims.xp
    positions = recipe.count_per_channel
    if positions == 0:  # zeros, as sums of x: autograd then still reaches the collectives
        zeros = xp.sum(x, axis=recipe.reduce_axes)
        return Moments(0 if valid is None else count, None, zeros, zeros, None)
    if valid is not None:
        assert positions is not None  # forward refuses a mask with symbolic sizes
        shrink: Any = 2.0 ** -(positions - 1).bit_length()
        low, high, shrunk_total = prims.masked_first_pass(x, recipe, shrink, valid)
        scale, shift = prims.per_channel(_scale_and_shift, low, high, shrunk_total, count, shrink=shrink, dtype=x.dtype)
        total, squares = prims.masked_shifted_sums(x, recipe, scale, shift, valid)
        return moments_from_sums(xp, ShiftedSums(shift, total, squares, scale), count)
    if positions is None:  # symbolic sizes: the prescaled route, with n and the shrink as arrays
        shrink = symbolic_shrink(xp, count)
        low, high, shrunk_total = prims.first_pass(x, recipe, shrink)
        scale, shift = prims.per_channel(_scale_and_shift, low, high, shrunk_total, count, shrink=shrink, dtype=x.dtype)
        total, squares = prims.shifted_sums(x, recipe, scale, shift)
        return moments_from_sums(xp, ShiftedSums(shift, total, squares, scale), count)

    if prims.one_read(x):
        return one_read_moments(prims, x, recipe, positions)

    def finish(sums: ShiftedSums, verdict: str | None) -> _Checked:
        return prims.per_channel(_checked, *sums, count=positions, eps=eps, dtype=x.dtype, verdict=verdict)

    sums, _ = batch_statistics(prims, x, recipe, finish)
    return moments_from_sums(xp, sums, positions)


def synchronized_moments(xp: ModuleType, sync: Any, moments: Moments, *, dtype: Any) -> Moments:
    """The moments of every replica's values: each replica's count, shift, mean, M2 and scale
    (``4 C + 1`` numbers) gathered by one collective (``sync.gather``), then merged the same
    way on every replica (:func:`merge_gathered`), so that all hold the same statistics."""
    acc = moments.mean.dtype
    like = moments.mean
    count = _count_entry(xp, moments.count, like)
    shift = xp.zeros_like(like) if moments.shift is None else _as(xp, moments.shift, acc)
    scale = xp.ones_like(like) if moments.scale is None else _as(xp, moments.scale, acc)
    packed = xp.concat([count, shift, like, _as(xp, moments.m2, acc), scale])
    return merge_gathered(xp, sync.gather(packed), dtype=dtype)


def _count_entry(xp: ModuleType, count: Any, like: Any) -> Any:
    """The count (an int, or per-channel counts, all equal) as one number, a ``(1,)`` array of
    ``like``'s dtype and device: the entry a collective carries."""
    if isinstance(count, int):
        return xp.zeros((1,), dtype=like.dtype, device=device(like)) + float(count)
    return _as(xp, count[:1], like.dtype)


def merge_gathered(xp: ModuleType, gathered: Any, *, dtype: Any) -> Moments:
    """The moments of the union of R sets, from their packed moments stacked as rows
    (``gathered``, ``(R, 4 C + 1)``: count, shift, mean, M2, scale).

    Every set is first brought to the finest scale (powers of two: exact). About a shift
    ``ref``, the count-weighted mean rounded to ``dtype``, each set's mean is ``delta_r =
    (shift_r - ref) + mean_r``; the union's mean is ``sum(n_r * delta_r) / n`` and its M2 is
    ``sum(M2_r + n_r * (delta_r - mean)**2)``: the exact merge of Chan et al. written for R sets
    at once, in two vectorized passes over the rows. Sets of no values weigh nothing."""
    channels = (gathered.shape[1] - 1) // 4
    counts = gathered[:, 0:1]
    shift, mean, m2, scale = (gathered[:, 1 + i * channels : 1 + (i + 1) * channels] for i in range(4))
    finest = xp.min(scale, axis=0)
    ratio = finest / scale
    shift, mean, m2 = shift * ratio, mean * ratio, m2 * (ratio * ratio)
    total = xp.sum(counts, axis=0)
    weights = _ratio(xp, counts, total)
    reference = _as(xp, xp.sum(weights * (shift + mean), axis=0), dtype)  # the output subtracts it: a value of dtype
    delta = (shift - _as(xp, reference, gathered.dtype)) + mean
    offset = xp.sum(weights * delta, axis=0)
    deviation = delta - offset
    merged_m2 = xp.sum(m2 + counts * (deviation * deviation), axis=0)
    return Moments(xp.zeros_like(offset) + total, reference, offset, merged_m2, _as(xp, finest, dtype))


def synchronized_sums(xp: ModuleType, sync: Any, grad_bias: Any, grad_weight: Any, count: Any) -> tuple[Any, Any, Any]:
    """The backward's two per-channel sums and the count, over every replica: one
    ``sync.sum`` of ``2 C + 1`` numbers."""
    acc = grad_bias.dtype
    count = _count_entry(xp, count, grad_bias)
    total = sync.sum(xp.concat([grad_bias, _as(xp, grad_weight, acc), count]))
    channels = grad_bias.shape[0]
    return total[:channels], total[channels : 2 * channels], xp.zeros_like(total[:channels]) + total[2 * channels :]


def _moments_vectors(
    xp: ModuleType,
    count: Any,
    shift: Any,
    mean: Any,
    m2: Any,
    scale: Any,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    factor: Any,
    *,
    eps: float,
    dtype: Any,
    skip_nonfinite: bool,
    unbiased: bool = True,
    short: bool = False,
) -> _TrainVectors:
    return _vectors_of_moments(
        xp, Moments(count, shift, mean, m2, scale), weight, bias, running_mean, running_var, factor,
        eps=eps, dtype=dtype, skip_nonfinite=skip_nonfinite, unbiased=unbiased, short=short, verdict=None,
    )  # fmt: skip


def _constant_where_invalid(xp: ModuleType, output: Any, valid: Any) -> Any:
    """``output`` whose values at masked-out positions carry no derivative (autograd, ``jax.grad``):
    they are normalized like the rest, but padding, so they feed no gradient back."""
    constant = detach(xp, output)
    return output if constant is output else xp.where(valid, output, constant)


def moments_train_forward(
    prims: Primitives,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    recipe: Recipe,
    *,
    factor: Any,
    eps: float,
    skip_nonfinite: bool,
    unbiased: bool = True,
    mask: Any,
    sync: Any,
) -> Result:
    """Training with statistics of the valid values (``mask``) and of every replica (``sync``):
    local moments (:func:`local_moments`), merged across replicas (:func:`synchronized_moments`),
    then the output and the running update as :func:`train_forward`'s, with counts as arrays.
    Masked-out positions are normalized with the same statistics."""
    xp = prims.xp
    dtype = compute_dtype(xp, x.dtype)
    x_compute = _as(xp, x, dtype)
    valid = count = None
    with prims.quiet():
        if mask is not None:
            valid = valid_positions(xp, mask, recipe)
            count = valid_count(xp, mask, recipe, dtype)
        elif recipe.count_per_channel is None:
            count = symbolic_count(xp, x_compute, recipe, dtype)
        moments = local_moments(prims, x_compute, recipe, eps=eps, valid=valid, count=count)
        if sync is not None:
            moments = synchronized_moments(xp, sync, moments, dtype=dtype)
        vectors = prims.per_channel(
            _moments_vectors,
            *moments,
            weight,
            bias,
            running_mean,
            running_var,
            factor,
            eps=eps,
            dtype=dtype,
            skip_nonfinite=skip_nonfinite,
            unbiased=unbiased,
        )
        output = prims.affine(x_compute, recipe, moments.scale, moments.shift, vectors.mult, vectors.add)
    if valid is not None:
        output = _constant_where_invalid(xp, output, valid)
    if running_mean is not None:
        running_mean, running_var = vectors.running_mean, vectors.running_var
    return Result(_as(xp, output, x.dtype), running_mean, running_var, vectors.mean, vectors.invstd)


class _EvalVectors(NamedTuple):
    mean: Any
    invstd: Any
    mult: Any
    add: Any
    short_add: Any
    short: Any


def running_statistics(xp: ModuleType, running_mean: Any, running_var: Any, *, dtype: Any, eps: float) -> Statistics:
    """Eval-mode statistics: the running mean and ``1 / sqrt(running_var + eps)``, in ``dtype``."""
    mean, var = _as(xp, running_mean, dtype), _as(xp, running_var, dtype)
    invstd = 1.0 / xp.sqrt(var + eps)
    return Statistics(mean, var, invstd, invstd)


def _eval_vectors(
    xp: ModuleType, running_mean: Any, running_var: Any, weight: Any, bias: Any, *, eps: float, dtype: Any, short: bool
) -> _EvalVectors:
    stats = running_statistics(xp, running_mean, running_var, dtype=dtype, eps=eps)
    mult = stats.invstd if weight is None else stats.invstd * _as(xp, weight, dtype)
    add = None if bias is None else _as(xp, bias, dtype)
    short_add = short_ok = None
    if short:
        short_add = -stats.mean * mult if add is None else add - stats.mean * mult
        short_ok = xp.all(_short_form(xp, stats.mean, stats.invstd, mult))
    return _EvalVectors(stats.mean, stats.invstd, mult, add, short_add, short_ok)


def eval_forward(
    prims: Primitives,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    recipe: Recipe,
    *,
    eps: float,
) -> Result:
    """Normalize with the running statistics: ``(x - running_mean) * invstd * weight + bias``."""
    xp = prims.xp
    dtype = compute_dtype(xp, x.dtype)
    x_compute = _as(xp, x, dtype)
    short = prims.eager and prims.shortcuts(x_compute)
    with prims.quiet():
        vectors = prims.per_channel(
            _eval_vectors, running_mean, running_var, weight, bias, eps=eps, dtype=dtype, short=short
        )
        if short and bool(vectors.short):
            output = prims.affine(x_compute, recipe, None, None, vectors.mult, vectors.short_add)
        else:
            output = prims.affine(x_compute, recipe, None, vectors.mean, vectors.mult, vectors.add)
    return Result(_as(xp, output, x.dtype), running_mean, running_var, vectors.mean, vectors.invstd)


# --------------------------------------------------------------------------- backward


class _BackwardVectors(NamedTuple):
    grad_weight: Any
    grad_bias: Any
    k: Any
    f: Any
    c: Any
    short_c: Any
    short: Any


def _backward_vectors(
    xp: ModuleType,
    mean: Any,
    invstd: Any,
    weight: Any,
    grad_bias: Any,
    grad_weight: Any,
    count: Any,
    *,
    dtype: Any,
    param_dtype: Any,
    training: bool,
    short: bool,
) -> _BackwardVectors:
    """``grad_input = g * k + (x - mean) * f + c`` with ``k = invstd * weight`` and, in training
    (the statistics depend on ``x``), ``f = -k * invstd * grad_weight / n``,
    ``c = -k * grad_bias / n``; in eval ``f = c = 0``. ``n`` is an int or a vector (masks,
    replicas): for no values, ``f = c = 0``."""
    acc = grad_bias.dtype
    invstd_acc = _as(xp, invstd, acc)
    k = invstd_acc if weight is None else invstd_acc * _as(xp, weight, acc)
    f = c = short_c = short_ok = None
    if training:
        f = _ratio(xp, -(k * invstd_acc * grad_weight), count)
        c = _ratio(xp, -(k * grad_bias), count)
        if short:
            # x * f + (c - mean * f) rounds a value of size |mean * f|: within what the
            # longer form rounds where that is at most max(1, |c|)
            mean_acc = _as(xp, mean, acc)
            short_c = c - mean_acc * f
            short_ok = xp.all(xp.abs(mean_acc * f) <= xp.maximum(xp.abs(c), xp.ones_like(c)))
        f, c, short_c = (None if v is None else _as(xp, v, dtype) for v in (f, c, short_c))
    return _BackwardVectors(
        _as(xp, grad_weight, param_dtype), _as(xp, grad_bias, param_dtype), _as(xp, k, dtype), f, c, short_c, short_ok
    )


def backward_sums(
    prims: Primitives, grad: Any, x: Any, mean: Any, invstd: Any, recipe: Recipe, *, uncentred: bool
) -> tuple[Any, Any]:
    """``sum(g)`` and ``sum(g * xhat)``, ``xhat = (x - mean) * invstd``, per channel.

    With ``uncentred``, where the backend can choose by values and every channel has
    ``|mean| * invstd <= 1``: ``(sum(g * x) - mean * sum(g)) * invstd``, reductions of the
    inputs themselves, whose extra error in ``grad_weight`` is at most that of rounding
    ``sum(g)``; kept unless a sum overflowed. Otherwise the sums of ``g * xhat`` (values of the
    size of ``g``)."""

    def centred() -> tuple[Any, Any]:
        return prims.product_sums(grad, x, recipe, mean, invstd)

    if not (uncentred and prims.branches):
        return centred()
    xp = prims.xp

    def of_the_inputs() -> tuple[Any, Any]:
        grad_bias, grad_x = prims.product_sums(grad, x, recipe, None, None)
        grad_weight = prims.per_channel(_uncentred_grad_weight, grad_bias, grad_x, mean, invstd)
        return prims.branch(~xp.all(xp.isfinite(grad_weight)), centred, lambda: (grad_bias, grad_weight))

    return prims.branch(xp.any(xp.abs(mean * invstd) > 1.0), centred, of_the_inputs)


def _uncentred_grad_weight(xp: ModuleType, grad_bias: Any, grad_x: Any, mean: Any, invstd: Any) -> Any:
    acc = grad_bias.dtype
    return (grad_x - _as(xp, mean, acc) * grad_bias) * _as(xp, invstd, acc)


def backward(
    prims: Primitives,
    grad_output: Any,
    x: Any,
    weight: Any,
    mean: Any,
    invstd: Any,
    recipe: Recipe,
    *,
    training: bool,
    mask: Any = None,
    sync: Any = None,
) -> tuple[Any, Any, Any]:
    """Analytic gradients of the forward: ``grad_bias = sum(g)``, ``grad_weight = sum(g * xhat)``;
    training ``dx = weight * invstd * (g - sum(g)/n - xhat * sum(g * xhat)/n)``, eval
    ``dx = g * weight * invstd`` (the statistics are constants). In training with a ``mask`` or
    ``sync``: :func:`moments_backward`; in eval they change nothing."""
    if training and (mask is not None or sync is not None):
        return moments_backward(prims, grad_output, x, weight, mean, invstd, recipe, mask=mask, sync=sync)
    xp = prims.xp
    dtype = compute_dtype(xp, x.dtype)
    grad, x_compute = _as(xp, grad_output, dtype), _as(xp, x, dtype)
    mean_c, invstd_c = _as(xp, mean, dtype), _as(xp, invstd, dtype)
    param_dtype = dtype if weight is None else weight.dtype
    shortcuts = prims.shortcuts(x_compute)
    short = prims.eager and shortcuts
    with prims.quiet():
        if recipe.count_per_channel == 0:  # every sum is 0 and the input gradient is empty
            zeros = xp.zeros((recipe.num_channels,), dtype=param_dtype, device=device(x))
            return xp.empty_like(x), zeros, xp.zeros_like(zeros)
        grad_bias, grad_weight = backward_sums(prims, grad, x_compute, mean_c, invstd_c, recipe, uncentred=shortcuts)
        vectors = prims.per_channel(
            _backward_vectors,
            mean_c,
            invstd_c,
            weight,
            grad_bias,
            grad_weight,
            recipe.count_per_channel,
            dtype=dtype,
            param_dtype=param_dtype,
            training=training,
            short=short,
        )
        if not training:
            grad_input = prims.affine(grad, recipe, None, None, vectors.k, None)
        elif short and bool(vectors.short):
            grad_input = prims.grad_input(grad, x_compute, recipe, vectors.k, None, vectors.f, vectors.short_c)
        else:
            grad_input = prims.grad_input(grad, x_compute, recipe, vectors.k, mean_c, vectors.f, vectors.c)
    return _as(xp, grad_input, x.dtype), vectors.grad_weight, vectors.grad_bias


def moments_backward(
    prims: Primitives,
    grad_output: Any,
    x: Any,
    weight: Any,
    mean: Any,
    invstd: Any,
    recipe: Recipe,
    *,
    mask: Any,
    sync: Any,
) -> tuple[Any, Any, Any]:
    """The training backward over the valid values (``mask``: ``grad_input`` is 0 elsewhere)
    and every replica (``sync``): the input gradient takes the sums ``sum(g)``,
    ``sum(g * xhat)`` and the count of all replicas (:func:`synchronized_sums`); the weight and
    bias gradients returned are this replica's shares (its own sums), which data-parallel
    training adds up as for any parameter (PyTorch's SyncBatchNorm)."""
    xp = prims.xp
    dtype = compute_dtype(xp, x.dtype)
    grad, x_compute = _as(xp, grad_output, dtype), _as(xp, x, dtype)
    mean_c, invstd_c = _as(xp, mean, dtype), _as(xp, invstd, dtype)
    param_dtype = dtype if weight is None else weight.dtype
    valid = None
    with prims.quiet():
        if mask is not None:
            valid = valid_positions(xp, mask, recipe)
            count: Any = valid_count(xp, mask, recipe, dtype)
            grad_bias, grad_weight = prims.masked_product_sums(grad, x_compute, recipe, mean_c, invstd_c, valid)
        else:
            count = recipe.count_per_channel
            uncentred = count > 0 and prims.shortcuts(x_compute)
            grad_bias, grad_weight = backward_sums(
                prims, grad, x_compute, mean_c, invstd_c, recipe, uncentred=uncentred
            )
        own_shares = (_as(xp, grad_weight, param_dtype), _as(xp, grad_bias, param_dtype))
        if sync is not None:
            grad_bias, grad_weight, count = synchronized_sums(xp, sync, grad_bias, grad_weight, count)
        vectors = prims.per_channel(
            _backward_vectors,
            mean_c,
            invstd_c,
            weight,
            grad_bias,
            grad_weight,
            count,
            dtype=dtype,
            param_dtype=param_dtype,
            training=True,
            short=False,
        )
        grad_input = prims.grad_input(grad, x_compute, recipe, vectors.k, mean_c, vectors.f, vectors.c)
        if valid is not None:
            grad_input = xp.where(valid, grad_input, xp.zeros_like(grad_input))
    return _as(xp, grad_input, x.dtype), own_shares[0], own_shares[1]


# ----------------------------------------------------------- native whole-op kernels


class _NativeVectors(NamedTuple):
    kept: Any
    """0-d: the result is kept (every channel passes)."""
    running_mean: Any
    running_var: Any


def _native_train_vectors(
    xp: ModuleType,
    mean: Any,
    invstd: Any,
    running_mean: Any,
    running_var: Any,
    factor: Any,
    *,
    count: int,
    eps: float,
    skip_nonfinite: bool,
    unbiased: bool = True,
) -> _NativeVectors:
    """Whether a native training result is kept, and the running update from it.

    The kernel returns ``invstd = 1 / sqrt(var + eps)``, so ``var / (var + eps) = 1 - eps *
    invstd**2``, and ``|mean| <= T * std`` (:data:`NATIVE_MEAN_OVER_STD`) is ``(mean * invstd)**2
    <= T**2 * (1 - eps * invstd**2)``, tested with a margin for the rounding of ``invstd`` (a
    share below 0 passes only a zero mean). NaN fails every comparison; an overflowed variance
    shows as ``invstd == 0``. The biased variance for the update is ``1 / invstd**2 - eps``:
    its error, a few roundings of ``var + eps``, is within the tolerance measured normwise."""
    inv2 = invstd * invstd
    margin = 1.0 - 8.0 * float(xp.finfo(invstd.dtype).eps)
    share = xp.maximum(margin - eps * inv2, xp.zeros_like(inv2))
    slack = (NATIVE_MEAN_OVER_STD * NATIVE_MEAN_OVER_STD) * share - mean * mean * inv2
    kept = xp.all((slack >= 0.0) & (slack < math.inf) & (invstd > 0.0))  # every channel: a host decision
    if running_mean is not None:
        var = xp.maximum(1.0 / inv2 - eps, xp.zeros_like(inv2))
        running_mean, running_var = updated_running_stats(
            xp,
            running_mean,
            running_var,
            mean,
            var,
            factor,
            count=count,
            skip_nonfinite=skip_nonfinite,
            unbiased=unbiased,
        )
    return _NativeVectors(kept, running_mean, running_var)


def native_train_forward(
    prims: Primitives,
    native: NativeKernels,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    recipe: Recipe,
    *,
    factor: Any,
    eps: float,
    skip_nonfinite: bool,
    unbiased: bool = True,
) -> Result | None:
    """Training by the backend's whole-op kernel, which computes the output, mean and
    ``invstd``; the running update is :func:`updated_running_stats`'. None where the result is
    not kept (see :func:`_native_train_vectors`): the caller runs :func:`train_forward`."""
    xp = prims.xp
    output, mean, invstd = native.train(x, weight, bias, eps)
    checked = prims.per_channel(
        _native_train_vectors,
        detach(xp, mean),
        detach(xp, invstd),
        None if running_mean is None else detach(xp, running_mean),
        None if running_var is None else detach(xp, running_var),
        factor,
        count=recipe.count_per_channel,
        eps=eps,
        skip_nonfinite=skip_nonfinite,
        unbiased=unbiased,
    )
    if not bool(checked.kept):
        return None
    if running_mean is not None:
        running_mean, running_var = checked.running_mean, checked.running_var
    mean, invstd = native.differentiable_statistics(x, mean, invstd, eps)
    return Result(output, running_mean, running_var, mean, invstd)


class _NativeEvalVectors(NamedTuple):
    kept: Any
    mean: Any
    invstd: Any


def _native_eval_vectors(
    xp: ModuleType, running_mean: Any, running_var: Any, *, eps: float, dtype: Any, short_form: bool
) -> _NativeEvalVectors:
    """The eval statistics (:func:`running_statistics`), and where a kernel that computes
    ``x * alpha + beta`` (``short_form``) is kept: ``|running_mean| <= T * sqrt(running_var)``
    (:data:`NATIVE_MEAN_OVER_STD`), in the statistics' dtype (an overflow only fails the test),
    and ``eps > 0``."""
    stats = running_statistics(xp, running_mean, running_var, dtype=dtype, eps=eps)
    kept = None
    if short_form:  # a host decision, on the smallest slack of all channels (NaN fails it)
        bound = NATIVE_MEAN_OVER_STD * NATIVE_MEAN_OVER_STD
        smallest = float(xp.min(running_var * bound - running_mean * running_mean))
        kept = 0.0 <= smallest < math.inf and eps > 0.0
    return _NativeEvalVectors(kept, stats.mean, stats.invstd)


def native_eval_forward(
    prims: Primitives,
    native: NativeKernels,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    *,
    eps: float,
) -> Result | None:
    """Eval by the backend's whole-op kernel (its output only: ``invstd`` is
    :func:`running_statistics`'). A kernel that computes ``x * alpha + beta`` is used only where
    :func:`_native_eval_vectors` keeps it; None otherwise. The per-channel work comes before the
    kernel, while the caches hold the vectors."""
    xp = prims.xp
    short_form = native.short_form(x)
    vectors = prims.per_channel(
        _native_eval_vectors,
        detach(xp, running_mean),
        detach(xp, running_var),
        eps=eps,
        dtype=x.dtype,
        short_form=short_form,
    )
    if short_form and not bool(vectors.kept):
        return None
    output = native.eval(x, running_mean, running_var, weight, bias, eps)
    return Result(output, running_mean, running_var, vectors.mean, vectors.invstd)
