"""The NumPy float64 reference of PyTorch's batch-norm rules.

Written independently of the implementation (channel moved first, plain loops over steps,
sums rounded once with :func:`math.fsum`, no recipe, no namespace) so the two can check each
other. The test suite checks this reference itself against ``torch.nn.BatchNorm*d`` in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _channels_first(x: np.ndarray, axis: int) -> np.ndarray:
    """(C, n) float64 view of the input, channel axis first."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    return moved.reshape(moved.shape[0], -1)


def _to_input_layout(flat: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved_shape = (shape[axis], *(s for i, s in enumerate(shape) if i != axis % len(shape)))
    return np.moveaxis(flat.reshape(moved_shape), 0, axis)


def _exact_statistics(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, biased variance and ``x - mean`` to float64's last bit.

    ``math.fsum`` rounds each sum exactly once. The mean of a channel is
    rarely a float64 itself; the deviations ``x - mean`` are formed against
    the rounded mean, then corrected by their own (exactly summed) mean, so
    they hold the true deviations even where |mean| >> spread.
    """
    n = flat.shape[1]
    mean = np.empty(flat.shape[0])
    var = np.empty(flat.shape[0])
    centered = np.empty_like(flat)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf data propagate, as they should
        for c, row in enumerate(flat):
            mean0 = math.fsum(row.tolist()) / n
            deviation = row - mean0  # exact where row ~ mean0 (Sterbenz)
            residual = math.fsum(deviation.tolist()) / n
            centered[c] = deviation - residual
            mean[c] = mean0 + residual
            var[c] = math.fsum((centered[c] * centered[c]).tolist()) / n
    return mean, var, centered


def reference_batch_norm(
    x: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    unbiased: bool = True,
) -> dict[str, np.ndarray | None]:
    """``torch.nn.functional.batch_norm`` in float64, with exactly rounded sums.

    Parameters
    ----------
    x : array_like
        The input (any float dtype; computed in float64).
    running_mean, running_var, weight, bias : array_like or None
        As for :func:`portable_bn.batch_norm`.
    training : bool, keyword-only
        Batch statistics (and the running update) if True, running statistics if False.
    momentum, eps : float, keyword-only
        As for :func:`portable_bn.batch_norm`.
    axis : int, keyword-only
        The channel axis.
    unbiased : bool, keyword-only
        The running variance takes the unbiased batch variance (PyTorch) or, if False, the
        biased one.

    Returns
    -------
    dict
        ``output``, ``running_mean``, ``running_var`` (None where not given), ``mean`` and
        ``invstd``: the keys of :class:`portable_bn.BatchNormResult`, as float64 NumPy arrays.

    Examples
    --------
    >>> from portable_bn.testing import reference_batch_norm
    >>> expected = reference_batch_norm([[1.0], [3.0]], [0.0], [1.0], training=True)
    >>> expected["mean"], expected["running_var"]     # 0.9 * 1 + 0.1 * unbiased variance 2
    (array([2.]), array([1.1]))
    """
    x = np.asarray(x, dtype=np.float64)
    flat = _channels_first(x, axis)
    channels, n = flat.shape
    w = np.ones(channels) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    rm = None if running_mean is None else np.asarray(running_mean, dtype=np.float64)
    rv = None if running_var is None else np.asarray(running_var, dtype=np.float64)
    if training:
        if n == 0:
            mean = np.full(channels, np.nan)
            var = np.full(channels, np.nan)
            centered = flat
        else:
            mean, var, centered = _exact_statistics(flat)
            if rm is not None and rv is not None:
                rm = (1 - momentum) * rm + momentum * mean
                rv = (1 - momentum) * rv + momentum * (var * n / (n - 1) if unbiased else var)
    else:
        if rm is None or rv is None:
            raise ValueError("eval needs running statistics")
        mean, var = rm, rv
        centered = flat - mean[:, None]
    invstd = 1.0 / np.sqrt(var + eps)
    out = centered * invstd[:, None] * w[:, None] + b[:, None]
    return {
        "output": _to_input_layout(out, x.shape, axis),
        "running_mean": rm,
        "running_var": rv,
        "mean": mean,
        "invstd": invstd,
    }


def reference_backward(
    grad_output: Any, x: Any, weight: Any, mean: Any, invstd: Any, *, training: bool, axis: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the forward with respect to ``x``, ``weight`` and ``bias``, in float64.

    Parameters
    ----------
    grad_output, x : array_like
        The gradient of the loss with respect to the output, and the forward input.
    weight : array_like or None
        The forward weight (None: ones).
    mean, invstd : array_like
        The statistics the forward normalized with.
    training : bool, keyword-only
        Whether the statistics are the batch's (then differentiated) or constants.
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    grad_input, grad_weight, grad_bias : ndarray

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import reference_backward
    >>> x = np.array([[1.0], [3.0]])
    >>> grad_input, grad_weight, grad_bias = reference_backward(
    ...     np.ones_like(x), x, None, [2.0], [1.0], training=True)
    >>> grad_input.ravel(), grad_bias       # a constant upstream gradient cancels in training
    (array([0., 0.]), array([2.]))
    """
    g = _channels_first(grad_output, axis)
    flat = _channels_first(x, axis)
    channels, n = flat.shape
    w = np.ones(channels) if weight is None else np.asarray(weight, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    xhat = (flat - mean[:, None]) * invstd[:, None]
    grad_bias = g.sum(axis=1)
    grad_weight = (g * xhat).sum(axis=1)
    if training and n > 0:
        gi = (w * invstd)[:, None] * (g - grad_bias[:, None] / n - xhat * grad_weight[:, None] / n)
    else:
        gi = g * (w * invstd)[:, None]
    return _to_input_layout(gi, np.shape(x), axis), grad_weight, grad_bias


def reference_moments(x: Any, *, axis: int = 1) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel ``(count, mean, M2)`` of ``x`` in float64, with exactly rounded sums.

    Parameters
    ----------
    x : array_like
        The values (any float dtype; computed in float64).
    axis : int, keyword-only
        The channel axis.

    Returns
    -------
    count : int
        Values per channel.
    mean, m2 : ndarray
        Per channel, the mean and the sum of squared deviations from it.

    Examples
    --------
    >>> from portable_bn.testing import reference_moments
    >>> reference_moments([[1.0, 10.0], [3.0, 10.0]])
    (2, array([ 2., 10.]), array([2., 0.]))
    """
    flat = _channels_first(np.asarray(x, dtype=np.float64), axis)
    mean, var, _ = _exact_statistics(flat)
    return flat.shape[1], mean, var * flat.shape[1]


@dataclass
class ReferenceModule:
    """``torch.nn.BatchNorm*d``'s state machine in float64 (rank checks aside).

    Calling it runs one forward (:func:`reference_batch_norm`) and updates ``state`` as the
    PyTorch module updates its parameters and buffers.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps, momentum, affine, track_running_stats : optional
        As for ``torch.nn.BatchNorm2d``.
    axis : int
        The channel axis.
    training : bool
        Training mode (the attribute, changed between calls).
    state : dict
        ``weight``, ``bias``, ``running_mean``, ``running_var`` (float64 arrays) and
        ``num_batches_tracked`` (int), filled with PyTorch's initial values.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import ReferenceModule
    >>> module = ReferenceModule(1, momentum=None)
    >>> _ = module(np.array([[1.0], [3.0]]))
    >>> module.state["running_mean"], module.state["num_batches_tracked"]
    (array([2.]), 1)
    """

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    axis: int = 1
    training: bool = True
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.num_features
        if self.affine:
            self.state.update(weight=np.ones(c), bias=np.zeros(c))
        if self.track_running_stats:
            self.state.update(running_mean=np.zeros(c), running_var=np.ones(c), num_batches_tracked=0)

    def __call__(self, x: Any) -> np.ndarray:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.state["num_batches_tracked"] += 1
            if self.momentum is None:
                factor = 1.0 / self.state["num_batches_tracked"]
        rm = self.state.get("running_mean")
        rv = self.state.get("running_var")
        use_batch = self.training or (rm is None and rv is None)
        result = reference_batch_norm(
            x,
            rm,
            rv,
            self.state.get("weight"),
            self.state.get("bias"),
            training=use_batch,
            momentum=factor,
            eps=self.eps,
            axis=self.axis,
        )
        if self.training and self.track_running_stats:
            self.state.update(running_mean=result["running_mean"], running_var=result["running_var"])
        out = result["output"]
        assert out is not None
        return out
