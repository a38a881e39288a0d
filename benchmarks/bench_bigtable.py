"""A table larger than RAM serving generation: RAM vs mmap vs the row reader, side by side.

    python benchmarks/bench_bigtable.py [--size-gib 32] [--path /work/bigtable] [--tokens 64]
    python benchmarks/bench_bigtable.py --size-gib 2 --rounds 4     # a quick development run

Builds the demo Engram model's architecture with its Engram layer's sub-tables scaled up until
the table is `--size-gib` GiB (float32 rows; the hashing addresses the whole range), writes that
table to a `.engt` file chunk by chunk (reused on later runs), and serves it through the disk tier
(reader + hot-row cache + background prefetch) with each reader in `--readers`: "mmap"
(`MmapRowStore`, the kernel pages rows in) and "pread" (`PreadRowStore`, exactly the requested
rows). The yardstick, in the same process and on the same prompts, is the same architecture with
the demo's small table in RAM: they differ only in where the rows come from. Weights are untrained
(random): speed and memory do not depend on them. The two disk models share their weights and must
produce the same tokens (asserted): the readers return the same bits.

Rounds: 4 prompts x `--tokens` new tokens each. In every round each disk model runs as a PAIR
with the RAM model, the two decoding in lockstep (`engram.generate.Decoder`: one step of one,
then one step of the other, which goes first alternating by round), so both see the same slow
and fast moments of the machine; the speed ratio is the RAM pair member's summed decode-step
time over the disk member's (per round; medians and ranges reported), with the median of the
per-step ratios beside it. (Whole runs taking turns, as before 2026-12-03, gave per-round ratios
from 0.72 to 1.15 for the same configuration: the machine drifts within a second.)
- round 0, cold: the row caches are empty and the table file's pages are out of the page cache;
- rounds 1..R-1, "new text": new prompts and seed every round (the row caches keep what they
  learnt); rows not in the row cache come from the disk;
- then, after one unmeasured pass, the same prompts again ("repeat", warm): every row is in the
  page cache or the row cache.
Before every pair of the cold and new-text rounds the file is evicted from the page cache
(the mmap stores unmap their pages, MADV_DONTNEED, then POSIX_FADV_DONTNEED on the file): the two
disk models read the same rows, so without this the second to run would find the first's pages.
Speed ratios per reader (disk decode speed / RAM's); per reader: bytes read from storage per row
served (/proc/self/io read_bytes, and the reader's own counters), the hidden-read fraction (share
of row-read time that overlapped compute), the hot-row cache's hit rate; resident memory
(VmRSS = RssAnon + RssFile: mapped table pages count as RssFile, pread's page-cache pages do not).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import machine  # benchmarks/machine.py
import torch
from prompts import PROMPTS  # benchmarks/prompts.py: four per round, new text every round

from engram.generate import Decoder
from engram.presets import demo_engram
from engram.serving import TierConfig, open_table
from engram.store import CachedRowStore, Prefetcher, PrefetchingStore, read_header, write_table
from engram.store.pread import proc_read_bytes
from engram.train import build_run


def rss() -> dict[str, float]:
    """Resident memory of this process in MiB, split into anonymous and file-backed pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gib", type=float, default=32.0)
    p.add_argument("--path", default="/work/bigtable")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6, help="cold round + new-text rounds")
    p.add_argument("--repeat-rounds", type=int, default=3, help="warm rounds on round 1's text")
    p.add_argument("--cache-rows", type=int, default=200_000, help="hot-row cache (0 = none)")
    p.add_argument(
        "--readers", default="mmap,pread",
        help="comma-separated: mmap, pread; a /worker suffix (pread/worker) sends every prefetch "
        "to the worker whole (PrefetchingStore(serve_at_hand=False), the behaviour before "
        "2026-12-03)",
    )  # fmt: skip
    p.add_argument("--pread-threads", type=int, default=0)
    p.add_argument("--direct", action="store_true", help="pread with O_DIRECT")
    p.add_argument("--prefill-chunk", type=int, default=16, help="prefill chunk (all models)")
    p.add_argument("--write-only", action="store_true", help="write the table file and stop")
    args = p.parse_args()
    torch.set_num_threads(1)
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]

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
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(
        f"cpu: {machine.cpu_summary()}; torch {torch.__version__}, 1 thread; machine RAM {ram_gib:.1f} GiB"
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
        path.parent.mkdir(parents=True, exist_ok=True)
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
    row_bytes = dh * 4
    print(
        f"table file: {path} ({path.parent} on {os.statvfs(path.parent).f_bsize}-byte blocks), "
        f"{size / 2**30:.2f} GiB, {num_rows:,} rows x {row_bytes} B; table/RAM = "
        f"{size / 2**30 / ram_gib:.2f}"
    )
    print(
        f"config: 4 prompts x {args.tokens} tokens, sampled (T 0.8, top-k 40), prefill chunk "
        f"{args.prefill_chunk}, row cache {args.cache_rows:,} rows, prefetch on, readers {readers}"
        f" (pread threads {args.pread_threads}, direct {args.direct})"
    )
    if args.write_only:
        return
    data_offset = read_header(path).data_offset
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        rng = torch.Generator().manual_seed(99)
        probe = torch.randint(0, num_rows, (64,), generator=rng).tolist()
        buf = bytearray(row_bytes)
        lat = []
        for row in probe:  # one cold random row at a time: this disk's latency right now
            t0 = time.perf_counter()
            os.preadv(fd, [buf], data_offset + row * row_bytes)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    lat.sort()
    print(
        f"disk now: cold random {row_bytes}-byte reads, one at a time: median "
        f"{lat[len(lat) // 2] * 1e6:.0f} us, p90 {lat[int(len(lat) * 0.9)] * 1e6:.0f} us"
    )

    prefetcher = Prefetcher(max_pending=4)
    models: dict[str, Any] = {"ram": ref}
    tops: dict[str, PrefetchingStore] = {}
    caches: dict[str, CachedRowStore | None] = {}
    inners: dict[str, Any] = {}
    before_model = rss()
    for r in readers:
        kind, _, how = r.partition("/")  # "pread/worker": every prefetch gathered on the worker
        tier = TierConfig(
            store="mmap", reader=kind, reader_threads=args.pread_threads if kind == "pread" else 0,
            direct=args.direct and kind == "pread",
        )  # fmt: skip
        inner = open_table(path, tier, fp)
        store: Any = inner
        cache = None
        if args.cache_rows:
            store = cache = CachedRowStore(inner, capacity_rows=args.cache_rows, check_bounds=False)
        top = PrefetchingStore(store, prefetcher, serve_at_hand=how != "worker")
        torch.manual_seed(0)
        models[r] = build_run(big, tokenizer=ref.tokenizer, stores={lid: top})
        tops[r], caches[r], inners[r] = top, cache, inner
    print(f"big models built (table never allocated): {rss()}")
    for m in models.values():
        m.model.eval()
    io_bytes = dict.fromkeys(readers, 0)
    hidden: dict[str, list[float]] = {r: [] for r in readers}
    reads: dict[str, list[float]] = {r: [] for r in readers}
    tokens: dict[str, list[list[int]]] = {}

    def evict() -> None:
        for inner in inners.values():
            if hasattr(inner, "release_pages"):
                inner.release_pages()
        drop_cache(path)

    def decoder(name: str, text_round: int) -> Decoder:
        parts = models[name]
        texts = [PROMPTS[(4 * text_round + j) % len(PROMPTS)] for j in range(4)]
        return Decoder(
            parts.model, [ref.tokenizer.encode(t).ids for t in texts], indexer=parts.indexer,
            max_new_tokens=args.tokens, temperature=0.8, top_k=40, seed=text_round,
            prefill_chunk=args.prefill_chunk,
        )  # fmt: skip

    def pair(r: str, i: int, text_round: int, measured: bool = True) -> tuple[float, float]:
        """RAM and reader `r` in lockstep: (RAM time / disk time over the decode steps, the
        median of the per-step ratios)."""
        gc.collect()
        b0 = proc_read_bytes() or 0
        decs = {"ram": decoder("ram", text_round), r: decoder(r, text_round)}
        order = ["ram", r] if i % 2 == 0 else [r, "ram"]
        for n in order:
            decs[n].prefill()
        while not all(d.finished for d in decs.values()):
            for n in order:
                decs[n].step()
        ram_res, res = decs["ram"].result(), decs[r].result()
        if not measured:
            return 0.0, 0.0
        io_bytes[r] += (proc_read_bytes() or 0) - b0
        dec = res.stats["rows"]["decode"]
        hidden[r].append(dec["hidden_fraction"])
        reads[r].append(dec["read_s"] / max(res.steps, 1) * 1e3)
        tokens[r] = res.tokens
        a, b = ram_res.stats["decode_step_s"], res.stats["decode_step_s"]
        return sum(a) / sum(b), statistics.median(x / y for x, y in zip(a, b, strict=True))

    speed: dict[str, list[float]] = {r: [] for r in readers}
    step_ratio: dict[str, list[float]] = {r: [] for r in readers}
    kinds: list[str] = []
    total = args.rounds + args.repeat_rounds
    for i in range(total):
        kind = "cold" if i == 0 else ("new text" if i < args.rounds else "repeat")
        text_round = i if i < args.rounds else 1
        if i == args.rounds:  # warm the page cache and the row caches on the repeated text
            for r in readers:
                pair(r, i, text_round, measured=False)
        for r in readers[i % len(readers) :] + readers[: i % len(readers)]:
            if kind != "repeat":
                evict()
            ratio, per_step = pair(r, i, text_round)
            speed[r].append(ratio)
            step_ratio[r].append(per_step)
        for r in readers[1:]:
            assert tokens[r] == tokens[readers[0]], f"round {i}: {r} and {readers[0]} disagree"
        kinds.append(kind)
        line = ", ".join(
            f"{r} {speed[r][-1]:.3f}x (steps {step_ratio[r][-1]:.3f}x)" for r in readers
        )
        print(f"round {i} ({kind}): speed vs RAM {line}; rss {rss()}", flush=True)

    print("\ndecode speed vs the RAM model decoding in lockstep (RAM time / disk time):")
    for kind in ("cold", "new text", "repeat"):
        if kind not in kinds:
            continue
        parts_ = []
        for r in readers:
            v = [x for x, k in zip(speed[r], kinds, strict=True) if k == kind]
            st = [x for x, k in zip(step_ratio[r], kinds, strict=True) if k == kind]
            med = statistics.median(v)
            parts_.append(
                f"{r} {med:.3f}x ({(1 / med - 1) * 100:+.1f}% time; rounds "
                f"{min(v):.3f}-{max(v):.3f}; per-step median {statistics.median(st):.3f}x)"
            )
        print(f"  {kind:8s} ({len(v)} rounds): " + "; ".join(parts_))
    print("\nper reader (all rounds):")
    for r in readers:
        top, cache, inner = tops[r], caches[r], inners[r]
        st = inner.stats()
        served = st.rows_served
        line = (
            f"  {r}: rows served by the reader {served:,}, "
            f"/proc/self/io read_bytes {io_bytes[r] / 2**20:.1f} MiB = "
            f"{io_bytes[r] / max(served, 1):.0f} B per row served ({row_bytes} B rows)"
        )
        if r.startswith("pread"):
            line += (
                f"; own counters: {st.rows_read:,} distinct rows read, {st.reads:,} reads "
                f"({st.cached_reads:,} from the page cache), {st.bytes_read / 2**20:.2f} MiB = "
                f"{st.bytes_per_row_served:.0f} B per row served"
            )
        print(line)
        pst = top.stats
        print(
            f"     read time {st.read_time_s:.2f} s in the reader; prefetch: "
            f"{pst.prefetched_hits} gathers served, read {pst.read_time_s:.2f} s, blocked "
            f"{pst.exposed_time_s:.2f} s, hidden {pst.hidden_fraction:.1%}; decode per round: "
            f"hidden {[f'{h:.0%}' for h in hidden[r]]}, read ms/step "
            f"{[f'{x:.2f}' for x in reads[r]]}"
        )
        if cache is not None:
            cs = cache.stats()
            print(
                f"     row cache {cs.capacity:,} rows ({cache.memory_bytes() / 2**20:.1f} MiB): "
                f"hit rate {cs.hit_rate:.1%} over {cs.lookups:,} lookups"
            )
    after = rss()
    model_mib = sum(q.numel() * q.element_size() for q in models[readers[0]].model.parameters())
    print(
        f"\nresident: {after['VmRSS']:.0f} MiB (anon {after['RssAnon']:.0f}, file "
        f"{after['RssFile']:.0f}), peak {after['VmHWM']:.0f} MiB; before the disk models "
        f"{before_model['VmRSS']:.0f} MiB; dense params per model {model_mib / 2**20:.1f} MiB; "
        f"table {size / 2**20:.0f} MiB"
    )
    prefetcher.close()
    for inner in inners.values():
        inner.close()


if __name__ == "__main__":
    main()
