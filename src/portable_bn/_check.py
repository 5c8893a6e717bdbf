"""``python -m portable_bn check``: every installed backend against the reference.

The scenarios here are also what the conformance suite runs (tests import
them), so the command and CI prove the same thing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from . import _backends
from ._functional import batch_norm, batch_norm_backward
from ._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._reference import ReferenceModule, reference_backward, reference_batch_norm
from ._tolerance import max_error, tolerance

MODULE_SHAPES: dict[str, tuple[type, tuple[int, ...]]] = {
    "1d-2D": (BatchNorm1d, (6, 4)),
    "1d-3D": (BatchNorm1d, (4, 3, 5)),
    "2d": (BatchNorm2d, (3, 4, 3, 5)),
    "3d": (BatchNorm3d, (2, 3, 2, 3, 4)),
}


def sample(shape: tuple[int, ...], *, seed: int, axis: int = 1) -> np.ndarray:
    """Float64 data with a different offset and spread per channel (so a
    channel mix-up or a wrong reduction axis cannot pass)."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    param_shape = [1] * len(shape)
    param_shape[axis] = channels
    offset = np.linspace(-3.0, 5.0, channels).reshape(param_shape)
    spread = np.linspace(0.5, 3.0, channels).reshape(param_shape)
    result: np.ndarray = offset + spread * rng.standard_normal(shape)
    return result


def module_scenario(
    combo: _backends.Combination,
    kind: str,
    *,
    affine: bool = True,
    track_running_stats: bool = True,
    momentum: float | None = 0.1,
    axis: int = 1,
    steps: tuple[bool, ...] = (True, True, False, True, False),
    seed: int = 0,
) -> Iterator[tuple[str, float]]:
    """Drive one of our modules and the reference module through ``steps``
    (True = a training call, False = an eval call); yield (what, error) for the
    output and every piece of state after each step."""
    cls, shape = MODULE_SHAPES[kind]
    if axis != 1:
        shape = tuple(np.moveaxis(np.empty(shape), 1, axis).shape)
    channels = shape[axis]
    module = cls(
        channels,
        momentum=momentum,
        affine=affine,
        track_running_stats=track_running_stats,
        axis=axis,
        xp=combo.library,
        device=combo.device,
        dtype=_param_dtype(combo),
    )
    reference = ReferenceModule(
        channels, momentum=momentum, affine=affine, track_running_stats=track_running_stats, axis=axis
    )
    if affine:  # non-trivial affine parameters, same in both
        rng = np.random.default_rng(seed + 100)
        weight, bias = rng.uniform(0.5, 2.0, channels), rng.normal(0.0, 1.0, channels)
        module.load_state_dict({"weight": weight, "bias": bias}, strict=False)
        reference.state.update(weight=combo.to_numpy(module.weight), bias=combo.to_numpy(module.bias))
    for step, training in enumerate(steps):
        module.train(training)
        reference.training = training
        x = combo.asarray(sample(shape, seed=seed + step, axis=axis))
        out = module(x)
        expected = reference(combo.to_numpy(x))
        yield f"step {step} output", max_error(combo.to_numpy(out), expected)
        for key, value in module.state_dict().items():
            if key == "num_batches_tracked":
                same = int(combo.to_numpy(value)) == reference.state[key]
                yield f"step {step} {key}", 0.0 if same else float("inf")
            else:
                yield f"step {step} {key}", max_error(combo.to_numpy(value), reference.state[key])


def _param_dtype(combo: _backends.Combination) -> Any:
    """float32 parameters for half inputs (PyTorch's mixed rule), else the input's."""
    return combo.library.float32 if combo.dtype_name in ("float16", "bfloat16") else combo.dtype


