"""python -m portable_bn bench: it runs, reports finite ratios, and its baselines are right.

Speed itself is never asserted here: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import portable_bn._bench as bench_module
from portable_bn.__main__ import main
from portable_bn.testing import max_error, reference_backward, reference_batch_norm, tolerance


def test_quick_numpy_run_writes_rows_for_every_case(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--backend", "numpy", "--repeats", "3", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert "[6/6] numpy float32 (32,64,56,56) backward ..." in captured.err
    assert "ours ms" in captured.out and "targets" in captured.out

    document = json.loads(path.read_text())
    assert {"cpu", "cores", "numpy", "torch", "jax", "openblas_coretype"} <= document["machine"].keys()
    rows = document["rows"]
    assert {(tuple(r["shape"]), r["case"]) for r in rows} == {
        (shape, case) for shape in bench_module.QUICK_SHAPES for case in ("train", "eval", "backward")
    }
    for row in rows:
        assert (row["backend"], row["dtype"], row["baseline"], row["repeats"]) == ("numpy", "float32", "naive", 3)
        for key in ("ours_ms", "baseline_ms", "ratio", "copy_ms", "copies"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isfinite(row["overhead_us"])
        if row["case"] == "train":
            assert math.isfinite(row["memory_ratio"]) and row["memory_ratio"] > 0, row
        else:
            assert row["memory_ratio"] is None
    assert {t["key"] for t in document["targets"]} == {t.key for t in bench_module.TARGETS}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (5, 3), (3, 2, 4)])
def test_naive_forward_matches_the_reference(shape, training):
    """The textbook baseline computes batch norm (checked against the float64 reference, not
    against the code it is timed against)."""
    data = bench_module.host_data(shape, "float64", seed=1)
    args = [data[key] for key in ("x", "running_mean", "running_var", "weight", "bias")]
    expected = reference_batch_norm(*args, training=training, momentum=0.3)
    got = bench_module.naive_batch_norm(np, *args, training=training, momentum=0.3)
    for name, mine in zip(("output", "running_mean", "running_var", "mean", "invstd"), got, strict=True):
        assert max_error(mine, expected[name]) <= tolerance("float64"), name


@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (5, 3), (3, 2, 4)])
def test_naive_backward_matches_the_reference(shape):
    data = bench_module.host_data(shape, "float64", seed=2)
    x, g, w = data["x"], data["grad_output"], data["weight"]
    forward = reference_batch_norm(x, weight=w, training=True)
    expected = reference_backward(g, x, w, forward["mean"], forward["invstd"], training=True)
    got = bench_module.naive_batch_norm_backward(g, x, w, forward["mean"], forward["invstd"])
    for name, mine, theirs in zip(("grad_input", "grad_weight", "grad_bias"), got, expected, strict=True):
        assert max_error(mine, theirs) <= tolerance("float64"), name


def test_samples_are_interleaved_and_rotated():
    calls: list[str] = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    bench_module.interleaved_medians(fns, repeats=3, sample_seconds=0.0)
    # one warm-up call and one calibration call each, then the rotated rounds
    assert "".join(calls) == "abc" + "abc" + "abc" + "bca" + "cab"


def test_peak_extra_bytes_sees_numpy_allocations():
    x = np.ones(1 << 18)
    extra = bench_module.peak_extra_bytes(lambda: x * 2.0 + 1.0)
    assert x.nbytes <= extra <= 3 * x.nbytes


def test_targets_report_worst_case():
    def row(case, copies):
        return bench_module.Row(
            "numpy",
            "cpu",
            "float32",
            (32, 64, 56, 56),
            case,
            1.0,
            "naive",
            1.0,
            1.0,
            0.0,
            0.5,
            copies,
            None,
            None,
            3,
            (1, 1, 1),
        )

    targets = {t["key"]: t for t in bench_module.evaluate_targets([row("train", 2.5), row("eval", 1.7)])}
    assert targets["numpy-train-copies"]["met"] is True
    assert targets["numpy-eval-copies"]["met"] is False and targets["numpy-eval-copies"]["worst"] == 1.7
    assert targets["torch-native"]["met"] is None and targets["torch-native"]["measured"] == 0


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(bench_module, "have_matplotlib", lambda: False)
    assert main(["bench", "--quick", "--backend", "numpy", "--plot", "out.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_output_in_a_missing_directory_is_refused_before_running(tmp_path, capsys):
    assert main(["bench", "--quick", "--json", str(tmp_path / "missing" / "bench.json")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        bench_module.Row(
            "numpy",
            "cpu",
            "float32",
            (2, 4, 3, 3),
            case,
            1.0,
            "naive",
            0.5,
            2.0,
            500.0,
            0.1,
            10.0,
            None,
            None,
            3,
            (1, 1, 1),
        )
        for case in bench_module.CASES
    ]
    path = tmp_path / "bench.png"
    bench_module.write_plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text", ["32,x", "5", "0,3", "1,4"])
def test_bad_shapes_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shape", text])
    assert "--shape" in capsys.readouterr().err


def test_importing_the_module_imports_no_backend():
    code = "import sys, portable_bn._bench; print(sorted({'torch', 'jax', 'cupy', 'matplotlib'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
