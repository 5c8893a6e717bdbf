"""Numba kernels: block moments, backward sums and the fused elementwise forms, each one parallel
read of its inputs.

An input is a C-contiguous float32/float64 array viewed as ``(A, C, B)``. Where rows are long
(``B >= ROW_MIN``) a block is a piece of one ``(a, c)`` row; where they are short, a tile of
rows by columns of the ``(A, C * B)`` view, each column of which is a block. A block is read
from memory once: its pass over the values (largest magnitude, a shrunk sum) and its pass over
the deviations run on the copy in the core's cache. Blocks of a channel merge in float64 with
Chan, Golub and LeVeque's formula after exact rescaling to the finest power of two; tasks
(channels, or tiles) run on Numba's threads.

Reductions are compiled with reassociation allowed (``REDUCTION_MATH``), inside the block
only, so that they vectorize; the elementwise forms with none, so that they round as the
pure primitives do, operation by operation in the input's dtype. Every kernel is compiled
once per dtype and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

REDUCTION_MATH = {"reassoc", "nsz", "contract"}
"""Fast-math flags of the reductions inside a block: reassociation (vector lanes), signless
zeros, fused multiply-add; no approximate reciprocals, no assumption of finite values."""

SHRINK = 2.0**-14
"""The block's pass over its values sums ``x * SHRINK``: blocks hold at most ``2**14`` values,
so the sum cannot overflow; multiplying by a power of two is exact."""

MOST_SCALE_EXPONENT = 1022
"""A block's scale ``2**-k`` stops at ``k = 1022``: never subnormal (float64's smallest normal
exponent), and ``2**-1022`` brings the largest float64 into ``[-4, 4]``."""


@numba.njit(fastmath=REDUCTION_MATH, cache=True, nogil=True)
def _values_pass(row, bits):  # type: ignore[no-untyped-def]
    """``sum(x * SHRINK)`` of ``row`` in float64, and of the values' bit patterns (``bits``, the
    same memory as integers) the largest magnitude's, the least and the greatest: integer
    reductions, which vectorize where floating-point minima and maxima do not. (Loops run over
    ``range(len)`` of contiguous slices: indices Numba knows to be non-negative, so without the
    negative-index check that would keep them from vectorizing.)"""
    total = 0.0
    magnitude = np.iinfo(bits.dtype).max  # every bit but the sign
    largest = magnitude & 0
    least = greatest = bits[0]
    for j in range(row.shape[0]):
        total += np.float64(row[j]) * SHRINK
        pattern = bits[j]
        largest = max(largest, pattern & magnitude)
        least = min(least, pattern)
        greatest = max(greatest, pattern)
    return total, largest, least, greatest


@numba.njit(fastmath=REDUCTION_MATH, cache=True, nogil=True)
def _deviations_pass(row, scale, mean):  # type: ignore[no-untyped-def]
    """``sum(d)`` and ``sum(d * d)``, ``d = x * scale - mean``, of ``row``."""
    total = 0.0
    squares = 0.0
    for j in range(row.shape[0]):
        deviation = np.float64(row[j]) * scale - mean
        total += deviation
        squares += deviation * deviation
    return total, squares


@numba.njit(cache=True, nogil=True)
def _power_of_two_scale(largest, itemsize):  # type: ignore[no-untyped-def]
    """From the bit pattern of a block's largest magnitude: ``2**-k``, ``k = floor(log2(max|x|))``
    where ``max|x| >= 2`` (the exponent field), stopping at the dtype's smallest normal exponent
    (126 for float32, 1022 for float64), else 1; 0 for a block holding an infinity (its moments
    become NaN) and 1 for one holding NaN."""
    if itemsize == 4:
        mantissa_bits, exponent_mask, bias = 23, 0xFF, 127
    else:
        mantissa_bits, exponent_mask, bias = 52, 0x7FF, 1023
    largest = np.int64(largest)
    exponent_field = (largest >> mantissa_bits) & exponent_mask
    if exponent_field == exponent_mask:  # Inf or NaN
        return 0.0 if largest & ((1 << mantissa_bits) - 1) == 0 else 1.0
    exponent = exponent_field - bias
    if exponent < 1:
        return 1.0
    return math.ldexp(1.0, -min(exponent, bias - 1))


@numba.njit(cache=True, nogil=True)
def _block(values, bits, channels, inner, channel, a0, a1, start, stop):  # type: ignore[no-untyped-def]
    """Count, mean, its correction, M2 and ``scale`` of ``x * scale`` over the block
    ``x3[a0:a1, channel, start:stop]`` (``values`` and ``bits``: ``x3`` flat, ``(A, C, B)`` =
    ``(*, channels, inner)``): two passes over the values, row by row (contiguous), the second
    on the copy in the cache. The mean is the first pass's, rounded; the correction the mean
    deviation from it, kept apart so that merging loses none of its digits. A constant block
    is exact (mean ``x * scale``, correction and M2 0)."""
    first = (a0 * channels + channel) * inner
    total, largest, least, greatest = _values_pass(
        values[first + start : first + stop], bits[first + start : first + stop]
    )
    for a in range(a0 + 1, a1):
        row = (a * channels + channel) * inner
        row_total, row_largest, row_least, row_greatest = _values_pass(
            values[row + start : row + stop], bits[row + start : row + stop]
        )
        total += row_total
        largest, least, greatest = max(largest, row_largest), min(least, row_least), max(greatest, row_greatest)
    count = np.float64((a1 - a0) * (stop - start))
    scale = _power_of_two_scale(largest, bits.itemsize)
    if least == greatest:  # every bit pattern the same
        return count, np.float64(values[first + start]) * scale, 0.0, 0.0, scale
    mean = total * (scale / SHRINK) / count
    deviations = squares = 0.0
    for a in range(a0, a1):
        row = (a * channels + channel) * inner
        row_deviations, row_squares = _deviations_pass(values[row + start : row + stop], scale, mean)
        deviations += row_deviations
        squares += row_squares
    correction = deviations / count
    return count, mean, correction, squares - deviations * correction, scale


@numba.njit(cache=True, nogil=True)
def _merge(count, shift, mean, m2, scale, count_b, mean_b, correction_b, m2_b, scale_b):  # type: ignore[no-untyped-def]
    """Moments about ``shift`` merged with a block's (Chan, Golub and LeVeque), at the finer of
    the two scales. The block's mean about the shift is ``(mean_b - shift) + correction_b``:
    the difference of two close numbers is exact, so the means keep their digits however far
    they are from zero. The first block's mean becomes the shift."""
    if count_b == 0.0:
        return count, shift, mean, m2, scale
    if count == 0.0:
        return count_b, mean_b, correction_b, m2_b, scale_b
    if scale_b < scale:
        ratio = scale_b / scale
        shift, mean, m2, scale = shift * ratio, mean * ratio, m2 * (ratio * ratio), scale_b
    elif scale < scale_b:
        ratio = scale / scale_b
        mean_b, correction_b, m2_b = mean_b * ratio, correction_b * ratio, m2_b * (ratio * ratio)
    total = count + count_b
    weight = count_b / total
    delta = ((mean_b - shift) + correction_b) - mean
    return total, shift, mean + delta * weight, m2 + m2_b + delta * delta * (count * weight), scale


