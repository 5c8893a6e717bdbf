"""The primitive operations a backend may supply, and their pure array-API versions.

:mod:`._agnostic` reaches full-size arrays only through a :class:`Primitives` object: a few
per-channel reductions, the fused scale-and-shift, the input gradient's fused form, and the
running of per-channel arithmetic. This class is the pure array-API version of each, which
every library runs unless a backend module (:mod:`._backends`) overrides it; the suite
checks every override against these. A primitive holds no batch-norm rule: it computes
exactly the sums or the elementwise form it names, to rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from ._compat import device
from ._recipe import Recipe


class Primitives:
    """Pure array-API primitives for the namespace ``xp``.

    Per-channel vectors are 1-D arrays of C values; ``None`` for a ``scale`` or ``shift`` means
    1 or 0 (the operation is left out). Reductions may accumulate in a wider dtype than the
    input's (the agnostic arithmetic then runs in it); elementwise results have the input's dtype.
    """

    name = "array API"
    eager = False
    """Values are readable on the host at no cost (NumPy, PyTorch on the CPU): the algorithm may
    use a plain ``if`` on them, also to pick a shorter elementwise form."""
    branches = False
    """The algorithm may choose between routes by values (:meth:`branch`): eager arrays, or a
    compiler's conditional (``jax.lax.cond``). Lazy arrays (Dask), GPU arrays (a host read is a
    synchronisation) and value-less devices take the route that needs no choice."""
    native: NativeKernels | None = None
    """A whole-op kernel of the library itself, with the same contract (PyTorch's), or None."""
    accelerator: str | None = None
    """The compiler of the backend's kernels (``"numba"``, ``"triton"``), or None."""

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} for {self.xp.__name__}>"

    def branch(self, unsafe: Any, careful: Callable[[], Any], quick: Callable[[], Any]) -> Any:
        """``careful()`` where the 0-d bool ``unsafe`` holds, else ``quick()`` (only where
        :attr:`branches`); both return arrays of the same structure."""
        return careful() if bool(unsafe) else quick()

    def shortcuts(self, x: Any) -> bool:
        """Whether value-dependent shortcuts that save elementwise work (an output computed without
        a subtraction, on eager arrays; the backward's sums of the inputs themselves, where the
        backend :attr:`branches`) are worth their per-channel checks on ``x``."""
        return False

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        """A context for the arithmetic of one call: NumPy leaves out its floating-point warnings,
        which the algorithm's own checks stand in for."""
        return contextlib.nullcontext()

    def one_read(self, x: Any) -> bool:
        """Whether :meth:`block_moments` is a compiled kernel for ``x`` that reads it once: the
        statistics then need no other route and no verdict."""
        return False

    def block_moments(self, x: Any, recipe: Recipe) -> tuple[Any, Any, Any, Any]:
        """Per channel, a ``shift`` close to the mean of ``x * scale`` (None: 0), the mean of
        ``x * scale - shift``, its M2, and the power of two ``scale`` (None: 1).

        Blocks are taken one at a time: here each ``(a, c)`` row of the ``(A, C, B)`` view (a
        kernel's blocks may differ). A block's largest magnitude gives an exact power-of-two
        scale (``2**-floor(log2(max|x|))`` above 1, stopping at the dtype's smallest normal
        exponent), its mean and M2 are taken in two passes (the mean, then the sums of the
        deviations from it and of their squares), and a constant block's exactly. Blocks merge
        at the channel's finest scale (Chan, Golub and LeVeque's formula, written for all rows
        at once) about the first block's mean: each block's mean about it is the difference of
        two close numbers, exact, plus its deviations' mean, so no digit is lost however far
        the data are from zero. Computed in the input's dtype."""
        xp = self.xp
        assert recipe.outer is not None  # known sizes
        assert recipe.inner is not None
        inner = recipe.inner
        rows = xp.reshape(x, (recipe.outer, recipe.num_channels, inner))
        low, high = xp.min(rows, axis=(2,)), xp.max(rows, axis=(2,))
        largest = xp.maximum(high, -low)
        largest = xp.where(largest > 1.0, largest, xp.ones_like(largest))  # also NaN -> 1
        most = -math.log2(float(xp.finfo(x.dtype).smallest_normal))
        scale = 2.0 ** -xp.minimum(xp.floor(xp.log2(largest)), xp.full_like(largest, most))
        values = rows * scale[:, :, None]
        row_mean = xp.mean(values, axis=(2,))
        deviations = values - row_mean[:, :, None]
        deviation_sum = xp.sum(deviations, axis=(2,))
        correction = deviation_sum / inner
        row_m2 = xp.sum(deviations * deviations, axis=(2,)) - deviation_sum * correction
        constant = low == high
        zeros = xp.zeros_like(row_m2)
        row_mean = xp.where(constant, high * scale, row_mean)
        correction, row_m2 = xp.where(constant, zeros, correction), xp.where(constant, zeros, row_m2)
        finest = xp.min(scale, axis=(0,))
        ratio = finest / scale
        row_mean, correction, row_m2 = row_mean * ratio, correction * ratio, row_m2 * (ratio * ratio)
        shift = row_mean[0, :]
        offsets = (row_mean - shift) + correction
        mean = xp.mean(offsets, axis=(0,))
        spread = offsets - mean
        m2 = xp.sum(row_m2, axis=(0,)) + inner * xp.sum(spread * spread, axis=(0,))
        return shift, mean, m2, finest

    def first_pass(self, x: Any, recipe: Recipe, shrink: float) -> tuple[Any, Any, Any]:
        """Per channel ``min(x)``, ``max(x)`` and ``sum(x * shrink)``."""
        xp, axes = self.xp, recipe.reduce_axes
        return xp.min(x, axis=axes), xp.max(x, axis=axes), xp.sum(x * shrink, axis=axes)

    def shifted_sums(self, x: Any, recipe: Recipe, scale: Any, shift: Any) -> tuple[Any, Any]:
        """Per channel ``sum(c)`` and ``sum(c * c)``, ``c = x * scale - shift``."""
        xp, axes = self.xp, recipe.reduce_axes
        values = self._centred(x, recipe, scale, shift)
        return xp.sum(values, axis=axes), xp.sum(values * values, axis=axes)

    def product_sums(self, grad: Any, x: Any, recipe: Recipe, shift: Any, scale: Any) -> tuple[Any, Any]:
        """Per channel ``sum(grad)`` and ``sum(grad * (x - shift) * scale)``."""
        xp, axes = self.xp, recipe.reduce_axes
        values = x if shift is None else x - self._channel(shift, recipe, x)
        if scale is not None:
            values = values * self._channel(scale, recipe, x)
        return xp.sum(grad, axis=axes), xp.sum(grad * values, axis=axes)

    def masked_first_pass(self, x: Any, recipe: Recipe, shrink: float, mask: Any) -> tuple[Any, Any, Any]:
        """:meth:`first_pass` over the elements where ``mask`` (broadcast against ``x``) holds:
        a channel with none gets ``min = +Inf``, ``max = -Inf`` and a sum of 0."""
        xp, axes = self.xp, recipe.reduce_axes
        inf = xp.full((), float("inf"), dtype=x.dtype, device=device(x))
        low = xp.min(xp.where(mask, x, inf), axis=axes)
        high = xp.max(xp.where(mask, x, -inf), axis=axes)
        return low, high, xp.sum(xp.where(mask, x * shrink, xp.zeros_like(x)), axis=axes)

    def masked_shifted_sums(self, x: Any, recipe: Recipe, scale: Any, shift: Any, mask: Any) -> tuple[Any, Any]:
        """:meth:`shifted_sums` over the elements where ``mask`` holds."""
        xp, axes = self.xp, recipe.reduce_axes
        values = self._centred(x, recipe, scale, shift)
        values = xp.where(mask, values, xp.zeros_like(values))
        return xp.sum(values, axis=axes), xp.sum(values * values, axis=axes)

    def masked_product_sums(
        self, grad: Any, x: Any, recipe: Recipe, shift: Any, scale: Any, mask: Any
    ) -> tuple[Any, Any]:
        """:meth:`product_sums` over the elements where ``mask`` holds."""
        xp, axes = self.xp, recipe.reduce_axes
        values = x if shift is None else x - self._channel(shift, recipe, x)
        if scale is not None:
            values = values * self._channel(scale, recipe, x)
        zeros = xp.zeros_like(grad)
        return xp.sum(xp.where(mask, grad, zeros), axis=axes), xp.sum(xp.where(mask, grad * values, zeros), axis=axes)

    def affine(self, x: Any, recipe: Recipe, scale: Any, shift: Any, mult: Any, add: Any) -> Any:
        """The fused scale-and-shift ``(x * scale - shift) * mult + add``."""
        values = self._centred(x, recipe, scale, shift) * self._channel(mult, recipe, x)
        return values if add is None else values + self._channel(add, recipe, x)

    def grad_input(self, grad: Any, x: Any, recipe: Recipe, k: Any, shift: Any, f: Any, c: Any) -> Any:
        """``grad * k + (x - shift) * f + c``."""
        values = x if shift is None else x - self._channel(shift, recipe, x)
        return grad * self._channel(k, recipe, x) + values * self._channel(f, recipe, x) + self._channel(c, recipe, x)

    def per_channel(self, fn: Callable[..., Any], *vectors: Any, **options: Any) -> Any:
        """``fn(xp, *vectors, **options)``: arithmetic on per-channel vectors (None allowed),
        ``options`` Python scalars, flags and dtypes. A backend may compile ``fn`` (CuPy)."""
        return fn(self.xp, *vectors, **options)

    def _centred(self, x: Any, recipe: Recipe, scale: Any, shift: Any) -> Any:
        values = x if scale is None else x * self._channel(scale, recipe, x)
        return values if shift is None else values - self._channel(shift, recipe, x)

    def _channel(self, vector: Any, recipe: Recipe, x: Any) -> Any:
        """A per-channel vector in ``x``'s dtype, shaped to broadcast against it."""
        xp = self.xp
        if vector.dtype != x.dtype:
            vector = xp.astype(vector, x.dtype)
        return xp.reshape(vector, recipe.param_shape)


