"""Engram switched off at inference: exactness of the switch, per-token losses, the report."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram.analysis.runs import NoEngramError
from engram.analysis.sensitivity import (
    analyze_sensitivity,
    engram_disabled,
    per_token_loss,
    sensitivity_report,
)
from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM, ModelConfig
from engram.tokenizer import load_builtin_tokenizer
from engram.train import METRICS_FILE, evaluate, read_metrics

V = 128  # tiny vocab, also the hasher's compressed vocab (pad id 0)
ENGRAM = EngramConfig(
    engram_vocab_size=(101, 103), max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
    layer_ids=(0, 2), pad_id=0,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


class StubIndexer:
    """What the analysis needs of an indexer, for a model over a synthetic vocabulary."""

    tokenizer = None

    def __init__(self, hasher: NgramHasher) -> None:
        self.hasher = hasher

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.hasher.hash_all(ids)

    def token_text(self, i: int) -> str:
        return "<script>" if i == 7 else f"t{i} "


def build(hc_mult: int = 1) -> tuple[EngramLM, StubIndexer]:
    """Two Engram layers, with value projections and convs made non-zero (both start at zero)."""
    cfg = ModelConfig(
        vocab_size=V, d_model=32, n_layers=3, n_heads=2, max_seq_len=32, d_ff=64,
        n_routed_experts=4, n_shared_experts=1, moe_top_k=2, d_expert=16, hc_mult=hc_mult,
    )  # fmt: skip
    hasher = NgramHasher.from_config(ENGRAM, V, 0)
    sizes = {lid: hasher.flat_table_sizes(lid) for lid in ENGRAM.layer_ids}
    model = EngramLM(cfg, ENGRAM, sizes, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.engram_layers().values():
            for p in (layer.value_proj.weight, layer.value_proj.bias, layer.short_conv.conv.weight):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval(), StubIndexer(hasher)


def batches(n: int = 2, B: int = 3, T: int = 20, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(1, V, size=(B, T + 1))
        out.append((seq[:, :-1].copy(), seq[:, 1:].copy()))
    return out


def logits(model: EngramLM, indexer: StubIndexer, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(x), torch.as_tensor(indexer.rows(x))).logits


def zeroed(model: EngramLM, layer_ids: tuple[int, ...]) -> EngramLM:
    """The reference: a copy whose chosen Engram layers write exactly zero into the residual.

    Y = a*v + SiLU(conv(RMSNorm(a*v))) with v = value_proj(e): zero weight and bias give v = 0,
    hence Y = 0 (RMSNorm(0) = 0, conv(0) = 0, SiLU(0) = 0), through the model's own code.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for lid in layer_ids:
            ref.engram_layers()[lid].value_proj.weight.zero_()
            ref.engram_layers()[lid].value_proj.bias.zero_()
    return ref


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_disabled_equals_zeroed_value_projection(hc_mult: int) -> None:
    model, indexer = build(hc_mult)
    x = batches(1)[0][0]
    before = logits(model, indexer, x)
    with engram_disabled(model) as ids:
        assert ids == (0, 2)
        off = logits(model, indexer, x)
    torch.testing.assert_close(off, logits(zeroed(model, (0, 2)), indexer, x), rtol=0, atol=0)
    assert not torch.allclose(off, before, atol=1e-3)  # the memory matters in this model
    for lid in (0, 2):
        with engram_disabled(model, [lid]):
            one = logits(model, indexer, x)
        ref = logits(zeroed(model, (lid,)), indexer, x)
        torch.testing.assert_close(one, ref, rtol=0, atol=0)
        assert not torch.allclose(one, off, atol=1e-3) and not torch.allclose(
            one, before, atol=1e-3
        )
    # outside the block the model is unchanged, bit for bit
    torch.testing.assert_close(logits(model, indexer, x), before, rtol=0, atol=0)
    assert all("forward" not in vars(layer) for layer in model.engram_layers().values())


def test_disabled_restores_on_error_nests_and_validates() -> None:
    model, indexer = build()
    x = batches(1)[0][0]
    before = logits(model, indexer, x)
    with pytest.raises(RuntimeError, match="boom"), engram_disabled(model):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, indexer, x), before, rtol=0, atol=0)
    with engram_disabled(model, [0]):
        with engram_disabled(model, [0, 2]):
            pass
        torch.testing.assert_close(
            logits(model, indexer, x), logits(zeroed(model, (0,)), indexer, x), rtol=0, atol=0
        )
    assert all("forward" not in vars(layer) for layer in model.engram_layers().values())
    # the streaming form returns zeros and passes the conv state through
    layer = model.engram_layers()[0]
    h = torch.randn(2, 5, 32)
    state = layer.init_conv_state(2)
    with engram_disabled(model, [0]):
        y, new = layer(h, torch.as_tensor(indexer.rows(x[:2, :5]))[0], conv_state=state)
    assert torch.equal(y, torch.zeros_like(h)) and new is state
    bad = r"layer ids \[1\] are not Engram layers.*\[0, 2\]"
    with pytest.raises(ValueError, match=bad), engram_disabled(model, [1]):
        pass
    with (
        pytest.raises(NoEngramError, match="no Engram layers"),
        engram_disabled(EngramLM(model.cfg)),
    ):
        pass


