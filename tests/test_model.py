"""Tests of the backbone (engram.model): agreement with references, accounting, training, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.model import (
    EngramLM,
    HyperConnection,
    ModelConfig,
    MoE,
    ParamCounts,
    RotaryEmbedding,
    count_params,
    flops_per_token,
)

V = 128  # tiny vocab; also the compressed vocab size of the hasher (pad id 0)
D = 32
ENGRAM = EngramConfig(
    engram_vocab_size=(101, 103),
    max_ngram_size=3,
    n_embed_per_ngram=16,
    n_head_per_ngram=2,
    layer_ids=(1,),
    pad_id=0,
)


def tiny(**kwargs: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=V,
        d_model=D,
        n_layers=3,
        n_heads=2,
        max_seq_len=32,
        d_ff=64,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_top_k=2,
        d_expert=16,
    )
    base.update(kwargs)
    return ModelConfig(**base)  # type: ignore[arg-type]


def build(
    cfg: ModelConfig, ecfg: EngramConfig | None = None, seed: int = 0
) -> tuple[EngramLM, NgramHasher | None]:
    if ecfg is None:
        return EngramLM(cfg, seed=seed), None
    hasher = NgramHasher.from_config(ecfg, V, 0)
    sizes = {lid: hasher.flat_table_sizes(lid) for lid in ecfg.layer_ids}
    return EngramLM(cfg, ecfg, sizes, seed=seed), hasher


def rows_for(hasher: NgramHasher | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if hasher is None else hasher.hash_all(idx)  # (L, B, T, H)


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# Configurations shared by several tests: (backbone kwargs, engram config or None).
CONFIGS = {
    "dense": (dict(ffn="dense"), None),
    "moe": (dict(), None),
    "moe_softmax_untied": (dict(router_score="softmax", tie_embeddings=False), None),
    "moe_first_dense": (dict(n_dense_layers=1, n_shared_experts=0), None),
    "hc4": (dict(hc_mult=4), None),
    "hc4_static": (dict(hc_mult=4, hc_dynamic=False, ffn="dense"), None),
    "dense_engram": (dict(ffn="dense"), ENGRAM),
    "moe_engram_noconv": (dict(), dataclasses.replace(ENGRAM, use_short_conv=False)),
    "hc4_engram": (dict(hc_mult=4, n_dense_layers=1), ENGRAM),
    "hc2_engram_2layers": (
        dict(hc_mult=2, tie_embeddings=False),
        dataclasses.replace(ENGRAM, layer_ids=(2, 0), max_ngram_size=2, engram_vocab_size=(97,)),
    ),
}


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(d_model=12, n_heads=4), "must be even for RoPE"),
        (dict(moe_top_k=5), "moe_top_k"),
        (dict(ffn="mlp"), "ffn must be one of"),
        (dict(router_score="relu"), "router_score"),
        (dict(hc_mult=0), "hc_mult"),
        (dict(n_dense_layers=4), "n_dense_layers"),
        (dict(router_bias_update=-1.0), "router_bias_update"),
        (dict(engram_value_init="normal"), "engram_value_init"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_config_dict_roundtrip_and_unknown_keys() -> None:
    cfg = tiny(ffn="moe", n_dense_layers=1, hc_mult=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['bogus'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert cfg.head_dim == 16


# ---------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name", ["dense", "moe", "hc4", "hc4_engram", "dense_engram"])
def test_causal(name: str) -> None:
    kwargs, ecfg = CONFIGS[name]
    model, hasher = build(tiny(**kwargs), ecfg)
    model.eval()
    idx = tokens(2, 20)
    changed = idx.clone()
    t0 = 12
    changed[:, t0:] = (changed[:, t0:] + 1) % V
    with torch.no_grad():
        a = model(idx, rows_for(hasher, idx)).logits
        b = model(changed, rows_for(hasher, changed)).logits
    torch.testing.assert_close(a[:, :t0], b[:, :t0], atol=1e-5, rtol=0)
    assert (a[:, t0] - b[:, t0]).abs().max() > 1e-3


def test_rope_depends_on_relative_position_only() -> None:
    rope = RotaryEmbedding(8, 64)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    s0 = rope(q) @ rope(k).transpose(-1, -2)
    s7 = rope(q, 7) @ rope(k, torch.arange(7, 12)).transpose(-1, -2)
    torch.testing.assert_close(s0, s7, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        rope(q, 60)


# --------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_count_params_matches_modules(name: str) -> None:
    kwargs, ecfg = CONFIGS[name]
    cfg = tiny(**kwargs)
    model, hasher = build(cfg, ecfg)
    table_rows = None
    if ecfg is not None:
        assert hasher is not None
        table_rows = {lid: hasher.total_rows(lid) for lid in ecfg.layer_ids}
    counts = model.param_counts()
    assert count_params(cfg, ecfg, table_rows) == counts
    # Independent of both: every unique parameter tensor (tables are parameters here).
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.table == sum(p.numel() for p in model.table_parameters())
    assert counts.embedding == V * D
    assert counts.inactive == cfg.n_moe_layers * (4 - 2) * 3 * D * 16
    assert counts.active == counts.total - counts.table - counts.inactive
    if ecfg is None:
        assert counts.table == counts.engram_dense == 0


def test_count_params_needs_table_rows() -> None:
    with pytest.raises(ValueError, match=r"table_rows is required.*total_rows"):
        count_params(tiny(), ENGRAM, None)
    with pytest.raises(ValueError, match=r"table_rows is missing Engram layers \[1\]"):
        count_params(tiny(), ENGRAM, {0: 10})
    with pytest.raises(ValueError, match=r"table_sizes is required.*flat_table_sizes"):
        EngramLM(tiny(), ENGRAM)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_flops_per_token_matches_flop_counter(name: str) -> None:
    """Every weight matmul is counted by torch's FlopCounterMode (SDPA on CPU is not, so the
    analytic attention term is removed); MoE dispatch runs exactly k experts per token."""
    kwargs, ecfg = CONFIGS[name]
    cfg = tiny(**kwargs)
    model, hasher = build(cfg, ecfg)
    B, T = 2, 16
    idx = tokens(B, T)
    rows = rows_for(hasher, idx)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(idx, rows)
    attention = 2 * cfg.n_layers * T * cfg.d_model
    conv = 0
    if ecfg is not None and ecfg.use_short_conv:
        # The short conv runs as shifted multiply-adds (engram.layer), which the counter does
        # not see: count the grouped conv1d it equals, as torch counts it.
        C, K, dil = cfg.hc_mult * cfg.d_model, ecfg.kernel_size, ecfg.max_ngram_size
        with FlopCounterMode(display=False) as conv_counter:
            F.conv1d(torch.zeros(B, C, T + (K - 1) * dil), torch.zeros(C, 1, K), dilation=dil,
                     groups=C)  # fmt: skip
        conv = len(ecfg.layer_ids) * conv_counter.get_total_flops()
    assert counter.get_total_flops() + conv == B * T * (flops_per_token(cfg, ecfg, T) - attention)


def test_tied_embeddings_share_the_weight() -> None:
    tied, _ = build(tiny())
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert sum(p is tied.tok_emb.weight for p in tied.dense_parameters()) == 1
    untied, _ = build(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.param_counts().total == tied.param_counts().total + V * D
    sd = untied.state_dict()
    assert not torch.equal(sd["lm_head.weight"], sd["tok_emb.weight"])


def test_state_dict_has_router_bias_not_buffers_of_pure_functions() -> None:
    model, _ = build(tiny())
    keys = set(model.state_dict())
    assert "blocks.0.ffn.router_bias" in keys
    assert not any("load_counts" in k or "rope" in k for k in keys)


# -------------------------------------------------------------------------------------- MoE
def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: top-k on score + bias, weights from unbiased scores, explicit SwiGLU."""

    def swiglu(m: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
        return m.w2.weight @ (F.silu(m.w1.weight @ v) * (m.w3.weight @ v))

    out = []
    for v in x.reshape(-1, x.shape[-1]):
        logits = moe.router.weight @ v
        scores = logits.softmax(-1) if moe.score_fn == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores + moe.router_bias, moe.top_k).indices
        w = scores[chosen]
        if moe.score_fn == "sigmoid":
            w = w / w.sum()
        y = sum(w[j] * swiglu(moe.experts[int(e)], v) for j, e in enumerate(chosen))
        if moe.shared is not None:
            y = y + swiglu(moe.shared, v)
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize(
    ("score", "n_shared", "top_k"), [("sigmoid", 1, 2), ("softmax", 0, 3), ("sigmoid", 2, 1)]
)
def test_moe_matches_naive_loop(score: str, n_shared: int, top_k: int) -> None:
    torch.manual_seed(0)
    cfg = tiny(router_score=score, n_shared_experts=n_shared, moe_top_k=top_k, n_routed_experts=6)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        moe.router_bias.copy_(torch.randn(6) * 0.3)
    x = torch.randn(3, 7, D)
    y, aux = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert aux.item() > 0


