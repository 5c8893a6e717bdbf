"""Folding a module's eval-mode normalization into a scale and shift, or into the weights of
the convolution or linear layer before it (``torch.nn.utils.fusion``'s arithmetic)."""

from __future__ import annotations

import numbers
from types import ModuleType
from typing import Any, NamedTuple

from ._agnostic import running_statistics
from ._compat import convert_array, describe_namespace, device, devices_differ, namespace_of, to_numpy
from ._modules import _BatchNorm
from ._validate import floating_dtype_name, is_real_floating

__all__ = ["fold", "fuse_conv", "fuse_linear"]


class _Vectors(NamedTuple):
    """A module's eval-mode vectors in one library: weight and bias (1 and 0 without
    affine), running mean, and ``1 / sqrt(running_var + eps)``, all in the module's dtype."""

    weight: Any
    bias: Any
    mean: Any
    invstd: Any


def _statistics_of(bn: Any, name: str = "bn") -> tuple[ModuleType, Any]:
    """The module's namespace and dtype, once it is known to hold running statistics."""
    if not isinstance(bn, _BatchNorm):
        raise TypeError(
            f"{name} must be a portable_bn BatchNorm1d, BatchNorm2d or BatchNorm3d, got {type(bn).__name__}"
        )
    if not bn.track_running_stats:
        raise ValueError(
            f"{name} has no running statistics to fold (track_running_stats=False): "
            "it normalizes every input with its own batch statistics"
        )
    if bn.running_mean is None or bn.running_var is None or bn.xp is None:
        raise ValueError(
            f"{name} holds no running statistics yet: create it with xp=, call it, or load a state dict first"
        )
    return bn.xp, bn.running_var.dtype


def _check_denominator(xp: ModuleType, running_var: Any, eps: float, name: str) -> None:
    """``running_var + eps > 0`` in every channel, where the values can be read now.

    On Dask arrays (which would compute) and where reading raises (JAX inside ``jax.jit``,
    torch's ``"meta"`` device), the check is left out: those channels then get an infinite
    (or NaN) scale, as the division gives."""
    if describe_namespace(xp) == "dask":
        return
    bad = running_var + eps <= 0
    try:
        found = bool(xp.any(bad))
    except (TypeError, RuntimeError):  # a JAX tracer, a tensor without data
        return
    if found:
        import numpy as np

        channels = [int(c) for c in np.flatnonzero(to_numpy(bad))]
        shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
        raise ValueError(
            f"{name}.running_var + {name}.eps is 0 or negative in channel(s) [{shown}] (eps={eps}), so "
            "1 / sqrt(running_var + eps) is not finite; use eps > 0 or load a positive running variance"
        )


def _vectors(bn: Any, xp: ModuleType, like: Any, name: str = "bn") -> _Vectors:
    """The module's vectors as arrays of ``xp`` on ``like``'s device, in the module's dtype."""
    bn_xp, dtype = _statistics_of(bn, name)
    _check_denominator(bn_xp, bn.running_var, bn.eps, name)
    state = {"mean": bn.running_mean, "var": bn.running_var, "weight": bn.weight, "bias": bn.bias}
    if bn_xp is not xp or devices_differ(bn.running_var, like):
        target = _same_dtype(bn_xp, dtype, xp)
        dev = device(like)
        state = {key: None if value is None else convert_array(value, xp, dev, target) for key, value in state.items()}
        dtype = target
    mean, var = state["mean"], state["var"]
    stats = running_statistics(xp, mean, var, dtype=dtype, eps=bn.eps)
    weight = xp.ones_like(mean) if state["weight"] is None else state["weight"]
    bias = xp.zeros_like(mean) if state["bias"] is None else state["bias"]
    return _Vectors(weight, bias, stats.mean, stats.invstd)