@numba.njit(parallel=True, cache=True, nogil=True)
def row_moments(values, bits, outer, channels, inner, chunks, block_rows, block_length):  # type: ignore[no-untyped-def]
    """Partial moments ``(5, chunks, C)`` (count, shift, mean about it, M2, scale) of ``x3``
    ``(A, C, B) = (outer, channels, inner)``, given flat (``values``; ``bits``: the same memory as
    integers of the same size): task ``(chunk, c)`` merges, over its
    ``chunk`` of the rows ``a``, the blocks of channel ``c``: ``block_rows`` rows by pieces of
    ``block_length`` values."""
    per_chunk = (outer + chunks - 1) // chunks
    pieces = (inner + block_length - 1) // block_length
    partial = np.zeros((5, chunks, channels))
    for task in prange(chunks * channels):
        chunk = task // channels
        channel = task - chunk * channels
        count = shift = mean = m2 = 0.0
        scale = 1.0
        first, last = chunk * per_chunk, min(outer, (chunk + 1) * per_chunk)
        for a0 in range(first, last, block_rows):
            a1 = min(last, a0 + block_rows)
            for piece in range(pieces):
                start, stop = piece * block_length, min(inner, (piece + 1) * block_length)
                count_b, mean_b, correction_b, m2_b, scale_b = _block(
                    values, bits, channels, inner, channel, a0, a1, start, stop
                )
                count, shift, mean, m2, scale = _merge(
                    count, shift, mean, m2, scale, count_b, mean_b, correction_b, m2_b, scale_b
                )
        partial[0, chunk, channel] = count
        partial[1, chunk, channel] = shift
        partial[2, chunk, channel] = mean
        partial[3, chunk, channel] = m2
        partial[4, chunk, channel] = scale
    return partial


