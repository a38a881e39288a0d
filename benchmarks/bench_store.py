"""Row-store benchmarks: gather cost per tier, generation from disk vs RAM, table dtypes.

    python benchmarks/bench_store.py gather   [--rows 4194304] [--dim 16]
    python benchmarks/bench_store.py generate --ckpt RUN [--tokens 64] [--batch 4] [--rounds 5]
    python benchmarks/bench_store.py dtypes   --ckpt RUN [--batches N]

gather: one table, in RAM and as a table file (page cache warm), read with the same ids through
each store and through a raw `torch.index_select` on the in-RAM tensor; candidates alternate block
by block and the median time of each is divided by the raw one. Request sizes: 16 ids (one decode
step: 2 layers x 8 heads), 16k (a 2,048-token training batch x 8 heads), 262k (32k tokens).

generate: the same checkpoint served twice in one process, tables in RAM and tables on disk
(mmap + hot-row cache + background prefetch); generation runs alternate between the two (same
prompts, same seed, same tokens out) and the median decode tokens/s are compared. "cold" drops the
table files' pages from the OS page cache (posix_fadvise DONTNEED) before every disk-side run, so
every first touch of a row goes to the disk.

dtypes: validation loss of a checkpoint with its tables exported as float32, bfloat16, float16 and
int8 (per-row scale), and the file sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from prompts import PROMPTS  # benchmarks/prompts.py

from engram.store import CachedRowStore, MemoryRowStore, MmapRowStore, write_table


def _alternate(cands: dict[str, Callable[[], object]], rounds: int, block: int) -> dict[str, float]:
    """Median seconds per call of each candidate, candidates interleaved block by block."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    for fn in cands.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in cands.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append((time.perf_counter() - t0) / block)
    return {k: statistics.median(v) for k, v in times.items()}


