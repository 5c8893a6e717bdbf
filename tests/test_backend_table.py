"""The backend table (``portable_bn.testing._matrix.BACKEND_TABLE``) says what the suite runs.

The docs' capability table is generated from it, so it must be what the tests do: the
combinations the fixtures receive are the table's devices times its dtypes, every feature
names a test that exists, and nox runs a session for every backend of the table.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import selected_backends
from portable_bn.testing import _matrix

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backend", selected_backends())
def test_combinations_are_the_tables_devices_times_dtypes(backend):
    try:
        combos = _matrix.combinations(backend)
    except _matrix.BackendUnavailable as why:
        pytest.skip(str(why))
    spec = _matrix.SPECS[backend]
    got = [(c.device_label, c.dtype_name, c.values) for c in combos]
    want = [(d.label, name, d.values) for d in spec.devices for name in spec.dtypes]
    assert got == want


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


@pytest.mark.parametrize(
    "feature", [f for spec in _matrix.BACKEND_TABLE for f in spec.features], ids=lambda f: f"{f.what}"
)
def test_every_feature_names_an_existing_test(feature):
    path, name = feature.test.split("::")
    assert name in _test_names(ROOT / path), f"{feature.test} does not exist"


def test_nox_runs_every_backend_of_the_table():
    noxfile = (ROOT / "noxfile.py").read_text()
    for variable, names in (("CPU_BACKENDS", _matrix.CPU_BACKENDS), ("GPU_BACKENDS", _matrix.GPU_BACKENDS)):
        listed = re.search(rf"^{variable} = \[(.*?)\]", noxfile, flags=re.MULTILINE)
        assert listed is not None
        assert tuple(ast.literal_eval(f"[{listed.group(1)}]")) == names
