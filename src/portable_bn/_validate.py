"""Argument checks shared by the functions and the modules.

Every check looks at types, shapes, dtypes and devices only -- never at
values -- so it is free under ``jax.jit`` and never computes a Dask graph.
Messages name the argument, what was expected and what was got.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from types import ModuleType
from typing import Any

from ._compat import describe_namespace, device, devices_differ, has_int_shape, namespace_of, same_eager_place
from ._recipe import Recipe, make_recipe


def real_number(value: Any, name: str) -> float:
    """A finite real scalar as a Python float (never a NumPy scalar)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def epsilon(value: Any, *, training: bool) -> float:
    """eps > 0 in training (the batch variance can be 0), eps >= 0 in eval."""
    eps = real_number(value, "eps")
    if training and eps <= 0.0:
        raise ValueError(f"eps must be > 0 in training, got {eps}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


_real_floating: dict[tuple[ModuleType, Any], bool] = {}
"""Answers of ``xp.isdtype(dtype, "real floating")`` by (namespace, dtype): a
dictionary lookup instead of array-api-compat's checks (about 0.5 us less per
call for torch dtypes)."""


def is_real_floating(xp: ModuleType, dtype: Any) -> bool:
    if getattr(dtype, "kind", None) == "f":  # quick yes for NumPy dtypes (also JAX's, Dask's, CuPy's)
        return True
    key = (xp, dtype)
    try:
        return _real_floating[key]
    except (KeyError, TypeError):  # new, or an unhashable dtype
        pass
    try:
        answer = bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        answer = False
    with contextlib.suppress(TypeError):  # unhashable: not cached
        _real_floating[key] = answer
    return answer


FLOATING_NAMES = ("float16", "bfloat16", "float32", "float64")


def floating_dtype_name(xp: ModuleType, dtype: Any) -> str:
    """The name of one of ``xp``'s floating dtypes, to find the same dtype in another library."""
    for name in FLOATING_NAMES:
        own = getattr(xp, name, None)
        if own is not None and dtype == own:
            return name
    raise TypeError(f"dtype {dtype!r} has no counterpart in other libraries")


def input_array(x: Any, name: str = "x") -> ModuleType:
    """The input: an array of a supported library, real floating, rank >= 2,
    with a fully known shape. Returns its namespace."""
    xp = namespace_of(x, name)
    if not is_real_floating(xp, x.dtype):
        raise TypeError(
            f"{name} must have a real floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and channel), got shape {tuple(x.shape)}")
    if has_int_shape(x):
        return xp
    # None is a symbolic size (ndonnx's graph inputs): n is then computed in the graph.
    # NaN is Dask's unknown chunk size: learning it would take a compute, which we never start.
    unknown = [i for i, size in enumerate(x.shape) if isinstance(size, float) and math.isnan(size)]
    if unknown:
        raise ValueError(
            f"{name} has unknown size along axis {unknown} (shape {tuple(x.shape)}); batch norm needs every "
            "size to compute n. For Dask, call x.compute_chunk_sizes() first."
        )
    return xp


def recipe_for(x: Any, axis: Any) -> Recipe:
    """Validate the channel axis against ``x`` and return the cached recipe."""
    if type(axis) is not int:  # the common case skips the abstract-class check
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__} {axis!r}")
        axis = int(axis)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in [-{x.ndim}, {x.ndim}) for a {x.ndim}-D input, got {axis}")
    if has_int_shape(x):
        return make_recipe(tuple(x.shape), axis)
    shape = tuple(None if size is None else int(size) for size in x.shape)
    if shape[axis] is None:
        raise ValueError(
            f"x has a symbolic size along its channel axis {axis} (shape {shape}); the number of channels must be known"
        )
    return make_recipe(shape, axis)


def known_sizes(x: Any, recipe: Recipe) -> None:
    """What needs the sizes themselves (masks, virtual batches) refuses an input with symbolic ones."""
    if recipe.count_per_channel is None:
        raise ValueError(
            f"x has symbolic sizes (shape {tuple(x.shape)}); mask= and virtual_batch_size= need every size known"
        )


def same_library_and_device(xp: ModuleType, x: Any, value: Any, name: str, x_name: str = "x") -> None:
    other = namespace_of(value, name)
    if other is not xp:
        raise TypeError(
            f"{name} is a {describe_namespace(other)} array but {x_name} is a {describe_namespace(xp)} array; "
            "pass arrays of one library (convert with load_state_dict or the library's from_dlpack)"
        )
    if devices_differ(value, x):
        raise ValueError(f"{name} is on device {device(value)} but {x_name} is on device {device(x)}")


