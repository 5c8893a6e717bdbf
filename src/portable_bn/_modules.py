"""Stateful modules mirroring ``torch.nn.BatchNorm1d/2d/3d``.

A module holds its state in plain attributes and *rebinds* them after each
successful call -- it never writes into an array -- so JAX arrays and
read-only NumPy arrays work, and a call that raises changes nothing.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

from . import _agnostic, _validate
from ._compat import (
    as_parameter,
    convert_array,
    default_integer_dtype,
    describe_namespace,
    detach,
    device,
    namespace_of,
    resolve_namespace,
)
from ._convert import ConvertersMixin
from ._functional import batch_norm_backward, forward

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "IncompatibleKeys"]

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class IncompatibleKeys(NamedTuple):
    """What :meth:`~BatchNorm2d.load_state_dict` returns (PyTorch's names).

    Parameters
    ----------
    missing_keys : list of str
        Expected keys absent from the state dict (``num_batches_tracked`` is never listed).
    unexpected_keys : list of str
        Keys the module does not have.

    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm1d(2, xp=np)
    >>> bn.load_state_dict({"weight": np.ones(2), "extra": np.ones(2)}, strict=False)
    IncompatibleKeys(missing_keys=['bias', 'running_mean', 'running_var'], unexpected_keys=['extra'])
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


class _SavedForward(NamedTuple):
    """What :meth:`_BatchNorm.backward` needs from the last call."""

    x: Any
    weight: Any
    mean: Any
    invstd: Any
    batch_statistics: bool
    mask: Any
    virtual_batch_size: int | None
    sync: Any


class _Placement(NamedTuple):
    xp: ModuleType
    device: Any
    dtype: Any


class _BatchNorm(ConvertersMixin):
    """Shared implementation of BatchNorm1d/2d/3d (see :class:`BatchNorm2d`)."""

    _ranks: ClassVar[tuple[int, ...]] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        xp: Any = None,
        device: Any = None,
        dtype: Any = None,
        skip_nonfinite: bool = False,
        unbiased: bool = True,
        virtual_batch_size: int | None = None,
        sync: Any = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        eps_value = _validate.real_number(eps, "eps")
        if eps_value < 0:
            raise ValueError(f"eps must be >= 0, got {eps_value}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
        self.num_features: int = int(num_features)
        self.eps: float = eps_value
        self.momentum: float | None = None if momentum is None else _validate.real_number(momentum, "momentum")
        self.affine: bool = _validate.flag(affine, "affine")
        self.track_running_stats: bool = _validate.flag(track_running_stats, "track_running_stats")
        self.axis: int = int(axis)
        self.skip_nonfinite: bool = _validate.flag(skip_nonfinite, "skip_nonfinite")
        self.unbiased: bool = _validate.flag(unbiased, "unbiased")
        self.virtual_batch_size: int | None
        self.sync: Any
        self.virtual_batch_size, self.sync = _validate.ghost_and_sync(virtual_batch_size, sync)
        self.training: bool = True
        self.frozen: bool = False
        self.weight: Any = None
        self.bias: Any = None
        self.running_mean: Any = None
        self.running_var: Any = None
        self.num_batches_tracked: Any = None
        self._dtype_request: Any = dtype
        self._placement: _Placement | None = None
        self.weight_grad: Any = None
        self.bias_grad: Any = None
        self._saved: _SavedForward | None = None
        if xp is not None:
            namespace = resolve_namespace(xp)
            placement = _Placement(namespace, device, _resolve_dtype(namespace, dtype, default=namespace.float32))
            self._bind(placement, self._fresh_state(placement))
        elif device is not None:
            raise ValueError("device needs xp: the library is otherwise only known at the first call")

    # ----------------------------------------------------------------- state
    @property
    def xp(self) -> ModuleType | None:
        """The array namespace of the parameters (None until created).

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2)
        >>> bn.xp is None
        True
        >>> _ = bn(np.ones((3, 2)))
        >>> bn.xp.__name__
        'array_api_compat.numpy'
        """
        return None if self._placement is None else self._placement.xp

    def _fresh_state(self, placement: _Placement) -> dict[str, Any]:
        """Initial parameters and buffers (weight 1, bias 0, mean 0, var 1, count 0)."""
        xp, dev, dtype = placement
        shape = (self.num_features,)
        state: dict[str, Any] = {}
        try:
            if self.affine:
                state["weight"] = as_parameter(xp, xp.ones(shape, dtype=dtype, device=dev))
                state["bias"] = as_parameter(xp, xp.zeros(shape, dtype=dtype, device=dev))
            if self.track_running_stats:
                state["running_mean"] = xp.zeros(shape, dtype=dtype, device=dev)
                state["running_var"] = xp.ones(shape, dtype=dtype, device=dev)
                state["num_batches_tracked"] = xp.asarray(0, dtype=default_integer_dtype(xp, dev), device=dev)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"cannot create parameters on device={dev!r}: {exc}") from None
        return state

    def _bind(self, placement: _Placement, state: Mapping[str, Any]) -> None:
        """Commit: the only place module state changes."""
        self._placement = placement
        for name, value in state.items():
            setattr(self, name, value)

    def _expected_keys(self) -> list[str]:
        keys = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, Any]:
        """Parameters and buffers under PyTorch's keys, in PyTorch's order.

        Returns
        -------
        dict
            ``weight``, ``bias`` (if affine), ``running_mean``, ``running_var``,
            ``num_batches_tracked`` (if tracking), skipping entries that are
            None; empty before the parameters exist. Values are detached from
            autograd. The module never writes into them.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np)
        >>> list(bn.state_dict())
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        """
        if self._placement is None:
            return {}
        xp = self._placement.xp
        return {key: detach(xp, getattr(self, key)) for key in _STATE if getattr(self, key) is not None}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, *, prefix: str = ""
    ) -> IncompatibleKeys:
        """Load parameters and buffers from arrays of any supported library.

        Values are copied into the module's library, device and dtype (DLPack
        where possible, else a host copy), so a PyTorch checkpoint runs in a
        NumPy, CuPy or JAX module. A module created with ``xp=None`` and no
        parameters yet adopts the library and device of the first array in
        ``state_dict`` (and its floating dtype, unless ``dtype`` was given).

        Parameters
        ----------
        state_dict : mapping
            Keys as in :meth:`state_dict`. A missing ``num_batches_tracked``
            is tolerated, as PyTorch does for old checkpoints.
        strict : bool
            If True, missing or unexpected keys raise ValueError.
        prefix : str, keyword-only
            Load this layer's entries out of a whole model's state dict: only
            keys that start with ``prefix`` (``"layer1.0.bn1."``) are read, with
            it removed; other keys are ignored. Missing and unexpected keys are
            reported with the prefix, as the model names them.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np)
        >>> bn.load_state_dict({"weight": [2.0, 3.0], "bias": [0.0, 1.0],
        ...                     "running_mean": [0.5, 0.5], "running_var": [4.0, 4.0]})
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> bn.weight
        array([2., 3.], dtype=float32)
        >>> model = {"conv.weight": np.ones((2, 1, 3)), "bn.weight": np.array([4.0, 5.0]),
        ...          "bn.bias": np.zeros(2), "bn.running_mean": np.zeros(2), "bn.running_var": np.ones(2)}
        >>> bn.load_state_dict(model, prefix="bn.")
        IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> bn.weight
        array([4., 5.], dtype=float32)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
        strict = _validate.flag(strict, "strict")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__} {prefix!r}")
        if prefix:
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        expected = self._expected_keys()
        missing = [key for key in expected if key not in state_dict and key != "num_batches_tracked"]
        unexpected = [key for key in state_dict if key not in expected]
        missing, unexpected = [prefix + key for key in missing], [prefix + key for key in unexpected]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict does not match {type(self).__name__}(affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}): missing keys {missing}, unexpected keys {unexpected}"
            )
        placement = self._placement or self._placement_from_state(state_dict, expected)
        state = {} if self._placement is not None else self._fresh_state(placement)
        for key in expected:
            if key in state_dict:
                state[key] = self._converted(key, state_dict[key], placement)
        self._bind(placement, state)
        return IncompatibleKeys(missing, unexpected)

    def _placement_from_state(self, state_dict: Mapping[str, Any], keys: list[str]) -> _Placement:
        import numpy as np

        xp: ModuleType | None = None
        dev: Any = None
        dtype: Any = None
        for key in keys:
            if key not in state_dict:
                continue
            value = state_dict[key]
            try:
                xp = namespace_of(value, key)
                dev = device(value)
            except TypeError:
                xp = namespace_of(np.asarray(value), key)
                value = xp.asarray(value)
            if key != "num_batches_tracked" and _validate.is_real_floating(xp, value.dtype):
                dtype = value.dtype
            break
        if xp is None:
            raise ValueError("state_dict holds no array to take the library from; construct the module with xp=")
        return _Placement(xp, dev, _resolve_dtype(xp, self._dtype_request, default=dtype or xp.float32))

    def _converted(self, key: str, value: Any, placement: _Placement, *, label: str = "state_dict[{key!r}]") -> Any:
        xp, dev, dtype = placement
        is_counter = key == "num_batches_tracked"
        target = default_integer_dtype(xp, dev) if is_counter else dtype
        name = label.format(key=key)
        try:
            out = convert_array(value, xp, dev, target)
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise TypeError(f"{name} cannot be converted to an array of {describe_namespace(xp)}: {exc}") from None
        shape = () if is_counter else (self.num_features,)
        if tuple(out.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(out.shape)}")
        return as_parameter(xp, out) if key in ("weight", "bias") else out

    def to(self, xp: Any = None, *, device: Any = None, dtype: Any = None) -> _BatchNorm:
        """Move the parameters and buffers to another library, device or dtype.

        As ``torch.nn.Module.to``: the module's arrays are rebound to copies
        (DLPack where possible, else a host copy) and the module is returned.
        Floating arrays take ``dtype``; ``num_batches_tracked`` stays an
        integer counter (the library's default integer dtype). Mode, eps,
        momentum, ``unbiased`` and ``frozen`` are kept; on PyTorch, weight and
        bias are leaf tensors that require grad. Values are copied exactly, so
        a round trip through another library gives back the same bits (a
        dtype change rounds, as ``astype`` does). The gradients of the last
        :meth:`backward` move too; what :meth:`backward` keeps of the last
        call does not, so call the module again before the next
        :meth:`backward`.

        Parameters
        ----------
        xp : array library, optional
            ``numpy``, ``torch``, ``cupy``, ``jax.numpy``, ``dask.array`` or
            ``array_api_strict``; None keeps the current library.
        device : device, keyword-only, optional
            A device of that library; None keeps the device within the same
            library, and otherwise takes the new library's default device
            (DLPack keeps a GPU array on its GPU).
        dtype : dtype or str, keyword-only, optional
            A real floating dtype of the target library (or its name); None
            keeps the current floating dtype.

        Returns
        -------
        same type as self
            The module itself, for chaining.

        Raises
        ------
        TypeError
            If ``xp`` is not an array library or ``dtype`` not one of its real
            floating dtypes.
        ValueError
            If ``device`` is given for a module whose library is not yet known.

        Examples
        --------
        >>> import numpy as np
        >>> import array_api_strict
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np)
        >>> _ = bn(np.array([[0.0, 1.0], [2.0, 5.0]], dtype=np.float32))
        >>> bn.to(array_api_strict).running_var
        Array([1.1, 1.7], dtype=array_api_strict.float32)
        >>> bn.to(np, dtype="float64").running_var.dtype
        dtype('float64')
        """
        target = None if xp is None else resolve_namespace(xp)
        if self._placement is None:
            if target is None:
                if device is not None:
                    raise ValueError("device needs xp: the library is otherwise only known at the first call")
                if dtype is not None:  # checked against the library at the first call, as the constructor's
                    self._dtype_request = dtype
                return self
            placement = _Placement(target, device, _resolve_dtype(target, dtype, default=target.float32))
            self._dtype_request = dtype
            self._bind(placement, self._fresh_state(placement))
            return self
        current = self._placement
        namespace = target or current.xp
        same_library = namespace is current.xp
        dev = device if device is not None or not same_library else current.device
        if dtype is None:
            dtype = _validate.floating_dtype_name(current.xp, current.dtype)
        placement = _Placement(namespace, dev, _resolve_dtype(namespace, dtype, default=None))
        label = f"{type(self).__name__}.{{key}}"
        state: dict[str, Any] = {
            key: self._converted(key, getattr(self, key), placement, label=label)
            for key in _STATE
            if getattr(self, key) is not None
        }
        for key in ("weight_grad", "bias_grad"):
            grad = getattr(self, key)
            if grad is not None:
                state[key] = detach(namespace, self._converted("weight", grad, placement, label=label))
        state["_saved"] = None
        self._bind(placement, state)
        return self

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0 (if tracking).

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np)
        >>> _ = bn(np.array([[0.0, 1.0], [2.0, 5.0]], dtype=np.float32))
        >>> bn.reset_running_stats(); bn.running_mean
        array([0., 0.], dtype=float32)
        """
        if self._placement is not None and self.track_running_stats:
            fresh = self._fresh_state(self._placement)
            self._bind(self._placement, {key: fresh[key] for key in _STATE[2:]})

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight to 1 and bias to 0.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np)
        >>> bn.weight = np.array([3.0, 4.0], dtype=np.float32)
        >>> bn.reset_parameters(); bn.weight
        array([1., 1.], dtype=float32)
        """
        if self._placement is not None:
            self._bind(self._placement, self._fresh_state(self._placement))

    # ------------------------------------------------------------------ mode
    def train(self, mode: bool = True) -> _BatchNorm:
        """Set training mode (batch statistics, running update).

        Parameters
        ----------
        mode : bool
            True for training, False for evaluation.

        Returns
        -------
        same type as self
            The module itself, for chaining.

        Examples
        --------
        >>> import portable_bn as pbn
        >>> pbn.BatchNorm2d(3).train(False).training
        False
        """
        self.training = _validate.flag(mode, "mode")
        return self

    def eval(self) -> _BatchNorm:
        """Set evaluation mode (running statistics); same as ``train(False)``.

        Returns
        -------
        same type as self
            The module itself, for chaining.

        Examples
        --------
        >>> import portable_bn as pbn
        >>> pbn.BatchNorm2d(3).eval().training
        False
        """
        return self.train(False)

    def freeze(self) -> _BatchNorm:
        """Freeze the statistics: normalize with the running statistics and update nothing.

        A frozen module behaves as in eval mode whatever :meth:`train` and
        :meth:`eval` say (they still set ``training``, for the layers around
        it): no batch statistics, no running update, no counter bump, no
        synchronization. Weight and bias still get gradients. This is
        torchvision's ``FrozenBatchNorm2d`` as a state of the ordinary module
        (its state dicts load with :meth:`load_state_dict`), the usual setting
        when fine-tuning with small batches.

        Returns
        -------
        same type as self
            The module itself, for chaining.

        Raises
        ------
        ValueError
            If the module keeps no running statistics
            (``track_running_stats=False``): there is nothing to normalize with.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np).freeze()
        >>> bn.frozen, bn.training
        (True, True)
        >>> bn(np.array([[3.0, 1.0], [5.0, 1.0]], dtype=np.float32))   # running mean 0, variance 1
        array([[2.999985, 0.999995],
               [4.999975, 0.999995]], dtype=float32)
        >>> int(bn.num_batches_tracked)
        0
        """
        if not self.track_running_stats:
            raise ValueError(
                f"{type(self).__name__}(track_running_stats=False) cannot be frozen: it keeps no running statistics"
            )
        self.frozen = True
        return self

    def unfreeze(self) -> _BatchNorm:
        """Undo :meth:`freeze`: ``training`` decides again.

        Returns
        -------
        same type as self
            The module itself, for chaining.

        Examples
        --------
        >>> import portable_bn as pbn
        >>> pbn.BatchNorm2d(3).freeze().unfreeze().frozen
        False
        """
        self.frozen = False
        return self

    # --------------------------------------------------------------- forward
    def __call__(self, x: Any, *, mask: Any = None) -> Any:
        xp = _validate.input_array(x)
        if x.ndim not in self._ranks:
            expected = " or ".join(f"{rank}D" for rank in self._ranks)
            raise ValueError(f"expected {expected} input (got {x.ndim}D input)")
        recipe = _validate.recipe_for(x, self.axis)
        if recipe.num_channels != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels along axis "
                f"{self.axis}, got input of shape {tuple(x.shape)}"
            )
        if self._placement is None:
            default = x.dtype if x.dtype in (xp.float32, xp.float64) else xp.float32
            placement = _Placement(xp, device(x), _resolve_dtype(xp, self._dtype_request, default=default))
            state = self._fresh_state(placement)
        else:
            placement = self._placement
            self._check_input_fits(xp, x, placement)
            state = {key: getattr(self, key) for key in _STATE}
        running_mean, running_var = state.get("running_mean"), state.get("running_var")
        counter = state.get("num_batches_tracked")

        # PyTorch's _BatchNorm.forward, with the counter bump deferred to the commit; each
        # virtual batch counts as one batch. A frozen module is in eval mode whatever training says.
        training = self.training and not self.frozen
        virtual = self.virtual_batch_size if training else None
        if virtual is not None:
            _validate.known_sizes(x, recipe)
        batches = 1 if virtual is None else len(_agnostic.ghost_groups(int(x.shape[0]), virtual))
        factor: Any = 0.0 if self.momentum is None else self.momentum
        factors: list[Any] | None = None
        updating = training and self.track_running_stats
        if updating and counter is not None:
            dtype = _agnostic.compute_dtype(xp, x.dtype)
            factors = []
            for _ in range(batches):
                counter = xp.asarray(counter + 1)  # asarray: NumPy turns 0-d arithmetic into a scalar
                factors.append(_agnostic.update_factor(xp, self.momentum, counter, dtype))
            factor = factors[0]
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        result = forward(
            xp,
            x,
            running_mean,
            running_var,
            state.get("weight"),
            state.get("bias"),
            training=use_batch_stats,
            factor=factor,
            eps=self.eps,
            axis=self.axis,
            skip_nonfinite=self.skip_nonfinite,
            unbiased=self.unbiased,
            mask=mask,
            virtual_batch_size=virtual,
            sync=self.sync if training else None,
            group_factors=factors if virtual is not None else None,
        )
        if updating:
            state.update(running_mean=result.running_mean, running_var=result.running_var, num_batches_tracked=counter)
        # Kept for backward(); detached, because that is the no-autograd route.
        weight = state.get("weight")
        state["_saved"] = _SavedForward(
            detach(xp, x),
            None if weight is None else detach(xp, weight),
            detach(xp, result.mean),
            detach(xp, result.invstd),
            use_batch_stats,
            None if mask is None else detach(xp, mask),
            virtual,
            self.sync if training else None,
        )
        self._bind(placement, state)
        return result.output

    def backward(self, grad_output: Any) -> Any:
        """Gradients of the last call, for libraries without autograd.

        Uses what the last call kept (its input, weight and statistics), so
        the parameters may be updated between the call and ``backward``.
        Stores the parameter gradients in ``weight_grad`` and ``bias_grad``
        (replacing earlier ones; affine modules only) and returns the gradient
        with respect to the input. Whether the batch statistics are
        differentiated follows the call: they are in training mode and in
        eval mode without running statistics.

        Parameters
        ----------
        grad_output : array
            Gradient of the loss with respect to the last call's output.

        Returns
        -------
        array
            Gradient with respect to the last call's input.

        Raises
        ------
        ValueError
            If the module has not been called yet, or ``grad_output`` does not
            have the shape of the last input.

        Examples
        --------
        >>> import numpy as np
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm1d(2, xp=np, dtype="float64")
        >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
        >>> y = bn(x)
        >>> grad_x = bn.backward(np.ones_like(y))    # d(sum(y))/dx
        >>> bool(np.allclose(grad_x, 0.0)), bn.bias_grad
        (True, array([3., 3.]))
        >>> bn.weight = bn.weight - 0.1 * bn.weight_grad   # one SGD step
        """
        saved = self._saved
        if saved is None:
            raise ValueError(f"{type(self).__name__}.backward needs a forward call first")
        grad_input, grad_weight, grad_bias = batch_norm_backward(
            grad_output,
            saved.x,
            saved.weight,
            saved.mean,
            saved.invstd,
            training=saved.batch_statistics,
            axis=self.axis,
            mask=saved.mask,
            virtual_batch_size=saved.virtual_batch_size,
            sync=saved.sync,
        )
        if self.affine:
            self.weight_grad, self.bias_grad = grad_weight, grad_bias
        return grad_input

    def to_onnx(self, *, training: bool = False, dynamic_batch: bool = True, shape: Any = None) -> Any:
        """Export to an ONNX model (``onnx.ModelProto``), which any ONNX runtime runs.

        Eval (``training=False``) exports ONNX's standard ``BatchNormalization``
        node, which runtimes optimize and fuse, with the running statistics and
        parameters as initializers named by their state-dict keys (``scale``
        and ``B`` of ones and zeros without affine); a channels-last module is
        transposed in and out. Training exports this module's own computation,
        traced on ``ndonnx`` arrays with a symbolic batch size: PyTorch's
        normalization and running update, the new running statistics as extra
        outputs. A module without running statistics exports the training
        computation in eval too (it normalizes with batch statistics), and a
        frozen module exports what it computes: its running statistics. The
        model has one input ``x`` and output ``y`` (then ``running_mean`` and
        ``running_var``); exporting leaves the module as it is.

        A training graph cannot raise: a batch with one value per channel, which
        the module refuses, gives the output of a zero variance and keeps the
        running statistics. A reducer (``sync=``) is not exported: the graph
        normalizes the batch it is given.

        Parameters
        ----------
        training : bool, keyword-only
            Export the training computation (batch statistics, running update).
        dynamic_batch : bool, keyword-only
            Leave the batch size symbolic (``"N"``); False fixes it to
            ``shape[0]``.
        shape : tuple of int or None, keyword-only
            The input's shape, None for a symbolic size; default: every size but
            the channels symbolic, with the class's lowest rank (2 for
            :class:`BatchNorm1d`, 4, 5).

        Returns
        -------
        onnx.ModelProto
            Checked by ``onnx.checker``.

        Raises
        ------
        ImportError
            Without onnx (and ndonnx for training): ``pip install 'portable_bn[onnx]'``.
        ValueError
            If the module has no parameters yet, or ``shape`` does not fit it.

        Examples
        --------
        >>> import numpy as np
        >>> import onnxruntime
        >>> import portable_bn as pbn
        >>> bn = pbn.BatchNorm2d(3, xp=np)
        >>> _ = bn(np.arange(96, dtype=np.float32).reshape(2, 3, 4, 4))
        >>> model = bn.eval().to_onnx()
        >>> [node.op_type for node in model.graph.node]
        ['BatchNormalization']
        >>> session = onnxruntime.InferenceSession(model.SerializeToString())
        >>> x = np.ones((5, 3, 4, 4), dtype=np.float32)
        >>> (y,) = session.run(None, {"x": x})
        >>> bool(np.allclose(y, bn(x), atol=1e-6))
        True
        """
        from ._onnx import export

        return export(self, training=training, dynamic_batch=dynamic_batch, shape=shape)

    def _check_input_fits(self, xp: ModuleType, x: Any, placement: _Placement) -> None:
        """Name the module, not one parameter, when the input does not fit it."""
        name = type(self).__name__
        if placement.xp is not xp:
            raise TypeError(
                f"{name} holds {describe_namespace(placement.xp)} arrays but x is a {describe_namespace(xp)} array; "
                "move the state with load_state_dict into a module of x's library"
            )
        if not _validate.parameter_dtype_fits(xp, placement.dtype, x.dtype):
            raise TypeError(
                f"{name} holds {placement.dtype} parameters, so x must have dtype "
                f"{_validate.allowed_parameter_dtypes(xp, placement.dtype)}"
                f"{' (or float16/bfloat16)' if placement.dtype == xp.float32 else ''}, got {x.dtype}"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats})"
        )


def _resolve_dtype(xp: ModuleType, dtype: Any, *, default: Any) -> Any:
    """A floating dtype of ``xp`` from a dtype object, a name, or the default."""
    if dtype is None:
        dtype = default
    if isinstance(dtype, str):
        resolved = getattr(xp, dtype, None)
        if resolved is None:
            raise TypeError(f"dtype {dtype!r} is not a dtype of {xp.__name__}")
        dtype = resolved
    if not _validate.is_real_floating(xp, dtype):
        raise TypeError(f"dtype must be a real floating dtype of {xp.__name__}, got {dtype!r}")
    return xp.empty((0,), dtype=dtype).dtype  # canonical object: np.float64 -> dtype('float64')


_PARAMETERS_DOC = """
    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance before the square root.
    momentum : float or None
        Weight of the new batch in the running update; None for a cumulative
        average (1 / num_batches_tracked).
    affine : bool
        Learnable ``weight`` (init 1) and ``bias`` (init 0).
    track_running_stats : bool
        Keep ``running_mean`` (init 0), ``running_var`` (init 1) and
        ``num_batches_tracked`` (init 0). Without them, batch statistics are
        used in training and eval alike.
    axis : int, keyword-only
        Channel axis: 1 (PyTorch's layout) or, e.g., -1 for channels-last.
    xp : array library, keyword-only
        ``numpy``, ``torch``, ``cupy``, ``jax.numpy``, ``dask.array``,
        ``array_api_strict`` or a compat namespace. If given, the parameters
        are created now on ``device`` with ``dtype`` (default float32). If
        None, they are created at the first call (or first
        :meth:`load_state_dict`) in the input's library, on its device, with
        ``dtype`` or else the input's dtype (float32 for float16/bfloat16 input).
    device : device, keyword-only
        Where to create the parameters (needs ``xp``).
    dtype : dtype or str, keyword-only
        Real floating dtype of the parameters and buffers.
    skip_nonfinite : bool, keyword-only
        If True, a training batch whose statistics are NaN or Inf in some
        channel leaves that channel's running statistics unchanged (other
        channels and ``num_batches_tracked`` update as usual), so one bad
        batch cannot poison the module for good. Default False: PyTorch's
        behaviour.
    unbiased : bool, keyword-only
        True (PyTorch): the running variance is updated with the unbiased
        batch variance. False: with the biased one, as Keras, Flax and ONNX
        keep it (with ``momentum=None``: the cumulative average of biased
        variances). An attribute that ``train()`` and ``eval()`` leave alone.
    virtual_batch_size : int or None, keyword-only
        Ghost batch norm: in training, consecutive groups of this many samples
        (axis 0) are normalized with their own statistics and update the
        running statistics one after another, each counting as one batch
        (also for ``momentum=None``); the last group holds what remains. Eval
        is unchanged.
    sync : reducer or None, keyword-only
        Synchronize the training statistics across replicas: a reducer of
        :mod:`portable_bn.distributed` (``TorchProcessGroup()``,
        ``JaxAxis(name)``). Eval uses the running statistics and no collective.

    Attributes
    ----------
    weight, bias : array or None
        Affine parameters (torch: leaf tensors that require grad).
    running_mean, running_var : array or None
        Running statistics; ``running_var`` is the unbiased estimate, as
        PyTorch (the biased one with ``unbiased=False``).
    unbiased : bool
        The running update's variance convention (see the parameter).
    num_batches_tracked : array or None
        0-d integer counter of training calls.
    training : bool
        True after :meth:`train`, False after :meth:`eval`.
    frozen : bool
        True after :meth:`freeze`: running statistics are used and kept as
        they are, whatever ``training`` says.

    Notes
    -----
    Calling the module follows ``torch.nn.modules.batchnorm._BatchNorm.forward``
    exactly. State is rebound, never written in place, and only after the call
    succeeded: a call that raises leaves every attribute as it was. Unlike
    PyTorch, an input whose channel count differs from ``num_features`` is
    always rejected, even when the module has no parameters.

    A call takes ``mask=`` (keyword-only), a boolean array of the input's shape
    without the channel axis, True where valid: batch statistics, the running
    update and :meth:`backward` then use the valid values only (see
    :func:`portable_bn.batch_norm`); with running statistics it changes
    nothing. :meth:`backward` uses the last call's mask, virtual batches and
    reducer.
