"""The CuPy backend's kernels, run on the CPU by ``tests/cuda_emulator.py``.

Where no GPU exists (CI), this is what checks the kernels' logic, indexing, generated code and
arguments against the float64 reference and the pure primitives; ``tests/test_cupy.py``
checks them on a GPU. Runs once, in the numpy session, in a subprocess (the emulator installs
a stand-in ``cupy`` module).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_backend

EMULATOR = Path(__file__).with_name("cuda_emulator.py")


def test_cupy_kernels_match_the_reference_on_the_cpu():
    require_backend("numpy")
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (the emulator compiles the CUDA source with it)")
    done = subprocess.run([sys.executable, str(EMULATOR)], capture_output=True, text=True, timeout=900)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-4000:]
    assert "\n0 failures" in "\n" + done.stdout, report[-4000:]