def _same_dtype(source: ModuleType, dtype: Any, target: ModuleType) -> Any:
    theirs = getattr(target, floating_dtype_name(source, dtype), None)
    if theirs is None:
        raise TypeError(
            f"the module's dtype {dtype} has no counterpart in {describe_namespace(target)}; "
            "load its state into a module of the weight's library"
        )
    return theirs


def fold(bn: Any) -> tuple[Any, Any]:
    """The module's eval-mode normalization as a per-channel scale and shift.

    ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale`` (weight 1 and bias 0 without affine), so
    that the module in eval mode computes ``x * scale + shift`` along the channel axis.
    Computed in the module's library and dtype, as the module computes its eval-mode
    scale (``weight * (1 / sqrt(running_var + eps))``), and without detaching: in
    PyTorch and JAX gradients reach the module's weight and bias. The module is read,
    not changed, whatever its mode.

    Parameters
    ----------
    bn : BatchNorm1d, BatchNorm2d or BatchNorm3d
        A module with running statistics.

    Returns
    -------
    scale, shift : arrays
        Shape ``(num_features,)``, the module's dtype, library and device.

    Raises
    ------
    TypeError
        ``bn`` is not a portable_bn module.
    ValueError
        The module has no running statistics (``track_running_stats=False``, or
        not created yet), or ``running_var + eps`` is 0 or negative in some channel
        (``eps=0`` with a zero variance), where the scale would be infinite. On Dask
        arrays and inside ``jax.jit`` the values cannot be read when ``fold`` runs:
        there the check is left out and such channels get an infinite scale.

    See Also
    --------
    fuse_conv, fuse_linear : Fold into the weights of the layer before the module.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm1d(2, xp=np, dtype=np.float64).eval()
    >>> _ = bn.load_state_dict({"weight": np.array([2.0, 1.0]), "bias": np.array([0.5, 0.0]),
    ...                         "running_mean": np.array([1.0, -2.0]), "running_var": np.array([4.0, 0.25])},
    ...                        strict=False)
    >>> scale, shift = pbn.fold(bn)
    >>> scale.round(4), shift.round(4)
    (array([1., 2.]), array([-0.5   ,  3.9999]))
    >>> x = np.array([[3.0, 1.0], [0.0, -1.0]])
    >>> bool(np.allclose(bn(x), x * scale + shift))
    True
    """
    xp, _ = _statistics_of(bn)
    vectors = _vectors(bn, xp, bn.running_var)
    scale = vectors.weight * vectors.invstd
    return scale, vectors.bias - vectors.mean * scale


def _floating_weight(weight: Any, name: str) -> ModuleType:
    xp = namespace_of(weight, name)
    if not is_real_floating(xp, weight.dtype):
        raise TypeError(f"{name} must have a real floating dtype, got {weight.dtype}")
    return xp


def _checked_bias(xp: ModuleType, bias: Any, weight: Any, channels: int, weight_name: str) -> None:
    if bias is None:
        return
    if namespace_of(bias, "bias") is not xp:
        raise TypeError(
            f"bias must be an array of {weight_name}'s library ({describe_namespace(xp)}), "
            f"got {describe_namespace(namespace_of(bias, 'bias'))}"
        )
    if not is_real_floating(xp, bias.dtype):
        raise TypeError(f"bias must have a real floating dtype, got {bias.dtype}")
    if tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must have shape ({channels},), one value per output channel, got {tuple(bias.shape)}")
    if devices_differ(bias, weight):
        raise ValueError(f"bias and {weight_name} must be on one device")