def test_router_bias_changes_selection_not_weights() -> None:
    torch.manual_seed(1)
    moe = MoE(tiny(n_routed_experts=6, moe_top_k=2))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    x = torch.randn(40, D)
    before = moe.route(x)
    with torch.no_grad():
        moe.router_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
    after = moe.route(x)
    assert torch.equal(before.scores, after.scores)  # the bias never enters the scores
    assert not torch.equal(before.indices, after.indices)
    assert torch.equal(after.indices.sort(-1).values, torch.tensor([[4, 5]]).expand(40, 2))
    picked = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.weights, picked / picked.sum(-1, keepdim=True))


def test_update_router_bias_moves_toward_underloaded_experts() -> None:
    torch.manual_seed(2)
    moe = MoE(tiny(n_routed_experts=4, moe_top_k=1))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
    x = torch.randn(2, 50, D)
    moe.eval()
    moe(x)
    assert moe.load_counts.sum() == 0  # eval forwards are not counted
    moe.train()
    moe(x)
    load = moe.load_counts.clone()
    assert load.sum() == 100 and load.max() > load.min()
    moe.update_router_bias(0.1)
    torch.testing.assert_close(moe.router_bias, 0.1 * torch.sign(load.mean() - load))
    assert moe.load_counts.sum() == 0
    bias, mean = moe.router_bias, load.mean()
    assert (bias[load < mean] > 0).all() and (bias[load > mean] < 0).all()
    assert (bias[load == mean] == 0).all()
    # Repeated updates balance the load.
    for _ in range(40):
        moe(x)
        moe.update_router_bias(0.02)
    moe(x)
    assert moe.load_counts.max() - moe.load_counts.min() < load.max() - load.min()


