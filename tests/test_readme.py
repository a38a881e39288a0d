"""Every Python example in the README runs and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})
    out = capsys.readouterr().out
    for expected in re.findall(r"^# (.*)$", BLOCKS[index], flags=re.M):
        if expected.startswith("'"):  # a printed line shown as a comment
            assert expected.strip() in {line.strip() for line in out.splitlines()}