def per_channel(xp: ModuleType, x: Any, value: Any, name: str, recipe: Recipe) -> None:
    """A per-channel vector: same library and device as ``x``, shape (C,), real
    floating, with ``x``'s dtype -- or float32 for float16/bfloat16 ``x``
    (PyTorch's mixed-precision rule)."""
    if same_eager_place(x, value) and value.dtype == x.dtype and value.shape == (recipe.num_channels,):
        return  # the common NumPy/torch case: every check below passes (x is validated floating)
    same_library_and_device(xp, x, value, name)
    if not is_real_floating(xp, value.dtype):
        raise TypeError(f"{name} must have a real floating dtype, got {value.dtype}")
    if tuple(value.shape) != (recipe.num_channels,):
        raise ValueError(
            f"{name} must have shape ({recipe.num_channels},), one value per channel of x along axis "
            f"{recipe.channel_axis}, got shape {tuple(value.shape)}"
        )
    if not parameter_dtype_fits(xp, value.dtype, x.dtype):
        raise TypeError(f"{name} must have dtype {allowed_parameter_dtypes(xp, x.dtype)} to match x, got {value.dtype}")


def _is_half(xp: ModuleType, dtype: Any) -> bool:
    return bool(dtype != xp.float32 and dtype != xp.float64)


def parameter_dtype_fits(xp: ModuleType, param_dtype: Any, x_dtype: Any) -> bool:
    """Parameters have x's dtype, or float32 for float16/bfloat16 x (PyTorch's mixed rule)."""
    return bool(param_dtype == x_dtype or (_is_half(xp, x_dtype) and param_dtype == xp.float32))


def allowed_parameter_dtypes(xp: ModuleType, x_dtype: Any) -> str:
    return f"{x_dtype} or float32" if _is_half(xp, x_dtype) else f"{x_dtype}"


def mask_for(xp: ModuleType, x: Any, mask: Any, recipe: Recipe) -> None:
    """A boolean array of the library and device of ``x``, of ``x``'s shape without the channel
    axis (Keras's convention); True marks a valid position."""
    same_library_and_device(xp, x, mask, "mask")
    if mask.dtype != xp.bool:
        raise TypeError(f"mask must be a boolean array (True = valid), got dtype {mask.dtype}")
    expected = tuple(int(size) for i, size in enumerate(x.shape) if i != recipe.channel_axis)
    shape = tuple(int(size) if size is not None and size == size else size for size in mask.shape)
    if shape != expected:
        raise ValueError(
            f"mask must have the shape of x without its channel axis {recipe.channel_axis}, {expected}, got {shape}"
        )


def ghost_and_sync(virtual_batch_size: Any, sync: Any) -> tuple[int | None, Any]:
    """``virtual_batch_size`` (a positive int or None) and ``sync`` (a :func:`reducer` or None),
    not both: each replica's virtual batches would differ."""
    size = None
    if virtual_batch_size is not None:
        value = virtual_batch_size
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"virtual_batch_size must be a positive int or None, got {value!r}")
        size = int(value)
    if sync is not None:
        sync = reducer(sync)
        if size is not None:
            raise ValueError("virtual_batch_size and sync cannot be combined: each replica's groups would differ")
    return size, sync


def batch_axis_for_virtual_batches(recipe: Recipe) -> None:
    """Virtual batches split axis 0, which must not be the channel axis."""
    if recipe.channel_axis == 0:
        raise ValueError("virtual_batch_size splits the batch axis 0, which is the channel axis here (axis=0)")


def reducer(sync: Any) -> Any:
    """A reducer of :mod:`portable_bn.distributed` (``gather``, ``sum`` and ``size``)."""
    members = set(dir(type(sync))) | set(getattr(sync, "__dict__", ()))  # not evaluated: size may need the engine
    missing = [name for name in ("gather", "sum", "size") if name not in members]
    if missing:
        raise TypeError(
            "sync must be a reducer such as portable_bn.distributed.TorchProcessGroup() or JaxAxis(name) "
            f"(with gather, sum and size), got {type(sync).__name__} without {', '.join(missing)}"
        )
    return sync
