"""A table larger than RAM serving generation: tokens/s, resident memory and cache hit rate.

    python benchmarks/bench_bigtable.py [--size-gib 32] [--path /work/bigtable] [--tokens 64]

Builds the demo Engram model's architecture with its Engram layer's sub-tables scaled up until
the table is `--size-gib` GiB (float32 rows of 16 values; the hashing addresses the whole range),
writes that table to a `.engt` file chunk by chunk (reused on later runs), and serves it through
the disk tier (mmap + hot-row cache + background prefetch) to generate text. The yardstick, in the
same process and on the same prompts, is the same architecture with the demo's small table in RAM:
the two differ only in where the rows come from. The weights are untrained (random): speed and
memory do not depend on them.

Resident memory is read from /proc/self/status (VmRSS = RssAnon + RssFile + RssShmem): mapped
table pages that were touched count as RssFile, and the kernel may drop them at any time.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from prompts import PROMPTS  # benchmarks/prompts.py: four per round, new text every round

from engram.generate import generate
from engram.presets import demo_engram
from engram.serving import WILLNEED_MAX
from engram.store import CachedRowStore, MmapRowStore, Prefetcher, PrefetchingStore, write_table
from engram.train import build_run


def rss() -> dict[str, float]:
    """Resident memory of this process in MiB, split into anonymous and file-backed pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gib", type=float, default=32.0)
    p.add_argument("--path", default="/work/bigtable")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cache-rows", type=int, default=200_000)
    p.add_argument("--write-only", action="store_true", help="write the table file and stop")
    args = p.parse_args()
    torch.set_num_threads(1)

    small = demo_engram()
    assert small.engram is not None
    dh = small.engram.head_dim
    heads = small.engram.n_subtables
    per_head = int(args.size_gib * 2**30 / (heads * dh * 4))
    big = replace(
        small,
        name="engram-big",
        engram=replace(
            small.engram,
            engram_vocab_size=(per_head,) * (small.engram.max_ngram_size - 1),
            layer_ids=small.engram.layer_ids,
        ),
    )
    (lid,) = big.engram.layer_ids  # the demo has one Engram layer
    print(
        f"machine RAM: {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    )
    print(f"start: {rss()}")

    # The indexer (and so the fingerprint and sub-table sizes) without building the big model.
    from engram.indexer import NgramIndexer

    ref = build_run(small)
    indexer = NgramIndexer(big.engram, ref.compressor, ref.tokenizer, sep_id=ref.indexer.sep_id)
    sizes = indexer.hasher.flat_table_sizes(lid)
    num_rows = sum(sizes)
    fp = indexer.hasher.fingerprint()
    path = Path(args.path) / f"table_L{lid}_{num_rows}.engt"
    if not path.exists():
        gen = torch.Generator().manual_seed(0)
        print(f"writing {path}: {num_rows:,} rows x {dh} ({num_rows * dh * 4 / 2**30:.1f} GiB)")
        t0 = time.perf_counter()
        write_table(
            path, lambda a, b: torch.empty(b - a, dh).normal_(0, 1, generator=gen),
            fingerprint=fp, layer_id=lid, num_rows=num_rows, dim=dh, chunk_rows=1 << 20,
            meta={"sub_table_sizes": sizes, "note": "bench_bigtable: random rows"},
        )  # fmt: skip
        print(f"  written in {time.perf_counter() - t0:.0f} s")
    size = path.stat().st_size
    print(f"table file: {size / 2**30:.2f} GiB on disk, {num_rows:,} rows")
    if args.write_only:
        return
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start with a cold page cache
    os.close(fd)

    prefetcher = Prefetcher(max_pending=2)
    mm = MmapRowStore(path, expected_fingerprint=fp, check_bounds=False, willneed_max=WILLNEED_MAX)
    cache = CachedRowStore(mm, capacity_rows=args.cache_rows, check_bounds=False)
    stack = PrefetchingStore(cache, prefetcher)
    before_model = rss()
    disk = build_run(big, tokenizer=ref.tokenizer, stores={lid: stack})
    disk.model.eval()
    print(f"big model built (table never allocated): {rss()}")
    ref.model.eval()

    def run(parts, i: int) -> float:
        texts = [PROMPTS[(4 * i + j) % len(PROMPTS)] for j in range(4)]
        res = generate(
            parts.model, [ref.tokenizer.encode(t).ids for t in texts], indexer=parts.indexer,
            max_new_tokens=args.tokens, temperature=0.8, top_k=40, seed=i,
        )  # fmt: skip
        return res.tokens_per_s

    r_ram, r_disk = [], []
    for i in range(args.rounds):
        r_ram.append(run(ref, i))
        gc.collect()
        r_disk.append(run(disk, i))
        print(f"round {i}: RAM-table {r_ram[-1]:.1f} tok/s, {size / 2**30:.0f} GiB disk table "
              f"{r_disk[-1]:.1f} tok/s, cache hit rate {cache.stats().hit_rate:.1%}, rss {rss()}")  # fmt: skip
    ra, rd = statistics.median(r_ram[1:]), statistics.median(r_disk[1:])
    st = cache.stats()
    after = rss()
    model_mib = sum(p.numel() * p.element_size() for p in disk.model.parameters()) / 2**20
    print(
        f"\nround 0 (cold page cache, empty row cache): {r_disk[0]:.1f} vs {r_ram[0]:.1f} tok/s"
        f" ({(1 - r_disk[0] / r_ram[0]) * 100:+.1f}%)"
        f"\nmedian of later rounds (new text each round): small RAM table {ra:.1f} tok/s, {size / 2**30:.1f} GiB table on disk "
        f"{rd:.1f} tok/s ({(1 - rd / ra) * 100:+.1f}% slower)"
    )
    print(
        f"row cache: {st.capacity:,} rows ({cache.memory_bytes() / 2**20:.1f} MiB), "
        f"hit rate {st.hit_rate:.1%} over {st.lookups:,} row reads, {st.misses:,} misses"
    )
    print(f"prefetch: {stack.stats.as_dict()}")
    print(
        f"resident: {after['VmRSS']:.0f} MiB (anon {after['RssAnon']:.0f}, file {after['RssFile']:.0f})"
        f", peak {after['VmHWM']:.0f} MiB; before the model {before_model['VmRSS']:.0f} MiB; "
        f"dense model params {model_mib:.1f} MiB; table {size / 2**20:.0f} MiB"
    )
    prefetcher.close()
    mm.close()


if __name__ == "__main__":
    main()
