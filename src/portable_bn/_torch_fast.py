"""PyTorch fast path (CPU and CUDA): PyTorch's own batch-norm kernels, where they are as exact as ours.

Why it exists: PyTorch runs the agnostic code as a dozen separate kernels, each
a full pass over the input; its native kernels (``torch.native_batch_norm``,
``torch.nn.functional.batch_norm``, ``native_batch_norm_backward``) need two
or three. The issue's target is <= 1.10 x native, which only native kernels
reach.

Why it is conditional: the native kernels compute the output as
``x * alpha + beta`` with ``beta = bias - mean * alpha`` and the mean rounded
to the input dtype, which loses about ``eps * |mean| / std`` (docs/accuracy:
PyTorch float32 is off by 1e-3 at an offset of 1e4 standard deviations and
fails completely at 1e20). Their statistics are otherwise as accurate as ours
(the mean and the two-pass variance to about one rounding). So the native
result is kept only when every channel has ``|mean| <= MAX_MEAN_OVER_STD *
std`` (or a mean of exactly 0): the extra error is then at most a few
roundings (measured: about 1.5 roundings at 8 standard deviations, 5 at 50), inside
the conformance tolerance of 65. Training judges the batch
statistics the kernel returns (NaN, Inf, an overflowed variance and
numerically constant channels all fail the test), eval judges the running
statistics before the call. Where the test fails the functions return None
and the caller takes the agnostic path; the wasted native call costs one
extra pass, on data that need care anyway.

On the CPU and on CUDA devices, for float32/float64 tensors whose parameters
share their dtype and device, channel axis 1. On CUDA the training verdict
costs one device-to-host copy of the statistics, which waits for the kernel (a
synchronization; the verdict measured about 40 us on an H100, against the
agnostic path's 600 us of kernel launches); it is not taken while a CUDA graph
is being captured, where the agnostic path (which never synchronizes) runs
instead. CUDA eval needs no verdict: the CUDA kernels (native
and cuDNN) compute ``(x - mean) * invstd * weight + bias`` and were measured as
exact as ours on every data set of docs/accuracy, offsets included (GPU matrix,
docs/testing).
Autograd works as with ``F.batch_norm`` (the kernels' own derivatives, double
backward included); the batch ``mean`` and ``invstd``, which the kernel
returns without a graph, get their derivatives from ``_BatchStatistics``. ``tests/test_torch_fast.py``
runs each case with and without this path (``FAST_PATHS``) against the same
float64 reference, checks which path ran, and the hand-over on hard data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

MAX_MEAN_OVER_STD = 8.0
"""Largest ``|mean| / std`` per channel for which the native result is kept."""

MIN_EVAL_ELEMENTS = 1 << 16
"""CPU: below this size the agnostic eval (two small passes) is faster than the
verdict on the running statistics plus the kernel call; training always gains."""

_DTYPES = (torch.float32, torch.float64)

_IMPL_INDEX = getattr(torch, "_batch_norm_impl_index", None)
"""What ``F.batch_norm`` calls: it picks cuDNN or the native kernel by PyTorch's own
rules and returns the batch ``mean`` and ``invstd`` (cuDNN's saved inverse standard
deviation). On CUDA, cuDNN's training forward took 30-130 us where
``native_batch_norm`` took 90-200 (H100, the benchmark's shapes). Private, hence
looked up with a fallback to ``native_batch_norm``."""


def eligible(x: Any, *arrays: Any, channel_axis: int, differentiable: tuple[Any, ...] = ()) -> bool:
    """float32/float64 tensors of one dtype on the CPU or one CUDA device, channel axis 1. ``x`` and ``arrays``
    must not need a graph recorded (None is fine) unless listed in ``differentiable``:
    the forward's x, weight and bias, whose gradients the native kernels provide."""
    if channel_axis != 1 or not isinstance(x, torch.Tensor):
        return False
    dtype = x.dtype
    on_cpu = x.is_cpu
    if dtype not in _DTYPES or not (on_cpu or x.is_cuda) or x.layout != torch.strided:
        return False
    place = None if on_cpu else x.device  # building a device object costs; the CPU test is is_cpu
    recording = torch.is_grad_enabled()
    for array in (x, *arrays, *differentiable):
        if array is None:
            continue
        if array is not x and (
            not isinstance(array, torch.Tensor)
            or array.dtype != dtype
            or (not array.is_cpu if on_cpu else array.device != place)
        ):
            return False
        if recording and array.requires_grad and not any(array is allowed for allowed in differentiable):
            return False
    return True


class _BatchStatistics(torch.autograd.Function):
    """The kernel's ``mean`` and ``invstd``, made differentiable in ``x`` (the kernel
    returns them without a graph; our agnostic path's are differentiable, and so
    must these be): ``d mean/dx = 1/n``, ``d invstd/dx = -invstd**3 (x - mean)/n``.
    Under ``create_graph`` the backward recomputes both from ``x`` with
    differentiable operations, so higher derivatives are right too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float) -> Any:
        ctx.save_for_backward(x, mean, invstd)
        ctx.eps = eps
        return mean.clone(), invstd.clone()

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor | None, grad_invstd: torch.Tensor | None) -> Any:
        x, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // max(x.shape[1], 1)
        if torch.is_grad_enabled():  # create_graph: statistics as functions of x
            mean = x.mean(dims)
            invstd = torch.rsqrt(x.var(dims, correction=0) + ctx.eps)
        grad_x = torch.zeros_like(x)
        if grad_mean is not None:
            grad_x = grad_x + (grad_mean / count).reshape(shape)
        if grad_invstd is not None:
            factor = (-(invstd**3) * grad_invstd / count).reshape(shape)
            grad_x = grad_x + (x - mean.reshape(shape)) * factor
        return grad_x, None, None, None


def _view(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (``detach`` only where needed: it costs a tensor)."""
    return tensor.detach().numpy() if tensor.requires_grad else tensor.numpy()


_VAR_SHARE_LIMIT = {dtype: 1.0 - 8 * float(torch.finfo(dtype).eps) for dtype in _DTYPES}
"""Per dtype, the bound on ``var / (var + eps)`` in :func:`_benign_batch`: 1 less a
margin for the rounding of ``invstd``."""


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of a small CPU tensor: the verdicts below are a few
    tiny operations, which cost about 1 us each in NumPy and 3-10 us in torch."""
    return _view(tensor).astype(np.float64)


def _benign_batch(mean: torch.Tensor, invstd: torch.Tensor, eps: float) -> bool:
    """Every channel finite with ``mean**2 <= T**2 * var`` (a mean of exactly 0 passes).

    Only ``invstd = 1/sqrt(var + eps)`` is returned by the kernel, so the test is
    ``(mean * invstd)**2 <= T**2 * var / (var + eps) = T**2 * (1 - eps * invstd**2)``,
    evaluated in float64 with a margin for the rounding of ``invstd`` (the share
    is clipped at 0, where only a zero mean passes). NaN fails every comparison;
    an overflowed variance shows as ``invstd == 0``.
    """
    if mean.is_cpu:
        mean64, invstd64 = _host(mean), _host(invstd)
    else:  # CUDA: one copy to the host, which waits for the kernel (the one sync of this path)
        both = torch.stack((mean, invstd)).cpu().numpy().astype(np.float64)
        mean64, invstd64 = both[0], both[1]
    with np.errstate(all="ignore"):
        inv2 = invstd64 * invstd64
        var_share = np.maximum(_VAR_SHARE_LIMIT[mean.dtype] - eps * inv2, 0.0)
        slack = MAX_MEAN_OVER_STD**2 * var_share - mean64 * mean64 * inv2
        smallest_slack, smallest_invstd = float(slack.min()), float(invstd64.min())
    return 0.0 <= smallest_slack < math.inf and smallest_invstd > 0.0


def _benign_running(running_mean: np.ndarray, running_var: np.ndarray, eps: float) -> bool:
    """Every channel finite with ``running_mean**2 <= T**2 * running_var`` (so the
    variance is >= 0), and ``eps > 0``. In the statistics' own dtype: an overflow
    there (|mean| beyond 1e19 in float32) only makes the test fail, which is safe.
    The caller silences NumPy's floating-point warnings."""
    smallest_slack = float(np.subtract(running_var * MAX_MEAN_OVER_STD**2, running_mean * running_mean).min())
    return 0.0 <= smallest_slack < math.inf and eps > 0.0


def _fresh_copies(running_mean: torch.Tensor, running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the running statistics for the kernel to update, without graphs.

    One ``stack`` into a (2, C) tensor whose rows are the copies: one kernel launch
    instead of two clones (on CUDA, H200, measured apart: 8-13 us against 19-26). Only where the
    second row starts on a 16-byte boundary, as a separately allocated vector would
    (vectorized kernels may assume it); elsewhere two clones.
    """
    running_mean, running_var = running_mean.detach(), running_var.detach()
    if (running_mean.shape[0] * running_mean.element_size()) % 16:
        return running_mean.clone(), running_var.clone()
    copies = torch.stack((running_mean, running_var)).unbind()
    return copies[0], copies[1]


def train_forward(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    factor: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
    """``(output, running_mean, running_var, mean, invstd)``, or None for the agnostic path.

    The kernel updates running statistics in place, so it gets fresh copies:
    the caller's arrays are never written to. On CUDA, None while a CUDA graph is
    being captured: the verdict reads values on the host, which capture forbids.
    """
    if not x.is_cpu and torch.cuda.is_current_stream_capturing():
        return None
    if running_mean is not None and running_var is not None:
        running_mean, running_var = _fresh_copies(running_mean, running_var)
    if x.is_cpu or _IMPL_INDEX is None:
        output, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
    else:  # CUDA: the kernel F.batch_norm would choose (cuDNN where it applies), with its statistics
        output, mean, invstd, _, _ = _IMPL_INDEX(
            x, weight, bias, running_mean, running_var, True, factor, eps, torch.backends.cudnn.enabled
        )
    if not _benign_batch(mean, invstd, eps):
        return None
    if torch.is_grad_enabled() and x.requires_grad:
        mean, invstd = _BatchStatistics.apply(x, mean, invstd, eps)
    return output, running_mean, running_var, mean, invstd


def _eval_kernel(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """What ``F.batch_norm(..., training=False)`` runs, without its Python checks (ours
    are done): ``torch.batch_norm``, which picks cuDNN or the native kernel."""
    return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled)


def eval_forward(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(output, invstd)`` (F.batch_norm with training=False writes nothing), or None."""
    if not x.is_cpu:
        # CUDA: no verdict (see the module docstring), nothing read on the host; invstd
        # with the operations of _agnostic.running_statistics, so the same roundings.
        output = _eval_kernel(x, running_mean, running_var, weight, bias, eps)
        # torch's ``1.0 / t`` is ``t.reciprocal() * 1.0``: in place, one launch and
        # three allocations fewer, the same values (H200: 19-20 us against 30-34).
        return output, torch.add(running_var.detach(), eps).sqrt_().reciprocal_()
    if x.numel() < MIN_EVAL_ELEMENTS:
        return None
    mean, var = _view(running_mean), _view(running_var)
    # invstd as _agnostic.running_statistics computes it (same dtype, same roundings), in
    # NumPy: tiny torch operations after the kernel slowed the next kernel call by up to 2x
    # in the benchmark (one thread), NumPy ones did not.
    with np.errstate(all="ignore"):
        if not _benign_running(mean, var, eps):
            return None
        invstd = 1.0 / np.sqrt(var + var.dtype.type(eps))
    output = _eval_kernel(x, running_mean, running_var, weight, bias, eps)
    return output, torch.from_numpy(invstd)


def train_backward(
    grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training backward by PyTorch's kernel: the same formula as
    :func:`._agnostic.backward` (sums of ``g`` and ``g * xhat`` in the input dtype),
    in two passes; no value condition is needed. (The CUDA kernel needs a weight:
    ones stand in for None.)"""
    if weight is None and not x.is_cpu:
        weight = torch.ones_like(mean)
    grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_output, x, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
    )
    return grad_input, grad_weight, grad_bias