"""


class BatchNorm1d(_BatchNorm):
    __doc__ = (
        """Batch normalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input,
    as ``torch.nn.BatchNorm1d``, on any array-API library.
    """
        + _PARAMETERS_DOC
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm1d(2)
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> bn(x).round(4)       # (x - mean) / sqrt(var + eps)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> bn.running_mean, bn.running_var
    (array([0.2, 2. ]), array([ 1.1, 20.9]))
    """
    )
    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = (
        """Batch normalization over a 4D ``(N, C, H, W)`` input, as
    ``torch.nn.BatchNorm2d``, on any array-API library.
    """
        + _PARAMETERS_DOC
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm2d(3, xp=np, dtype="float64")
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(8, 3, 4, 4))
    >>> y = bn(x)
    >>> bool(np.allclose(y.mean(axis=(0, 2, 3)), 0.0))
    True
    >>> int(bn.num_batches_tracked)
    1
    >>> y_eval = bn.eval()(x)   # now normalized with the running statistics
    """
    )
    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = (
        """Batch normalization over a 5D ``(N, C, D, H, W)`` input, as
    ``torch.nn.BatchNorm3d``, on any array-API library.
    """
        + _PARAMETERS_DOC
        + """
    Examples
    --------
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm3d(4, momentum=None, xp=np)
    >>> x = np.ones((2, 4, 3, 3, 3), dtype=np.float32)
    >>> bn(x).shape
    (2, 4, 3, 3, 3)
    >>> bn.running_mean          # cumulative average after one batch
    array([1., 1., 1., 1.], dtype=float32)
    """
    )
    _ranks = (5,)
