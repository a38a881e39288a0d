"""Tests of the residual-stream tools: block_outputs, the logit lens and linear CKA.

They prove agreement with independent computations (a naive n x n HSIC, the model's own logits,
a manual loop over the blocks, F.kl_div), the invariances CKA must have, streaming == one-shot,
and that the analyze_* entry points write parseable files and refuse bad input.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models

from engram.analysis import hidden
from engram.analysis.cka import CKAAccumulator, analyze_cka, cka_matrix, linear_cka
from engram.analysis.hidden import block_outputs, load_runs, shared_val_data, val_inputs
from engram.analysis.lens import analyze_logit_lens, kl_sums, logit_lens
from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM, ModelConfig
from engram.train import load_trained

V = 128  # tiny vocab; also the compressed vocab size of the hasher (pad id 0)
ENGRAM = EngramConfig(
    engram_vocab_size=(101, 103),
    max_ngram_size=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=2,
    layer_ids=(1,),
    pad_id=0,
)


def _model(hc_mult: int, engram: bool = True) -> tuple[EngramLM, NgramHasher | None]:
    """A hand-built 3-block model with large init so its layers differ visibly."""
    cfg = ModelConfig(
        vocab_size=V, d_model=32, n_layers=3, n_heads=2, max_seq_len=32, ffn="dense", d_ff=64,
        hc_mult=hc_mult, init_std=0.3,
    )  # fmt: skip
    if not engram:
        return EngramLM(cfg, seed=1), None
    hasher = NgramHasher.from_config(ENGRAM, V, 0)
    sizes = {lid: hasher.flat_table_sizes(lid) for lid in ENGRAM.layer_ids}
    model = EngramLM(cfg, ENGRAM, sizes, seed=1)
    with torch.no_grad():  # the value projection starts at zero: give the memory a voice
        for layer in model.engram_layers().values():
            torch.nn.init.normal_(layer.value_proj.weight, 0.0, 0.3)
    return model, hasher


def _inputs(hasher: NgramHasher | None, B: int = 2, T: int = 12, seed: int = 0):
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return x, None if hasher is None else hasher.hash_all(x)  # (B, T), (L, B, T, H)


pytestmark = pytest.mark.usefixtures("one_thread")


def _hooks(model: EngramLM) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------ linear CKA
def _naive_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al.: normalised HSIC of the n x n linear kernels, centered with H."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n

    def hsic(K: np.ndarray, L: np.ndarray) -> float:
        return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2

    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@pytest.mark.parametrize("seed", range(4))
def test_linear_cka_matches_naive_hsic(seed):
    rng = np.random.default_rng(seed)
    n, d1, d2 = 50, 7, 5
    X = rng.normal(size=(n, d1)) + rng.normal(size=d1) * 10  # non-zero means: centering matters
    Y = X[:, :d2] @ rng.normal(size=(d2, d2)) * 0.5 + rng.normal(size=(n, d2)) + 3.0
    got = linear_cka(X, Y)
    assert got == pytest.approx(_naive_cka(X, Y), rel=1e-10)
    assert 0.0 < got < 1.0
    assert linear_cka(torch.as_tensor(Y), torch.as_tensor(X)) == pytest.approx(got, rel=1e-12)


def test_linear_cka_identity_and_invariances():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 8))
    Y = np.tanh(X @ rng.normal(size=(8, 6)))
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # orthogonal
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(X, Y)
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X + 5.0, Y - 2.0) == pytest.approx(base, rel=1e-10)
    # ... but not to an anisotropic scaling: CKA is not a CCA.
    assert linear_cka(X * np.arange(1, 9), Y) != pytest.approx(base, rel=1e-3)


def test_accumulator_over_split_batches_equals_one_shot():
    rng = np.random.default_rng(2)
    n = 97
    # a large common mean next to a small spread: the regime where naive raw sums cancel
    xs = [rng.normal(size=(n, 6)) * 0.1 + 1e4, rng.normal(size=(n, 4))]
    ys = [xs[0][:, :3] @ rng.normal(size=(3, 5)) + rng.normal(size=(n, 5)), rng.normal(size=(n, 2))]
    acc = CKAAccumulator()
    for lo, hi in [(0, 1), (1, 30), (30, 31), (31, 97)]:
        acc.update([x[lo:hi] for x in xs], [y[lo:hi] for y in ys])
    assert acc.n == n
    got = acc.matrix()
    expected = np.array([[linear_cka(x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    one = CKAAccumulator().update(xs[1][:40], ys[1][:40]).update(xs[1][40:], ys[1][40:])
    assert one.value() == pytest.approx(linear_cka(xs[1], ys[1]), rel=1e-10)


@pytest.mark.parametrize(
    ("X", "Y", "match"),
    [
        (np.ones((5, 2)) * np.arange(5)[:, None], np.zeros((4, 2)), "n=5 rows, Y n=4"),
        (np.zeros((1, 2)), np.zeros((1, 3)), "at least 2 examples"),
        (np.zeros(5), np.zeros((5, 1)), r"shape \(n, d\), got \(5,\)"),
        (np.full((4, 2), np.nan), np.zeros((4, 2)), "non-finite"),
        (np.ones((4, 2)), np.arange(8.0).reshape(4, 2), "X is constant"),
        (np.zeros((4, 0)), np.zeros((4, 2)), "no features"),
    ],
)
def test_linear_cka_refuses_bad_input(X, Y, match):
    with pytest.raises(ValueError, match=match):
        linear_cka(X, Y)


def test_accumulator_refuses_bad_input():
    rng = np.random.default_rng(3)
    acc = CKAAccumulator().update(rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    with pytest.raises(ValueError, match=r"widths \[5\] differ from the first batch's \[3\]"):
        acc.update(rng.normal(size=(4, 5)), rng.normal(size=(4, 2)))
    with pytest.raises(ValueError, match="xs\\[0\\] has n=4, ys\\[0\\] has n=3"):
        acc.update(rng.normal(size=(4, 3)), rng.normal(size=(3, 2)))
    with pytest.raises(ValueError, match="xs is empty"):
        acc.update([], rng.normal(size=(4, 2)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        CKAAccumulator().update(np.ones((1, 2)), np.ones((1, 2))).matrix()
    two = CKAAccumulator().update([np.eye(3), np.eye(3)], np.eye(3))
    with pytest.raises(ValueError, match="one feature set per side, got 2 x 1"):
        two.value()


# --------------------------------------------------------------------------- block_outputs
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_block_outputs_match_the_forward_and_a_manual_loop(hc_mult):
    model, hasher = _model(hc_mult)
    x, rows = _inputs(hasher)
    model.train()
    hs = block_outputs(model, x, rows)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert _hooks(model) == 0
    assert len(hs) == model.cfg.n_layers + 1
    assert all(tuple(h.shape) == (2, 12, 32) for h in hs)
    model.eval()
    with torch.no_grad():
        logits = model(x, rows).logits  # (B, T, V)
        torch.testing.assert_close(model.lm_head(model.norm(hs[-1])), logits, rtol=0, atol=1e-6)
        # every entry against the blocks run by hand, branches summed
        h = model.tok_emb(x)  # (B, T, D)
        if hc_mult > 1:
            h = h.unsqueeze(2).expand(2, 12, hc_mult, 32)  # (B, T, M, D)
        expected = [h.sum(2) if hc_mult > 1 else h]
        for i, block in enumerate(model.blocks):
            h, _ = block(h, rows[0] if i in model.layer_ids else None)
            expected.append(h.sum(2) if hc_mult > 1 else h)
    for got, want in zip(hs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_block_outputs_remove_hooks_when_the_forward_fails():
    model, hasher = _model(1)
    x, _rows = _inputs(hasher)
    model.train()
    with pytest.raises(ValueError, match="pass rows of shape"):
        block_outputs(model, x, None)  # an Engram model needs rows
    assert _hooks(model) == 0 and model.training
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        block_outputs(model, x.numpy(), None)


# ------------------------------------------------------------------------------ logit lens
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_logit_lens_matches_kl_div(hc_mult):
    model, hasher = _model(hc_mult)
    batches = [_inputs(hasher, seed=s) for s in range(2)]
    got = logit_lens(model, batches)
    assert got.shape == (model.cfg.n_layers + 1,) and got.dtype == np.float64
    assert got[-1] == 0.0 and (got[:-1] > 0).all()
    # reference: F.kl_div on every token at once, against the model's own final logits
    sums = np.zeros(len(got))
    n = 0
    with torch.no_grad():
        for x, rows in batches:
            target = F.log_softmax(model(x, rows).logits.double(), -1).reshape(-1, V)
            for layer, h in enumerate(block_outputs(model, x, rows)):
                logp = F.log_softmax(model.lm_head(model.norm(h)).double(), -1).reshape(-1, V)
                sums[layer] += float(F.kl_div(logp, target, log_target=True, reduction="sum"))
            n += x.numel()
    np.testing.assert_allclose(got, sums / n, rtol=1e-6, atol=1e-12)
    # the chunking is an implementation detail (up to float32 rounding of the logits: BLAS
    # kernels differ with the number of rows)
    for chunk in (1, 5, 1000):
        np.testing.assert_allclose(logit_lens(model, batches, chunk_tokens=chunk), got, rtol=1e-6)


def test_logit_lens_refuses_bad_input():
    model, _ = _model(1, engram=False)
    with pytest.raises(ValueError, match="got no tokens"):
        logit_lens(model, [])
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1 or None, got 0"):
        kl_sums(model, block_outputs(model, _inputs(None)[0], None), chunk_tokens=0)


# -------------------------------------------------------------------------- trained runs
@pytest.fixture(scope="module")
def loaded(tiny_runs, analysis_cache):
    """Both tiny runs loaded once for this module, and the engram run's validation data."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(analysis_cache))
        parts = {name: load_trained(path)[0] for name, path in tiny_runs.items()}
        return parts, shared_val_data(parts["engram"])