@numba.njit(parallel=True, cache=True, nogil=True)
def tile_moments(x2, bits2, rows, columns):  # type: ignore[no-untyped-def]
    """Partial moments ``(5, P, K)`` of the columns of ``x2`` ``(A, K)`` (``bits2``: its memory
    as integers), ``P = ceil(A / rows)``: task ``(p, q)`` takes the tile of ``rows`` rows by
    ``columns`` columns, each column of which is a block. Its two passes run down the rows,
    each row's piece added elementwise to per-column accumulators (contiguous: they
    vectorize), and the tile stays in the cache between them. float32 tiles take one scale
    for all their columns (float64 sums cannot lose a float32 value to it), from row
    reductions: per-column extremes, elementwise on integers, cost more than the reads."""
    outer, width = x2.shape
    row_tiles = (outer + rows - 1) // rows
    column_tiles = (width + columns - 1) // columns
    partial = np.empty((5, row_tiles, width))
    for task in prange(row_tiles * column_tiles):
        p = task // column_tiles
        q = task - p * column_tiles
        a0, a1 = p * rows, min(outer, (p + 1) * rows)
        k0, k1 = q * columns, min(width, (q + 1) * columns)
        n = k1 - k0
        total = np.zeros(n)
        largest = np.zeros(n, dtype=bits2.dtype)
        least = bits2[a0][k0:k1].copy()
        greatest = bits2[a0][k0:k1].copy()
        if bits2.itemsize == 4:  # float32: one scale for the tile, extremes by row reductions
            tile_largest = largest[0]
            for a in range(a0, a1):
                _column_sums(x2[a][k0:k1], total)
                tile_largest = max(tile_largest, _largest_pattern(bits2[a][k0:k1]))
            largest[:] = tile_largest
            least[:] = 0
            greatest[:] = 1  # no column taken as constant (see _column_sums)
        else:
            for a in range(a0, a1):
                _column_values(x2[a][k0:k1], bits2[a][k0:k1], total, largest, least, greatest)
        count = np.float64(a1 - a0)
        scale = np.empty(n)
        mean = np.empty(n)
        for j in range(n):
            scale[j] = _power_of_two_scale(largest[j], bits2.itemsize)
            mean[j] = total[j] * (scale[j] / SHRINK) / count
        deviations = np.zeros(n)
        squares = np.zeros(n)
        for a in range(a0, a1):
            _column_deviations(x2[a][k0:k1], scale, mean, deviations, squares)
        for j in range(n):  # as _merge takes them: the shift is the pass's mean
            column = k0 + j
            partial[0, p, column] = count
            partial[4, p, column] = scale[j]
            if least[j] == greatest[j]:  # a constant column: exact
                partial[1, p, column] = np.float64(x2[a0, column]) * scale[j]
                partial[2, p, column] = 0.0
                partial[3, p, column] = 0.0
            else:
                correction = deviations[j] / count
                partial[1, p, column] = mean[j]
                partial[2, p, column] = correction
                partial[3, p, column] = squares[j] - deviations[j] * correction
    return partial


@numba.njit(cache=True, nogil=True)
def _column_sums(row, total):  # type: ignore[no-untyped-def]
    """Add one float32 row's piece to the per-column shrunk sums. In float64, a column of ``k``
    equal float32 values sums to exactly ``k * v * SHRINK`` (24 + 14 bits), its mean is then
    exactly ``v`` and its deviations 0: constant columns are exact without being detected."""
    for j in range(row.shape[0]):
        total[j] += np.float64(row[j]) * SHRINK


@numba.njit(fastmath=REDUCTION_MATH, cache=True, nogil=True)
def _largest_pattern(bits):  # type: ignore[no-untyped-def]
    """The largest magnitude's bit pattern in ``bits``: an integer reduction, which vectorizes."""
    magnitude = np.iinfo(bits.dtype).max
    largest = magnitude & 0
    for j in range(bits.shape[0]):
        largest = max(largest, bits[j] & magnitude)
    return largest


