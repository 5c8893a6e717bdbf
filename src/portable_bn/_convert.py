"""Converters between the modules and the batch norm layers of Keras 3, Flax and ONNX.

:class:`ConvertersMixin` gives ``BatchNorm1d/2d/3d`` the class methods
``from_keras``, ``from_flax`` and ``from_onnx`` and the methods ``to_keras`` and
``to_flax``. Each converter translates the conventions (momentum ``m`` of the
"old value" kind is ``1 - m`` here; the biased stored variance means
``unbiased=False``; the channel axis) and builds the module with its own
constructor and :meth:`~portable_bn.BatchNorm2d.load_state_dict`, so the batch
norm arithmetic lives in one place. Keras, Flax and ONNX are optional: they are
imported inside the functions that need them.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from . import _validate
from ._compat import device, namespace_of, to_numpy

if TYPE_CHECKING:
    from typing import Self

    from ._modules import _BatchNorm

_FLAX_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-5, "axis": -1}
"""The keyword defaults of :meth:`ConvertersMixin.from_flax` (Flax's own defaults, channels-last)."""


def _import(name: str, extra: str, caller: str) -> ModuleType:
    """Import an optional library, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"{caller} needs {name}: pip install 'portable_bn[{extra}]' ({exc})") from exc


def _dtype_name(value: Any) -> str:
    """'float32', 'float64', 'bfloat16', ... for arrays of any library (torch's 'torch.float32' too)."""
    return str(value.dtype).rpartition(".")[2]


def _as_array(value: Any, label: str) -> Any:
    """An array of a supported library as it is; anything else (TensorFlow tensors, lists) as a
    NumPy array. Real floating values only."""
    try:
        xp = namespace_of(value, label)
    except TypeError:
        xp = None
    if xp is not None:
        if not _validate.is_real_floating(xp, value.dtype):
            raise TypeError(f"{label} must be an array of real floating values, got dtype {value.dtype}")
        return value
    import numpy as np

    try:
        host = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{label} must be an array, got {type(value).__name__}: {exc}") from None
    if host.dtype.name == "bfloat16":  # ml_dtypes (ONNX's bfloat16 initializers): not a NumPy floating kind
        host = host.astype(np.float32)
    if host.dtype.kind != "f":
        raise TypeError(
            f"{label} must be an array of real floating values, got {type(value).__name__} of dtype {host.dtype}"
        )
    return host


def _single_axis(axis: Any, label: str) -> int:
    """An int, or a sequence holding one int (how some layers store their axis)."""
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        if len(axis) != 1:
            raise ValueError(f"{label} must be one channel axis, got {axis!r}: the modules normalize over one axis")
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{label} must be an int, got {type(axis).__name__} {axis!r}")
    return int(axis)


def _from_arrays(
    cls: type[_BatchNorm],
    arrays: Mapping[str, tuple[str, Any]],
    *,
    eps: float,
    momentum: float,
    axis: int,
    xp: Any,
) -> _BatchNorm:
    """Build ``cls`` from the source's arrays: our key -> (the source's name, array or None if absent).

    ``running_mean`` and ``running_var`` must be present. Absent ``weight`` / ``bias`` are
    filled with 1 / 0; both absent gives a module without affine parameters.
    """
    import numpy as np

    for key in ("running_mean", "running_var"):
        label, value = arrays[key]
        if value is None:
            raise TypeError(f"{label} must be an array of real floating values, got None")
    present = {key: (label, _as_array(value, label)) for key, (label, value) in arrays.items() if value is not None}
    for label, value in present.values():
        if len(value.shape) != 1:
            raise ValueError(f"{label} must be a vector, one value per channel, got shape {tuple(value.shape)}")
    sizes = {int(value.shape[0]) for _, value in present.values()}
    if len(sizes) != 1:
        shapes = ", ".join(f"{label} {tuple(value.shape)}" for label, value in present.values())
        raise ValueError(f"the parameters disagree on the number of channels: {shapes}")
    num_features = sizes.pop()
    first = next(value for _, value in present.values())
    dtype = "float64" if _dtype_name(first) == "float64" else "float32"
    device_: Any = None
    if xp is None:  # the library (and device) of the source's arrays; NumPy for any other library
        xp = namespace_of(first, "source arrays")
        device_ = device(first)
    affine = "weight" in present or "bias" in present
    state = {key: value for key, (_, value) in present.items()}
    if affine:
        state.setdefault("weight", np.ones(num_features, dtype=dtype))
        state.setdefault("bias", np.zeros(num_features, dtype=dtype))
    module = cls(num_features, eps, momentum, affine, axis=axis, xp=xp, device=device_, dtype=dtype, unbiased=False)
    module.load_state_dict(state)
    return module


def _check_exportable(module: _BatchNorm, framework: str) -> None:
    """What a Keras layer or Flax variables cannot express, before anything is built."""
    if module.momentum is None:
        raise ValueError(
            f"{type(module).__name__}(momentum=None) keeps a cumulative average, which {framework} does not have; "
            "set bn.momentum to a number first"
        )
    if not module.track_running_stats:
        raise ValueError(
            f"{type(module).__name__}(track_running_stats=False) has no running statistics, which {framework} "
            "needs for evaluation"
        )


def _flax_value(variable: Any) -> Any:
    """The array of an nnx variable (``get_value()`` in current Flax, ``.value`` in older)."""
    if variable is None:
        return None
    getter = getattr(variable, "get_value", None)
    return getter() if callable(getter) else variable.value


def _onnx_constants(onnx: ModuleType, graph: Any) -> dict[str, Any]:
    """Tensors of the graph's initializers and Constant nodes by name, not yet decoded."""
    constants: dict[str, Any] = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = onnx.helper.get_attribute_value(attribute)
    return constants


def _module_class(cls: type) -> type[_BatchNorm]:
    """The class a converter is called on: a subclass of ``_BatchNorm`` (for type checkers)."""
    return cast("type[_BatchNorm]", cls)


def _onnx_label(node: Any) -> str:
    return repr(node.name) if node.name else f"(unnamed, output {node.output[0]!r})"


class ConvertersMixin:
    """Conversions to and from Keras 3, Flax and ONNX batch normalization, mixed into the modules."""

    # ------------------------------------------------------------------------------ Keras
    @classmethod
    def from_keras(cls, layer: Any, *, xp: Any = None) -> Self:
        """A module that reproduces a built ``keras.layers.BatchNormalization`` layer.

        The module takes over ``gamma``, ``beta``, ``moving_mean`` and
        ``moving_variance``, Keras's ``epsilon`` and ``axis``, the momentum as
        ``1 - layer.momentum``, and ``unbiased=False`` (Keras updates its
        moving variance with the biased batch variance), so evaluation and
        continued training give what the layer gives. Keras layers have no
        rank: the class this is called on says which inputs the module takes
        (``BatchNorm2d.from_keras`` for a layer after a 2D convolution). A layer
        with ``scale=False`` gets weight 1, one with ``center=False`` bias 0
        (both trainable here: leave them out of the optimizer to keep them
        fixed); with neither, the module has ``affine=False``. The module is
        in training mode, as a new module is: call :meth:`eval` for inference.

        Parameters
        ----------
        layer : keras.layers.BatchNormalization
            A built layer (called once, or ``layer.build(input_shape)``), of any
            Keras backend.
        xp : array library, optional
            Library of the module's arrays. None: the library of the layer's
            variables (PyTorch with Keras's torch backend, JAX with its jax
            backend; NumPy for TensorFlow). The dtype is float64 for a float64
            layer, else float32.

        Returns
        -------
        same type as the class
            A new module with ``eps``, ``momentum``, ``axis`` and
            ``unbiased=False`` set as described.

        Raises
        ------
        ImportError
            Keras is not installed (``pip install 'portable_bn[keras]'``).
        TypeError
            ``layer`` is not a Keras ``BatchNormalization`` layer.
        ValueError
            The layer is not built, uses batch renormalization (``renorm=True``,
            whose training has no counterpart here), or was built for inputs of
            a rank that the class does not take.

        Examples
        --------
        >>> import keras
        >>> import portable_bn as pbn
        >>> layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
        >>> layer.build((None, 8, 8, 3))      # channels-last images with 3 channels
        >>> bn = pbn.BatchNorm2d.from_keras(layer)
        >>> bn.num_features, bn.axis, bn.eps, round(bn.momentum, 12), bn.unbiased
        (3, -1, 0.001, 0.1, False)
        """
        keras = _import("keras", "keras", f"{cls.__name__}.from_keras")
        if not isinstance(layer, keras.layers.BatchNormalization):
            raise TypeError(f"layer must be a keras.layers.BatchNormalization layer, got {type(layer).__name__}")
        if not layer.built or getattr(layer, "moving_mean", None) is None:
            raise ValueError(
                "layer is not built, so its number of channels is unknown: call it on an input or "
                "layer.build(input_shape) first"
            )
        if getattr(layer, "renorm", False):
            raise ValueError(
                "layer uses batch renormalization (renorm=True), whose training cannot be reproduced; "
                "its inference equals that of renorm=False"
            )
        axis = _single_axis(layer.axis, "layer.axis")
        ndim = getattr(getattr(layer, "input_spec", None), "ndim", None)
        if isinstance(ndim, int) and ndim not in _module_class(cls)._ranks:
            ranks = " or ".join(f"{rank}D" for rank in _module_class(cls)._ranks)
            raise ValueError(
                f"layer was built for {ndim}D inputs but {cls.__name__} takes {ranks} inputs; "
                "call from_keras on the class of that rank"
            )

        def value(variable: Any) -> Any:
            return None if variable is None else getattr(variable, "value", variable)

        arrays = {
            "weight": ("layer.gamma", value(getattr(layer, "gamma", None))),
            "bias": ("layer.beta", value(getattr(layer, "beta", None))),
            "running_mean": ("layer.moving_mean", value(layer.moving_mean)),
            "running_var": ("layer.moving_variance", value(layer.moving_variance)),
        }
        momentum = 1.0 - _validate.real_number(layer.momentum, "layer.momentum")
        eps = _validate.real_number(layer.epsilon, "layer.epsilon")
        return cast("Self", _from_arrays(_module_class(cls), arrays, eps=eps, momentum=momentum, axis=axis, xp=xp))

    def to_keras(self, *, ndim: int | None = None) -> Any:
        """A built ``keras.layers.BatchNormalization`` layer holding this module's state.

        The layer has ``axis=bn.axis``, ``momentum=1 - bn.momentum``,
        ``epsilon=bn.eps``, ``center`` and ``scale`` equal to ``bn.affine``,
        the module's parameter dtype, and ``gamma``, ``beta``,
        ``moving_mean``, ``moving_variance`` copied from the module (Keras's
        initial values if the module has no arrays yet). It evaluates as the
        module does. Keras continues training with the biased batch variance
        whatever ``bn.unbiased`` says, and has no ``skip_nonfinite``,
        ``virtual_batch_size`` or ``sync``; ``num_batches_tracked`` is not
        kept. The module is left unchanged.

        Parameters
        ----------
        ndim : int, optional
            Rank of the inputs the layer will take (Keras fixes it when the
            layer is built): one of the ranks of the class. None: the lowest
            (2 for BatchNorm1d, 4 for BatchNorm2d, 5 for BatchNorm3d).

        Returns
        -------
        keras.layers.BatchNormalization
            A new, built layer of the current Keras backend.

        Raises
        ------
        ImportError
            Keras is not installed (``pip install 'portable_bn[keras]'``).
        TypeError
            ``ndim`` is not an int.
        ValueError
            ``momentum`` is None (Keras has no cumulative average), the module
            does not track running statistics, or ``ndim`` is not a rank of
            the class or does not hold ``axis``.

        Examples
        --------
        >>> import keras
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(3, momentum=0.25, xp=np)
        >>> layer = bn.to_keras()
        >>> layer.momentum, layer.epsilon, layer.axis, layer.center
        (0.75, 1e-05, 1, True)
        >>> pbn.BatchNorm1d.from_keras(layer, xp=np).running_var
        array([1., 1., 1.], dtype=float32)
        """
        bn = cast("_BatchNorm", self)
        name = type(bn).__name__
        keras = _import("keras", "keras", f"{name}.to_keras")
        _check_exportable(bn, "Keras")
        if ndim is None:
            ndim = min(bn._ranks)
        elif isinstance(ndim, bool) or not isinstance(ndim, numbers.Integral):
            raise TypeError(f"ndim must be an int or None, got {type(ndim).__name__} {ndim!r}")
        ndim = int(ndim)
        if ndim not in bn._ranks:
            ranks = " or ".join(str(rank) for rank in bn._ranks)
            raise ValueError(f"ndim must be {ranks} for {name}, got {ndim}")
        if not -ndim <= bn.axis < ndim:
            raise ValueError(f"axis {bn.axis} of {name} does not exist in {ndim}D inputs (ndim={ndim})")
        state = bn.state_dict()
        dtype = _dtype_name(state["running_mean"]) if state else None
        assert bn.momentum is not None  # _check_exportable
        layer = keras.layers.BatchNormalization(
            axis=bn.axis,
            momentum=1.0 - bn.momentum,
            epsilon=bn.eps,
            center=bn.affine,
            scale=bn.affine,
            dtype=dtype,
        )
        shape: list[int | None] = [None] * ndim
        shape[bn.axis] = bn.num_features
        layer.build(tuple(shape))
        targets = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
        for key, attribute in targets.items():
            if key in state:
                getattr(layer, attribute).assign(to_numpy(state[key]))
        return layer

    # ------------------------------------------------------------------------------- Flax
    @classmethod
    def from_flax(
        cls,
        variables: Any,
        *,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        axis: Any = -1,
        xp: Any = None,
    ) -> Self:
        """A module that reproduces a Flax batch norm layer.

        Takes the layer's variables in ``flax.linen`` form, ``{"params":
        {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` with arrays of
        any library (the dict carries no hyperparameters: give Flax's
        ``momentum``, ``epsilon`` and ``axis`` as keywords), or a
        ``flax.nnx.BatchNorm``, whose own momentum, epsilon and axis are
        used. The momentum becomes ``1 - momentum`` and ``unbiased=False``
        (Flax updates its running variance with the biased batch variance),
        so evaluation and continued training give what Flax gives. Without
        ``scale`` the weight is 1, without ``bias`` the bias is 0 (trainable
        here); without both (no ``"params"``) the module has
        ``affine=False``. The module is in training mode, as a new module is.

        Parameters
        ----------
        variables : mapping or flax.nnx.BatchNorm
            One layer's variables (of a whole linen model: ``{"params":
            v["params"]["BatchNorm_0"], "batch_stats":
            v["batch_stats"]["BatchNorm_0"]}``), or an nnx layer.
        momentum : float, keyword-only
            Flax's momentum (the weight of the old value) for a mapping.
        epsilon : float, keyword-only
            Flax's epsilon for a mapping.
        axis : int, keyword-only
            Flax's channel axis for a mapping (-1: channels-last); a sequence
            of one int is taken too.
        xp : array library, optional
            Library of the module's arrays. None: the library of the given
            arrays when it is a supported one (JAX for Flax's own arrays),
            else NumPy. The dtype is float64 for float64 arrays, else float32.

        Returns
        -------
        same type as the class
            A new module with ``eps``, ``momentum``, ``axis`` and
            ``unbiased=False`` set as described.

        Raises
        ------
        TypeError
            ``variables`` is neither a mapping nor an ``nnx.BatchNorm``, or an
            entry is not an array of real floating values.
        ValueError
            Keys are missing or unexpected, the arrays disagree on the
            number of channels, or ``momentum``, ``epsilon`` or ``axis`` are
            passed with an ``nnx.BatchNorm``.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> variables = {"params": {"scale": np.full(3, 2.0, np.float32), "bias": np.zeros(3, np.float32)},
        ...              "batch_stats": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}}
        >>> bn = pbn.BatchNorm1d.from_flax(variables, momentum=0.9)
        >>> bn.axis, round(bn.momentum, 12), bn.unbiased, bn.weight
        (-1, 0.1, False, array([2., 2., 2.], dtype=float32))

        An ``nnx.BatchNorm`` carries its own settings:

        >>> from flax import nnx
        >>> layer = nnx.BatchNorm(3, momentum=0.8, epsilon=1e-3, rngs=nnx.Rngs(0))
        >>> bn = pbn.BatchNorm1d.from_flax(layer)
        >>> round(bn.momentum, 12), bn.eps, type(bn.weight).__module__.split(".")[0]
        (0.2, 0.001, 'jaxlib')
        """
        if isinstance(variables, Mapping):
            m = _validate.real_number(momentum, "momentum")
            eps = _validate.real_number(epsilon, "epsilon")
            channel_axis = _single_axis(axis, "axis")
            arrays = _linen_arrays(variables)
        else:
            try:
                nnx = importlib.import_module("flax.nnx")
            except ImportError:
                nnx = None
            if nnx is None or not isinstance(variables, nnx.BatchNorm):
                raise TypeError(
                    'variables must be a mapping {"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}} '
                    f"or a flax.nnx.BatchNorm, got {type(variables).__name__}"
                    + ("" if nnx is not None else " (Flax is not installed: pip install 'portable_bn[flax]')")
                )
            given = {"momentum": momentum, "epsilon": epsilon, "axis": axis}
            passed = [key for key, value in given.items() if value != _FLAX_DEFAULTS[key]]
            if passed:
                raise ValueError(
                    f"{', '.join(passed)} {'is' if len(passed) == 1 else 'are'} read from the nnx.BatchNorm; "
                    "pass them only with a mapping of variables"
                )
            m = _validate.real_number(variables.momentum, "variables.momentum")
            eps = _validate.real_number(variables.epsilon, "variables.epsilon")
            channel_axis = _single_axis(variables.axis, "variables.axis")
            arrays = {
                "weight": ("variables.scale", _flax_value(getattr(variables, "scale", None))),
                "bias": ("variables.bias", _flax_value(getattr(variables, "bias", None))),
                "running_mean": ("variables.mean", _flax_value(variables.mean)),
                "running_var": ("variables.var", _flax_value(variables.var)),
            }
        return cast(
            "Self", _from_arrays(_module_class(cls), arrays, eps=eps, momentum=1.0 - m, axis=channel_axis, xp=xp)
        )

    def to_flax(self) -> dict[str, dict[str, Any]]:
        """This module's state as ``flax.linen`` BatchNorm variables.

        Returns ``{"params": {"scale": weight, "bias": bias}, "batch_stats":
        {"mean": running_mean, "var": running_var}}`` (no ``"params"`` for a
        module without affine parameters), the arrays in the module's own
        library as :meth:`state_dict` gives them: JAX and NumPy arrays plug
        into ``flax.linen.BatchNorm(...).apply`` as they are; convert others
        with ``jax.numpy.asarray``. The dict holds no hyperparameters: create
        the Flax layer with ``momentum=1 - bn.momentum``, ``epsilon=bn.eps``
        and ``axis=bn.axis``. Flax continues training with the biased batch
        variance whatever ``bn.unbiased`` says.

        Returns
        -------
        dict
            The variables, ready for ``flax.linen.BatchNorm.apply``.

        Raises
        ------
        ValueError
            ``momentum`` is None (Flax has no cumulative average), the module
            does not track running statistics, or it has no arrays yet.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, momentum=0.25, xp=np)
        >>> variables = bn.to_flax()
        >>> variables["batch_stats"]
        {'mean': array([0., 0.], dtype=float32), 'var': array([1., 1.], dtype=float32)}
        >>> bn2 = pbn.BatchNorm1d.from_flax(variables, momentum=1 - bn.momentum, epsilon=bn.eps, axis=bn.axis)
        >>> bn2.momentum, sorted(variables)
        (0.25, ['batch_stats', 'params'])
        """
        bn = cast("_BatchNorm", self)
        _check_exportable(bn, "Flax")
        state = bn.state_dict()
        if not state:
            raise ValueError(
                f"{type(bn).__name__} has no arrays yet: construct it with xp= or call it once before to_flax()"
            )
        variables: dict[str, dict[str, Any]] = {}
        if bn.affine:
            variables["params"] = {"scale": state["weight"], "bias": state["bias"]}
        variables["batch_stats"] = {"mean": state["running_mean"], "var": state["running_var"]}
        return variables

    # ------------------------------------------------------------------------------- ONNX
    @classmethod
    def from_onnx(cls, model: Any, node: str | None = None, *, xp: Any = None) -> Self:
        """A module that reproduces a ``BatchNormalization`` node of an ONNX model.

        Reads the node's ``epsilon`` (default 1e-5) and ``momentum`` (default
        0.9; the module's momentum is ``1 - momentum``) and its ``scale``,
        ``B``, ``input_mean`` and ``input_var`` from the graph's initializers
        or Constant nodes. Sets ``unbiased=False`` (ONNX's training mode
        updates the running variance with the biased batch variance) and the
        channel axis 1. Models of every opset load, including old ones whose
        parameters are also graph inputs and whose nodes have ``is_test`` or
        ``spatial`` (``spatial=0`` only with per-channel parameters). The
        module is in training mode, as a new module is: call :meth:`eval` for
        inference.

        Parameters
        ----------
        model : onnx.ModelProto
            The model (``onnx.load(path)``).
        node : str, optional
            Name of the BatchNormalization node (for an unnamed node: the name
            of its output). None: the model's only one.
        xp : array library, optional
            Library of the module's arrays. None: NumPy. The dtype is float64
            for a double model, else float32.

        Returns
        -------
        same type as the class
            A new module with ``eps``, ``momentum``, ``axis=1`` and
            ``unbiased=False`` set as described.

        Raises
        ------
        ImportError
            onnx is not installed (``pip install 'portable_bn[onnx]'``).
        TypeError
            ``model`` is not an ``onnx.ModelProto`` or ``node`` not a str.
        ValueError
            The graph has no BatchNormalization node, several and no ``node``
            (the message lists them), none of that name, or a parameter that
            is not a constant of the graph.

        Examples
        --------
        >>> import onnx
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> from onnx import TensorProto, helper, numpy_helper
        >>> params = {"scale": np.full(2, 3.0, np.float32), "B": np.zeros(2, np.float32),
        ...           "mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}
        >>> graph = helper.make_graph(
        ...     [helper.make_node("BatchNormalization", ["x", *params], ["y"], name="bn1", epsilon=1e-3)],
        ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 5])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 5])],
        ...     initializer=[numpy_helper.from_array(value, name) for name, value in params.items()])
        >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        >>> bn = pbn.BatchNorm1d.from_onnx(model)
        >>> bn.weight, round(bn.eps, 9), round(bn.momentum, 12), bn.axis
        (array([3., 3.], dtype=float32), 0.001, 0.1, 1)
        """
        onnx = _import("onnx", "onnx", f"{cls.__name__}.from_onnx")
        from onnx import numpy_helper

        if not isinstance(model, onnx.ModelProto):
            raise TypeError(f"model must be an onnx.ModelProto (onnx.load(path)), got {type(model).__name__}")
        if node is not None and not isinstance(node, str):
            raise TypeError(f"node must be a node name (str) or None, got {type(node).__name__} {node!r}")
        graph = model.graph
        nodes = [n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]
        if not nodes:
            raise ValueError("model has no BatchNormalization node")
        labels = ", ".join(_onnx_label(n) for n in nodes)
        if node is None:
            if len(nodes) > 1:
                raise ValueError(f"model has {len(nodes)} BatchNormalization nodes; choose one with node=: {labels}")
            chosen = nodes[0]
        else:
            matches = [n for n in nodes if n.name == node] or [
                n for n in nodes if not n.name and n.output and n.output[0] == node
            ]
            if not matches:
                raise ValueError(
                    f"model has no BatchNormalization node {node!r}; its BatchNormalization nodes: {labels}"
                )
            if len(matches) > 1:
                raise ValueError(f"model has {len(matches)} BatchNormalization nodes named {node!r}")
            chosen = matches[0]
        label = f"node {_onnx_label(chosen)}"
        if len(chosen.input) < 5:
            raise ValueError(f"{label} has {len(chosen.input)} inputs; BatchNormalization takes 5")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in chosen.attribute}
        eps = _validate.real_number(attributes.get("epsilon", 1e-5), f"{label}'s epsilon")
        momentum = 1.0 - _validate.real_number(attributes.get("momentum", 0.9), f"{label}'s momentum")
        constants = _onnx_constants(onnx, graph)
        graph_inputs = {value.name for value in graph.input}
        arrays: dict[str, tuple[str, Any]] = {}
        for key, index, input_name in (
            ("weight", 1, "scale"),
            ("bias", 2, "B"),
            ("running_mean", 3, "input_mean"),
            ("running_var", 4, "input_var"),
        ):
            tensor_name = chosen.input[index]
            where = f"{label}'s {input_name} {tensor_name!r}"
            if tensor_name not in constants:
                why = "a graph input without initializer" if tensor_name in graph_inputs else "not a constant"
                raise ValueError(f"{where} is {why}: only constant parameters can be loaded")
            value = numpy_helper.to_array(constants[tensor_name])
            if attributes.get("spatial", 1) == 0 and value.ndim != 1:
                raise ValueError(
                    f"{label} uses per-activation statistics (spatial=0) of shape {value.shape}; "
                    "the modules keep one statistic per channel"
                )
            arrays[key] = (where, value)
        return cast("Self", _from_arrays(_module_class(cls), arrays, eps=eps, momentum=momentum, axis=1, xp=xp))


def _linen_arrays(variables: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Our keys -> (name, array) from linen-style variables, checking the keys."""
    unexpected = sorted(str(key) for key in variables if key not in ("params", "batch_stats"))
    if unexpected:
        raise ValueError(f'variables has unexpected keys {unexpected}; expected "params" (optional) and "batch_stats"')
    if "batch_stats" not in variables:
        raise ValueError('variables must hold "batch_stats": {"mean", "var"} (Flax keeps them for evaluation)')
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    for name, group, allowed in (("params", params, ("scale", "bias")), ("batch_stats", stats, ("mean", "var"))):
        if not isinstance(group, Mapping):
            raise TypeError(f"variables[{name!r}] must be a mapping, got {type(group).__name__}")
        extra = sorted(str(key) for key in group if key not in allowed)
        if extra:
            raise ValueError(
                f"variables[{name!r}] has unexpected keys {extra}; expected {list(allowed)} "
                "(pass one BatchNorm layer's variables, e.g. variables[...]['BatchNorm_0'])"
            )
    missing = [key for key in ("mean", "var") if key not in stats]
    if missing:
        raise ValueError(f"variables['batch_stats'] is missing {missing}")
    return {
        "weight": ("variables['params']['scale']", params.get("scale")),
        "bias": ("variables['params']['bias']", params.get("bias")),
        "running_mean": ("variables['batch_stats']['mean']", stats["mean"]),
        "running_var": ("variables['batch_stats']['var']", stats["var"]),
    }
