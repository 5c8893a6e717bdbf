"""The docs' own tools: the browser check's link rules and the committed benchmark results.

The browser itself runs in ``nox -s docs_browser``; here, without a browser, the part of
``docs/browser_check.py`` that judges links and anchors, and the files the performance page
is drawn from.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from portable_bn import _bench

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def browser_check():
    spec = importlib.util.spec_from_file_location("browser_check", DOCS / "browser_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["browser_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["browser_check"]


def test_broken_links_and_anchors_are_reported(browser_check, tmp_path):
    for name in ("index.html", "api.html"):
        (tmp_path / name).write_text("<html></html>")
    base = "http://127.0.0.1:8000/"
    pages = {
        "index.html": browser_check.PageResult(
            "index.html",
            ids={"top-section"},
            links=[
                base + "api.html#batch-norm",  # exists
                base + "api.html#no-such-anchor",
                base + "missing.html",
                base + "index.html#top-section",
                "https://data-apis.org/array-api/",  # external: counted, not followed
                "mailto:someone@example.org",
            ],
        ),
        "api.html": browser_check.PageResult("api.html", ids={"batch-norm"}),
    }
    externals = browser_check.check_links(tmp_path, base, pages)
    assert externals == 1
    assert pages["index.html"].errors == ["broken anchor: api.html#no-such-anchor", "broken link: missing.html"]
    assert pages["api.html"].errors == []


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_committed_bench_results_load_and_cover_every_case(name):
    path = DOCS / "bench" / f"{name}.json"
    rows = _bench.load_rows(path)
    machine = json.loads(path.read_text())["machine"]
    assert machine["cpu"] and machine["python"]
    backends = {row.backend for row in rows}
    assert backends <= set(_bench.BACKENDS)
    for backend in backends:
        mine = [row for row in rows if row.backend == backend]
        cases = {(row.dtype, row.shape, row.case) for row in mine}
        assert len(cases) == len(mine) == len(_bench.DEFAULT_SHAPES) * len(_bench.DTYPES) * len(_bench.CASES)
        assert all(row.ours_ms > 0 and row.baseline_ms > 0 for row in mine)
        assert all(row.ratio == pytest.approx(row.ours_ms / row.baseline_ms, rel=0.02, abs=0.01) for row in mine)


def test_committed_sync_results_cover_every_engine_and_case():
    """docs/bench/sync.json, shown on the scaling page: every engine, its cases, the collectives
    synchronization promises (one gather of 4C+1 numbers per forward, one sum of 2C+1 per
    explicit backward), and differences consistent with the times."""
    from portable_bn import _bench_sync

    path = DOCS / "bench" / "sync.json"
    rows = _bench_sync.load_sync_rows(path)
    assert json.loads(path.read_text())["machine"]["cpu"]
    channels = _bench_sync.SYNC_SHAPE[1]
    by_engine = {}
    for row in rows:
        by_engine.setdefault(row.engine, set()).add(row.case)
        assert row.overhead_us == pytest.approx((row.sync_ms - row.local_ms) * 1e3, rel=1e-6)
        assert row.ratio == pytest.approx(row.sync_ms / row.local_ms, rel=1e-6)
    assert set(by_engine) == set(_bench_sync.SYNC_ENGINE_NAMES.values())
    forward = {row.engine: row.collectives for row in rows if row.case == "train"}
    backward = {row.engine: row.collectives for row in rows if row.case == "backward"}
    assert forward["torch.distributed"] == f"all_gather({4 * channels + 1})"
    assert backward["torch.distributed"] == f"all_reduce({2 * channels + 1})"
    assert backward["jax.shard_map"] == f"all-reduce({2 * channels + 1})"
