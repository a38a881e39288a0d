"""The engram command line, run in-process: real corpus, real tokenizer, small sizes."""

from __future__ import annotations

import re

import pytest

from engram.cli import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cli-cache"))


def test_demo_runs_end_to_end(capsys):
    rc = main(
        [
            "demo",
            "--translations",
            "kjv",
            "--batch",
            "2",
            "--seq",
            "64",
            "--steps",
            "3",
            "--dim",
            "16",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "50,257 ids -> 32,962 compressed ids" in out
    assert "1,189 chapters (kjv)" in out
    diff = float(re.search(r"== full: max \|diff\| ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-5
    touched = re.search(r"sparse table gradient: ([\d,]+) of ([\d,]+) rows", out)
    assert 0 < int(touched.group(1).replace(",", "")) < int(touched.group(2).replace(",", ""))
    assert "with Engram" in out and "bigram (no memory)" in out


def test_info_and_rows(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "160,316 rows" in out and "32,962" in out
    assert main(["rows", "Alexander the Great"]) == 0
    out = capsys.readouterr().out
    assert "'Alexander the Great'" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rows", "  "], "TEXT is empty"),
        (["rows", "x", "--layer", "3"], "--layer 3 is not an Engram layer"),
        (["demo", "--translations", "kjv,nope"], "unknown translation 'nope'"),
        (["demo", "--steps", "0"], "--steps must be >= 1"),
        (["info", "--layers", "1,1"], "layer_ids must be non-empty and distinct"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