@numba.njit(cache=True, nogil=True)
def _column_values(row, bits, total, largest, least, greatest):  # type: ignore[no-untyped-def]
    """Add one row's piece to the per-column shrunk sums and bit-pattern extremes."""
    magnitude = np.iinfo(bits.dtype).max
    for j in range(row.shape[0]):
        total[j] += np.float64(row[j]) * SHRINK
        pattern = bits[j]
        largest[j] = max(largest[j], pattern & magnitude)
        least[j] = min(least[j], pattern)
        greatest[j] = max(greatest[j], pattern)


@numba.njit(cache=True, nogil=True)
def _column_deviations(row, scale, mean, total, squares):  # type: ignore[no-untyped-def]
    """Add one row's piece to the per-column sums of ``d`` and ``d * d``, ``d = x * scale - mean``."""
    for j in range(row.shape[0]):
        deviation = np.float64(row[j]) * scale[j] - mean[j]
        total[j] += deviation
        squares[j] += deviation * deviation


@numba.njit(parallel=True, cache=True, nogil=True)
def merge_partials(partial, inner):  # type: ignore[no-untyped-def]
    """Per channel, the merge of partial moments ``(5, P, C * inner)`` (channel ``c`` owns
    columns ``c * inner`` to ``(c + 1) * inner``): its shift, mean about it, M2 and scale."""
    width = partial.shape[2]
    channels = width // inner
    result = np.empty((4, channels))
    for channel in prange(channels):
        count = shift = mean = m2 = 0.0
        scale = 1.0
        for p in range(partial.shape[1]):
            for column in range(channel * inner, (channel + 1) * inner):
                count, shift, mean, m2, scale = _merge(
                    count, shift, mean, m2, scale,
                    partial[0, p, column], partial[1, p, column], partial[2, p, column],
                    partial[3, p, column], partial[4, p, column],
                )  # fmt: skip
        result[0, channel], result[1, channel], result[2, channel], result[3, channel] = shift, mean, m2, scale
    return result


# ------------------------------------------------------------------- backward sums


@numba.njit(fastmath=REDUCTION_MATH, cache=True, nogil=True)
def _row_products(grad, row, shift, scale):  # type: ignore[no-untyped-def]
    total = 0.0
    products = 0.0
    for j in range(row.shape[0]):
        g = np.float64(grad[j])
        total += g
        products += g * ((np.float64(row[j]) - shift) * scale)
    return total, products


@numba.njit(parallel=True, cache=True, nogil=True)
def row_product_sums(grad, values, outer, channels, inner, shift, scale, chunks):  # type: ignore[no-untyped-def]
    """Partial ``sum(g)`` and ``sum(g * (x - shift) * scale)`` ``(2, chunks, C)`` in float64, of
    flat ``(A, C, B)`` arrays."""
    per_chunk = (outer + chunks - 1) // chunks
    partial = np.zeros((2, chunks, channels))
    for task in prange(chunks * channels):
        chunk = task // channels
        channel = task - chunk * channels
        total = products = 0.0
        first, last = chunk * per_chunk, min(outer, (chunk + 1) * per_chunk)
        for a in range(first, last):
            row = (a * channels + channel) * inner
            t, p = _row_products(grad[row : row + inner], values[row : row + inner], shift[channel], scale[channel])
            total += t
            products += p
        partial[0, chunk, channel] = total
        partial[1, chunk, channel] = products
    return partial


@numba.njit(cache=True, nogil=True)
def _column_products(grad, row, shift, scale, total, products):  # type: ignore[no-untyped-def]
    """Add ``g`` and ``g * (x - shift) * scale`` of one row to per-column accumulators: an
    elementwise update (all 1-D and contiguous), which vectorizes without reassociation."""
    for j in range(row.shape[0]):
        g = np.float64(grad[j])
        total[j] += g
        products[j] += g * ((np.float64(row[j]) - shift[j]) * scale[j])


