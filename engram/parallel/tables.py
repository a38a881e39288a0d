"""Sharded table checkpoints: each rank writes its rows; any number of ranks reads them back.

Layout inside a checkpoint directory written by a distributed run::

    tables/L<id>.shard<r>-of-<W>.safetensors   rows [start, stop) of layer <id>'s table and of
                                               its two Adam moments: weight, exp_avg, exp_avg_sq
    state.json  "sharded_tables": {"<id>": {"num_rows", "dim", "step", "shards": [{"file",
                "start", "stop"}, ...]}}, and every shard's sha256 beside the other files'

Design choices:
- Per-rank safetensors plus an index in state.json, rather than torch.distributed.checkpoint:
  the files are the same format as every other checkpoint tensor, readable by one process with
  no process group, and a row range of a shard is read without loading the rest
  (`safe_open(...).get_slice`), which is all resharding needs.
- Writing is collective but committing is not: every rank writes its shard into the staging
  directory rank 0 made, fsyncs it and reports (file, range, sha256) through `all_gather_object`;
  rank 0 alone writes state.json and renames the directory (`engram.checkpoint.save_checkpoint`).
  A rank that dies mid-write leaves only a staging directory, which the next start deletes.
- `TableRows` reads rows [start, stop) of a layer's table or moments from whatever wrote the
  checkpoint: shards of any world size, or a single process's model.safetensors (table) plus
  optimizer.safetensors (SparseAdam moments). So a run saved on 2 ranks reloads on 1 or 3, and a
  single-process run continues on several.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from engram.checkpoint import (
    SHARDED_KEY,
    TABLES_DIR,
    Checkpoint,
    CheckpointError,
    TableRows,
    _fsync,
    _sha256,
    assembled_table_optimizer,
    assembled_tables,
    checkpoint_name,
    save_checkpoint,
    staging_dir,
)
from engram.parallel.context import DistContext, collective_errors
from engram.store.sharded import ShardedRowStore

__all__ = [
    "SHARDED_KEY",
    "TableRows",
    "assembled_table_optimizer",
    "assembled_tables",
    "load_shards",
    "save_distributed_checkpoint",
    "shard_file",
    "write_shards",
]


def shard_file(layer_id: int, rank: int, world_size: int) -> str:
    """Name of one rank's shard of layer `layer_id`'s table."""
    return f"L{layer_id}.shard{rank:03d}-of-{world_size:03d}.safetensors"


def write_shards(
    stores: Mapping[int, ShardedRowStore], staging: Path, ctx: DistContext
) -> tuple[dict[str, Any], dict[str, str]]:
    """Collective: each rank writes its shards into `staging/tables/`.

    Returns (the "sharded_tables" record, {relative file: sha256} of every rank's shards), the
    same on every rank.
    """
    (staging / TABLES_DIR).mkdir(parents=True, exist_ok=True)
    mine: dict[str, dict[str, Any]] = {}
    for lid, store in stores.items():
        name = shard_file(lid, store.rank, store.world_size)
        path = staging / TABLES_DIR / name
        meta = {"layer_id": str(lid), "start": str(store.start), "stop": str(store.stop)}
        save_file(store.shard_state(), str(path), metadata=meta)
        _fsync(path)
        mine[str(lid)] = {
            "file": f"{TABLES_DIR}/{name}", "start": store.start, "stop": store.stop,
            "sha256": _sha256(path), "num_rows": store.num_rows, "dim": store.dim,
            "step": store.step_count,
        }  # fmt: skip
    everyone: list[Any] = [None] * ctx.world_size
    with collective_errors(ctx, "the checkpoint's table-shard exchange"):
        dist.all_gather_object(everyone, mine, group=ctx.group)
    record: dict[str, Any] = {}
    digests: dict[str, str] = {}
    for lid in mine:
        shards = sorted((rank_rec[lid] for rank_rec in everyone), key=lambda r: r["start"])
        record[lid] = {
            "num_rows": shards[0]["num_rows"], "dim": shards[0]["dim"], "step": shards[0]["step"],
            "shards": [{k: s[k] for k in ("file", "start", "stop")} for s in shards],
        }  # fmt: skip
        digests.update({s["file"]: s["sha256"] for s in shards})
    return record, digests


def load_shards(
    ckpt: Checkpoint, stores: Mapping[int, ShardedRowStore], layer_ids: tuple[int, ...]
) -> None:
    """Fill each rank's shards (any world size) from the checkpoint's tables and moments."""
    for lid, store in stores.items():
        rows = TableRows(ckpt, lid, layer_ids)
        if (rows.num_rows, rows.dim) != (store.num_rows, store.dim):
            raise CheckpointError(
                f"{ckpt.path}: layer {lid}'s table is ({rows.num_rows}, {rows.dim}), this model's "
                f"is ({store.num_rows}, {store.dim})"
            )
        store.load_rows(rows.read, rows.step)


def save_distributed_checkpoint(
    ckpt_root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer_state: Mapping[str, Any] | None,
    state: Mapping[str, Any],
    ctx: DistContext,
    stores: Mapping[int, ShardedRowStore],
    keep: int = 0,
) -> Path:
    """Collective: every rank writes its table shards, rank 0 the rest, then commits.

    Dense weights and optimizer state are replicated, so rank 0's are the run's. Returns the
    committed checkpoint directory on every rank (after a barrier: no rank runs ahead of the
    commit, so LATEST always names a checkpoint every rank has finished writing).
    """
    root = Path(ckpt_root)
    box: list[Any] = [str(staging_dir(root, step)) if ctx.is_main else None]
    with collective_errors(ctx, f"checkpoint {step} (staging directory)"):
        dist.broadcast_object_list(box, src=0, group=ctx.group)
    staging = Path(box[0])
    try:
        record, digests = write_shards(stores, staging, ctx)
        final = root / checkpoint_name(step)
        if ctx.is_main:
            save_checkpoint(
                root, step, model, optimizer_state, {**state, SHARDED_KEY: record},
                keep=keep, staging=staging, extra_files=digests,
            )  # fmt: skip
        ctx.barrier(f"checkpoint {step} (commit)")
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
