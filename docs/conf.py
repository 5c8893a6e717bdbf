"""Sphinx configuration for portable_bn (offline: no intersphinx, built-in theme).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
Doctests of the pages (need torch, jax, dask, array-api-strict):
``python -m sphinx -b doctest docs docs/_build/doctest``. ``nox -s docs_browser`` does both and
opens every page in headless Chromium.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent / "src"))
sys.path.insert(0, str(DOCS / "_ext"))

import portable_bn  # noqa: E402 - after the path above

project = "portable_bn"
author = "portable_bn developers"
copyright = "portable_bn developers"
release = portable_bn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into the build: the pages need no network
    "numpydoc",
    "myst_parser",  # CHANGELOG.md on the changelog page
    "pbn_docs",  # tables and plots generated from the code and its commands (docs/_ext)
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_templates", "_ext", "bench"]
root_doc = "index"

# -- autodoc / autosummary ---------------------------------------------------
autosummary_generate = True  # pages go to docs/generated (gitignored)
autodoc_typehints = "none"  # signatures use Any / ModuleType; the docstrings carry the types
add_module_names = False

# -- numpydoc ----------------------------------------------------------------
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# The build validates every public docstring (warnings are errors with -W).
# Excluded checks: see-also/extended summary (optional here), and style
# points numpydoc flags on NamedTuple/inherited members.
numpydoc_validation_checks = {"all", "GL08", "SA01", "ES01", "RT02", "PR09", "RT03", "SS05", "GL02", "GL01", "SS06"}

# -- doctest (``-b doctest``) ------------------------------------------------
doctest_global_setup = """
import numpy as np
import portable_bn as pbn
from portable_bn.testing import BackendUnavailable, combinations
try:
    cuda_available = bool(combinations("cupy"))
except BackendUnavailable:
    cuda_available = False
"""

# -- HTML ----------------------------------------------------------------------
html_theme = "alabaster"
html_theme_options = {
    "description": "PyTorch-exact batch normalization on every array-API library",
    "fixed_sidebar": True,
    "page_width": "1200px",  # room for the wide tables
    "body_max_width": "none",
}
html_static_path: list[str] = []
html_show_sourcelink = False
