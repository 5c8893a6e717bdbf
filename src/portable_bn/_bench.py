"""``python -m portable_bn bench``: how fast our batch norm is, as ratios.

Every figure is a ratio of two timings taken in this process: the calls are
sampled in turn (ours, baseline, copy, ours, baseline, copy, ..., the
starting call rotated every round, the garbage collector off), each sample
long enough to dwarf the timer (many calls per sample for small inputs), and
each time is the median of the samples. A slow or noisy machine slows both
sides of a ratio alike; absolute times are printed only to read the ratios.

Baselines:

- NumPy (and CuPy): a same-size array copy, ``copyto`` into a preallocated
  array (column "ours/copy": the memory-bandwidth floor), and the textbook
  implementation :func:`naive_batch_norm` / :func:`naive_batch_norm_backward`;
- CuPy, where torch sees a CUDA device: instead of the textbook code, PyTorch
  on the same data and device (cuDNN where PyTorch uses it), as for torch_gpu;
- PyTorch: ``torch.nn.functional.batch_norm``; for the backward,
  ``torch.autograd.grad`` through its graph, built once outside the timed
  region, so only the backward is timed on both sides;
- JAX: the same textbook implementation written with ``jax.numpy``; both
  sides under ``jax.jit``, returning the same five results, waited for with
  ``jax.block_until_ready``.

The peak extra memory of the NumPy training forward is measured with
:mod:`tracemalloc` (NumPy reports its data buffers to it).

The command prints the machine, the backends not measured and why, a table
(:func:`table_lines`, one :class:`Row` per line), a legend of its columns
(:func:`legend_lines`) and the range of the ratios per backend, baseline and
input size (:func:`summary_lines`). ``--json`` writes the machine, the
settings, the rows (the fields of :class:`Row`) and the backends not
measured; :func:`load_rows` reads the rows back, and :func:`write_plot` draws
measured or loaded rows.

``--sync`` adds a table of what synchronized batch norm (``sync=``) costs per
call (:func:`measure_sync`, one :class:`SyncRow` per engine and case, printed
by :func:`sync_table_lines` and :func:`sync_legend_lines`): torch.distributed
(2 processes joined by gloo over 127.0.0.1), ``jax.shard_map`` over 4 forced
CPU devices, and a Dask ``LocalCluster`` of 2 worker processes, each engine in
child processes of its own with a time limit (:func:`run_sync_children`). Per
case the same call is timed with and without sync in turn in the same
processes (Dask: on the cluster and on the threaded scheduler), and the
collectives that the call makes with sync (recorded as it runs for torch,
read from the compiled program for JAX) are timed alone. ``--json`` writes
them under the key ``"sync"``; :func:`load_sync_rows` reads them back.

This module imports only NumPy and the standard library; each backend is
imported when it is benchmarked. The code under test is reached through the
public functions only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TextIO

import numpy as np

from . import __version__, batch_norm, batch_norm_backward
from .testing._matrix import BackendUnavailable, cupy_device_count

BACKENDS = ("numpy", "torch", "jax", "cupy", "torch_gpu", "jax_gpu")
"""Names as in ``python -m portable_bn check``; the GPU ones are skipped without a GPU."""
DTYPES = ("float32", "float64")
CASES = ("train", "eval", "backward")
DEFAULT_SHAPES = ((2, 4, 3, 3), (32, 64, 56, 56), (64, 256, 14, 14), (256, 512, 7, 7), (8, 32, 128, 128))
QUICK_SHAPES = ((2, 4, 3, 3), (32, 64, 56, 56))
QUICK_DTYPES = ("float32",)
SMALL_SIZE = 4096
"""Inputs with fewer elements are small: the fixed cost per call dominates their time."""
LARGE_SIZE = 1 << 20
"""Inputs with at least this many elements are large: memory bandwidth dominates their time."""

MOMENTUM = 0.1
EPS = 1e-5
QUICK_REPEATS = 3
SAMPLE_SECONDS = 0.01
QUICK_SAMPLE_SECONDS = 0.002


def default_repeats(shape: tuple[int, ...]) -> int:
    """Samples per timing when ``--repeats`` is not given: many for cheap calls,
    few for large inputs (one sample there is one call of tens of ms)."""
    return 21 if math.prod(shape) < LARGE_SIZE else 7


# -- the naive baselines ------------------------------------------------------


def _nchw(x: Any) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Reduction axes, per-channel broadcast shape and values per channel of an (N, C, ...) input."""
    shape = tuple(int(size) for size in x.shape)
    axes = (0, *range(2, len(shape)))
    return axes, (1, shape[1]) + (1,) * (len(shape) - 2), math.prod(shape) // shape[1]


def naive_batch_norm(
    xp: Any,
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    *,
    training: bool,
    momentum: float = MOMENTUM,
    eps: float = EPS,
) -> tuple[Any, Any, Any, Any, Any]:
    """The textbook forward (channel axis 1) with NumPy-style methods, returning
    what :func:`portable_bn.batch_norm` returns: ``(output, new running_mean,
    new running_var, mean, invstd)`` (the last two are what a backward needs;
    under ``jax.jit`` each result is an output buffer, so both sides produce
    the same ones). Works for NumPy, CuPy and ``jax.numpy`` (``xp`` gives ``sqrt``)."""
    axes, param, count = _nchw(x)
    if training:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * var * (count / (count - 1))
    else:
        mean, var = running_mean, running_var
    std = xp.sqrt(var + eps)
    output = (x - mean.reshape(param)) / std.reshape(param) * weight.reshape(param) + bias.reshape(param)
    return output, running_mean, running_var, mean, 1 / std


def naive_batch_norm_backward(grad_output: Any, x: Any, weight: Any, mean: Any, invstd: Any) -> tuple[Any, Any, Any]:
    """The textbook training backward (channel axis 1):
    ``dx = w * invstd / n * (n * g - sum(g) - xhat * sum(g * xhat))``;
    returns ``(grad_input, grad_weight, grad_bias)``."""
    axes, param, count = _nchw(x)
    xhat = (x - mean.reshape(param)) * invstd.reshape(param)
    grad_bias = grad_output.sum(axis=axes)
    grad_weight = (grad_output * xhat).sum(axis=axes)
    grad_input = (
        (weight * invstd).reshape(param)
        / count
        * (count * grad_output - grad_bias.reshape(param) - xhat * grad_weight.reshape(param))
    )
    return grad_input, grad_weight, grad_bias


# -- timing -------------------------------------------------------------------


