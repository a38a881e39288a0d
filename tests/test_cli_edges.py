"""Every command-line value is checked where it enters: one line naming the flag, exit 2."""

from __future__ import annotations

import importlib.util
import json

import pytest

from engram.cli import build_parser, main

BAD_UTF8 = b"In the beginning\n\xff\xfe was the word\n"
NOT_UTF8_ARG = "caf\udce9"  # how the OS hands over the byte 0xE9 of a Latin-1 argument


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cli-cache"))


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A scratch directory (the cwd) holding a non-UTF-8 text, prompt file and config."""
    monkeypatch.chdir(tmp_path)
    for name in ("latin1.txt", "prompts.txt", "config.json", "latin1.jsonl"):
        (tmp_path / name).write_bytes(BAD_UTF8)
    (tmp_path / "corpus.parquet").write_bytes(b"PAR1")
    return tmp_path


TRAIN = ["train", "--preset", "tiny-moe", "--out", "run"]
GEN = ["generate", "--ckpt", "run", "--prompt", "In the"]
SWEEP = ["sweep", "--preset", "tiny-moe", "--out", "sweep"]
ABLATE = ["ablate", "--ckpt", "run", "--out", "ab"]

CASES = [
    # (argv, the flag the message names, a phrase of the message)
    ([*TRAIN, "--data", "latin1.txt"], "--data", "is not valid UTF-8"),
    ([*TRAIN, "--data", "latin1.jsonl"], "--data", "at byte 17 (line 2)"),
    ([*TRAIN, "--data", "no/such.txt"], "--data", "does not exist"),
    ([*TRAIN, "--lr", "nan"], "--lr", "must be a finite number"),
    ([*TRAIN, "--lr", "inf"], "--lr", "must be a finite number"),
    ([*TRAIN, "--lr=-1e-3"], "--lr", "must be > 0"),
    ([*TRAIN, "--lr", "fast"], "--lr", "must be a number"),
    ([*TRAIN, "--steps", "0"], "--steps", "must be >= 1"),
    ([*TRAIN, "--steps", "1.5"], "--steps", "must be an integer"),
    ([*TRAIN, "--nproc", "0"], "--nproc", "must be >= 1"),
    ([*TRAIN, "--dist-timeout", "inf"], "--dist-timeout", "must be a finite number"),
    ([*TRAIN, "--dist-timeout", "0"], "--dist-timeout", "must be > 0"),
    ([*TRAIN, "--set", "optim.lrr=0.1"], "--set", "did you mean 'optim.lr'"),
    ([*TRAIN, "--set", "model.d_modle=64"], "--set", "unknown config key 'model.d_modle'"),
    ([*TRAIN, "--set", "optim.d_model=64"], "--set", "did you mean 'model.d_model'"),
    ([*TRAIN, "--set", "trian.steps=3"], "--set", "did you mean 'train.steps'"),
    ([*TRAIN, "--set", "optim.lr=NaN"], "--set", "must set a finite number"),
    (
        [*TRAIN, "--set", "engram.engram_vocab_size=[1, Infinity]"],
        "--set",
        "must set a finite number",
    ),
    ([*TRAIN, "--set", "steps"], "--set", "must look like section.field=VALUE"),
    (["train", "--config", "config.json", "--out", "run"], "--config", "is not valid UTF-8"),
    ([*GEN, "--top-p", "0"], "--top-p", "must be in (0, 1]"),
    ([*GEN, "--top-p", "1.5"], "--top-p", "must be in (0, 1]"),
    ([*GEN, "--top-p", "nan"], "--top-p", "must be a finite number"),
    ([*GEN, "--temperature", "-0.5"], "--temperature", "must be >= 0"),
    ([*GEN, "--temperature", "inf"], "--temperature", "must be a finite number"),
    ([*GEN, "--top-k", "0"], "--top-k", "must be >= 1"),
    ([*GEN, "--max-new-tokens", "0"], "--max-new-tokens", "must be >= 1"),
    ([*GEN, "--seed", "-1"], "--seed", "must be in [0, "),
    ([*GEN, "--cache-rows", "-5"], "--cache-rows", "must be >= 0"),
    ([*GEN, "--cache-mib", "nan"], "--cache-mib", "must be a finite number"),
    ([*GEN, "--prompt", NOT_UTF8_ARG], "--prompt", "is not valid UTF-8"),
    (["generate", "--ckpt", "run", "--prompt-file", "prompts.txt"], "--prompt-file", "UTF-8"),
    (["generate", "--ckpt", "run", "--prompt-file", "none.txt"], "--prompt-file", "not exist"),
    (["plan", "--rho", "1.5"], "--rho", "must be in [0, 1]"),
    (["plan", "--rho", "nan"], "--rho", "must be a finite number"),
    (["plan", "--layers", "1,x"], "--layers", "must be comma-separated 0-based layer ids"),
    (["info", "--layers", "1,1"], "--layers", "must be non-empty and distinct"),
    (["info", "--table-size", "0"], "--table-size", "must be >= 1"),
    (["rows", "x", "--layer", "-1"], "--layer", "must be >= 0"),
    (["rows", NOT_UTF8_ARG], "TEXT", "is not valid UTF-8"),
    ([*SWEEP, "--rhos", "1,nan"], "--rhos", "must be comma-separated numbers in [0, 1]"),
    ([*SWEEP, "--table-scales", "0,1"], "--table-scales", "must be comma-separated positive"),
    ([*SWEEP, "--table-rho", "-0.1"], "--table-rho", "must be in [0, 1]"),
    ([*SWEEP, "--seeds", "0,0"], "--seeds", "must be non-empty and distinct"),
    ([*SWEEP, "--seeds", "-1"], "--seeds", "must be comma-separated integer seeds"),
    ([*SWEEP, "--jobs", "0"], "--jobs", "must be >= 1"),
    ([*SWEEP, "--second-batches", "0"], "--second-batches", "must be >= 1"),
    ([*SWEEP, "--second-text", "latin1.txt"], "--second-text", "is not valid UTF-8"),
    ([*ABLATE, "--capacity", "1/64,inf"], "--capacity", "must be comma-separated positive"),
    ([*ABLATE, "--capacity", "1/0"], "--capacity", "must be comma-separated positive"),
    ([*ABLATE, "--threads", "0"], "--threads", "must be >= 1"),
    ([*ABLATE, "--second-text", "no/such.txt"], "--second-text", "does not exist"),
    (["demo", "--jobs", "0"], "--jobs", "must be >= 1"),
    (["eval", "--ckpt", "run", "--batches", "0"], "--batches", "must be >= 1"),
    (["analyze", "access", "--ckpt", "run", "--tokens", "0"], "--tokens", "must be >= 1"),
    (["analyze", "memory", "--ckpt", "run", "--row", "1:-2:3"], "--row", "LAYER:HEAD:ROW"),
    (["analyze", "gates", "--ckpt", "run", "--text-file", "latin1.txt"], "--text-file", "UTF-8"),
    (["analyze", "sensitivity", "--ckpt", "run", "--data", "latin1.txt"], "--data", "UTF-8"),
]


@pytest.mark.parametrize(("argv", "flag", "phrase"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_value_is_one_line_naming_the_flag(argv, flag, phrase, files, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("engram: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not captured.out
    assert f"{flag} " in err and phrase in err, err


def _without(monkeypatch, missing: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *a, **k):
        return None if name.split(".")[0] == missing else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("missing", "argv", "phrase"),
    [
        ("pyarrow", [*TRAIN, "--data", "corpus.parquet"], "--data 'corpus.parquet' (parquet) "),
        ("pyarrow", ["info", "--tokenizer", "bpe:512", "--data", "."], "--data '.' (parquet)"),
        ("matplotlib", ["analyze", "gates", "--ckpt", "run"], "`engram analyze gates`"),
        ("matplotlib", [*SWEEP], "`engram sweep` (its plots)"),
        ("matplotlib", [*TRAIN], "`engram train` (its loss.png)"),
        ("transformers", ["train", "--base", ".", "--out", "run"], "transformers"),
    ],
)
def test_a_missing_optional_package_is_one_line(missing, argv, phrase, files, monkeypatch, capsys):
    _without(monkeypatch, missing)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert phrase in err and f"needs {missing}, which is not installed: pip install" in err


@pytest.mark.parametrize(
    ("exc", "printed"),
    [
        (
            ImportError("reading 'x.parquet' needs pyarrow (pip install pyarrow)", name="pyarrow"),
            "reading 'x.parquet' needs pyarrow (pip install pyarrow)",
        ),
        (
            ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib.figure"),
            "No module named 'matplotlib'; install it: pip install matplotlib",
        ),
    ],
)
def test_an_optional_package_missing_inside_the_library_is_one_line(
    exc, printed, monkeypatch, capsys
):
    import engram.cli.model as model

    def needs_it(args):
        raise exc

    monkeypatch.setattr(model, "cmd_info", needs_it)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == f"engram: error: {printed}\n"


def test_interrupt_claims_nothing_about_checkpoints(monkeypatch, capsys):
    import engram.cli.model as model

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "cmd_info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "engram: interrupted\n"


def test_resuming_another_config_names_the_keys_that_differ(files, capsys):
    from engram.presets import preset

    cfg = preset("tiny-engram")
    (files / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    cfg.save(files / "run" / "config.json")
    argv = ["train", "--preset", "tiny-engram", "--out", "run", "--steps", "9"]
    assert main([*argv, "--set", "engram.seed=5", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--out run holds a run with a different config" in err and err.count("\n") == 1
    assert "(engram.seed: 0 -> 5; optim.lr: 0.003 -> 0.5)" in err and "train.steps:" not in err


def test_help_exits_0_and_good_values_parse(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--verify-table" in capsys.readouterr().out
    args = build_parser().parse_args(
        [*GEN, "--top-p", "1", "--temperature", "0", "--seed", "7", "--cache-mib", "0.5"]
    )
    assert (args.top_p, args.temperature, args.seed, args.cache_mib) == (1.0, 0.0, 7, 0.5)
    args = build_parser().parse_args([*SWEEP, "--rhos", "none", "--table-scales", "1/16,4"])
    assert args.rhos == () and args.table_scales == (0.0625, 4.0)
    args = build_parser().parse_args([*TRAIN, "--set", "lr=0.01", "--set", "name=x"])
    assert args.set == ["lr=0.01", "name=x"]


def test_verify_table_reaches_the_tier_config():
    from engram.cli.run import _tier

    parse = build_parser().parse_args
    assert _tier(parse([*GEN, "--store", "mmap", "--verify-table"])).verify is True
    assert _tier(parse([*GEN, "--store", "mmap"])).verify is False


def test_top_p_sampling():
    import torch

    from engram.generate import sample_next

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]] * 64)
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, 1.0, None, g, top_p=0.5) == 0).all()  # p(0) = 0.72 >= 0.5
    two = sample_next(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=0.9)
    assert set(two.tolist()) == {0, 1}  # 0.72 + 0.26 reaches 0.9: only the first two
    full = sample_next(logits, 1.0, None, torch.Generator().manual_seed(1), top_p=1.0)
    plain = sample_next(logits, 1.0, None, torch.Generator().manual_seed(1))
    assert torch.equal(full, plain)


@pytest.mark.usefixtures("analysis_env")
def test_generate_verify_table_and_prompt_file(tiny_runs, tmp_path, capsys):
    run = str(tiny_runs["engram"])
    tables = tmp_path / "tables"
    assert main(["table", "export", "--ckpt", run, "--out", str(tables)]) == 0
    capsys.readouterr()
    (tmp_path / "prompts.txt").write_text("In the beginning\n\nAnd God said\n", encoding="utf-8")
    argv = ["generate", "--ckpt", run, "--prompt-file", str(tmp_path / "prompts.txt"),
            "--store", "mmap", "--tables", str(tables), "--max-new-tokens", "2", "--json"]  # fmt: skip
    assert main([*argv, "--verify-table", "--top-p", "0.9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in out["outputs"]] == ["In the beginning", "And God said"]
    assert 0 < out["decode_step_ms"]["median"] <= out["decode_step_ms"]["p90"]  # 1 step
    f = tables / "table_L1.engt"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x55
    f.write_bytes(bytes(data))
    assert main(argv) == 0  # not verified: the damage goes unnoticed
    capsys.readouterr()
    assert main([*argv, "--verify-table"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and err.count("\n") == 1


def test_version(capsys):
    """`engram --version` names the package version and the distribution."""
    from engram import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"engram {__version__} (engram-lm)"


def test_tokenizer_flag_sets_the_runs_tokenizer(tmp_path, capsys):
    """`--tokenizer` (a tokenizer.json, a model directory, bpe:N) is data.tokenizer for train
    and sweep; a path that holds no tokenizer is one line, exit 2, nothing written."""
    from engram.cli.common import run_config

    for command in ("train", "sweep"):
        args = build_parser().parse_args(
            [command, "--preset", "tiny-engram", "--tokenizer", str(tmp_path), "--out", "o"]
        )
        assert run_config(args).data.tokenizer == str(tmp_path)
    out = tmp_path / "r"
    argv = ["train", "--preset", "tiny-engram", "--tokenizer", str(tmp_path / "none"),
            "--out", str(out), "--steps", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err, err
    assert not (out / "config.json").exists()
