"""__all__ is honest and every public name is documented with an example."""

from __future__ import annotations

import inspect

import pytest

import portable_bn as pbn

PUBLIC = [name for name in pbn.__all__ if name != "__version__"]


def test_all_lists_exactly_the_public_names():
    exported = {name for name in dir(pbn) if not name.startswith("_") and not inspect.ismodule(getattr(pbn, name))}
    assert exported == set(PUBLIC)
    assert isinstance(pbn.__version__, str)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names_have_numpydoc_docstrings_with_examples(name):
    doc = inspect.getdoc(getattr(pbn, name)) or ""
    assert doc.splitlines()[0].strip(), name
    if name not in ("BatchNormResult", "IncompatibleKeys"):
        assert "Examples\n--------\n>>> " in doc, f"{name} has no runnable example"
        assert "Parameters\n----------" in doc, name


@pytest.mark.parametrize("method", ["state_dict", "load_state_dict", "reset_parameters", "reset_running_stats"])
def test_module_methods_have_examples(method):
    doc = inspect.getdoc(getattr(pbn.BatchNorm2d, method)) or ""
    assert "Examples\n--------\n>>> " in doc


def test_functions_take_options_by_keyword_only():
    for func, keyword_only in [
        (
            pbn.batch_norm,
            {"training", "momentum", "eps", "axis", "skip_nonfinite", "mask", "virtual_batch_size", "sync", "unbiased"},
        ),
        (pbn.batch_norm_backward, {"training", "axis", "mask", "virtual_batch_size", "sync"}),
        (
            pbn.BatchNorm2d,
            {"axis", "xp", "device", "dtype", "skip_nonfinite", "virtual_batch_size", "sync", "unbiased"},
        ),
        (pbn.BatchNorm2d.__call__, {"mask"}),
        (pbn.BatchNorm2d.load_state_dict, {"prefix"}),
    ]:
        params = inspect.signature(func).parameters
        assert {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} == keyword_only


@pytest.mark.parametrize("name", ["TorchProcessGroup", "JaxAxis"])
def test_reducers_have_docstrings_with_examples(name):
    from portable_bn import distributed

    assert name in distributed.__all__
    doc = inspect.getdoc(getattr(distributed, name)) or ""
    examples = doc.split("Examples\n--------\n", 1)[1]
    assert "\n>>> " in examples and "Parameters\n----------" in doc, name


TESTING_PUBLIC = [name for name in pbn.testing.__all__ if not name.isupper()]  # constants have no docstrings


def test_testing_all_lists_exactly_the_public_names():
    from portable_bn import testing

    exported = {
        name for name in dir(testing) if not name.startswith("_") and not inspect.ismodule(getattr(testing, name))
    }
    assert exported == set(testing.__all__)


@pytest.mark.parametrize("name", TESTING_PUBLIC)
def test_testing_names_have_docstrings_with_examples(name):
    doc = inspect.getdoc(getattr(pbn.testing, name)) or ""
    assert doc.splitlines()[0].strip(), name
    assert "Examples\n--------\n>>> " in doc, f"portable_bn.testing.{name} has no runnable example"


def test_import_loads_no_array_library():
    """``import portable_bn`` imports no array library and not array-api-compat's NumPy wrapper:
    each is loaded when an array of it arrives (a torch-only user pays for no NumPy namespace)."""
    import subprocess
    import sys

    code = (
        "import sys; import portable_bn; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'torch', 'jax', 'cupy', 'dask', 'array_api_strict') or m == 'array_api_compat.numpy'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
