"""PyTorch: the fused scale-and-shift as one ``addcmul``, and PyTorch's own batch-norm kernels.

Why: PyTorch runs the pure primitives as a dozen separate kernels, each a full pass over the
input; its native kernels (``native_batch_norm``, cuDNN's through ``torch.batch_norm``,
``native_batch_norm_backward``) need two or three. They serve behind the same functions
(:class:`TorchKernels`), for float32/float64 tensors of one dtype and device, channel axis 1,
and return only what they compute: the output, the batch mean and ``invstd``. The running
update and every rule, including when a kernel's result is kept, are the shared code's
(:func:`portable_bn._agnostic.native_train_forward` and its neighbours): the CPU kernels
compute ``x * alpha + beta``, which is kept only for data close enough to their mean.

On the CPU values are on the host: the shared algorithm may choose its route by them. On
CUDA it takes the route that needs no choice; the training kernel's verdict costs one copy
of the statistics to the host (a synchronisation), and is not taken while a CUDA graph is
being captured, where the shared algorithm runs instead. The CUDA backward is used without
a verdict (nothing is read on the host). Autograd works as with ``F.batch_norm`` (the
kernels' own derivatives); the batch ``mean`` and ``invstd``, which the kernel returns
without a graph, get theirs from :class:`_BatchStatistics`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .._primitives import Primitives
from .._recipe import Recipe

MIN_EVAL_ELEMENTS = 1 << 16
"""CPU: below this size the shared eval (two small passes) is faster than the verdict on the
running statistics plus the kernel call; training always gains."""

SHORTCUTS_FROM = 1 << 17
"""Bytes of input from which the value-dependent elementwise shortcuts are tried (CPU)."""

_DTYPES = (torch.float32, torch.float64)
_HOST_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64), torch.bool: np.dtype(bool)}
_INVERSE_LARGEST = {dtype: 1.0 / float(torch.finfo(dtype).max) for dtype in _DTYPES}

_IMPL_INDEX = getattr(torch, "_batch_norm_impl_index", None)
"""What ``F.batch_norm`` calls: it picks cuDNN or the native kernel by PyTorch's own rules and
returns the batch ``mean`` and ``invstd`` (cuDNN's saved inverse standard deviation). On CUDA,
cuDNN's training forward took 30-130 us where ``native_batch_norm`` took 90-200 (H100, the
benchmark's shapes). Private, hence looked up with a fallback to ``native_batch_norm``."""


TRITON_SWITCH = "PORTABLE_BN_TRITON"
"""Environment variable, read at every call: ``0`` (or ``off``, ``false``, ``no``) keeps the
Triton kernels out; ``interpret`` also gives them CPU tensors, run by Triton's interpreter
(with ``TRITON_INTERPRET=1`` set before Triton is imported): how the suite tests them on
machines without a GPU."""

_OFF = ("0", "off", "false", "no")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_serves(x: Any) -> bool:
    """Whether the Triton kernels (:mod:`.triton_kernels`) take ``x``: a contiguous
    float32/float64 CUDA tensor (or CPU tensor, in interpreter mode) with values, through which
    autograd records nothing (their results carry no derivatives; autograd's calls keep
    PyTorch's kernels)."""
    switch = os.environ.get(TRITON_SWITCH, "").strip().lower()
    if switch in _OFF or not _triton_installed():
        return False
    if not (x.is_cuda or (x.is_cpu and switch == "interpret")):
        return False
    if x.dtype not in _DTYPES or x.layout != torch.strided or not x.is_contiguous() or x.numel() == 0:
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


@functools.cache
def _triton_kernels() -> ModuleType:
    from . import triton_kernels

    return triton_kernels


def _rows(x: Any, recipe: Recipe) -> Any:
    """The ``(A, C, B)`` view of a contiguous tensor."""
    return x.reshape(recipe.outer, recipe.num_channels, recipe.inner)


def _full(x: Any, vector: Any, default: float) -> Any:
    """A per-channel vector in ``x``'s dtype and device, a vector of ``default`` for None."""
    if vector is None:
        return torch.full((x.shape[1],), default, dtype=x.dtype, device=x.device)
    return vector.to(dtype=x.dtype, device=x.device)


class _BatchStatistics(torch.autograd.Function):
    """The kernel's ``mean`` and ``invstd``, made differentiable in ``x``: ``d mean/dx = 1/n``,
    ``d invstd/dx = -invstd**3 (x - mean)/n``. Under ``create_graph`` the backward recomputes
    both from ``x`` with differentiable operations, so higher derivatives are right too."""

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


def _fits(x: Any, *arrays: Any, differentiable: tuple[Any, ...] = ()) -> bool:
    """float32/float64 strided tensors of one dtype on the CPU or one CUDA device. None is fine;
    ``x`` and ``arrays`` must not need a graph recorded unless listed in ``differentiable`` (the
    forward's x, weight and bias, whose gradients the kernels provide)."""
    if not isinstance(x, torch.Tensor):
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


class TorchKernels:
    """PyTorch's batch-norm kernels behind the shared functions (see the module docstring)."""

    def serves_forward(
        self, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, recipe: Recipe, *, training: bool
    ) -> bool:
        if recipe.channel_axis != 1 or not _fits(x, running_mean, running_var, differentiable=(x, weight, bias)):
            return False
        if training and triton_serves(x):  # the block-moments kernel: no verdict, no host read
            return False
        if x.is_cpu:
            return training or x.numel() >= MIN_EVAL_ELEMENTS
        return not (training and torch.cuda.is_current_stream_capturing())  # the verdict reads on the host

    def train(self, x: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Any, Any]:
        if x.is_cpu or _IMPL_INDEX is None:
            output, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        else:  # CUDA: the kernel F.batch_norm would choose (cuDNN where it applies), with its statistics
            output, mean, invstd, _, _ = _IMPL_INDEX(
                x, weight, bias, None, None, True, 0.0, eps, torch.backends.cudnn.enabled
            )
        return output, mean, invstd

    def eval(self, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: float) -> Any:
        """What ``F.batch_norm(..., training=False)`` runs, without its Python checks (ours are
        done): ``torch.batch_norm``, which picks cuDNN or the native kernel."""
        return torch.batch_norm(
            x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled
        )

    def short_form(self, x: Any) -> bool:
        """The CPU kernels compute ``x * alpha + beta``; the CUDA ones (native and cuDNN)
        ``(x - mean) * invstd * weight + bias`` (measured as exact as ours on every data set of
        ``python -m portable_bn accuracy``, offsets included)."""
        return bool(x.is_cpu)

    def differentiable_statistics(self, x: Any, mean: Any, invstd: Any, eps: float) -> tuple[Any, Any]:
        if torch.is_grad_enabled() and x.requires_grad:
            return _BatchStatistics.apply(x, mean, invstd, eps)
        return mean, invstd

    def serves_backward(
        self, grad: Any, x: Any, weight: Any, mean: Any, invstd: Any, recipe: Recipe, *, training: bool
    ) -> bool:
        return training and recipe.channel_axis == 1 and _fits(x, grad, weight, mean, invstd)

    def backward(self, grad: Any, x: Any, weight: Any, mean: Any, invstd: Any) -> tuple[Any, Any, Any] | None:
        """The training backward by PyTorch's kernel (the CUDA kernel needs a weight: ones stand
        in for None). On the CPU, None where the kernel's range was exceeded: it rounds
        ``sum(g * (x - mean)) = grad_weight / invstd`` to the dtype, which overflows for data of
        |x| beyond about 1e37 in float32 (checked on the host: C values); a NaN or Inf parameter
        gradient is handed over too (the shared code then gives its own)."""
        if weight is None and not x.is_cpu:
            weight = torch.ones_like(mean)
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        if x.is_cpu:  # |sum(g * (x - mean))| = |grad_weight| / invstd < largest, on the host
            dot_share = np.abs(grad_weight.detach().numpy()) * _INVERSE_LARGEST[x.dtype]
            if not ((dot_share < invstd.detach().numpy()).all() and np.isfinite(grad_bias.detach().numpy()).all()):
                return None
        return grad_input, grad_weight, grad_bias


class TorchPrimitives(Primitives):
    """The pure primitives with ``addcmul`` for the scale-and-shift, and PyTorch's kernels."""

    name = "PyTorch"
    native = TorchKernels()

    def __init__(self, xp: ModuleType, *, on_cpu: bool) -> None:
        super().__init__(xp)
        self.eager = self.branches = on_cpu
        self._host: ModuleType | None = None

    def per_channel(self, fn: Callable[..., Any], *vectors: Any, **options: Any) -> Any:
        """On the CPU, without a graph to record: ``fn`` run by NumPy on views of the vectors.
        A per-channel operation costs 3 to 10 us in torch and about 1 in NumPy, and tiny torch
        operations next to the kernels slowed the following kernel call by up to 2 x in the
        benchmark; NumPy's did not. (The same IEEE operations: the same results.)"""
        host = self._host_arguments(vectors, options) if self.eager else None
        if host is None:
            return super().per_channel(fn, *vectors, **options)
        if self._host is None:
            from .._compat import array_namespace
            from . import numpy as numpy_backend

            self._host = numpy_backend._lean(array_namespace(np.empty(0)))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # torch's arithmetic does not warn
            return _from_host(fn(self._host, *host[0], **host[1]))

    @staticmethod
    def _host_arguments(vectors: tuple[Any, ...], options: dict[str, Any]) -> Any:
        recording = torch.is_grad_enabled()
        arrays = []
        for vector in vectors:
            if isinstance(vector, torch.Tensor):
                if vector.dtype not in _HOST_DTYPES or (recording and vector.requires_grad):
                    return None
                arrays.append(vector.numpy())
            else:
                arrays.append(vector)
        converted = {}
        for name, value in options.items():
            if isinstance(value, torch.dtype):
                if value not in _HOST_DTYPES:
                    return None
                value = _HOST_DTYPES[value]
            converted[name] = value
        return arrays, converted

    @property
    def accelerator(self) -> str | None:  # type: ignore[override]
        return "triton" if _triton_installed() else None

    def one_read(self, x: Any) -> bool:
        return triton_serves(x)

    def shortcuts(self, x: Any) -> bool:
        """On the CPU, for inputs of more than 128 KiB (below, the checks cost more than the
        pass); never where the Triton kernels serve (the exact forms cost the same there)."""
        return self.eager and x.numel() * x.element_size() > SHORTCUTS_FROM and not triton_serves(x)

    def block_moments(self, x: Any, recipe: Recipe) -> tuple[Any, Any, Any, Any]:
        if not triton_serves(x):
            return super().block_moments(x, recipe)
        return _triton_kernels().block_moments(_rows(x, recipe))

    def product_sums(self, grad: Any, x: Any, recipe: Recipe, shift: Any, scale: Any) -> tuple[Any, Any]:
        if not (triton_serves(x) and triton_serves(grad) and grad.dtype == x.dtype):
            return super().product_sums(grad, x, recipe, shift, scale)
        return _triton_kernels().product_sums(
            _rows(grad, recipe), _rows(x, recipe), _full(x, shift, 0.0), _full(x, scale, 1.0)
        )

    def grad_input(self, grad: Any, x: Any, recipe: Recipe, k: Any, shift: Any, f: Any, c: Any) -> Any:
        if not (triton_serves(x) and triton_serves(grad) and grad.dtype == x.dtype):
            return super().grad_input(grad, x, recipe, k, shift, f, c)
        vectors = (_full(x, k, 1.0), _full(x, shift, 0.0), _full(x, f, 0.0), _full(x, c, 0.0))
        return _triton_kernels().grad_input(_rows(grad, recipe), _rows(x, recipe), *vectors).reshape(x.shape)

    def affine(self, x: Any, recipe: Recipe, scale: Any, shift: Any, mult: Any, add: Any) -> Any:
        """One ``addcmul`` kernel for the multiply and add (the rounding of PyTorch's own
        kernels), or the Triton kernel where it serves."""
        if triton_serves(x):
            vectors = (_full(x, scale, 1.0), _full(x, shift, 0.0), _full(x, mult, 1.0), _full(x, add, 0.0))
            return _triton_kernels().affine(_rows(x, recipe), *vectors).reshape(x.shape)
        if add is None:
            return super().affine(x, recipe, scale, shift, mult, add)
        values = self._centred(x, recipe, scale, shift)
        return torch.addcmul(self._channel(add, recipe, x), values, self._channel(mult, recipe, x))


def _from_host(result: Any) -> Any:
    """The arrays of a per-channel result (a NamedTuple, tuple or array) as CPU tensors."""
    if result is None or isinstance(result, bool | np.bool_):
        return None if result is None else bool(result)
    if isinstance(result, tuple):
        parts = [_from_host(part) for part in result]
        return type(result)(*parts) if hasattr(result, "_fields") else tuple(parts)
    return torch.from_numpy(np.asarray(result))


_PRIMITIVES: dict[tuple[int, str], Primitives] = {}


def primitives_for(xp: ModuleType, x: Any) -> Primitives:
    """PyTorch's primitive set for the device of ``x``: the CPU and CUDA sets, else (``meta``,
    other devices) the pure primitives."""
    kind = "cpu" if x.is_cpu else "cuda" if x.is_cuda else "other"  # cheaper than building x.device
    key = (id(xp), kind)
    found = _PRIMITIVES.get(key)
    if found is None:
        found = Primitives(xp) if kind == "other" else TorchPrimitives(xp, on_cpu=kind == "cpu")
        _PRIMITIVES[key] = found
    return found