def test_per_token_loss_matches_full_logits() -> None:
    model, indexer = build(hc_mult=2)
    data = batches(3)
    data[1][1][0, 4] = -1  # an ignored target
    losses = per_token_loss(model, indexer, data, chunk=7)  # chunks that split rows
    assert losses.dtype == np.float64 and losses.shape == (9, 20)
    for b, (x, y) in enumerate(data):
        lg = logits(model, indexer, x)
        ref = F.cross_entropy(
            lg.reshape(-1, V), torch.as_tensor(y).reshape(-1), reduction="none", ignore_index=-1
        ).reshape(y.shape)
        got = losses[3 * b : 3 * b + 3]
        ok = y != -1
        np.testing.assert_allclose(got[ok], ref.numpy()[ok], rtol=1e-5, atol=1e-5)
        assert np.isnan(got[~ok]).all() and (~ok).sum() == (1 if b == 1 else 0)
    # the mean equals the training loop's validation loss on the same batches
    clean = batches(3, seed=1)
    mean = per_token_loss(model, indexer, clean).mean()
    assert mean == pytest.approx(evaluate(model, clean, indexer), abs=1e-6)
    with engram_disabled(model):
        off = per_token_loss(model, indexer, clean).mean()
        assert off == pytest.approx(evaluate(model, clean, indexer), abs=1e-6)
    assert abs(off - mean) > 1e-4


def test_report_on_a_two_layer_model(tmp_path) -> None:
    model, indexer = build()
    data = batches(2)
    data[0][1][0, 3] = 7  # a target whose text is "<script>"
    report = sensitivity_report(model, indexer, data, tmp_path, top=5, min_count=1)
    c = report.conditions
    assert list(c) == ["normal", "engram off", "layer 0 off", "layer 2 off"]
    assert len({round(v, 6) for v in c.values()}) == 4  # every condition measures something else
    with engram_disabled(model, [2]):
        assert c["layer 2 off"] == pytest.approx(np.mean(per_token_loss(model, indexer, data)))
    np.testing.assert_array_equal(report.loss_normal, per_token_loss(model, indexer, data))
    np.testing.assert_array_equal(report.targets, np.concatenate([y for _, y in data]))
    page = report.html.read_text(encoding="utf-8")
    assert "&lt;script&gt;" in page and page.count("<script") == 1  # token 7 is "<script>"
    data_json = json.loads(report.json.read_text(encoding="utf-8"))
    assert list(data_json["val_loss"]) == list(c)
    types = data_json["token_types_losing_most"]
    assert len(types) == 5 and [t["mean_delta"] for t in types] == sorted(
        (t["mean_delta"] for t in types), reverse=True
    )
    # the listed type's mean delta is the mean over its target positions
    first = types[0]
    mask = report.targets == first["id"]
    assert first["count"] == mask.sum()
    assert first["mean_delta"] == pytest.approx(report.delta[mask].mean(), abs=1e-4)
    top = data_json["positions_losing_most"][0]
    assert top["delta"] == pytest.approx(report.delta.max(), abs=1e-4)
    assert top["target"] == indexer.token_text(int(report.targets[top["window"], top["position"]]))


# ------------------------------------------------------------------------------ on a real run
def test_real_run_report(analysis_env, tiny_runs, tmp_path) -> None:
    report = analyze_sensitivity(tiny_runs["engram"], tmp_path, max_batches=4, min_count=2, top=10)
    # training validated its final model on the same 4 batches with engram.train.evaluate
    final = [r for r in read_metrics(tiny_runs["engram"] / METRICS_FILE) if "val_loss" in r][-1]
    assert final["step"] == report.source["step"] == 6
    assert report.conditions["normal"] == pytest.approx(final["val_loss"], abs=1e-5)
    assert report.conditions["engram off"] != report.conditions["normal"]
    assert list(report.conditions) == ["normal", "engram off"]  # one layer: no per-layer rows
    assert report.targets.shape == (16, 32) and report.loss_off.shape == (16, 32)
    for path in (report.png, report.html, report.json):
        assert path.is_file() and path.parent == tmp_path
    assert report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.json.read_text(encoding="utf-8"))
    assert data["n_tokens"] == 512 and data["source"]["data_source"] == "builtin:kjv"
    assert all(t["count"] >= 2 for t in data["token_types_losing_most"])
    pos = data["positions_losing_most"]
    assert len(pos) == 10 and pos[0]["delta"] >= pos[-1]["delta"]
    w, t = pos[0]["window"], pos[0]["position"]
    tokenizer = load_builtin_tokenizer()
    assert pos[0]["context"] == tokenizer.decode(
        report.inputs[w, max(0, t - 7) : t + 1].tolist(), skip_special_tokens=False
    )
    assert pos[0]["target"] == tokenizer.decode(
        [int(report.targets[w, t])], skip_special_tokens=False
    )
    page = report.html.read_text(encoding="utf-8")
    assert page.count('class="tok"') == 200


def test_baseline_is_refused(analysis_env, tiny_runs, tmp_path) -> None:
    with pytest.raises(NoEngramError, match=r"no Engram layers.*sensitivity"):
        analyze_sensitivity(tiny_runs["moe"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
