"""The README's Python examples run and its test command is the one CI runs.

The manual's pages (docs/*.md), the `engram` command lines and the links of every page are
checked in tests/test_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.M | re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 1


def test_readme_test_command_is_ci():
    """The README's test command is exactly the one .ci/run calls."""
    bash = re.findall(r"^```bash\n(.*?)^```", TEXT, flags=re.M | re.S)
    tests = [line for b in bash for line in b.splitlines() if "pytest" in line]
    assert tests, "no test command in the README"
    command = tests[0].split("&&")[-1].strip()
    assert command == "python3 -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in [line.strip() for line in ci]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    out = capsys.readouterr().out
    for expected in re.findall(r"^# (.*)$", BLOCKS[index], flags=re.M):
        if expected.startswith("'"):  # a printed line shown as a comment
            assert expected.strip() in {line.strip() for line in out.splitlines()}
