"""python -m portable_bn bench --sync: the synchronization table per engine, its JSON, and its
child processes (killed when they fail or run too long).

Each engine's run is skipped where the engine is not installed. Speed itself is never
asserted here: the numbers depend on the machine.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time

import pytest

import portable_bn._bench as bench_module
import portable_bn._bench_sync as bench_sync
from portable_bn.__main__ import main

SYNC_CHANNELS = bench_sync.QUICK_SYNC_SHAPE[1]
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


@pytest.fixture(scope="module", params=bench_sync.SYNC_ENGINES)
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
    rows = bench_sync.load_sync_rows(path)
    _, cases, collectives = SYNC_EXPECTED[engine]
    assert [r.case for r in rows] == list(cases)
    for row in rows:
        assert row.engine == bench_sync.SYNC_ENGINE_NAMES[engine]
        assert (row.replicas, row.shape, row.dtype) == (
            bench_sync.SYNC_REPLICAS[engine],
            bench_sync.QUICK_SYNC_SHAPE,
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
    rows = bench_sync.load_sync_rows(path)
    table = bench_sync.sync_table_lines(rows)
    assert lines[title + 2 : title + 2 + len(table)] == table  # the JSON holds the rows printed
    assert table[0].split()[:3] == ["engine", "replicas", "case"]
    legend = lines[lines.index("columns:") :]
    shown = [c for c in bench_sync.SYNC_COLUMNS if any(c.cell(r) != "-" for r in rows)]
    without_reducer = {"alone ms", "sync-alone us"} if engine == "dask" else set()
    expected = {c.header for c in bench_sync.SYNC_COLUMNS} - without_reducer
    assert {c.header for c in shown} == expected
    for column in shown:
        assert column.header in table[0], column.header
        assert any(line.startswith(f"  {column.header}  ") for line in legend), column.header
    engines = legend[legend.index("engines:") + 1]
    assert engines.split()[0] == bench_sync.SYNC_ENGINE_NAMES[engine]
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
    assert sync["settings"]["shape"] == list(bench_sync.QUICK_SYNC_SHAPE)
    assert bench_sync.load_sync_rows(document) == bench_sync.load_sync_rows(str(path))


def test_an_engine_not_installed_is_reported_once(monkeypatch):
    monkeypatch.setattr(bench_sync, "sync_unavailable", lambda engine: f"{engine}: test is not installed")
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

    monkeypatch.setattr(bench_sync, "sync_unavailable", lambda engine: None)
    monkeypatch.setattr(bench_sync, "measure_sync_engine", fail)
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
    monkeypatch.setattr(bench_sync, "_CHILD_CODE", code)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no result within 3 s"):
        bench_sync.run_sync_children([{}, {}], dict(os.environ), timeout=3)
    assert time.monotonic() - start < 10
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:  # reaped by init once killed
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_failing_child_says_why_and_stops_the_others(monkeypatch):
    code = "import json, sys, time; (json.loads(sys.argv[1]) or time.sleep(60)); raise ValueError('test failure')"
    monkeypatch.setattr(bench_sync, "_CHILD_CODE", code)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"child process 2 of 2 exited with status 1: ValueError: test failure"):
        bench_sync.run_sync_children([{}, {"fail": True}], dict(os.environ), timeout=30)
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
    ops = bench_sync.xla_collectives(hlo)
    assert [op["kind"] for op in ops] == ["all-reduce", "all-reduce", "all-reduce", "all-gather"]
    assert ops[1]["shapes"] == [[4, 257], [1, 64, 1, 1]]
    assert ops[3]["shapes"] == [[2, 3]] and ops[3]["dtype"] == "float64"  # each of the 4 puts in 2 rows
    assert bench_sync.collectives_text(ops) == (
        "all-reduce(1028) + all-reduce(1028+64) + all-reduce(129) + all-gather(6)"
    )
    assert bench_sync.collectives_text([]) == "none"


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


def test_importing_the_module_imports_no_engine():
    code = (
        "import sys, portable_bn._bench_sync; "
        "print(sorted({'torch', 'jax', 'cupy', 'matplotlib', 'dask', 'distributed'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
