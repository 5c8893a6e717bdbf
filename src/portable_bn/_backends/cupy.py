"""CuPy: the per-channel reductions as block kernels, the elementwise forms as ElementwiseKernels,
and the per-channel arithmetic compiled into one kernel.

Why: CuPy runs each array operation as a kernel launch of about 7 us of Python and driver
time, and the pure primitives with the shared per-channel arithmetic are some sixty of them
(H100: 0.7 to 1.4 ms a training call, 5 to 30 x cuDNN). Here a training call is five
launches (the block moments and their merge, the mean retaken about itself, the per-channel
vectors, the output), an eval call two, a backward four:

- :meth:`CupyPrimitives.block_moments` (the statistics of a training call, ``one_read``):
  each block of the kernel takes one slice of one channel of the input, viewed as
  ``(N, C, L)``: its largest magnitude's power-of-two scale, its mean, and in a second pass
  over the same slice its deviations' sums and M2 (a constant slice exactly), in float64;
  one thread per channel then merges its blocks' moments in block order (Chan, Golub and
  LeVeque, about the first block's mean), the algorithm of the Numba and Triton kernels.
- the other reductions (:meth:`CupyPrimitives.first_pass`, ``shifted_sums``,
  ``product_sums``; the backward, masked and symbolic routes): each block of a kernel
  reduces one slice of one channel into float64 partial sums (and minima, maxima).

Every channel's partials are combined in one fixed order, so the same input always gives
the same bits (no atomics). The values are formed in float64 (``x * scale - shift``): a
float64 sum of float32 data neither overflows nor loses the offset.

Other primitives:

- the fused scale-and-shift and the input gradient's form: ``cupy.ElementwiseKernel`` (any
  strides, no copy of the input).
- :meth:`CupyPrimitives.per_channel`: the shared function (statistics, running update,
  coefficients) traced by :mod:`.cuda_trace` into the body of one ``ElementwiseKernel`` over
  the channels, compiled once per function and signature.

No source here states a batch-norm rule: the kernels reduce and apply what they are given.
Every kernel is compiled without fused multiply-adds (``--fmad=false``), so each operation
rounds as NumPy's does. ``tests/test_cupy.py`` checks every primitive against the pure ones and
the whole functions against the float64 reference on a GPU; ``tests/cuda_emulator.py`` runs
the same kernels on the CPU (g++) where there is none.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import cupy as cp
import numpy as np

from .._primitives import Primitives
from .._recipe import Recipe
from . import cuda_trace

_THREADS = 256  # a power of two: the block reductions halve it
_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_OPTIONS = ("--std=c++14", "--fmad=false", "--ftz=false")

_SOURCE = r"""
#define PBN_THREADS 256

__device__ double pbn_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

struct PbnAdd { __device__ double operator()(double a, double b) const { return a + b; } };
struct PbnMin { __device__ double operator()(double a, double b) const { return fmin(a, b); } };
struct PbnMax { __device__ double operator()(double a, double b) const { return fmax(a, b); } };

struct PbnLeast { __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; } };
struct PbnGreatest { __device__ long long operator()(long long a, long long b) const { return a > b ? a : b; } };

// Tree reduction over the block (blockDim.x == PBN_THREADS); every thread gets the result.
template <typename V, typename Op>
__device__ V pbn_block_reduce(V value, Op op, V* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (unsigned int stride = PBN_THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
        __syncthreads();
    }
    const V result = shared[0];
    __syncthreads();
    return result;
}

// Block (c, b) of a channel loop: elements [b * chunk, (b + 1) * chunk) of channel c's
// N * L values in an (N, C, L) array, thread by thread; off is the element's offset.
#define PBN_CHANNEL_LOOP(...)                                                    \
    const I c = blockIdx.x / blocks, b = blockIdx.x - c * blocks;              \
    const I begin = b * chunk;                                                 \
    const I end = begin + chunk < count ? begin + chunk : count;               \
    I j = begin + threadIdx.x;                                                 \
    if (j < end) {                                                             \
        I n = j / L, l = j - n * L;                                            \
        I off = n * CL + c * L + l;                                            \
        const I jump = step_n * CL + step_l;                                   \
        for (; j < end; j += PBN_THREADS) {                                    \
            __VA_ARGS__                                                        \
            off += jump;                                                       \
            l += step_l;                                                       \
            if (l >= L) { l -= L; off += CL - L; }                             \
        }                                                                      \
    }

