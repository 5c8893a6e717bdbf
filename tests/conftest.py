"""Backend selection for the conformance suite.

``PBN_BACKENDS`` (comma-separated) picks the backends; by default every CPU
backend that is installed. A selected backend that is missing, or a GPU
backend without a GPU, shows up as skipped tests saying why.

Fixtures
- ``combo``: every (backend, device, dtype), including value-less devices
  (torch "meta").
- ``vcombo``: the combinations that hold values (everything but "meta").

Hypothesis profiles (``PBN_HYPOTHESIS_PROFILE``, default ``ci``): ``ci``
(25 examples, derandomized: the same examples on every run), ``dev`` (10)
and ``fuzz`` (2000, random, failures saved in ``.hypothesis/``).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from portable_bn import testing as _backends

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile("fuzz", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("PBN_HYPOTHESIS_PROFILE", "ci"))


def selected_backends() -> list[str]:
    env = os.environ.get("PBN_BACKENDS", "").strip()
    if not env:
        return list(_backends.CPU_BACKENDS)
    names = [name.strip() for name in env.split(",") if name.strip()]
    unknown = sorted(set(names) - set(_backends.ALL_BACKENDS))
    if unknown:
        raise pytest.UsageError(f"PBN_BACKENDS names unknown backends {unknown}; known: {_backends.ALL_BACKENDS}")
    return names


def _params(*, values_only: bool) -> list[object]:
    params: list[object] = []
    for name in selected_backends():
        try:
            combos = _backends.combinations(name)
        except _backends.BackendUnavailable as why:
            params.append(pytest.param(None, marks=pytest.mark.skip(reason=str(why)), id=name))
            continue
        params += [pytest.param(c, id=c.id) for c in combos if c.values or not values_only]
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "combo" in metafunc.fixturenames:
        metafunc.parametrize("combo", _params(values_only=False))
    if "vcombo" in metafunc.fixturenames:
        metafunc.parametrize("vcombo", _params(values_only=True))


def both_paths(func, *args, **kwargs):
    """``func`` with the backend's primitive set, then on the pure array-API primitives alone."""
    fast = func(*args, **kwargs)
    with _backends.pure_primitives():
        pure = func(*args, **kwargs)
    return fast, pure


def require_backend(name: str) -> None:
    """Skip unless ``name`` is selected and installed (for library-specific tests)."""
    if name not in selected_backends():
        pytest.skip(f"{name} not selected by PBN_BACKENDS")
    try:
        _backends.combinations(name)
    except _backends.BackendUnavailable as why:
        pytest.skip(str(why))


def pytest_report_header(config: pytest.Config) -> str:
    return f"portable_bn backends: {', '.join(selected_backends())}"