class NativeKernels(Protocol):
    """A library's own whole-op kernels, used behind the same functions where they serve."""

    def serves_forward(
        self, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, recipe: Recipe, *, training: bool
    ) -> bool:
        """Whether the kernels take these arguments (dtypes, devices, layout, autograd)."""
        ...

    def train(self, x: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Any, Any]:
        """Output, batch mean and invstd; no running statistics."""
        ...

    def eval(self, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, eps: float) -> Any:
        """The eval output."""
        ...

    def short_form(self, x: Any) -> bool:
        """Whether the kernel computes the output as ``x * alpha + beta``."""
        ...

    def differentiable_statistics(self, x: Any, mean: Any, invstd: Any, eps: float) -> tuple[Any, Any]:
        """The kernel's mean and invstd with derivatives in ``x`` where autograd records."""
        ...

    def serves_backward(
        self, grad: Any, x: Any, weight: Any, mean: Any, invstd: Any, recipe: Recipe, *, training: bool
    ) -> bool:
        """Whether the backward kernel takes these arguments."""
        ...

    def backward(self, grad: Any, x: Any, weight: Any, mean: Any, invstd: Any) -> tuple[Any, Any, Any] | None:
        """The training backward (grad_input, grad_weight, grad_bias), or None where the kernel's
        own limits were exceeded."""
        ...
