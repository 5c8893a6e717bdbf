"""Synchronized batch norm on real replicas equals ONE process over the whole batch.

- torch.distributed: this file, run as a script, is the worker; one run of 2 processes and one
  of 3 (gloo over 127.0.0.1) each go through every case (module through autograd, module
  ``backward``, functional forward + analytic backward; unequal batches, an empty replica,
  masks, a subgroup). The pytest process compares what the ranks saved with
  ``torch.nn.BatchNorm*d`` in float64 over the concatenated batch (of the valid values alone
  where masked).
- JAX: a child process with 4 forced CPU devices (the flag must precede JAX's start) runs
  ``jax.shard_map`` with ``JaxAxis`` and the unsharded call, values and ``jax.grad``.
- Dask: a ``LocalCluster`` of 2 worker processes computes graphs that ``pbn.batch_norm`` built
  without computing anything.

Each child has a deadline and is killed past it, and a failing rank stops its peers at once,
so a hung collective fails a test instead of hanging the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import portable_bn as pbn
from conftest import require_backend
from portable_bn.testing import reference_backward, reference_batch_norm, sample

TOL = {"rtol": 1e-10, "atol": 1e-10}
DEADLINE_S = 120.0  # one launch of workers, start to finish
COLLECTIVE_TIMEOUT_S = 60  # torch.distributed's own timeout (rendezvous and collectives)


# ------------------------------------------------------------------------------- children


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this portable_bn first on the path, one thread each (2 or 3
    children share the CPUs), gloo on the loopback interface."""
    env = dict(os.environ)
    source = str(Path(pbn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.update(extra)
    return env


def _run_children(argvs: list[list[str]], logdir: Path, env: dict[str, str]) -> None:
    """Run ``python this_file *argv`` for each argv at once; fail (killing the others) as soon
    as one fails or the deadline passes."""
    logs = [logdir / f"child{i}.log" for i in range(len(argvs))]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, log in zip(argvs, logs, strict=True):
            with open(log, "wb") as sink:
                procs.append(
                    subprocess.Popen([sys.executable, __file__, *argv], stdout=sink, stderr=subprocess.STDOUT, env=env)
                )
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(codes):
                break  # all done, or one failed: its peers would wait for it until their own timeout
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        report = "\n".join(
            f"--- child {i} (exit {code}):\n{log.read_text()}"
            for i, (code, log) in enumerate(zip(codes, logs, strict=True))
        )
        pytest.fail(f"children failed or ran past {DEADLINE_S} s (killed):\n{report}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------- shared test data


@dataclass(frozen=True)
class Case:
    """One synchronized computation, run by every member rank on its slice of the batch."""

    name: str
    kind: str  # "autograd" (module), "module_backward" (module.backward), "functional"
    sizes: tuple[int, ...]  # samples of each member, in rank order
    members: tuple[int, ...]  # the ranks of its process group
    sample_shape: tuple[int, ...]  # one sample, channel axis included
    axis: int
    momentum: float | None
    masked: str | None  # None, "random", or "first_empty": the first member's values all masked out
    steps: int
    seed: int
    eps: float = 1e-5


@dataclass
class CaseData:
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]  # (x, grad_output, mask) of the whole batch
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray


def bounds(sizes: tuple[int, ...], position: int) -> tuple[int, int]:
    lo = sum(sizes[:position])
    return lo, lo + sizes[position]


def channels(case: Case) -> int:
    return (sum(case.sizes), *case.sample_shape)[case.axis]


def case_data(case: Case) -> CaseData:
    """The whole batch of every step, made from the seed alone (each rank slices its own part)."""
    rng = np.random.default_rng(case.seed)
    shape = (sum(case.sizes), *case.sample_shape)
    c = channels(case)
    steps = []
    for step in range(case.steps):
        x = sample(shape, seed=100 * case.seed + step, axis=case.axis)
        g = rng.normal(size=shape)
        mask = None
        if case.masked is not None:
            mask = rng.random(tuple(n for i, n in enumerate(shape) if i != case.axis % len(shape))) < 0.7
            if case.masked == "first_empty":
                mask[: case.sizes[0]] = False
        steps.append((x, g, mask))
    return CaseData(steps, rng.uniform(0.5, 2.0, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(0.5, 2.0, c))


def torch_cases(world: int) -> list[Case]:
    """What a run of ``world`` processes computes: unequal batches (3, 5), and with 3 processes
    an empty one in the middle (3, 0, 5) and a subgroup of ranks 0 and 1."""
    sizes = (3, 5) if world == 2 else (3, 0, 5)
    everyone = tuple(range(world))
    cases = [
        Case("module", "autograd", sizes, everyone, (4, 3, 2), 1, 0.1, None, steps=2, seed=1),
        Case("module_masked", "autograd", sizes, everyone, (3, 6), 1, None, "random", steps=2, seed=2),
        Case("module_backward_masked", "module_backward", sizes, everyone, (3, 6), 1, 0.1, "random", steps=2, seed=3),
        Case("functional", "functional", sizes, everyone, (4, 3, 2), 1, 0.1, None, steps=2, seed=4),
        Case("functional_masked", "functional", sizes, everyone, (5, 3), -1, 0.3, "first_empty", steps=1, seed=5),
    ]
    if world == 3:
        cases.append(Case("subgroup", "autograd", (4, 2), (0, 1), (4, 3, 2), 1, 0.1, None, steps=2, seed=6))
    return cases


# ------------------------------------------------------------------- torch.distributed


def _torch_worker(rank: int, world: int, port: int, outdir: Path) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results: dict[str, np.ndarray] = {}
    try:
        for case in torch_cases(world):
            group = None
            if case.members != tuple(range(world)):
                group = dist.new_group(list(case.members), timeout=timeout)  # every rank takes part in making it
            if rank in case.members:
                for key, value in _torch_case(torch, case, case.members.index(rank), group).items():
                    results[f"{case.name}.{key}"] = value
        dist.barrier()
    except BaseException:  # noqa: BLE001 (reported, then the process ends)
        # exit at once: destroy_process_group would wait for the peers, which wait for this rank
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    np.savez(outdir / f"rank{rank}.npz", **results)


def _torch_case(torch, case: Case, position: int, group) -> dict[str, np.ndarray]:
    from portable_bn.distributed import TorchProcessGroup

    data = case_data(case)
    lo, hi = bounds(case.sizes, position)

    def mine(array):
        return None if array is None else torch.tensor(array[lo:hi])

    sync = TorchProcessGroup(group)
    out = {}
    grad_weight = grad_bias = 0
    if case.kind == "functional":  # no autograd: the analytic backward, synchronized too
        running_mean, running_var = torch.tensor(data.running_mean), torch.tensor(data.running_var)
        weight, bias = torch.tensor(data.weight), torch.tensor(data.bias)
        for step, (x, g, mask) in enumerate(data.steps):
            options = {"axis": case.axis, "mask": mine(mask), "sync": sync}
            r = pbn.batch_norm(
                mine(x), running_mean, running_var, weight, bias,
                training=True, momentum=case.momentum, eps=case.eps, **options,
            )  # fmt: skip
            running_mean, running_var = r.running_mean, r.running_var
            grad_input, dw, db = pbn.batch_norm_backward(mine(g), mine(x), weight, r.mean, r.invstd, **options)
            out[f"output{step}"], out[f"grad_input{step}"] = r.output, grad_input
            grad_weight, grad_bias = grad_weight + dw, grad_bias + db
        out.update(running_mean=running_mean, running_var=running_var)
    else:
        module = {3: pbn.BatchNorm1d, 4: pbn.BatchNorm2d}[1 + len(case.sample_shape)]
        bn = module(
            channels(case), eps=case.eps, momentum=case.momentum, axis=case.axis, xp=torch, dtype="float64", sync=sync
        )
        bn.load_state_dict(
            {key: getattr(data, key) for key in ("weight", "bias", "running_mean", "running_var")}, strict=False
        )
        for step, (x, g, mask) in enumerate(data.steps):
            if case.kind == "autograd":
                xs = mine(x).requires_grad_(True)
                y = bn(xs, mask=mine(mask))
                y.backward(mine(g))
                grad_input = xs.grad
            else:
                with torch.no_grad():
                    y = bn(mine(x), mask=mine(mask))
                grad_input = bn.backward(mine(g))
                grad_weight, grad_bias = grad_weight + bn.weight_grad, grad_bias + bn.bias_grad
            out[f"output{step}"], out[f"grad_input{step}"] = y, grad_input
        if case.kind == "autograd":
            grad_weight, grad_bias = bn.weight.grad, bn.bias.grad
        out.update(running_mean=bn.running_mean, running_var=bn.running_var, num_batches_tracked=bn.num_batches_tracked)
    out.update(grad_weight=grad_weight, grad_bias=grad_bias)
    return {key: value.detach().numpy() for key, value in out.items()}


def _torch_reference(case: Case) -> dict[str, object]:
    """One process, ``torch.nn.BatchNorm*d`` in float64 over the whole batch; where masked, over
    the valid values alone (rows of C values), the masked-out outputs normalized with their
    statistics. Also each member's share of the weight and bias gradients: its own sums of
    ``g * xhat`` and ``g`` over its valid values, with the global statistics."""
    import torch

    data = case_data(case)
    masked = case.masked is not None
    ndim = 1 + len(case.sample_shape)
    kind = torch.nn.BatchNorm1d if masked else {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[ndim]
    ref = kind(channels(case), eps=case.eps, momentum=case.momentum, dtype=torch.float64)
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref, key).copy_(torch.tensor(getattr(data, key)))
    outputs, grad_inputs = [], []
    shares = np.zeros((len(case.members), 2, channels(case)))
    for x, g, mask in data.steps:
        every = np.ones(tuple(n for i, n in enumerate(x.shape) if i != case.axis % x.ndim), dtype=bool)
        valid = every if mask is None else mask
        x_last, g_last = np.moveaxis(x, case.axis, -1), np.moveaxis(g, case.axis, -1)
        rows = x_last[valid]
        mean, invstd = rows.mean(axis=0), 1.0 / np.sqrt(rows.var(axis=0) + case.eps)
        if masked:
            xr = torch.tensor(rows, requires_grad=True)
            yr = ref(xr)
            yr.backward(torch.tensor(g_last[valid]))
            out_last = (x_last - mean) * invstd * data.weight + data.bias
            out_last[valid] = yr.detach().numpy()
            grad_last = np.zeros_like(x_last)
            grad_last[valid] = xr.grad.numpy()
            outputs.append(np.moveaxis(out_last, -1, case.axis))
            grad_inputs.append(np.moveaxis(grad_last, -1, case.axis))
        else:
            xr = torch.tensor(np.moveaxis(x, case.axis, 1), requires_grad=True)
            yr = ref(xr)
            yr.backward(torch.tensor(np.moveaxis(g, case.axis, 1)))
            outputs.append(np.moveaxis(yr.detach().numpy(), 1, case.axis))
            grad_inputs.append(np.moveaxis(xr.grad.numpy(), 1, case.axis))
        for position in range(len(case.members)):
            lo, hi = bounds(case.sizes, position)
            xs, gs = x_last[lo:hi][valid[lo:hi]], g_last[lo:hi][valid[lo:hi]]
            shares[position] += [(gs * (xs - mean) * invstd).sum(axis=0), gs.sum(axis=0)]
    return {
        "outputs": outputs,
        "grad_inputs": grad_inputs,
        "running_mean": ref.running_mean.numpy(),
        "running_var": ref.running_var.numpy(),
        "num_batches_tracked": int(ref.num_batches_tracked),
        "grad_weight": ref.weight.grad.numpy(),
        "grad_bias": ref.bias.grad.numpy(),
        "shares": shares,
    }


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    """The ranks' results of a run of ``world`` processes, launched once per module."""
    require_backend("torch")
    pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    runs: dict[int, list[dict[str, np.ndarray]] | str] = {}

    def results(world: int) -> list[dict[str, np.ndarray]]:
        if world not in runs:  # a failed launch is reported by every test of the run, not retried
            outdir = tmp_path_factory.mktemp(f"torch{world}")
            port = str(_free_port())
            argvs = [["torch", str(rank), str(world), port, str(outdir)] for rank in range(world)]
            try:
                _run_children(argvs, outdir, _child_env())
            except pytest.fail.Exception as failure:
                runs[world] = str(failure)
            else:
                runs[world] = []
                for rank in range(world):
                    with np.load(outdir / f"rank{rank}.npz") as saved:
                        runs[world].append(dict(saved))
        run = runs[world]
        if isinstance(run, str):
            pytest.fail(run, pytrace=False)
        return run

    return results


@pytest.mark.parametrize(
    ("world", "name"), [(world, case.name) for world in (2, 3) for case in torch_cases(world)], ids=str
)
def test_torch_process_group_matches_one_process(torch_run, world, name):
    case = next(c for c in torch_cases(world) if c.name == name)
    ranks = torch_run(world)
    expected = _torch_reference(case)
    members = [ranks[r] for r in case.members]
    for step in range(case.steps):
        for key, plural in (("output", "outputs"), ("grad_input", "grad_inputs")):
            got = np.concatenate([m[f"{name}.{key}{step}"] for m in members])
            np.testing.assert_allclose(got, expected[plural][step], **TOL, err_msg=f"{key} of step {step}")
            if key == "grad_input" and case.masked is not None:
                mask = case_data(case).steps[step][2]
                assert np.all(np.moveaxis(got, case.axis, -1)[~mask] == 0), "masked-out grad_input must be 0"
    for position, m in enumerate(members):
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(m[f"{name}.{key}"], expected[key], **TOL, err_msg=f"{key} of member {position}")
        if case.kind != "functional":
            assert int(m[f"{name}.num_batches_tracked"]) == expected["num_batches_tracked"] == case.steps
        for i, key in enumerate(("grad_weight", "grad_bias")):
            np.testing.assert_allclose(
                m[f"{name}.{key}"], expected["shares"][position, i], **TOL, err_msg=f"{key} share of member {position}"
            )
    for key in ("grad_weight", "grad_bias"):
        total = sum(m[f"{name}.{key}"] for m in members)
        np.testing.assert_allclose(total, expected[key], **TOL, err_msg=f"{key} summed over the members")
    outsiders = [ranks[r] for r in range(world) if r not in case.members]
    assert all(not any(key.startswith(f"{name}.") for key in o) for o in outsiders)


# -------------------------------------------------------------------------------- JAX


JAX_SHAPE = (16, 3, 5)  # 4 samples on each of 4 devices


def _jax_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    mask = rng.random((JAX_SHAPE[0], JAX_SHAPE[2])) < 0.6
    mask[0:4] = False  # device 0: nothing valid
    mask[4:8] = False
    mask[5, 2] = True  # device 1: one valid value
    mask[12:16] = True  # device 3: everything valid
    return {
        "x": sample(JAX_SHAPE, seed=8),
        "g": rng.normal(size=JAX_SHAPE),
        "mask": mask,
        "weight": rng.uniform(0.5, 2.0, 3),
        "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3),
        "running_var": rng.uniform(0.5, 2.0, 3),
    }


JAX_MOMENTUM = 0.2


def _jax_worker(outdir: Path) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from portable_bn.distributed import JaxAxis

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(jax.devices(), ("batch",))
    inputs = {key: jnp.asarray(value) for key, value in _jax_inputs().items()}
    x, g, mask = inputs["x"], inputs["g"], inputs["mask"]
    stats = (inputs["running_mean"], inputs["running_var"])
    assert x.dtype == jnp.float64
    out: dict[str, np.ndarray] = {}

    def function(sync, masked):
        def forward(x, w, b, rm, rv, mask):
            r = pbn.batch_norm(
                x, rm, rv, w, b, training=True, momentum=JAX_MOMENTUM, mask=mask if masked else None, sync=sync
            )
            return r.output, r.running_mean, r.running_var

        return forward

    def variants(masked):
        whole = function(None, masked)
        sharded = jax.shard_map(
            function(JaxAxis("batch"), masked),
            mesh=mesh,
            in_specs=(P("batch"), P(), P(), P(), P(), P("batch")),
            out_specs=(P("batch"), P(), P()),
        )
        return whole, sharded

    weight, bias = inputs["weight"], inputs["bias"]
    for masked in (False, True):
        label = "masked" if masked else "plain"
        whole, sharded = variants(masked)
        for run, f in (("whole", whole), ("sharded_jit", sharded)):

            def loss(x, w, b, f=f):
                y, rm, rv = f(x, w, b, *stats, mask)
                return jnp.sum(y * g), (y, rm, rv)

            # one compiled step per run: the forward values and jax.grad wrt x, weight and bias
            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            (_, values), grads = step(x, weight, bias)
            keys = ("output", "running_mean", "running_var", "grad_x", "grad_weight", "grad_bias")
            for key, value in zip(keys, (*values, *grads), strict=True):
                out[f"{label}.{run}.{key}"] = value
        if not masked:  # shard_map outside jit too (op by op): the forward values
            values = sharded(x, weight, bias, *stats, mask)
            for key, value in zip(("output", "running_mean", "running_var"), values, strict=True):
                out[f"{label}.sharded.{key}"] = value
    np.savez(outdir / "jax.npz", **{key: np.asarray(value) for key, value in out.items()})


def _masked_reference(x, g, mask, weight, bias, running_mean, running_var, *, momentum, eps=1e-5, axis=1):
    """NumPy float64 batch norm of the valid values alone (rows of C values): outputs everywhere
    (masked-out ones normalized with the same statistics), running statistics, gradients
    (``grad_input`` 0 where masked out)."""
    x_last, g_last = np.moveaxis(x, axis, -1), np.moveaxis(g, axis, -1)
    rows = x_last[mask]
    e = reference_batch_norm(rows, running_mean, running_var, weight, bias, training=True, momentum=momentum, eps=eps)
    gi, gw, gb = reference_backward(g_last[mask], rows, weight, e["mean"], e["invstd"], training=True)
    output = (x_last - e["mean"]) * e["invstd"] * weight + bias
    output[mask] = e["output"]
    grad_input = np.zeros_like(x_last)
    grad_input[mask] = gi
    return {
        "output": np.moveaxis(output, -1, axis),
        "running_mean": e["running_mean"],
        "running_var": e["running_var"],
        "grad_x": np.moveaxis(grad_input, -1, axis),
        "grad_weight": gw,
        "grad_bias": gb,
    }


def test_jax_shard_map_matches_unsharded(tmp_path):
    """4 CPU devices, float64: ``jax.shard_map`` with ``JaxAxis`` gives the unsharded values
    (output, running statistics; eager and under ``jax.jit``) and ``jax.grad`` wrt x, weight and
    bias; with a mask that leaves the devices 0, 1, some and all of their values. Both match the
    NumPy float64 reference (of the valid values alone, where masked)."""
    require_backend("jax")
    pytest.importorskip("jax")
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip()
    env = _child_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
    _run_children([["jax", str(tmp_path)]], tmp_path, env)
    with np.load(tmp_path / "jax.npz") as saved:
        got = dict(saved)
    inputs = _jax_inputs()
    params = [inputs[key] for key in ("weight", "bias", "running_mean", "running_var")]
    every = np.ones_like(inputs["mask"])
    for label, mask in (("plain", every), ("masked", inputs["mask"])):
        expected = _masked_reference(inputs["x"], inputs["g"], mask, *params, momentum=JAX_MOMENTUM)
        runs = ("whole", "sharded_jit", "sharded") if label == "plain" else ("whole", "sharded_jit")
        for run in runs:
            keys = ("output", "running_mean", "running_var")
            if run != "sharded":
                keys += ("grad_x", "grad_weight", "grad_bias")
            for key in keys:
                value = got[f"{label}.{run}.{key}"]
                if run != "whole":
                    np.testing.assert_allclose(
                        value, got[f"{label}.whole.{key}"], **TOL, err_msg=f"{label} {run} {key}"
                    )
                np.testing.assert_allclose(value, expected[key], **TOL, err_msg=f"{label} {run} {key} vs reference")


# ------------------------------------------------------------------------------- Dask


def _refuse(*args, **kwargs):
    raise AssertionError("portable_bn computed a Dask graph")


def test_dask_cluster_computes_lazy_graphs_as_numpy():
    """Built under a scheduler that refuses to run (so no compute happens inside our calls),
    then computed on a 2-process ``LocalCluster``: the forward (output, running statistics) and
    the backward of an array chunked by 4 samples equal NumPy's, plain, masked, with virtual
    batches of 5 (crossing the chunks) and with both."""
    require_backend("dask")
    da = pytest.importorskip("dask.array")
    distributed = pytest.importorskip("dask.distributed")
    import dask

    rng = np.random.default_rng(9)
    shape = (12, 3, 5)
    host = {
        "x": sample(shape, seed=10),
        "g": rng.normal(size=shape),
        "mask": rng.random((12, 5)) < 0.7,
        "weight": rng.uniform(0.5, 2.0, 3),
        "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3),
        "running_var": rng.uniform(0.5, 2.0, 3),
    }
    lazy_in = {key: da.from_array(value, chunks=(4, *value.shape[1:])) for key, value in host.items()}
    variants = {
        "plain": {},
        "masked": {"mask": "mask"},
        "ghost": {"virtual_batch_size": 5},
        "ghost_masked": {"mask": "mask", "virtual_batch_size": 5},
    }

    def compute(arrays, **options):
        if "mask" in options:
            options["mask"] = arrays["mask"]
        r = pbn.batch_norm(
            arrays["x"], arrays["running_mean"], arrays["running_var"], arrays["weight"], arrays["bias"],
            training=True, momentum=0.2, **options,
        )  # fmt: skip
        grads = pbn.batch_norm_backward(arrays["g"], arrays["x"], arrays["weight"], r.mean, r.invstd, **options)
        return {
            "output": r.output, "running_mean": r.running_mean, "running_var": r.running_var,
            "grad_input": grads[0], "grad_weight": grads[1], "grad_bias": grads[2],
        }  # fmt: skip

    with dask.config.set(scheduler=_refuse):
        lazy = {name: compute(lazy_in, **dict(options)) for name, options in variants.items()}
    assert all(isinstance(value, da.Array) for results in lazy.values() for value in results.values())
    assert lazy_in["x"].numblocks == (3, 1, 1)
    assert lazy["masked"]["output"].chunks[0] == (4, 4, 4)
    keys = [(name, key) for name, results in lazy.items() for key in results]

    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        computed = dict(zip(keys, client.gather(client.compute([lazy[name][key] for name, key in keys])), strict=True))
    for (name, key), value in computed.items():
        expected = compute(host, **dict(variants[name]))[key]
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12, err_msg=f"{name} {key}")
    params = [host[key] for key in ("running_mean", "running_var", "weight", "bias")]
    plain = reference_batch_norm(host["x"], *params, training=True, momentum=0.2)
    for key in ("output", "running_mean", "running_var"):
        np.testing.assert_allclose(computed["plain", key], plain[key], rtol=1e-12, atol=1e-12, err_msg=key)


# ------------------------------------------------------------------------- entry point


def _main(argv: list[str]) -> None:
    if argv[0] == "torch":
        _torch_worker(int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4]))
    elif argv[0] == "jax":
        _jax_worker(Path(argv[1]))
    else:
        raise SystemExit(f"unknown worker {argv[0]!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
