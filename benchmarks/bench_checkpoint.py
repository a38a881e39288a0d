"""Checkpoint cost of a table trained on disk: full copy vs incremental (base + row deltas).

    python benchmarks/bench_checkpoint.py [--configs demo,big] [--intervals 20,200]
                                          [--repeats 3] [--weight-mib 1024] [--dir PATH]

The rows a checkpoint interval touches come from the real thing: the demo's data (builtin KJV,
bpe:4096, 16 x 128 tokens a step) hashed by the demo's n-gram hashing, the union of an
interval's steps' rows. Two tables:
- demo: the demo's own Engram table (2 orders x 4 heads, 8-dim rows);
- big: the same hashing with its sub-tables grown so the weight is about --weight-mib MiB of
  64-dim rows (the three parts, weight and two Adam moments, are 3x that on disk).

For each interval, each repeat: the interval's rows get one SparseAdam update through
`DiskTrainedStore.adam_step` (weight and both moments written, as in training), the working
files are flushed (untimed), then the same state is checkpointed two ways, in alternating order:
a full copy (`compact_fraction=0`, what every checkpoint cost before) and the incremental
default (`compact_fraction=0.5`: a delta, or a new base when the chain would pass half the
table). Both include their fsyncs. Reported: rows touched, bytes written (the store's own
report, and the process's `write_bytes` from /proc/self/io as a cross-check), seconds, and the
ratios full / incremental. The incremental checkpoint is committed (the next one builds on it);
the full copy is deleted. Timings share the disk and page cache with whatever else runs: look
at the ratios, and at the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import machine  # benchmarks/machine.py
import numpy as np
import torch

from engram.compress import TokenizerCompressor
from engram.data import BatchLoader, prepare_data
from engram.data.tokenize import data_tokenizer
from engram.indexer import NgramIndexer
from engram.presets import demo_engram
from engram.store.trainable import DiskTrainedStore
from engram.tokenizer import separator_id


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest matching mount point)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            inside = str(path.resolve()).startswith(mount.rstrip("/") + "/") or mount == "/"
            if inside and len(mount) > len(best):
                best, kind = mount, fields[2]
    except OSError:
        pass
    return f"{kind} (mounted at {best or '?'})"


def write_bytes() -> int:
    """Bytes this process caused to be sent to storage so far (/proc/self/io), or -1."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def interval_rows(
    loader: BatchLoader, layer: int, offsets: np.ndarray, first: int, steps: int
) -> torch.Tensor:
    """Sorted unique table rows of Engram layer index `layer` over steps [first, first + steps):
    each head's local ids (B, T, H) plus its sub-table's offset, as `EngramLayer` does."""
    seen = [
        (loader.make_batch(s).rows[layer].numpy() + offsets).reshape(-1)
        for s in range(first, first + steps)
    ]
    return torch.from_numpy(np.unique(np.concatenate(seen)))


def touch(store: DiskTrainedStore, rows: torch.Tensor, gen: torch.Generator, chunk: int) -> None:
    """One SparseAdam step on `rows` (random gradients), chunk by chunk to bound memory."""
    for a in range(0, len(rows), chunk):
        idx = rows[a : a + chunk]
        out = store.gather(idx)  # (n, dim)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
    store.adam_step(1e-3, (0.9, 0.95), 1e-8)


