"""Tables and plots that the docs build generates from the code and its commands.

Directives:

``.. backend-table::``
    The capability table, from the conformance suite's backend table
    (``portable_bn.testing._matrix.BACKEND_TABLE``).
``.. command-output:: accuracy`` (or ``check``)
    Runs ``python -m portable_bn accuracy`` (``check``) in the build's environment and shows
    what it prints, under a line describing the machine. The output is cached in
    ``docs/generated/cache`` under a key of the package's source and the libraries' versions.
``.. bench-results:: bench/cpu.json``
    From a file written by ``python -m portable_bn bench --json``: the machine, a plot drawn
    with the command's own plotting code, and one table per backend.
``.. sync-results:: bench/sync.json``
    From a file written by ``python -m portable_bn bench --sync-only --json``: the machine,
    the table of synchronized calls per engine, and how each engine was set up.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from portable_bn._bench import _cpu_model, _version, gpu_name

DOCS = Path(__file__).resolve().parent.parent
SOURCE = DOCS.parent / "src" / "portable_bn"
GENERATED = DOCS / "generated"
LIBRARIES = ("numpy", "array-api-compat", "torch", "jax", "dask", "array-api-strict", "cupy")


def machine_line(*, gpu: bool = True) -> str:
    """The CPU, the GPU that a loaded library sees (where ``gpu``), Python and library versions."""
    versions = ", ".join(f"{name} {v}" for name in LIBRARIES if (v := _version(name)) is not None)
    device = f"{_cpu_model()}, {os.cpu_count()} cores"
    if gpu:
        device += f", {gpu_name() or 'no GPU'}"
    return f"{device}; Python {platform.python_version()}; {versions}"


def _cache_key(command: str) -> str:
    digest = hashlib.sha256(command.encode())
    for path in sorted(SOURCE.rglob("*.py")):
        digest.update(path.relative_to(SOURCE).as_posix().encode())
        digest.update(path.read_bytes())
    digest.update(machine_line(gpu=False).encode())
    return digest.hexdigest()[:16]


def command_output(command: str) -> tuple[str, str]:
    """What ``python -m portable_bn <command>`` prints here, and the machine it ran on (cached by
    the package's source and the libraries' versions)."""
    cache = GENERATED / "cache" / f"{command}-{_cache_key(command)}.txt"
    if cache.exists():
        machine, _, text = cache.read_text().partition("\n")
        return text, machine
    from portable_bn.__main__ import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main([command])
    if status != 0:
        raise RuntimeError(f"python -m portable_bn {command} exited with {status}:\n{buffer.getvalue()}")
    machine = machine_line()  # after the run: the GPU a library saw is known
    cache.parent.mkdir(parents=True, exist_ok=True)
    for old in cache.parent.glob(f"{command}-*.txt"):
        old.unlink()
    cache.write_text(f"{machine}\n{buffer.getvalue()}")
    return buffer.getvalue(), machine


class _Rst(SphinxDirective):
    def render(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), self.content_offset, container)
        return list(container.children)


def _literal(text: str) -> list[str]:
    return ["", ".. code-block:: text", "", *(f"   {line}" for line in text.rstrip().splitlines()), ""]


class BackendTable(_Rst):
    """The capability table from the backend table the conformance suite runs."""

    def run(self) -> list[nodes.Node]:
        from portable_bn.testing import _matrix

        self.env.note_dependency(_matrix.__file__)  # rebuilt when the table changes
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "",
            "   * - backend",
            "     - library",
            "     - devices",
            "     - dtypes",
            "     - gradients",
            "     - also tested",
        ]
        for spec in _matrix.BACKEND_TABLE:
            devices = "; ".join(f"``{d.label}``" + (f" ({d.note})" if d.note else "") for d in spec.devices)
            features = "; ".join(f.what for f in spec.features) or "\u2014"
            lines += [
                f"   * - ``{spec.name}``" + (" (GPU)" if spec.gpu else ""),
                f"     - {spec.library}",
                f"     - {devices}",
                f"     - {', '.join(spec.dtypes)}",
                f"     - {spec.gradients}",
                f"     - {features}",
            ]
        return self.render(lines)


class CommandOutput(_Rst):
    """``python -m portable_bn <command>``, run by the build."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        command = self.arguments[0]
        if command not in ("accuracy", "check"):
            raise self.error(f"command-output: unknown command {command!r}")
        for path in SOURCE.rglob("*.py"):  # rebuilt when the package changes
            self.env.note_dependency(str(path))
        text, machine = command_output(command)
        intro = f"``python -m portable_bn {command}``, run when this page was built, on: {machine}."
        return self.render(["", intro, *_literal(text)])


