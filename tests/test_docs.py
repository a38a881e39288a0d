"""The manual in docs/ holds, like the README: its examples run, its commands parse, links resolve.

- Every ```python block of every docs/*.md page runs and its `# 'printed line'` comments are
  printed (the README's blocks run in tests/test_readme.py).
- Every `engram ...` command line in a ```bash or ```console block of README.md and docs/*.md
  (also `python3 -m engram ...` and `torchrun ... -m engram ...`) is parsed by the real argument
  parser, so a flag the CLI no longer has fails here. Other commands (pip, cd, ...) are skipped.
- Every relative link and image in README.md and docs/*.md points at an existing file, and a
  `#fragment` into a Markdown page names one of its headings.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.M | re.S)


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path, langs: set[str]) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text) if lang in langs]


# ----------------------------------------------------------------------------- python examples

PYTHON = [(page, i, body) for page in DOCS for i, body in enumerate(blocks(page, {"python"}))]


def run_example(source: str, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Execute one example; every `# '...'` comment line must be a printed line."""
    exec(compile(source, name, "exec"), {})
    out = {line.strip() for line in capsys.readouterr().out.splitlines()}
    for expected in re.findall(r"^# (.*)$", source, flags=re.M):
        if expected.startswith("'"):  # a printed line shown as a comment
            assert expected.strip() in out, f"{name}: {expected.strip()!r} was not printed"


@pytest.mark.parametrize(
    ("page", "index", "source"),
    PYTHON,
    ids=[f"{rel(p)}[{i}]" for p, i, _ in PYTHON],
)
def test_docs_example_runs(page, index, source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # files an example writes land in its own directory
    run_example(source, f"{rel(page)}[python block {index}]", capsys)


# ----------------------------------------------------------------------------- command lines

SEPARATORS = {"&&", "||", ";", "|"}


def engram_argvs(line: str) -> list[list[str]]:
    """The argument lists of the `engram` invocations on one shell line (none if it has none)."""
    words = shlex.split(line, comments=True)
    segments: list[list[str]] = [[]]
    for word in words:
        if word in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(word)
    argvs = []
    for seg in segments:
        if seg and seg[0] == "engram":
            argvs.append(seg[1:])
        elif (
            "-m" in seg and seg.index("-m") + 1 < len(seg) and seg[seg.index("-m") + 1] == "engram"
        ):
            argvs.append(
                seg[seg.index("-m") + 2 :]
            )  # python3 -m engram ..., torchrun ... -m engram
    return argvs


def shell_lines(page: Path) -> list[str]:
    """Command lines of the page's bash/console blocks, continuations joined."""
    text = page.read_text(encoding="utf-8")
    lines = []
    for lang, body in FENCE.findall(text):
        if lang not in {"bash", "sh", "shell", "console"}:
            continue
        for line in re.sub(r"\\\n", " ", body).splitlines():
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            if line.strip():
                lines.append(line.strip())
    return lines


COMMANDS = [
    (page, line, argv)
    for page in PAGES
    for line in shell_lines(page)
    for argv in engram_argvs(line)
]


def test_docs_have_commands():
    assert len(COMMANDS) >= 10
    assert {rel(p) for p, _, _ in COMMANDS} >= {"README.md", "docs/training.md", "docs/serving.md"}


def test_engram_argvs():
    assert engram_argvs("python3 -m pip install -e . && engram demo") == [["demo"]]
    assert engram_argvs("torchrun --nnodes 4 -m engram train --out x  # note") == [
        ["train", "--out", "x"]
    ]
    assert engram_argvs("cd runs; ls") == []


@pytest.mark.parametrize(
    ("page", "line", "argv"),
    COMMANDS,
    ids=[f"{rel(p)}: {line[:60]}" for p, line, _ in COMMANDS],
)
def test_docs_command_parses(page, line, argv, capsys):
    from engram.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code:  # 0 is --help
            err = capsys.readouterr().err.strip().splitlines()
            pytest.fail(f"{rel(page)}: `{line}` does not parse: {err[-1] if err else e.code}")


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are code."""
    text = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```[ \t]*$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M)}


LINKS = [
    (page, target) for page in PAGES for target in LINK.findall(prose(page.read_text("utf-8")))
]


def test_docs_have_links():
    assert any(t.endswith(".png") for _, t in LINKS)
    assert {rel(p) for p, _ in LINKS} >= {"README.md", "docs/README.md"}


def test_slug():
    assert slug("Does the table store anything? Controls and table size") == (
        "does-the-table-store-anything-controls-and-table-size"
    )
    assert slug("What `engram demo` does") == "what-engram-demo-does"


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{rel(p)}: {t}" for p, t in LINKS])
def test_docs_link_resolves(page, target):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        return
    path, _, fragment = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    assert dest.exists(), f"{rel(page)}: {target} -> {dest} does not exist"
    if fragment and dest.suffix == ".md":
        assert fragment in anchors(dest), f"{rel(page)}: {target}: no heading #{fragment}"
