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

``--sync`` adds the table of what synchronized batch norm costs per call, which
:mod:`._bench_sync` measures and prints.

This module imports only NumPy and the standard library; each backend is
imported when it is benchmarked. The code under test is reached through the
public functions only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
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
    rival: Callable[[], object] | None = None
    """PyTorch's CPU kernel on the same memory (NumPy rows, where torch is installed)."""
    accelerator: str | None = None
    """The compiler of the kernels that served our call (``numba``, ``triton``), or None."""


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
            rival=_torch_cpu_rival(case, x, g, rm, rv, w, b) if xp is np else None,
            accelerator=_accelerator(x),
        )

    return make


def _accelerator(x: Any) -> str | None:
    """The compiler of the kernels that serve a call on ``x`` (channels on axis 1), or None."""
    from ._compat import array_namespace
    from ._dispatch import primitives
    from ._recipe import make_recipe

    prims = primitives(array_namespace(x), x, make_recipe(tuple(x.shape), 1))
    return prims.accelerator if prims.one_read(x) else None


def _torch_cpu_rival(case: str, x: Any, g: Any, rm: Any, rv: Any, w: Any, b: Any) -> Callable[[], object] | None:
    """PyTorch's CPU kernel on the same NumPy memory (no copy), at torch's thread count; None
    without torch."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    xt, gt, wt, bt = (torch.from_numpy(a) for a in (x, g, w, b))
    own_mean, own_var = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    if case == "backward":
        _, mean, invstd = torch.native_batch_norm(xt, wt, bt, None, None, True, MOMENTUM, EPS)

        def rival() -> object:
            return torch.ops.aten.native_batch_norm_backward(
                gt, xt, wt, None, None, mean, invstd, True, EPS, [True, True, True]
            )

        return rival
    training = case == "train"

    def forward() -> object:
        return torch.nn.functional.batch_norm(
            xt, own_mean, own_var, wt, bt, training=training, momentum=MOMENTUM, eps=EPS
        )

    return forward


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
    accelerator: str | None = None
    """The compiler of the kernels that served our call, or None (array-library operations)."""
    torch_ratio: float | None = None
    """ours / PyTorch's CPU kernel on the same memory (NumPy rows, where torch is installed)."""


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
    extra = [fn for fn in (contest.copy, contest.rival) if fn is not None]
    times, loops = interleaved_medians(
        [contest.ours, contest.baseline, *extra], repeats=repeats, sample_seconds=sample_seconds
    )
    ours, base = times[0], times[1]
    copy = times[2] if contest.copy is not None else None
    rival = times[-1] if contest.rival is not None else None
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
        accelerator=contest.accelerator,
        torch_ratio=None if rival is None else ours / rival,
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
    """A column of a table: its header, its line in the legend and its cell for a row."""

    header: str
    legend: str
    cell: Callable[[Any], str]
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
        "accel",
        "the compiler of the kernels that served our call (numba, triton); - for array-library operations",
        lambda r: r.accelerator or "-",
        True,
    ),
    Column(
        "ours/torch",
        "NumPy rows: our time divided by PyTorch's CPU kernel's (F.batch_norm; native_batch_norm_backward) "
        "on the same memory at torch's thread count",
        lambda r: "-" if r.torch_ratio is None else _ratio(r.torch_ratio),
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
    return aligned_lines(_columns(rows), rows)


def aligned_lines(columns: Sequence[Column], rows: Sequence[Any]) -> list[str]:
    """A header, a rule and a line per row, each column as wide as its widest entry."""
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
    if field == "torch_ratio":
        return f"{backend}: our time / PyTorch's CPU kernel on the same memory (F.batch_norm; its backward kernel)"
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
    over the baseline's; for NumPy and CuPy also over an array copy's; for NumPy, where torch is
    installed, also over PyTorch's CPU kernel's), with a line at 1.

    ``rows`` may be measured or read back with :func:`load_rows`."""
    figure_module = importlib.import_module("matplotlib.figure")
    ticker = importlib.import_module("matplotlib.ticker")
    present = list(dict.fromkeys(r.backend for r in rows))
    backends = [name for name in BACKENDS if name in present] + [name for name in present if name not in BACKENDS]
    panels = [
        (name, field)
        for name in backends
        for field in ("copies", "ratio", "torch_ratio")
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
        ax.set_ylabel({"copies": "ours / copy", "ratio": "ours / baseline", "torch_ratio": "ours / torch"}[field])
        ax.set_title(_panel_title(name, field, mine), fontsize=9)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


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
    synchronization table (:func:`._bench_sync.report_sync`) over ``sync_engines``
    (default: every engine); ``sync_only``: that table alone. Returns 0 when it
    ran (whatever the numbers), 1 if no backend could be loaded, 2 for an
    unusable ``--plot`` or ``--json`` path.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if plot_path is not None and sync_only:
        print("error: --plot draws the per-backend tables, which --sync-only leaves out", file=err)
        return 2
    if plot_path is not None and not have_matplotlib():
        print(
            "error: --plot needs matplotlib, which is not installed: "
            "pip install matplotlib (or pip install 'portable_bn[bench]')",
            file=err,
        )
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
        from ._bench_sync import report_sync  # it imports this module

        sync_document = report_sync(
            sync_engines, quick=quick, repeats=repeats, sample_seconds=sample_seconds, out=out, err=err
        )

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