def _ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _bench_table(rows: list[Any], backend: str) -> list[str]:
    mine = [r for r in rows if r.backend == backend]
    cases = ("train", "eval", "backward")
    groups = list(dict.fromkeys((r.dtype, r.shape) for r in mine))
    has_copies = any(r.copies is not None for r in mine)
    baseline = mine[0].baseline
    has_memory = any(r.memory_ratio is not None for r in mine)
    caption = f"{backend} ({mine[0].device}): our time per call and, in bold, our time / {baseline}"
    if has_copies:
        caption += "; our time / an array copy (copies)"
    if has_memory:
        caption += "; peak extra memory / output (memory, training)"
    if any(r.torch_ratio is not None for r in mine):
        caption += "; our time / PyTorch's CPU kernel's on the same memory (torch)"
    accelerators = sorted({r.accelerator for r in mine if r.accelerator})
    if accelerators:
        caption += f"; large inputs ran {' and '.join(accelerators)} kernels"
    lines = [
        f".. list-table:: {caption}",
        "   :header-rows: 1",
        "",
        "   * - dtype",
        "     - shape",
        *(f"     - {case}" for case in cases),
    ]
    for dtype, shape in groups:
        lines += [f"   * - {dtype}", f"     - {'x'.join(str(s) for s in shape)}"]
        for case in cases:
            row = next((r for r in mine if (r.dtype, r.shape, r.case) == (dtype, shape, case)), None)
            if row is None:
                lines.append("     - -")
                continue
            cell = f"{_ms(row.ours_ms)} ms, **{row.ratio:.2f}**"
            if row.copies is not None:
                cell += f"; {row.copies:.1f} copies"
            if row.torch_ratio is not None:
                cell += f"; torch {row.torch_ratio:.2f}"
            if row.memory_ratio is not None:
                cell += f"; memory {row.memory_ratio:.2f}"
            lines.append(f"     - {cell}")
    return lines


def _rst_powers(text: str) -> str:
    """``2**20`` as reStructuredText (``**`` would start bold text)."""
    return re.sub(r"(\d+)\*\*(\d+)", r"\1\\ :sup:`\2`", text)


def _summary_table(rows: list[Any], backends: list[str]) -> list[str]:
    """Lowest-highest of ours / baseline per backend and baseline, input size band and case."""
    from portable_bn import _bench

    cases = ("train", "eval", "backward")
    lines = [
        ".. list-table:: Our time / the baseline's, lowest-highest over the dtypes and shapes",
        "   :header-rows: 1",
        "",
        "   * - backend vs baseline",
        "     - inputs",
        *(f"     - {case}" for case in cases),
    ]
    for backend in backends:
        for baseline in dict.fromkeys(r.baseline for r in rows if r.backend == backend):
            mine = [r for r in rows if (r.backend, r.baseline) == (backend, baseline)]
            for band, within in _bench.SIZE_BANDS:
                banded = [r for r in mine if within(math.prod(r.shape))]
                if not banded:
                    continue
                lines += [f"   * - {backend} vs {baseline}", f"     - {_rst_powers(band)}"]
                for case in cases:
                    ratios = [r.ratio for r in banded if r.case == case]
                    lines.append(f"     - {_bench._range(ratios)}" if ratios else "     - ")
    return [*lines, ""]


