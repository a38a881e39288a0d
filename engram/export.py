"""Checkpoint -> table files: export a trained model's Engram tables to `.engt` files.

Design choices:
- One file per Engram layer (`table_L{layer_id}.engt` in a directory, or a single `.engt` path for a
  one-layer model), because a store serves one layer's flat table and layers may live on
  different tiers or machines.
- The checkpoint is validated first (`read_checkpoint`: format version and sha256 of its files),
  and only the table tensors are read from its safetensors file, by row slices
  (`safe_open(...).get_slice`), so exporting a table larger than RAM never loads it whole.
- The file carries the checkpoint's hash-configuration fingerprint, so a store opened with the
  model's own fingerprint refuses a table trained under another hashing. Its metadata records where
  it came from (checkpoint path, step, run name, tensor name and dtype, the Engram config) and the
  layer's prime sub-table sizes, which depend only on the Engram config (not on the tokenizer),
  and are checked to add up to the tensor's rows.
- fp32 export is bit-exact: `read_tables` of an fp32 export equals the checkpoint tensors.
- This module sits above both `engram.checkpoint` and `engram.store` (it reads the former and
  writes through the latter), so the store package depends on nothing above it; `read_tables`,
  `describe_table` and `table_file_name` live in `engram.store.tables` and are re-exported here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from engram.checkpoint import (
    MODEL_FILE,
    TABLE_KEY,
    TABLES_DIR,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    table_file,
)
from engram.hashing import NgramHasher
from engram.store.mmap import MmapRowStore
from engram.store.tablefile import SUFFIX, write_table
from engram.store.tables import describe_table, read_tables, table_file_name

__all__ = ["describe_table", "export_tables", "read_tables", "table_file_name"]


def _sub_table_sizes(engram_cfg: Mapping[str, Any]) -> dict[int, list[int]]:
    """Prime sub-table sizes per layer from the config (independent of the tokenizer)."""
    hasher = NgramHasher(
        compressed_vocab_size=1,  # bounds the multipliers only; the primes do not depend on it
        engram_vocab_size=list(engram_cfg["engram_vocab_size"]),
        max_ngram_size=int(engram_cfg["max_ngram_size"]),
        n_head_per_ngram=int(engram_cfg["n_head_per_ngram"]),
        layer_ids=[int(i) for i in engram_cfg["layer_ids"]],
        pad_id=0,
        seed=int(engram_cfg.get("seed", 0)),
    )
    return {i: hasher.flat_table_sizes(i) for i in hasher.layer_ids}


@dataclass
class _Source:
    """Where one layer's table is read from: tensor name, shape, dtype and a row-range reader."""

    key: str
    num_rows: int
    dim: int
    dtype: str
    read: Callable[[int, int], Tensor]
    close: Callable[[], None] = lambda: None


def _targets(out: Path, layer_ids: list[int], ckpt_path: Path) -> dict[int, Path]:
    """{layer_id: file to write}: `table_L{id}.engt` in a directory, or one `.engt` path."""
    if out.suffix == SUFFIX:
        if len(layer_ids) != 1:
            raise ValueError(
                f"{out} names one file, but checkpoint {ckpt_path} has {len(layer_ids)} Engram "
                f"layers {layer_ids}; give a directory"
            )
        return {layer_ids[0]: out}
    return {lid: out / table_file_name(lid) for lid in layer_ids}


