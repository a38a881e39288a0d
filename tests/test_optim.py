"""Optimizer groups, the schedule, sparse table updates and dense-only clipping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.model import EngramLM, ModelConfig
from engram.optim import OptimConfig, build_optimizer, lr_multiplier


def _model():
    ecfg = EngramConfig(engram_vocab_size=(101, 103), n_embed_per_ngram=16, n_head_per_ngram=2,
                        layer_ids=(1,), pad_id=0)  # fmt: skip
    hasher = NgramHasher.from_config(ecfg, 64, 0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                      n_routed_experts=4, d_expert=8)  # fmt: skip
    model = EngramLM(cfg, ecfg, {1: hasher.flat_table_sizes(1)}, seed=0)
    return model, hasher


def test_schedule_warmup_then_cosine_to_floor():
    m = [lr_multiplier(s, 100, 10, 0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(m[:10]))
    assert all(a >= b for a, b in itertools.pairwise(m[9:]))
    assert m[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_multiplier(55, 100, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_groups_partition_parameters_and_settings():
    model, _ = _model()
    cfg = OptimConfig(lr=1e-3, table_lr_mult=5.0, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    decay, no_decay = opt.dense.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert isinstance(opt.table, torch.optim.SparseAdam)
    assert opt.table.param_groups[0]["lr"] == pytest.approx(5e-3)
    ids = [id(p) for g in opt.dense.param_groups + opt.table.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    opt.set_lr(0.5)
    assert decay["lr"] == pytest.approx(5e-4)
    assert opt.table.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_partition_assert_catches_foreign_table():
    model, _ = _model()
    foreign = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(AssertionError, match="partition"):
        build_optimizer(model, OptimConfig(), table_params=[foreign])


def test_one_step_updates_only_touched_rows_and_clips_dense_only():
    model, hasher = _model()
    with torch.no_grad():  # the value projection starts at zero; give the table a gradient now
        model.engram_layers()[1].value_proj.weight.normal_(0.0, 0.02)
    opt = build_optimizer(model, OptimConfig(grad_clip=1e-3))
    idx = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    rows = torch.as_tensor(hasher.hash_all(idx.numpy()))
    table = model.table_parameters()[0]
    before = table.detach().clone()
    out = model(idx, rows, targets=idx.roll(-1, 1))
    (out.loss * 1000).backward()
    assert table.grad.is_sparse
    norm = opt.clip_grad_norm()
    dense_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in opt.dense_parameters() if p.grad is not None])
    )
    assert norm > 1e-3 and float(dense_norm) == pytest.approx(1e-3, rel=1e-3)
    opt.step()
    touched = set((rows[0] + model.engram_layers()[1].offsets).flatten().tolist())
    changed = set((table.detach() != before).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= touched


def test_state_dict_round_trip():
    model, hasher = _model()
    opt = build_optimizer(model, OptimConfig())
    idx = torch.randint(1, 64, (2, 8))
    out = model(idx, torch.as_tensor(hasher.hash_all(idx.numpy())), targets=idx)
    out.loss.backward()
    opt.step()
    state = opt.state_dict()
    again = build_optimizer(model, OptimConfig())
    again.load_state_dict(state)
    assert again.state_dict()["table"]["state"].keys() == state["table"]["state"].keys()
    with pytest.raises(ValueError, match="parts"):
        again.load_state_dict({"dense": state["dense"]})
