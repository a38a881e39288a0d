"""The allocation planner: equal totals and active FLOPs within 1%, rho honoured, errors named."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engram.hashing import NgramHasher
from engram.model import EngramLM, ModelConfig, count_params
from engram.plan import PlanError, format_plan, plan_allocation
from engram.presets import engram_template

V_PRIME, PAD = 32962, 32961


def _base(**kw):
    return ModelConfig(vocab_size=50257, d_model=128, n_layers=4, n_heads=4, max_seq_len=128,
                       n_routed_experts=32, moe_top_k=2, d_expert=128, **kw)  # fmt: skip


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75, 0.875])
def test_plan_matches_params_and_flops(rho):
    plan = plan_allocation(_base(), engram_template(), rho, compressed_vocab_size=V_PRIME,
                           pad_id=PAD, seq_len=128)  # fmt: skip
    assert abs(plan.param_gap) < 0.01 and abs(plan.flops_gap) < 0.01
    assert plan.model.moe_top_k == plan.baseline.moe_top_k
    assert abs(plan.achieved_rho - rho) <= 0.5 / 30 + 1e-9  # one expert of rounding
    # The table really holds the rest of the budget, in rows of distinct primes.
    hasher = NgramHasher.from_config(plan.engram, V_PRIME, PAD)
    rows = {lid: hasher.total_rows(lid) for lid in plan.engram.layer_ids}
    assert rows == plan.table_rows
    assert plan.counts.table == sum(rows.values()) * plan.engram.head_dim
    assert plan.counts == count_params(plan.model, plan.engram, rows)
    assert "total params" in format_plan(plan)
    d = plan.to_dict()
    assert d["engram"]["model"]["n_routed_experts"] == plan.model.n_routed_experts


def test_plan_counts_equal_a_built_model():
    base = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                       n_routed_experts=8, moe_top_k=2, d_expert=32)  # fmt: skip
    template = replace(engram_template((1,)), n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=0)
    plan = plan_allocation(base, template, 0.5, compressed_vocab_size=300, pad_id=0, seq_len=32,
                           tolerance=0.1)  # fmt: skip
    hasher = NgramHasher.from_config(plan.engram, 300, 0)
    model = EngramLM(plan.model, plan.engram, {1: hasher.flat_table_sizes(1)})
    assert model.param_counts() == plan.counts
    baseline = EngramLM(base)
    assert baseline.param_counts().total == plan.baseline_counts.total
    assert abs(model.param_counts().total / baseline.param_counts().total - 1) < 0.01


def test_plan_errors_are_named():
    kw = dict(compressed_vocab_size=V_PRIME, pad_id=PAD, seq_len=128)
    with pytest.raises(PlanError, match="rho must be in"):
        plan_allocation(_base(), engram_template(), 1.5, **kw)
    with pytest.raises(PlanError, match="must be an MoE"):
        plan_allocation(_base(ffn="dense"), engram_template(), 0.5, **kw)
    with pytest.raises(PlanError, match="too small"):
        plan_allocation(_base(), engram_template(), 1.0, **kw)
    # A tiny vocabulary and backbone: the Engram projections alone add >1% active FLOPs.
    tiny = replace(_base(), vocab_size=64, d_model=32, n_heads=2, d_expert=32, n_routed_experts=64)
    with pytest.raises(PlanError, match=r"active FLOPs differ by \+"):
        plan_allocation(tiny, engram_template(n_embed_per_ngram=64), 0.5, **kw)


def test_plan_reports_table_and_optimizer_memory():
    """Adam's moments for a table of R rows are two more tables' worth, and the plan says so:
    its figure equals the state SparseAdam really holds for a built model after one step."""
    import torch

    from engram.optim import OptimConfig, build_optimizer
    from engram.plan import format_bytes, optimizer_bytes, table_bytes

    base = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                       n_routed_experts=8, moe_top_k=2, d_expert=32)  # fmt: skip
    template = replace(engram_template((1,)), n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=0)
    plan = plan_allocation(base, template, 0.5, compressed_vocab_size=300, pad_id=0, seq_len=32,
                           tolerance=0.1)  # fmt: skip
    dh = plan.engram.head_dim
    assert plan.table_bytes == {1: plan.table_rows[1] * dh * 4}
    assert plan.optimizer_bytes == {1: 2 * plan.table_bytes[1]}
    assert optimizer_bytes(10, 8) == 2 * table_bytes(10, 8) == 640
    d = plan.to_dict()["engram"]
    assert d["optimizer_bytes"] == {"1": plan.optimizer_bytes[1]}
    assert d["total_optimizer_bytes"] == plan.optimizer_bytes[1]
    text = format_plan(plan)
    assert "optimizer memory (Adam)" in text and format_bytes(plan.optimizer_bytes[1]) in text
    assert "table memory (fp32)" in text and format_bytes(plan.table_bytes[1]) in text
    assert (format_bytes(512), format_bytes(1536), format_bytes(3 * 2**30)) == (
        "512 B", "1.5 KiB", "3.0 GiB",
    )  # fmt: skip

    hasher = NgramHasher.from_config(plan.engram, 300, 0)
    model = EngramLM(plan.model, plan.engram, {1: hasher.flat_table_sizes(1)})
    opt = build_optimizer(model, OptimConfig())
    idx = torch.randint(1, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    model(idx, torch.as_tensor(hasher.hash_all(idx.numpy())), targets=idx).loss.backward()
    opt.step()
    held = sum(
        t.numel() * t.element_size()
        for state in opt.table.state.values()
        for t in state.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    assert held == plan.optimizer_bytes[1]


def test_plan_memory_sums_over_layers():
    plan = plan_allocation(_base(), engram_template((1, 2)), 0.5, compressed_vocab_size=V_PRIME,
                           pad_id=PAD, seq_len=128, tolerance=0.05)  # fmt: skip
    assert set(plan.optimizer_bytes) == {1, 2}
    d = plan.to_dict()["engram"]
    assert d["total_optimizer_bytes"] == sum(plan.optimizer_bytes.values())
    assert d["total_table_bytes"] * 2 == d["total_optimizer_bytes"]
    assert " + " in format_plan(plan)  # per layer, then the total
