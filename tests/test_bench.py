"""python -m portable_bn bench: it runs, reports finite ratios, and its baselines are right.

Speed itself is never asserted here: the numbers depend on the machine.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

import portable_bn._bench as bench_module
import portable_bn._bench_sync as bench_sync
from portable_bn.__main__ import main
from portable_bn._backends import numpy as numpy_backend
from portable_bn.testing import max_error, reference_backward, reference_batch_norm, tolerance


def _row(**changes):
    """A NumPy row with made-up numbers, fields changed by keyword."""
    values = dict(
        backend="numpy",
        device="cpu",
        dtype="float32",
        shape=(2, 4, 3, 3),
        case="train",
        ours_ms=1.0,
        baseline="naive",
        baseline_ms=0.5,
        ratio=2.0,
        overhead_us=500.0,
        copy_ms=0.1,
        copies=10.0,
        memory_ratio=None,
        naive_memory_ratio=None,
        repeats=3,
        loops=(1, 1, 1),
    )
    values.update(changes)
    return bench_module.Row(**values)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick NumPy run through the command line: (exit status, stdout, stderr, JSON path)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out, err = io.StringIO(), io.StringIO()
    status = bench_module.bench(backends=["numpy"], quick=True, repeats=3, json_path=str(path), out=out, err=err)
    return status, out.getvalue(), err.getvalue(), path


def test_quick_numpy_run_writes_rows_for_every_case(quick_run):
    status, _, err, path = quick_run
    assert status == 0
    assert "[6/6] numpy float32 (32,64,56,56) backward ..." in err

    document = json.loads(path.read_text())
    assert {"cpu", "cores", "numpy", "torch", "jax", "openblas_coretype"} <= document["machine"].keys()
    assert "targets" not in document
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


def test_output_explains_every_column_and_reports_no_goals(quick_run):
    _, out, _, _ = quick_run
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("backend "))
    columns = [c for c in bench_module.COLUMNS if c.header in header]
    # NumPy fills every column; "accel" where Numba's kernels serve, "ours/torch" where torch is installed
    present = {
        "accel": numpy_backend.numba_enabled(),
        "ours/torch": importlib.util.find_spec("torch") is not None,
    }
    assert [c.header for c in columns] == [c.header for c in bench_module.COLUMNS if present.get(c.header, True)]
    legend = lines[lines.index("columns:") :]
    for column in columns:
        assert any(line.strip().startswith(f"{column.header}  ") for line in legend), column.header
    assert any("naive" in line and "textbook" in line for line in legend)
    assert any(line.startswith("summary: ours/base") for line in lines)
    summary = lines[next(i for i, line in enumerate(lines) if line.startswith("summary:")) :]
    assert summary[1].split()[:6] == ["numpy", "vs", "naive", "under", "4096", "elements:"]
    assert summary[2].split()[:4] == ["2**20", "elements", "or", "more:"]
    for word in ("target", "NOT MET", " met", "``"):
        assert word not in out, word


def test_small_inputs_alone_show_the_difference_in_microseconds():
    def row(shape, overhead):
        return _row(shape=shape, overhead_us=overhead)

    lines = bench_module.table_lines([row((2, 4, 3, 3), 12.5), row((32, 64, 56, 56), -30546.5)])
    assert "12.5" in lines[2] and "-30546.5" not in lines[3]


def test_a_skipped_backend_is_reported_once(monkeypatch):
    real = bench_module.load_backend

    def load(name):
        if name == "cupy":
            raise bench_module.BackendUnavailable("cupy: not installed: test")
        return real(name)

    monkeypatch.setattr(bench_module, "load_backend", load)
    out, err = io.StringIO(), io.StringIO()
    status = bench_module.bench(
        backends=["numpy", "cupy"], shapes=[(2, 4, 3, 3)], quick=True, repeats=1, out=out, err=err
    )
    assert status == 0
    both = out.getvalue() + err.getvalue()
    assert both.count("cupy") == 1
    assert "not measured: cupy (not installed: test)" in out.getvalue().splitlines()[:5]


def test_no_loadable_backend_says_why_once(monkeypatch):
    def load(name):
        raise bench_module.BackendUnavailable(f"{name}: not installed: test")

    monkeypatch.setattr(bench_module, "load_backend", load)
    out, err = io.StringIO(), io.StringIO()
    assert bench_module.bench(backends=["cupy"], quick=True, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == ["not measured: cupy (not installed: test)", "error: no backend to benchmark"]


def test_rows_read_back_from_the_json_are_the_rows_printed(quick_run):
    _, out, _, path = quick_run
    rows = bench_module.load_rows(path)
    assert len(rows) == 6 and all(isinstance(r, bench_module.Row) for r in rows)
    assert all(isinstance(r.shape, tuple) and isinstance(r.loops, tuple) for r in rows)
    assert bench_module.table_lines(rows) == out.splitlines()[4 : 4 + 2 + len(rows)]
    assert bench_module.load_rows(json.loads(path.read_text())) == rows
    assert bench_module.load_rows(str(path)) == rows


def test_load_rows_round_trip():
    rows = [
        _row(case="eval", other_load=0.25),
        _row(backend="torch", baseline="autograd", case="backward", copy_ms=None, copies=None, loops=(3, 4)),
    ]
    document = {"rows": [dict(asdict(r), unknown="ignored") for r in rows], "skipped": []}
    text = json.dumps(document)  # tuples become lists, as in a written file
    assert bench_module.load_rows(json.loads(text)) == rows


def test_summary_gives_ranges_per_backend_baseline_and_size():
    rows = [
        _row(shape=(2, 4, 3, 3), case="train", ratio=1.8),
        _row(shape=(2, 4, 3, 3), dtype="float64", case="train", ratio=2.04),
        _row(shape=(32, 64, 56, 56), case="train", ratio=0.37),
        _row(shape=(32, 64, 56, 56), case="eval", ratio=0.45),
        _row(backend="torch", baseline="autograd", shape=(32, 64, 56, 56), case="backward", ratio=0.004),
    ]
    lines = bench_module.summary_lines(rows)
    assert lines[1].split() == ["numpy", "vs", "naive", "under", "4096", "elements:", "train", "1.80-2.04"]
    assert lines[2].split() == ["2**20", "elements", "or", "more:", "train", "0.37,", "eval", "0.45"]
    assert lines[3].split()[-2:] == ["backward", "0.004"]


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


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(bench_module, "have_matplotlib", lambda: False)
    assert main(["bench", "--quick", "--backend", "numpy", "--plot", "out.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_output_in_a_missing_directory_is_refused_before_running(tmp_path, capsys):
    assert main(["bench", "--quick", "--json", str(tmp_path / "missing" / "bench.json")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row(case=case, ratio=2.0, copies=10.0) for case in bench_module.CASES]
    rows += [_row(backend="torch", baseline="F.batch_norm", case=case, copies=None) for case in ("train", "eval")]
    rows.append(_row(backend="torch", baseline="autograd", case="backward", copies=None))
    path = tmp_path / "bench.png"
    bench_module.write_plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_rows_read_back(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench_module.write_plot(bench_module.load_rows(quick_run[3]), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_panel_titles_name_backend_and_baseline():
    torch_rows = [
        _row(backend="torch", baseline="F.batch_norm", case="train"),
        _row(backend="torch", baseline="autograd", case="backward"),
    ]
    assert bench_module._panel_title("numpy", "ratio", [_row()]) == "numpy: our time / naive NumPy"
    assert bench_module._panel_title("numpy", "copies", [_row()]) == "numpy: our time / time of an array copy"
    assert bench_module._panel_title("torch", "ratio", torch_rows) == (
        "torch: our time / torch F.batch_norm (train), torch autograd (backward)"
    )


@pytest.mark.parametrize("text", ["32,x", "5", "0,3", "1,4"])
def test_bad_shapes_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shape", text])
    assert "--shape" in capsys.readouterr().err


def test_importing_the_module_imports_no_backend():
    code = (
        "import sys, portable_bn._bench; "
        "print(sorted({'torch', 'jax', 'cupy', 'matplotlib', 'dask', 'distributed'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_json_of_a_run_without_sync_has_no_sync_rows(quick_run):
    document = json.loads(quick_run[3].read_text())
    assert "sync" not in document
    assert bench_sync.load_sync_rows(document) == []
