"""python -m portable_bn bench: it runs, reports finite ratios, and its baselines are right.

Speed itself is never asserted here: the numbers depend on the machine.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest

import portable_bn._bench as bench_module
from portable_bn.__main__ import main
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
    assert [c.header for c in columns] == [c.header for c in bench_module.COLUMNS]  # NumPy fills every column
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


# -- the synchronization table (--sync) ---------------------------------------

SYNC_CHANNELS = bench_module.QUICK_SYNC_SHAPE[1]
SYNC_EXPECTED = {
    # engine: (modules it needs, its cases, the collectives of each case with sync)
    "torch": (
        ("torch",),
        ("train", "backward", "train+autograd"),
        {
            "train": f"all_gather({4 * SYNC_CHANNELS + 1})",
            "backward": f"all_reduce({2 * SYNC_CHANNELS + 1})",
            # autograd: the gather's backward sums the gradient of the R gathered rows
            "train+autograd": f"all_gather({4 * SYNC_CHANNELS + 1}) + all_reduce({2 * (4 * SYNC_CHANNELS + 1)})",
        },
    ),
    "jax": (
        ("jax",),
        ("train", "backward", "train+autograd"),
        {
            "train": f"all-reduce({4 * (4 * SYNC_CHANNELS + 1)})",  # the gather: one psum of R rows
            "backward": f"all-reduce({2 * SYNC_CHANNELS + 1})",
        },
    ),
    "dask": (("dask", "distributed"), ("train", "backward"), {}),
}


@pytest.fixture(scope="module", params=bench_module.SYNC_ENGINES)
def sync_run(request, tmp_path_factory):
    """One quick --sync-only run per engine: (engine, exit status, stdout, stderr, JSON path)."""
    engine = request.param
    for module in SYNC_EXPECTED[engine][0]:
        pytest.importorskip(module)
    path = tmp_path_factory.mktemp("sync") / f"{engine}.json"
    out, err = io.StringIO(), io.StringIO()
    status = bench_module.bench(
        sync_only=True, sync_engines=[engine], quick=True, json_path=str(path), out=out, err=err
    )
    return engine, status, out.getvalue(), err.getvalue(), path


def test_sync_rows_per_engine_and_case(sync_run):
    engine, status, out, err, path = sync_run
    assert status == 0, err
    assert "not measured" not in out, out
    rows = bench_module.load_sync_rows(path)
    _, cases, collectives = SYNC_EXPECTED[engine]
    assert [r.case for r in rows] == list(cases)
    for row in rows:
        assert row.engine == bench_module.SYNC_ENGINE_NAMES[engine]
        assert (row.replicas, row.shape, row.dtype) == (
            bench_module.SYNC_REPLICAS[engine],
            bench_module.QUICK_SYNC_SHAPE,
            "float32",
        )
        for value in (row.sync_ms, row.local_ms, row.ratio, row.bare_ms):
            assert value is not None and math.isfinite(value) and value > 0, row
        assert math.isclose(row.overhead_us, (row.sync_ms - row.local_ms) * 1e3, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(row.ratio, row.sync_ms / row.local_ms)
        assert row.repeats == bench_module.QUICK_REPEATS
        if engine == "dask":  # no reducer: no "alone" timing
            assert row.alone_ms is None and row.communication_us is None
            assert set(row.loops) == {"sync", "local", "bare"}
        else:
            assert row.alone_ms is not None and math.isfinite(row.alone_ms) and row.alone_ms > 0
            assert row.communication_us is not None
            assert math.isclose(row.communication_us, (row.sync_ms - row.alone_ms) * 1e3, rel_tol=1e-9, abs_tol=1e-9)
            assert set(row.loops) == {"sync", "local", "alone", "bare"}
        assert all(isinstance(count, int) and count >= 1 for count in row.loops.values())
        if engine == "dask":
            assert row.collective_calls is None and row.collectives.startswith("none: ")
            assert "tasks" in row.collectives and "between workers" in row.collectives
        else:
            assert row.collective_calls is not None and row.collective_calls >= 1
            assert row.collective_numbers is not None and row.collective_numbers > 0
            if row.case in collectives:
                assert row.collectives == collectives[row.case]
                assert row.collective_calls == row.collectives.count("(")


def test_sync_table_is_printed_with_a_legend_for_every_column(sync_run):
    engine, _, out, _, path = sync_run
    lines = out.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("synchronized batch norm (sync=)"))
    rows = bench_module.load_sync_rows(path)
    table = bench_module.sync_table_lines(rows)
    assert lines[title + 2 : title + 2 + len(table)] == table  # the JSON holds the rows printed
    assert table[0].split()[:3] == ["engine", "replicas", "case"]
    legend = lines[lines.index("columns:") :]
    shown = [c for c in bench_module.SYNC_COLUMNS if any(c.cell(r) != "-" for r in rows)]
    without_reducer = {"alone ms", "sync-alone us"} if engine == "dask" else set()
    expected = {c.header for c in bench_module.SYNC_COLUMNS} - without_reducer
    assert {c.header for c in shown} == expected
    for column in shown:
        assert column.header in table[0], column.header
        assert any(line.startswith(f"  {column.header}  ") for line in legend), column.header
    engines = legend[legend.index("engines:") + 1]
    assert engines.split()[0] == bench_module.SYNC_ENGINE_NAMES[engine]
    if engine == "torch":
        assert any("torch.nn.SyncBatchNorm" in line for line in legend[legend.index("notes:") :])
    for word in ("target", "NOT MET", "``"):
        assert word not in out, word


def test_sync_json_keeps_the_per_backend_document(sync_run):
    _, _, _, _, path = sync_run
    document = json.loads(path.read_text())
    assert document["rows"] == [] and bench_module.load_rows(document) == []
    sync = document["sync"]
    assert {"settings", "rows", "engines", "notes", "skipped"} <= sync.keys()
    assert sync["settings"]["shape"] == list(bench_module.QUICK_SYNC_SHAPE)
    assert bench_module.load_sync_rows(document) == bench_module.load_sync_rows(str(path))


def test_json_of_a_run_without_sync_has_no_sync_rows(quick_run):
    document = json.loads(quick_run[3].read_text())
    assert "sync" not in document
    assert bench_module.load_sync_rows(document) == []


def test_an_engine_not_installed_is_reported_once(monkeypatch):
    monkeypatch.setattr(bench_module, "sync_unavailable", lambda engine: f"{engine}: test is not installed")
    out, err = io.StringIO(), io.StringIO()
    status = bench_module.bench(sync_only=True, sync_engines=["dask", "dask"], quick=True, out=out, err=err)
    assert status == 0
    assert out.getvalue().count("not measured") == 1
    assert "not measured: dask (test is not installed)" in out.getvalue().splitlines()
    assert "engine " not in out.getvalue()  # no table without rows
    assert [line for line in err.getvalue().splitlines() if not line.startswith("warning: other processes")] == []


def test_a_failing_engine_is_reported_not_raised(monkeypatch):
    def fail(engine, **settings):
        raise RuntimeError("its child process exited with status 1: ValueError: test")

    monkeypatch.setattr(bench_module, "sync_unavailable", lambda engine: None)
    monkeypatch.setattr(bench_module, "measure_sync_engine", fail)
    out, err = io.StringIO(), io.StringIO()
    assert bench_module.bench(sync_only=True, sync_engines=["torch"], quick=True, out=out, err=err) == 0
    assert "not measured: torch.distributed (its child process exited with status 1: ValueError: test)" in (
        out.getvalue().splitlines()
    )


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead
        return stat.read().split(") ")[-1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_that_run_too_long_are_killed_with_what_they_started(monkeypatch, tmp_path):
    pid_file = tmp_path / "grandchild"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    monkeypatch.setattr(bench_module, "_CHILD_CODE", code)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no result within 3 s"):
        bench_module.run_sync_children([{}, {}], dict(os.environ), timeout=3)
    assert time.monotonic() - start < 10
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:  # reaped by init once killed
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_failing_child_says_why_and_stops_the_others(monkeypatch):
    code = "import json, sys, time; (json.loads(sys.argv[1]) or time.sleep(60)); raise ValueError('test failure')"
    monkeypatch.setattr(bench_module, "_CHILD_CODE", code)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"child process 2 of 2 exited with status 1: ValueError: test failure"):
        bench_module.run_sync_children([{}, {"fail": True}], dict(os.environ), timeout=30)
    assert time.monotonic() - start < 10


def test_xla_collectives_are_read_from_the_program_text():
    """Lines as jax's compiled().as_text() prints them (operands without shapes)."""
    groups = "replica_groups={{0,1,2,3}}, use_global_device_ids=true"
    hlo = f"""
  %psum = f32[4,257]{{1,0}} all-reduce(%select_fusion), channel_id=1, {groups}, to_apply=%region_27
  %all-reduce.1 = (f32[4,257]{{1,0}}, f32[1,64,1,1]{{3,2,1,0}}) all-reduce(%a, %b), channel_id=2, {groups}
  %get-tuple-element.1 = f32[4,257]{{1,0}} get-tuple-element(%all-reduce.1), index=0
  %start = f32[129]{{0}} all-reduce-start(%c), channel_id=3, {groups}, to_apply=%add
  %done = f32[129]{{0}} all-reduce-done(%start)
  %ag = f64[8,3]{{1,0}} all-gather(%d), channel_id=4, replica_groups=[1,4]<=[4], dimensions={{0}}
"""
    ops = bench_module.xla_collectives(hlo)
    assert [op["kind"] for op in ops] == ["all-reduce", "all-reduce", "all-reduce", "all-gather"]
    assert ops[1]["shapes"] == [[4, 257], [1, 64, 1, 1]]
    assert ops[3]["shapes"] == [[2, 3]] and ops[3]["dtype"] == "float64"  # each of the 4 puts in 2 rows
    assert bench_module.collectives_text(ops) == (
        "all-reduce(1028) + all-reduce(1028+64) + all-reduce(129) + all-gather(6)"
    )
    assert bench_module.collectives_text([]) == "none"


def test_plot_with_sync_only_is_refused(capsys):
    assert main(["bench", "--sync-only", "--plot", "out.png"]) == 2
    assert "--sync-only" in capsys.readouterr().err


def test_sync_options_reach_the_command(monkeypatch):
    seen = {}
    monkeypatch.setattr(bench_module, "bench", lambda **options: seen.update(options) or 0)
    assert main(["bench", "--sync-engine", "jax", "--sync-engine", "dask", "--quick"]) == 0
    assert seen["sync_engines"] == ["jax", "dask"] and not seen["sync"] and not seen["sync_only"]
    assert main(["bench", "--sync"]) == 0
    assert seen["sync"] and seen["sync_engines"] is None