def _raw(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """What a store's gather competes with: one index_select on an in-RAM tensor."""
    return torch.index_select(weight, 0, ids.reshape(-1)).view(*ids.shape, weight.shape[1])


def bench_gather(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    N, D = args.rows, args.dim
    weight = torch.randn(N, D)
    ram = MemoryRowStore(N, D, check_bounds=False)
    ram.weight.data.copy_(weight)
    ram.weight.requires_grad_(False)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "table.engt"
    write_table(path, weight, fingerprint="bench", layer_id=0)
    disk = MmapRowStore(path, check_bounds=False)
    disk_checked = MmapRowStore(path, check_bounds=True)
    disk_advised = MmapRowStore(path, check_bounds=False, willneed_max=1 << 20)
    disk.gather(torch.arange(N))  # warm the page cache
    print(f"table {N:,} x {D} float32 ({N * D * 4 / 2**20:.0f} MiB), one thread")
    print(f"{'ids':>8} {'candidate':<36} {'us/call':>10} {'vs raw':>8}")
    for n in (16, 16384, 262144):
        gen = torch.Generator().manual_seed(n)
        # Zipf-like ids (n-gram traffic): rank r drawn with probability ~ 1/r.
        ranks = torch.distributions.Pareto(1.0, 1.0).sample((n,)).long().clamp_max(N) - 1
        perm = torch.randperm(N, generator=gen)
        ids = perm[ranks].view(-1, 8)  # (n/8, 8): tokens x heads, as a layer asks
        cache = CachedRowStore(disk, capacity_rows=N // 8, check_bounds=False)
        for _ in range(3):
            cache.gather(ids)  # let the hot rows settle in
        stores = {
            "MemoryRowStore.gather": ram,
            "MmapRowStore.gather (warm)": disk,
            "MmapRowStore.gather, bounds-checked": disk_checked,
            "MmapRowStore.gather + MADV_WILLNEED": disk_advised,
            "CachedRowStore(mmap, N/8 rows)": cache,
        }
        with torch.no_grad():
            cands = {"raw index_select (RAM tensor)": partial(_raw, weight, ids)}
            cands.update({name: partial(store.gather, ids) for name, store in stores.items()})
            res = _alternate(cands, rounds=args.rounds, block=max(1, 20000 // n))
        raw = res["raw index_select (RAM tensor)"]
        for name, t in res.items():
            print(f"{n:>8,} {name:<36} {t * 1e6:>10.1f} {t / raw:>7.2f}x")
        print(f"{'':>8} cache hit rate {cache.stats().hit_rate:.1%}")
    for s in (disk, disk_checked, disk_advised):
        s.close()


def _drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_generate(args: argparse.Namespace) -> None:
    from engram.generate import generate
    from engram.serving import TierConfig, load_served

    texts = PROMPTS[: args.batch]
    ram = load_served(args.ckpt)
    tier = TierConfig(store="mmap", cache_rows=args.cache_rows, prefetch=not args.no_prefetch)
    disk = load_served(args.ckpt, tier)
    files = list(disk.files.values())
    prompts = [ram.parts.tokenizer.encode(t).ids for t in texts]

    def run(served, cold: bool) -> tuple[float, list[list[int]]]:
        if cold:
            _drop_page_cache(files)
        res = generate(
            served.parts.model, prompts, indexer=served.parts.indexer,
            max_new_tokens=args.tokens, temperature=0.8, top_k=40, seed=0,
        )  # fmt: skip
        return res.tokens_per_s, res.tokens

    torch.set_num_threads(1)
    print(f"{args.ckpt}: batch {len(prompts)}, {args.tokens} new tokens, one thread")
    print(f"disk tier: mmap + cache {args.cache_rows} rows/layer + prefetch {not args.no_prefetch}")
    for mode in ("warm", "cold"):
        r_ram: list[float] = []
        r_disk: list[float] = []
        run(ram, False)
        run(disk, mode == "cold")
        for _ in range(args.rounds):
            a, ta = run(ram, False)
            b, tb = run(disk, mode == "cold")
            assert ta == tb, "RAM and disk tiers must generate the same tokens"
            r_ram.append(a)
            r_disk.append(b)
        ra, rb = statistics.median(r_ram), statistics.median(r_disk)
        print(
            f"{mode:>5}: RAM {ra:7.1f} tok/s, disk {rb:7.1f} tok/s -> disk is "
            f"{(1 - rb / ra) * 100:+.1f}% slower (per-round ratios "
            f"{', '.join(f'{y / x:.3f}' for x, y in zip(r_ram, r_disk, strict=True))})"
        )
    stats = disk.stats()
    for lid, rec in stats.items():
        if "cache" in rec:
            print(f"layer {lid}: cache hit rate {rec['cache']['hit_rate']:.1%}", end="")
        if "prefetch" in rec:
            p = rec["prefetch"]
            print(f", prefetched {p['prefetched_hits']} / sync {p['sync_gathers']}", end="")
        print()
    ram.close()
    disk.close()


def bench_dtypes(args: argparse.Namespace) -> None:
    from engram.data import prepare_data
    from engram.serving import TierConfig, load_served
    from engram.train import evaluate

    torch.set_num_threads(1)
    batches = None
    base = None
    print(f"{'tables':<10} {'MiB/layer':>10} {'val loss':>9} {'vs fp32':>9}")
    for dtype in ("float32", "bfloat16", "float16", "int8"):
        with load_served(args.ckpt, TierConfig(store="mmap", dtype=dtype, prefetch=False)) as s:
            if batches is None:
                splits = prepare_data(s.parts.cfg.data, s.parts.tokenizer, s.parts.eot_id)
                batches = list(splits.val_batches(args.batches))
            loss = evaluate(s.parts.model, batches, s.parts.indexer)
            size = statistics.mean(f.stat().st_size for f in s.files.values()) / 2**20
        base = loss if base is None else base
        print(f"{dtype:<10} {size:>10.2f} {loss:>9.5f} {loss - base:>+9.5f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gather")
    g.add_argument("--rows", type=int, default=1 << 22)
    g.add_argument("--dim", type=int, default=16)
    g.add_argument("--rounds", type=int, default=15)
    g.set_defaults(func=bench_gather)
    ge = sub.add_parser("generate")
    ge.add_argument("--ckpt", required=True)
    ge.add_argument("--tokens", type=int, default=64)
    ge.add_argument("--batch", type=int, default=4)
    ge.add_argument("--rounds", type=int, default=5)
    ge.add_argument("--cache-rows", type=int, default=20000)
    ge.add_argument("--no-prefetch", action="store_true")
    ge.set_defaults(func=bench_generate)
    d = sub.add_parser("dtypes")
    d.add_argument("--ckpt", required=True)
    d.add_argument("--batches", type=int, default=None)
    d.set_defaults(func=bench_dtypes)
    args = p.parse_args()
    if args.cmd == "gather":
        torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
