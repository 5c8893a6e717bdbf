"""``python -m portable_bn bench --sync``: what synchronized batch norm (``sync=``) costs per call.

One table, a row per engine and case (:class:`SyncRow`), measured by :func:`measure_sync`
and printed by :func:`sync_table_lines` and :func:`sync_legend_lines`; :func:`report_sync`
does both for :func:`portable_bn._bench.bench`. The engines:

- torch.distributed: 2 processes joined by gloo over 127.0.0.1, with ``TorchProcessGroup``;
- ``jax.shard_map`` over 4 CPU devices forced in a child process, under ``jax.jit``, with
  ``JaxAxis``;
- Dask: a ``LocalCluster`` of 2 worker processes (no reducer: a chunked array is the
  global batch).

Each engine runs in child processes of its own (torch.distributed needs one per replica,
JAX must see its forced CPU devices before it is imported, Dask starts a cluster) under a
time limit (:func:`run_sync_children`). Every child leads a session of its own, and its
process group, with whatever it started, is killed when it is done or out of time.

Per case the same call is timed with and without sync, sampled in turn in the same
processes (Dask: on the cluster and on the threaded scheduler), together with the
synchronized code path over a reducer of one replica (:class:`Alone`) and the collectives
that the call makes with sync, replayed alone: recorded as it runs for torch, read from the
compiled program for JAX (:func:`xla_collectives`). ``--json`` writes the rows under the
key ``"sync"``; :func:`load_sync_rows` reads them back.

The timing, the machine's load and the benchmark's data come from :mod:`._bench`. Like it,
this module imports only NumPy and the standard library; each engine is imported in its
child processes only.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TextIO

import numpy as np

from . import batch_norm, batch_norm_backward
from ._bench import (
    _KEYS,
    QUICK_REPEATS,
    Column,
    OtherLoad,
    _number,
    _ratio,
    aligned_lines,
    host_data,
    interleaved_medians,
    shape_text,
    skipped_lines,
)

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


_CHILD_CODE = "from portable_bn._bench_sync import sync_child; sync_child()"


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


SYNC_COLUMNS = (
    Column("engine", "how the replicas run and communicate (see engines below)", lambda r: r.engine, True),
    Column(
        "replicas",
        "processes (torch), devices (JAX) or worker processes (Dask) sharing the batch in equal parts",
        lambda r: str(r.replicas),
    ),
    Column(
        "case",
        "train: batch_norm(training=True); backward: batch_norm_backward(training=True) given that "
        "forward's statistics; train+autograd: the training forward and the gradients of sum(output * g) "
        "with respect to input, weight and bias (torch.autograd.grad, jax.grad)",
        lambda r: r.case,
        True,
    ),
    Column(
        "collectives",
        "what one call with sync does between the replicas, recorded while it ran (torch) or read "
        "from the compiled program (JAX): KIND(n) is one collective into which every replica puts n "
        "numbers (n = 4C+1 for the statistics' gather, 2C+1 for the backward's sum, C channels; "
        "a JAX gather is a sum of R rows, R*(4C+1)); Dask has no collective: the tasks of the graph "
        "and the bytes its workers sent each other during one call",
        lambda r: r.collectives,
        True,
    ),
    Column(
        "sync ms",
        "time per call with sync (Dask: computed on the cluster) in milliseconds, median of the samples",
        lambda r: _number(r.sync_ms),
    ),
    Column(
        "local ms",
        "the same call on the same replicas and data without sync, each replica with its own "
        "statistics (Dask: the same graph on the threaded scheduler in one process)",
        lambda r: _number(r.local_ms),
    ),
    Column(
        "sync-local us",
        "sync ms minus local ms, in microseconds: what synchronizing costs one call",
        lambda r: f"{r.overhead_us:.1f}",
    ),
    Column(
        "sync/local",
        "sync ms divided by local ms; every time of a row is sampled in turn with the others, in the same processes",
        lambda r: _ratio(r.ratio),
    ),
    Column(
        "alone ms",
        "the synchronized code path without communicating: sync= a reducer of one replica whose gather and "
        "sum return their input, each replica with its own statistics (without sync, PyTorch's own kernel "
        "serves the forward: alone ms minus local ms is the cost of leaving it)",
        lambda r: _number(r.alone_ms),
    ),
    Column(
        "sync-alone us",
        "sync ms minus alone ms, in microseconds: what the communication costs one call",
        lambda r: "-" if r.communication_us is None else f"{r.communication_us:.1f}",
    ),
    Column(
        "bare ms",
        "the collectives column's collectives alone, replayed on zeros of the same sizes (Dask: a task "
        "per chunk making 4C+1 (train) or 2C+1 (backward) numbers on its worker, and one stacking them)",
        lambda r: _number(r.bare_ms),
    ),
    Column(
        "other CPU",
        "share of the CPUs other processes used while the engine was measured (its child processes are its own)",
        lambda r: "-" if r.other_load is None else f"{r.other_load:.0%}",
    ),
)


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
    return aligned_lines(columns, rows)


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


def report_sync(
    engines: Sequence[str] | None,
    *,
    quick: bool,
    repeats: int | None,
    sample_seconds: float,
    out: TextIO,
    err: TextIO,
) -> dict[str, Any]:
    """Measure ``engines`` (default :data:`SYNC_ENGINES`) on :data:`SYNC_SHAPE` (``quick``:
    :data:`QUICK_SYNC_SHAPE`); print the title, the engines not measured, the table and its
    legend (``out``) and progress (``err``); return what ``--json`` writes under ``"sync"``."""
    engines = list(dict.fromkeys(engines or SYNC_ENGINES))
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
    return {
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
