"""CuPy fast path: training, eval and backward in one to three CUDA kernels.

Why it exists: CuPy runs the agnostic code one operation per kernel, and each
call costs 10 to 30 us of Python and driver time; the prescaled training
forward is several dozen of them (H100: 0.7 to 1.4 ms a call, 5 to 30 x
PyTorch's cuDNN on the same data). These kernels take 0.08 to 0.11 ms per
training call on ResNet-like shapes (H200, four kernels: 0.65 to 2.4 x cuDNN;
eval 0.6 to 1.9 x; backward 0.3 to 0.7 x autograd; docs/performance). Each
launch costs about 7 us of CuPy's Python and driver time, so the output kernels
also compute the per-channel vectors where up to 1024 channels fit in a block's
shared memory: eval is a single launch, and training saves one where the output
grid is small (``_FUSED_TRAIN_GRID``). Here, for
float32 and float64 input of any shape and channel axis (viewed as
``(N, C, L)``; a non-contiguous input is first copied to C order):

- training: two reading passes, each kernel block reducing one slice of one
  channel into float64 partial sums (no atomics: the same input always gives
  the same bits). Pass 1: the channel's minimum, maximum and sum; pass 2: the
  corrected two-pass sums ``sum(d)`` and ``sum(d**2)`` with
  ``d = x * p - m0 * p`` around ``m0 = sum / n`` (the exact value for a
  constant channel), ``p`` the power of two of
  :func:`._agnostic.power_of_two_scale` (never below ``2**-126`` in float32,
  ``2**-1022`` in float64) from the channel's largest magnitude. Then one
  thread per channel turns the sums into the statistics (``_agnostic``'s
  formulas, in float64: ``mean = m0 + mean(d)``, ``var = mean(d**2) -
  mean(d)**2``, ``eps * p**2`` kept normal), the running update (PyTorch's
  rule with ``_agnostic.updated_running_stats``'s roundings in the input's
  dtype, ``skip_nonfinite`` included) and the output's per-channel
  ``p, m0 * p, scale, shift`` (for C <= 1024 and a small output grid every
  block of the output kernel does this for all channels into shared memory,
  summing the partials in one order, so every block has the same bits, and
  block 0 writes the returned vectors; otherwise a kernel of its own does it); the output kernel
  writes ``y = (x * p - m0 * p) * scale + shift``, the part of the float64 mean that
  ``m0 * p`` rounded to the dtype leaves out travelling in ``shift``
  (docs/accuracy). A float64 sum of float32 data can neither overflow nor
  lose the offset; in float64 the sum of pass 1 is of ``x * 2**-64`` (it
  cannot overflow) and the squares are of scaled values. The ``invstd``
  returned is ``1 / sqrt(var + eps)`` of the unscaled float64 variance
  wherever that is finite, so a constant channel of huge values gets
  ``1 / sqrt(eps)`` (the agnostic code's floor on ``eps * p**2`` gives less;
  the output is ``bias`` either way).
- eval: ``invstd = 1 / sqrt(running_var + eps)`` and ``invstd * weight`` in the
  dtype, as ``_agnostic``, then ``y = (x - running_mean) * scale + shift``: one
  kernel whose blocks each compute the vectors (C <= 1024), else one thread per
  channel and then the training output kernel with ``p = 1``.
- backward: float64 partial sums of ``g`` and ``g * xhat`` per block, one
  thread per channel for the gradients of the parameters, and one kernel for
  ``grad_input = (g - sum(g)/n - (x - mean) * invstd * sum(g*xhat)/n) * w * invstd``.

The kernels are compiled without fused multiply-adds and without flushing
subnormal numbers (``--fmad=false --ftz=false``), so each operation rounds as
the agnostic code's does. Per-channel vectors that are views (strided,
broadcast) are copied dense first: the kernels index them as ``v[c]``.
``tests/test_cupy_fast.py`` checks every path against the agnostic one and
the float64 reference, on ordinary and hard data, on a GPU;
``tests/cuda_emulator.py`` runs the same CUDA source on a CPU (CI).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import cupy as cp
import numpy as np

from ._recipe import Recipe

_THREADS = 256  # a power of two: the block reductions halve it
_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_SOURCE = r"""
#define PBN_THREADS 256
#define PBN_VECTOR_CAP 1024  // channels whose vectors fit in a block's shared memory (32 KiB)