def test_model_update_router_biases_rate_zero_is_noop() -> None:
    model, _ = build(tiny(router_bias_update=0.0))
    model(tokens(2, 8))
    model.update_router_biases()
    assert all(moe.router_bias.abs().sum() == 0 for moe in model.moe_layers())


def test_aux_loss_moe_positive_dense_zero() -> None:
    idx = tokens(2, 16)
    moe_model, _ = build(tiny())
    aux = moe_model(idx).aux_loss
    assert aux.item() > 0 and aux.requires_grad
    assert build(tiny(ffn="dense"))[0](idx).aux_loss.item() == 0
    assert build(tiny(aux_loss_coef=0.0))[0](idx).aux_loss.item() == 0


# ---------------------------------------------------------------------------- hyper-connections
def reference_hc(hc: HyperConnection, H: torch.Tensor, f) -> torch.Tensor:
    """Zhu et al. written out with explicit loops over branches."""
    M = hc.hc_mult
    if hc.dynamic:
        n = H * torch.rsqrt(H.pow(2).mean(-1, keepdim=True) + hc.norm.eps) * hc.norm.weight
        alpha = hc.static_alpha + hc.alpha_scale * torch.tanh(n @ hc.dynamic_alpha)
        beta = hc.static_beta + hc.beta_scale * torch.tanh((n * hc.dynamic_beta).sum(-1))
    else:
        alpha = hc.static_alpha.expand(*H.shape[:2], M, M + 1)
        beta = hc.static_beta.expand(*H.shape[:2], M)
    x = sum(alpha[..., m, 0, None] * H[:, :, m] for m in range(M))
    y = f(x)
    out = []
    for j in range(M):
        res = sum(alpha[..., m, 1 + j, None] * H[:, :, m] for m in range(M))
        out.append(beta[..., j, None] * y + res)
    return torch.stack(out, dim=2)