def _seconds(fn: Callable[[], object], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return time.perf_counter() - start


def _loops_for(fn: Callable[[], object], sample_seconds: float, agree: Callable[[float], float] | None = None) -> int:
    """Calls per sample so that one sample lasts at least ``sample_seconds``.

    ``agree``: turns this process's time into one that every process of a distributed run
    shares (their maximum), so that all of them choose the same number of calls."""
    loops = 1
    while True:
        elapsed = _seconds(fn, loops)
        if agree is not None:
            elapsed = agree(elapsed)
        if elapsed >= sample_seconds or loops >= 1_000_000:
            return loops
        wanted = math.ceil(loops * 1.2 * sample_seconds / max(elapsed, 1e-9))
        loops = max(loops + 1, min(loops * 100, wanted))


WARM_UP_SECONDS = 1.0
QUICK_WARM_UP_SECONDS = 0.2


def warm_up(seconds: float) -> None:
    """Keep the CPU busy before the first sample, so that the first row is not measured
    with the clock still ramping up and cold caches (up to 2x slow on both sides)."""
    source = np.ones(1 << 20)
    destination = np.empty_like(source)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        np.copyto(destination, source)
        np.add(destination, 1.0, out=destination)


def interleaved_medians(
    fns: Sequence[Callable[[], object]],
    *,
    repeats: int,
    sample_seconds: float,
    agree: Callable[[float], float] | None = None,
    before_sample: Callable[[], object] | None = None,
) -> tuple[list[float], list[int]]:
    """Median seconds per call of each function, and the calls per sample.

    Each function is called once to warm up (caches, allocator, JAX
    compilation), then sampled in turn ``repeats`` times, the first one of
    every round rotating so that none always follows the same neighbour.

    For processes that time collectives together, every one runs the same calls in
    the same order: ``agree`` makes them choose the same calls per sample (see
    :func:`_loops_for`) and ``before_sample`` (a barrier, not timed) starts every
    sample together.
    """
    for fn in fns:
        fn()
    loops = [_loops_for(fn, sample_seconds, agree) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    collecting = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(repeats):
            for k in range(len(fns)):
                i = (round_ + k) % len(fns)
                if before_sample is not None:
                    before_sample()
                samples[i].append(_seconds(fns[i], loops[i]) / loops[i])
    finally:
        if collecting:
            gc.enable()
    return [statistics.median(s) for s in samples], loops


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak memory allocated during one call of ``fn`` above what was allocated
    before it (the result included), as seen by :mod:`tracemalloc`."""
    fn()  # one-time allocations (caches) are not the call's
    gc.collect()
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not already:
            tracemalloc.stop()
    del result
    return peak - before


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 6 or fields[0] != "cpu":
        return None
    values = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class OtherLoad:
    """Share of the machine's CPU time used by other processes between
    :meth:`start` and :meth:`stop` (None where /proc/stat is unavailable).

    A benchmark on a shared machine is only as good as this is low: threads of
    a multi-threaded library wait for a core another process holds.

    ``children``: the time of this process's child processes that ended and were
    waited for in between is its own too (the synchronization table's engines run
    in child processes).
    """

    def __init__(self, *, children: bool = False) -> None:
        self._ticks: tuple[int, int] | None = None
        self._own = 0.0
        self._children = children

    def start(self) -> None:
        self._ticks = _cpu_ticks()
        self._own = _own_cpu_seconds(self._children)

    def stop(self) -> float | None:
        end = _cpu_ticks()
        if self._ticks is None or end is None or end[1] <= self._ticks[1]:
            return None
        per_second = os.sysconf("SC_CLK_TCK")
        own_ticks = (_own_cpu_seconds(self._children) - self._own) * per_second
        busy, total = end[0] - self._ticks[0], end[1] - self._ticks[1]
        return min(1.0, max(0.0, (busy - own_ticks) / total))


def _own_cpu_seconds(children: bool = False) -> float:
    times = os.times()
    own = times.user + times.system
    return own + times.children_user + times.children_system if children else own


def other_load_now(seconds: float = 0.25) -> float | None:
    """:class:`OtherLoad` over a short idle wait."""
    monitor = OtherLoad()
    monitor.start()
    time.sleep(seconds)
    return monitor.stop()


# -- backends -----------------------------------------------------------------

_KEYS = ("x", "grad_output", "running_mean", "running_var", "weight", "bias")


@dataclass(frozen=True)
class Contest:
    """What to time for one case on one backend; every call waits for its result."""

    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str
    copy: Callable[[], object] | None = None
    memory: tuple[Callable[[], object], Callable[[], object]] | None = None
    """(ours, naive) for the peak-memory measurement (NumPy training forward)."""


ContestMaker = Callable[[str, dict[str, np.ndarray]], Contest]


@dataclass(frozen=True)
class Backend:
    name: str
    device: str
    make_contest: ContestMaker


def _synced(fn: Callable[[], object], wait: Callable[[], object] | None) -> Callable[[], object]:
    if wait is None:
        return fn

    def call() -> object:
        result = fn()
        wait()
        return result

    return call


def _array_module_contests(
    xp: Any, put: Callable[[np.ndarray], Any], wait: Callable[[], object] | None, *, memory: bool
) -> ContestMaker:
    """NumPy and CuPy: ours against a copy and against the naive implementation."""

    def make(case: str, host: dict[str, np.ndarray]) -> Contest:
        x, g, rm, rv, w, b = (put(host[key]) for key in _KEYS)
        if case == "backward":
            forward = batch_norm(x, rm, rv, w, b, training=True)
            mean, invstd = forward.mean, forward.invstd

            def ours() -> object:
                return batch_norm_backward(g, x, w, mean, invstd, training=True)

            def naive() -> object:
                return naive_batch_norm_backward(g, x, w, mean, invstd)

        else:
            training = case == "train"

            def ours() -> object:
                return batch_norm(x, rm, rv, w, b, training=training)

            def naive() -> object:
                return naive_batch_norm(xp, x, rm, rv, w, b, training=training)

        destination = xp.empty_like(x)

        def copy() -> object:
            return xp.copyto(destination, x)

        return Contest(
            _synced(ours, wait),
            _synced(naive, wait),
            "naive",
            copy=_synced(copy, wait),
            memory=(ours, naive) if memory and case == "train" else None,
        )

    return make


def _torch_contests(torch: Any, device: str) -> ContestMaker:
    """PyTorch: ours against torch.nn.functional.batch_norm and its autograd backward."""
    functional = torch.nn.functional
    wait = torch.cuda.synchronize if device == "cuda" else None

    def make(case: str, host: dict[str, np.ndarray]) -> Contest:
        x, g, rm, rv, w, b = (torch.from_numpy(host[key]).to(device) for key in _KEYS)
        if case == "backward":
            forward = batch_norm(x, rm, rv, w, b, training=True)

            def ours() -> object:
                return batch_norm_backward(g, x, w, forward.mean, forward.invstd, training=True)

            # The graph is built once, outside the timed region: only the backward is timed.
            leaves = tuple(t.detach().clone().requires_grad_(True) for t in (x, w, b))
            output = functional.batch_norm(
                leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], training=True, momentum=MOMENTUM, eps=EPS
            )

            def native() -> object:
                return torch.autograd.grad(output, leaves, g, retain_graph=True)

            name = "autograd"
        else:
            training = case == "train"
            # F.batch_norm updates the running statistics in place: it gets its own copies.
            own_mean, own_var = rm.clone(), rv.clone()

            def ours() -> object:
                return batch_norm(x, rm, rv, w, b, training=training)

            def native() -> object:
                return functional.batch_norm(x, own_mean, own_var, w, b, training=training, momentum=MOMENTUM, eps=EPS)

            name = "F.batch_norm"
        return Contest(_synced(ours, wait), _synced(native, wait), name)

    return make


def _cupy_contests(cp: Any) -> ContestMaker:
    """CuPy: ours against a copy, and against PyTorch's kernels on the same data
    (cuDNN where PyTorch uses it) where torch sees a CUDA device, else against
    the naive CuPy implementation."""
    cupy_make = _array_module_contests(cp, cp.asarray, cp.cuda.Device().synchronize, memory=False)
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return cupy_make
    if not torch.cuda.is_available():
        return cupy_make
    torch_make = _torch_contests(torch, "cuda")

    def make(case: str, host: dict[str, np.ndarray]) -> Contest:
        native = torch_make(case, host)
        return replace(cupy_make(case, host), baseline=native.baseline, baseline_name=f"torch {native.baseline_name}")

    return make


def _jax_contests(jax: Any, device: Any) -> ContestMaker:
    """JAX: jitted ours against the jitted naive implementation."""
    jnp = importlib.import_module("jax.numpy")

    def forward_pair(training: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
        def ours(x: Any, rm: Any, rv: Any, w: Any, b: Any) -> Any:
            return batch_norm(x, rm, rv, w, b, training=training)

        def naive(x: Any, rm: Any, rv: Any, w: Any, b: Any) -> Any:
            return naive_batch_norm(jnp, x, rm, rv, w, b, training=training)

        return jax.jit(ours), jax.jit(naive)

    def ours_backward(g: Any, x: Any, w: Any, mean: Any, invstd: Any) -> Any:
        return batch_norm_backward(g, x, w, mean, invstd, training=True)

    jitted = {
        "train": forward_pair(True),
        "eval": forward_pair(False),
        "backward": (jax.jit(ours_backward), jax.jit(naive_batch_norm_backward)),
    }

    def make(case: str, host: dict[str, np.ndarray]) -> Contest:
        x, g, rm, rv, w, b = (jax.device_put(host[key], device) for key in _KEYS)
        if case == "backward":
            forward = jitted["train"][0](x, rm, rv, w, b)
            args: tuple[Any, ...] = (g, x, w, forward.mean, forward.invstd)
        else:
            args = (x, rm, rv, w, b)
        ours_fn, naive_fn = jitted[case]

        def ours() -> object:
            return jax.block_until_ready(ours_fn(*args))

        def naive() -> object:
            return jax.block_until_ready(naive_fn(*args))

        return Contest(ours, naive, "naive jit")

    return make


def _import(module: str, backend: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = "not installed" if module == backend else f"{module} is not installed"
        raise BackendUnavailable(f"{backend}: {what}: {exc}") from None


def load_backend(name: str) -> Backend:
    """Import one backend and find its device, or raise BackendUnavailable saying why not."""
    if name == "numpy":
        return Backend(name, "cpu", _array_module_contests(np, np.asarray, None, memory=True))
    if name in ("torch", "torch_gpu"):
        torch = _import("torch", name)
        if name == "torch_gpu" and not torch.cuda.is_available():
            raise BackendUnavailable("torch_gpu: torch sees no CUDA device")
        device = "cuda" if name == "torch_gpu" else "cpu"
        return Backend(name, device, _torch_contests(torch, device))
    if name in ("jax", "jax_gpu"):
        jax = _import("jax", name)
        jax.config.update("jax_enable_x64", True)  # float64 arrays stay float64
        kind = "gpu" if name == "jax_gpu" else "cpu"
        try:
            jax_device = jax.devices(kind)[0]
        except RuntimeError:
            raise BackendUnavailable(f"{name}: JAX sees no {kind} device") from None
        return Backend(name, str(jax_device), _jax_contests(jax, jax_device))
    if name == "cupy":
        cp = _import("cupy", name)
        if cupy_device_count(cp) == 0:
            raise BackendUnavailable("cupy: installed but no CUDA device")
        return Backend(name, "cuda", _cupy_contests(cp))
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def host_data(shape: tuple[int, ...], dtype: str, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Input, upstream gradient and per-channel vectors (channel axis 1) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    data = {
        "x": rng.standard_normal(shape) * 2.0 + 1.0,
        "grad_output": rng.standard_normal(shape),
        "running_mean": rng.normal(0.0, 1.0, channels),
        "running_var": rng.uniform(0.5, 1.5, channels),
        "weight": rng.uniform(0.5, 1.5, channels),
        "bias": rng.normal(0.0, 1.0, channels),
    }
    return {key: value.astype(dtype) for key, value in data.items()}


# -- the run ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured case. Times are medians; ratios are ours / baseline."""

    backend: str
    device: str
    dtype: str
    shape: tuple[int, ...]
    case: str
    ours_ms: float
    baseline: str
    baseline_ms: float
    ratio: float
    overhead_us: float
    """(ours - baseline) in microseconds: the fixed cost that matters for small calls."""
    copy_ms: float | None
    copies: float | None
    """ours / a same-size array copy (NumPy, CuPy)."""
    memory_ratio: float | None
    """Peak extra bytes of the call / output bytes (NumPy training forward)."""
    naive_memory_ratio: float | None
    repeats: int
    loops: tuple[int, ...]
    """Calls per sample: ours, baseline, copy."""
    other_load: float | None = None
    """Share of the CPUs used by other processes while this row was measured (see :class:`OtherLoad`)."""


def measure(
    backend: Backend,
    case: str,
    shape: tuple[int, ...],
    dtype: str,
    host: dict[str, np.ndarray],
    *,
    repeats: int,
    sample_seconds: float,
) -> Row:
    """Time one case (and measure its memory where that applies)."""
    contest = backend.make_contest(case, host)
    monitor = OtherLoad()
    monitor.start()
    fns = [contest.ours, contest.baseline] + ([contest.copy] if contest.copy is not None else [])
    times, loops = interleaved_medians(fns, repeats=repeats, sample_seconds=sample_seconds)
    ours, base = times[0], times[1]
    copy = times[2] if contest.copy is not None else None
    memory_ratio = naive_memory_ratio = None
    if contest.memory is not None:
        output_bytes = host["x"].nbytes
        memory_ratio = peak_extra_bytes(contest.memory[0]) / output_bytes
        naive_memory_ratio = peak_extra_bytes(contest.memory[1]) / output_bytes
    other_load = monitor.stop()
    return Row(
        backend=backend.name,
        device=backend.device,
        dtype=dtype,
        shape=shape,
        case=case,
        ours_ms=ours * 1e3,
        baseline=contest.baseline_name,
        baseline_ms=base * 1e3,
        ratio=ours / base,
        overhead_us=(ours - base) * 1e6,
        copy_ms=None if copy is None else copy * 1e3,
        copies=None if copy is None else ours / copy,
        memory_ratio=memory_ratio,
        naive_memory_ratio=naive_memory_ratio,
        repeats=repeats,
        loops=tuple(loops),
        other_load=other_load,
    )


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(size) for size in shape) + ")"


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32,64,56,56"`` (parentheses and spaces allowed) -> ``(32, 64, 56, 56)``;
    channel axis 1, more than one value per channel (training)."""
    parts = [part.strip() for part in text.strip().strip("()[]").split(",") if part.strip()]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is comma-separated sizes like 32,64,56,56, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape needs at least two positive sizes (N,C,...), got {text!r}")
    if math.prod(shape) // shape[1] < 2:
        raise argparse.ArgumentTypeError(f"training needs more than one value per channel, got {text!r}")
    return shape


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_name() -> str | None:
    """The name of the first GPU that a loaded GPU library sees, or None."""
    torch, cupy, jax = (sys.modules.get(name) for name in ("torch", "cupy", "jax"))
    try:
        if torch is not None and torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
        if cupy is not None and cupy_device_count(cupy) > 0:
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        if jax is not None:
            devices = [d for d in jax.devices() if d.platform == "gpu"]
            return str(devices[0].device_kind) if devices else None
    except Exception:  # noqa: BLE001 - a description, never a reason to fail the run
        return None
    return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (call after the backends are loaded)."""
    torch = sys.modules.get("torch")
    cupy = sys.modules.get("cupy")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "portable_bn": __version__,
        "numpy": np.__version__,
        "torch": _version("torch"),
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "jax": _version("jax"),
        "cupy": None if cupy is None else cupy.__version__,
        "gpu": gpu_name(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "other_load": other_load_now(),
    }


def machine_lines(machine: dict[str, Any]) -> list[str]:
    versions = [f"numpy {machine['numpy']}"]
    for name in ("torch", "jax", "cupy"):
        if machine[name] is not None:
            threads = f" ({machine['torch_threads']} threads)" if name == "torch" and machine["torch_threads"] else ""
            versions.append(f"{name} {machine[name]}{threads}")
    coretype = machine["openblas_coretype"]
    load, others = machine["load_average"], machine["other_load"]
    return [
        f"portable_bn {machine['portable_bn']} bench, {machine['date']}",
        f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
        f"{machine['platform']}, Python {machine['python']}"
        + ("" if load is None else f"; at start: load average {load[0]:.2f}")
        + ("" if others is None else f", {others:.0%} of the CPUs used by other processes"),
        f"versions: {', '.join(versions)}; OPENBLAS_CORETYPE {'unset' if coretype is None else '=' + coretype}",
        *([f"GPU: {machine['gpu']}"] if machine.get("gpu") else []),
    ]


def skipped_lines(skipped: Sequence[str]) -> list[str]:
    """``"not measured: NAME (why)"`` for each ``"NAME: why"``."""
    lines = []
    for reason in skipped:
        name, _, why = reason.partition(": ")
        lines.append(f"not measured: {name} ({why})" if why else f"not measured: {reason}")
    return lines


# -- reading a JSON document back ---------------------------------------------


def load_rows(path_or_document: str | os.PathLike[str] | dict[str, Any]) -> list[Row]:
    """The rows of a document written by ``python -m portable_bn bench --json PATH``.

    ``path_or_document`` is the file's path or the document already parsed (a dict
    with a ``"rows"`` list). Shapes and loop counts come back as tuples, so the rows
    compare equal to the measured ones and :func:`write_plot`, :func:`table_lines` and
    :func:`summary_lines` accept them. Keys that :class:`Row` does not have are ignored.
    """
    if isinstance(path_or_document, dict):
        document = path_or_document
    else:
        with open(path_or_document, encoding="utf-8") as handle:
            document = json.load(handle)
    names = {field.name for field in fields(Row)}
    rows = []
    for item in document["rows"]:
        values = {key: value for key, value in item.items() if key in names}
        values["shape"] = tuple(int(size) for size in values["shape"])
        values["loops"] = tuple(int(count) for count in values["loops"])
        rows.append(Row(**values))
    return rows


# -- output -------------------------------------------------------------------


def _size(row: Row) -> int:
    return math.prod(row.shape)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.{digits - 1}f}"
    return f"{value:.{digits}g}"