def _machine_text(machine: dict[str, Any]) -> str:
    parts = []
    if machine.get("gpu"):
        parts.append(machine["gpu"])
    parts.append(f"{machine['cpu']}, {machine['cores']} cores")
    parts.append(f"Python {machine['python']}")
    versions = [f"numpy {machine['numpy']}"] + [
        f"{name} {machine[name]}" for name in ("torch", "jax", "cupy") if machine.get(name)
    ]
    return "; ".join(parts) + "; " + ", ".join(versions)


class BenchResults(_Rst):
    """Plot and tables of a ``python -m portable_bn bench --json`` file (path relative to docs/)."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {"backends": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        from portable_bn import _bench

        path = DOCS / self.arguments[0]
        self.env.note_dependency(str(path))
        self.env.note_dependency(_bench.__file__)
        document = json.loads(path.read_text())
        rows = _bench.load_rows(document)
        backends = [b for b in _bench.BACKENDS if any(r.backend == b for r in rows)]
        if "backends" in self.options:
            backends = [b for b in self.options["backends"].split() if b in backends]
            rows = [r for r in rows if r.backend in backends]
        image = GENERATED / f"bench-{path.stem}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        _bench.write_plot(rows, str(image))
        lines = [
            f"Measured on: {_machine_text(document['machine'])}.",
            "",
            f".. image:: /generated/{image.name}",
            f"   :target: _images/{image.name}",
            f"   :alt: ratios of our time to the baselines', {', '.join(backends)}",
            "",
            *_summary_table(rows, backends),
        ]
        for backend in backends:
            lines += [*_bench_table(rows, backend), ""]
        return self.render(lines)


class SyncResults(_Rst):
    """The synchronization table of a ``python -m portable_bn bench --sync --json`` file."""

    required_arguments = 1
    columns = (
        ("engine", "engine"),
        ("replicas", "replicas"),
        ("case", "case"),
        ("collectives", "collectives per call"),
        ("sync_ms", "sync ms"),
        ("local_ms", "local ms"),
        ("overhead_us", "sync - local us"),
        ("ratio", "sync / local"),
        ("alone_ms", "alone ms"),
        ("bare_ms", "bare collectives ms"),
    )

    def run(self) -> list[nodes.Node]:
        path = DOCS / self.arguments[0]
        self.env.note_dependency(str(path))
        document = json.loads(path.read_text())
        sync = document["sync"]
        shape = "x".join(str(size) for size in sync["settings"]["shape"])
        lines = [
            f"Measured on: {_machine_text(document['machine'])}; {sync['settings']['dtype']} input of "
            f"shape {shape} split along the batch over the replicas.",
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "",
            *(f"   {'*' if i == 0 else ' '} - {title}" for i, (_, title) in enumerate(self.columns)),
        ]
        for row in sync["rows"]:
            for i, (key, _) in enumerate(self.columns):
                lines.append(f"   {'*' if i == 0 else ' '} - {self._cell(key, row.get(key))}")
        lines += ["", "How each engine ran:", ""]
        lines += [f"* ``{engine}``: {text}" for engine, text in sync["engines"].items()]
        for note in sync["notes"]:
            lines += ["", note]
        return self.render([*lines, ""])

    @staticmethod
    def _cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "ratio":
            return f"{value:.2f}"
        if key.endswith("_ms"):
            return _ms(value)
        if key.endswith("_us"):
            return f"{value:.0f}"
        return f"``{value}``" if key == "collectives" else str(value)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("backend-table", BackendTable)
    app.add_directive("command-output", CommandOutput)
    app.add_directive("bench-results", BenchResults)
    app.add_directive("sync-results", SyncResults)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