// Per block: min(x), max(x), sum(x * shrink) -> part[3 * block + k].
template <typename T, typename I>
__global__ void pbn_first_pass(const T* __restrict__ x, double shrink, I count, I CL, I L, I blocks, I chunk,
                               I step_n, I step_l, double* __restrict__ part) {
    __shared__ double shared[PBN_THREADS];
    double low = pbn_inf(), high = -pbn_inf(), total = 0.0;
    PBN_CHANNEL_LOOP(
        const double v = (double)x[off];
        low = fmin(low, v);
        high = fmax(high, v);
        total += v * shrink;
    )
    low = pbn_block_reduce(low, PbnMin(), shared);
    high = pbn_block_reduce(high, PbnMax(), shared);
    total = pbn_block_reduce(total, PbnAdd(), shared);
    if (threadIdx.x == 0) {
        double* out = part + 3 * (unsigned long long)blockIdx.x;
        out[0] = low;
        out[1] = high;
        out[2] = total;
    }
}

// Per block: sum(d), sum(d * d), d = x * scale[c] - shift[c] in float64 -> part[2 * block + k].
template <typename T, typename I>
__global__ void pbn_shifted_sums(const T* __restrict__ x, const T* __restrict__ scale,
                                 const T* __restrict__ shift, int has_scale, int has_shift, I count, I CL, I L,
                                 I blocks, I chunk, I step_n, I step_l, double* __restrict__ part) {
    __shared__ double shared[PBN_THREADS];
    double total = 0.0, squares = 0.0;
    {
        const I channel = blockIdx.x / blocks;
        const double p = has_scale ? (double)scale[channel] : 1.0;
        const double m = has_shift ? (double)shift[channel] : 0.0;
        PBN_CHANNEL_LOOP(
            const double d = (double)x[off] * p - m;
            total += d;
            squares += d * d;
        )
    }
    total = pbn_block_reduce(total, PbnAdd(), shared);
    squares = pbn_block_reduce(squares, PbnAdd(), shared);
    if (threadIdx.x == 0) {
        part[2 * (unsigned long long)blockIdx.x] = total;
        part[2 * (unsigned long long)blockIdx.x + 1] = squares;
    }
}

// Per block: sum(g), sum(g * (x - shift[c]) * scale[c]) in float64 -> part[2 * block + k].
template <typename T, typename I>
__global__ void pbn_product_sums(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ shift,
                                 const T* __restrict__ scale, int has_shift, int has_scale, I count, I CL, I L,
                                 I blocks, I chunk, I step_n, I step_l, double* __restrict__ part) {
    __shared__ double shared[PBN_THREADS];
    double grad_total = 0.0, products = 0.0;
    {
        const I channel = blockIdx.x / blocks;
        const double m = has_shift ? (double)shift[channel] : 0.0;
        const double p = has_scale ? (double)scale[channel] : 1.0;
        PBN_CHANNEL_LOOP(
            const double g = (double)grad[off];
            grad_total += g;
            products += g * (((double)x[off] - m) * p);
        )
    }
    grad_total = pbn_block_reduce(grad_total, PbnAdd(), shared);
    products = pbn_block_reduce(products, PbnAdd(), shared);
    if (threadIdx.x == 0) {
        part[2 * (unsigned long long)blockIdx.x] = grad_total;
        part[2 * (unsigned long long)blockIdx.x + 1] = products;
    }
}

// A value's bit pattern as a signed integer (a float's sign-extended).
__device__ long long pbn_bits(float v) { return (long long)__float_as_int(v); }
__device__ long long pbn_bits(double v) { return __double_as_longlong(v); }

