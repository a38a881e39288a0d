"""Serve a trained model with its tables on a chosen tier: RAM, or a table file on disk.

The tier stack for `store="mmap"` (tables in files on disk), per Engram layer, innermost first:

    MmapRowStore or PreadRowStore (`reader`: the .engt file memory-mapped, page by page; or read
      row by row with preadv, several reads in flight -- engram.store.pread)
      -> CachedRowStore (optional: the hottest `cache_rows` rows, TinyLFU, with hit statistics)
        -> PrefetchingStore (optional: rows requested ahead by `generate` are fetched on a
           background thread while the blocks below the layer compute)

Design choices:
- The model never knows: `load_trained(..., stores=...)` builds it with these stores in its
  Engram layers, so the checkpoint's tables are never loaded into memory (a table larger than RAM
  is fine) and generation, evaluation and analysis run unchanged.
- Table files come from, in order: `tables` (a directory of `table_L<id>.engt` files the user
  exported), the checkpoint's own files when its tables were trained on disk (float32 only), or
  an export made on first use into `<run>/tables/<checkpoint>-<dtype>/` (atomic, reused later).
  Every file is opened with the checkpoint's hash fingerprint, so a table exported from another
  configuration is refused.
- `reader` picks how the file is read; both readers return bit-identical rows, so generation
  does not depend on it. The default is "auto": pread for a file larger than
  `AUTO_PREAD_RAM_FRACTION` of physical memory, mmap otherwise, from measurements on the 2-core
  build machine (docs/serving.md, benchmarks/RESULTS.md). From the page cache a mapped gather is
  one `index_select` (~12 us for a decode step's 32 rows; ~90 us with the WILLNEED advice the tier
  uses) against one syscall per row for pread (~120 us), so a table that fits stays mapped. On a
  32 GiB table on the 23.5 GiB machine, pread generated faster than mmap cold (0.74x vs 0.66x of
  the RAM model's tokens/s) and warm (0.93x vs 0.87x) and alike on new text (0.80x vs 0.82x):
  rows from this machine's virtual disk cost both ~150 us each (the device serves reads one at a
  time), but pread keeps the table out of the process's resident set, copies 32 B instead of
  mapping a 4 KiB page per row, and counts every byte it reads.
- One `Prefetcher` thread serves all layers; `ServedModel.close()` (or `with`) shuts it down and
  closes the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.checkpoint import TABLES_DIR, Checkpoint, read_checkpoint, table_file
from engram.export import export_tables
from engram.store.base import RowStore
from engram.store.cache import CachedRowStore
from engram.store.prefetch import Prefetcher, PrefetchingStore
from engram.store.readers import (
    AUTO_PREAD_RAM_FRACTION,  # resolve_reader passes it on: tests may lower it here
    READERS,
    choose_reader,
    open_table_file,
)
from engram.store.stack import close_stack, stack_stats
from engram.store.tablefile import DTYPE_CODES
from engram.store.tables import table_file_name
from engram.train import RunParts, load_trained

STORES = ("ram", "mmap")


@dataclass(frozen=True)
class TierConfig:
    """Where a served model's Engram rows come from.

    `verify` costs one full read of every table file at open: the data crc32 runs at about
    1.0 s per GiB from the page cache (a 256 MiB float32 table: 0.25-0.27 s, measured on this
    project's 2-core build machine under load; zlib.crc32 bound), plus the disk read when the
    file is cold. Off by default because opening is otherwise a header read (~0.3 ms) and
    serving a table larger than RAM must not start by reading all of it. The RAM tier loads
    table files whole and verifies them always (`read_tables`).
    """

    # "ram": tables loaded into memory as parameters; "mmap": read from table files on disk.
    store: str = "ram"
    # Directory of exported table files (table_L<id>.engt); None = find or export them.
    tables: str | None = None
    # Row format of tables exported on first use: float32, bfloat16, float16 or int8.
    dtype: str = "float32"
    # Rows per layer kept in the hot-row cache (0 = no cache; the page cache still works).
    cache_rows: int = 0
    # Or the cache's size per layer in bytes of rows (0 = use cache_rows).
    cache_bytes: int = 0
    # Cache policy: "lfu" (TinyLFU, frequency-aware) or "lru".
    cache_policy: str = "lfu"
    # Fetch each step's rows on a background thread ahead of the layer that reads them.
    prefetch: bool = True
    # Check each table file's data crc when opening it, refusing a corrupt file (a full read).
    verify: bool = False
    # Tell the kernel a step's pages up front (MADV_WILLNEED) so cold reads go out together.
    willneed: bool = True
    # How table files are read (store="mmap"): "mmap" (memory map, the kernel pages rows in
    # 4 KiB at a time), "pread" (exactly the requested rows, engram.store.pread), or "auto"
    # (pread for a file larger than AUTO_PREAD_RAM_FRACTION of physical memory, else mmap).
    reader: str = "auto"
    # pread reader: threads doing the blocking reads of one request (0 = the calling thread,
    # which already has a request's reads in flight through POSIX_FADV_WILLNEED).
    reader_threads: int = 0
    # pread reader: O_DIRECT (no page cache; 512 B per row instead of a 4 KiB page).
    direct: bool = False

    def __post_init__(self) -> None:
        if self.store not in STORES:
            raise ValueError(f"store must be one of {list(STORES)}, got {self.store!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {list(READERS)}, got {self.reader!r}")
        if self.reader_threads < 0:
            raise ValueError(f"reader_threads must be >= 0, got {self.reader_threads}")
        if (self.direct or self.reader_threads) and self.reader == "mmap":
            raise ValueError(
                "direct and reader_threads are options of the pread reader: give reader='pread' "
                "(or 'auto'), not 'mmap'"
            )
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"table dtype must be one of {list(DTYPE_CODES)}, got {self.dtype!r}")
        if self.cache_rows < 0 or self.cache_bytes < 0:
            raise ValueError(
                f"cache_rows and cache_bytes must be >= 0, got {self.cache_rows}, {self.cache_bytes}"
            )
        if self.cache_rows and self.cache_bytes:
            raise ValueError("give the cache size as cache_rows or cache_bytes, not both")
        if self.store == "ram" and (self.cache_rows or self.cache_bytes or self.tables):
            raise ValueError("cache_rows, cache_bytes and tables apply to store='mmap' only")


@dataclass
class ServedModel:
    """A loaded model plus the tier stores that serve its rows; close it when done."""

    parts: RunParts
    ckpt: Checkpoint
    tier: TierConfig
    stores: dict[int, RowStore] = field(default_factory=dict)
    files: dict[int, Path] = field(default_factory=dict)
    prefetcher: Prefetcher | None = None

    def stats(self) -> dict[str, Any]:
        """Per layer: the hot-row cache's and the prefetcher's statistics (JSON-able)."""
        return stack_stats(self.stores)

    def close(self) -> None:
        """Stop the prefetch thread and close the table files (idempotent)."""
        close_stack(self.stores, self.prefetcher)

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def table_files(ckpt: Checkpoint, tier: TierConfig) -> dict[int, Path]:
    """{layer_id: table file} for a checkpoint, exporting it on first use (see module doc)."""
    engram_cfg = ckpt.config.get("engram")
    if not engram_cfg:
        raise ValueError(f"checkpoint {ckpt.path} has no Engram layers: nothing to serve on disk")
    layer_ids = [int(i) for i in engram_cfg["layer_ids"]]
    if tier.tables is not None:
        files = {lid: Path(tier.tables) / table_file_name(lid) for lid in layer_ids}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"table files {missing} do not exist; write them with "
                f"`engram table export --ckpt {ckpt.path} --out {tier.tables}`"
            )
        return files
    disk = ckpt.state.get("tables")
    if disk and tier.dtype == "float32":
        return {lid: table_file(ckpt, lid) for lid in layer_ids}
    export_dir = ckpt.path.parent.parent / TABLES_DIR / f"{ckpt.path.name}-{tier.dtype}"
    files = {lid: export_dir / table_file_name(lid) for lid in layer_ids}
    if not all(f.is_file() for f in files.values()):
        export_tables(ckpt.path, export_dir, dtype=tier.dtype)
    return files


def resolve_reader(tier: TierConfig, path: Path) -> str:
    """ "mmap" or "pread": the tier's reader, with "auto" decided by the file's size against RAM
    (pread whenever the pread-only options `direct`/`reader_threads` are set)."""
    return choose_reader(
        tier.reader, path, pread_options=bool(tier.direct or tier.reader_threads),
        ram_fraction=AUTO_PREAD_RAM_FRACTION,
    )  # fmt: skip


def open_table(path: Path, tier: TierConfig, fingerprint: str | None) -> RowStore:
    """The innermost store of a disk tier: the table file at `path`, read as `tier.reader` says."""
    return open_table_file(
        path, resolve_reader(tier, path), fingerprint=fingerprint, verify=tier.verify,
        threads=tier.reader_threads, direct=tier.direct, willneed=tier.willneed,
    )  # fmt: skip


def load_served(
    ckpt_path: str | os.PathLike[str], tier: TierConfig | None = None, tokenizer: Any = None
) -> ServedModel:
    """Load a run or checkpoint for inference with its rows served from `tier`."""
    tier = tier or TierConfig()
    if tier.store == "ram":
        ckpt = read_checkpoint(ckpt_path)
        if ckpt.state.get("tables"):  # trained on disk: bring the tables into RAM
            from engram.store.memory import MemoryRowStore
            from engram.store.tablefile import read_header

            files = table_files(ckpt, tier)
            stores: dict[int, RowStore] = {}
            for lid, f in files.items():  # load_trained reads each table into its store
                h = read_header(f, expected_fingerprint=ckpt.state.get("hash_fingerprint"))
                stores[lid] = MemoryRowStore(h.num_rows, h.dim, check_bounds=False)
            parts, ckpt = load_trained(ckpt.path, tokenizer, stores=stores)
            for s in stores.values():
                s.weight.requires_grad_(False)
            return ServedModel(parts, ckpt, tier, stores, files)
        parts, ckpt = load_trained(ckpt_path, tokenizer)
        return ServedModel(parts, ckpt, tier)

    ckpt = read_checkpoint(ckpt_path)
    files = table_files(ckpt, tier)
    fingerprint = ckpt.state.get("hash_fingerprint")
    prefetcher = Prefetcher(max_pending=2 * len(files)) if tier.prefetch else None
    stores = {}
    try:
        for lid, f in files.items():
            store: RowStore = open_table(f, tier, fingerprint)
            if tier.cache_rows or tier.cache_bytes:
                store = CachedRowStore(
                    store, capacity_rows=tier.cache_rows or None,
                    capacity_bytes=tier.cache_bytes or None, policy=tier.cache_policy,
                    check_bounds=False,
                )  # fmt: skip
            if prefetcher is not None:
                store = PrefetchingStore(store, prefetcher)
            stores[lid] = store
        parts, ckpt = load_trained(ckpt.path, tokenizer, stores=stores)
    except BaseException:
        ServedModel(None, ckpt, tier, stores, files, prefetcher).close()  # type: ignore[arg-type]
        raise
    return ServedModel(parts, ckpt, tier, stores, files, prefetcher)
