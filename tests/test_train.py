"""The training loop end to end on real (small) data: resume == uninterrupted, refusals, outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from engram.checkpoint import CheckpointError, read_checkpoint
from engram.presets import tiny_engram, tiny_moe
from engram.run import train
from engram.run_config import ConfigError, apply_overrides
from engram.train import evaluate, load_trained


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "train-cache"))


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]


def _hyper_engram():
    return apply_overrides(tiny_engram(), ["model.hc_mult=4"])


@pytest.mark.parametrize(
    "make", [tiny_engram, tiny_moe, _hyper_engram], ids=["engram", "moe", "engram-hc4"]
)
def test_resume_equals_uninterrupted(make, tmp_path):
    cfg = apply_overrides(make(), ["train.steps=6", "train.eval_every=2", "train.ckpt_every=3"])
    full = train(cfg, tmp_path / "full", progress=False)
    first = train(cfg, tmp_path / "split", progress=False, stop_after=3)
    assert first.step == 3
    second = train(cfg, tmp_path / "split", progress=False)
    assert second.step == 6
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")  # bit-identical on CPU
    a, _ = load_trained(tmp_path / "full")
    b, _ = load_trained(tmp_path / "split")
    for (na, pa), (nb, pb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=False
    ):
        assert na == nb
        assert torch.equal(pa, pb), na
    assert full.val_loss == second.val_loss


def test_run_directory_contents_and_eval_agree(tmp_path):
    cfg = tiny_engram()
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "loss.png").stat().st_size > 1000
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, cfg.train.steps + 1))
    assert all(r["wait_s"] >= 0 and r["tokens_per_s"] > 0 for r in records)
    assert records[-1]["val_loss"] == result.val_loss
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    # The checkpoint evaluates to the logged validation loss.
    parts, ckpt = load_trained(run)
    from engram.data import prepare_data
    from engram.tokenizer import EOT_ID

    splits = prepare_data(cfg.data, parts.tokenizer, EOT_ID)
    loss = evaluate(parts.model, splits.val_batches(cfg.train.final_eval_batches), parts.indexer)
    assert loss == pytest.approx(result.val_loss, rel=1e-6)
    assert ckpt.state["hash_fingerprint"] == parts.indexer.hasher.fingerprint()
    counts = result.counts
    assert counts.table > 0 and counts.total == sum(p.numel() for p in parts.model.parameters())


def test_refuses_other_config_and_other_hashing(tmp_path):
    cfg = tiny_engram()
    train(cfg, tmp_path / "run", progress=False, stop_after=2)
    other = apply_overrides(cfg, ["optim.lr=0.01"])
    with pytest.raises(ConfigError, match="different config"):
        train(other, tmp_path / "run", progress=False)
    # A checkpoint whose hash configuration differs from its model's is refused on load.
    state_file = read_checkpoint(tmp_path / "run").path / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["engram"]["seed"] = 7  # same shapes, different multipliers
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="hash configuration"):
        load_trained(tmp_path / "run")


def test_corrupt_checkpoint_is_refused_and_previous_survives(tmp_path):
    cfg = apply_overrides(tiny_moe(), ["train.ckpt_every=2", "train.steps=4"])
    train(cfg, tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"]
    model_file = ckpts[-1] / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_trained(tmp_path / "run")
    _parts, ckpt = load_trained(ckpts[0])  # the previous one is intact
    assert ckpt.step == 2


def test_grad_accum_sees_more_tokens_and_steps_count(tmp_path):
    cfg = apply_overrides(tiny_moe(), ["train.grad_accum=2", "train.steps=2"])
    result = train(cfg, tmp_path / "acc", progress=False)
    records = [json.loads(x) for x in (tmp_path / "acc" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["tokens"] == 2 * 2 * cfg.data.batch_size * cfg.data.seq_len
    assert result.step == 2


def test_tables_only_change_at_touched_rows(tmp_path):
    from engram.train import build_run

    cfg = replace(tiny_engram(), name="rows")
    before = build_run(cfg).model.engram_layers()[1].store.weight.detach().clone()
    # Step 1 moves the zero-initialised value projection; from step 2 the tables get gradient.
    train(apply_overrides(cfg, ["train.steps=2"]), tmp_path / "one", progress=False)
    parts, _ = load_trained(tmp_path / "one")
    after = parts.model.engram_layers()[1].store.weight.detach()
    changed = (after != before).any(dim=1)
    assert 0 < int(changed.sum()) < changed.numel() // 2


def test_finished_run_reports_from_its_metrics(tmp_path):
    cfg = apply_overrides(tiny_moe(), ["train.steps=2"])
    first = train(cfg, tmp_path / "run", progress=False)
    again = train(cfg, tmp_path / "run", progress=False)  # nothing left to do
    assert again.step == 2 and again.history == []
    assert again.val_loss == first.val_loss and again.train_loss == first.train_loss


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    train(apply_overrides(tiny_moe(), ["train.steps=1"]), tmp_path / "run", progress=False)
    mask = os.umask(0)
    os.umask(mask)
    run = tmp_path / "run"
    ckpt = next((run / "checkpoints").glob("step-*"))
    for path, base in [(run / "config.json", 0o666), (run / "loss.png", 0o666), (ckpt, 0o777)]:
        assert stat.S_IMODE(path.stat().st_mode) == base & ~mask, path


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    cfg = apply_overrides(tiny_moe(), ["train.device=cuda"])
    with pytest.raises(ConfigError, match="no CUDA device"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before writing anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_cpu_closely(tmp_path):
    cfg = apply_overrides(tiny_engram(), ["train.steps=3"])
    cpu = train(cfg, tmp_path / "cpu", progress=False)
    gpu = train(apply_overrides(cfg, ["train.device=cuda"]), tmp_path / "gpu", progress=False)
    assert gpu.val_loss == pytest.approx(cpu.val_loss, rel=1e-3)