// From the bit pattern of a block's largest magnitude: 2**-k, k = floor(log2(max|x|)), where
// max|x| >= 2 (the exponent field), k at most 126 (float) or 1022 (double), else 1; 0 for a
// block holding an infinity (its moments become NaN), 1 for one holding NaN. Exact.
__device__ double pbn_power_of_two_scale(long long largest, int wide) {
    const int mantissa = wide ? 52 : 23;
    const long long field_mask = wide ? 0x7ffLL : 0xffLL, bias = wide ? 1023LL : 127LL;
    const long long field = (largest >> mantissa) & field_mask;
    if (field == field_mask) return (largest & ((1LL << mantissa) - 1)) == 0 ? 0.0 : 1.0;
    const long long exponent = field - bias;
    if (exponent < 1) return 1.0;
    const long long k = exponent < bias - 1 ? exponent : bias - 1;
    return __longlong_as_double((1023LL - k) << 52);
}

// Per block, the moments of x * scale over its values (a block: one slice of one channel, as
// PBN_CHANNEL_LOOP) -> part[5 * block + k]: count, mean, correction, M2, scale. Pass 1: the
// largest magnitude's bit pattern (the block's power-of-two scale), the least and greatest bit
// patterns, sum(x * shrink) (shrink * chunk < 1: it cannot overflow); mean = the sum rescaled,
// rounded. Pass 2, over the same values: sum(d), sum(d * d), d = x * scale - mean; the
// correction sum(d) / k is kept apart from the mean, M2 = sum(d * d) - sum(d) * correction.
// A constant block (every bit pattern the same): mean x * scale, correction and M2 0, exactly.
template <typename T, typename I>
__global__ void pbn_block_moments(const T* __restrict__ x, double shrink, I count, I CL, I L, I blocks, I chunk,
                                  I step_n, I step_l, double* __restrict__ part) {
    __shared__ double shared[PBN_THREADS];
    __shared__ long long patterns[PBN_THREADS];
    const long long magnitude = sizeof(T) == 4 ? 0x7fffffffLL : 0x7fffffffffffffffLL;
    long long largest = 0, least = 0x7fffffffffffffffLL, greatest = -0x7fffffffffffffffLL - 1;
    double total = 0.0;
    {
        PBN_CHANNEL_LOOP(
            const T v = x[off];
            const long long pattern = pbn_bits(v);
            largest = (pattern & magnitude) > largest ? (pattern & magnitude) : largest;
            least = pattern < least ? pattern : least;
            greatest = pattern > greatest ? pattern : greatest;
            total += (double)v * shrink;
        )
    }
    largest = pbn_block_reduce(largest, PbnGreatest(), patterns);
    least = pbn_block_reduce(least, PbnLeast(), patterns);
    greatest = pbn_block_reduce(greatest, PbnGreatest(), patterns);
    total = pbn_block_reduce(total, PbnAdd(), shared);
    const I c = blockIdx.x / blocks, b = blockIdx.x - c * blocks;
    const I begin = b * chunk;
    const I end = begin + chunk < count ? begin + chunk : count;
    const double k = (double)(end - begin);
    const double scale = pbn_power_of_two_scale(largest, sizeof(T) == 8);
    double* out = part + 5 * (unsigned long long)blockIdx.x;
    if (least == greatest) {  // uniform across the block: no second pass
        if (threadIdx.x == 0) {
            const I n = begin / L, l = begin - n * L;
            out[0] = k;
            out[1] = (double)x[n * CL + c * L + l] * scale;
            out[2] = 0.0;
            out[3] = 0.0;
            out[4] = scale;
        }
        return;
    }
    const double mean = total * (scale / shrink) / k;
    double deviations = 0.0, squares = 0.0;
    {
        PBN_CHANNEL_LOOP(
            const double d = (double)x[off] * scale - mean;
            deviations += d;
            squares += d * d;
        )
    }
    deviations = pbn_block_reduce(deviations, PbnAdd(), shared);
    squares = pbn_block_reduce(squares, PbnAdd(), shared);
    if (threadIdx.x == 0) {
        const double correction = deviations / k;
        out[0] = k;
        out[1] = mean;
        out[2] = correction;
        out[3] = squares - deviations * correction;
        out[4] = scale;
    }
}

