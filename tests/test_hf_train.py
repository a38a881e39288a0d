"""engram's own training loop with a Hugging Face base model (`RunConfig.base`, engram.hf.lm).

Tiny random Llama bases (`engram.hf.base.init_base`, a 300-id BPE, 2 layers, d=32), trained for a
few steps through `engram.run.train`. Proves: a run with Engram and a base trained alone both
resume bit-exactly (the same losses as uninterrupted); adapter mode leaves every base weight
bit-identical and keeps it out of the checkpoints; evaluation, cached generation (left padding,
a document end inside a prompt) and table export read such runs; export gives a model
directory that trains as the next base; another base (changed weights, wrong layer ids, a
tokenizer larger than the embedding, an unsupported architecture) is refused before anything
is written; two gloo ranks match one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from engram.checkpoint import read_checkpoint
from engram.data.sources import iter_grouped_documents
from engram.export import export_tables, read_tables
from engram.generate import generate
from engram.hf import UnsupportedModelError, load_engram
from engram.hf.base import BaseModelError, base_run_config, init_base, read_base
from engram.hf.export import export_base
from engram.hf.lm import HFCausalLM
from engram.run import train
from engram.run_config import ConfigError, RunConfig, apply_overrides
from engram.train import evaluate, load_trained

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-train-cache")


@pytest.fixture(autouse=True)
def _env(cache, monkeypatch, one_thread):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(cache))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 KJV chapters as a text file (documents separated by blank lines): fast to tokenize."""
    docs = [" ".join(t.split()) for t, _ in iter_grouped_documents("builtin:kjv", "text")][:60]
    path = tmp_path_factory.mktemp("hf-corpus") / "kjv60.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus, cache) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(cache))
        out = tmp_path_factory.mktemp("hf-bases") / "llama"
        return init_base(
            out, "llama", hidden=32, layers=2, heads=2, max_positions=64, tokenizer="bpe:300",
            data=str(corpus),
        )  # fmt: skip


def _cfg(base: Path, corpus: Path, *extra: str, engram: bool = True, train_base: bool = True):
    overrides = [
        f"data.source={json.dumps(str(corpus))}", "data.seq_len=32", "data.batch_size=2",
        "train.steps=4", "train.eval_every=2", "train.eval_batches=1",
        "train.final_eval_batches=2", "train.ckpt_every=2", "train.keep_checkpoints=0",
        "train.threads=1", *extra,
    ]  # fmt: skip
    table = 300 if engram else None
    return base_run_config(
        str(base), engram=engram, table_size=table, train_base=train_base, overrides=overrides
    )


def _records(run: Path) -> list[tuple[int, float, float | None]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]


def _base_state(model: HFCausalLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.hf.state_dict().items() if not k.startswith("engram.")}


