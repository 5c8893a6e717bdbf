"""python -m portable_bn check: a table and an exit status that can fail."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

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

    monkeypatch.setattr(_agnostic, "unbiased_variance", lambda xp, var, count: var)
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
    assert lines[-1].startswith("normwise error of the float32 training backward")
    gradients = lines[lines.index("") + 1 :]
    assert gradients[0].split()[:3] == ["implementation", "float32", "gradient"]
    assert {line.split()[2] for line in gradients if line.startswith("portable_bn numpy")} == {
        "grad_input",
        "grad_weight",
        "grad_bias",
    }


def _help(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [(), ("check",), ("accuracy",), ("bench",)])
def test_help_is_plain_words(capsys, command):
    text = _help(capsys, *command)
    assert text.startswith(" ".join(["usage: python -m portable_bn", *command, "[-h]"]))
    for markup in ("``", ":func:", ":mod:", ":data:", ":doc:"):
        assert markup not in text, markup


def test_top_level_help_names_the_commands_with_examples(capsys):
    text = _help(capsys)
    assert "PyTorch-exact batch normalization" in text
    for command in ("check", "accuracy", "bench"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 3 for line in text.splitlines()), command
    assert "examples:" in text and "python -m portable_bn check --backend numpy" in text


@pytest.mark.parametrize("command", ["check", "accuracy", "bench"])
def test_commands_describe_what_they_do_and_their_exit_status(capsys, command):
    text = _help(capsys, command)
    description = text.split("\n\n")[1]  # the paragraph under the usage line
    assert len(description.split()) > 20, description
    assert "Exit status:" in text


def test_check_help_states_the_exit_status_the_command_returns(capsys):
    text = " ".join(_help(capsys, "check").split())
    assert "Exit status: 0 if every comparison passed" in text and "1 if any failed" in text
    assert '"all passed" or "FAILED"' in text


def test_module_help_runs_as_a_program():
    done = subprocess.run([sys.executable, "-m", "portable_bn", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m portable_bn")
    assert "``" not in done.stdout and "Command line." not in done.stdout


def test_a_backend_that_needs_its_own_process_is_checked_in_one(monkeypatch):
    """JAX's 64-bit setting is per process: such a backend's rows come from a child ``check``."""

    def unavailable(name):
        raise check_module._backends.BackendUnavailable(f"{name}: this process has another setting (test)")

    monkeypatch.setattr(check_module._backends, "combinations", unavailable)
    monkeypatch.setattr(check_module._backends, "needs_own_process", lambda name: True)
    out = io.StringIO()
    assert check_module.check(["numpy"], out=out) == 0  # the child imports the real table
    rows = [line.split() for line in out.getvalue().splitlines() if line.startswith("numpy")]
    assert [(row[1], row[2], row[-1]) for row in rows] == [
        ("cpu", "float16", "PASS"),
        ("cpu", "float32", "PASS"),
        ("cpu", "float64", "PASS"),
    ]


def test_no_command_prints_the_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m portable_bn") and "check" in out and "bench" in out