// One thread per channel: its blocks' moments (pbn_block_moments) merged in block order (Chan,
// Golub and LeVeque) at the finer of the scales met so far (powers of two: exact), about the
// first block's mean (the shift); a block's mean about the shift is (mean_b - shift) +
// correction_b, so no digit is lost however far the data are from zero.
// -> out[k * channels + c]: shift, mean about it, M2, scale.
template <typename I>
__global__ void pbn_merge_moments(const double* __restrict__ part, I channels, I blocks, double* __restrict__ out) {
    const I c = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    double count = 0.0, shift = 0.0, mean = 0.0, m2 = 0.0, scale = 1.0;
    for (I b = 0; b < blocks; ++b) {
        const double* block = part + 5 * (unsigned long long)(c * blocks + b);
        const double count_b = block[0], scale_b = block[4];
        double mean_b = block[1], correction_b = block[2], m2_b = block[3];
        if (count_b == 0.0) continue;
        if (count == 0.0) {
            count = count_b, shift = mean_b, mean = correction_b, m2 = m2_b, scale = scale_b;
            continue;
        }
        if (scale_b < scale) {
            const double ratio = scale_b / scale;
            shift = shift * ratio, mean = mean * ratio, m2 = m2 * (ratio * ratio), scale = scale_b;
        } else if (scale < scale_b) {
            const double ratio = scale / scale_b;
            mean_b = mean_b * ratio, correction_b = correction_b * ratio, m2_b = m2_b * (ratio * ratio);
        }
        const double total = count + count_b;
        const double weight = count_b / total;
        const double delta = ((mean_b - shift) + correction_b) - mean;
        mean = mean + delta * weight;
        m2 = m2 + m2_b + delta * delta * (count * weight);
        count = total;
    }
    out[c] = shift;
    out[channels + c] = mean;
    out[2 * (unsigned long long)channels + c] = m2;
    out[3 * (unsigned long long)channels + c] = scale;
}

