"""Optimizers for an Engram language model: dense AdamW plus a row-wise sparse Adam for tables.

Design choices:
- Two optimizers behind one small object, because the two parameter kinds need different
  machinery, not just different hyper-parameters (SPEC section 5):
  * dense backbone parameters: `torch.optim.AdamW`, weight decay on matrices (dim >= 2, which
    includes the token embedding) and none on vectors (norm gains, biases, router bias is a
    buffer and not a parameter at all);
  * Engram tables: SparseAdam at `table_lr_mult` (5x) the base learning rate and no weight
    decay. The tables produce sparse COO gradients (`MemoryRowStore(sparse=True)`), and
    SparseAdam updates the moments and values of the rows present in the gradient only ("lazy"
    Adam). Its moment buffers have the table's shape (Adam needs per-row state), but are only
    ever read and written at touched rows: the optimizer is `engram.rowadam.RowSparseAdam`, a
    `torch.optim.SparseAdam` with the same update and state whose step costs O(rows touched)
    (PyTorch's CPU SparseAdam makes full-table passes: 6 of its 7.9 ms per demo step).
- `build_optimizer` asserts that every parameter of the model is in exactly one group: a
  parameter left out would silently never train, one counted twice would be stepped twice.
- The schedule is a pure function of the step (linear warmup, cosine decay to a floor), so a
  resumed run recomputes exactly the learning rate an uninterrupted run would have used.
- Tables trained on disk (`engram.store.trainable.DiskTrainedStore`, `train.table_store="mmap"`)
  have no parameter: they collect their row gradients themselves and apply the same SparseAdam
  update in `adam_step`, at the table learning rate, when this object steps.
- Gradient clipping covers the dense parameters only. Table rows are each normalised by Adam's
  per-row second moment; folding their (batch-dependent) sparse norm into the global norm would
  let the number of rows a batch happens to touch change the size of every dense step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from engram.rowadam import RowSparseAdam


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters of both optimizers and the schedule."""

    # Peak learning rate of the dense AdamW (tables get lr * table_lr_mult).
    lr: float = 3e-3
    # Tables learn at this multiple of the base learning rate (the paper: 5x); 0 freezes them
    # at their init (the frozen-table control: no gradient, no optimizer state).
    table_lr_mult: float = 5.0
    # AdamW decoupled weight decay on dense matrices (never on vectors or tables).
    weight_decay: float = 0.1
    # Adam betas, shared by both optimizers.
    beta1: float = 0.9
    beta2: float = 0.95
    # Adam epsilon, shared by both optimizers.
    eps: float = 1e-8
    # Linear warmup length in optimizer steps.
    warmup_steps: int = 20
    # The cosine decays to lr * min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    # Max global L2 norm of the dense gradients (0 disables clipping).
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("lr", "table_lr_mult", "weight_decay", "eps", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def frozen_tables(self) -> bool:
        """Whether the tables stay at their init (`table_lr_mult == 0`)."""
        return self.table_lr_mult == 0


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor in (0, 1] at 0-based `step`: linear warmup, then cosine to the floor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class DiskTable(Protocol):
    """A table that applies its own row-wise Adam update (see `engram.store.trainable`)."""

    def adam_step(self, lr: float, betas: tuple[float, float], eps: float) -> int: ...

    def zero_grad(self) -> None: ...


class EngramOptimizer:
    """AdamW on dense parameters and SparseAdam on tables, stepped and scheduled together."""

    def __init__(
        self,
        dense: torch.optim.AdamW,
        table: torch.optim.SparseAdam | None,
        cfg: OptimConfig,
        disk_tables: Sequence[DiskTable] = (),
    ) -> None:
        self.dense = dense
        self.table = table
        self.cfg = cfg
        self.disk_tables = list(disk_tables)
        self.table_lr = cfg.lr * cfg.table_lr_mult

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out: dict[str, torch.optim.Optimizer] = {"dense": self.dense}
        if self.table is not None:
            out["table"] = self.table
        return out

    def dense_parameters(self) -> list[nn.Parameter]:
        """The dense optimizer's backbone parameters (a dense-gradient table's group excluded)."""
        return [p for g in self.dense.param_groups if not g.get("table") for p in g["params"]]

    def set_lr(self, multiplier: float) -> None:
        """Set every group to its base rate times `multiplier` (the schedule's factor)."""
        self.table_lr = self.cfg.lr * self.cfg.table_lr_mult * multiplier
        for group in self.dense.param_groups:
            group["lr"] = self.table_lr if group.get("table") else self.cfg.lr * multiplier
        if self.table is not None:
            for group in self.table.param_groups:
                group["lr"] = self.table_lr

    def clip_grad_norm(self) -> float:
        """Clip dense gradients to `grad_clip` (if > 0); returns their norm before clipping."""
        params = [p for p in self.dense_parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self) -> None:
        self.dense.step()
        if self.table is not None:
            self.table.step()
        betas = (self.cfg.beta1, self.cfg.beta2)
        for t in self.disk_tables:
            t.adam_step(self.table_lr, betas, self.cfg.eps)

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        if self.table is not None:
            self.table.zero_grad(set_to_none=True)
        for t in self.disk_tables:
            t.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = set(self.optimizers)
        if set(state) != names:
            raise ValueError(
                f"optimizer state has parts {sorted(state)}, this optimizer has {sorted(names)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    table_params: Iterable[nn.Parameter] | None = None,
) -> EngramOptimizer:
    """Group `model`'s parameters and build the optimizers.

    `table_params` defaults to `model.table_parameters()` when the model has that method.
    Raises `AssertionError` if the groups do not partition `model.parameters()` exactly.
    With `cfg.frozen_tables` the table parameters stop requiring gradients and no optimizer
    holds them (nor steps a table that updates itself).

    A table whose module has `sparse=False` (e.g. `MemoryRowStore(sparse=False)`, or an
    `nn.Embedding`) produces dense gradients, which SparseAdam refuses: it gets dense Adam in its
    own group of the dense optimizer (weight decay 0, the table learning rate, marked
    `"table": True`), outside gradient clipping like every table. Its Adam moments are dense too,
    and every row moves every step (momentum): meant for small tables.
    """
    if table_params is None:
        getter = getattr(model, "table_parameters", None)
        table_params = getter() if callable(getter) else []
    tables = _unique(table_params)
    table_ids = {id(p) for p in tables}
    dense_grad_ids = {
        id(p)
        for m in model.modules()
        if getattr(m, "sparse", None) is False
        for p in m.parameters(recurse=False)
    }
    dense_tables = [p for p in tables if id(p) in dense_grad_ids]
    tables = [p for p in tables if id(p) not in dense_grad_ids]
    everything = _unique(model.parameters())
    dense = [p for p in everything if id(p) not in table_ids]
    decay = [p for p in dense if p.dim() >= 2]
    no_decay = [p for p in dense if p.dim() < 2]

    groups = [decay, no_decay, tables, dense_tables]
    counts: dict[int, int] = {}
    for group in groups:
        for p in group:
            counts[id(p)] = counts.get(id(p), 0) + 1
    model_ids = {id(p) for p in everything}
    assert set(counts) == model_ids and all(c == 1 for c in counts.values()), (
        "optimizer groups must partition the model's parameters: "
        f"{sum(c != 1 for c in counts.values())} parameter(s) in several groups, "
        f"{len(model_ids - set(counts))} missing, {len(set(counts) - model_ids)} foreign"
    )

    betas = (cfg.beta1, cfg.beta2)
    dense_groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if dense_tables and not cfg.frozen_tables:
        dense_groups.append(
            {"params": dense_tables, "weight_decay": 0.0, "lr": cfg.lr * cfg.table_lr_mult,
             "table": True}
        )  # fmt: skip
    dense_opt = torch.optim.AdamW(dense_groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    if cfg.frozen_tables:
        for p in tables + dense_tables:
            p.requires_grad_(False)
    table_opt = (
        RowSparseAdam(tables, lr=cfg.lr * cfg.table_lr_mult, betas=betas, eps=cfg.eps)
        if tables and not cfg.frozen_tables
        else None
    )
    layers = getattr(model, "engram_layers", None)
    disk = [] if not callable(layers) or cfg.frozen_tables else [
        e.store for e in layers().values() if hasattr(e.store, "adam_step")
    ]  # fmt: skip
    return EngramOptimizer(dense_opt, table_opt, cfg, disk)
