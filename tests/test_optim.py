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


def _dense_grad_layer():
    """A bare Engram layer whose table gives dense gradients (`sparse=False`)."""
    from engram.layer import Engram

    torch.manual_seed(0)
    layer = Engram(16, (11, 13, 17, 19), 4, 3, sparse=False, table_std=0.1)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=gen)
    rows = torch.stack([torch.randint(0, s, (2, 9), generator=gen) for s in (11, 13, 17, 19)], -1)
    target = torch.randn(2, 9, 16, generator=gen)
    return layer, hidden, rows, target


def test_dense_gradient_table_gets_dense_adam_at_the_table_lr():
    layer, hidden, rows, target = _dense_grad_layer()
    cfg = OptimConfig(lr=1e-3, table_lr_mult=5.0, grad_clip=1e-3)
    opt = build_optimizer(layer, cfg)
    table = layer.table_parameters()[0]
    assert opt.table is None  # SparseAdam refuses dense gradients: no sparse table here
    groups = [g for g in opt.dense.param_groups if g.get("table")]
    assert len(groups) == 1 and groups[0]["params"] == [table]
    assert groups[0]["weight_decay"] == 0.0 and groups[0]["lr"] == pytest.approx(5e-3)
    assert all(p is not table for p in opt.dense_parameters())  # not clipped with the backbone
    opt.set_lr(0.5)
    assert groups[0]["lr"] == pytest.approx(2.5e-3)
    assert opt.dense.param_groups[0]["lr"] == pytest.approx(5e-4)

    # one step moves the table (the clip of the dense gradients does not shrink its update)
    opt.set_lr(1.0)
    before = table.detach().clone()
    ((layer(hidden, rows) - target) ** 2).mean().backward()
    assert table.grad is not None and not table.grad.is_sparse
    opt.clip_grad_norm()
    opt.step()
    touched = torch.unique(layer.global_rows(rows)).tolist()
    moved = (table.detach() - before).abs().amax(dim=1)
    assert float(moved[touched].min()) == pytest.approx(5e-3, rel=1e-2)  # Adam's first step: lr


def test_dense_gradient_table_trains_loss_decreases():
    layer, hidden, rows, target = _dense_grad_layer()
    opt = build_optimizer(layer, OptimConfig(lr=1e-2, table_lr_mult=5.0, weight_decay=0.0))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ((layer(hidden, rows) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_dense_gradient_table_frozen_and_state_round_trip():
    layer, hidden, rows, target = _dense_grad_layer()
    frozen = build_optimizer(layer, OptimConfig(table_lr_mult=0.0))
    assert not layer.table_parameters()[0].requires_grad
    assert not [g for g in frozen.dense.param_groups if g.get("table")]

    layer, hidden, rows, target = _dense_grad_layer()
    opt = build_optimizer(layer, OptimConfig())
    ((layer(hidden, rows) - target) ** 2).mean().backward()
    opt.step()
    again = build_optimizer(layer, OptimConfig())
    again.load_state_dict(opt.state_dict())
    assert [g.get("table", False) for g in again.dense.param_groups] == [False, False, True]


@pytest.mark.parametrize("maximize", [False, True])
def test_row_sparse_adam_is_sparse_adam_bit_for_bit(maximize: bool) -> None:
    """RowSparseAdam (the tables' optimizer) gives torch.optim.SparseAdam's rows and moments
    exactly, with duplicate rows in a batch and rows left untouched, and the same state_dict."""
    import torch.nn.functional as F

    from engram.rowadam import RowSparseAdam

    gen = torch.Generator().manual_seed(0)
    init = torch.randn(500, 8, generator=gen)
    ref, row = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, maximize=maximize)
    opts = [(ref, torch.optim.SparseAdam([ref], **kw)), (row, RowSparseAdam([row], **kw))]
    for _ in range(12):
        ids = torch.randint(0, 300, (16, 9), generator=gen)  # rows 300.. never touched
        g = torch.randn(16, 9, 8, generator=gen)
        for p, opt in opts:
            (F.embedding(ids, p, sparse=True) * g).sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(ref, row)
    assert torch.equal(row[300:], init[300:])
    a, b = opts[0][1].state_dict(), opts[1][1].state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"][0]["step"] == b["state"][0]["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["state"][0][key], b["state"][0][key])
    fresh = RowSparseAdam([nn.Parameter(init.clone())], **kw)
    fresh.load_state_dict(a)  # a SparseAdam checkpoint continues in RowSparseAdam
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], a["state"][0]["exp_avg"])


def test_row_sparse_adam_refuses_dense_gradients() -> None:
    from engram.rowadam import RowSparseAdam

    p = nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        RowSparseAdam([p]).step()
