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

from ._functional import batch_norm, batch_norm_backward
from .testing import HARD_DATA, max_error, reference_backward, reference_batch_norm
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


GRADIENT_DATA = (
    ((16, 8, 8, 8), 0.0, 1.0),
    ((16, 8, 8, 8), 1e3, 1.0),
    ((32, 4, 32, 32), 1e4, 0.1),
    ((8, 16, 8, 8), 10.0, 3.0),
)
"""Float32 backward data sets: (shape, offset, spread) of ``offset + spread * N(0, 1)``."""

GRADIENTS = ("grad_input", "grad_weight", "grad_bias")


def gradient_case(shape: tuple[int, ...], offset: float, spread: float) -> tuple[Any, Any, Any, Any]:
    """float32 ``x``, upstream gradient and weight (U(0.5, 2)), and the float64 gradients of the
    same float32 data: ``(x, grad, weight, (grad_input, grad_weight, grad_bias))``."""
    rng = np.random.default_rng(0)
    x = (offset + spread * rng.normal(size=shape)).astype(np.float32)
    grad = rng.normal(size=shape).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    xh, gh, wh = (a.astype(np.float64) for a in (x, grad, weight))
    forward = reference_batch_norm(xh, weight=wh, training=True)
    truth = reference_backward(gh, xh, wh, forward["mean"], forward["invstd"], training=True)
    return x, grad, weight, truth


def _data_name(shape: tuple[int, ...], offset: float, spread: float) -> str:
    return f"{offset:g}+{spread:g}N {'x'.join(map(str, shape))}"


def gradient_rows() -> list[tuple[str, str, dict[str, float]]]:
    """Rows (implementation, gradient, {data set: error}) of the float32 training backward:
    ours (``batch_norm`` then ``batch_norm_backward``) per installed backend, and PyTorch's
    autograd through ``F.batch_norm`` on the CPU where torch is installed."""
    cases = {_data_name(*data): gradient_case(*data) for data in GRADIENT_DATA}
    rows: list[tuple[str, str, dict[str, float]]] = []
    for backend in _backends.CPU_BACKENDS + _backends.GPU_BACKENDS:
        try:
            combos = _backends.combinations(backend)
        except _backends.BackendUnavailable:
            continue
        combo = next((c for c in combos if c.values and c.dtype_name == "float32"), None)
        if combo is None:
            continue
        errors: dict[str, dict[str, float]] = {name: {} for name in GRADIENTS}
        for data, (x, grad, weight, truth) in cases.items():
            xs, gs, ws = (combo.asarray(a) for a in (x, grad, weight))
            forward = batch_norm(xs, weight=ws, training=True)
            got = batch_norm_backward(gs, xs, ws, forward.mean, forward.invstd, training=True)
            for name, value, want in zip(GRADIENTS, got, truth, strict=True):
                errors[name][data] = max_error(combo.to_numpy(value), want)
        rows += [(f"portable_bn {backend}", name, errors[name]) for name in GRADIENTS]
    try:
        import torch
    except ImportError:
        return rows
    errors = {name: {} for name in GRADIENTS}
    for data, (x, grad, weight, truth) in cases.items():
        leaves = [torch.from_numpy(a).requires_grad_() for a in (x, weight, np.zeros(x.shape[1], np.float32))]
        output = torch.nn.functional.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True)
        output.backward(torch.from_numpy(grad))
        for name, leaf, want in zip(GRADIENTS, leaves, truth, strict=True):
            errors[name][data] = max_error(np.asarray(leaf.grad), want)
    rows += [("torch autograd (CPU)", name, errors[name]) for name in GRADIENTS]
    return rows


def _print_table(header: list[str], cells: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def accuracy(out: TextIO | None = None) -> int:
    """Print the tables; always 0 (this reports, it does not judge)."""
    out = out or sys.stdout
    rows = measure()
    cells = [[impl, dtype, *(f"{errors[k]:.1e}" if k in errors else "-" for k in DATA)] for impl, dtype, errors in rows]
    _print_table(["implementation", "dtype", *DATA], cells, out)
    print("normwise error max|y - y64| / max(1, max|y64|) of the training output; y64: float64 truth", file=out)
    print("", file=out)
    grads = gradient_rows()
    names = [_data_name(*data) for data in GRADIENT_DATA]
    cells = [[impl, grad, *(f"{errors[k]:.1e}" for k in names)] for impl, grad, errors in grads]
    _print_table(["implementation", "float32 gradient", *names], cells, out)
    print(
        "normwise error of the float32 training backward against the float64 gradients of the same float32 data "
        "(offset + spread * N(0,1), shape; weight U(0.5, 2), upstream gradient N(0,1))",
        file=out,
    )
    return 0