@pytest.fixture(scope="module")
def engram_run(tmp_path_factory, base, corpus, cache):
    """A base + Engram run, trained uninterrupted and (elsewhere) interrupted after 2 steps."""
    root = tmp_path_factory.mktemp("hf-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(cache))
        cfg = _cfg(base, corpus)
        train(cfg, root / "full", progress=False)
        train(cfg, root / "cut", progress=False, stop_after=2)
        train(cfg, root / "cut", progress=False)
    return root


def test_config_records_the_base_and_resume_is_bit_exact(engram_run, base):
    full, cut = engram_run / "full", engram_run / "cut"
    assert _records(full) == _records(cut)  # losses and validation losses, bit for bit
    assert len(_records(full)) == 4 and (full / "loss.png").is_file()
    saved = json.loads((full / "config.json").read_text())
    assert saved["model"] is None and saved["base"]["path"] == str(base)
    assert len(saved["base"]["fingerprint"]) == 64
    assert saved["base"]["hf_config"]["model_type"] == "llama"
    assert saved["engram"]["layer_ids"] == [1] and saved["engram"]["pad_id"] == 0  # BPE's EOT
    a, _ = load_trained(full)
    b, ckpt = load_trained(cut)
    assert isinstance(a.model, HFCausalLM) and ckpt.step == 4
    for (k, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), k
    # engram's checkpoint layout: the table under its EngramLM name, the base in full mode
    keys = set(a.model.state_dict())
    assert "blocks.1.engram.store.weight" in keys and "hf.model.embed_tokens.weight" in keys


def test_evaluate_generate_and_table_export_read_the_run(engram_run, tmp_path):
    parts, _ = load_trained(engram_run / "full")
    model, ix = parts.model, parts.indexer
    splits_cfg = parts.cfg.data
    from engram.data import prepare_data

    batches = list(prepare_data(splits_cfg, parts.tokenizer, parts.eot_id).val_batches(2))
    last = _records(engram_run / "full")[-1][2]
    assert evaluate(model, batches, ix) == pytest.approx(last, abs=1e-6)

    # cached, left-padded generation equals a full forward of each prompt alone
    eot = parts.eot_id
    prompts = [[*parts.tokenizer.encode("And God said").ids, eot, 42, 43], [7, 8]]
    res = generate(model, prompts, indexer=ix, max_new_tokens=5, temperature=0, return_logits=True)
    for b, prompt in enumerate(prompts):
        seq = prompt + res.tokens[b]
        x = torch.tensor([seq[:-1]])
        with torch.no_grad():
            full = model(x, torch.as_tensor(ix.rows(x.numpy()))).logits[0]
        for step, logits in enumerate(res.logits or []):
            pos = len(prompt) - 1 + step
            assert torch.allclose(logits[b], full[pos], atol=2e-5), (b, step)

    files = export_tables(engram_run / "full", tmp_path / "tables")
    table = read_tables(files)[1]
    assert torch.equal(table, model.engram_layers()[1].store.weight.detach())


def test_export_base_is_the_next_base(engram_run, base, corpus, tmp_path):
    done = export_base(engram_run / "full", tmp_path / "next")
    info = read_base(done.path)
    assert info.architecture == "LlamaForCausalLM" and done.trained_base and done.engram
    parts, _ = load_trained(engram_run / "full")
    from transformers import AutoModelForCausalLM

    from engram.tokenizer import load_tokenizer_file

    plain = AutoModelForCausalLM.from_pretrained(str(done.path), local_files_only=True)
    for k, v in _base_state(parts.model).items():
        assert torch.equal(plain.state_dict()[k], v), k
    attached = load_engram(plain, done.engram, load_tokenizer_file(done.path))
    x = torch.tensor([parts.tokenizer.encode("In the beginning God created").ids])
    with torch.no_grad():
        want = parts.model(x, torch.as_tensor(parts.indexer.rows(x.numpy()))).logits
        assert torch.equal(attached(x, use_cache=False).logits, want)
    cfg = _cfg(done.path, corpus, "train.steps=1", "train.ckpt_every=0", engram=False)
    assert train(cfg, tmp_path / "again", progress=False).step == 1


def test_base_alone_trains_and_resumes(base, corpus, tmp_path):
    cfg = _cfg(base, corpus, "train.steps=3", "train.eval_every=0", engram=False)
    assert cfg.engram is None and cfg.base.train_base
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "cut", progress=False, stop_after=1)
    train(cfg, tmp_path / "cut", progress=False)
    assert _records(tmp_path / "full") == _records(tmp_path / "cut")
    parts, _ = load_trained(tmp_path / "full")
    assert parts.indexer is None and not parts.model.engram_layers()
    fresh = HFCausalLM(_load(base))
    changed = [
        k for k, v in _base_state(parts.model).items() if not torch.equal(v, _base_state(fresh)[k])
    ]
    assert changed  # the base itself trained


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)


def test_adapter_mode_leaves_the_base_bit_identical(base, corpus, tmp_path):
    cfg = _cfg(base, corpus, "train.steps=3", "train.eval_every=0", train_base=False)
    train(cfg, tmp_path / "run", progress=False)
    parts, ckpt = load_trained(tmp_path / "run")
    original = _base_state(HFCausalLM(_load(base)))
    trained = _base_state(parts.model)
    assert trained.keys() == original.keys()
    assert all(torch.equal(trained[k], original[k]) for k in original)
    from safetensors import safe_open

    with safe_open(str(ckpt.path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("hf.engram.", "blocks.")) for k in keys)  # no base weights
    value = parts.model.engram_layers()[1].value_proj.weight
    assert value.abs().max() > 0  # Engram trained (its value projection starts at zero)


def test_tables_trained_on_disk_match_tables_in_ram(base, corpus, tmp_path):
    cfg = _cfg(base, corpus, "train.steps=3", "train.eval_every=0", "train.ckpt_every=0")
    train(cfg, tmp_path / "ram", progress=False)
    disk = apply_overrides(cfg, ["train.table_store=mmap"])
    train(disk, tmp_path / "disk", progress=False)
    assert _records(tmp_path / "ram") == _records(tmp_path / "disk")
    assert read_checkpoint(tmp_path / "disk").state["tables"]  # table files, not the model file
    a, _ = load_trained(tmp_path / "ram")
    b, _ = load_trained(tmp_path / "disk")  # served read-only from the checkpoint's files
    x = torch.tensor([a.tokenizer.encode("And the LORD spake unto Moses").ids])
    rows = torch.as_tensor(a.indexer.rows(x.numpy()))
    with torch.no_grad():
        assert torch.equal(a.model(x, rows).logits, b.model(x, rows).logits)


