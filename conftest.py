"""Doctests of the package that import an optional library (onnxruntime, keras, flax,
safetensors, ...) are skipped where it does not import; the nox sessions that install it run them."""

from __future__ import annotations

import importlib
import re

import pytest

_IMPORT = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    doctest = getattr(item, "dtest", None)
    if doctest is None:
        return
    for example in doctest.examples:
        imported = _IMPORT.match(example.source)
        if imported is None:
            continue
        try:
            importlib.import_module(imported.group(1))
        except ImportError as why:  # not installed, or (Keras) without the backend it is set to
            pytest.skip(f"the example needs {imported.group(1)}: {why}")