def _ratio(value: float) -> str:
    """Two decimals, or two significant digits below 0.1 (never a bare 0.00)."""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


@dataclass(frozen=True)
class Column:
    """A column of the table: its header, its line in the legend and its cell for a row."""

    header: str
    legend: str
    cell: Callable[[Row], str]
    left: bool = False


COLUMNS = (
    Column("backend", "the array library and device, as named by --backend", lambda r: r.backend, True),
    Column("dtype", "the dtype of the input", lambda r: r.dtype, True),
    Column("shape", "the shape of the input (N,C,...), channels on axis 1", lambda r: shape_text(r.shape), True),
    Column(
        "case",
        "train: batch_norm(training=True); eval: batch_norm(training=False); backward: batch_norm_backward",
        lambda r: r.case,
        True,
    ),
    Column("ours ms", "our time per call in milliseconds (median of the samples)", lambda r: _number(r.ours_ms)),
    Column("baseline", "what ours is timed against, on the same data:", lambda r: r.baseline, True),
    Column("base ms", "the baseline's time per call in milliseconds", lambda r: _number(r.baseline_ms)),
    Column("ours/base", "our time divided by the baseline's; below 1: ours is faster", lambda r: _ratio(r.ratio)),
    Column(
        "ours-base us",
        f"our time minus the baseline's per call in microseconds (negative: ours is faster); "
        f"the fixed cost that matters for small inputs, shown under {SMALL_SIZE} elements",
        lambda r: f"{r.overhead_us:.1f}" if _size(r) < SMALL_SIZE else "-",
    ),
    Column(
        "copy ms",
        "time of copying an array of the input's size and dtype (NumPy, CuPy), in milliseconds",
        lambda r: _number(r.copy_ms),
    ),
    Column(
        "ours/copy",
        "our time divided by the copy's; the copy is the memory-bandwidth floor",
        lambda r: "-" if r.copies is None else _ratio(r.copies),
    ),
    Column(
        "mem/out",
        "peak extra memory during our call divided by the size of the output (NumPy, training)",
        lambda r: "-" if r.memory_ratio is None else f"{r.memory_ratio:.2f}",
    ),
    Column(
        "other CPU",
        "share of the CPUs other processes used while the row was measured; high values disturb the row",
        lambda r: "-" if r.other_load is None else f"{r.other_load:.0%}",
    ),
)
"""The table's columns, in order; a column that is "-" in every row is left out."""

BASELINES = {
    "naive": "the textbook formulas written with the same library (NumPy, CuPy)",
    "naive jit": "the textbook formulas in jax.numpy, under jax.jit like ours",
    "F.batch_norm": "torch.nn.functional.batch_norm",
    "autograd": "torch.autograd.grad through torch.nn.functional.batch_norm",
    "torch F.batch_norm": "torch.nn.functional.batch_norm on the same CUDA data",
    "torch autograd": "torch.autograd.grad through torch.nn.functional.batch_norm on the same CUDA data",
}
"""What each baseline name of the table is."""


def _columns(rows: Sequence[Row]) -> list[Column]:
    return [c for c in COLUMNS if c.header in {"backend", "baseline"} or any(c.cell(r) != "-" for r in rows)]