def fuse_conv(weight: Any, bias: Any, bn: Any, *, transpose: bool = False, groups: int = 1) -> tuple[Any, Any]:
    """Fold a module into the convolution before it: ``bn(conv(x)) == conv'(x)`` in eval mode.

    ``torch.nn.utils.fusion.fuse_conv_bn_weights``'s arithmetic, dtypes included:
    the per-channel factor ``weight_bn / sqrt(running_var + eps)`` is computed in the
    module's dtype, the products in the promoted dtype, and the results are cast to
    the dtypes of ``weight`` and ``bias`` (``weight``'s when ``bias`` is None). The
    module's vectors are copied into ``weight``'s library and device where they differ.

    Parameters
    ----------
    weight : array
        Convolution weight in PyTorch's layout: ``(C_out, C_in / groups, *kernel)``,
        or ``(C_in, C_out / groups, *kernel)`` for a transposed convolution.
    bias : array or None
        Convolution bias, shape ``(C_out,)``; None for a convolution without one.
    bn : BatchNorm1d, BatchNorm2d or BatchNorm3d
        The module after the convolution, with running statistics; ``num_features``
        must equal ``C_out``.
    transpose : bool, keyword-only
        True for a transposed convolution's weight layout.
    groups : int, keyword-only
        The convolution's groups. Needed for a grouped transposed convolution, whose
        weight holds ``C_out / groups`` output channels per group; a plain
        convolution's weight shows ``C_out`` anyway.

    Returns
    -------
    fused_weight, fused_bias : arrays
        In ``weight``'s library and on its device; ``fused_bias`` has shape
        ``(C_out,)``, also when ``bias`` is None.

    Raises
    ------
    TypeError
        ``weight`` or ``bias`` is not a real floating array (or ``bias`` is of another
        library), ``bn`` is not a portable_bn module, or an option has the wrong type.
    ValueError
        ``weight`` has fewer than 3 dimensions, its output channels (or ``bias``'s)
        do not match ``bn.num_features``, ``groups`` does not divide the channels, or
        ``bn`` cannot be folded (see :func:`fold`).

    See Also
    --------
    fold : The per-channel scale and shift.
    fuse_linear : The same for a linear layer.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> conv_w = np.ones((2, 1, 3), dtype=np.float32)         # Conv1d(1, 2, kernel_size=3)
    >>> bn = pbn.BatchNorm1d(2, xp=np).eval()
    >>> _ = bn.load_state_dict({"weight": np.array([1.0, 2.0]), "bias": np.array([0.0, 1.0]),
    ...                         "running_mean": np.array([3.0, 3.0]), "running_var": np.array([1.0, 4.0])},
    ...                        strict=False)
    >>> w, b = pbn.fuse_conv(conv_w, None, bn)
    >>> w[:, 0, :].round(3), b.round(3)
    (array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32), array([-3., -2.], dtype=float32))
    """
    xp = _floating_weight(weight, "weight")
    if not isinstance(transpose, bool):
        raise TypeError(f"transpose must be True or False, got {type(transpose).__name__} {transpose!r}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__} {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    groups = int(groups)
    shape = tuple(int(n) for n in weight.shape)
    if len(shape) < 3:
        raise ValueError(
            f"weight must have at least 3 dimensions (out, in, *kernel) for a convolution, got shape {shape}; "
            "for a linear layer's weight use fuse_linear"
        )
    _statistics_of(bn)
    channels = shape[1] * groups if transpose else shape[0]
    if shape[0] % groups:
        raise ValueError(f"groups={groups} must divide weight.shape[0]={shape[0]}")
    if channels != bn.num_features:
        where = f"weight.shape[1] * groups = {shape[1]} * {groups}" if transpose else f"weight.shape[0] = {shape[0]}"
        raise ValueError(
            f"the convolution has {channels} output channels ({where}) but bn has num_features={bn.num_features}"
            + (
                ""
                if transpose or shape[1] * groups != bn.num_features
                else "; a transposed convolution? transpose=True"
            )
        )
    _checked_bias(xp, bias, weight, channels, "weight")
    v = _vectors(bn, xp, weight)
    factor = v.weight * v.invstd
    kernel = (1,) * (len(shape) - 2)
    if transpose:
        per_group = (groups, shape[0] // groups, shape[1], *shape[2:])
        grouped = xp.reshape(weight, per_group) * xp.reshape(factor, (groups, 1, shape[1], *kernel))
        fused_weight = xp.reshape(grouped, shape)
    else:
        fused_weight = weight * xp.reshape(factor, (-1, 1, *kernel))
    conv_bias = xp.zeros_like(v.mean) if bias is None else bias
    fused_bias = (conv_bias - v.mean) * v.invstd * v.weight + v.bias
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return xp.astype(fused_weight, weight.dtype), xp.astype(fused_bias, bias_dtype)


def fuse_linear(weight: Any, bias: Any, bn: Any) -> tuple[Any, Any]:
    """Fold a module into the linear layer before it: ``bn(linear(x)) == linear'(x)`` in eval mode.

    ``torch.nn.utils.fusion.fuse_linear_bn_weights``'s arithmetic, dtypes included:
    the per-channel factor ``weight_bn / sqrt(running_var + eps)`` is computed in the
    module's dtype and cast to ``weight``'s before the product; the bias is computed in
    the promoted dtype and cast to ``bias``'s (``weight``'s when ``bias`` is None). A
    module with one feature scales every output, as in
    ``torch.nn.utils.fusion.fuse_linear_bn_eval``. The module's vectors are copied into
    ``weight``'s library and device where they differ.

    Parameters
    ----------
    weight : array
        Linear weight, shape ``(out_features, in_features)``.
    bias : array or None
        Linear bias, shape ``(out_features,)``; None for a layer without one.
    bn : BatchNorm1d, BatchNorm2d or BatchNorm3d
        The module after the linear layer, with running statistics;
        ``num_features`` must be ``out_features`` or 1.

    Returns
    -------
    fused_weight, fused_bias : arrays
        In ``weight``'s library and on its device; ``fused_bias`` has shape
        ``(out_features,)``, also when ``bias`` is None.

    Raises
    ------
    TypeError
        ``weight`` or ``bias`` is not a real floating array (or ``bias`` is of another
        library), or ``bn`` is not a portable_bn module.
    ValueError
        ``weight`` is not 2-D, ``out_features`` does not match ``bn.num_features``, or
        ``bn`` cannot be folded (see :func:`fold`).

    See Also
    --------
    fold : The per-channel scale and shift.
    fuse_conv : The same for a convolution.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm1d(2, xp=np, dtype=np.float64).eval()
    >>> _ = bn.load_state_dict({"weight": np.array([1.0, 2.0]), "bias": np.array([0.0, 1.0]),
    ...                         "running_mean": np.array([3.0, 3.0]), "running_var": np.array([1.0, 4.0])},
    ...                        strict=False)
    >>> w, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.5, 0.5])
    >>> fused_w, fused_b = pbn.fuse_linear(w, b, bn)
    >>> x = np.array([[1.0, -1.0], [2.0, 0.5]])
    >>> bool(np.allclose(x @ fused_w.T + fused_b, bn(x @ w.T + b)))
    True
    """
    xp = _floating_weight(weight, "weight")
    shape = tuple(int(n) for n in weight.shape)
    if len(shape) != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {shape}")
    _statistics_of(bn)
    if bn.num_features not in (shape[0], 1):
        raise ValueError(
            f"the linear layer has out_features={shape[0]} (weight.shape[0]) but bn has "
            f"num_features={bn.num_features}; they must be equal, or num_features 1"
        )
    _checked_bias(xp, bias, weight, shape[0], "weight")
    v = _vectors(bn, xp, weight)
    scale = v.weight * v.invstd
    fused_weight = weight * xp.astype(xp.reshape(scale, (-1, 1)), weight.dtype)
    linear_bias = xp.zeros((shape[0],), dtype=v.mean.dtype, device=device(v.mean)) if bias is None else bias
    fused_bias = (linear_bias - v.mean) * scale + v.bias
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return fused_weight, xp.astype(fused_bias, bias_dtype)