def timed_save(store: DiskTrainedStore, dest: Path, fraction: float) -> dict:
    """Checkpoint the store's tables into `dest` with this compaction budget; its report."""
    for s in store.parts.values():
        s.flush()  # the working files' own writeback is not the checkpoint's
    store.compact_fraction = fraction
    before = write_bytes()
    t0 = time.perf_counter()
    rec = store.save(dest)
    seconds = time.perf_counter() - t0
    after = write_bytes()
    report = dict(rec["checkpoint"])
    report.update(wall_s=seconds, io_write_bytes=after - before if before >= 0 else -1, rec=rec)
    return report


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def bench(name: str, cfg, args: argparse.Namespace, root: Path) -> list[dict]:
    tokenizer = data_tokenizer(cfg.data)
    sep = separator_id(tokenizer)
    data = prepare_data(cfg.data, tokenizer, sep)
    indexer = NgramIndexer(
        cfg.engram, TokenizerCompressor.from_tokenizer(tokenizer), tokenizer, sep
    )
    lid = cfg.engram.layer_ids[0]
    sizes = indexer.hasher.flat_table_sizes(lid)
    num_rows, dim = sum(sizes), cfg.engram.head_dim
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # (H,)
    table = 3 * num_rows * dim * 4
    print(
        f"\n== {name}: layer {lid}, {num_rows:,} rows x {dim} float32 = {mib(num_rows * dim * 4)} "
        f"weight, {mib(table)} with both Adam moments; orders 2-{cfg.engram.max_ngram_size}, "
        f"{cfg.engram.n_head_per_ngram} heads, batch {cfg.data.batch_size} x {cfg.data.seq_len}"
    )
    work = root / name
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    store = DiskTrainedStore.create(
        work / "work", lid, num_rows, dim, fingerprint=indexer.fingerprint(), seed=0
    )
    print(f"   created the working files in {time.perf_counter() - t0:.1f} s")
    gen = torch.Generator().manual_seed(0)
    loader = BatchLoader(data.train, cfg.data, indexer, prefetch=1)
    results = []
    try:
        first = timed_save(store, work / "c-0", 0.5)  # the chain's first base
        store.mark_committed(work / "c-0", first["rec"])
        committed = work / "c-0"
        print(
            f"   first checkpoint (a base): {mib(first['bytes_written'])} in {first['wall_s']:.2f} s"
        )
        step = 0
        for interval in args.intervals:
            for r in range(args.repeats):
                rows = interval_rows(loader, 0, offsets, step, interval)
                step += interval
                touch(store, rows, gen, args.chunk_rows)
                out: dict[str, dict] = {}
                order = ("full", "incremental") if r % 2 == 0 else ("incremental", "full")
                for kind in order:
                    dest = work / (f"full-{step}" if kind == "full" else f"c-{step}")
                    out[kind] = timed_save(store, dest, 0.0 if kind == "full" else 0.5)
                    if kind == "full":
                        shutil.rmtree(dest)
                store.mark_committed(work / f"c-{step}", out["incremental"]["rec"])
                shutil.rmtree(committed)  # keep=1: the chain's files live on as hard links
                committed = work / f"c-{step}"
                f, i = out["full"], out["incremental"]
                res = {
                    "config": name, "interval": interval, "repeat": r, "rows": len(rows),
                    "touch": len(rows) / num_rows, "full": f, "incr": i,
                }  # fmt: skip
                results.append(res)
                print(
                    f"   {interval:>5} steps #{r}: {len(rows):>9,} rows ({100 * res['touch']:5.1f}%)"
                    f" | full {mib(f['bytes_written']):>12} {f['wall_s']:7.3f} s"
                    f" (io {mib(f['io_write_bytes'])})"
                    f" | incr {i['kind']:5} {mib(i['bytes_written']):>12} {i['wall_s']:7.3f} s"
                    f" (io {mib(i['io_write_bytes'])}, chain {i['chain_length']})"
                    f" | bytes x{f['bytes_written'] / i['bytes_written']:6.1f}"
                    f" time x{f['wall_s'] / i['wall_s']:6.1f}"
                )
    finally:
        loader.close()
        store.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default="demo,big", help="demo and/or big (comma separated)")
    ap.add_argument("--intervals", default="20,200", help="steps between checkpoints")
    ap.add_argument("--repeats", type=int, default=3, help="checkpoints per interval")
    ap.add_argument("--weight-mib", type=int, default=1024, help="big table's weight size")
    ap.add_argument("--dir", default=None, help="where the tables go (default: a temp dir)")
    ap.add_argument("--chunk-rows", type=int, default=1 << 18, help="rows per gather in touch")
    ap.add_argument("--keep", action="store_true", help="leave the files behind")
    args = ap.parse_args()
    args.intervals = [int(x) for x in args.intervals.split(",")]
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {machine.cpu_summary()}")
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"directory: {root} on {fs_type(root)}")
    base = demo_engram()
    configs = {"demo": base}
    orders, heads = base.engram.max_ngram_size - 1, base.engram.n_head_per_ngram
    rows_per_head = args.weight_mib * 2**20 // (64 * 4) // (orders * heads)  # ~one prime each
    configs["big"] = replace(
        base,
        engram=replace(
            base.engram, n_embed_per_ngram=64 * base.engram.n_head_per_ngram,
            engram_vocab_size=(rows_per_head,) * orders,
        ),
    )  # fmt: skip
    results = []
    try:
        for name in args.configs.split(","):
            results += bench(name, configs[name], args, root)
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\nmedians (full copy / incremental):")
    print(f"{'config':>6} {'interval':>8} {'touched':>8} {'bytes ratio':>12} {'time ratio':>11} "
          f"{'full s':>8} {'incr s':>8}")  # fmt: skip
    for name in args.configs.split(","):
        for interval in args.intervals:
            rs = [r for r in results if r["config"] == name and r["interval"] == interval]
            if not rs:
                continue
            med = statistics.median
            print(
                f"{name:>6} {interval:>8} {100 * med(r['touch'] for r in rs):7.1f}% "
                f"{med(r['full']['bytes_written'] / r['incr']['bytes_written'] for r in rs):12.1f} "
                f"{med(r['full']['wall_s'] / r['incr']['wall_s'] for r in rs):11.1f} "
                f"{med(r['full']['wall_s'] for r in rs):8.3f} {med(r['incr']['wall_s'] for r in rs):8.3f}"
            )


if __name__ == "__main__":
    main()
