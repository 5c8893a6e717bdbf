"""Public functions: thin entries that validate, resolve ``xp`` once, pick the primitive set
(:func:`._dispatch.primitives`) and decide, in one visible place each, whether the library's
own whole-op kernel serves; otherwise the implementation of :mod:`._agnostic` runs."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, NamedTuple

from . import _agnostic, _dispatch, _validate
from ._recipe import Recipe, make_recipe

__all__ = ["BatchNormResult", "batch_norm", "batch_norm_backward"]


class BatchNormResult(NamedTuple):
    """What :func:`batch_norm` returns.

    Parameters
    ----------
    output : array
        The normalized input, same shape, dtype, library and device as ``x``.
    running_mean, running_var : array or None
        The new running statistics (training) or the given ones (eval); None
        where None was given. Updated ones are never attached to an autograd
        graph.
    mean, invstd : array
        Per-channel statistics used to normalize (batch statistics in
        training, running ones in eval), in the compute dtype (float32 for
        float16/bfloat16 input). Pass them to :func:`batch_norm_backward`.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> output, running_mean, running_var, mean, invstd = pbn.batch_norm(
    ...     np.array([[1.0], [3.0]]), np.zeros(1), np.ones(1), training=True)
    >>> mean, running_var      # batch mean; 0.9 * 1 + 0.1 * unbiased variance 2
    (array([2.]), array([1.1]))
    """

    output: Any
    running_mean: Any
    running_var: Any
    mean: Any
    invstd: Any


def batch_norm(
    x: Any,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    skip_nonfinite: bool = False,
    unbiased: bool = True,
    mask: Any = None,
    virtual_batch_size: int | None = None,
    sync: Any = None,
) -> BatchNormResult:
    """Batch normalization with PyTorch's exact rules, on any array-API library.

    A pure version of :func:`torch.nn.functional.batch_norm`: arguments are
    never written to; the updated running statistics are returned.

    Parameters
    ----------
    x : array
        Input of rank >= 2 and real floating dtype (NumPy, PyTorch, CuPy, JAX,
        Dask or array-api-strict).
    running_mean, running_var : array or None
        Running statistics of shape ``(C,)``: both or neither. Required when
        ``training`` is False.
    weight, bias : array or None
        Per-channel affine parameters of shape ``(C,)``; None means 1 and 0.
    training : bool, keyword-only
        Normalize with the batch statistics (and update the running ones) if
        True, with the running statistics if False.
    momentum : float, keyword-only
        Weight of the new batch in the running update:
        ``new = (1 - momentum) * old + momentum * batch``; the variance uses the
        unbiased batch variance, as PyTorch (see ``unbiased``).
    eps : float, keyword-only
        Added to the variance before the square root; > 0 in training.
    axis : int, keyword-only
        Channel axis (1 for NCHW, -1 for channels-last); all others are reduced.
    skip_nonfinite : bool, keyword-only
        If True, a channel whose batch statistics are NaN or Inf (the batch
        holds a NaN or Inf there, or its variance overflows the dtype) keeps
        its running statistics instead of being poisoned for good
        (pytorch#90342). Other channels update normally; the output is not
        changed. Default False: PyTorch's behaviour.
    unbiased : bool, keyword-only
        True (PyTorch): the running variance is updated with the unbiased
        batch variance, ``var * n / (n - 1)``. False: with the biased one, as
        Keras, Flax and ONNX store it. Normalization uses the biased variance
        either way.
    mask : array of bool or None, keyword-only
        Shape of ``x`` without the channel axis; True marks valid positions
        (Keras's convention). In training, the statistics, the running update
        (with n the number of valid values) and the backward use the valid
        values only; masked-out positions are normalized with the same
        statistics but pass no gradient back. No valid value: mean 0 and
        variance 0, running statistics unchanged; fewer than two valid
        values leave the running statistics unchanged. In eval (running
        statistics) the mask changes nothing.
    virtual_batch_size : int or None, keyword-only
        Ghost batch norm (training only): consecutive groups of this many
        samples along axis 0 are each normalized with their own statistics and
        update the running statistics in turn, as if fed one by one; the last
        group holds what remains. ``mean`` and ``invstd`` then have shape
        ``(groups, C)``.
    sync : reducer or None, keyword-only
        Synchronize the training statistics across replicas
        (:mod:`portable_bn.distributed`: ``TorchProcessGroup``, ``JaxAxis``):
        the statistics of all replicas' values, weighted by each replica's
        count. Every replica must call with the same channel count; batch sizes
        may differ, and may be 0. Not combined with ``virtual_batch_size``.

    Returns
    -------
    BatchNormResult
        ``(output, running_mean, running_var, mean, invstd)``.

    Raises
    ------
    TypeError
        Non-floating input or parameters, arrays of different libraries,
        dtypes that do not match ``x``.
    ValueError
        Wrong rank or channel count, only one running buffer, ``eps <= 0`` in
        training, one value per channel in training (of one replica, or of a
        virtual batch), eval without running statistics, arrays on different
        devices, unknown (Dask) sizes, a mask of the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> x = np.arange(12.0).reshape(2, 3, 2)
    >>> r = pbn.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    >>> r.output[:, 0].round(4)
    array([[-1.1508, -0.822 ],
           [ 0.822 ,  1.1508]])
    >>> r.mean
    array([3.5, 5.5, 7.5])
    >>> r.running_mean          # 0.9 * 0 + 0.1 * mean
    array([0.35, 0.55, 0.75])
    """
    xp = _validate.input_array(x)
    training = _validate.flag(training, "training")
    factor = _validate.real_number(momentum, "momentum")
    return forward(
        xp,
        x,
        running_mean,
        running_var,
        weight,
        bias,
        training=training,
        factor=factor,
        eps=eps,
        axis=axis,
        skip_nonfinite=_validate.flag(skip_nonfinite, "skip_nonfinite"),
        unbiased=_validate.flag(unbiased, "unbiased"),
        mask=mask,
        virtual_batch_size=virtual_batch_size,
        sync=sync,
    )


def forward(
    xp: ModuleType,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    *,
    training: bool,
    factor: Any,
    eps: Any,
    axis: Any,
    skip_nonfinite: bool = False,
    unbiased: bool = True,
    mask: Any = None,
    virtual_batch_size: Any = None,
    sync: Any = None,
    group_factors: Sequence[Any] | None = None,
) -> BatchNormResult:
    """:func:`batch_norm` after ``x``, ``training`` and the update factor are
    checked; ``factor`` may be a 0-d array (a module's cumulative average), and
    ``group_factors`` give one per virtual batch (default: ``factor`` for each)."""
    recipe = _checked_recipe(xp, x, axis, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    eps = _validate.epsilon(eps, training=training)
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var must be given together, got only {given}")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    size, sync = _validate.ghost_and_sync(virtual_batch_size, sync)
    if mask is not None or size is not None:
        _validate.known_sizes(x, recipe)
    if mask is not None:
        _validate.mask_for(xp, x, mask, recipe)
    groups = None
    if size is not None:
        _validate.batch_axis_for_virtual_batches(recipe)
        if training:
            groups = _agnostic.ghost_groups(int(x.shape[0]), size)
    if not training:
        mask = sync = None  # running statistics: neither changes anything
    if groups is None:
        if training and mask is None and recipe.count_per_channel == 1 and (sync is None or sync.size == 1):
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {_shape_of(x)}")
        return _one_batch(
            xp, x, running_mean, running_var, weight, bias, recipe,
            training=training, factor=factor, eps=eps, skip_nonfinite=skip_nonfinite, unbiased=unbiased,
            mask=mask, sync=sync,
        )  # fmt: skip
    factors = [factor] * len(groups) if group_factors is None else list(group_factors)
    parts = _virtual_batches(groups, recipe, x, mask)
    for part, part_mask, part_recipe in parts:
        if part_mask is None and part_recipe.count_per_channel == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got a virtual batch of size {_shape_of(part)}"
            )
    outputs, means, invstds = [], [], []
    for (part, part_mask, part_recipe), part_factor in zip(parts, factors, strict=True):
        result = _one_batch(
            xp, part, running_mean, running_var, weight, bias, part_recipe,
            training=True, factor=part_factor, eps=eps, skip_nonfinite=skip_nonfinite, unbiased=unbiased,
            mask=part_mask, sync=None,
        )  # fmt: skip
        running_mean, running_var = result.running_mean, result.running_var
        outputs.append(result.output)
        means.append(result.mean)
        invstds.append(result.invstd)
    output = outputs[0] if len(outputs) == 1 else xp.concat(outputs, axis=0)
    return BatchNormResult(output, running_mean, running_var, xp.stack(means), xp.stack(invstds))


def _virtual_batches(groups: list[slice], recipe: Recipe, *arrays: Any) -> list[tuple[Any, ...]]:
    """Per virtual batch: each of ``arrays`` sliced along axis 0 (None stays None), and the
    recipe of the first one's slice."""
    parts = []
    for group in groups:
        sliced = [None if array is None else array[(group, ...)] for array in arrays]
        shape = (group.stop - group.start, *(int(n) for n in arrays[0].shape[1:]))
        parts.append((*sliced, make_recipe(shape, recipe.channel_axis)))
    return parts


def _one_batch(
    xp: ModuleType,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    recipe: Recipe,
    *,
    training: bool,
    factor: Any,
    eps: float,
    skip_nonfinite: bool,
    mask: Any,
    sync: Any,
    unbiased: bool = True,
) -> BatchNormResult:
    """One batch's forward: the agnostic implementation, or the library's own kernel where it serves."""
    prims = _dispatch.primitives(xp, x, recipe)
    if training and (mask is not None or sync is not None or recipe.count_per_channel is None):
        result = _agnostic.moments_train_forward(
            prims, x, running_mean, running_var, weight, bias, recipe,
            factor=factor, eps=eps, skip_nonfinite=skip_nonfinite, unbiased=unbiased, mask=mask, sync=sync,
        )  # fmt: skip
        return BatchNormResult(*result)
    native = prims.native
    if native is not None and native.serves_forward(
        x, running_mean, running_var, weight, bias, recipe, training=training
    ):
        # the library's own kernel (PyTorch), where its result is kept
        if training:
            served = _agnostic.native_train_forward(
                prims, native, x, running_mean, running_var, weight, bias, recipe,
                factor=factor, eps=eps, skip_nonfinite=skip_nonfinite, unbiased=unbiased,
            )  # fmt: skip
        else:
            served = _agnostic.native_eval_forward(prims, native, x, running_mean, running_var, weight, bias, eps=eps)
        if served is not None:
            return BatchNormResult(*served)
    if training:
        result = _agnostic.train_forward(
            prims, x, running_mean, running_var, weight, bias, recipe,
            factor=factor, eps=eps, skip_nonfinite=skip_nonfinite, unbiased=unbiased,
        )  # fmt: skip
    else:
        result = _agnostic.eval_forward(prims, x, running_mean, running_var, weight, bias, recipe, eps=eps)
    return BatchNormResult(*result)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(size) for size in x.shape)


def _checked_recipe(xp: ModuleType, x: Any, axis: Any, **vectors: Any) -> Recipe:
    recipe = _validate.recipe_for(x, axis)
    for name, value in vectors.items():
        if value is not None:
            _validate.per_channel(xp, x, value, name, recipe)
    return recipe


def batch_norm_backward(
    grad_output: Any,
    x: Any,
    weight: Any,
    mean: Any,
    invstd: Any,
    *,
    training: bool = True,
    axis: int = 1,
    mask: Any = None,
    virtual_batch_size: int | None = None,
    sync: Any = None,
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`batch_norm` with respect to ``x``, ``weight`` and ``bias``.

    For backends without autograd (NumPy, CuPy, Dask). The statistics are the
    ``mean`` and ``invstd`` returned by the forward call.

    Parameters
    ----------
    grad_output : array
        Gradient of the loss with respect to the output; shape and dtype of ``x``.
    x : array
        The forward input.
    weight : array or None
        The forward weight; None means ones.
    mean, invstd : array
        ``BatchNormResult.mean`` and ``BatchNormResult.invstd`` of the forward call.
    training : bool, keyword-only
        Whether the forward used batch statistics (their dependence on ``x``
        is then differentiated) or running statistics (constants).
    axis : int, keyword-only
        Channel axis, as in the forward call.
    mask, virtual_batch_size, sync : keyword-only
        As in the forward call (they matter in training only). With a mask,
        ``grad_input`` is 0 at masked-out positions and the sums take the
        valid values only. With ``virtual_batch_size``, ``mean`` and
        ``invstd`` are the forward's ``(groups, C)`` arrays and each group is
        differentiated with its own statistics. With ``sync``, the input
        gradient uses the sums of every replica (one collective of ``2 C + 1``
        numbers); ``grad_weight`` and ``grad_bias`` are this replica's shares,
        which data-parallel training sums like any parameter's gradient.

    Returns
    -------
    grad_input, grad_weight, grad_bias : array
        ``grad_input`` like ``x``; ``grad_weight`` and ``grad_bias`` of shape
        ``(C,)`` in the weight's dtype (the compute dtype when ``weight`` is None),
        always computed.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> x = np.arange(12.0).reshape(2, 3, 2)
    >>> r = pbn.batch_norm(x, training=True)
    >>> gi, gw, gb = pbn.batch_norm_backward(np.ones_like(x), x, None, r.mean, r.invstd)
    >>> gb
    array([4., 4., 4.])
    >>> np.abs(gi).max() < 1e-12   # a constant upstream gradient cancels in training
    np.True_
    """
    xp = _validate.input_array(x)
    training = _validate.flag(training, "training")
    _validate.same_library_and_device(xp, x, grad_output, "grad_output")
    if tuple(grad_output.shape) != tuple(x.shape):
        raise ValueError(f"grad_output must have the shape of x {tuple(x.shape)}, got {tuple(grad_output.shape)}")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"grad_output must have the dtype of x ({x.dtype}), got {grad_output.dtype}")
    groups = None
    size, sync = _validate.ghost_and_sync(virtual_batch_size if training else None, sync)
    if size is not None:
        recipe = _checked_recipe(xp, x, axis, weight=weight)
        _validate.batch_axis_for_virtual_batches(recipe)
        groups = _agnostic.ghost_groups(int(x.shape[0]), size)
        for name, value in (("mean", mean), ("invstd", invstd)):
            _validate.same_library_and_device(xp, x, value, name)
            if tuple(value.shape) != (len(groups), recipe.num_channels):
                raise ValueError(
                    f"{name} must have shape {(len(groups), recipe.num_channels)} (virtual batches, channels), "
                    f"as the forward call returned it, got {tuple(value.shape)}"
                )
    else:
        recipe = _checked_recipe(xp, x, axis, weight=weight, mean=mean, invstd=invstd)
    if mask is not None:
        _validate.mask_for(xp, x, mask, recipe)
    if not training:
        mask = sync = None
    if groups is not None:
        grads = [
            _one_backward(
                xp,
                grad_part,
                x_part,
                weight,
                mean[j, ...],
                invstd[j, ...],
                part_recipe,
                training=True,
                mask=mask_part,
                sync=None,
            )
            for j, (x_part, grad_part, mask_part, part_recipe) in enumerate(
                _virtual_batches(groups, recipe, x, grad_output, mask)
            )
        ]
        grad_input = grads[0][0] if len(grads) == 1 else xp.concat([g[0] for g in grads], axis=0)
        grad_weight, grad_bias = grads[0][1], grads[0][2]
        for _, more_weight, more_bias in grads[1:]:
            grad_weight, grad_bias = grad_weight + more_weight, grad_bias + more_bias
        return grad_input, grad_weight, grad_bias
    return _one_backward(xp, grad_output, x, weight, mean, invstd, recipe, training=training, mask=mask, sync=sync)


def _one_backward(
    xp: ModuleType,
    grad_output: Any,
    x: Any,
    weight: Any,
    mean: Any,
    invstd: Any,
    recipe: Recipe,
    *,
    training: bool,
    mask: Any,
    sync: Any,
) -> tuple[Any, Any, Any]:
    prims = _dispatch.primitives(xp, x, recipe)
    native = prims.native
    if mask is not None or sync is not None:
        native = None
    if native is not None and native.serves_backward(grad_output, x, weight, mean, invstd, recipe, training=training):
        grads = native.backward(grad_output, x, weight, mean, invstd)  # the library's own kernel (PyTorch)
        if grads is not None:
            return grads
    return _agnostic.backward(
        prims, grad_output, x, weight, mean, invstd, recipe, training=training, mask=mask, sync=sync
    )
