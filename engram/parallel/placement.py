"""Where a run's tables live and how its dense model is wrapped, decided in one place.

`place` is the one function that applies a run's tier and distribution choices to the model
the trainer builds (torchtitan's `parallelize_fn`, called from outside the training loop):

- tables in RAM (the default: ordinary parameters, SparseAdam),
- tables on disk (`train.table_store="mmap"`: `engram.store.trainable.DiskTrainedStore`, fresh
  files or copies of the checkpoint's),
- tables row-sharded over the ranks of a distributed run (`engram.store.sharded.ShardedRowStore`),
  with the dense parameters in DDP and the MoE counts synchronised (see `parallelize`),
- and `torch.compile` when asked.

It returns a `Placed`: the model on its device, the module to call forward on, and the few
operations whose meaning depends on the placement (skip DDP's all-reduce on a micro-batch, the
global mean of the logged losses, the after-step synchronisation, communication counters,
saving and loading checkpoints). The trainer (`engram.train`) calls only those and imports
nothing from this package; the process group and device come in through `dist`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram.checkpoint import (
    SHARDED_KEY,
    TABLES_DIR,
    Checkpoint,
    assembled_table_optimizer,
    assembled_tables,
    load_model_weights,
    load_optimizer_state,
    read_checkpoint,
    save_checkpoint,
)
from engram.data import check_shard
from engram.indexer import NgramIndexer
from engram.parallel.context import DistContext, collective_errors
from engram.parallel.parallelize import (
    DenseCommStats,
    parallelize,
    sharded_stores,
    sync_router_loads,
)
from engram.parallel.tables import load_shards, save_distributed_checkpoint
from engram.run_config import ConfigError, RunConfig
from engram.store.sharded import ShardedRowStore
from engram.store.trainable import DiskTrainedStore

# The exchange counters of a sharded table that a step's metrics record (as `xchg_<name>`).
EXCHANGE_KEYS = (
    "ids", "unique_ids", "remote_ids", "remote_ids_dup", "id_bytes_sent", "row_bytes_sent",
    "row_bytes_received", "grad_bytes_sent", "forward_s", "backward_s",
)  # fmt: skip


def check_placement(cfg: RunConfig, dist: DistContext | None, device: torch.device) -> None:
    """Refuse tier/distribution choices that cannot work together (before anything is built)."""
    on_disk = cfg.train.table_store == "mmap" and cfg.engram is not None
    if on_disk and device.type != "cpu":
        raise ConfigError("train.table_store='mmap' trains on the CPU; use train.device='cpu'")
    if dist is not None:
        if on_disk:
            raise ConfigError(
                "train.table_store='mmap' trains in one process; a distributed run shards its "
                "tables over the ranks' memory (use train.table_store='ram')"
            )
        check_shard(cfg.data.batch_size, dist.rank, dist.world_size)


def disk_tables(
    cfg: RunConfig, run_dir: Path, resume_from: Path | None
) -> Callable[[NgramIndexer], dict[int, DiskTrainedStore]]:
    """Stores for `train.table_store="mmap"`: fresh files, or copies of the checkpoint's."""
    assert cfg.engram is not None
    engram_cfg = cfg.engram
    work = run_dir / TABLES_DIR

    def make(indexer: NgramIndexer) -> dict[int, DiskTrainedStore]:
        fp = indexer.fingerprint()
        saved = None if resume_from is None else read_checkpoint(resume_from, verify=False)
        stores = {}
        for lid in engram_cfg.layer_ids:
            if saved is not None:
                rec = saved.state.get("tables", {}).get(str(lid))
                if rec is None:
                    raise ConfigError(f"checkpoint {saved.path} has no table files for layer {lid}")
                stores[lid] = DiskTrainedStore.restore(
                    work, lid, saved.path / TABLES_DIR, rec["step"], expected_fingerprint=fp
                )
            else:
                sizes = indexer.hasher.flat_table_sizes(lid)
                stores[lid] = DiskTrainedStore.create(
                    work, lid, sum(sizes), engram_cfg.head_dim, fingerprint=fp,
                    std=cfg.train.table_std, seed=engram_cfg.seed + lid,
                    meta={"sub_table_sizes": sizes, "run": cfg.name},
                )  # fmt: skip
        return stores

    return make


