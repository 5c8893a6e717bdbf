"""python -m portable_bn check: a table and an exit status that can fail."""

from __future__ import annotations

import io
import subprocess
import sys

import portable_bn._check as check_module
from portable_bn.__main__ import main


def test_check_passes_on_numpy(capsys):
    assert main(["check", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["backend", "device", "dtype", "closest", "check", "error", "tolerance", "result"]
    assert sum(line.startswith("numpy") and line.rstrip().endswith("PASS") for line in lines) == 3
    assert lines[-1] == "all passed"


def test_check_fails_when_a_rule_is_broken(monkeypatch):
    """A biased running variance (PyTorch's is unbiased) fails every row."""
    from portable_bn import _agnostic

    monkeypatch.setattr(_agnostic, "unbiased_variance", lambda var, count: var)
    out = io.StringIO()
    assert check_module.check(["numpy"], out=out) == 1
    rows = [line for line in out.getvalue().splitlines() if line.startswith("numpy")]
    assert len(rows) == 3 and all("FAIL: " in row and "running_var" in row for row in rows)
    assert out.getvalue().rstrip().endswith("FAILED")


def test_check_reports_missing_backends_as_skipped(monkeypatch):
    def unavailable(name):
        raise check_module._backends.BackendUnavailable(f"{name}: not installed (test)")

    monkeypatch.setattr(check_module._backends, "combinations", unavailable)
    out = io.StringIO()
    assert check_module.check(["cupy"], out=out) == 0
    assert "skipped: cupy: not installed (test)" in out.getvalue()


def test_module_entry_point_runs():
    done = subprocess.run(
        [sys.executable, "-m", "portable_bn", "check", "--backend", "numpy"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "all passed" in done.stdout


def test_accuracy_command_prints_a_table(capsys):
    assert main(["accuracy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["implementation", "dtype"]
    assert any(line.startswith("portable_bn numpy") and "float32" in line for line in lines)
    assert lines[-1].startswith("normwise error")
