"""Everything that knows about particular array libraries lives here.

This is the only module that imports :mod:`array_api_compat`. The rest of the
package receives a namespace ``xp`` and writes plain array-API code; every
backend-specific line below says why it exists.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_cupy_array,
    is_dask_array,
    is_jax_namespace,
    is_numpy_array,
    is_torch_array,
    is_torch_namespace,
    to_device,
)

__all__ = [
    "array_namespace",
    "as_parameter",
    "convert_array",
    "default_integer_dtype",
    "is_jax_namespace",
    "is_torch_namespace",
    "describe_namespace",
    "detach",
    "device",
    "has_int_shape",
    "devices_differ",
    "namespace_of",
    "resolve_namespace",
    "same_eager_place",
    "to_numpy",
]

_NUMPY = "array_api_compat.numpy"


def describe_namespace(xp: ModuleType) -> str:
    """Short library name for messages: 'numpy', 'torch', 'jax', ..."""
    name = xp.__name__
    for prefix in ("array_api_compat.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return {"jax.numpy": "jax", "dask.array": "dask"}.get(name, name)


_namespace_by_type: dict[type, ModuleType] = {}
"""Types whose namespace depends on the type alone (NumPy arrays, torch tensors, CuPy
arrays), so a call skips array_namespace's checks (about 6 us per argument). Filled as
arrays are seen: no library is imported for it."""
_numpy_types: set[type] = set()
_torch_types: set[type] = set()
_cupy_types: set[type] = set()  # device checks without array-api-compat's device(): about 7 us per vector (H200)
_int_shape_types: set[type] = set()
"""The libraries' own array types (not subclasses such as torch's fake tensors,
whose sizes may be symbolic): their shapes are tuples of Python ints."""
_PLAIN_TYPES = {("numpy", "ndarray"), ("torch", "Tensor"), ("torch", "Parameter"), ("cupy", "ndarray")}
"""(top-level module, class name) of the types in ``_int_shape_types``."""


def namespace_of(value: Any, name: str) -> ModuleType:
    """Namespace of one argument, or a TypeError that names the argument."""
    known = _namespace_by_type.get(type(value))
    if known is not None:
        return known
    if not is_array_api_obj(value):
        raise TypeError(
            f"{name} must be an array of a supported library (NumPy, PyTorch, CuPy, "
            f"JAX, Dask, array-api-strict), got {type(value).__name__}"
        )
    namespace = array_namespace(value)
    kind = type(value)
    plain = (kind.__module__.partition(".")[0], kind.__name__) in _PLAIN_TYPES
    if is_torch_array(value):
        _namespace_by_type[kind] = namespace
        _torch_types.add(kind)
    elif is_cupy_array(value):
        _namespace_by_type[kind] = namespace
        _cupy_types.add(kind)
    elif plain and is_numpy_array(value):
        _namespace_by_type[kind] = namespace
        _numpy_types.add(kind)
    if plain:
        _int_shape_types.add(kind)
    return namespace


def has_int_shape(x: Any) -> bool:
    """True for arrays whose shape is known to be a tuple of Python ints (NumPy
    arrays, torch tensors and parameters, CuPy arrays), so shape checks and
    conversions can be skipped. False means "not known"."""
    return type(x) in _int_shape_types


def resolve_namespace(library: Any) -> ModuleType:
    """Turn ``numpy``, ``torch``, ``jax.numpy``, ``dask.array``, ``cupy``,
    ``array_api_strict`` or a compat namespace into the namespace we compute with.

    A tiny array made by the library's own ``asarray`` tells array-api-compat
    which wrapper applies, so every spelling of a library resolves alike.
    """
    make = getattr(library, "asarray", None)
    if not callable(make):
        raise TypeError(
            "xp must be an array library module such as numpy, torch, jax.numpy, "
            f"dask.array, cupy or array_api_strict, got {library!r}"
        )
    try:
        probe = make(0.0)
        return array_namespace(probe)
    except TypeError as exc:
        raise TypeError(f"xp={library!r} is not a supported array library: {exc}") from None


def devices_differ(a: Any, b: Any) -> bool:
    """True when two arrays are known to live on different devices.

    JAX tracers inside ``jax.jit`` report no device (array-api-compat returns
    None); placement is then JAX's business, so we do not call it a mismatch.
    """
    if type(a) in _numpy_types:  # NumPy has one device
        return False
    if type(a) in _torch_types and type(b) in _torch_types:  # skips array-api-compat's device()
        return bool(a.device != b.device)
    if type(a) in _cupy_types and type(b) in _cupy_types:  # CuPy: the GPU's number
        return bool(a.device.id != b.device.id)
    dev_a, dev_b = device(a), device(b)
    if dev_a is None or dev_b is None:
        return False
    return bool(dev_a != dev_b)


def same_eager_place(x: Any, value: Any) -> bool:
    """True when ``value`` is known, cheaply, to be an array of ``x``'s type on its
    device: both NumPy arrays, or both torch tensors (CuPy arrays) of one type on one
    device. False means "not known", and the caller runs the full checks."""
    kind = type(x)
    if type(value) is not kind:
        return False
    if kind in _numpy_types:
        return True
    if kind in _cupy_types:
        return bool(value.device.id == x.device.id)
    # torch: two CPU tensors share the one CPU device (is_cpu is cheaper than building devices)
    return kind in _torch_types and ((value.is_cpu and x.is_cpu) or bool(value.device == x.device))


def detach(xp: ModuleType, x: Any) -> Any:
    """Cut autograd history: running statistics must never require grad."""
    name = xp.__name__
    if name == _NUMPY:
        return x
    if name == "array_api_compat.torch":
        # torch: a running statistic computed from the batch would otherwise keep
        # the whole graph alive and make the next backward fail.
        return x.detach()
    if name == "jax.numpy":
        # jax: jax.grad must not differentiate through running statistics.
        import jax

        return jax.lax.stop_gradient(x)
    return x


def as_parameter(xp: ModuleType, x: Any) -> Any:
    """Make a trainable parameter: in torch a leaf that requires grad, as
    ``nn.Parameter`` would be, so ``loss.backward()`` reaches ``bn.weight``."""
    if is_torch_namespace(xp):
        return x.detach().requires_grad_(True)
    return x


def default_integer_dtype(xp: ModuleType, dev: Any) -> Any:
    """int64 where the library has it; JAX without x64 falls back to int32."""
    info = xp.__array_namespace_info__()
    try:
        return info.default_dtypes(device=dev)["integral"]
    except TypeError:  # some wrappers take no device argument
        return info.default_dtypes()["integral"]


def to_numpy(value: Any) -> Any:
    """Host NumPy copy of any supported array (also the fallback route of convert_array)."""
    import numpy as np

    if is_numpy_array(value):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch: CUDA, grad, bfloat16
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):  # cupy
        return value.get()
    if hasattr(value, "unwrap_numpy") and type(value).__module__.startswith("ndonnx"):
        # ndonnx: np.asarray would wrap the array in an object array; only arrays with values unwrap.
        return value.unwrap_numpy()
    if is_dask_array(value):
        # Loading a state dict is not a forward call; materializing a C-element
        # checkpoint array is the only way to hand it to another library.
        return np.asarray(value.compute())
    if is_array_api_obj(value):
        xp = array_namespace(value)
        if xp.__name__ == "array_api_strict":
            # array-api-strict refuses NumPy conversion off its CPU device.
            value = to_device(value, xp.__array_namespace_info__().default_device())
    return np.asarray(value)


def convert_array(value: Any, xp: ModuleType, dev: Any, dtype: Any) -> Any:
    """Copy ``value`` (an array of any supported library, or a Python/NumPy
    scalar) into library ``xp`` on device ``dev`` with ``dtype``.

    Same library: ``astype`` + ``to_device``. Other library: DLPack first (zero
    host round-trip, e.g. torch CUDA -> CuPy), then a NumPy host copy.
    Always returns a fresh array, never a view of the caller's data.
    """
    if is_array_api_obj(value) and array_namespace(value) is xp:
        out = detach(xp, value)
    else:
        source = value.detach() if hasattr(value, "detach") else value  # torch grad
        out = None
        if is_array_api_obj(source) and hasattr(xp, "from_dlpack") and not is_dask_array(source):
            try:
                out = xp.from_dlpack(source)
            except Exception:  # noqa: BLE001 - any DLPack refusal means: take the host route
                out = None
        if out is None:
            host = to_numpy(source)
            out = xp.asarray(host, dtype=dtype)
    out = xp.astype(out, dtype)
    if dev is not None and device(out) != dev:  # ndonnx has one device and refuses to_device
        out = to_device(out, dev)
    return xp.asarray(out, copy=True)