__device__ double pbn_inf() { return __longlong_as_double(0x7ff0000000000000LL); }

struct PbnAdd { __device__ double operator()(double a, double b) const { return a + b; } };
struct PbnMin { __device__ double operator()(double a, double b) const { return fmin(a, b); } };
struct PbnMax { __device__ double operator()(double a, double b) const { return fmax(a, b); } };

// Tree reduction over the block (blockDim.x == PBN_THREADS); every thread gets the result.
template <typename Op>
__device__ double pbn_block_reduce(double value, Op op, double* shared) {
    shared[threadIdx.x] = value;
    __syncthreads();
    for (unsigned int stride = PBN_THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
        __syncthreads();
    }
    const double result = shared[0];
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

// Grid-stride loop over every element i of an (N, C, L) array, with its channel c.
#define PBN_ELEMENT_LOOP(...)                                                                          \
    for (I i = (I)blockIdx.x * PBN_THREADS + threadIdx.x; i < size; i += (I)PBN_THREADS * gridDim.x) { \
        const I c = (i / L) % C;                                                                       \
        __VA_ARGS__                                                                                    \
    }

// Pass 1: per block, sum(x * sum_scale), min(x), max(x) -> part1[block] (3 doubles).
template <typename T, typename I>
__global__ void pbn_stats1(const T* __restrict__ x, I count, I CL, I L, I blocks, I chunk, I step_n,
                           I step_l, double sum_scale, double* __restrict__ part1) {
    __shared__ double shared[PBN_THREADS];
    double total = 0.0, low = pbn_inf(), high = -pbn_inf();
    PBN_CHANNEL_LOOP(
        const double v = (double)x[off];
        total += v * sum_scale;
        low = fmin(low, v);
        high = fmax(high, v);
    )
    total = pbn_block_reduce(total, PbnAdd(), shared);
    low = pbn_block_reduce(low, PbnMin(), shared);
    high = pbn_block_reduce(high, PbnMax(), shared);
    if (threadIdx.x == 0) {
        double* out = part1 + 3 * (unsigned long long)blockIdx.x;
        out[0] = total;
        out[1] = low;
        out[2] = high;
    }
}

// Pass 2: the channel's m0 and p from pass 1 (every block of the channel reduces the
// same partials in the same order), then per block sum(d) and sum(d * d) with
// d = x * p - m0 * p -> part2[block]; block 0 stores (m0 * p, p) in channel[c].
// work: part1 (3 per block), part2 (2 per block), channel (2 per channel).
template <typename T, typename I>
__global__ void pbn_stats2(const T* __restrict__ x, I count, I CL, I L, I blocks, I chunk, I step_n,
                           I step_l, double unscale, int cap, double* __restrict__ work, I reductions) {
    __shared__ double shared[PBN_THREADS];
    const double* part1 = work;
    double* part2 = work + 3 * (unsigned long long)reductions;
    double* channel = work + 5 * (unsigned long long)reductions;
    double m0p, p = 1.0;
    {
        const I channel_index = blockIdx.x / blocks;
        double total = 0.0, low = pbn_inf(), high = -pbn_inf();
        for (I k = threadIdx.x; k < blocks; k += PBN_THREADS) {
            const double* in = part1 + 3 * (unsigned long long)(channel_index * blocks + k);
            total += in[0];
            low = fmin(low, in[1]);
            high = fmax(high, in[2]);
        }
        total = pbn_block_reduce(total, PbnAdd(), shared);  // every thread gets the channel's values
        low = pbn_block_reduce(low, PbnMin(), shared);
        high = pbn_block_reduce(high, PbnMax(), shared);
        const double largest = fmax(-low, high);
        if (largest > 1.0 && isfinite(largest)) p = ldexp(1.0, -min(ilogb(largest), cap));
        m0p = low == high ? low * p : total / (double)count * (unscale * p);  // no overflow
        if (blockIdx.x == channel_index * blocks && threadIdx.x == 0) {
            channel[2 * (unsigned long long)channel_index] = m0p;
            channel[2 * (unsigned long long)channel_index + 1] = p;
        }
    }
    double centered = 0.0, squares = 0.0;
    PBN_CHANNEL_LOOP(
        const double d = (double)x[off] * p - m0p;
        centered += d;
        squares += d * d;
    )
    centered = pbn_block_reduce(centered, PbnAdd(), shared);
    squares = pbn_block_reduce(squares, PbnAdd(), shared);
    if (threadIdx.x == 0) {
        part2[2 * (unsigned long long)blockIdx.x] = centered;
        part2[2 * (unsigned long long)blockIdx.x + 1] = squares;
    }
}

// What the output needs of one channel: y = (x * p - mp) * scale + shift.
template <typename T>
struct PbnAffine { T p, mp, scale, shift; };

// The training statistics of channel c from the pass-2 partials (summed in one order by
// every caller, so every caller gets the same bits), the running update, and the output's
// affine map. out (or nullptr): rows mean, invstd, new running mean, new running var.
template <typename T, typename I>
__device__ PbnAffine<T> pbn_channel(I c, I C, I blocks, double count, double eps, double smallest_normal,
                                    double bessel, const double* work, I reductions, const T* weight,
                                    const T* bias, int has_weight, int has_bias, const T* running_mean,
                                    const T* running_var, int has_running, double factor, const T* factor_array,
                                    int factor_is_array, int skip_nonfinite, T* out) {
    const double* part2 = work + 3 * (unsigned long long)reductions;
    const double* channel = work + 5 * (unsigned long long)reductions;
    double centered = 0.0, squares = 0.0;
    for (I k = 0; k < blocks; ++k) {
        centered += part2[2 * (unsigned long long)(c * blocks + k)];
        squares += part2[2 * (unsigned long long)(c * blocks + k) + 1];
    }
    const double m0p = channel[2 * (unsigned long long)c], p = channel[2 * (unsigned long long)c + 1];
    const double residual = centered / count;
    const double var_scaled = squares / count - residual * residual;
    const double invstd_scaled = 1.0 / sqrt(var_scaled + fmax(eps * p * p, smallest_normal));
    const T mean = (T)((m0p + residual) / p);
    const double var = var_scaled / p / p;  // Inf where the true variance is beyond float64
    const double scale = has_weight ? invstd_scaled * (double)weight[c] : invstd_scaled;
    const T mp = (T)m0p;
    PbnAffine<T> affine;
    affine.p = (T)p;
    affine.mp = mp;
    affine.scale = (T)scale;
    affine.shift = (T)((has_bias ? (double)bias[c] : 0.0) - ((m0p - (double)mp) + residual) * scale);
    if (out == nullptr) return affine;
    // The invstd returned: unscaled in float64 where the variance fits (always for float32
    // input; a constant channel of huge values gets 1 / sqrt(eps), not the floor's value).
    out[c] = mean;
    out[C + c] = (T)(isfinite(var) ? 1.0 / sqrt(var + eps) : invstd_scaled * p);
    if (has_running) {
        const T batch_var = (T)var;
        const T f = factor_is_array ? factor_array[0] : (T)factor;
        const T keep = factor_is_array ? (T)1 - f : (T)(1.0 - factor);
        const T unbiased = batch_var * (T)bessel;
        T new_mean = keep * running_mean[c] + f * mean;
        T new_var = keep * running_var[c] + f * unbiased;
        if (skip_nonfinite && !(isfinite(mean) && isfinite(unbiased))) {
            new_mean = running_mean[c];
            new_var = running_var[c];
        }
        out[2 * C + c] = new_mean;
        out[3 * C + c] = new_var;
    }
    return affine;
}

// The training output in one launch for C <= PBN_VECTOR_CAP: every block computes every
// channel's affine map into shared memory (block 0 also writes out's rows), then
// y = (x * p - mp) * scale + shift for its elements.
template <typename T, typename I>
__global__ void pbn_train_apply(const T* __restrict__ x, T* __restrict__ y, I size, I C, I L, I blocks,
                                double count, double eps, double smallest_normal, double bessel,
                                const double* __restrict__ work, I reductions, const T* weight, const T* bias,
                                int has_weight, int has_bias, const T* running_mean, const T* running_var,
                                int has_running, double factor, const T* factor_array, int factor_is_array,
                                int skip_nonfinite, T* out) {
    __shared__ double vec[4 * PBN_VECTOR_CAP];  // values of T: p, mp, scale, shift
    for (I c = threadIdx.x; c < C; c += PBN_THREADS) {
        const PbnAffine<T> affine = pbn_channel<T, I>(
            c, C, blocks, count, eps, smallest_normal, bessel, work, reductions, weight, bias, has_weight,
            has_bias, running_mean, running_var, has_running, factor, factor_array, factor_is_array,
            skip_nonfinite, blockIdx.x == 0 ? out : nullptr);
        vec[c] = affine.p;
        vec[C + c] = affine.mp;
        vec[2 * C + c] = affine.scale;
        vec[3 * C + c] = affine.shift;
    }
    __syncthreads();
    PBN_ELEMENT_LOOP(y[i] = (x[i] * (T)vec[c] - (T)vec[C + c]) * (T)vec[2 * C + c] + (T)vec[3 * C + c];)
}

// One thread per channel, where pbn_train_apply is not used (C > PBN_VECTOR_CAP, or a large
// output grid): out rows mean, invstd, new running mean, new running var, then the affine map
// p, m0 * p, scale, shift for pbn_apply.
template <typename T, typename I>
__global__ void pbn_train_vectors(I C, I blocks, double count, double eps, double smallest_normal,
                                  double bessel, const double* __restrict__ work, I reductions,
                                  const T* weight, const T* bias,
                                  int has_weight, int has_bias, const T* running_mean, const T* running_var,
                                  int has_running, double factor, const T* factor_array, int factor_is_array,
                                  int skip_nonfinite, T* out) {
    const I c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const PbnAffine<T> affine = pbn_channel<T, I>(
        c, C, blocks, count, eps, smallest_normal, bessel, work, reductions, weight, bias, has_weight, has_bias,
        running_mean, running_var, has_running, factor, factor_array, factor_is_array, skip_nonfinite, out);
    out[4 * C + c] = affine.p;
    out[5 * C + c] = affine.mp;
    out[6 * C + c] = affine.scale;
    out[7 * C + c] = affine.shift;
}

// Eval in one launch for C <= PBN_VECTOR_CAP: every block computes invstd = 1 / sqrt(running_var + eps)
// and invstd * weight in the dtype (as _agnostic) into shared memory, block 0 writes invstd,
// then y = (x - running_mean) * scale + shift.
template <typename T, typename I>
__global__ void pbn_eval(const T* __restrict__ x, T* __restrict__ y, I size, I C, I L, double eps,
                         const T* running_mean, const T* running_var, const T* weight, const T* bias,
                         int has_weight, int has_bias, T* invstd_out) {
    __shared__ double vec[3 * PBN_VECTOR_CAP];  // values of T: mean, scale, shift
    for (I c = threadIdx.x; c < C; c += PBN_THREADS) {
        const T invstd = (T)1 / sqrt(running_var[c] + (T)eps);
        if (blockIdx.x == 0) invstd_out[c] = invstd;
        vec[c] = running_mean[c];
        vec[C + c] = has_weight ? invstd * weight[c] : invstd;
        vec[2 * C + c] = has_bias ? bias[c] : (T)0;
    }
    __syncthreads();
    PBN_ELEMENT_LOOP(y[i] = (x[i] - (T)vec[c]) * (T)vec[C + c] + (T)vec[2 * C + c];)
}

// One thread per channel, eval (C > PBN_VECTOR_CAP). out rows: invstd, p (1), m0 * p (the
// running mean), scale, shift.
template <typename T, typename I>
__global__ void pbn_eval_vectors(I C, double eps, const T* running_mean, const T* running_var, const T* weight,
                                 const T* bias, int has_weight, int has_bias, T* out) {
    const I c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const T invstd = (T)1 / sqrt(running_var[c] + (T)eps);
    out[c] = invstd;
    out[C + c] = (T)1;
    out[2 * C + c] = running_mean[c];
    out[3 * C + c] = has_weight ? invstd * weight[c] : invstd;
    out[4 * C + c] = has_bias ? bias[c] : (T)0;
}

// y = (x * p - mp) * scale + shift; vectors rows from row: p, mp, scale, shift.
template <typename T, typename I>
__global__ void pbn_apply(const T* __restrict__ x, T* __restrict__ y, I size, I C, I L,
                          const T* __restrict__ vectors, I row) {
    const T* p = vectors + row * C;
    const T* mp = p + C;
    const T* scale = p + 2 * C;
    const T* shift = p + 3 * C;
    PBN_ELEMENT_LOOP(y[i] = (x[i] * p[c] - mp[c]) * scale[c] + shift[c];)
}

// Backward pass: per block sum(g) and sum(g * xhat), xhat = (x - mean) * invstd -> part[block].
template <typename T, typename I>
__global__ void pbn_grad_sums(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ mean,
                              const T* __restrict__ invstd, I count, I CL, I L, I blocks, I chunk, I step_n,
                              I step_l, double* __restrict__ part) {
    __shared__ double shared[PBN_THREADS];
    double grad_sum = 0.0, grad_xhat = 0.0;
    {
        const I channel_index = blockIdx.x / blocks;
        const double m = (double)mean[channel_index], s = (double)invstd[channel_index];
        PBN_CHANNEL_LOOP(
            const double g = (double)grad[off];
            grad_sum += g;
            grad_xhat += g * (((double)x[off] - m) * s);
        )
    }
    grad_sum = pbn_block_reduce(grad_sum, PbnAdd(), shared);
    grad_xhat = pbn_block_reduce(grad_xhat, PbnAdd(), shared);
    if (threadIdx.x == 0) {
        part[2 * (unsigned long long)blockIdx.x] = grad_sum;
        part[2 * (unsigned long long)blockIdx.x + 1] = grad_xhat;
    }
}

// One thread per channel. out rows: grad_weight, grad_bias, mean, k_bias, k_weight, scale with
// grad_input = (g - k_bias - (x - mean) * k_weight) * scale.
template <typename T, typename I>
__global__ void pbn_grad_vectors(I C, I blocks, double count, int training, const double* __restrict__ part,
                                 const T* mean, const T* invstd, const T* weight, int has_weight, T* out) {
    const I c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double grad_bias = 0.0, grad_weight = 0.0;
    for (I k = 0; k < blocks; ++k) {
        grad_bias += part[2 * (unsigned long long)(c * blocks + k)];
        grad_weight += part[2 * (unsigned long long)(c * blocks + k) + 1];
    }
    out[c] = (T)grad_weight;
    out[C + c] = (T)grad_bias;
    out[2 * C + c] = mean[c];
    out[3 * C + c] = training ? (T)(grad_bias / count) : (T)0;
    out[4 * C + c] = training ? (T)((double)invstd[c] * grad_weight / count) : (T)0;
    out[5 * C + c] = has_weight ? invstd[c] * weight[c] : invstd[c];
}

// grad_input; vectors rows from row: mean, k_bias, k_weight, scale.
template <typename T, typename I>
__global__ void pbn_grad_apply(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_input,
                               I size, I C, I L, int training, const T* __restrict__ vectors, I row) {
    const T* mean = vectors + row * C;
    const T* k_bias = mean + C;
    const T* k_weight = mean + 2 * C;
    const T* scale = mean + 3 * C;
    PBN_ELEMENT_LOOP(
        grad_input[i] = training ? (grad[i] - k_bias[c] - (x[i] - mean[c]) * k_weight[c]) * scale[c]
                                 : grad[i] * scale[c];
    )
}
"""

_KERNELS = (
    "stats1",
    "stats2",
    "train_apply",
    "train_vectors",
    "eval",
    "eval_vectors",
    "apply",
    "grad_sums",
    "grad_vectors",
    "grad_apply",
)
_WIDE_FROM = 2**31  # inputs of this many elements or more index with long long (tests lower it)
_FUSED_UP_TO = 1024  # channels for the one-launch output kernels: PBN_VECTOR_CAP at most (tests lower it)
_FUSED_TRAIN_GRID = 1
"""Training fuses the vector kernel into the output kernel only while the output grid has at
most this many blocks per multiprocessor: every block repeats the vector work (C channels'
partial sums and float64 divisions), which on a full grid cost more GPU time than the launch
it saves (H200, the benchmark's large shapes: 6 of 8 training rows slower, by 6 % on average;
float64 (2,4,3,3): 9 us faster). Eval's vector work is a square root and a division per
channel; its one-launch kernel lowered the ratio to cuDNN on every shape (8 of 10 rows faster
per call, the other two within 1.3 us). (Tests raise it to 16.)"""


@functools.cache
def _kernels(dtype: np.dtype, wide: bool, device_id: int) -> dict[str, Any]:
    """The kernels for ``dtype`` and an index type (``long long`` if ``wide``, else
    ``unsigned int``), compiled on first use (CuPy caches the binary on disk). Kept per
    GPU: ``get_function`` loads the module on the current device, which is x's device
    when CuPy can run on x at all."""
    index = "long long" if wide else "unsigned int"
    names = {name: f"pbn_{name}<{_DTYPES[dtype]}, {index}>" for name in _KERNELS}
    module = cp.RawModule(
        code=_SOURCE, options=("--std=c++14", "--fmad=false", "--ftz=false"), name_expressions=list(names.values())
    )
    return {name: module.get_function(expression) for name, expression in names.items()}


@functools.cache
def _multiprocessors(device_id: int) -> int:
    return int(cp.cuda.Device(device_id).attributes["MultiProcessorCount"])


class _Plan(NamedTuple):
    """Launch geometry and kernel scalars for one shape, channel axis and GPU, computed
    once (a kernel launch costs about 1 us per argument it converts)."""

    wide: bool  # 64-bit indices
    channels: Any  # C, as the index type
    inner: Any  # L: elements after the channel axis
    size: Any
    blocks: Any  # reduction blocks per channel
    reductions: Any  # blocks times C
    loop: tuple[Any, ...]  # count, C * L, L, blocks, chunk, step_n, step_l (PBN_CHANNEL_LOOP)
    per_channel: np.float64  # n
    bessel: np.float64  # n / (n - 1)
    reduce_grid: tuple[int]
    apply_grid: tuple[int]
    vector_grid: tuple[int]
    workspace: int  # float64 values: 5 per reduction block, 2 per channel
    multiprocessors: int


@functools.lru_cache(maxsize=256)
def _plan(shape: tuple[int, ...], channel_axis: int, multiprocessors: int) -> _Plan:
    """About four reduction blocks per multiprocessor in all (at least 8 elements per
    thread), one elementwise grid of at most 16 blocks per multiprocessor."""
    channels = shape[channel_axis]
    inner = math.prod(shape[channel_axis + 1 :])
    count = math.prod(shape[:channel_axis]) * inner
    size = count * channels
    blocks = max(1, min(-(-4 * multiprocessors // channels), -(-count // (8 * _THREADS))))
    chunk = -(-count // blocks)
    blocks = -(-count // chunk)
    step_n, step_l = divmod(_THREADS, inner)
    # The loops' indices stay below size + one grid's stride: within the type.
    wide = size + _THREADS * 16 * multiprocessors >= _WIDE_FROM
    index = np.int64 if wide else np.uint32
    return _Plan(
        wide=wide,
        channels=index(channels),
        inner=index(inner),
        size=index(size),
        blocks=index(blocks),
        reductions=index(channels * blocks),
        loop=tuple(index(value) for value in (count, channels * inner, inner, blocks, chunk, step_n, step_l)),
        per_channel=np.float64(count),
        bessel=np.float64(count / (count - 1) if count > 1 else math.inf),
        reduce_grid=(channels * blocks,),
        apply_grid=(max(1, min(-(-size // _THREADS), 16 * multiprocessors)),),
        vector_grid=(-(-channels // 128),),
        workspace=5 * channels * blocks + 2 * channels,
        multiprocessors=multiprocessors,
    )


def eligible(x: Any) -> bool:
    """A non-empty float32 or float64 CuPy array (the other arrays were validated to be
    CuPy arrays of x's dtype on x's device by the public entry)."""
    return isinstance(x, cp.ndarray) and x.dtype in _DTYPES and x.size > 0


def _setup(x: Any, recipe: Recipe) -> tuple[Any, _Plan, dict[str, Any]]:
    """x in C order, the plan and the kernels."""
    x = cp.ascontiguousarray(x)  # no copy for a C-ordered array
    plan = _plan(tuple(x.shape), recipe.channel_axis, _multiprocessors(x.device.id))
    return x, plan, _kernels(x.dtype, plan.wide, x.device.id)


def _dense(vector: Any) -> Any:
    """A per-channel vector (or None) the kernels can index as ``v[c]``: a strided or
    broadcast view is copied (no copy for a contiguous one)."""
    return None if vector is None else cp.ascontiguousarray(vector)


_BLOCK = (_THREADS,)
_VECTOR_BLOCK = (128,)
_YES, _NO = np.int32(1), np.int32(0)
_ROW = {wide: [(np.int64 if wide else np.uint32)(row) for row in range(8)] for wide in (False, True)}


def _affine(weight: Any, bias: Any, stand_in: Any) -> tuple[Any, Any, np.int32, np.int32]:
    """The kernels' ``weight, bias, has_weight, has_bias`` arguments: a None vector becomes
    ``stand_in`` (any array of the dtype; the kernel does not read it) and a 0 flag."""
    return (
        stand_in if weight is None else weight,
        stand_in if bias is None else bias,
        _NO if weight is None else _YES,
        _NO if bias is None else _YES,
    )


def _dtype_scalars(sum_scale: float, cap: int) -> tuple[np.float64, np.float64, np.int32, np.float64]:
    """The kernels' per-dtype scalars: pass 1 sums ``x * sum_scale``, then ``1 / sum_scale``,
    :func:`._agnostic.power_of_two_scale`'s cap and ``2**-cap``, the smallest normal number."""
    return np.float64(sum_scale), np.float64(1.0 / sum_scale), np.int32(cap), np.float64(2.0**-cap)


_DTYPE_SCALARS = {
    np.dtype(np.float32): _dtype_scalars(1.0, 126),
    np.dtype(np.float64): _dtype_scalars(2.0**-64, 1022),  # a sum of x * 2**-64 cannot overflow
}


def train_forward(
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
) -> tuple[Any, Any, Any, Any, Any]:
    """Output, new running mean and variance (or the given None), batch mean and invstd."""
    x, plan, kernels = _setup(x, recipe)
    running_mean, running_var, weight, bias = map(_dense, (running_mean, running_var, weight, bias))
    factor_is_array = not isinstance(factor, float)  # a module's 0-d cumulative-average factor
    sum_scale, unscale, cap, smallest_normal = _DTYPE_SCALARS[x.dtype]
    work = cp.empty(plan.workspace, dtype=cp.float64)
    kernels["stats1"](plan.reduce_grid, _BLOCK, (x, *plan.loop, sum_scale, work))
    kernels["stats2"](plan.reduce_grid, _BLOCK, (x, *plan.loop, unscale, cap, work, plan.reductions))
    fused = plan.channels <= _FUSED_UP_TO and plan.apply_grid[0] <= _FUSED_TRAIN_GRID * plan.multiprocessors
    vectors = cp.empty((4 if fused else 8, int(plan.channels)), dtype=x.dtype)
    statistics = (
        plan.channels,
        plan.blocks,
        plan.per_channel,
        np.float64(eps),
        smallest_normal,
        plan.bessel,
        work,
        plan.reductions,
        *_affine(weight, bias, vectors),
        vectors if running_mean is None else running_mean,
        vectors if running_var is None else running_var,
        _NO if running_mean is None else _YES,
        np.float64(0.0 if factor_is_array else factor),
        factor if factor_is_array else vectors,
        _YES if factor_is_array else _NO,
        _YES if skip_nonfinite else _NO,
        vectors,
    )
    output = cp.empty_like(x)
    if fused:  # one launch fewer: every block computes the channels' vectors in shared memory
        kernels["train_apply"](
            plan.apply_grid, _BLOCK, (x, output, plan.size, plan.channels, plan.inner, *statistics[1:])
        )
    else:
        kernels["train_vectors"](plan.vector_grid, _VECTOR_BLOCK, statistics)
        kernels["apply"](
            plan.apply_grid, _BLOCK, (x, output, plan.size, plan.channels, plan.inner, vectors, _ROW[plan.wide][4])
        )
    if running_mean is not None:
        running_mean, running_var = vectors[2], vectors[3]
    return output, running_mean, running_var, vectors[0], vectors[1]


def eval_forward(
    x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, recipe: Recipe, *, eps: float
) -> tuple[Any, Any, Any, Any, Any]:
    """Output, the running statistics (unchanged), mean (the running mean) and invstd."""
    x, plan, kernels = _setup(x, recipe)
    mean, var, weight, bias = map(_dense, (running_mean, running_var, weight, bias))
    output = cp.empty_like(x)
    if plan.channels <= _FUSED_UP_TO:  # one launch: every block computes the channels' vectors
        invstd = cp.empty(int(plan.channels), dtype=x.dtype)
        kernels["eval"](
            plan.apply_grid,
            _BLOCK,
            (
                x,
                output,
                plan.size,
                plan.channels,
                plan.inner,
                np.float64(eps),
                mean,
                var,
                *_affine(weight, bias, invstd),
                invstd,
            ),
        )
        return output, running_mean, running_var, running_mean, invstd
    vectors = cp.empty((5, int(plan.channels)), dtype=x.dtype)
    kernels["eval_vectors"](
        plan.vector_grid,
        _VECTOR_BLOCK,
        (
            plan.channels,
            np.float64(eps),
            mean,
            var,
            *_affine(weight, bias, vectors),
            vectors,
        ),
    )
    kernels["apply"](
        plan.apply_grid, _BLOCK, (x, output, plan.size, plan.channels, plan.inner, vectors, _ROW[plan.wide][1])
    )
    return output, running_mean, running_var, running_mean, vectors[0]


def backward(
    grad_output: Any, x: Any, weight: Any, mean: Any, invstd: Any, recipe: Recipe, *, training: bool
) -> tuple[Any, Any, Any]:
    """grad_input, grad_weight and grad_bias (sums accumulated in float64)."""
    x, plan, kernels = _setup(x, recipe)
    grad_output = cp.ascontiguousarray(grad_output)
    weight, mean, invstd = map(_dense, (weight, mean, invstd))
    work = cp.empty(2 * int(plan.reductions), dtype=cp.float64)
    kernels["grad_sums"](plan.reduce_grid, _BLOCK, (grad_output, x, mean, invstd, *plan.loop, work))
    vectors = cp.empty((6, int(plan.channels)), dtype=x.dtype)
    training_flag = _YES if training else _NO
    kernels["grad_vectors"](
        plan.vector_grid,
        _VECTOR_BLOCK,
        (
            plan.channels,
            plan.blocks,
            plan.per_channel,
            training_flag,
            work,
            mean,
            invstd,
            vectors if weight is None else weight,
            _NO if weight is None else _YES,
            vectors,
        ),
    )
    grad_input = cp.empty_like(x)
    kernels["grad_apply"](
        plan.apply_grid,
        _BLOCK,
        (grad_output, x, grad_input, plan.size, plan.channels, plan.inner, training_flag, vectors, _ROW[plan.wide][2]),
    )
    return grad_input, vectors[0], vectors[1]
