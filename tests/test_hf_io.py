"""save_engram / load_engram: exact round trips (RAM and mmap tables, LoRA, full mode), refusals
of another tokenizer, another base and damaged saves, and atomic writes.

Tiny random Llama models (3 layers, hidden 32) and a 300-id BPE trained on the fly; offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM

from engram.config import EngramConfig
from engram.hf import (
    EngramLoadError,
    add_engram,
    close_engram,
    get_attachment,
    load_engram,
    prepare_training,
    save_engram,
)
from engram.hf import io as hf_io
from engram.hf.io import base_fingerprint, read_manifest
from engram.store.mmap import MmapRowStore
from engram.store.pread import PreadRowStore
from engram.store.prefetch import PrefetchingStore
from engram.store.tablefile import read_header
from engram.tokenizer import train_bpe

TEXTS = [
    "the quick brown fox jumps over the lazy dog. " * 4,
    "in the beginning god created the heaven and the earth. " * 4,
    "a stitch in time saves nine, and the early bird catches the worm. " * 4,
] * 10
OTHER_TEXTS = ["lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 6] * 30
CFG = EngramConfig(
    engram_vocab_size=(997, 1009),
    max_ngram_size=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=2,
    layer_ids=(0, 2),
    pad_id=0,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Compressors are cached in a private directory, never the user's ~/.cache/engram."""
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "engram-cache"))


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, 300)  # eos <|endoftext|> = id 0


