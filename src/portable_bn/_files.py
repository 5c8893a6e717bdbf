"""Saving and loading state dicts: ``.npz``, ``.safetensors`` and PyTorch ``.pt``/``.pth``.

Every format is read without unpickling: ``.npz`` with ``allow_pickle=False``,
``.safetensors`` holds no code by design, and ``.pt``/``.pth`` go through
``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors and
plain containers only. A file is written to a temporary name next to the target and
renamed when complete, so a save that fails leaves any existing file as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from ._compat import convert_array, namespace_of, resolve_namespace, to_numpy

__all__ = ["load", "save"]

_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
_ORDER_KEY = "portable_bn.keys"
"""Metadata entry of a ``.safetensors`` file: the keys in the state dict's order (the
format itself stores tensors sorted by dtype and name)."""
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}
_NARROWER = {"float64": "float32", "float16": "float32", "bfloat16": "float32", "int64": "int32", "uint64": "uint32"}
"""What a dtype becomes in a library that lacks it: float16/bfloat16 exactly as float32;
float64 and 64-bit integers as JAX without 64-bit types holds them."""


class _Entry(NamedTuple):
    """One array on the host: a NumPy array, and whether it stands for bfloat16 (NumPy has
    no bfloat16, so such values travel as float32, which holds every one of them exactly)."""

    array: Any
    bfloat16: bool

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.bfloat16 else self.array.dtype.name


def _format(path: Any, name: str = "path") -> tuple[Path, str]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    resolved = Path(os.fspath(path))
    suffix = resolved.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{name} must end in one of {', '.join(_SUFFIXES)}, got {str(resolved)!r}")
    return resolved, suffix


# ------------------------------------------------------------------------------------ save


def save(module_or_state_dict: Any, path: str | os.PathLike[str]) -> None:
    """Write a module's state dict, or any state dict, to a file.

    The format follows the suffix of ``path``:

    - ``.npz``: NumPy's archive, one ``.npy`` per key (no pickles);
    - ``.safetensors``: needs ``pip install portable_bn[safetensors]``;
    - ``.pt`` or ``.pth``: ``torch.save`` of a dict of tensors, as
      ``torch.save(model.state_dict(), path)`` writes it (needs PyTorch).

    Keys are written unchanged (whole-model keys such as
    ``"layer1.0.bn1.running_mean"`` included), and every array keeps its shape and
    dtype: the 0-d integer ``num_batches_tracked`` stays 0-d and integer. bfloat16
    arrays are written as bfloat16 by ``.safetensors`` and ``.pt``; ``.npz`` cannot
    hold them and refuses them (cast to float32 first, which is exact). The file is
    written under a temporary name and renamed when complete.

    Parameters
    ----------
    module_or_state_dict : module or mapping
        A portable_bn module (or any object with a ``state_dict()`` method, such as a
        ``torch.nn.Module``), or a mapping from str keys to arrays of any supported
        library (NumPy, PyTorch, JAX, Dask, CuPy, array-api-strict) or numbers. Arrays
        are copied to the host; Dask arrays are computed.
    path : str or os.PathLike
        The file; its suffix picks the format.

    Raises
    ------
    TypeError
        A key that is not a str, or a value that is not an array.
    ValueError
        An unknown suffix, or a value the format cannot hold (a complex or object
        array; bfloat16 in ``.npz``; an array without data such as torch's
        ``"meta"`` device).
    ImportError
        ``.safetensors`` without the safetensors package, ``.pt`` without PyTorch.

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> bn = pbn.BatchNorm1d(3, xp=np)
    >>> _ = bn(np.arange(12.0, dtype=np.float32).reshape(4, 3))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     pbn.save(bn, os.path.join(folder, "bn.npz"))
    ...     state = pbn.load(os.path.join(folder, "bn.npz"))
    >>> list(state)
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    >>> bool(np.array_equal(state["running_var"], bn.running_var)), state["num_batches_tracked"]
    (True, array(1))
    """
    target, suffix = _format(path)
    state = _state_of(module_or_state_dict)
    entries = {key: _host_entry(key, value, suffix) for key, value in state.items()}
    writer = {".npz": _write_npz, ".safetensors": _write_safetensors}.get(suffix, _write_torch)
    if writer is _write_safetensors:
        _import_safetensors()
    elif writer is _write_torch:
        _import_torch(suffix)
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        writer(entries, temporary)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def _state_of(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        state = value
    elif callable(getattr(value, "state_dict", None)):
        state = value.state_dict()
        if not isinstance(state, Mapping):
            raise TypeError(f"module_or_state_dict.state_dict() returned {type(state).__name__}, not a mapping")
    else:
        raise TypeError(
            "module_or_state_dict must be a module (an object with state_dict()) or a mapping of names to arrays, "
            f"got {type(value).__name__}"
        )
    for key in state:
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be str, got {type(key).__name__} {key!r}")
    return state


def _host_entry(key: str, value: Any, suffix: str) -> _Entry:
    """A native-order, C-contiguous host copy of one value, refusing what no format holds."""
    import numpy as np

    try:
        namespace_of(value, f"state_dict[{key!r}]")
    except TypeError:
        if not isinstance(value, (int, float, bool, np.generic)):
            raise
        value = np.asarray(value)
    bfloat16 = "bfloat16" in str(value.dtype)
    try:
        host = np.asarray(to_numpy(value))
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"state_dict[{key!r}] cannot be copied to the host (an array without data?): {exc}") from None
    if bfloat16:
        host = host.astype(np.float32)  # exact: float32 holds every bfloat16 value
        if suffix == ".npz":
            raise ValueError(
                f"state_dict[{key!r}] is bfloat16, which .npz cannot hold: save to .safetensors or .pt "
                "(they keep bfloat16), or cast it to float32 first (exact)"
            )
    elif host.dtype.kind not in "biuf":
        raise ValueError(
            f"state_dict[{key!r}] has dtype {host.dtype}; files hold boolean, integer and real floating arrays"
        )
    host = np.require(host, dtype=host.dtype.newbyteorder("<"), requirements=["C"])
    return _Entry(host, bfloat16)


def _write_npz(entries: Mapping[str, _Entry], path: Path) -> None:
    """``np.savez``'s layout, written entry by entry (so that no key can clash with
    ``np.savez``'s own arguments) and with pickles refused."""
    import numpy as np

    with zipfile.ZipFile(path, mode="x", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, entry in entries.items():
            with archive.open(key + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, entry.array, allow_pickle=False)


def _bfloat16_bits(array: Any) -> Any:
    """The bfloat16 encoding (upper half of the float32 bits) of float32 values that are bfloat16 values."""
    import numpy as np

    return (array.view(np.uint32) >> 16).astype(np.uint16)


def _write_safetensors(entries: Mapping[str, _Entry], path: Path) -> None:
    safetensors = _import_safetensors()
    spec_type = getattr(safetensors, "TensorSpec", None)  # safetensors >= 0.8; earlier: plain dicts
    buffers = {key: _bfloat16_bits(e.array) if e.bfloat16 else e.array for key, e in entries.items()}
    specs: dict[str, Any] = {}
    for key, entry in entries.items():
        data = buffers[key]
        if spec_type is not None:
            specs[key] = spec_type(
                dtype=entry.dtype_name, shape=data.shape, data_ptr=data.ctypes.data, data_len=data.nbytes
            )
        else:
            specs[key] = {"dtype": entry.dtype_name, "shape": list(data.shape), "data": data.tobytes()}
    metadata = {_ORDER_KEY: json.dumps(list(entries))}
    with open(path, "xb"):  # claim the temporary name
        pass
    safetensors.serialize_file(specs, str(path), metadata=metadata)
    del buffers  # kept alive until here: the specs point into them


def _write_torch(entries: Mapping[str, _Entry], path: Path) -> None:
    torch = _import_torch(".pt")
    tensors = {}
    for key, entry in entries.items():
        tensor = torch.from_numpy(entry.array.copy())
        tensors[key] = tensor.to(torch.bfloat16) if entry.bfloat16 else tensor
    with open(path, "xb") as file:
        torch.save(tensors, file)


def _import_safetensors() -> Any:
    try:
        import safetensors
    except ImportError:
        raise ImportError(
            ".safetensors files need the safetensors package: pip install portable_bn[safetensors]"
        ) from None
    return safetensors


def _import_torch(suffix: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{suffix} files need PyTorch: pip install portable_bn[torch]") from None
    return torch


# ------------------------------------------------------------------------------------ load


def load(path: str | os.PathLike[str], *, xp: Any = None, device: Any = None) -> dict[str, Any]:
    """Read a state dict from a ``.npz``, ``.safetensors`` or ``.pt``/``.pth`` file.

    Nothing is unpickled: ``.npz`` is read with ``allow_pickle=False``, and a PyTorch
    checkpoint with ``torch.load(path, weights_only=True)``, which accepts tensors and
    plain containers only. A file holding anything else (object arrays, pickled
    objects, a pickle under another name) is refused with a ValueError before any of
    it runs.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`, by ``numpy.savez``, by safetensors, or by
        ``torch.save(model.state_dict(), path)``.
    xp : array library, keyword-only
        The library of the arrays returned (``numpy``, ``torch``, ``jax.numpy``,
        ``dask.array``, ``cupy``, ``array_api_strict`` or a compat namespace);
        None: NumPy.
    device : device, keyword-only
        Where to put the arrays; None: the library's default device.

    Returns
    -------
    dict
        Keys as in the file, in the file's order (for a ``.safetensors`` file written
        by :func:`save`, the order ``save`` was given them); values are fresh arrays
        of ``xp`` with the file's dtypes, ready for ``load_state_dict``. A dtype the
        library lacks becomes the nearest it has: float16 and bfloat16 become float32
        (exact) in libraries without them (NumPy has no bfloat16); float64 and int64
        become float32 and int32 in JAX without 64-bit types, as ``jax.numpy`` itself
        holds them.

    Raises
    ------
    ValueError
        An unknown suffix, or a file that is not a readable state dict of the format:
        pickled or object data, a corrupt or truncated file, entries that are not
        arrays.
    ImportError
        ``.safetensors`` without the safetensors package, ``.pt`` without PyTorch.
    FileNotFoundError
        No such file.

    See Also
    --------
    save : Write a state dict.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import portable_bn as pbn
    >>> model = {"bn1.weight": np.array([2.0, 3.0]), "bn1.bias": np.zeros(2),
    ...          "bn1.running_mean": np.array([0.5, -0.5]), "bn1.running_var": np.array([4.0, 1.0]),
    ...          "bn1.num_batches_tracked": np.array(10)}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     pbn.save(model, os.path.join(folder, "model.npz"))
    ...     state = pbn.load(os.path.join(folder, "model.npz"))
    >>> list(state) == list(model)
    True
    >>> bn = pbn.BatchNorm1d(2, xp=np, dtype=np.float64).eval()
    >>> bn.load_state_dict(state, prefix="bn1.")
    IncompatibleKeys(missing_keys=[], unexpected_keys=[])
    >>> bn(np.array([[0.5, 0.5]])).round(4)
    array([[0., 3.]])
    """
    source, suffix = _format(path)
    namespace = _namespace(xp)
    reader = {".npz": _read_npz, ".safetensors": _read_safetensors}.get(suffix, _read_torch)
    entries = dict(reader(source))
    return {key: _to_library(key, entry, namespace, device) for key, entry in entries.items()}


def _namespace(xp: Any) -> ModuleType:
    if xp is None:
        import numpy as np

        return resolve_namespace(np)
    return resolve_namespace(xp)


def _refused(path: Path, what: str, exc: BaseException | None = None) -> ValueError:
    detail = f": {exc}" if exc is not None else ""
    return ValueError(f"cannot read {str(path)!r}: {what}{detail}")


_PICKLE_REFUSED = "it holds pickled (object) data, which is refused: nothing in it was run"


def _read_npz(path: Path) -> Iterator[tuple[str, _Entry]]:
    import numpy as np

    entries: list[tuple[str, _Entry]] = []
    with open(path, "rb") as file:
        magic = file.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            what = _PICKLE_REFUSED if magic[:1] == b"\x80" else "not an .npz archive (a zip of .npy files)"
            raise _refused(path, what)
        file.seek(0)
        try:
            with np.load(file, allow_pickle=False) as archive:
                for key in archive.files:
                    entries.append((key, _checked_entry(path, key, archive[key])))
        except ValueError as exc:
            if str(exc).startswith("cannot read"):
                raise
            if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
                raise _refused(path, _PICKLE_REFUSED, exc) from None
            raise _refused(path, "corrupt .npz archive", exc) from None
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise _refused(path, "corrupt or truncated .npz archive", exc) from None
    yield from entries


def _checked_entry(path: Path, key: str, value: Any) -> _Entry:
    import numpy as np

    if not isinstance(value, np.ndarray):
        raise _refused(path, f"entry {key!r} is not an array")
    if value.dtype.kind not in "biuf":
        raise _refused(path, f"entry {key!r} has dtype {value.dtype}, not boolean, integer or real floating")
    return _Entry(value, False)


def _read_safetensors(path: Path) -> Iterator[tuple[str, _Entry]]:
    import numpy as np

    safetensors = _import_safetensors()
    data = path.read_bytes()
    try:
        tensors = safetensors.deserialize(data)  # validates the header and the offsets
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - SafetensorError and JSON errors share no base class
        raise _refused(path, "corrupt or truncated .safetensors file", exc) from None
    entries: dict[str, _Entry] = {}
    for key, view in tensors:
        name = _SAFETENSORS_DTYPES.get(view["dtype"])
        if name is None:
            raise _refused(path, f"entry {key!r} has dtype {view['dtype']}, which portable_bn does not read")
        stored = np.dtype("uint16" if name == "bfloat16" else name).newbyteorder("<")
        host = np.frombuffer(bytes(view["data"]), dtype=stored).astype(stored.newbyteorder("="))
        if name == "bfloat16":
            host = (host.astype(np.uint32) << 16).view(np.float32)  # exact: the bits of the same value
        entries[key] = _Entry(host.reshape(view["shape"]), name == "bfloat16")
    order = _saved_order(metadata.get(_ORDER_KEY), entries)
    for key in order:
        yield key, entries[key]


def _saved_order(text: Any, entries: Mapping[str, Any]) -> list[str]:
    """The keys in the order :func:`save` was given them, where the file says so."""
    try:
        order = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        order = None
    if isinstance(order, list) and len(order) == len(entries) and set(order) == set(entries):
        return order
    return list(entries)


def _read_torch(path: Path) -> Iterator[tuple[str, _Entry]]:
    import numpy as np

    torch = _import_torch(path.suffix)
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols other than its own before reading on
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(
            path,
            "torch.load(weights_only=True) refused it: it holds pickled objects other than tensors and plain "
            "containers, and nothing in it was run (load checkpoints that need more only from sources you trust, "
            f"with torch.load directly); {_torch_reason(exc)}",
        ) from None
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch reports corrupt archives as RuntimeError, EOFError, ...
        raise _refused(
            path, "torch.load(weights_only=True) cannot read it (a corrupt or truncated file?)", exc
        ) from None
    if not isinstance(state, Mapping):
        raise _refused(path, f"it holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)")
    entries = []
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise _refused(
                path,
                f"entry {key!r} is a {type(value).__name__}, not a tensor; pbn.load reads flat state dicts "
                "as torch.save(model.state_dict(), path) writes them",
            )
        bfloat16 = value.dtype == torch.bfloat16
        try:
            host = np.asarray(to_numpy(value))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _refused(path, f"entry {key!r} cannot be read as an array", exc) from None
        entries.append((key, _checked_entry(path, key, host)._replace(bfloat16=bfloat16)))
    yield from entries


def _torch_reason(exc: BaseException) -> str:
    """The line of torch's refusal that names what was refused (the rest is advice about torch.load)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = [line for line in lines if "unsupported" in line.lower() or "WeightsUnpickler error" in line]
    return (found or lines or [type(exc).__name__])[0]


def _to_library(key: str, entry: _Entry, xp: ModuleType, device: Any) -> Any:
    """The entry as a fresh array of ``xp`` on ``device``, in the file's dtype or the nearest one ``xp`` has."""
    name = entry.dtype_name
    dtype = _dtype_of(xp, device, name)
    while dtype is None and name in _NARROWER:
        name = _NARROWER[name]
        dtype = _dtype_of(xp, device, name)
    if dtype is None:
        raise ValueError(f"entry {key!r} has dtype {entry.dtype_name}, which {xp.__name__} does not have")
    host = entry.array
    if host.dtype.name != name and name != "bfloat16":  # narrowed on the host, so that no library warns
        host = host.astype(name)
    try:
        return convert_array(host, xp, device, dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"entry {key!r} cannot be put on device={device!r}: {exc}") from None


def _dtype_of(xp: ModuleType, device: Any, name: str) -> Any:
    info = xp.__array_namespace_info__()
    try:
        dtypes = info.dtypes(device=device, kind=None)  # kind spelled out: ndonnx requires it
    except TypeError:  # some wrappers take no device argument
        dtypes = info.dtypes(kind=None)
    if name in dtypes:
        return dtypes[name]
    if name not in ("float16", "bfloat16"):
        return None
    found = getattr(xp, name, None)  # beyond the standard: most libraries that have them export them
    if found is None and name == "float16":
        import numpy as np

        if getattr(xp, "float32", None) is np.float32:  # NumPy's dtypes (Dask): float16 among them
            found = np.dtype(np.float16)
    return found
