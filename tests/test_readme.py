"""README stays true: its examples run, its backend table is the suite's, and .ci/run runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from portable_bn.testing import _matrix

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def backend_table_markdown() -> str:
    """README's "What works where" table, from the backend table the suite runs."""
    lines = ["| backend | library | devices | dtypes | gradients |", "|---|---|---|---|---|"]
    for spec in _matrix.BACKEND_TABLE:
        devices = ", ".join(d.label + ("" if d.values else " (shapes only)") for d in spec.devices)
        name = f"`{spec.name}`" + (" (GPU)" if spec.gpu else "")
        lines.append(f"| {name} | {spec.library} | {devices} | {', '.join(spec.dtypes)} | {spec.gradients} |")
    return "\n".join(lines)


def test_first_example_needs_numpy_only():
    first = EXAMPLES[0]
    assert "import torch" not in first and "import jax" not in first
    exec(compile(first, "README.md", "exec"), {})


def test_pytorch_example_runs():
    pytest.importorskip("torch")
    (torch_example,) = [example for example in EXAMPLES if "import torch" in example]
    exec(compile(torch_example, "README.md", "exec"), {})


def test_backend_table_is_the_suites():
    assert backend_table_markdown() in README


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.DOTALL)
    assert len(commands) == 2
    assert "python -m portable_bn check" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_links_point_to_files():
    for target in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", README):
        assert (ROOT / target).is_file(), target