def functional_scenario(
    combo: _backends.Combination,
    shape: tuple[int, ...],
    *,
    training: bool,
    axis: int = 1,
    affine: bool = True,
    running: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    seed: int = 0,
) -> Iterator[tuple[str, float]]:
    """One :func:`batch_norm` call and its backward against the reference."""
    channels = shape[axis]
    rng = np.random.default_rng(seed + 1)
    param_dtype = _param_dtype(combo)
    x_host = sample(shape, seed=seed, axis=axis)
    args = {
        "running_mean": rng.normal(0.0, 1.0, channels) if running else None,
        "running_var": rng.uniform(0.5, 2.0, channels) if running else None,
        "weight": rng.uniform(0.5, 2.0, channels) if affine else None,
        "bias": rng.normal(0.0, 1.0, channels) if affine else None,
    }
    arrays: dict[str, Any] = {k: None if v is None else combo.asarray(v, param_dtype) for k, v in args.items()}
    x = combo.asarray(x_host)
    result = batch_norm(x, **arrays, training=training, momentum=momentum, eps=eps, axis=axis)
    host = {k: None if v is None else combo.to_numpy(v) for k, v in arrays.items()}
    expected = reference_batch_norm(combo.to_numpy(x), **host, training=training, momentum=momentum, eps=eps, axis=axis)
    for key in ("output", "running_mean", "running_var", "mean", "invstd"):
        value, want = getattr(result, key), expected[key]
        if want is None:
            yield key, 0.0 if value is None else float("inf")
        else:
            yield key, max_error(combo.to_numpy(value), want)
    grad_host = np.random.default_rng(seed + 2).normal(0.0, 1.0, shape)
    grad = combo.asarray(grad_host)
    grads = batch_norm_backward(grad, x, arrays["weight"], result.mean, result.invstd, training=training, axis=axis)
    want_grads = reference_backward(
        combo.to_numpy(grad),
        combo.to_numpy(x),
        host["weight"],
        combo.to_numpy(result.mean),
        combo.to_numpy(result.invstd),
        training=training,
        axis=axis,
    )
    for name, value, want in zip(("grad_input", "grad_weight", "grad_bias"), grads, want_grads, strict=True):
        yield name, max_error(combo.to_numpy(value), want)


def _scenarios(combo: _backends.Combination) -> Iterator[tuple[str, float]]:
    for kind in MODULE_SHAPES:
        for momentum in (0.1, None):
            yield from module_scenario(combo, kind, momentum=momentum)
    yield from module_scenario(combo, "2d", affine=False, track_running_stats=False)
    yield from module_scenario(combo, "2d", axis=-1)
    for training in (True, False):
        yield from functional_scenario(combo, (4, 3, 5, 2), training=training, axis=-1)


def check(backends: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run the scenarios on every (backend, device, dtype); print a table; 0 if all pass."""
    names = backends or list(_backends.ALL_BACKENDS)
    out = out or sys.stdout
    rows: list[tuple[str, str, str, str, str, str]] = []
    failed = False
    for backend in names:
        try:
            combos = _backends.combinations(backend)
        except _backends.BackendUnavailable as why:
            rows.append((backend, "-", "-", "-", "-", f"skipped: {why}"))
            continue
        for combo in combos:
            if not combo.values:
                continue
            tol = tolerance(combo.dtype_name)
            try:
                errors = list(_scenarios(combo))
                worst = max(error for _, error in errors)
                status = "PASS" if worst <= tol else "FAIL: " + ", ".join(w for w, e in errors if e > tol)[:60]
                shown = f"{worst:.2e}"
            except Exception as exc:  # noqa: BLE001 - report any crash as a failure row
                status, shown = f"FAIL: {type(exc).__name__}: {exc}"[:80], "-"
            failed |= status.startswith("FAIL")
            rows.append(
                (
                    backend,
                    combo.device_label,
                    combo.dtype_name,
                    shown,
                    f"{tol:.1e}",
                    status,
                )
            )
    header = ("backend", "device", "dtype", "max error", "tolerance", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    print("FAILED" if failed else "all passed", file=out)
    return 1 if failed else 0