def test_analyze_logit_lens_writes_files_that_agree(tiny_runs, loaded, analysis_env, tmp_path):
    report = analyze_logit_lens(tiny_runs, tmp_path / "lens", max_batches=2)
    assert report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(report.json.read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert set(saved["runs"]) == {"engram", "moe"}
    assert saved["runs"]["engram"]["engram_layer_ids"] == [1]
    assert saved["runs"]["moe"]["engram_layer_ids"] == []
    assert saved["n_batches"] == 2 and saved["n_tokens"] == 2 * 4 * 32
    runs, data = loaded
    for name, run in saved["runs"].items():
        kl = np.array(run["kl"])
        assert run["layers"] == ["emb", "1", "2"] and kl[-1] == 0.0 and (kl[:-1] > 0).all()
        parts = runs[name]  # the same numbers computed directly
        np.testing.assert_allclose(kl, logit_lens(parts.model, val_inputs(parts, data, 2)))


def test_cka_of_two_runs(tiny_runs, loaded, analysis_env, tmp_path):
    report = analyze_cka(tiny_runs["engram"], tiny_runs["moe"], tmp_path / "cka", max_batches=2)
    saved = json.loads(report.json.read_text())
    assert report.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.names == ("tiny-engram", "tiny-moe")
    assert saved["rows"] == saved["cols"] == ["emb", "1", "2"]
    m = np.array(saved["cka"])
    assert m.shape == (3, 3) and ((m >= 0) & (m <= 1 + 1e-12)).all()
    # same run on both sides: a symmetric matrix with ones on the diagonal
    (pe, pm), data = loaded[0].values(), loaded[1]
    self_cka = cka_matrix(pe.model, pe.model, val_inputs(pe, data, 2), val_inputs(pe, data, 2))
    np.testing.assert_allclose(np.diag(self_cka), 1.0, atol=1e-9)
    np.testing.assert_allclose(self_cka, self_cka.T, atol=1e-9)
    # the streamed matrix equals one-shot linear_cka on all tokens at once
    ha, hb = [], []
    for (x, ra), (_, rb) in zip(val_inputs(pe, data, 2), val_inputs(pm, data, 2), strict=True):
        ha.append(block_outputs(pe.model, x, ra)[1].reshape(-1, 32))
        hb.append(block_outputs(pm.model, x, rb)[2].reshape(-1, 32))
    one_shot = linear_cka(torch.cat(ha), torch.cat(hb))
    assert m[1, 2] == pytest.approx(one_shot, rel=1e-9)


def test_runs_must_share_their_tokens(tiny_runs, loaded, analysis_env, tmp_path, monkeypatch):
    runs, data = loaded
    parts = runs["engram"]
    shifted = ((x + 1, r) for x, r in val_inputs(parts, data, 1))
    with pytest.raises(ValueError, match="batch 0: the two models must read the same tokens"):
        cka_matrix(parts.model, parts.model, val_inputs(parts, data, 1), shifted)
    with pytest.raises(ValueError, match="batches_b ended after 1 batches"):
        cka_matrix(parts.model, parts.model, val_inputs(parts, data, 2), val_inputs(parts, data, 1))
    with pytest.raises(ValueError, match="max_batches must be an int >= 1, got 0"):
        analyze_logit_lens(tiny_runs, tmp_path, max_batches=0)
    with pytest.raises(ValueError, match="max_batches must be an int >= 1, got 0"):
        analyze_cka(tiny_runs["engram"], tiny_runs["moe"], tmp_path, max_batches=0)
    with pytest.raises(ValueError, match="run_dirs is empty"):
        analyze_logit_lens({}, tmp_path)

    def fake_load(changes):  # the loaded runs, the moe run altered by `changes`
        by_path = {tiny_runs[name]: p for name, p in runs.items()}
        by_path[tiny_runs["moe"]] = dataclasses.replace(runs["moe"], **changes)
        return lambda path: (by_path[path], None)

    moe_cfg = runs["moe"].cfg
    short = dataclasses.replace(moe_cfg, data=dataclasses.replace(moe_cfg.data, seq_len=16))
    monkeypatch.setattr(hidden, "load_trained", fake_load({"cfg": short}))
    with pytest.raises(ValueError, match=r"run 'moe' has data\.seq_len=16, run 'engram' 32"):
        load_runs(tiny_runs)
    small = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    monkeypatch.setattr(hidden, "load_trained", fake_load({"tokenizer": small}))
    with pytest.raises(ValueError, match="run 'moe' has a tokenizer of 2 ids, run 'engram' one"):
        load_runs(tiny_runs)
    monkeypatch.setattr(hidden, "load_trained", fake_load({}))
    assert list(load_runs(tiny_runs)) == ["engram", "moe"]  # unaltered: accepted
