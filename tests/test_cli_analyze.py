"""`engram analyze ...`: every command on real (tiny) runs, its files, --json, and its errors."""

from __future__ import annotations

import json

import pytest

from engram.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "command, files",
    [
        (["gates"], ["gates.png", "gates.html", "gates.json"]),
        (["sensitivity", "--batches", "2"], ["sensitivity.png", "sensitivity.html",
                                             "sensitivity.json"]),
        (["lens", "--ckpt", "{moe}", "--batches", "1"], ["logit_lens.png", "logit_lens.json"]),
        (["cka", "--ckpt", "{moe}", "--batches", "1"], ["cka.png", "cka.json"]),
        (["memory", "--ngram", "the children of Israel", "--row", "1:0:3"],
         ["memory.json", "memory.html", "row_norms.png"]),
        (["access", "--tokens", "4000"], ["access.png", "access.json"]),
    ],
)  # fmt: skip
def test_each_analysis_writes_its_files(command, files, tiny_runs, analysis_env, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["analyze", command[0], "--ckpt", str(tiny_runs["engram"]), "--out", str(out)]
    argv += [str(tiny_runs["moe"]) if a == "{moe}" else a for a in command[1:]]
    code, text, err = _run(argv, capsys)
    assert code == 0, err
    assert f"wrote into {out}" in text
    for name in files:
        assert (out / name).stat().st_size > 0, name
    # --json prints the same report the JSON file holds (when there is one of the same name).
    code, text, err = _run([*argv, "--json"], capsys)
    assert code == 0, err
    printed = json.loads(text)
    on_disk = json.loads((out / next(f for f in files if f.endswith(".json"))).read_text())
    shared = set(printed) & set(on_disk) - {"seconds", "timings", "counts", "paths"}
    assert shared and all(printed[k] == on_disk[k] for k in shared)


def test_sensitivity_numbers_in_text_match_json(tiny_runs, analysis_env, tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["analyze", "sensitivity", "--ckpt", str(tiny_runs["engram"]), "--out", str(out),
            "--batches", "2"]  # fmt: skip
    code, text, _ = _run(argv, capsys)
    assert code == 0
    d = json.loads((out / "sensitivity.json").read_text())
    for name, value in d["val_loss"].items():
        assert f"{name:<24} {value:.4f}" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["cka"], "cka compares two runs: give --ckpt twice, got 1"),
        (["memory", "--row", "1:2"], "--row must be LAYER:HEAD:ROW"),
        (["memory", "--row", "1:0:99999999"], "row"),
        (
            ["gates", "--text", "a", "--text-file", "x.txt"],
            "--text-file: not allowed with argument --text",
        ),
        (["sensitivity", "--data", "/no/such/file.txt"], "does not exist"),
        (["gates", "--ckpt", "{moe}"], "no Engram layers"),
    ],
)
def test_analysis_errors_are_one_line(extra, message, tiny_runs, analysis_env, tmp_path, capsys):
    ckpt = str(tiny_runs["engram"])
    if "{moe}" in extra:
        ckpt, extra = str(tiny_runs["moe"]), extra[:1]
    argv = ["analyze", extra[0], "--ckpt", ckpt, "--out", str(tmp_path / "o"), *extra[1:]]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.startswith("engram: error: ") and err.count("\n") == 1
    assert message in err


def test_missing_checkpoint_is_an_error(analysis_env, tmp_path, capsys):
    code, _, err = _run(["analyze", "gates", "--ckpt", str(tmp_path / "none"), "--out",
                         str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2 and err.startswith("engram: error: ")