def _table_source(ckpt: Checkpoint, f: Any, keys: set[str], lid: int, fingerprint: str) -> _Source:
    """Layer `lid`'s table in the checkpoint: a table file (trained on disk), per-rank shards (a
    distributed run) or a tensor of the model file, read by row slices."""
    layer_ids = tuple(int(i) for i in ckpt.config["engram"]["layer_ids"])
    on_disk = ckpt.state.get("tables", {}).get(str(lid))
    if on_disk is not None:
        key = f"{TABLES_DIR}/{on_disk['files']['weight']}"
        store = MmapRowStore(table_file(ckpt, lid), expected_fingerprint=fingerprint)
        return _Source(
            key, store.num_rows, store.dim, store.storage_dtype, store.read_range, store.close
        )
    key = TABLE_KEY.format(layer_id=lid)
    if str(lid) in ckpt.state.get("sharded_tables", {}):
        from engram.parallel.tables import TableRows  # (imports the store package)

        rows = TableRows(ckpt, lid, layer_ids)

        def read_shards(a: int, b: int, rows: TableRows = rows) -> Tensor:
            return rows.read("weight", a, b)

        return _Source(key, rows.num_rows, rows.dim, "F32", read_shards)
    model_file = ckpt.path / MODEL_FILE
    if key not in keys:
        near = sorted(k for k in keys if ".engram.store" in k)
        raise CheckpointError(
            f"{model_file} has no table {key!r} for Engram layer {lid}; table tensors found: {near}"
        )
    sl = f.get_slice(key)
    shape = [int(s) for s in sl.get_shape()]
    if len(shape) != 2:
        raise CheckpointError(f"{model_file}: {key} has shape {shape}, expected 2-D")

    def read_slice(a: int, b: int, sl: Any = sl) -> Tensor:
        return sl[a:b]

    return _Source(key, shape[0], shape[1], str(sl.get_dtype()), read_slice)


def _table_meta(ckpt: Checkpoint, src: _Source, sub_table_sizes: list[int]) -> dict[str, Any]:
    """The metadata a table file records about where it came from."""
    return {
        "source_checkpoint": str(ckpt.path.resolve()),
        "step": ckpt.step,
        "run_name": ckpt.config.get("name"),
        "tensor": src.key,
        "source_dtype": src.dtype,
        "sub_table_sizes": sub_table_sizes,
        "engram_config": dict(ckpt.config["engram"]),
        "compressor_fingerprint": ckpt.state.get("compressor_fingerprint"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_tables(
    ckpt_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    verify: bool = True,
    chunk_rows: int = 65536,
) -> dict[int, Path]:
    """Write each Engram layer's table of a checkpoint to a table file; {layer_id: path}.

    `ckpt_path` is a run directory, its checkpoints directory or one checkpoint. `out` is a
    directory (files `table_L{layer_id}.engt`), or, for a one-layer model, a path ending in
    `.engt`. `verify` checks the checkpoint files' sha256 before reading them.
    """
    ckpt = read_checkpoint(ckpt_path, verify=verify)
    engram_cfg = ckpt.config.get("engram")
    if not engram_cfg:
        raise CheckpointError(f"checkpoint {ckpt.path} has no Engram layers (a baseline run)")
    fingerprint = ckpt.state.get("hash_fingerprint")
    if not fingerprint:
        raise CheckpointError(f"checkpoint {ckpt.path} records no hash_fingerprint")
    layer_ids = [int(i) for i in engram_cfg["layer_ids"]]
    sizes = _sub_table_sizes(engram_cfg)
    targets = _targets(Path(out), layer_ids, ckpt.path)

    written: dict[int, Path] = {}
    with safe_open(str(ckpt.path / MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
        for lid, target in targets.items():
            src = _table_source(ckpt, f, keys, lid, fingerprint)
            try:
                if sum(sizes[lid]) != src.num_rows:
                    raise CheckpointError(
                        f"{ckpt.path}: {src.key} has {src.num_rows} rows, but the Engram "
                        f"config's sub-tables add up to {sum(sizes[lid])}"
                    )
                write_table(
                    target,
                    src.read,
                    dtype=dtype,
                    fingerprint=fingerprint,
                    layer_id=lid,
                    meta=_table_meta(ckpt, src, sizes[lid]),
                    num_rows=src.num_rows,
                    dim=src.dim,
                    chunk_rows=chunk_rows,
                )
            finally:
                src.close()
            written[lid] = target
    return written
