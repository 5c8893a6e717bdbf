"""README stays true: its example runs and .ci/run runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_example_runs():
    pytest.importorskip("torch")
    (example,) = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    exec(compile(example, "README.md", "exec"), {})


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.DOTALL)
    assert len(commands) == 2
    assert "python -m portable_bn check" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