@pytest.mark.parametrize("dynamic", [True, False])
def test_hyper_connection_matches_reference(dynamic: bool) -> None:
    torch.manual_seed(3)
    M = 4
    hc = HyperConnection(D, M, layer_index=5, dynamic=dynamic)
    H = torch.randn(2, 6, M, D)
    lin = torch.nn.Linear(D, D)
    # At init: input = branch layer_index mod M, residual = H, output added to every branch.
    x, ctx = hc.width(H)
    torch.testing.assert_close(x, H[:, :, 5 % M])
    torch.testing.assert_close(ctx.residual, H)
    torch.testing.assert_close(hc(H, lin), H + lin(H[:, :, 1]).unsqueeze(2))
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.5 * torch.randn_like(p))
    torch.testing.assert_close(hc(H, lin), reference_hc(hc, H, lin), atol=1e-5, rtol=1e-5)


def test_engram_receives_branches_with_hyper_connections() -> None:
    model, hasher = build(tiny(hc_mult=4), ENGRAM)
    seen = []
    engram = model.engram_layers()[1]
    engram.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape, out.shape)))
    idx = tokens(2, 10)
    model(idx, rows_for(hasher, idx))
    assert seen == [((2, 10, 4, D), (2, 10, 4, D))]
    assert engram.hc_mult == 4 and len(engram.key_projs) == 4


# --------------------------------------------------------------------------------- errors
def test_engram_rows_errors() -> None:
    model, hasher = build(tiny(), ENGRAM)
    idx = tokens(2, 10)
    rows = rows_for(hasher, idx)
    assert rows is not None
    with pytest.raises(ValueError, match=r"pass rows of shape \(L, B, T, H\) = \(1, 2, 10, 4\)"):
        model(idx)
    with pytest.raises(ValueError, match=r"got \(2, 10, 4\)"):
        model(idx, rows[0])
    with pytest.raises(ValueError, match=r"got \(1, 2, 9, 4\)"):
        model(idx, rows[:, :, :9])
    with pytest.raises(ValueError, match="no Engram layers"):
        build(tiny())[0](idx, rows)


def test_layer_ids_out_of_range_names_zero_based() -> None:
    ecfg = dataclasses.replace(ENGRAM, layer_ids=(1, 3))
    with pytest.raises(ValueError, match=r"layer_ids \[3\].*0-based"):
        build(tiny(n_layers=3), ecfg)


