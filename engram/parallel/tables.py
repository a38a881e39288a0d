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
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from engram.checkpoint import (
    MODEL_FILE,
    OPTIM_FILE,
    TABLE_KEY,
    TABLES_DIR,
    Checkpoint,
    CheckpointError,
    _fsync,
    _sha256,
    checkpoint_name,
    save_checkpoint,
    staging_dir,
)
from engram.parallel.context import DistContext, collective_errors
from engram.store.sharded import PARTS, ShardedRowStore

SHARDED_KEY = "sharded_tables"


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


class TableRows:
    """Rows of one layer's trained table and Adam moments, from any kind of checkpoint."""

    def __init__(self, ckpt: Checkpoint, layer_id: int, layer_ids: tuple[int, ...]) -> None:
        self.ckpt, self.layer_id = ckpt, int(layer_id)
        sharded = ckpt.state.get(SHARDED_KEY, {})
        if str(layer_id) in sharded:
            rec = sharded[str(layer_id)]
            self.num_rows, self.dim, self.step = rec["num_rows"], rec["dim"], int(rec["step"])
            self._shards = [(ckpt.path / s["file"], s["start"], s["stop"]) for s in rec["shards"]]
            covered = 0
            for _, start, stop in self._shards:
                if start != covered:
                    raise CheckpointError(
                        f"{ckpt.path}: shards of layer {layer_id} leave rows [{covered}, {start}) "
                        "uncovered"
                    )
                covered = stop
            if covered != self.num_rows:
                raise CheckpointError(
                    f"{ckpt.path}: shards of layer {layer_id} cover {covered} of {self.num_rows} rows"
                )
            return
        if ckpt.state.get("tables"):
            raise CheckpointError(
                f"{ckpt.path} holds tables trained on disk (train.table_store='mmap'); "
                "continue it in one process"
            )
        self._shards = []
        key = TABLE_KEY.format(layer_id=layer_id)
        with safe_open(str(ckpt.path / MODEL_FILE), framework="pt") as f:
            if key not in set(f.keys()):
                raise CheckpointError(f"{ckpt.path / MODEL_FILE} has no table {key!r}")
            self.num_rows, self.dim = f.get_slice(key).get_shape()
        # SparseAdam's state is keyed by the table's index among the table parameters.
        self._index = str(list(layer_ids).index(layer_id))
        table = ckpt.state.get("optimizer", {}).get("table", {})
        self.step = int(table.get("scalars", {}).get(self._index, {}).get("step", 0))

    def read(self, part: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of `part` (weight, exp_avg or exp_avg_sq) -> (stop - start, dim)."""
        if part not in PARTS:
            raise ValueError(f"unknown table part {part!r}; expected one of {PARTS}")
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"row range [{start}, {stop}) is outside [0, {self.num_rows})")
        if self._shards:
            pieces = []
            for path, s0, s1 in self._shards:
                lo, hi = max(start, s0), min(stop, s1)
                if lo < hi:
                    with safe_open(str(path), framework="pt") as f:
                        pieces.append(f.get_slice(part)[lo - s0 : hi - s0])
            return torch.cat(pieces) if pieces else torch.zeros(0, self.dim)
        if part == "weight":
            return self._slice(MODEL_FILE, TABLE_KEY.format(layer_id=self.layer_id), start, stop)
        key = f"table/{self._index}/{part}"
        if self.step == 0:  # never stepped: SparseAdam has not created its moments yet
            return torch.zeros(stop - start, self.dim)
        return self._slice(OPTIM_FILE, key, start, stop)

    def _slice(self, file: str, key: str, start: int, stop: int) -> Tensor:
        with safe_open(str(self.ckpt.path / file), framework="pt") as f:
            if key not in set(f.keys()):
                raise CheckpointError(f"{self.ckpt.path / file} has no tensor {key!r}")
            return f.get_slice(key)[start:stop]


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


def assembled_tables(ckpt: Checkpoint, wanted: Collection[str]) -> dict[str, Tensor]:
    """{state-dict key: full table} of a distributed checkpoint's sharded tables, for the keys
    in `wanted` (a model's state-dict keys: tables it serves from another store are not read)."""
    out = {}
    for lid, rec in ckpt.state.get(SHARDED_KEY, {}).items():
        key = TABLE_KEY.format(layer_id=lid)
        if key in wanted:
            out[key] = TableRows(ckpt, int(lid), ()).read("weight", 0, rec["num_rows"])
    return out


def assembled_table_optimizer(
    ckpt: Checkpoint, layer_ids: tuple[int, ...], param_groups: Any
) -> dict[str, Any]:
    """The SparseAdam `state_dict` one process needs to continue a distributed run's tables."""
    state: dict[int, dict[str, Any]] = {}
    for i, lid in enumerate(layer_ids):
        rows = TableRows(ckpt, lid, layer_ids)
        if rows.step == 0:
            continue
        state[i] = {"step": rows.step}
        for part in PARTS[1:]:
            state[i][part] = rows.read(part, 0, rows.num_rows)
    return {"state": state, "param_groups": param_groups}


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
