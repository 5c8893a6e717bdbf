"""The "Scaling out" page's complete examples run and prove what they print: each engine's
synchronized batch norm equals one batch of all the replicas' data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_backend

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run_example(name: str) -> str:
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=240, env=environment
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_torch_example_two_processes_over_gloo():
    require_backend("torch")
    output = run_example("torch_sync.py")
    assert output.count("differs from one process by") == 8
    assert "torch.nn.SyncBatchNorm on the CPU: SyncBatchNorm expected input tensor to be on GPU" in output


def test_jax_example_shard_map_over_four_devices():
    require_backend("jax")
    output = run_example("jax_sync.py")
    assert output.count("differs") == 5
    off = float(output.rsplit("is off by", 1)[1])
    assert off > 1e-3  # unweighted averaging of the devices' means is visibly wrong


def test_dask_example_on_a_local_cluster():
    require_backend("dask")
    pytest.importorskip("distributed")
    assert "output differs from NumPy's by" in run_example("dask_cluster.py")