@numba.njit(parallel=True, cache=True, nogil=True)
def column_product_sums(g2, x2, shift, scale, row_chunks, columns):  # type: ignore[no-untyped-def]
    """Partial sums ``(2, row_chunks, K)`` of the columns of ``(A, K)`` views, ``shift`` and
    ``scale`` per column (float64): task ``(p, q)`` runs down its chunk of rows, adding each
    row's piece of ``columns`` columns to accumulators that stay in the cache."""
    outer, width = x2.shape
    per_chunk = (outer + row_chunks - 1) // row_chunks
    column_tiles = (width + columns - 1) // columns
    partial = np.zeros((2, row_chunks, width))
    for task in prange(row_chunks * column_tiles):
        p = task // column_tiles
        q = task - p * column_tiles
        k0, k1 = q * columns, min(width, (q + 1) * columns)
        total = np.zeros(k1 - k0)
        products = np.zeros(k1 - k0)
        for a in range(p * per_chunk, min(outer, (p + 1) * per_chunk)):
            _column_products(g2[a][k0:k1], x2[a][k0:k1], shift[k0:k1], scale[k0:k1], total, products)
        partial[0, p, k0:k1] = total
        partial[1, p, k0:k1] = products
    return partial


# ---------------------------------------------------------------- elementwise forms


@numba.njit(parallel=True, cache=True, nogil=True)
def row_affine(values, channels, inner, chunks, scale, shift, mult, add):  # type: ignore[no-untyped-def]
    """``(x * scale - shift) * mult + add`` of flat ``(A, C, B)`` values with per-channel
    scalars; ``chunks`` runs of whole ``(a, c)`` rows in parallel."""
    out = np.empty_like(values)
    rows = values.shape[0] // inner
    per_chunk = (rows + chunks - 1) // chunks
    for chunk in prange(chunks):
        for r in range(chunk * per_chunk, min(rows, (chunk + 1) * per_chunk)):
            channel = r % channels
            start = r * inner
            _affine_run(
                values[start : start + inner], out[start : start + inner],
                scale[channel], shift[channel], mult[channel], add[channel],
            )  # fmt: skip
    return out


@numba.njit(cache=True, nogil=True)
def _affine_run(row, out, scale, shift, mult, add):  # type: ignore[no-untyped-def]
    for j in range(row.shape[0]):
        out[j] = (row[j] * scale - shift) * mult + add


@numba.njit(parallel=True, cache=True, nogil=True)
def tile_affine(x2, scale, shift, mult, add):  # type: ignore[no-untyped-def]
    """The same on an ``(A, K)`` view, with per-column vectors (pattern rows), rows in parallel."""
    out = np.empty_like(x2)
    for a in prange(x2.shape[0]):
        _affine_pattern(x2[a], out[a], scale, shift, mult, add)
    return out


@numba.njit(cache=True, nogil=True)
def _affine_pattern(row, out, scale, shift, mult, add):  # type: ignore[no-untyped-def]
    for j in range(row.shape[0]):
        out[j] = (row[j] * scale[j] - shift[j]) * mult[j] + add[j]


@numba.njit(parallel=True, cache=True, nogil=True)
def row_grad_input(grad, values, channels, inner, chunks, k, shift, f, c):  # type: ignore[no-untyped-def]
    """``g * k + (x - shift) * f + c`` of flat ``(A, C, B)`` arrays with per-channel scalars."""
    out = np.empty_like(values)
    rows = values.shape[0] // inner
    per_chunk = (rows + chunks - 1) // chunks
    for chunk in prange(chunks):
        for r in range(chunk * per_chunk, min(rows, (chunk + 1) * per_chunk)):
            channel = r % channels
            start = r * inner
            _grad_run(
                grad[start : start + inner], values[start : start + inner], out[start : start + inner],
                k[channel], shift[channel], f[channel], c[channel],
            )  # fmt: skip
    return out


@numba.njit(cache=True, nogil=True)
def _grad_run(grad, row, out, k, shift, f, c):  # type: ignore[no-untyped-def]
    for j in range(row.shape[0]):
        out[j] = grad[j] * k + (row[j] - shift) * f + c


@numba.njit(parallel=True, cache=True, nogil=True)
def tile_grad_input(g2, x2, k, shift, f, c):  # type: ignore[no-untyped-def]
    """The same on ``(A, K)`` views with per-column vectors."""
    out = np.empty_like(x2)
    for a in prange(x2.shape[0]):
        _grad_pattern(g2[a], x2[a], out[a], k, shift, f, c)
    return out


@numba.njit(cache=True, nogil=True)
def _grad_pattern(g_row, x_row, out, k, shift, f, c):  # type: ignore[no-untyped-def]
    for j in range(x_row.shape[0]):
        out[j] = g_row[j] * k[j] + (x_row[j] - shift[j]) * f[j] + c[j]