def test_a_bfloat16_frozen_base_trains_engram_in_float32(base, corpus, tmp_path):
    cfg = _cfg(base, corpus, "train.steps=2", "train.eval_every=0", "base.dtype=bfloat16",
               train_base=False)  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.val_loss is not None and np.isfinite(result.val_loss)
    parts, _ = load_trained(tmp_path / "run")
    assert parts.model.tok_emb.weight.dtype == torch.bfloat16
    assert parts.model.engram_layers()[1].value_proj.weight.dtype == torch.float32


def test_a_changed_base_is_refused_before_anything_is_written(base, corpus, tmp_path):
    mine = tmp_path / "base"
    shutil.copytree(base, mine)
    cfg = _cfg(mine, corpus, "train.steps=3", "train.eval_every=0", "train.ckpt_every=1")
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=1)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = init_base(tmp_path / "other", "llama", hidden=32, layers=2, heads=2,
                      max_positions=64, tokenizer=str(base), seed=1)  # fmt: skip
    shutil.copy(other / "model.safetensors", mine / "model.safetensors")
    with pytest.raises(ConfigError, match="another or a modified base"):
        train(_cfg(mine, corpus, "train.steps=3", "train.eval_every=0", "train.ckpt_every=1"),
              run, progress=False)  # fmt: skip
    with pytest.raises(BaseModelError, match="not the one this run was trained from"):
        load_trained(run)
    recorded = RunConfig.load(run / "config.json")  # the fingerprint, checked against the dir
    with pytest.raises(BaseModelError, match="not the one this run was trained from"):
        train(recorded, run, progress=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (["engram.layer_ids=[2]"], ConfigError, r"layer_ids \[2\] are outside LlamaForCausalLM"),
        (["data.tokenizer=gpt2"], ConfigError, "50,257 ids but the base model"),
        (["data.seq_len=100"], ConfigError, "exceeds the base model's 64 positions"),
    ],
)
def test_bad_runs_are_refused_before_anything_is_written(
    base, corpus, tmp_path, change, error, message
):
    cfg = apply_overrides(_cfg(base, corpus), change)
    with pytest.raises(error, match=message):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_bad_bases_are_named(base, corpus, tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        read_base(tmp_path / "nope")
    with pytest.raises(BaseModelError, match=r"has no config\.json"):
        read_base(tmp_path)
    neox = tmp_path / "neox"
    neox.mkdir()
    config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}
    (neox / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"GPTNeoXForCausalLM .* not a supported"):
        read_base(neox)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(base / "config.json", weightless / "config.json")
    with pytest.raises(BaseModelError, match="has no weights"):
        read_base(weightless)
    with pytest.raises(BaseModelError, match=r"layer ids \[5\] are outside"):
        base_run_config(str(base), layers=(5,))
    with pytest.raises(ConfigError, match="nothing would train"):
        base_run_config(str(base), engram=False, train_base=False)
    with pytest.raises(ConfigError, match=r"model\.d_model does not apply"):
        _cfg(base, corpus, "model.d_model=64")
    with pytest.raises(BaseModelError, match="not an empty directory"):
        init_base(base, "llama")


def test_two_ranks_match_one_process(base, corpus, cache, tmp_path):
    cfg = _cfg(base, corpus, "train.steps=3", "data.batch_size=4", "train.eval_every=0",
               "train.ckpt_every=0")  # fmt: skip
    train(cfg, tmp_path / "one", progress=False)
    cfg.save(tmp_path / "cfg.json")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(ENGRAM_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "engram", "train", "--config", str(tmp_path / "cfg.json"),
         "--out", str(tmp_path / "two"), "--nproc", "2", "--no-progress"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [s for s, _, _ in one] == [s for s, _, _ in two]
    np.testing.assert_allclose([x[1] for x in two], [x[1] for x in one], rtol=1e-5)
    np.testing.assert_allclose(two[-1][2], one[-1][2], rtol=1e-5)
    ckpt = read_checkpoint(tmp_path / "two")
    assert len(ckpt.state["sharded_tables"]["1"]["shards"]) == 2  # the table was row-sharded
    a, _ = load_trained(tmp_path / "one")
    b, _ = load_trained(tmp_path / "two")  # one process, the table assembled from 2 shards
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b.model.state_dict()[k], rtol=1e-4, atol=5e-5), k
