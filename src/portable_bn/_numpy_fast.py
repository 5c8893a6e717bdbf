"""NumPy fast path: the same arithmetic as :mod:`._agnostic`, cache-blocked and in place.

Why it exists: NumPy evaluates one operation at a time, so the agnostic code
streams every full-size temporary through main memory (about 12 copies' worth
of traffic for a training forward). Here the input is viewed as ``(A, C, B)``
(channel axis in the middle, no copy), walked in blocks of rows that fit in
the L2 cache, and the output buffer -- which we allocate, so writing into it
is safe -- is reused for every intermediate: a training forward costs two
reads of ``x`` and two of the output, an eval forward or backward one pass.

Same algorithm, same results up to summation order (the conformance suite
runs both paths against the float64 reference, and ``tests/test_fast_paths``
compares them directly): the corrected two-pass mean/variance and
``y = c * scale + (bias - r * scale)``. What the agnostic path does by
power-of-two prescaling (data whose squares could overflow) and NaN/Inf
statistics are rare; this path detects them from its first pass and returns
None so the caller takes the agnostic path (a value-dependent branch, which
eager NumPy allows).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

BLOCK_BYTES = 1 << 18
"""Bytes of input per block: a block of ``x`` and one of the output stay in a 1 MiB L2."""

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class FastForward(NamedTuple):
    output: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    batch_var: np.ndarray | None


def eligible(x: Any, *arrays: Any) -> bool:
    """Plain C-contiguous float32/float64 ndarrays (not subclasses, not half)."""
    return (
        type(x) is np.ndarray
        and x.dtype in _DTYPES
        and x.flags.c_contiguous
        and all(a is None or type(a) is np.ndarray for a in arrays)
    )


def _view(x: np.ndarray, axis: int) -> np.ndarray:
    shape = x.shape
    before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    return x.reshape(before, shape[axis], after)


def _blocks(x3: np.ndarray) -> range:
    row_bytes = max(1, x3.shape[1] * x3.shape[2] * x3.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    return range(0, x3.shape[0], step)


def _vector(value: Any, dtype: Any) -> np.ndarray:
    return np.asarray(value, dtype=dtype)[:, None]


def _channel_sum(block: np.ndarray) -> np.ndarray:
    """Sum over axes 0 and 2 of an ``(a, C, B)`` block; for short rows, axis 0
    first (contiguous, vectorized adds) is about twice as fast."""
    if block.shape[2] < 256:
        return np.add.reduce(np.add.reduce(block, axis=0), axis=1)
    return np.add.reduce(block, axis=(0, 2))


def train_forward(
    x: np.ndarray, weight: Any, bias: Any, *, axis: int, eps: float, want_var: bool
) -> FastForward | None:
    """Training forward, or None when the data need the agnostic path."""
    x3 = _view(x, axis)
    n = x3.shape[0] * x3.shape[2]
    dtype = x.dtype
    blocks = _blocks(x3)
    step = blocks.step
    with np.errstate(over="ignore", invalid="ignore"):  # overflow and NaN are judged below
        # Pass 1 (reads x): the first mean.
        total = np.zeros(x3.shape[1], dtype=dtype)
        for start in blocks:
            total += _channel_sum(x3[start : start + step])
        mean0 = total / n
        # Pass 2 (reads x, writes out): deviations, their sum and sum of squares from the cached block.
        out3 = np.empty_like(x3)
        deviation_sum = np.zeros_like(total)
        square_sum = np.zeros_like(total)
        mean0_b = mean0[:, None]
        for start in blocks:
            block = out3[start : start + step]
            np.subtract(x3[start : start + step], mean0_b, out=block)
            deviation_sum += _channel_sum(block)
            square_sum += np.einsum("acb,acb->c", block, block)
        residual = deviation_sum / n
        batch_var = square_sum / n - residual * residual
    # The agnostic path (power-of-two prescaling, exact constant channels) takes over for
    # NaN/Inf, for sums that overflowed, and for channels whose spread is at the rounding
    # level of their mean (numerically constant), where this path's rounding would show.
    if not (np.isfinite(square_sum).all() and np.isfinite(total).all()):
        return None
    with np.errstate(over="ignore"):  # an Inf threshold just means: hand over
        resolution = (8 * np.finfo(dtype).eps) * mean0
        if np.any((batch_var <= resolution * resolution) & (mean0 != 0)):
            return None
    invstd = 1.0 / np.sqrt(batch_var + dtype.type(eps))
    # Pass 3 (in place over out): y = c * scale + (bias - r * scale).
    scale = invstd if weight is None else invstd * np.asarray(weight, dtype=dtype)
    shift = -residual * scale if bias is None else np.asarray(bias, dtype=dtype) - residual * scale
    _scale_shift_in_place(out3, scale[:, None], shift[:, None], blocks)
    return FastForward(out3.reshape(x.shape), mean0 + residual, invstd, batch_var if want_var else None)


def _scale_shift_in_place(out3: np.ndarray, scale: np.ndarray, shift: np.ndarray, blocks: range) -> None:
    step = blocks.step
    for start in blocks:
        block = out3[start : start + step]
        np.multiply(block, scale, out=block)
        np.add(block, shift, out=block)


def eval_forward(
    x: np.ndarray, mean: np.ndarray, invstd: np.ndarray, weight: Any, bias: Any, *, axis: int
) -> np.ndarray:
    """Eval forward ``(x - mean) * (invstd * weight) + bias``, one pass."""
    x3 = _view(x, axis)
    dtype = x.dtype
    scale = invstd if weight is None else invstd * np.asarray(weight, dtype=dtype)
    shift = np.zeros_like(scale) if bias is None else np.asarray(bias, dtype=dtype)
    out3 = np.empty_like(x3)
    blocks = _blocks(x3)
    step = blocks.step
    mean_b, scale_b, shift_b = mean.astype(dtype, copy=False)[:, None], scale[:, None], shift[:, None]
    for start in blocks:
        block = out3[start : start + step]
        np.subtract(x3[start : start + step], mean_b, out=block)
        np.multiply(block, scale_b, out=block)
        np.add(block, shift_b, out=block)
    return out3.reshape(x.shape)


def backward(
    grad_output: np.ndarray, x: np.ndarray, weight: Any, mean: Any, invstd: Any, *, axis: int, training: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The analytic backward of :func:`._agnostic.backward`, blocked."""
    x3, g3 = _view(x, axis), _view(grad_output, axis)
    n = x3.shape[0] * x3.shape[2]
    dtype = x.dtype
    mean = np.asarray(mean, dtype=dtype)
    invstd = np.asarray(invstd, dtype=dtype)
    blocks = _blocks(x3)
    step = blocks.step
    mean_b = mean[:, None]
    scratch = np.empty_like(x3[:step])
    # Pass 1 (reads g and x): sum(g) and sum(g * (x - mean)).
    grad_bias = np.zeros(x3.shape[1], dtype=dtype)
    grad_dot = np.zeros_like(grad_bias)
    for start in blocks:
        g_block = g3[start : start + step]
        deviation = scratch[: g_block.shape[0]]
        np.subtract(x3[start : start + step], mean_b, out=deviation)
        grad_bias += g_block.sum(axis=(0, 2))
        grad_dot += np.einsum("acb,acb->c", g_block, deviation)
    grad_weight = grad_dot * invstd
    k = invstd if weight is None else invstd * np.asarray(weight, dtype=dtype)
    gi3 = np.empty_like(x3)
    if training:
        # dx = k * (g - sum(g)/n - (x - mean) * invstd * grad_weight / n)
        deviation_factor = (-(k * invstd * grad_weight) / max(n, 1))[:, None]
        constant = (-(k * grad_bias) / max(n, 1))[:, None]
        k_b = k[:, None]
        for start in blocks:
            block = gi3[start : start + step]
            tmp = scratch[: block.shape[0]]
            np.subtract(x3[start : start + step], mean_b, out=block)
            np.multiply(block, deviation_factor, out=block)
            np.multiply(g3[start : start + step], k_b, out=tmp)
            np.add(block, tmp, out=block)
            np.add(block, constant, out=block)
    else:
        k_b = k[:, None]
        for start in blocks:
            np.multiply(g3[start : start + step], k_b, out=gi3[start : start + step])
    param_dtype = dtype if weight is None else np.asarray(weight).dtype
    return gi3.reshape(x.shape), grad_weight.astype(param_dtype, copy=False), grad_bias.astype(param_dtype, copy=False)
