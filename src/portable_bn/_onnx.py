"""Export a module to ONNX: the standard BatchNormalization node for inference, and the
module's own training computation traced through ndonnx (an array-API library whose arrays
build an ONNX graph) for training. No batch-norm rule is restated here: eval is ONNX's own
operator fed with the module's state, training is the module's call on symbolic arrays."""

from __future__ import annotations

import copy
import numbers
from typing import TYPE_CHECKING, Any

from . import _validate
from ._compat import to_numpy

if TYPE_CHECKING:
    from ._modules import _BatchNorm

OPSET = 15
"""The opset of the eval model (BatchNormalization-15 takes float and double)."""

_SYMBOLS = ("N", "D1", "D2", "D3")


def _import(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"to_onnx needs {name}: pip install 'portable_bn[onnx]' (onnx, onnxruntime and ndonnx)"
        ) from None


def input_shape(module: _BatchNorm, shape: Any, *, dynamic_batch: bool) -> tuple[int | str, ...]:
    """The exported input's shape: ints where fixed, names where symbolic ("N" for the batch,
    "D1", "D2", ... for the others)."""
    if shape is None:
        sizes: list[int | None] = [None] * module._ranks[0]
    elif isinstance(shape, (tuple, list)):
        for size in shape:
            if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0):
                raise TypeError(f"shape must hold non-negative ints or None (symbolic), got {tuple(shape)!r}")
        sizes = [None if size is None else int(size) for size in shape]
    else:
        raise TypeError(f"shape must be a tuple of ints or None (symbolic), got {type(shape).__name__}")
    name = type(module).__name__
    if len(sizes) not in module._ranks:
        expected = " or ".join(f"{rank}-D" for rank in module._ranks)
        raise ValueError(f"{name} takes {expected} input, got shape {tuple(sizes)!r}")
    if not -len(sizes) <= module.axis < len(sizes):
        raise ValueError(f"{name}(axis={module.axis}) does not fit a {len(sizes)}-D input; pass shape=")
    channel_axis = module.axis % len(sizes)
    if sizes[channel_axis] not in (None, module.num_features):
        raise ValueError(
            f"shape {tuple(sizes)!r} has {sizes[channel_axis]} channels along axis {module.axis}, "
            f"{name} has {module.num_features}"
        )
    sizes[channel_axis] = module.num_features
    if dynamic_batch:
        sizes[0] = None
    elif sizes[0] is None:
        raise ValueError("dynamic_batch=False needs the batch size: pass shape=(batch, ...)")
    symbols = iter(_SYMBOLS[1:])
    return tuple(("N" if i == 0 else next(symbols)) if size is None else size for i, size in enumerate(sizes))


def export(module: _BatchNorm, *, training: bool, dynamic_batch: bool, shape: Any) -> Any:
    """``module.to_onnx(...)``: see its docstring."""
    training = _validate.flag(training, "training")
    dynamic_batch = _validate.flag(dynamic_batch, "dynamic_batch")
    if module.xp is None:
        raise ValueError(f"{type(module).__name__} has no parameters yet: call it once or load a state dict first")
    sizes = input_shape(module, shape, dynamic_batch=dynamic_batch)
    onnx = _import("onnx")
    if not training and module.running_mean is not None:
        model = _eval_model(onnx, module, sizes)
    else:
        model = _traced_model(onnx, module, sizes, training=training)
    onnx.checker.check_model(model)
    return model


def _host(value: Any) -> Any:
    return to_numpy(value).copy()


def _eval_model(onnx: Any, module: _BatchNorm, sizes: tuple[int | str, ...]) -> Any:
    """BatchNormalization (channel axis 1) fed with the module's state as initializers named
    by their state-dict keys; a channels-last module is transposed in and out."""
    import numpy as np

    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    state = {key: _host(value) for key, value in module.state_dict().items() if key != "num_batches_tracked"}
    dtype = state["running_mean"].dtype
    ones, zeros = np.ones(module.num_features, dtype=dtype), np.zeros(module.num_features, dtype=dtype)
    scale_name, bias_name = ("weight", "bias") if module.affine else ("scale", "B")
    initializers = [
        numpy_helper.from_array(state.get("weight", ones), scale_name),
        numpy_helper.from_array(state.get("bias", zeros), bias_name),
        numpy_helper.from_array(state["running_mean"], "running_mean"),
        numpy_helper.from_array(state["running_var"], "running_var"),
    ]
    rank = len(sizes)
    channel_axis = module.axis % rank
    nodes = []
    source = "x"
    if channel_axis != 1:
        to_first = [0, channel_axis, *(i for i in range(1, rank) if i != channel_axis)]
        nodes.append(helper.make_node("Transpose", ["x"], ["x_channels_first"], perm=to_first))
        source = "x_channels_first"
    normalized = "y" if channel_axis == 1 else "y_channels_first"
    momentum = {} if module.momentum is None else {"momentum": 1.0 - float(module.momentum)}  # ONNX's m is 1 - ours
    nodes.append(
        helper.make_node(
            "BatchNormalization",
            [source, scale_name, bias_name, "running_mean", "running_var"],
            [normalized],
            name="batch_norm",
            epsilon=float(module.eps),
            **momentum,
        )
    )
    if channel_axis != 1:
        back = [to_first.index(i) for i in range(rank)]
        nodes.append(helper.make_node("Transpose", [normalized], ["y"], perm=back))
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    graph = helper.make_graph(
        nodes,
        type(module).__name__,
        [helper.make_tensor_value_info("x", elem, list(sizes))],
        [helper.make_tensor_value_info("y", elem, list(sizes))],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="portable_bn")


def _traced_model(onnx: Any, module: _BatchNorm, sizes: tuple[int | str, ...], *, training: bool) -> Any:
    """The module's own call on an ndonnx input with symbolic sizes, built into a model: outputs
    ``y`` and, in training with running statistics, ``running_mean`` and ``running_var``."""
    ndx = _import("ndonnx")
    traced = copy.copy(module)  # rebinding the copy's attributes leaves the module as it is
    traced.sync = None  # one replica's graph: ONNX has no collectives
    traced.to(ndx)
    traced.training = training
    dtype = traced.running_mean.dtype if traced.running_mean is not None else traced.weight.dtype
    x = ndx.argument(shape=tuple(None if isinstance(size, str) else size for size in sizes), dtype=dtype)
    outputs = {"y": traced(x)}
    if training and traced.running_mean is not None:
        outputs.update(running_mean=traced.running_mean, running_var=traced.running_var)
    model = ndx.build({"x": x}, outputs)
    _name_dimensions(model, sizes)
    return model


def _name_dimensions(model: Any, sizes: tuple[int | str, ...]) -> None:
    """Give the input's symbolic sizes their names ("N", "D1", ...) in the built model."""
    for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim, sizes, strict=True):
        if isinstance(size, str):
            dim.dim_param = size
