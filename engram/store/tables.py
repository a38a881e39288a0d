"""Table files as a whole: their names in a directory, reading several, describing one.

Helpers over `.engt` files (`tablefile`, `mmap`) that know nothing of checkpoints; writing them
from a checkpoint is `engram.export.export_tables`, one layer up, where checkpoints live.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engram.store.mmap import MmapRowStore
from engram.store.tablefile import SUFFIX, TableHeader, read_header, read_table, verify_table


def table_file_name(layer_id: int) -> str:
    """The file name `export_tables` gives layer `layer_id`'s table in a directory."""
    return f"table_L{layer_id}{SUFFIX}"


def read_tables(
    paths: Mapping[int, str | os.PathLike[str]] | Iterable[str | os.PathLike[str]],
    *,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    expected_fingerprint: str | None = None,
) -> dict[int, Tensor]:
    """Whole tables, dequantised to `dtype`, keyed by the layer id each file's header records."""
    files = paths.values() if isinstance(paths, Mapping) else paths
    out: dict[int, Tensor] = {}
    for p in files:
        lid = read_header(p, expected_fingerprint=expected_fingerprint).layer_id
        if lid in out:
            raise ValueError(f"two table files hold Engram layer {lid} (the second is {p})")
        out[lid] = read_table(
            p, dtype=dtype, verify=verify, expected_fingerprint=expected_fingerprint
        )
    return out


def describe_table(
    path: str | os.PathLike[str], *, verify: bool = True, sample_rows: int = 4096
) -> dict[str, Any]:
    """A JSON-able summary of a table file (for `engram table inspect`).

    Header fields, size on disk, bytes per row, whether the data crc was verified, and row-norm
    statistics over up to `sample_rows` evenly spaced rows (dequantised to float32).
    """
    path = Path(path)
    h: TableHeader = verify_table(path) if verify else read_header(path, allow_dirty=True)
    info: dict[str, Any] = {"path": str(path), **h.to_dict()}
    info["size_on_disk"] = path.stat().st_size
    info["verified"] = bool(verify)
    n = min(int(sample_rows), h.num_rows)
    if n > 0:
        with MmapRowStore(path, allow_dirty=not verify) as store:
            idx = torch.linspace(0, h.num_rows - 1, n).round().long().unique()  # (n,)
            norms = store.gather(idx).norm(dim=-1)  # (n,)
        info["row_norm"] = {
            "sampled_rows": int(idx.numel()),
            "mean": float(norms.mean()),
            "std": float(norms.std()) if norms.numel() > 1 else 0.0,
            "min": float(norms.min()),
            "max": float(norms.max()),
            "zero_rows": int((norms == 0).sum()),
        }
    return info
