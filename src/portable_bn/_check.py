"""``python -m portable_bn check``: every installed backend against the float64 reference.

It runs :func:`portable_bn.testing.scenarios`, the scenarios the conformance suite runs, so
the command and CI prove the same thing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import TextIO

from .testing import Check, failures, scenarios
from .testing import _matrix as _backends


def _share(check: Check) -> float:
    """How much of its limit a check used (a check allowed no error: 0 or Inf)."""
    if check.limit > 0:
        return check.error / check.limit
    return 0.0 if check.error == 0 else math.inf


ROWS_ONLY = "PBN_CHECK_ROWS_ONLY"
"""Set in the environment of a child ``check``: print the rows as JSON lines instead of the table."""


def _rows(backend: str) -> list[tuple[str, ...]]:
    """The table rows of one backend (one per combination that holds values, or one skip row)."""
    try:
        combos = _backends.combinations(backend)
    except _backends.BackendUnavailable as why:
        if _backends.needs_own_process(backend):
            return _rows_in_child(backend)
        return [(backend, "-", "-", "-", "-", "-", f"skipped: {why}")]
    rows: list[tuple[str, ...]] = []
    for combo in combos:
        if not combo.values:
            continue
        try:
            checks = list(scenarios(combo))
            worst = max(checks, key=_share)
            bad = failures(checks)
            status = "PASS" if not bad else "FAIL: " + ", ".join(c.what for c in bad)[:60]
            shown = (worst.what[:40], f"{worst.error:.2e}", f"{worst.limit:.1e}")
        except Exception as exc:  # noqa: BLE001 - report any crash as a failure row
            status, shown = f"FAIL: {type(exc).__name__}: {exc}"[:80], ("-", "-", "-")
        rows.append((backend, combo.device_label, combo.dtype_name, *shown, status))
    return rows


def _rows_in_child(backend: str) -> list[tuple[str, ...]]:
    """JAX's 64-bit setting is per process: a JAX backend whose setting differs from the one this
    process already has is checked in a Python process of its own."""
    child = subprocess.run(
        [sys.executable, "-m", "portable_bn", "check", "--backend", backend],
        env={**os.environ, ROWS_ONLY: "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return [tuple(json.loads(line)) for line in child.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError:
        detail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return [(backend, "-", "-", "-", "-", "-", f"FAIL: its own process failed: {detail}"[:80])]


def check(backends: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run the scenarios on every (backend, device, dtype); print a table; 0 if all pass.

    A row shows the check that came closest to its tolerance (the largest share of it used)."""
    names = backends or list(_backends.ALL_BACKENDS)
    out = out or sys.stdout
    rows = [row for backend in names for row in _rows(backend)]
    failed = any(row[-1].startswith("FAIL") for row in rows)
    if os.environ.get(ROWS_ONLY):
        for row in rows:
            print(json.dumps(row), file=out)
        return 1 if failed else 0
    header = ("backend", "device", "dtype", "closest check", "error", "tolerance", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    print("FAILED" if failed else "all passed", file=out)
    return 1 if failed else 0
