"""The command line with a Hugging Face base model: `engram base init|info|export`,
`engram train --base PATH`, and eval / generate / table export / analyses on such runs.

The workflow is run as a user would (in-process `engram.cli.main`, tiny models): make a random
base, train it with Engram (and adapter mode, and alone), evaluate, generate, export its tables,
export the trained base and train again from it. Every bad input ends in one line on stderr,
exit 2, and leaves what was written before untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from engram.cli import main
from engram.data.sources import iter_grouped_documents

SMALL = ["--set", "data.seq_len=32", "--set", "data.batch_size=2", "--set", "train.threads=1",
         "--set", "train.eval_every=0", "--set", "train.final_eval_batches=2", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-hf-cache")


@pytest.fixture(autouse=True)
def _env(cache, monkeypatch, one_thread):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(cache))


@pytest.fixture(scope="module")
def work(tmp_path_factory, cache) -> Path:
    """A directory with a small corpus, a random Llama base and a finished --base run."""
    root = tmp_path_factory.mktemp("cli-hf")
    docs = [" ".join(t.split()) for t, _ in iter_grouped_documents("builtin:kjv", "text")][:60]
    (root / "kjv.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(cache))
        mp.chdir(root)
        assert main(["base", "init", "--family", "llama", "--out", "base", "--hidden", "32",
                     "--layers", "2", "--heads", "2", "--max-positions", "64", "--tokenizer",
                     "bpe:300", "--data", "kjv.txt"]) == 0  # fmt: skip
        code = main(["train", "--base", "base", "--data", "kjv.txt", "--out", "run", "--steps",
                     "3", "--table-size", "300", "--set", "train.ckpt_every=1", *SMALL])  # fmt: skip
        assert code == 0
    return root


@pytest.fixture
def here(work, monkeypatch) -> Path:
    monkeypatch.chdir(work)
    return work


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("engram: error: ") and "\n" not in err, err
    return err


def _snapshot(path: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_base_info_and_the_run_directory(here, capsys):
    assert main(["base", "info", "base"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "2 layers, hidden 32" in out and "300 ids" in out
    run = here / "run"
    assert {"config.json", "metrics.jsonl", "loss.png", "checkpoints"} <= {
        p.name for p in run.iterdir()
    }
    cfg = json.loads((run / "config.json").read_text())
    assert (
        cfg["base"]["path"] == str(Path("base").resolve())
        and cfg["base"]["train_base"]
        and cfg["model"] is None
    )
    assert cfg["engram"]["layer_ids"] == [1] and cfg["engram"]["engram_vocab_size"] == [300, 300]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1, 2, 3,
    ]  # fmt: skip


def test_eval_generate_export_and_analyses(here, capsys):
    assert main(["eval", "--ckpt", "run", "--json", "--batches", "2"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["step"] == 3 and rec["val_loss"] > 0
    assert main(["generate", "--ckpt", "run", "--prompt", "And God", "--prompt", "In",
                 "--max-new-tokens", "4", "--temperature", "0", "--json"]) == 0  # fmt: skip
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    assert [o["prompt"] for o in outputs] == ["And God", "In"]
    args = ["generate", "--ckpt", "run", "--prompt", "And God", "--prompt", "In",
            "--max-new-tokens", "4", "--temperature", "0", "--json", "--store", "mmap"]  # fmt: skip
    assert main(args) == 0  # tables read from files on disk: the same tokens
    assert json.loads(capsys.readouterr().out)["outputs"] == outputs
    assert main(["table", "export", "--ckpt", "run", "--out", "tables"]) == 0
    assert (here / "tables" / "table_L1.engt").is_file()
    capsys.readouterr()
    for argv in (
        ["gates", "--text", "And God said, Let there be light"],
        ["sensitivity", "--batches", "1"],
        ["memory", "--ngram", "And God"],
        ["access", "--tokens", "2000"],
    ):
        assert main(["analyze", *argv, "--ckpt", "run", "--out", "an", "--json"]) == 0, argv
        assert json.loads(capsys.readouterr().out)
    assert main(["analyze", "lens", "--ckpt", "run", "--ckpt", "run", "--batches", "1",
                 "--out", "an", "--json"]) == 0  # fmt: skip
    lens = json.loads(capsys.readouterr().out)
    kl = next(iter(lens["runs"].values()))["kl"]
    assert len(kl) == 3 and kl[-1] == 0  # embedding + 2 layers; the last reads the final norm


def test_adapter_mode_resume_and_export_to_the_next_base(here, capsys):
    args = ["train", "--base", "base", "--freeze-base", "--data", "kjv.txt", "--out", "adapter",
            "--table-size", "300", *SMALL]  # fmt: skip
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "2"]) == 0  # the same run, continued
    out = capsys.readouterr().out
    assert "frozen: only Engram trained" in out
    steps = [
        json.loads(x)["step"] for x in (here / "adapter/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]
    assert main(["base", "export", "--ckpt", "run", "--out", "next"]) == 0
    out = capsys.readouterr().out
    assert "the trained base (LlamaForCausalLM, step 3)" in out and "next/engram" in out
    assert (here / "next" / "tokenizer.json").is_file()
    code = main(["train", "--base", "next", "--no-engram", "--data", "kjv.txt", "--out",
                 "plain", "--steps", "1", *SMALL])  # fmt: skip
    assert code == 0
    assert "trained alone" in capsys.readouterr().out
    assert json.loads((here / "plain/config.json").read_text())["engram"] is None


def _not_a_model(root: Path) -> Path:
    d = root / "empty-model"
    d.mkdir(exist_ok=True)
    return d


def _neox(root: Path) -> Path:
    d = root / "neox"
    d.mkdir(exist_ok=True)
    config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}
    (d / "config.json").write_text(json.dumps(config))
    return d


TRAIN = ["train", "--data", "kjv.txt", "--steps", "1", *SMALL]
BAD = [
    # (argv after `engram`, a phrase of the one-line error)
    ([*TRAIN, "--base", "no-such-dir", "--out", "new"], "'no-such-dir' does not exist"),
    ([*TRAIN, "--base", "empty-model", "--out", "new"], "has no config.json"),
    (
        [*TRAIN, "--base", "neox", "--out", "new"],
        "GPTNeoXForCausalLM (model_type='gpt_neox') is not",
    ),
    ([*TRAIN, "--base", "base", "--layers", "1,7", "--out", "new"], "layer ids [7] are outside"),
    (
        [*TRAIN, "--base", "base", "--set", "data.tokenizer=gpt2", "--out", "new"],
        "has 50,257 ids but the base model LlamaForCausalLM",
    ),
    (
        [*TRAIN, "--base", "base", "--set", "data.seq_len=80", "--out", "new"],
        "exceeds the base model's 64 positions",
    ),
    (
        [*TRAIN, "--base", "base", "--freeze-base", "--no-engram", "--out", "new"],
        "nothing would train",
    ),
    (
        [*TRAIN, "--base", "base", "--set", "model.d_model=64", "--out", "new"],
        "model.d_model does not apply",
    ),
    ([*TRAIN, "--base", "base", "--preset", "tiny-moe", "--out", "new"], "not both"),
    (
        [*TRAIN, "--preset", "tiny-moe", "--layers", "1", "--out", "new"],
        "--layers applies to a run with --base PATH",
    ),
    (["base", "init", "--out", "base"], "already exists and is not an empty directory"),
    (["base", "export", "--ckpt", "run", "--out", "base"], "already exists"),
    (["base", "info", "neox"], "is not a supported architecture"),
]


@pytest.mark.parametrize(("argv", "phrase"), BAD, ids=[" ".join(a[-3:]) for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(here, capsys, argv, phrase):
    _not_a_model(here)
    _neox(here)
    before = _snapshot(here)
    assert main(argv) == 2
    assert phrase in _err(capsys)
    assert not (here / "new").exists()
    after = _snapshot(here)
    assert {p: b for p, b in after.items() if p in before} == before  # nothing changed
    assert not [p for p in after if p not in before and "tokenizers" not in p.parts]


def test_another_base_is_refused_on_resume_and_load(here, tmp_path, capsys):
    shutil.copytree(here / "base", tmp_path / "base")
    assert main(["base", "init", "--out", str(tmp_path / "seed1"), "--hidden", "32", "--layers",
                 "2", "--heads", "2", "--max-positions", "64", "--tokenizer", "base",
                 "--seed", "1"]) == 0  # fmt: skip
    rest = ["--data", "kjv.txt", "--out", str(tmp_path / "run"), "--table-size", "300", *SMALL]
    assert main(["train", "--base", str(tmp_path / "base"), *rest, "--steps", "1"]) == 0
    run = _snapshot(tmp_path / "run")
    capsys.readouterr()
    # another base for the same run directory
    assert main(["train", "--base", str(tmp_path / "seed1"), *rest, "--steps", "2"]) == 2
    assert "another or a modified base" in _err(capsys)
    # the same path, its weights changed
    shutil.copy(tmp_path / "seed1" / "model.safetensors", tmp_path / "base" / "model.safetensors")
    assert main(["train", "--base", str(tmp_path / "base"), *rest, "--steps", "2"]) == 2
    assert "another or a modified base" in _err(capsys)
    for argv in (["eval", "--ckpt", str(tmp_path / "run")],
                 ["train", "--config", str(tmp_path / "run" / "config.json"), "--out",
                  str(tmp_path / "run"), "--steps", "2", "--no-progress"]):  # fmt: skip
        assert main(argv) == 2
        assert "not the one this run was trained from" in _err(capsys)
    assert _snapshot(tmp_path / "run") == run
