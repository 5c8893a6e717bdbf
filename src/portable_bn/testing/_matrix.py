"""The backend table: how to put NumPy data on each (library, device, dtype) and get it back.

The conformance suite and ``python -m portable_bn check`` run exactly these combinations.
Importing this module imports no array library but NumPy: each is loaded when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._compat import to_numpy


@dataclass(frozen=True)
class DeviceSpec:
    """A device of a backend row: its label, and whether arrays there hold values."""

    label: str
    values: bool = True
    note: str = ""


@dataclass(frozen=True)
class Feature:
    """A library-specific capability and the test that proves it (``path::test_name``)."""

    what: str
    test: str


@dataclass(frozen=True)
class BackendSpec:
    """One row of the backend table: what the conformance suite runs for a backend name.

    Every combination of :attr:`devices` and :attr:`dtypes` runs every conformance scenario
    (values compared with the float64 reference; on a device without values, the library,
    device, dtype and shape of every result); :attr:`features` are what the library-specific
    tests prove on top, each naming a test that runs when this backend is selected, and
    :attr:`gradients` the ways to gradients that the suite checks there.
    """

    name: str
    library: str
    devices: tuple[DeviceSpec, ...]
    dtypes: tuple[str, ...]
    gpu: bool = False
    gradients: str = "batch_norm_backward, module.backward()"
    features: tuple[Feature, ...] = ()


_HALF = ("float16", "bfloat16", "float32", "float64")
_NO_BFLOAT = ("float16", "float32", "float64")
_TORCH_FEATURES = (
    Feature(
        "autograd through batch_norm and the modules",
        "tests/test_torch_oracle.py::test_module_autograd_over_steps_matches_torch",
    ),
    Feature(
        "PyTorch's own kernels behind the same functions",
        "tests/test_torch_native.py::test_native_path_equals_the_pure_primitives",
    ),
)
_JAX_FEATURES = (
    Feature("jax.jit", "tests/test_jax.py::test_jit_matches_reference"),
    Feature("jax.grad", "tests/test_jax.py::test_grad_through_batch_norm_matches_analytic_backward"),
    Feature("jax.vmap", "tests/test_gradients.py::test_jax_vmap_over_independent_batches"),
)

BACKEND_TABLE: tuple[BackendSpec, ...] = (
    BackendSpec(
        "numpy",
        "NumPy",
        (DeviceSpec("cpu"),),
        _NO_BFLOAT,
        features=(Feature("read-only arrays", "tests/test_conformance.py::test_read_only_numpy_arrays"),),
    ),
    BackendSpec(
        "array_api_strict",
        "array-api-strict",
        (DeviceSpec("CPU_DEVICE"), DeviceSpec("device1", note="a second, virtual device")),
        ("float32", "float64"),
    ),
    BackendSpec(
        "torch",
        "PyTorch",
        (
            DeviceSpec("cpu"),
            DeviceSpec(
                "meta", values=False, note="holds no data: results checked for library, device, dtype and shape"
            ),
        ),
        _HALF,
        gradients="autograd; batch_norm_backward, module.backward()",
        features=(
            *_TORCH_FEATURES,
            Feature(
                "sync= over torch.distributed (gloo, 2 and 3 processes)",
                "tests/test_distributed.py::test_torch_process_group_matches_one_process",
            ),
            Feature(
                "autograd through mask=",
                "tests/test_masked_ghost.py::test_torch_autograd_through_a_mask_is_the_analytic_backward",
            ),
        ),
    ),
    BackendSpec(
        "jax",
        "JAX, 64-bit types enabled",
        (DeviceSpec("cpu:0"),),
        _HALF,
        gradients="jax.grad; batch_norm_backward, module.backward()",
        features=(
            *_JAX_FEATURES,
            Feature(
                "sync= in shard_map over 4 devices", "tests/test_distributed.py::test_jax_shard_map_matches_unsharded"
            ),
            Feature(
                "mask= and virtual_batch_size= under jax.jit and jax.grad",
                "tests/test_masked_ghost.py::test_jax_jit_and_grad_with_mask_and_ghost",
            ),
        ),
    ),
    BackendSpec(
        "jax_x32",
        "JAX, default configuration",
        (DeviceSpec("cpu:0"),),
        ("float16", "bfloat16", "float32"),
    ),
    BackendSpec(
        "dask",
        "Dask (two chunks along the batch)",
        (DeviceSpec("cpu"),),
        _NO_BFLOAT,
        features=(
            Feature("stays lazy: no call computes", "tests/test_dask.py::test_nothing_computes"),
            Feature(
                "unknown chunk sizes: a clear error", "tests/test_dask.py::test_unknown_chunk_sizes_are_a_clear_error"
            ),
            Feature(
                "computed on a dask.distributed cluster",
                "tests/test_distributed.py::test_dask_cluster_computes_lazy_graphs_as_numpy",
            ),
        ),
    ),
    BackendSpec(
        "ndonnx",
        "ndonnx (arrays backed by ONNX)",
        (DeviceSpec("cpu"),),
        _NO_BFLOAT,
        features=(
            Feature(
                "a symbolic batch size: training and eval exported to ONNX, run by onnxruntime",
                "tests/test_onnx_export.py::test_exported_model_matches_numpy_for_two_batch_sizes",
            ),
        ),
    ),
    BackendSpec(
        "cupy",
        "CuPy",
        (DeviceSpec("cuda:0"),),
        _NO_BFLOAT,
        gpu=True,
        features=(
            Feature("CUDA kernels", "tests/test_cupy.py::test_kernels_equal_the_pure_primitives_and_the_reference"),
        ),
    ),
    BackendSpec(
        "torch_gpu",
        "PyTorch",
        (DeviceSpec("cuda"),),
        _HALF,
        gpu=True,
        gradients="autograd; batch_norm_backward, module.backward()",
        features=(
            Feature("autograd through batch_norm", "tests/test_torch_native.py::test_autograd_through_the_native_path"),
            _TORCH_FEATURES[1],
            Feature("CUDA graph capture", "tests/test_torch_native.py::test_cuda_graph_capture"),
        ),
    ),
    BackendSpec(
        "jax_gpu",
        "JAX, 64-bit types enabled",
        (DeviceSpec("cuda:0"),),
        _HALF,
        gpu=True,
    ),
)
"""The backends the conformance suite knows, in the order ``check`` and the docs list them."""

SPECS = {spec.name: spec for spec in BACKEND_TABLE}
CPU_BACKENDS = tuple(spec.name for spec in BACKEND_TABLE if not spec.gpu)
GPU_BACKENDS = tuple(spec.name for spec in BACKEND_TABLE if spec.gpu)
ALL_BACKENDS = CPU_BACKENDS + GPU_BACKENDS


@dataclass(frozen=True)
class Combination:
    """One (backend, device, dtype) point of the conformance matrix.

    Parameters
    ----------
    backend : str
        A name of :data:`ALL_BACKENDS`, or any name of one's own together with ``maker``.
    library : module
        The module a user imports: ``numpy``, ``torch``, ``jax.numpy``, ``dask.array``, ...
    device : object
        The device arrays are made on (``"cpu"``, ``"meta"``, a JAX or CuPy device, ...).
    dtype_name : str
        ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
    values : bool
        False for devices that hold no data (torch ``"meta"``): shapes only.
    lazy : bool
        True for libraries that evaluate on demand (Dask).
    maker : callable, optional
        ``maker(data, dtype)`` turns a NumPy array into an array of this combination; needed
        for a library the table does not know.

    Examples
    --------
    >>> import numpy as np
    >>> from portable_bn.testing import Combination
    >>> combo = Combination("numpy", np, "cpu", "float32", values=True)
    >>> combo.asarray([1.0, 2.0]), combo.id
    (array([1., 2.], dtype=float32), 'numpy-cpu-float32')
    """

    backend: str
    library: Any
    device: Any
    dtype_name: str
    values: bool
    lazy: bool = False
    maker: Callable[[np.ndarray, Any], Any] | None = None

    @property
    def device_label(self) -> str:
        """The device as a short name: ``cpu``, ``meta``, ``cuda``, ``cuda:0``, ``device1``."""
        if self.backend == "cupy":  # a cupy.cuda.Device, whose str is "<CUDA Device 0>"
            return f"cuda:{self.device.id}"
        if self.backend == "ndonnx":  # its one device object has no short name
            return "cpu"
        text = str(self.device)
        if text.startswith("array_api_strict.Device("):  # array_api_strict.Device('device1')
            return text.split("'")[1]
        return text

    @property
    def id(self) -> str:
        device = self.device_label if self.backend in ("cupy", "ndonnx") else self.device
        return f"{self.backend}-{device}-{self.dtype_name}"

    @property
    def param_dtype_name(self) -> str:
        """The dtype of parameters and running statistics: float32 for float16/bfloat16 input
        (PyTorch's mixed-precision rule), else the input's."""
        return "float32" if self.dtype_name in ("float16", "bfloat16") else self.dtype_name

    @property
    def param_dtype(self) -> Any:
        """:attr:`param_dtype_name` as a dtype of the library."""
        if self.param_dtype_name == self.dtype_name:
            return self.dtype
        return np.dtype("float32") if self.backend == "dask" else self.library.float32

    @property
    def dtype(self) -> Any:
        if self.backend == "dask":
            return np.dtype(self.dtype_name)
        return getattr(self.library, self.dtype_name)

    def asarray(self, data: Any, dtype: Any = None) -> Any:
        """NumPy data as an array of this combination (``dtype`` defaults to ours)."""
        dtype = self.dtype if dtype is None else dtype
        if self.maker is not None:
            return self.maker(np.asarray(data), dtype)
        return _MAKERS[self.backend](self, np.asarray(data), dtype)

    def to_numpy(self, array: Any) -> np.ndarray:
        """Host float64 (or integer) copy of an array of this combination."""
        return _as_float64_if_floating(to_numpy(array))


def _as_float64_if_floating(host: Any) -> np.ndarray:
    host = np.asarray(host)
    if host.dtype.kind in "fV" or "float" in str(host.dtype):  # ml_dtypes bfloat16 reports kind 'V'
        return host.astype(np.float64)
    return host


def _numpy(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    return np.asarray(data, dtype=dtype)


def _strict(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    return c.library.asarray(np.ascontiguousarray(data), dtype=dtype, device=c.device)


def _torch(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    import torch

    return torch.asarray(np.ascontiguousarray(data), device=c.device).to(dtype)


def _jax(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    import jax

    return jax.device_put(c.library.asarray(data, dtype=dtype), c.device)


def _dask(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    # Two chunks along the batch axis, so reductions really combine chunks.
    chunks = tuple(max(1, (size + 1) // 2) if i == 0 else max(size, 1) for i, size in enumerate(data.shape))
    return c.library.from_array(data.astype(dtype), chunks=chunks)


def _ndonnx(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    return c.library.asarray(np.ascontiguousarray(data), dtype=dtype)


def _cupy(c: Combination, data: np.ndarray, dtype: Any) -> Any:
    return c.library.asarray(data, dtype=dtype)


_MAKERS: dict[str, Callable[[Combination, np.ndarray, Any], Any]] = {
    "numpy": _numpy,
    "array_api_strict": _strict,
    "torch": _torch,
    "torch_gpu": _torch,
    "jax": _jax,
    "jax_x32": _jax,
    "jax_gpu": _jax,
    "dask": _dask,
    "ndonnx": _ndonnx,
    "cupy": _cupy,
}


def cupy_device_count(cp: Any) -> int:
    """CUDA devices CuPy sees; 0 where the CUDA runtime is missing or fails."""
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - CUDA runtime errors have no common base class
        return 0


class BackendUnavailable(Exception):
    """The backend's library is not installed, or it has no device here.

    Examples
    --------
    >>> from portable_bn.testing import BackendUnavailable, combinations
    >>> try:
    ...     combinations("cupy")
    ... except BackendUnavailable as why:
    ...     print("skipped:", str(why).split(":")[0])
    skipped: cupy
    """


def combinations(backend: str) -> list[Combination]:
    """Every (device, dtype) of one backend of :data:`ALL_BACKENDS`.

    Parameters
    ----------
    backend : str
        ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"`` (64-bit types enabled),
        ``"jax_x32"`` (JAX's default configuration), ``"dask"``, ``"cupy"``, ``"torch_gpu"`` or
        ``"jax_gpu"``.

    Returns
    -------
    list of Combination

    Raises
    ------
    BackendUnavailable
        The library is not installed, or sees no device of that kind; the message says which.
    ValueError
        An unknown name.

    Examples
    --------
    >>> from portable_bn.testing import combinations
    >>> [combo.id for combo in combinations("numpy")]
    ['numpy-cpu-float16', 'numpy-cpu-float32', 'numpy-cpu-float64']
    """
    if backend not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(ALL_BACKENDS)}")
    try:
        return list(_combinations(backend))
    except ImportError as exc:
        raise BackendUnavailable(f"{backend}: not installed ({exc})") from None


_jax_x64: list[bool] = []
"""The 64-bit setting this process gave JAX (it is process-wide): set once, by the first JAX backend asked for."""


def needs_own_process(backend: str) -> bool:
    """True for a JAX backend whose 64-bit setting differs from the one this process has already
    given JAX (the setting is process-wide)."""
    return backend in ("jax", "jax_x32", "jax_gpu") and bool(_jax_x64) and _jax_x64[0] != (backend != "jax_x32")


def _jax_precision(backend: str, jax: Any) -> None:
    """``jax`` and ``jax_gpu`` run with 64-bit types enabled (float64 and int64, as the other
    libraries); ``jax_x32`` in JAX's default configuration (float32 at most, int32 counters).
    The setting is process-wide, so one process serves one of the two."""
    wanted = backend != "jax_x32"
    if not _jax_x64:
        jax.config.update("jax_enable_x64", wanted)
        _jax_x64.append(wanted)
    elif _jax_x64[0] != wanted:
        setting = "enabled" if _jax_x64[0] else "disabled"
        raise BackendUnavailable(
            f"{backend}: this process has 64-bit JAX {setting} for another JAX backend; run it in a process of its own"
        )


def _devices(backend: str) -> tuple[Any, list[Any], bool]:
    """The library module, the device objects of the table's devices (in order), and laziness."""
    if backend == "numpy":
        return np, ["cpu"], False
    if backend == "array_api_strict":
        xp = importlib.import_module("array_api_strict")
        return xp, [xp.Device("CPU_DEVICE"), xp.Device("device1")], False
    if backend in ("torch", "torch_gpu"):
        torch = importlib.import_module("torch")
        if backend == "torch":
            return torch, ["cpu", "meta"], False
        if not torch.cuda.is_available():
            raise BackendUnavailable("torch_gpu: torch is installed but sees no CUDA device")
        return torch, ["cuda"], False
    if backend in ("jax", "jax_x32", "jax_gpu"):
        jax = importlib.import_module("jax")
        _jax_precision(backend, jax)
        platform = "gpu" if backend == "jax_gpu" else "cpu"
        try:
            devices = jax.devices(platform)
        except RuntimeError:
            raise BackendUnavailable(f"{backend}: JAX sees no {platform} device") from None
        return importlib.import_module("jax.numpy"), devices[:1], False
    if backend == "dask":
        return importlib.import_module("dask.array"), ["cpu"], True
    if backend == "ndonnx":
        ndx = importlib.import_module("ndonnx")
        return ndx, [ndx.__array_namespace_info__().default_device()], False
    cp = importlib.import_module("cupy")
    if cupy_device_count(cp) == 0:
        raise BackendUnavailable("cupy: installed but no CUDA device")
    # CuPy names devices by cupy.cuda.Device (array-api-compat's creation
    # functions reject the string "cuda").
    return cp, [cp.cuda.Device(0)], False


def _combinations(backend: str) -> Iterator[Combination]:
    spec = SPECS[backend]
    library, devices, lazy = _devices(backend)
    for dev, dev_spec in zip(devices, spec.devices, strict=True):
        for name in spec.dtypes:
            yield Combination(backend, library, dev, name, values=dev_spec.values, lazy=lazy)