// One thread per channel: its blocks' partials combined in block order (kind 0: sum, 1: min,
// 2: max for each of the width partials of a block) -> out[k * channels + c].
template <typename I>
__global__ void pbn_combine(const double* __restrict__ part, I channels, I blocks, int width, int kind0, int kind1,
                            int kind2, double* __restrict__ out) {
    const I c = (I)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const int kinds[3] = {kind0, kind1, kind2};
    for (int k = 0; k < width; ++k) {
        double value = kinds[k] == 1 ? pbn_inf() : kinds[k] == 2 ? -pbn_inf() : 0.0;
        for (I b = 0; b < blocks; ++b) {
            const double v = part[(unsigned long long)(c * blocks + b) * width + k];
            value = kinds[k] == 1 ? fmin(value, v) : kinds[k] == 2 ? fmax(value, v) : value + v;
        }
        out[(unsigned long long)k * channels + c] = value;
    }
}
"""

_REDUCTIONS = ("first_pass", "shifted_sums", "product_sums", "block_moments")
_SUM, _MIN, _MAX = np.int32(0), np.int32(1), np.int32(2)
_YES, _NO = np.int32(1), np.int32(0)
_WIDE_FROM = 2**31  # inputs of this many elements or more index with long long (tests lower it)
_VECTOR_BLOCK = 128


@functools.cache
def _kernels(dtype: np.dtype, wide: bool, device_id: int) -> dict[str, Any]:
    """The reduction kernels for ``dtype`` and an index type (``long long`` if ``wide``, else
    ``unsigned int``), compiled on first use (CuPy caches the binary on disk), per GPU."""
    index = "long long" if wide else "unsigned int"
    names = {name: f"pbn_{name}<{_DTYPES[dtype]}, {index}>" for name in _REDUCTIONS}
    names["combine"] = f"pbn_combine<{index}>"
    names["merge_moments"] = f"pbn_merge_moments<{index}>"
    module = cp.RawModule(code=_SOURCE, options=_OPTIONS, name_expressions=list(names.values()))
    return {name: module.get_function(expression) for name, expression in names.items()}


@functools.cache
def _multiprocessors(device_id: int) -> int:
    return int(cp.cuda.Device(device_id).attributes["MultiProcessorCount"])


class _Plan(NamedTuple):
    """Launch geometry of the reductions for one shape and GPU, computed once (a launch costs
    about 1 us per argument it converts)."""

    wide: bool
    channels: Any  # C, as the index type
    blocks: Any  # reduction blocks per channel
    loop: tuple[Any, ...]  # count, C * L, L, blocks, chunk, step_n, step_l (PBN_CHANNEL_LOOP)
    reduce_grid: tuple[int]
    combine_grid: tuple[int]


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple[int, ...], channel_axis: int, multiprocessors: int) -> _Plan:
    """About four reduction blocks per multiprocessor in all, at least 8 elements per thread."""
    channels = shape[channel_axis]
    inner = math.prod(shape[channel_axis + 1 :])
    count = math.prod(shape[:channel_axis]) * inner
    blocks = max(1, min(-(-4 * multiprocessors // channels), -(-count // (8 * _THREADS))))
    chunk = -(-count // blocks)
    blocks = -(-count // chunk)
    step_n, step_l = divmod(_THREADS, inner)
    wide = count * channels + _THREADS * 16 * multiprocessors >= _WIDE_FROM  # indices within the type
    index = np.int64 if wide else np.uint32
    return _Plan(
        wide=wide,
        channels=index(channels),
        blocks=index(blocks),
        loop=tuple(index(v) for v in (count, channels * inner, inner, blocks, chunk, step_n, step_l)),
        reduce_grid=(channels * blocks,),
        combine_grid=(-(-channels // _VECTOR_BLOCK),),
    )


def _fits(x: Any) -> bool:
    return isinstance(x, cp.ndarray) and x.dtype in _DTYPES and x.size > 0


def _reduce(name: str, inputs: tuple[Any, ...], middle: tuple[Any, ...], recipe: Recipe, kinds: Any) -> Any:
    """Reduction kernel ``name`` over the full-size ``inputs`` (C-ordered copies where they are
    not), with the per-channel ``middle`` arguments; then each channel's partials combined."""
    x = inputs[-1]
    plan = _plan(tuple(x.shape), recipe.channel_axis, _multiprocessors(x.device.id))
    kernels = _kernels(x.dtype, plan.wide, x.device.id)
    width = len(kinds)
    part = cp.empty(int(plan.channels) * int(plan.blocks) * width, dtype=cp.float64)
    dense = tuple(cp.ascontiguousarray(array) for array in inputs)
    kernels[name](plan.reduce_grid, (_THREADS,), (*dense, *middle, *plan.loop, part))
    out = cp.empty((width, int(plan.channels)), dtype=cp.float64)
    kinds = (*kinds, *(_SUM,) * (3 - width))
    combine = (part, plan.channels, plan.blocks, np.int32(width), *kinds, out)
    kernels["combine"](plan.combine_grid, (_VECTOR_BLOCK,), combine)
    return tuple(out[k] for k in range(width))


def _block_moments(x: Any, recipe: Recipe) -> tuple[Any, Any, Any, Any]:
    """Per channel ``(shift, mean, m2, scale)`` (:meth:`CupyPrimitives.block_moments`): each
    reduction block's moments, then every channel's merged in block order."""
    x = cp.ascontiguousarray(x)
    plan = _plan(tuple(x.shape), recipe.channel_axis, _multiprocessors(x.device.id))
    kernels = _kernels(x.dtype, plan.wide, x.device.id)
    chunk = int(plan.loop[4])
    shrink = np.float64(math.ldexp(1.0, -chunk.bit_length()))  # chunk * shrink < 1: no overflow
    channels = int(plan.channels)
    part = cp.empty(channels * int(plan.blocks) * 5, dtype=cp.float64)
    kernels["block_moments"](plan.reduce_grid, (_THREADS,), (x, shrink, *plan.loop, part))
    out = cp.empty((4, channels), dtype=cp.float64)
    kernels["merge_moments"](plan.combine_grid, (_VECTOR_BLOCK,), (part, plan.channels, plan.blocks, out))
    return out[0], out[1], out[2], out[3]


