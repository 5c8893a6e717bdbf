"""``python -m portable_bn accuracy``: errors on hard data, ours beside PyTorch's.

For each installed backend (first device) and dtype, the normwise error of a
training-mode ``batch_norm`` output against the float64 truth
(:func:`portable_bn.testing.reference_batch_norm`, exactly rounded sums) on data sets that break naive
implementations; the same data through ``torch.nn.functional.batch_norm`` on
the CPU, where torch is installed, and on CUDA (with cuDNN and with PyTorch's own
kernel) where torch sees a GPU, for comparison.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from ._functional import batch_norm
from .testing import HARD_DATA, max_error, reference_batch_norm
from .testing import _matrix as _backends

SHAPE = (16, 4, 8, 8)


DATA = HARD_DATA
"""The data sets: :data:`portable_bn.testing.HARD_DATA`, at :data:`SHAPE`."""


def _error(
    run: Callable[[Any], np.ndarray],
    cast: Callable[[np.ndarray], Any],
    host: Callable[[Any], np.ndarray],
    data: np.ndarray,
) -> float:
    x = cast(data)
    truth = reference_batch_norm(host(x), training=True)["output"]
    assert truth is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the point is to see what overflows
        return max_error(run(x), truth)


def measure() -> list[tuple[str, str, dict[str, float]]]:
    """Rows (implementation, dtype, {data set: error})."""
    rows = []
    for backend in _backends.CPU_BACKENDS + _backends.GPU_BACKENDS:
        try:
            combos = _backends.combinations(backend)
        except _backends.BackendUnavailable:
            continue
        seen: set[str] = set()
        for combo in combos:
            if not combo.values or combo.dtype_name in seen:
                continue
            seen.add(combo.dtype_name)

            def ours(x: Any, combo: _backends.Combination = combo) -> np.ndarray:
                return combo.to_numpy(batch_norm(x, training=True).output)

            errors = {
                name: _error(ours, combo.asarray, combo.to_numpy, make(SHAPE, 0))
                for name, (make, dtypes) in DATA.items()
                if combo.dtype_name in dtypes
            }
            rows.append((f"portable_bn {backend}", combo.dtype_name, errors))
    try:
        import torch
    except ImportError:
        return rows
    devices = [("cpu", "CPU", True)]
    if torch.cuda.is_available():  # PyTorch's CUDA kernels: cuDNN's, and its own with cuDNN off
        devices += [("cuda", "CUDA, cuDNN", True), ("cuda", "CUDA, native kernel", False)]
    for device, label, cudnn in devices:
        for name in ("float16", "bfloat16", "float32", "float64"):
            dtype = getattr(torch, name)

            def run(x: Any, cudnn: bool = cudnn) -> np.ndarray:
                with torch.backends.cudnn.flags(enabled=cudnn):
                    out = torch.nn.functional.batch_norm(x, None, None, training=True)
                return out.float().cpu().numpy() if out.dtype == torch.bfloat16 else out.cpu().numpy()

            def cast(data: np.ndarray, dtype: Any = dtype, device: str = device) -> Any:
                return torch.from_numpy(data).to(device=device, dtype=dtype)

            def host(x: Any) -> np.ndarray:
                return x.double().cpu().numpy()

            errors = {
                key: _error(run, cast, host, make(SHAPE, 0)) for key, (make, dtypes) in DATA.items() if name in dtypes
            }
            rows.append((f"torch F.batch_norm ({label})", name, errors))
    return rows


def accuracy(out: TextIO | None = None) -> int:
    """Print the table; always 0 (this reports, it does not judge)."""
    out = out or sys.stdout
    rows = measure()
    header = ["implementation", "dtype", *DATA]
    cells = [[impl, dtype, *(f"{errors[k]:.1e}" if k in errors else "-" for k in DATA)] for impl, dtype, errors in rows]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
    print("normwise error max|y - y64| / max(1, max|y64|) of the training output; y64: float64 truth", file=out)
    return 0