@dataclass
class Placed:
    """A built run placed on its device and tiers: what the training loop drives."""

    parts: Any  # engram.train.RunParts (built by the trainer's `build`)
    model: nn.Module  # the EngramLM itself, on `device`
    forward: Callable[..., Any]  # what a training step calls: DDP and/or compiled, or the model
    device: torch.device
    dist: DistContext | None = None
    ddp: Any = None
    disk_tables: dict[int, DiskTrainedStore] = field(default_factory=dict)
    sharded: dict[int, ShardedRowStore] = field(default_factory=dict)
    dense_comm: DenseCommStats = field(default_factory=DenseCommStats)

    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP all-reduces once per optimizer step: on its last micro-batch only."""
        return contextlib.nullcontext() if self.ddp is None or last_micro else self.ddp.no_sync()

    def global_mean(self, values: list[float], stop: bool) -> tuple[list[float], bool]:
        """Per-rank sums -> the global batch's means, and whether any rank asks to stop.

        One all-reduce carries both, so every rank stops after the same step.
        """
        if self.dist is None:
            return values, stop
        *sums, stops = self.dist.all_reduce_sum([*values, float(stop)], "loss logging")
        return [v / self.dist.world_size for v in sums], stops > 0

    def after_step(self) -> None:
        """What must agree across ranks before the router-bias update: the MoE load counts."""
        if self.dist is not None:
            sync_router_loads(self.model, self.dist)

    def counters(self) -> dict[str, float]:
        """Cumulative communication of this rank (a step's record holds the difference)."""
        out: dict[str, float] = {}
        if self.sharded:  # the row exchange (see ExchangeStats)
            stats = [s.stats.as_dict() for s in self.sharded.values()]
            out.update({f"xchg_{k}": sum(st[k] for st in stats) for k in EXCHANGE_KEYS})
        if self.ddp is not None:  # DDP's dense all-reduce (in flight, overlapping backward)
            out["ddp_allreduce_s"] = self.dense_comm.seconds
            out["ddp_allreduce_bytes"] = self.dense_comm.bytes
        return out

    def guard(self, phase: str) -> contextlib.AbstractContextManager[Any]:
        """Failed collectives inside the block become a `DistributedError` naming `phase`."""
        return (
            contextlib.nullcontext() if self.dist is None else collective_errors(self.dist, phase)
        )

    def save(
        self, root: Path, step: int, optim_state: Any, state: Mapping[str, Any], keep: int
    ) -> Path:
        """Commit checkpoint `step` (collective when distributed); returns its directory."""
        if self.dist is not None:
            return save_distributed_checkpoint(
                root, step, self.model, optim_state, state, self.dist, self.sharded, keep=keep
            )
        return save_checkpoint(
            root, step, self.model, optim_state, state, keep=keep, tables=self.disk_tables
        )

    def load(self, ckpt: Checkpoint, opt: Any, layer_ids: tuple[int, ...]) -> None:
        """Weights and optimizer state into a run about to resume, whatever wrote the checkpoint.

        Sharded tables (this run is distributed) read their rows from a checkpoint of any world
        size, or from a single process's table and SparseAdam state; a single process resuming
        a distributed run gets its tables and moments assembled from the shards.
        """
        optim_state = load_optimizer_state(ckpt)
        if self.sharded:
            load_model_weights(ckpt, self.model)
            load_shards(ckpt, self.sharded, layer_ids)
            if optim_state is not None:
                optim_state.pop("table", None)  # a single process's SparseAdam: now in the shards
        else:
            load_model_weights(ckpt, self.model, assembled_tables(ckpt, self.model.state_dict()))
            if ckpt.state.get(SHARDED_KEY) and optim_state is not None and opt.table is not None:
                groups = opt.table.state_dict()["param_groups"]
                optim_state["table"] = assembled_table_optimizer(ckpt, layer_ids, groups)
        if optim_state is not None:
            opt.load_state_dict(optim_state)

    def close(self) -> None:
        for t in self.disk_tables.values():
            t.close()


def place(
    build: Callable[[Any], Any],
    cfg: RunConfig,
    dist: DistContext | None,
    device: torch.device,
    *,
    run_dir: Path,
    resume_from: Path | None = None,
) -> Placed:
    """Build the run with its tables placed, move it to `device` and wrap its dense model.

    `build(stores)` is the trainer's builder (`engram.train.build_run` with the run's tokenizer):
    `stores` is None (tables in RAM) or a function of the indexer returning the Engram layers'
    stores, so a table on disk or sharded over ranks is never allocated whole. Tables on disk
    are working files under `run_dir/tables/`, copied from `resume_from` when resuming.
    """
    check_placement(cfg, dist, device)
    stores: Any = None
    if cfg.train.table_store == "mmap" and cfg.engram is not None:
        stores = disk_tables(cfg, run_dir, resume_from)
    elif dist is not None and cfg.engram is not None:
        e = cfg.engram
        stores = sharded_stores(dist, e.layer_ids, e.head_dim, e.seed, cfg.train.table_std)
    parts = build(stores)
    layers = parts.model.engram_layers().items()
    placed = Placed(
        parts=parts,
        model=parts.model.to(device),
        forward=parts.model,
        device=device,
        dist=dist,
        disk_tables={i: e.store for i, e in layers if isinstance(e.store, DiskTrainedStore)},
        sharded={i: e.store for i, e in layers if isinstance(e.store, ShardedRowStore)},
    )
    if dist is not None:
        placed.ddp = parallelize(placed.model, dist, placed.dense_comm)
        placed.forward = placed.ddp
    if cfg.train.compile:
        placed.forward = torch.compile(placed.forward)
    return placed