def _optional(x: Any, first: Any, second: Any) -> tuple[Any, ...]:
    """Two optional per-channel vectors as the kernels take them: dense vectors of ``x``'s dtype
    (an absent one: any array of the dtype, not read) and their presence flags."""
    stand_in = x.ravel()[:1]
    vectors = tuple(stand_in if v is None else _dense(v, x.dtype) for v in (first, second))
    return (*vectors, *(_NO if v is None else _YES for v in (first, second)))


def _dense(vector: Any, dtype: Any) -> Any:
    """A per-channel vector the kernels index as ``v[c]`` (a strided or broadcast view is copied)."""
    return None if vector is None else cp.ascontiguousarray(vector.astype(dtype, copy=False))


class CupyPrimitives(Primitives):
    """Reductions, elementwise forms and per-channel arithmetic as CuPy kernels."""

    name = "CuPy kernels"

    def one_read(self, x: Any) -> bool:
        return _fits(x)

    def block_moments(self, x: Any, recipe: Recipe) -> tuple[Any, Any, Any, Any]:
        """The moments of :meth:`.Primitives.block_moments` from two kernels: each reduction block
        (one slice of one channel) takes its largest magnitude, power-of-two scale, mean and,
        in a second pass over the same slice, its deviations' sums and M2; one thread per
        channel merges its blocks' moments in block order. ``scale``: the channel's finest
        block scale (float64, as are the others)."""
        if not _fits(x):
            return super().block_moments(x, recipe)
        return _block_moments(x, recipe)

    def first_pass(self, x: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
        if not _fits(x):
            return super().first_pass(x, recipe, shrink)
        low, high, total = _reduce("first_pass", (x,), (np.float64(shrink),), recipe, (_MIN, _MAX, _SUM))
        return low, high, total

    def shifted_sums(self, x: Any, recipe: Recipe, scale: Any, shift: Any) -> tuple[Any, Any]:
        if not _fits(x):
            return super().shifted_sums(x, recipe, scale, shift)
        total, squares = _reduce("shifted_sums", (x,), _optional(x, scale, shift), recipe, (_SUM, _SUM))
        return total, squares

    def product_sums(self, grad: Any, x: Any, recipe: Recipe, shift: Any, scale: Any) -> tuple[Any, Any]:
        if not (_fits(x) and _fits(grad) and grad.dtype == x.dtype):
            return super().product_sums(grad, x, recipe, shift, scale)
        grad_total, products = _reduce("product_sums", (grad, x), _optional(x, shift, scale), recipe, (_SUM, _SUM))
        return grad_total, products

    def affine(self, x: Any, recipe: Recipe, scale: Any, shift: Any, mult: Any, add: Any) -> Any:
        if not _fits(x):
            return super().affine(x, recipe, scale, shift, mult, add)
        given = {"scale": scale, "shift": shift, "mult": mult, "add": add}
        present = tuple(name for name, value in given.items() if value is not None)
        kernel = _elementwise("affine", present)
        vectors = [_dense(given[name], x.dtype) for name in present]
        assert recipe.inner is not None  # CuPy arrays have every size
        return kernel(x, *vectors, np.int64(recipe.num_channels), np.int64(recipe.inner))

    def grad_input(self, grad: Any, x: Any, recipe: Recipe, k: Any, shift: Any, f: Any, c: Any) -> Any:
        if not (_fits(x) and _fits(grad) and grad.dtype == x.dtype):
            return super().grad_input(grad, x, recipe, k, shift, f, c)
        given = {"k": k, "shift": shift, "f": f, "c": c}
        present = tuple(name for name, value in given.items() if value is not None)
        kernel = _elementwise("grad_input", present)
        vectors = [_dense(given[name], x.dtype) for name in present]
        assert recipe.inner is not None
        return kernel(grad, x, *vectors, np.int64(recipe.num_channels), np.int64(recipe.inner))

    def per_channel(self, fn: Callable[..., Any], *vectors: Any, **options: Any) -> Any:
        """``fn`` traced (:mod:`.cuda_trace`) into one kernel over the channels, compiled once per
        function and signature; its float options are the kernel's scalar arguments."""
        signature = tuple(
            None if v is None else "scalar" if isinstance(v, float | int) else np.dtype(v.dtype).name for v in vectors
        )
        scalars = tuple(
            name for name, value in options.items() if isinstance(value, float | int) and not isinstance(value, bool)
        )
        fixed = tuple((name, _key(value)) for name, value in options.items() if name not in scalars)
        kernel, rebuild = _per_channel_kernel(fn, signature, scalars, fixed, options)
        arguments = [v if isinstance(v, cp.ndarray) else np.float64(v) for v in vectors if v is not None]
        arguments += [np.float64(options[name]) for name in scalars]
        outputs = kernel(*arguments)
        return rebuild(list(outputs) if isinstance(outputs, tuple) else [outputs])


def _key(value: Any) -> Any:
    """An option as part of a cache key: dtypes by name."""
    return np.dtype(value).name if isinstance(value, np.dtype) else value


_per_channel_cache: dict[Any, tuple[Any, Any]] = {}


def _per_channel_kernel(
    fn: Callable[..., Any], signature: tuple[Any, ...], scalars: tuple[str, ...], fixed: tuple[Any, ...], options: Any
) -> tuple[Any, Any]:
    key = (fn, signature, scalars, fixed)
    found = _per_channel_cache.get(key)
    if found is not None:
        return found
    traced = cuda_trace.trace(fn, list(signature), {name: options[name] for name in options})
    program = traced.program
    params_in = ", ".join(f"{d.name} {name}" for name, d, _ in program.inputs)
    params_out = ", ".join(f"{d.name} {name}" for name, d in program.outputs)
    kernel = cp.ElementwiseKernel(
        params_in,
        params_out,
        program.body,
        name=f"pbn_{fn.__name__.strip('_')}",
        options=_OPTIONS,
        return_tuple=True,
    )
    found = _per_channel_cache[key] = (kernel, traced.rebuild)
    return found


_ELEMENTWISE = {
    # name: (inputs before the vectors, output, the operation from the vectors present)
    "affine": ("T x", "T y"),
    "grad_input": ("T g, T x", "T y"),
}


@functools.cache
def _elementwise(name: str, present: tuple[str, ...]) -> Any:
    """``y = (x * scale - shift) * mult + add`` (affine) or ``y = g * k + (x - shift) * f + c``
    (grad_input) over an array whose element ``i`` is in channel ``(i / L) % C``, for the
    vectors present (the others are left out of the expression)."""
    head, out = _ELEMENTWISE[name]
    raw = ", ".join(f"raw T {vector}" for vector in present)
    params = f"{head}, {raw}, int64 C, int64 L"
    v = {vector: f"{vector}[channel]" for vector in present}
    if name == "affine":
        term = "x" if "scale" not in v else f"(x * {v['scale']})"
        term = term if "shift" not in v else f"({term} - {v['shift']})"
        body = f"{term} * {v['mult']}" + ("" if "add" not in v else f" + {v['add']}")
    else:
        term = "x" if "shift" not in v else f"(x - {v['shift']})"
        body = f"g * {v['k']} + {term} * {v['f']} + {v['c']}"
    operation = f"const ptrdiff_t channel = (i / L) % C; y = {body};"
    return cp.ElementwiseKernel(params, out, operation, name=f"pbn_{name}", options=_OPTIONS)


_PRIMITIVES: dict[int, CupyPrimitives] = {}


def primitives_for(xp: ModuleType, x: Any) -> Primitives:
    found = _PRIMITIVES.get(id(xp))
    if found is None:
        found = _PRIMITIVES[id(xp)] = CupyPrimitives(xp)
    return found