def table_lines(rows: Sequence[Row]) -> list[str]:
    """The table: one line per row, aligned, under a header."""
    if not rows:
        return []
    columns = _columns(rows)
    cells = [tuple(c.header for c in columns), *(tuple(c.cell(r) for c in columns) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in [cells[0], tuple("-" * w for w in widths), *cells[1:]]:
        parts = [
            cell.ljust(w) if column.left else cell.rjust(w)
            for cell, w, column in zip(line, widths, columns, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


def legend_lines(rows: Sequence[Row]) -> list[str]:
    """One line per column of :func:`table_lines` saying what it shows (and one per baseline)."""
    if not rows:
        return []
    columns = _columns(rows)
    width = max(len(c.header) for c in columns)
    lines = ["columns:"]
    for column in columns:
        lines.append(f"  {column.header.ljust(width)}  {column.legend}")
        if column.header == "baseline":
            names = list(dict.fromkeys(r.baseline for r in rows))
            name_width = max(len(name) for name in names)
            for name in names:
                lines.append(f"  {'':{width}}    {name.ljust(name_width)}  {BASELINES.get(name, name)}")
    return lines


def _range(values: Sequence[float]) -> str:
    low, high = _ratio(min(values)), _ratio(max(values))
    return low if low == high else f"{low}-{high}"


_LARGE_TEXT = f"2**{LARGE_SIZE.bit_length() - 1}"
SIZE_BANDS = (
    (f"under {SMALL_SIZE} elements", lambda size: size < SMALL_SIZE),
    (f"{SMALL_SIZE} to {_LARGE_TEXT} elements", lambda size: SMALL_SIZE <= size < LARGE_SIZE),
    (f"{_LARGE_TEXT} elements or more", lambda size: size >= LARGE_SIZE),
)


def summary_lines(rows: Sequence[Row]) -> list[str]:
    """Per backend and baseline, per input size and case: the range of ours/base over the
    dtypes and shapes measured."""
    groups = list(dict.fromkeys((r.backend, r.baseline) for r in rows))
    if not groups:
        return []
    lines = ["summary: ours/base by input size, lowest-highest over the dtypes and shapes measured"]
    heads = [f"{backend} vs {baseline}" for backend, baseline in groups]
    head_width = max(len(head) for head in heads)
    band_width = max(len(band) for band, _ in SIZE_BANDS)
    for head, (backend, baseline) in zip(heads, groups, strict=True):
        mine = [r for r in rows if (r.backend, r.baseline) == (backend, baseline)]
        for band, within in SIZE_BANDS:
            banded = [r for r in mine if within(_size(r))]
            if not banded:
                continue
            ranges = [
                f"{case} {_range([r.ratio for r in banded if r.case == case])}"
                for case in CASES
                if any(r.case == case for r in banded)
            ]
            lines.append(f"  {head.ljust(head_width)}  {(band + ':').ljust(band_width + 1)}  {', '.join(ranges)}")
            head = ""
    return lines


_LIBRARIES = {"numpy": "NumPy", "cupy": "CuPy"}


def _baseline_words(backend: str, name: str) -> str:
    """A baseline as a plot title names it."""
    if name == "naive":
        return f"naive {_LIBRARIES.get(backend, backend)}"
    if name == "naive jit":
        return "naive jax.numpy under jit"
    if name.startswith("torch "):
        return name
    return f"torch {name}"


def _panel_title(backend: str, field: str, rows: Sequence[Row]) -> str:
    if field == "copies":
        return f"{backend}: our time / time of an array copy"
    by_name: dict[str, list[str]] = {}
    for r in rows:
        cases = by_name.setdefault(r.baseline, [])
        if r.case not in cases:
            cases.append(r.case)
    if len(by_name) == 1:
        return f"{backend}: our time / {_baseline_words(backend, next(iter(by_name)))}"
    parts = [f"{_baseline_words(backend, name)} ({', '.join(cases)})" for name, cases in by_name.items()]
    return f"{backend}: our time / {', '.join(parts)}"


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(rows: Sequence[Row], path: str | os.PathLike[str]) -> None:
    """Bar charts of the ratios on a log scale, one panel per backend and baseline (our time
    over the baseline's; for NumPy and CuPy also over an array copy's), with a line at 1.

    ``rows`` may be measured or read back with :func:`load_rows`."""
    figure_module = importlib.import_module("matplotlib.figure")
    ticker = importlib.import_module("matplotlib.ticker")
    present = list(dict.fromkeys(r.backend for r in rows))
    backends = [name for name in BACKENDS if name in present] + [name for name in present if name not in BACKENDS]
    panels = [
        (name, field)
        for name in backends
        for field in ("copies", "ratio")
        if any(r.backend == name and getattr(r, field) is not None for r in rows)
    ]
    if not panels:
        raise ValueError("no rows to plot")
    groups_count = max(len({(r.dtype, r.shape) for r in rows if r.backend == name}) for name in backends)
    figure = figure_module.Figure(figsize=(max(6.0, 1.1 * groups_count + 2), 2.8 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    width = 0.8 / len(CASES)
    for ax, (name, field) in zip(axes, panels, strict=True):
        mine = [r for r in rows if r.backend == name and getattr(r, field) is not None]
        groups = list(dict.fromkeys((r.dtype, r.shape) for r in mine))
        for j, case in enumerate(CASES):
            points = [(groups.index((r.dtype, r.shape)), getattr(r, field)) for r in mine if r.case == case]
            if points:
                ax.bar([i + (j - 1) * width for i, _ in points], [v for _, v in points], width, label=case)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        low, high = ax.get_ylim()
        if math.floor(math.log10(high)) - math.ceil(math.log10(low)) < 1:  # fewer than two powers of 10 to read
            if high > 10 * low:
                ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=6)
        else:
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(range(len(groups)), [f"{dtype}\n{shape_text(shape)}" for dtype, shape in groups], fontsize=7)
        ax.set_ylabel("ours / copy" if field == "copies" else "ours / baseline")
        ax.set_title(_panel_title(name, field, mine), fontsize=9)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


# -- the cost of synchronization ----------------------------------------------
#
# ``--sync``: one table, a row per engine and case, of what ``sync=`` costs per call. Each engine
# runs in child processes of its own (torch.distributed needs one per replica, JAX must see its
# forced CPU devices before it is imported, Dask starts a cluster), each under a timeout; every
# child is started in a session of its own and its process group is killed when it is done.

SYNC_ENGINES = ("torch", "jax", "dask")
"""The engines of the synchronization table, as ``--sync-engine`` names them."""
SYNC_ENGINE_NAMES = {"torch": "torch.distributed", "jax": "jax.shard_map", "dask": "dask.distributed"}
SYNC_REPLICAS = {"torch": 2, "jax": 4, "dask": 2}
"""Processes (torch), forced CPU devices (JAX) and worker processes (Dask) sharing the batch."""
SYNC_SHAPE = (32, 64, 28, 28)
"""The global batch of the synchronization table: a ResNet-like layer, split along the batch."""
QUICK_SYNC_SHAPE = (8, 4, 4, 4)
SYNC_DTYPE = "float32"
SYNC_CASES = ("train", "backward", "train+autograd")
SYNC_REPEATS = 21
"""Samples per timing of the synchronization table when ``--repeats`` is not given."""
SYNC_TIMEOUT_SECONDS = 300.0
"""Longest wait for one engine's child processes, start-up included; they are killed after it."""
QUICK_SYNC_TIMEOUT_SECONDS = 120.0
_SYNC_MARK = "portable_bn bench sync result: "
_SYNC_NEEDS = {"torch": ("torch",), "jax": ("jax",), "dask": ("dask", "distributed")}


@dataclass(frozen=True)
class SyncRow:
    """One engine and case of the synchronization table. Times are medians per call."""

    engine: str
    replicas: int
    shape: tuple[int, ...]
    """The global batch, split in equal parts along axis 0 over the replicas."""
    dtype: str
    case: str
    collectives: str
    """What one call with sync does between the replicas, in words."""
    collective_calls: int | None
    """Collectives per call with sync (None for Dask, which has none)."""
    collective_numbers: int | None
    """Numbers each replica sends into them per call, all collectives together."""
    sync_ms: float
    local_ms: float
    overhead_us: float
    """(sync - local) in microseconds: the cost of synchronizing one call."""
    ratio: float
    """sync / local."""
    alone_ms: float | None
    """The synchronized code path with a reducer of one replica (:class:`Alone`): no communication."""
    communication_us: float | None
    """(sync - alone) in microseconds: what the communication costs one call."""
    bare_ms: float | None
    """The collectives alone, replayed on arrays of the same sizes."""
    repeats: int
    loops: dict[str, int]
    """Calls per sample of each timing: sync, local, alone, bare."""
    other_load: float | None = None


def sync_unavailable(engine: str) -> str | None:
    """Why ``engine`` cannot be measured here (``"NAME: why"``), or None; imports nothing."""
    missing = [module for module in _SYNC_NEEDS[engine] if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return f"{SYNC_ENGINE_NAMES[engine]}: {' and '.join(missing)} {verb} not installed"


def _replica_arrays(config: dict[str, Any], index: int) -> list[np.ndarray]:
    """x, grad_output (replica ``index``'s rows) and the four per-channel vectors (whole)."""
    host = host_data(tuple(config["shape"]), config["dtype"])
    part = config["shape"][0] // config["replicas"]
    rows = slice(index * part, (index + 1) * part)
    return [np.ascontiguousarray(host[key][rows]) if key in ("x", "grad_output") else host[key] for key in _KEYS]


class Alone:
    """A reducer of one replica: ``gather`` and ``sum`` return their input, so a call with
    ``sync=Alone()`` runs the synchronized code path without communicating (the table's
    "alone" time, which separates that path's own cost from the collectives')."""

    size = 1

    def gather(self, array: Any) -> Any:
        return array[None, ...]

    def sum(self, array: Any) -> Any:
        return array


@dataclass(frozen=True)
class _SyncCase:
    """The calls timed for one case of one engine."""

    sync: Callable[[], object]
    local: Callable[[], object]
    alone: Callable[[], object] | None = None
    bare: Callable[[], object] | None = None


def _time_sync_cases(
    cases: dict[str, _SyncCase],
    config: dict[str, Any],
    *,
    extra: Sequence[Callable[[], object]] = (),
    agree: Callable[[float], float] | None = None,
    before_sample: Callable[[], object] | None = None,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Every case's calls (with sync, without, alone, bare) sampled in turn in one run: per
    case the seconds per call of each and the calls per sample; and the seconds of ``extra``."""
    kinds = ("sync", "local", "alone", "bare")
    fns: list[Callable[[], object]] = []
    where: list[dict[str, int]] = []
    for case in cases.values():
        slots = {}
        for kind in kinds:
            fn = getattr(case, kind)
            if fn is not None:
                slots[kind] = len(fns)
                fns.append(fn)
        where.append(slots)
    first_extra = len(fns)
    fns += list(extra)
    times, loops = interleaved_medians(
        fns,
        repeats=config["repeats"],
        sample_seconds=config["sample_seconds"],
        agree=agree,
        before_sample=before_sample,
    )
    results = []
    for name, slots in zip(cases, where, strict=True):
        result: dict[str, Any] = {"case": name}
        result.update({f"{kind}_s": times[slots[kind]] if kind in slots else None for kind in kinds})
        result["loops"] = {kind: loops[i] for kind, i in slots.items()}
        results.append(result)
    return results, times[first_extra:]


def _collective(kind: str, shapes: Sequence[Sequence[int]], dtype: str) -> dict[str, Any]:
    return {"kind": kind, "shapes": [list(shape) for shape in shapes], "dtype": dtype}


def collectives_text(ops: Sequence[dict[str, Any]]) -> str:
    """``KIND(n)`` per collective, n the numbers each replica sends into it; ``+`` between them."""
    if not ops:
        return "none"
    parts = []
    for op in ops:
        sizes = [str(math.prod(shape)) for shape in op["shapes"]]
        parts.append(f"{op['kind']}({'+'.join(sizes)})")
    return " + ".join(parts)


def _numbers(ops: Sequence[dict[str, Any]]) -> int:
    return sum(math.prod(shape) for op in ops for shape in op["shapes"])


# torch.distributed


def _record_torch_collectives(dist: Any, fn: Callable[[], object]) -> list[dict[str, Any]]:
    """The all-gathers and all-reduces that one call of ``fn`` makes (the reducer's only ones)."""
    seen: list[dict[str, Any]] = []
    all_gather, all_reduce = dist.all_gather, dist.all_reduce

    def gather(outputs: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(_collective("all_gather", [tuple(tensor.shape)], str(tensor.dtype).removeprefix("torch.")))
        return all_gather(outputs, tensor, *args, **kwargs)

    def reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(_collective("all_reduce", [tuple(tensor.shape)], str(tensor.dtype).removeprefix("torch.")))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_gather, dist.all_reduce = gather, reduce
    try:
        fn()
    finally:
        dist.all_gather, dist.all_reduce = all_gather, all_reduce
    return seen


def _torch_replay(torch: Any, dist: Any, ops: Sequence[dict[str, Any]]) -> Callable[[], object] | None:
    """The collectives ``ops`` alone, on zeros of the same shapes and dtypes."""
    if not ops:
        return None
    world = dist.get_world_size()
    tensors = [torch.zeros(op["shapes"][0], dtype=getattr(torch, op["dtype"])) for op in ops]

    def replay() -> object:
        for op, tensor in zip(ops, tensors, strict=True):
            if op["kind"] == "all_gather":
                dist.all_gather([torch.empty_like(tensor) for _ in range(world)], tensor)
            else:
                dist.all_reduce(tensor)
        return None

    return replay


def _torch_sync_batch_norm(torch: Any, x: Any) -> tuple[str, Callable[[], object] | None]:
    """What torch.nn.SyncBatchNorm does with this CPU tensor over gloo: a note, and its
    training forward to time where it runs."""
    module = torch.nn.SyncBatchNorm(x.shape[1])
    try:
        with torch.no_grad():
            module(x)
    except Exception as exc:  # noqa: BLE001 - its refusal is the finding
        gist = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"torch.nn.SyncBatchNorm refuses this CPU tensor over gloo: {type(exc).__name__}: {gist}", None

    def forward() -> object:
        with torch.no_grad():
            return module(x)

    return "torch.nn.SyncBatchNorm runs here", forward


def _torch_sync_child(config: dict[str, Any]) -> dict[str, Any]:
    """One process of the torch.distributed measurement (rank ``config["rank"]``)."""
    torch = importlib.import_module("torch")
    dist: Any = importlib.import_module("torch.distributed")
    from .distributed import TorchProcessGroup

    rank, world = config["rank"], config["replicas"]
    torch.set_num_threads(config["threads"])
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{config['port']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=config["timeout"]),
    )
    try:
        x, g, rm, rv, w, b = (torch.from_numpy(array) for array in _replica_arrays(config, rank))
        reducer, alone = TorchProcessGroup(), Alone()
        forwards = {sync: batch_norm(x, rm, rv, w, b, training=True, sync=sync) for sync in (reducer, alone, None)}
        leaves = tuple(t.clone().requires_grad_(True) for t in (x, w, b))

        def train(sync: Any) -> Callable[[], object]:
            return lambda: batch_norm(x, rm, rv, w, b, training=True, sync=sync)

        def backward(sync: Any) -> Callable[[], object]:
            forward = forwards[sync]
            return lambda: batch_norm_backward(g, x, w, forward.mean, forward.invstd, training=True, sync=sync)

        def autograd(sync: Any) -> Callable[[], object]:
            def call() -> object:
                output = batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training=True, sync=sync).output
                return torch.autograd.grad(output, leaves, g)

            return call

        makers = {"train": train, "backward": backward, "train+autograd": autograd}
        ops = {case: _record_torch_collectives(dist, make(reducer)) for case, make in makers.items()}
        local_ops = {case: _record_torch_collectives(dist, make(None)) for case, make in makers.items()}
        cases = {
            case: _SyncCase(make(reducer), make(None), make(alone), _torch_replay(torch, dist, ops[case]))
            for case, make in makers.items()
        }
        note, native = _torch_sync_batch_norm(torch, x)

        def agree(seconds: float) -> float:
            value = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return float(value[0])

        results, extra = _time_sync_cases(
            cases, config, extra=[native] if native else [], agree=agree, before_sample=dist.barrier
        )
        if extra:
            note += f": {_number(extra[0] * 1e3)} ms per training forward (process {rank})"
        for result in results:
            result["ops"], result["local_ops"] = ops[result["case"]], local_ops[result["case"]]
        return {"cases": results, "notes": [note] if rank == 0 else []}
    finally:
        dist.destroy_process_group()


# JAX

_XLA_DTYPES = {"pred": "bool", "bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}
_XLA_COLLECTIVE = re.compile(
    r"= (\([^=]*?\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def _xla_group_size(line: str) -> int | None:
    """The size of the replica groups of an HLO collective, in either notation XLA prints."""
    listed = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.search(r"replica_groups=\[[0-9]+,([0-9]+)\]", line)
    return int(iota.group(1)) if iota else None


def xla_collectives(hlo: str) -> list[dict[str, Any]]:
    """The collectives of a compiled XLA program (its ``as_text()``), in program order, with
    the shapes of the arrays each replica puts in (read from the results: an all-gather's
    divided by its group size, a reduce-scatter's multiplied); a collective of several arrays
    at once (XLA combines them) counts once."""
    ops = []
    for line in hlo.splitlines():
        found = _XLA_COLLECTIVE.search(line)
        if found is None:
            continue
        result, kind = found.groups()
        arrays = re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", result)
        shapes = [[int(size) for size in sizes.split(",") if size] for _, sizes in arrays]
        group = _xla_group_size(line)
        if group and kind in ("all-gather", "reduce-scatter"):
            axis = 0  # the gathered or scattered axis: shown as the first one
            if (found_axis := re.search(r"dimensions=\{([0-9]+)\}", line)) is not None:
                axis = int(found_axis.group(1))
            for shape in shapes:
                if axis < len(shape):
                    shape[axis] = shape[axis] // group if kind == "all-gather" else shape[axis] * group
        dtype = _XLA_DTYPES.get(arrays[0][0], arrays[0][0]) if arrays else "?"
        ops.append(_collective(kind, shapes, dtype))
    return ops


def _jax_replay(jax: Any, mesh: Any, ops: Sequence[dict[str, Any]]) -> Callable[[], object] | None:
    """The all-reduces ``ops`` alone (jax.lax.psum of zeros of the same shapes), under jit."""
    if not ops or any(op["kind"] != "all-reduce" for op in ops):
        return None
    sharding = importlib.import_module("jax.sharding")
    split, whole = sharding.PartitionSpec("batch"), sharding.PartitionSpec()
    replicas = mesh.devices.size
    groups = [
        tuple(
            jax.device_put(np.zeros((replicas, *shape), op["dtype"]), sharding.NamedSharding(mesh, split))
            for shape in op["shapes"]
        )
        for op in ops
    ]

    def body(*parts: Any) -> Any:
        return tuple(jax.lax.psum(tuple(a[0] for a in group), "batch") for group in parts)

    specs = tuple(tuple(split for _ in group) for group in groups)
    program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=whole))
    return lambda: jax.block_until_ready(program(*groups))


def _jax_sync_child(config: dict[str, Any]) -> dict[str, Any]:
    """The JAX measurement: shard_map over forced CPU devices (XLA_FLAGS set by the parent)."""
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")
    sharding = importlib.import_module("jax.sharding")
    from .distributed import JaxAxis

    replicas = config["replicas"]
    devices = jax.devices("cpu")
    if len(devices) < replicas:
        raise RuntimeError(f"JAX sees {len(devices)} CPU devices, not {replicas}: XLA_FLAGS was not applied")
    mesh = sharding.Mesh(np.array(devices[:replicas]), ("batch",))
    split, whole = sharding.PartitionSpec("batch"), sharding.PartitionSpec()

    def put(array: np.ndarray, spec: Any) -> Any:
        return jax.device_put(array, sharding.NamedSharding(mesh, spec))

    host = host_data(tuple(config["shape"]), config["dtype"])
    x, g = put(host["x"], split), put(host["grad_output"], split)
    rm, rv = put(host["running_mean"], whole), put(host["running_var"], whole)
    # Weight and bias as one copy per device: their gradients stay each device's share, as
    # torch's do (data-parallel training adds those up for every parameter, synced or not).
    w, b = (put(np.tile(host[key], replicas), split) for key in ("weight", "bias"))
    reducer, alone = JaxAxis("batch"), Alone()

    def forward(sync: Any) -> Any:
        def body(x: Any, rm: Any, rv: Any, w: Any, b: Any) -> Any:
            r = batch_norm(x, rm, rv, w, b, training=True, sync=sync)
            return r.output, r.running_mean, r.running_var, r.mean, r.invstd

        stats = whole if sync is reducer else split  # synchronized: every device holds the same statistics
        specs = (split, stats, stats, stats, stats)
        return jax.shard_map(body, mesh=mesh, in_specs=(split, whole, whole, split, split), out_specs=specs)

    def backward(sync: Any) -> Any:
        def body(g: Any, x: Any, w: Any, mean: Any, invstd: Any) -> Any:
            return tuple(batch_norm_backward(g, x, w, mean, invstd, training=True, sync=sync))

        stats = whole if sync is reducer else split
        return jax.shard_map(body, mesh=mesh, in_specs=(split, split, split, stats, stats), out_specs=split)

    def autograd(sync: Any) -> Any:
        mapped = forward(sync)

        def loss(x: Any, w: Any, b: Any, rm: Any, rv: Any, g: Any) -> Any:
            return jnp.sum(mapped(x, rm, rv, w, b)[0] * g)

        return jax.grad(loss, argnums=(0, 1, 2))

    programs: dict[str, dict[Any, tuple[Any, tuple[Any, ...]]]] = {case: {} for case in SYNC_CASES}
    for sync in (reducer, alone, None):
        train = jax.jit(forward(sync))
        stats = train(x, rm, rv, w, b)
        programs["train"][sync] = (train, (x, rm, rv, w, b))
        programs["backward"][sync] = (jax.jit(backward(sync)), (g, x, w, stats[3], stats[4]))
        programs["train+autograd"][sync] = (jax.jit(autograd(sync)), (x, w, b, rm, rv, g))

    def call(program: Any, args: tuple[Any, ...]) -> Callable[[], object]:
        return lambda: jax.block_until_ready(program(*args))

    ops = {case: xla_collectives(p.lower(*a).compile().as_text()) for case, (p, a) in _each(programs, reducer)}
    local_ops = {case: xla_collectives(p.lower(*a).compile().as_text()) for case, (p, a) in _each(programs, None)}
    cases = {
        case: _SyncCase(
            call(*programs[case][reducer]),
            call(*programs[case][None]),
            call(*programs[case][alone]),
            _jax_replay(jax, mesh, ops[case]),
        )
        for case in SYNC_CASES
    }
    results, _ = _time_sync_cases(cases, config)
    for result in results:
        result["ops"], result["local_ops"] = ops[result["case"]], local_ops[result["case"]]
    return {"cases": results, "notes": []}


def _each(programs: dict[str, dict[Any, Any]], sync: Any) -> list[tuple[str, Any]]:
    return [(case, by_sync[sync]) for case, by_sync in programs.items()]


# Dask


def _dask_worker_sent(dask_worker: Any) -> int:
    """Bytes this Dask worker has sent to other workers (run on every worker by ``Client.run``)."""
    return int(dask_worker.transfer_outgoing_bytes_total)


def _dask_numbers(chunk: Any, count: int) -> np.ndarray:
    """Stands for a chunk's packed statistics: ``count`` numbers made on the chunk's worker."""
    return np.zeros(count, dtype=chunk.dtype)


def _dask_stack(*parts: np.ndarray) -> np.ndarray:
    return np.stack(parts)


def _dask_tasks(*arrays: Any) -> int | None:
    """Tasks in the graph of ``arrays`` together (None where Dask does not say)."""
    keys: set[Any] = set()
    try:
        for array in arrays:
            keys |= set(array.__dask_graph__().keys())
    except (AttributeError, TypeError):
        return None
    return len(keys)


def _dask_sync_child(config: dict[str, Any]) -> dict[str, Any]:
    """The Dask measurement: a LocalCluster of worker processes on 127.0.0.1 against the
    threaded scheduler of this process, on the same chunked arrays."""
    dask = importlib.import_module("dask")
    da = importlib.import_module("dask.array")
    distributed = importlib.import_module("distributed")

    replicas = config["replicas"]
    shape = tuple(config["shape"])
    part = (shape[0] // replicas, *shape[1:])
    host = host_data(shape, config["dtype"])
    channels = shape[1]
    cluster = distributed.LocalCluster(
        n_workers=replicas, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    with cluster, distributed.Client(cluster, timeout=config["timeout"]) as client:
        addresses = sorted(client.scheduler_info()["workers"])
        if len(addresses) < replicas:
            raise RuntimeError(f"the cluster started {len(addresses)} workers, not {replicas}")

        def scattered(key: str) -> tuple[Any, list[Any]]:
            """The array with its i-th chunk held by the i-th worker."""
            rows = part[0]
            futures = [
                client.scatter(host[key][i * rows : (i + 1) * rows], workers=[address])
                for i, address in enumerate(addresses)
            ]
            chunks = [da.from_delayed(f, shape=part, dtype=host[key].dtype) for f in futures]
            return da.concatenate(chunks, axis=0), futures

        (x_remote, x_futures), (g_remote, _) = scattered("x"), scattered("grad_output")
        remote = (x_remote, g_remote, *(da.from_array(host[key], chunks=-1) for key in _KEYS[2:]))
        local = (
            *(da.from_array(host[key], chunks=part) for key in ("x", "grad_output")),
            *(da.from_array(host[key], chunks=-1) for key in _KEYS[2:]),
        )

        def on_cluster(*arrays: Any) -> list[Any]:
            persisted = client.persist(list(arrays))
            distributed.wait(distributed.futures_of(persisted))  # the results stay on the workers
            return list(persisted)

        def threaded(*arrays: Any) -> list[Any]:
            return list(dask.persist(*arrays, scheduler="threads", num_workers=replicas))

        def train_graph(arrays: tuple[Any, ...]) -> tuple[Any, ...]:
            x, _, rm, rv, w, b = arrays
            r = batch_norm(x, rm, rv, w, b, training=True)
            return r.output, r.running_mean, r.running_var

        def backward_graph(arrays: tuple[Any, ...], run: Callable[..., list[Any]]) -> Callable[[], tuple[Any, ...]]:
            x, g, rm, rv, w, b = arrays
            forward = batch_norm(x, rm, rv, w, b, training=True)
            mean, invstd = run(forward.mean, forward.invstd)
            return lambda: tuple(batch_norm_backward(g, x, w, mean, invstd, training=True))

        graphs = {
            "train": {on_cluster: lambda: train_graph(remote), threaded: lambda: train_graph(local)},
            "backward": {on_cluster: backward_graph(remote, on_cluster), threaded: backward_graph(local, threaded)},
        }

        def call(run: Callable[..., list[Any]], graph: Callable[[], tuple[Any, ...]]) -> Callable[[], object]:
            def persist() -> object:
                run(*graph())  # the results are dropped: the next call computes them again
                return None

            return persist

        def bare(count: int) -> Callable[[], object]:
            def gather() -> object:
                parts = [client.submit(_dask_numbers, f, count, pure=False) for f in x_futures]
                distributed.wait(client.submit(_dask_stack, *parts, pure=False))
                return None

            return gather

        numbers = {"train": 4 * channels + 1, "backward": 2 * channels + 1}
        cases = {
            case: _SyncCase(call(on_cluster, g[on_cluster]), call(threaded, g[threaded]), bare=bare(numbers[case]))
            for case, g in graphs.items()
        }
        moved = {}
        for name, case in cases.items():
            case.sync()
            before = sum(client.run(_dask_worker_sent).values())
            case.sync()
            moved[name] = sum(client.run(_dask_worker_sent).values()) - before
        results, _ = _time_sync_cases(cases, config)
        for result in results:
            case = result["case"]
            result["ops"] = result["local_ops"] = []
            result["tasks"] = _dask_tasks(*graphs[case][on_cluster]())
            result["bytes_between_workers"] = moved[case]
    return {"cases": results, "notes": []}


# the parent


def sync_child() -> None:
    """A child process of the synchronization table: ``python -c`` with the settings as JSON
    in ``sys.argv[1]``; prints its result as one JSON line after a mark."""
    config = json.loads(sys.argv[1])
    child = {"torch": _torch_sync_child, "jax": _jax_sync_child, "dask": _dask_sync_child}[config["engine"]]
    result = child(config)
    print(_SYNC_MARK + json.dumps(result), flush=True)


_CHILD_CODE = "from portable_bn._bench import sync_child; sync_child()"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _child_environment(engine: str, replicas: int) -> dict[str, str]:
    """This environment, with this package importable, and what the engine's children need."""
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if engine == "jax":
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={replicas}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    if engine == "torch" and sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    return env


def _gist(stderr: str) -> str:
    """The last line of a child's standard error that says something (its exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "no message"
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines)[-1][:300]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the child's process group (it leads a session of its own) and wait for the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_sync_children(configs: Sequence[dict[str, Any]], env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    """Run one child per configuration at once and return their results, in order; kills
    them all when one fails or after ``timeout`` seconds, and raises RuntimeError saying why.

    Every child leads a session of its own; its process group (with what it started, such
    as Dask's workers) is killed and the child waited for however this returns."""
    with contextlib.ExitStack() as stack:
        children: list[tuple[subprocess.Popen[bytes], Any, Any]] = []
        for config in configs:
            out = stack.enter_context(tempfile.TemporaryFile())
            err = stack.enter_context(tempfile.TemporaryFile())
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
            stack.callback(_stop, process)
            children.append((process, out, err))
        deadline = time.monotonic() + timeout
        while True:
            codes = [process.poll() for process, _, _ in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed or all(code == 0 for code in codes):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no result within {timeout:.0f} s; its processes were killed")
            time.sleep(0.05)
        texts = []
        for _, out, err in children:
            out.seek(0)
            err.seek(0)
            texts.append((out.read().decode(errors="replace"), err.read().decode(errors="replace")))
        if failed:
            i, code = failed[0]
            which = f"child process {i + 1} of {len(children)}" if len(children) > 1 else "its child process"
            raise RuntimeError(f"{which} exited with status {code}: {_gist(texts[i][1])}")
        results = []
        for stdout, stderr in texts:
            marked = [line for line in stdout.splitlines() if line.startswith(_SYNC_MARK)]
            if not marked:
                raise RuntimeError(f"a child process gave no result: {_gist(stderr)}")
            results.append(json.loads(marked[-1][len(_SYNC_MARK) :]))
        return results


def sync_engine_setup(engine: str, replicas: int, threads: int | None = None) -> str:
    """How an engine's replicas run, in words (the table's "engines:" lines)."""
    if engine == "torch":
        return (
            f"{replicas} processes started by the bench, joined by gloo over 127.0.0.1, each holding "
            f"1/{replicas} of the batch and using {threads} torch thread(s); sync=TorchProcessGroup(); "
            "times are the slower process's"
        )
    if engine == "jax":
        return (
            f"{replicas} CPU devices forced in one child process (XLA_FLAGS="
            f"--xla_force_host_platform_device_count={replicas}), 1/{replicas} of the batch each; "
            'jax.shard_map under jax.jit, sync=JaxAxis("batch"); local: the same shard_map without sync'
        )
    return (
        f"a LocalCluster of {replicas} worker processes (1 thread each) on 127.0.0.1, the batch in "
        f"{replicas} chunks, one held by each worker; no reducer: a chunked array is the global batch; "
        f"sync: the graph computed on the cluster; local: the same graph on the threaded scheduler "
        f"({replicas} threads) in one process, so the difference is the distributed scheduler's cost"
    )


def measure_sync_engine(
    engine: str,
    *,
    shape: tuple[int, ...],
    dtype: str,
    repeats: int,
    sample_seconds: float,
    timeout: float,
) -> tuple[list[SyncRow], str, list[str]]:
    """Measure one engine in its child processes: its rows, its setup in words and its notes.
    Raises RuntimeError (why) where the children failed or timed out."""
    replicas = SYNC_REPLICAS[engine]
    if shape[0] % replicas:
        raise ValueError(f"the batch of {shape_text(shape)} does not split into {replicas} equal parts")
    config: dict[str, Any] = {
        "engine": engine,
        "shape": list(shape),
        "dtype": dtype,
        "replicas": replicas,
        "repeats": repeats,
        "sample_seconds": sample_seconds,
        "timeout": timeout,
    }
    threads = None
    if engine == "torch":
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, usable // replicas)
        port = _free_port()
        configs = [dict(config, rank=rank, port=port, threads=threads) for rank in range(replicas)]
    else:
        configs = [config]
    monitor = OtherLoad(children=True)
    monitor.start()
    results = run_sync_children(configs, _child_environment(engine, replicas), timeout)
    other_load = monitor.stop()
    rows = []
    for i, first in enumerate(results[0]["cases"]):
        mine = [result["cases"][i] for result in results]  # torch: one per process; the slower counts

        def slowest(kind: str, mine: list[dict[str, Any]] = mine) -> float | None:
            times = [c[f"{kind}_s"] for c in mine if c[f"{kind}_s"] is not None]
            return max(times) if times else None

        sync_s, local_s = max(c["sync_s"] for c in mine), max(c["local_s"] for c in mine)
        alone_s, bare_s = slowest("alone"), slowest("bare")
        ops = first["ops"]
        if engine == "dask":
            tasks = "?" if first.get("tasks") is None else str(first["tasks"])
            text = f"none: {tasks} tasks, {_bytes_text(first['bytes_between_workers'])} between workers"
        else:
            text = collectives_text(ops)
            if first["local_ops"]:
                text += f" (without sync: {collectives_text(first['local_ops'])})"
        rows.append(
            SyncRow(
                engine=SYNC_ENGINE_NAMES[engine],
                replicas=replicas,
                shape=shape,
                dtype=dtype,
                case=first["case"],
                collectives=text,
                collective_calls=None if engine == "dask" else len(ops),
                collective_numbers=None if engine == "dask" else _numbers(ops),
                sync_ms=sync_s * 1e3,
                local_ms=local_s * 1e3,
                overhead_us=(sync_s - local_s) * 1e6,
                ratio=sync_s / local_s,
                alone_ms=None if alone_s is None else alone_s * 1e3,
                communication_us=None if alone_s is None else (sync_s - alone_s) * 1e6,
                bare_ms=None if bare_s is None else bare_s * 1e3,
                repeats=repeats,
                loops={kind: int(count) for kind, count in first["loops"].items()},
                other_load=other_load,
            )
        )
    notes = [note for result in results for note in result["notes"]]
    return rows, sync_engine_setup(engine, replicas, threads), notes


def _bytes_text(count: int) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


@dataclass(frozen=True)
class SyncColumn:
    """A column of the synchronization table: header, legend, cell."""

    header: str
    legend: str
    cell: Callable[[SyncRow], str]
    left: bool = False


SYNC_COLUMNS = (
    SyncColumn("engine", "how the replicas run and communicate (see engines below)", lambda r: r.engine, True),
    SyncColumn(
        "replicas",
        "processes (torch), devices (JAX) or worker processes (Dask) sharing the batch in equal parts",
        lambda r: str(r.replicas),
    ),
    SyncColumn(
        "case",
        "train: batch_norm(training=True); backward: batch_norm_backward(training=True) given that "
        "forward's statistics; train+autograd: the training forward and the gradients of sum(output * g) "
        "with respect to input, weight and bias (torch.autograd.grad, jax.grad)",
        lambda r: r.case,
        True,
    ),
    SyncColumn(
        "collectives",
        "what one call with sync does between the replicas, recorded while it ran (torch) or read "
        "from the compiled program (JAX): KIND(n) is one collective into which every replica puts n "
        "numbers (n = 4C+1 for the statistics' gather, 2C+1 for the backward's sum, C channels; "
        "a JAX gather is a sum of R rows, R*(4C+1)); Dask has no collective: the tasks of the graph "
        "and the bytes its workers sent each other during one call",
        lambda r: r.collectives,
        True,
    ),
    SyncColumn(
        "sync ms",
        "time per call with sync (Dask: computed on the cluster) in milliseconds, median of the samples",
        lambda r: _number(r.sync_ms),
    ),
    SyncColumn(
        "local ms",
        "the same call on the same replicas and data without sync, each replica with its own "
        "statistics (Dask: the same graph on the threaded scheduler in one process)",
        lambda r: _number(r.local_ms),
    ),
    SyncColumn(
        "sync-local us",
        "sync ms minus local ms, in microseconds: what synchronizing costs one call",
        lambda r: f"{r.overhead_us:.1f}",
    ),
    SyncColumn(
        "sync/local",
        "sync ms divided by local ms; every time of a row is sampled in turn with the others, in the same processes",
        lambda r: _ratio(r.ratio),
    ),
    SyncColumn(
        "alone ms",
        "the synchronized code path without communicating: sync= a reducer of one replica whose gather and "
        "sum return their input, each replica with its own statistics (without sync, PyTorch's own kernel "
        "serves the forward: alone ms minus local ms is the cost of leaving it)",
        lambda r: _number(r.alone_ms),
    ),
    SyncColumn(
        "sync-alone us",
        "sync ms minus alone ms, in microseconds: what the communication costs one call",
        lambda r: "-" if r.communication_us is None else f"{r.communication_us:.1f}",
    ),
    SyncColumn(
        "bare ms",
        "the collectives column's collectives alone, replayed on zeros of the same sizes (Dask: a task "
        "per chunk making 4C+1 (train) or 2C+1 (backward) numbers on its worker, and one stacking them)",
        lambda r: _number(r.bare_ms),
    ),
    SyncColumn(
        "other CPU",
        "share of the CPUs other processes used while the engine was measured (its child processes are its own)",
        lambda r: "-" if r.other_load is None else f"{r.other_load:.0%}",
    ),
)


def _aligned(headers: Sequence[str], lefts: Sequence[bool], cells: Sequence[Sequence[str]]) -> list[str]:
    """A header, a rule and the cells, each column as wide as its widest entry."""
    everything = [tuple(headers), *(tuple(line) for line in cells)]
    widths = [max(len(line[i]) for line in everything) for i in range(len(headers))]
    lines = []
    for line in [everything[0], tuple("-" * w for w in widths), *everything[1:]]:
        parts = [cell.ljust(w) if left else cell.rjust(w) for cell, w, left in zip(line, widths, lefts, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return lines


def sync_title(shape: Sequence[int], dtype: str) -> str:
    return (
        f"synchronized batch norm (sync=): the cost per call, {dtype} {shape_text(shape)} "
        "split along the batch over the replicas"
    )


def sync_table_lines(rows: Sequence[SyncRow]) -> list[str]:
    """The synchronization table: one line per engine and case."""
    if not rows:
        return []
    columns = [c for c in SYNC_COLUMNS if c.header == "engine" or any(c.cell(r) != "-" for r in rows)]
    cells = [[c.cell(r) for c in columns] for r in rows]
    return _aligned([c.header for c in columns], [c.left for c in columns], cells)


def sync_legend_lines(rows: Sequence[SyncRow], setups: dict[str, str], notes: Sequence[str]) -> list[str]:
    """The columns, the engines' setups and the notes of the synchronization table."""
    if not rows:
        return []
    columns = [c for c in SYNC_COLUMNS if c.header == "engine" or any(c.cell(r) != "-" for r in rows)]
    width = max(len(c.header) for c in columns)
    lines = ["columns:", *(f"  {c.header.ljust(width)}  {c.legend}" for c in columns)]
    if setups:
        name_width = max(len(name) for name in setups)
        lines += ["engines:", *(f"  {name.ljust(name_width)}  {setup}" for name, setup in setups.items())]
    if notes:
        lines += ["notes:", *(f"  {note}" for note in notes)]
    return lines


def load_sync_rows(path_or_document: str | os.PathLike[str] | dict[str, Any]) -> list[SyncRow]:
    """The synchronization table's rows of a ``bench --sync --json PATH`` document ([] where
    it has none); keys that :class:`SyncRow` does not have are ignored."""
    if isinstance(path_or_document, dict):
        document = path_or_document
    else:
        with open(path_or_document, encoding="utf-8") as handle:
            document = json.load(handle)
    names = {field.name for field in fields(SyncRow)}
    rows = []
    for item in (document.get("sync") or {}).get("rows", []):
        values = {key: value for key, value in item.items() if key in names}
        values["shape"] = tuple(int(size) for size in values["shape"])
        values["loops"] = {str(kind): int(count) for kind, count in values["loops"].items()}
        rows.append(SyncRow(**values))
    return rows


def measure_sync(
    engines: Sequence[str],
    *,
    shape: tuple[int, ...],
    dtype: str,
    repeats: int,
    sample_seconds: float,
    timeout: float,
    err: TextIO,
) -> tuple[list[SyncRow], dict[str, str], list[str], list[str]]:
    """Every engine in turn: the rows, the engines' setups, the notes and the engines not
    measured (``"NAME: why"``: not installed, failed or timed out)."""
    rows: list[SyncRow] = []
    setups: dict[str, str] = {}
    notes: list[str] = []
    skipped: list[str] = []
    for done, engine in enumerate(engines, start=1):
        name = SYNC_ENGINE_NAMES[engine]
        why = sync_unavailable(engine)
        if why is not None:
            skipped.append(why)
            continue
        print(f"[sync {done}/{len(engines)}] {name}, {SYNC_REPLICAS[engine]} replicas ...", end=" ", file=err)
        err.flush()
        try:
            mine, setup, more = measure_sync_engine(
                engine, shape=shape, dtype=dtype, repeats=repeats, sample_seconds=sample_seconds, timeout=timeout
            )
        except (RuntimeError, ValueError) as exc:
            print("not measured", file=err)
            skipped.append(f"{name}: {exc}")
            continue
        print(", ".join(f"{r.case} {_number(r.sync_ms)} vs {_number(r.local_ms)} ms" for r in mine), file=err)
        rows += mine
        setups[name] = setup
        notes += more
    return rows, setups, notes, skipped


# -- the command --------------------------------------------------------------


def bench(
    *,
    backends: Sequence[str] | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
    dtypes: Sequence[str] | None = None,
    quick: bool = False,
    repeats: int | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    sync: bool = False,
    sync_only: bool = False,
    sync_engines: Sequence[str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the benchmark; print the machine, the backends not measured, the table, its
    legend and a summary (``out``), and progress (``err``).

    ``quick``: the small shape and (32,64,56,56), float32, 3 repeats, short
    samples; explicit ``shapes``, ``dtypes`` and ``repeats`` still win.
    ``sync`` (implied by ``sync_only`` and ``sync_engines``): then the
    synchronization table, :data:`SYNC_SHAPE` (``quick``: :data:`QUICK_SYNC_SHAPE`)
    over ``sync_engines`` (default :data:`SYNC_ENGINES`); ``sync_only``: that
    table alone. Returns 0 when it ran (whatever the numbers), 1 if no backend
    could be loaded, 2 for an unusable ``--plot`` or ``--json`` path.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if plot_path is not None and not have_matplotlib():
        print(
            "error: --plot needs matplotlib, which is not installed: "
            "pip install matplotlib (or pip install 'portable_bn[bench]')",
            file=err,
        )
        return 2
    if plot_path is not None and sync_only:
        print("error: --plot draws the per-backend tables, which --sync-only leaves out", file=err)
        return 2
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"error: {option} {path}: no such directory", file=err)
            return 2
    shapes = list(dict.fromkeys(shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES)))
    dtypes = list(dict.fromkeys(dtypes or (QUICK_DTYPES if quick else DTYPES)))
    sample_seconds = QUICK_SAMPLE_SECONDS if quick else SAMPLE_SECONDS
    sync = sync or sync_only or bool(sync_engines)

    loaded: list[Backend] = []
    skipped: list[str] = []
    for name in dict.fromkeys(() if sync_only else backends or BACKENDS):
        try:
            loaded.append(load_backend(name))
        except BackendUnavailable as why:
            skipped.append(str(why))
    if not loaded and not sync_only:
        for line in skipped_lines(skipped):
            print(line, file=err)
        print("error: no backend to benchmark", file=err)
        return 1

    machine = machine_info()
    for line in [*machine_lines(machine), *skipped_lines(skipped)]:
        print(line, file=out)
    out.flush()
    if machine["other_load"] is not None and machine["other_load"] > 0.1:
        print(
            f"warning: other processes use {machine['other_load']:.0%} of the CPUs: they compete with the "
            "benchmark, and multi-threaded calls (torch, jax) suffer most; see the 'other CPU' column",
            file=err,
        )

    if loaded:
        warm_up(QUICK_WARM_UP_SECONDS if quick else WARM_UP_SECONDS)
    rows: list[Row] = []
    total = len(loaded) * len(dtypes) * len(shapes) * len(CASES)
    done = 0
    for backend in loaded:
        for dtype in dtypes:
            for shape in shapes:
                host = host_data(shape, dtype)
                count = repeats or (QUICK_REPEATS if quick else default_repeats(shape))
                for case in CASES:
                    done += 1
                    print(f"[{done}/{total}] {backend.name} {dtype} {shape_text(shape)} {case} ...", end=" ", file=err)
                    err.flush()
                    row = measure(backend, case, shape, dtype, host, repeats=count, sample_seconds=sample_seconds)
                    print(f"{_number(row.ours_ms)} ms, {_ratio(row.ratio)}x {row.baseline}", file=err)
                    rows.append(row)

    for block in (table_lines(rows), legend_lines(rows), summary_lines(rows)):
        if block:
            print("", file=out)
        for line in block:
            print(line, file=out)

    sync_document: dict[str, Any] | None = None
    if sync:
        engines = list(dict.fromkeys(sync_engines or SYNC_ENGINES))
        sync_shape = QUICK_SYNC_SHAPE if quick else SYNC_SHAPE
        sync_repeats = repeats or (QUICK_REPEATS if quick else SYNC_REPEATS)
        timeout = QUICK_SYNC_TIMEOUT_SECONDS if quick else SYNC_TIMEOUT_SECONDS
        sync_rows, setups, notes, sync_skipped = measure_sync(
            engines,
            shape=sync_shape,
            dtype=SYNC_DTYPE,
            repeats=sync_repeats,
            sample_seconds=sample_seconds,
            timeout=timeout,
            err=err,
        )
        print("", file=out)
        print(sync_title(sync_shape, SYNC_DTYPE), file=out)
        for line in skipped_lines(sync_skipped):
            print(line, file=out)
        for block in (sync_table_lines(sync_rows), sync_legend_lines(sync_rows, setups, notes)):
            if block:
                print("", file=out)
            for line in block:
                print(line, file=out)
        sync_document = {
            "settings": {
                "engines": engines,
                "shape": list(sync_shape),
                "dtype": SYNC_DTYPE,
                "repeats": sync_repeats,
                "sample_seconds": sample_seconds,
                "timeout_s": timeout,
            },
            "rows": [asdict(row) for row in sync_rows],
            "engines": setups,
            "notes": notes,
            "skipped": sync_skipped,
        }

    if json_path is not None:
        document = {
            "machine": machine,
            "settings": {
                "backends": [b.name for b in loaded],
                "shapes": shapes,
                "dtypes": dtypes,
                "quick": quick,
                "repeats": repeats,
                "sample_seconds": sample_seconds,
                "momentum": MOMENTUM,
                "eps": EPS,
            },
            "rows": [asdict(row) for row in rows],
            "skipped": skipped,
        }
        if sync_document is not None:
            document["sync"] = sync_document
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        print(f"wrote {json_path}", file=out)
    if plot_path is not None:
        write_plot(rows, plot_path)
        print(f"wrote {plot_path}", file=out)
    return 0