def base(tok, seed: int = 0, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, eos_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def perturb(params, seed: int, scale: float = 0.1) -> None:
    """Give parameters values no init produces (stands in for training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def trained(tok, seed: int = 0) -> LlamaForCausalLM:
    """A base with Engram whose dense weights AND tables differ from any init."""
    model = add_engram(base(tok, seed), CFG, tok)
    perturb(get_attachment(model).parameters(), seed=123 + seed)
    return model


def batch(tok) -> dict[str, torch.Tensor]:
    """Two sequences, the second left-padded (exercises the liveness mask)."""
    a = tok.encode(TEXTS[0]).ids[:24]
    b = tok.encode(TEXTS[1]).ids[:18]
    ids = torch.tensor([a, [0] * 6 + b])
    mask = torch.tensor([[1] * 24, [0] * 6 + [1] * 18])
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------ round trips
def test_round_trip_ram_and_mmap_is_exact(tok, tmp_path: Path) -> None:
    model = trained(tok)
    inputs = batch(tok)
    ref = logits(model, inputs)
    assert not torch.equal(ref, logits(base(tok), inputs))  # Engram does something
    out = save_engram(model, tmp_path / "save", tokenizer=tok)
    assert sorted(os.listdir(out)) == [
        "engram_config.json", "engram_dense.safetensors", "table_L0.engt", "table_L2.engt",
    ]  # fmt: skip
    manifest = read_manifest(out)
    att = get_attachment(model)
    assert manifest["hash_fingerprint"] == att.fingerprint()
    assert manifest["tokenizer_fingerprint"] == att.compressor.fingerprint
    assert manifest["base"]["fingerprint"] == base_fingerprint(base(tok))
    assert manifest["mode"] == "adapter" and manifest["engram"] == CFG.to_dict()
    for lid in CFG.layer_ids:  # the table files carry the hash fingerprint
        assert read_header(out / f"table_L{lid}.engt").fingerprint == att.fingerprint()

    ram = load_engram(base(tok), out, tok)
    assert torch.equal(logits(ram, inputs), ref)
    assert all(p.requires_grad for p in get_attachment(ram).parameters())  # trains on
    assert not any(p.requires_grad for n, p in ram.named_parameters() if "engram" not in n)

    served = load_engram(base(tok), out, tok, tables="mmap", cache_rows=64, prefetch=True)
    try:
        assert torch.equal(logits(served, inputs), ref)
        stores = get_attachment(served).engram_layers()
        assert all(isinstance(e.store, PrefetchingStore) for e in stores.values())
        assert all(e.store.stats.prefetched_hits > 0 for e in stores.values())
        prompt = {k: v[:, :12] for k, v in inputs.items()}
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(served.generate(**prompt, **kw), model.generate(**prompt, **kw))
        stats = get_attachment(served).serving.stats()
        assert stats["0"]["cache"]["lookups"] > 0
        again = save_engram(served, tmp_path / "again")  # rows read back from the table files
    finally:
        close_engram(served)
    assert torch.equal(logits(load_engram(base(tok), again, tok), inputs), ref)
    for reader, kind in (("pread", PreadRowStore), ("mmap", MmapRowStore)):  # auto: mmap here
        served = load_engram(base(tok), out, tok, tables="mmap", reader=reader, cache_rows=16)
        try:
            assert torch.equal(logits(served, inputs), ref)
            for e in get_attachment(served).engram_layers().values():
                assert isinstance(e.store.inner, kind)
        finally:
            close_engram(served)
    with pytest.raises(ValueError, match="reader must be one of"):
        load_engram(base(tok), out, tok, tables="mmap", reader="disk")


def test_round_trip_lora_and_full_mode(tok, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    inputs = batch(tok)
    lora = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = prepare_training(trained(tok), "lora", lora=lora)
    ref = logits(model, inputs)
    out = save_engram(model, tmp_path / "lora", tokenizer=tok)
    assert {"lora.safetensors", "lora_config.json"} <= set(os.listdir(out))
    assert "base_model.safetensors" not in os.listdir(out)
    loaded = load_engram(base(tok), out, tok)
    assert type(loaded).__name__.startswith("Peft")
    assert torch.equal(logits(loaded, inputs), ref)

    full = prepare_training(trained(tok), "full")
    perturb([full.model.embed_tokens.weight, full.model.layers[1].mlp.up_proj.weight], seed=7)
    ref = logits(full, inputs)
    out = save_engram(full, tmp_path / "full")
    assert read_manifest(out)["mode"] == "full" and "base_model.safetensors" in os.listdir(out)
    fresh = base(tok, seed=5)  # any base of the architecture: its weights are replaced
    assert torch.equal(logits(load_engram(fresh, out, tok), inputs), ref)


def test_full_mode_with_tied_embeddings_gpt2(tok, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=3, n_head=4, n_positions=64,
            eos_token_id=0, bos_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(config).eval()

    model = prepare_training(add_engram(gpt2(0), CFG, tok), "full")
    perturb([model.transformer.wte.weight, *get_attachment(model).parameters()], seed=3)
    inputs = batch(tok)
    ref = logits(model, inputs)
    out = save_engram(model, tmp_path / "gpt2")
    assert read_manifest(out)["base"]["aliases"]  # the tied weight is stored once
    loaded = load_engram(gpt2(1), out, tok)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert torch.equal(logits(loaded, inputs), ref)
    with pytest.raises(ValueError, match="no Engram attached"):
        save_engram(gpt2(0), tmp_path / "none")


def test_base_fingerprint_ignores_engram_lora_and_fp32_vs_bf16(tok) -> None:
    peft = pytest.importorskip("peft")
    fp = base_fingerprint(base(tok))
    assert base_fingerprint(trained(tok)) == fp
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    assert base_fingerprint(prepare_training(trained(tok), "lora", lora=lora)) == fp
    assert base_fingerprint(base(tok).to(torch.bfloat16)) == fp
    assert base_fingerprint(base(tok, seed=1)) != fp


# ---------------------------------------------------------------------------------- refusals
def test_refuses_another_tokenizer_and_another_base(tok, tmp_path: Path) -> None:
    out = save_engram(trained(tok), tmp_path / "save")
    other_tok = train_bpe(OTHER_TEXTS, 300)
    model = base(tok)
    with pytest.raises(EngramLoadError, match="tokenizer") as e:
        load_engram(model, out, other_tok)
    one_line(e)
    assert not hasattr(model, "engram")  # refused before anything was attached

    with pytest.raises(EngramLoadError, match="trained on base") as e:
        load_engram(base(tok, seed=1), out, tok)
    assert "LlamaForCausalLM" in one_line(e)
    with pytest.raises(EngramLoadError, match="hidden 48") as e:
        load_engram(base(tok, hidden=48), out, tok)
    one_line(e)
    # the escape hatch, for a base known to be compatible
    assert hasattr(load_engram(base(tok, seed=1), out, tok, check_base=False), "engram")


def test_refuses_damaged_saves(tok, tmp_path: Path) -> None:
    good = save_engram(trained(tok), tmp_path / "good")

    def damaged(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = damaged("truncated")
    table = d / "table_L2.engt"
    table.write_bytes(table.read_bytes()[:-100])
    for tables in ("ram", "mmap"):
        with pytest.raises(EngramLoadError, match="truncated") as e:
            load_engram(base(tok), d, tok, tables=tables)
        assert "table_L2.engt" in one_line(e)

    d = damaged("corrupt")
    dense = d / "engram_dense.safetensors"
    raw = bytearray(dense.read_bytes())
    raw[-5] ^= 0xFF
    dense.write_bytes(bytes(raw))
    with pytest.raises(EngramLoadError, match=r"engram_dense\.safetensors is corrupt") as e:
        load_engram(base(tok), d, tok)
    one_line(e)

    d = damaged("missing")
    (d / "table_L0.engt").unlink()
    with pytest.raises(EngramLoadError, match=r"table_L0\.engt is missing"):
        load_engram(base(tok), d, tok)

    d = damaged("swapped")  # a table file from another save (same shape, other rows)
    other = save_engram(trained(tok, seed=9), tmp_path / "other")
    (d / "table_L0.engt").write_bytes((other / "table_L0.engt").read_bytes())
    with pytest.raises(EngramLoadError, match="another save"):
        load_engram(base(tok), d, tok)

    d = damaged("badjson")
    (d / "engram_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(EngramLoadError, match=r"engram_config\.json is corrupt"):
        load_engram(base(tok), d, tok)

    (tmp_path / "empty").mkdir()
    for path, what in (
        (tmp_path / "empty", "not an Engram save"),
        (tmp_path / "nowhere", "does not exist"),
        (good / "table_L0.engt", "is a file"),
    ):
        with pytest.raises(EngramLoadError, match=what) as e:
            load_engram(base(tok), path, tok)
        one_line(e)


def test_load_refuses_bad_arguments(tok, tmp_path: Path) -> None:
    out = save_engram(trained(tok), tmp_path / "save")
    with pytest.raises(ValueError, match="tables must be"):
        load_engram(base(tok), out, tok, tables="disk")
    with pytest.raises(ValueError, match="tables='mmap' only"):
        load_engram(base(tok), out, tok, cache_rows=8)
    with pytest.raises(ValueError, match="already has Engram"):
        load_engram(trained(tok), out, tok)
    with pytest.raises(ValueError, match="not the one Engram was attached with"):
        save_engram(trained(tok), tmp_path / "x", tokenizer=train_bpe(OTHER_TEXTS, 300))


# ------------------------------------------------------------------------------ atomic writes
def test_save_is_atomic(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = batch(tok)
    first = trained(tok)
    out = save_engram(first, tmp_path / "save")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    second = trained(tok)
    perturb(get_attachment(second).parameters(), seed=99)
    calls = []
    real = hf_io.write_table

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second layer's table: files of the new save exist by now
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_io, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        save_engram(second, out)
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]  # no temporary left
    assert torch.equal(logits(load_engram(base(tok), out, tok), inputs), logits(first, inputs))

    save_engram(second, out)  # a completed save replaces the old one
    assert torch.equal(logits(load_engram(base(tok), out, tok), inputs), logits(second, inputs))
    assert json.loads((out / "engram_config.json").read_text())["format"] == "engram-hf"

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an Engram save"):
        save_engram(second, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
