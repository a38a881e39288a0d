"""The engram command line, run in-process: real corpus, real tokenizer, small sizes."""

from __future__ import annotations

import json

import pytest

from engram.cli import main


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cli-cache"))


def test_info_and_rows(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "160,316 rows" in out and "32,962" in out
    assert main(["rows", "Alexander the Great"]) == 0
    out = capsys.readouterr().out
    assert "'Alexander the Great'" in out


def test_info_with_a_corpus_bpe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path))
    assert main(["info", "--tokenizer", "bpe:4096"]) == 0
    out = capsys.readouterr().out
    assert "bpe:4096 (byte-level BPE trained on the training split of builtin:kjv)" in out
    assert "4,096 raw ids -> 3,528" in out
    assert main(["rows", "And God said", "--tokenizer", "bpe:4096"]) == 0
    assert "' God'" in capsys.readouterr().out
    assert main(["info", "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rows", "  "], "TEXT is empty"),
        (["rows", "x", "--layer", "3"], "--layer 3 is not an Engram layer"),
        (["train", "--preset", "tiny-moe", "--out", "x", "--steps", "0"], "--steps must be >= 1"),
        (["train", "--preset", "nope", "--out", "x"], "unknown preset 'nope'"),
        (["train", "--out", "x"], "give --preset NAME or --config FILE"),
        (
            ["train", "--config", "missing.json", "--out", "x"],
            "config file 'missing.json' does not exist",
        ),
        (
            ["train", "--preset", "tiny-moe", "--out", "x", "--data", "no/such.txt"],
            "does not exist",
        ),
        (
            ["train", "--preset", "tiny-moe", "--out", "x", "--set", "model.widht=3"],
            "unknown config key 'model.widht'",
        ),
        (["eval", "--ckpt", "no/such/run"], "checkpoint path 'no/such/run' does not exist"),
        (["plan", "--rho", "1.5"], "rho must be in [0, 1]"),
        (["info", "--layers", "1,1"], "--layers must be non-empty and distinct"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def _tiny_train(tmp_path, name, *extra):
    return main(["train", "--preset", name, "--out", str(tmp_path / name), "--no-progress", *extra])


def test_train_eval_plan(tmp_path, capsys):
    assert _tiny_train(tmp_path, "tiny-engram", "--steps", "3") == 0
    out = capsys.readouterr().out
    assert "tiny-engram: step 3" in out and "table" in out
    assert main(["eval", "--ckpt", str(tmp_path / "tiny-engram"), "--json", "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["val_loss"] > 0 and result["tokens"] > 0
    assert main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(plan["gaps"]["total_params"]) < 0.01 and abs(plan["gaps"]["flops_per_token"]) < 0.01
    assert main(["plan", "--rho", "0.5"]) == 0
    assert "routed experts" in capsys.readouterr().out


def test_user_text_data_and_bad_data(tmp_path, capsys):
    from engram.corpus import iter_builtin_documents

    docs = [d.text for _, d in zip(range(40), iter_builtin_documents("web"), strict=False)]
    (tmp_path / "mine.txt").write_text("\n\n".join(docs))
    assert (
        _tiny_train(tmp_path, "tiny-moe", "--data", str(tmp_path / "mine.txt"), "--steps", "2") == 0
    )
    assert "tiny-moe: step 2" in capsys.readouterr().out
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    rc = main(["train", "--preset", "tiny-moe", "--out", str(tmp_path / "e"), "--no-progress",
               "--data", str(tmp_path / "empty.txt")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "empty" in err.lower() and err.count("\n") == 1


def test_checkpoint_from_another_config_is_refused_without_damage(tmp_path, capsys):
    assert _tiny_train(tmp_path, "tiny-engram", "--steps", "2") == 0
    run = tmp_path / "tiny-engram"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = _tiny_train(tmp_path, "tiny-engram", "--steps", "4", "--set", "engram.seed=5")
    err = capsys.readouterr().err
    assert rc == 2 and "different config" in err and "Traceback" not in err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing already written was touched


def test_demo_pipeline_with_tiny_models(tmp_path, capsys):
    from engram.demo import run_demo
    from engram.presets import plan_for, tiny_moe

    base = tiny_moe()
    eng, plan = plan_for(base, 0.5, name="engram")
    result = run_demo(tmp_path / "demo", progress=False, configs=(base, eng, plan), jobs=1)
    out = capsys.readouterr().out
    assert "validation loss" in out and "Engram vs MoE" in out
    assert "memory content (Engram vs no-information control)" in out
    assert "loss on builtin:bbe" in out
    ctl = result.no_information
    assert ctl.total_params == result.engram.total_params and ctl.name == "no-information"
    content = result.engram.val_loss - ctl.val_loss
    assert f"memory content (Engram vs no-information control) {content:+.4f}" in out
    assert result.loss_png.stat().st_size > 1000 and result.gate_png.stat().st_size > 1000
    assert result.baseline.total_params == pytest.approx(result.engram.total_params, rel=0.01)
    gates = result.gates.gates[1]
    assert gates.shape == (len(result.gates.tokens), 1)
    assert ((gates > 0) & (gates < 1)).all()
    summary = json.loads(result.summary_json.read_text())
    assert summary["engram"]["val_loss"] == result.engram.val_loss
    assert summary["sample"]["same_tokens"] and summary["sample"]["text"]
    assert "hot-row cache): the same tokens" in out
    # the step-time breakdown comes from each run's own metrics and adds up to its median step
    assert "where the step time goes" in out
    assert f"{result.engram.name} - {result.baseline.name}" in out
    for run in (result.baseline, result.engram, result.no_information):
        phases = summary["step_breakdown_s"][run.name]
        assert set(phases) == {"wait_s", "fwd_s", "bwd_s", "opt_s", "other"}
        assert all(v >= 0 for v in phases.values())
        assert phases["fwd_s"] + phases["bwd_s"] <= 1.5 * run.step_s


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    """The real `engram demo --quick` (about 2 min; CI runs the tiny-model pipeline above)."""
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "validation: Engram vs MoE" in out
    assert (tmp_path / "d" / "gate_heatmap.png").is_file()