def test_sequence_longer_than_max_seq_len() -> None:
    model, _ = build(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(tokens(1, 9))


def test_mask_all_live_equals_no_mask_and_dead_rows_are_ignored() -> None:
    model, hasher = build(tiny(), ENGRAM)
    model.eval()
    idx = tokens(2, 12)
    rows = rows_for(hasher, idx)
    assert rows is not None
    with torch.no_grad():
        ref = model(idx, rows).logits
        live = torch.ones(2, 12, dtype=torch.bool)
        torch.testing.assert_close(model(idx, rows, mask=live).logits, ref, rtol=0, atol=0)
        live[:, 8:] = False
        rows[:, :, 8:] = -1  # padding sentinels are fine under the mask
        torch.testing.assert_close(model(idx, rows, mask=live).logits[:, :8], ref[:, :8])


# -------------------------------------------------------------------------------- training
def test_training_reduces_loss_with_sparse_tables() -> None:
    torch.manual_seed(0)
    model, hasher = build(tiny(hc_mult=2), ENGRAM)
    tables, dense = model.table_parameters(), model.dense_parameters()
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert tables and set(ids(tables)).isdisjoint(ids(dense))
    assert sorted(ids(tables) + ids(dense)) == sorted(ids(model.parameters()))

    seq = tokens(1, 25, seed=5)
    idx, targets = seq[:, :-1].repeat(4, 1), seq[:, 1:].repeat(4, 1)
    rows = rows_for(hasher, idx)
    opt_dense = torch.optim.AdamW(dense, lr=3e-3)
    opt_table = torch.optim.SparseAdam(tables, lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(idx, rows, targets)
        assert out.loss is not None
        (out.loss + out.aux_loss).backward()
        for p in tables:
            assert p.grad is not None and p.grad.is_sparse
        assert all(p.grad is None or not p.grad.is_sparse for p in dense)
        opt_dense.step()
        opt_table.step()
        opt_dense.zero_grad(set_to_none=True)
        opt_table.zero_grad(set_to_none=True)
        model.update_router_biases()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert any(moe.router_bias.abs().sum() > 0 for moe in model.moe_layers())


def test_table_gradient_touches_only_looked_up_rows() -> None:
    model, hasher = build(tiny(ffn="dense"), ENGRAM)
    idx = tokens(2, 10)
    rows = rows_for(hasher, idx)
    assert rows is not None
    model(idx, rows, targets=idx).loss.backward()
    (table,) = model.table_parameters()
    assert table.grad is not None and table.grad.is_sparse
    touched = set(table.grad.coalesce().indices()[0].tolist())
    engram = model.engram_layers()[1]
    assert touched == set((rows[0] + engram.offsets).flatten().tolist())


def test_same_seed_bit_identical() -> None:
    cfg = tiny(hc_mult=2)
    idx = tokens(2, 12)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a, hasher = build(cfg, ENGRAM, seed=7)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG is untouched
    b, _ = build(cfg, ENGRAM, seed=7)
    c, _ = build(cfg, ENGRAM, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    rows = rows_for(hasher, idx)
    la, lb = a(idx, rows, idx).loss, b(idx, rows, idx).loss
    assert la is not None and lb is not None and la.item() == lb.item()


def test_engram_layers_are_not_reinitialised() -> None:
    model, hasher = build(tiny(), ENGRAM)
    engram = model.engram_layers()[1]
    assert engram.short_conv is not None and engram.short_conv.conv.weight.abs().sum() == 0
    assert hasher is not None
    # The table is exactly what the Engram layer's own seed draws (std 1), not init_std.
    gen = torch.Generator().manual_seed(ENGRAM.seed + 1)
    expected = torch.empty(hasher.total_rows(1), ENGRAM.head_dim).normal_(0.0, 1.0, generator=gen)
    torch.testing.assert_close(model.table_parameters()[0].detach(), expected, rtol=0, atol=0)
    assert isinstance(model.param_counts(), ParamCounts)


@pytest.mark.parametrize("value_init", ["zero", "reference"])
def test_engram_value_init(value_init: str) -> None:
    """ "zero": the value projection starts at 0, so the Engram model computes its backbone's
    function; "reference": PyTorch's nn.Linear default, like the keys (the demo's init)."""
    model, hasher = build(tiny(engram_value_init=value_init), ENGRAM)
    layer = model.engram_layers()[1]
    bound = 1.0 / ENGRAM.memory_dim**0.5
    for proj in layer.key_projs:
        assert 0.8 * bound < float(proj.weight.detach().abs().max()) <= bound
    value = [layer.value_proj.weight.detach(), layer.value_proj.bias.detach()]
    if value_init == "zero":
        assert all(float(v.abs().max()) == 0.0 for v in value)
    else:
        assert all(0.8 * bound < float(v.abs().max()) <= bound for v in value)
    idx = tokens(2, 8)
    with torch.no_grad():
        y = model(idx, rows_for(hasher, idx)).logits
        for v in value:
            v.zero_()  # Engram writes nothing into the residual stream
        silent = model(idx, rows_for(hasher, idx)).logits
    assert torch.equal(y, silent) == (value_init == "zero")
