"""nox sessions: the same conformance suite once per array backend, plus lint and docs.

    nox                              # CPU matrix + lint + docs checked in a browser (what CI runs)
    nox -s "tests(torch)"            # one backend
    nox -s "tests(cupy)" "tests(torch_gpu)" "tests(jax_gpu)"   # on a GPU machine
    nox -s docs                      # the docs and their examples, without the browser
    nox -s bench -- --quick          # speed ratios (not run by default)

PyTorch: ``PBN_TORCH_REQUIREMENT`` (default ``torch==2.13.0``) and, where the
default would resolve to a multi-GB CUDA build, ``PBN_TORCH_INDEX_URL``
(e.g. https://download.pytorch.org/whl/cpu) pick the CPU build.

docs_browser needs Chromium (Debian's or Ubuntu's ``chromium`` package; ``PBN_CHROMIUM``
names another binary). Run as root with apt-get available, the session installs it.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

CPU_BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "jax_x32", "dask", "ndonnx"]
GPU_BACKENDS = ["cupy", "torch_gpu", "jax_gpu"]
ACCELERATED = ["numba"]
"""Sessions of a CPU backend's suite with a compiled accelerator installed (SUITE_BACKEND)."""
nox.options.sessions = [f"tests({backend})" for backend in CPU_BACKENDS + ACCELERATED] + ["lint", "docs_browser"]

TORCH_REQUIREMENT = os.environ.get("PBN_TORCH_REQUIREMENT", "torch==2.13.0")
TORCH_INDEX_URL = os.environ.get("PBN_TORCH_INDEX_URL", "")

# What each backend needs on top of the package and its test extra:
# (extras of this package, other requirements). The interop tests (converters, files, ONNX)
# run where their libraries are installed: Keras on the torch and JAX backends, Flax on JAX,
# onnx/onnxruntime and safetensors on NumPy and torch.
REQUIREMENTS: dict[str, tuple[list[str], list[str]]] = {
    "numpy": (["onnx", "safetensors"], []),
    "numba": (["numba"], []),  # NumPy with Numba's kernels
    "array_api_strict": (["strict"], []),
    "torch": (["keras", "onnx", "safetensors", "triton"], []),  # torch itself: install_torch
    "jax": (["jax", "keras", "flax"], []),
    "jax_x32": (["jax"], []),  # JAX's default configuration: 64-bit types off
    "dask": (["dask"], []),
    "ndonnx": (["onnx"], []),
    "cupy": ([], ["cupy-cuda12x"]),
    "torch_gpu": ([], []),  # installed by install_torch (a CUDA build)
    "jax_gpu": ([], ["jax[cuda12]"]),
}
SUITE_BACKEND = {"numba": "numpy"}
"""Sessions that run another backend's suite: numba is NumPy's, with Numba's kernels installed."""
KERAS_BACKEND = {"torch": "torch", "jax": "jax"}
"""The Keras backend of the sessions that install Keras (Keras reads KERAS_BACKEND once, at import)."""


def install_torch(session: nox.Session, *, cuda: bool) -> None:
    if cuda:
        session.install(os.environ.get("PBN_TORCH_GPU_REQUIREMENT", "torch"))
    elif TORCH_INDEX_URL:
        session.install(TORCH_REQUIREMENT, "--index-url", TORCH_INDEX_URL)
    else:
        session.install(TORCH_REQUIREMENT)


@nox.session
@nox.parametrize("backend", [nox.param(b, id=b) for b in CPU_BACKENDS + ACCELERATED + GPU_BACKENDS])
def tests(session: nox.Session, backend: str) -> None:
    """The conformance suite with PBN_BACKENDS=<backend>."""
    if backend in GPU_BACKENDS and shutil.which("nvidia-smi") is None:
        session.skip(f"{backend}: no NVIDIA GPU on this machine (nvidia-smi not found)")
    extras, others = REQUIREMENTS[backend]
    session.install("-e", f".[{','.join(['test', *extras])}]", *others)
    if backend in ("torch", "torch_gpu"):
        install_torch(session, cuda=backend == "torch_gpu")
    env = {"PBN_BACKENDS": SUITE_BACKEND.get(backend, backend)}
    if backend in KERAS_BACKEND:
        env["KERAS_BACKEND"] = KERAS_BACKEND[backend]
    session.run("python", "-m", "pytest", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


DOCS_EXTRAS = "docs,strict,jax,dask,keras,flax,onnx,safetensors"  # the pages' examples use every CPU library
DOCS_ENV = {"KERAS_BACKEND": "jax"}


def build_docs(session: nox.Session) -> None:
    session.run("python", "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", env=DOCS_ENV)
    session.run(
        "python", "-m", "sphinx", "-W", "--keep-going", "-b", "doctest", "docs", "docs/_build/doctest", env=DOCS_ENV
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Sphinx, warnings as errors, offline; then every example on the pages runs (doctest)."""
    session.install("-e", f".[{DOCS_EXTRAS}]")
    install_torch(session, cuda=False)  # the pages show PyTorch interop
    build_docs(session)


def chromium(session: nox.Session) -> str:
    """The Chromium binary: PBN_CHROMIUM, or chromium on PATH; installed with apt-get where we are root."""
    found = os.environ.get("PBN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "-qq", "update", external=True, env=env)
        session.run("apt-get", "-qq", "-y", "install", "chromium", external=True, env=env)
        found = shutil.which("chromium")
    if not found:
        session.error(
            "docs_browser needs Chromium: install Debian's or Ubuntu's chromium package "
            "(sudo apt-get install chromium) or set PBN_CHROMIUM to a Chromium binary"
        )
    return found


@nox.session
def docs_browser(session: nox.Session) -> None:
    """The docs session, then every page opened in headless Chromium (docs/browser_check.py):
    no console errors, math rendered, images shown, no broken link or anchor; screenshots in
    docs/_build/screenshots."""
    browser = chromium(session)
    session.install("-e", f".[{DOCS_EXTRAS},browser]")
    install_torch(session, cuda=False)
    build_docs(session)
    session.run(
        "python", "docs/browser_check.py", "docs/_build/html", "--screenshots", "docs/_build/screenshots",
        "--chromium", browser,
    )  # fmt: skip


@nox.session
def check(session: nox.Session) -> None:
    """The main job on every CPU backend: python -m portable_bn check."""
    session.install("-e", ".[strict,jax,dask,onnx]")
    install_torch(session, cuda=False)
    session.run("python", "-m", "portable_bn", "check")


@nox.session
def fuzz(session: nox.Session) -> None:
    """The property tests with many random examples (hypothesis profile "fuzz") on every CPU backend.

    Not part of the default sessions (it runs for a long time); failures are saved
    in .hypothesis/ and replayed first on the next run.
    """
    session.install("-e", ".[test,strict,jax,dask,onnx]")
    install_torch(session, cuda=False)
    session.run(
        "python",
        "-m",
        "pytest",
        "tests/test_properties.py",
        *session.posargs,
        env={"PBN_HYPOTHESIS_PROFILE": "fuzz", "PBN_BACKENDS": ",".join(CPU_BACKENDS)},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory ratios: python -m portable_bn bench [posargs], e.g. -- --quick --json bench.json;
    -- --sync-only times synchronized batch norm (torch.distributed, JAX, a Dask cluster)."""
    session.install("-e", ".[bench,jax,dask,numba]")
    install_torch(session, cuda=False)
    session.run("python", "-m", "portable_bn", "bench", *session.posargs)
