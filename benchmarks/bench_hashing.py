"""Hashing throughput: engram.hashing.NgramHasher against a plain numpy implementation of the
demo's algorithm (written here from SPEC section 3), side by side in one process.

Configuration (the demo's): V' = 99,092 compressed ids, orders 2-3, 8 heads per order, Engram
layers [1, 15], a batch of 8 x 4096 tokens, one thread. Both produce the same (B, T, 16) int64
rows for both layers; the script checks bit equality before timing.

Reported:
- plain: per layer, np.pad shifts, XOR of products, one `%` per head, np.stack (the demo's
  `_get_ngram_hashes`), each layer hashed once.
- demo flow: the demo's data flow, where every Engram layer's forward re-hashes all layers.
- engram: `hash_all` (one fused pass over all layers), with a fresh output array and with a
  reused output buffer (what a data loader does); with document resets at a separator; and its
  numpy fallback and torch paths.

Usage: python benchmarks/bench_hashing.py [--rounds 15] [--batch 8] [--seq 4096]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from engram.hashing import NgramHasher, kernel_available

V = 99_092
SIZES = [129280 * 5, 129280 * 5]
N, K, LAYERS, PAD, SEED = 3, 8, [1, 15], 2, 0
SEP = 1  # compressed id used as the end-of-document separator in the resets row


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


class PlainHasher:
    """The demo's NgramHashMapping, in plain numpy, from SPEC section 3."""

    def __init__(self) -> None:
        half = max(1, (np.iinfo(np.int64).max // V) // 2)
        self.mult = {}
        for layer in LAYERS:
            g = np.random.default_rng(SEED + 10007 * layer)
            self.mult[layer] = g.integers(0, half, size=(N,), dtype=np.int64) * 2 + 1
        seen: set[int] = set()
        self.sizes = {}
        for layer in LAYERS:
            per = []
            for n in range(2, N + 1):
                start, heads = SIZES[n - 2] - 1, []
                for _ in range(K):
                    c = start + 1
                    while not (_is_prime(c) and c not in seen):
                        c += 1
                    seen.add(c)
                    heads.append(c)
                    start = c
                per.append(heads)
            self.sizes[layer] = per

    def layer_hashes(self, x: np.ndarray, layer: int) -> np.ndarray:
        _, T = x.shape
        m = self.mult[layer]
        shifts = [
            x if k == 0 else np.pad(x, ((0, 0), (k, 0)), constant_values=PAD)[:, :T]
            for k in range(N)
        ]
        out = []
        for n in range(2, N + 1):
            mix = shifts[0] * m[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * m[k])
            for j in range(K):
                out.append((mix % int(self.sizes[layer][n - 2][j])).astype(np.int64, copy=False))
        return np.stack(out, axis=2)

    def hash(self, x: np.ndarray) -> dict[int, np.ndarray]:
        return {layer: self.layer_hashes(x, layer) for layer in LAYERS}


def timeit(fns: dict, rounds: int, inner: int = 10) -> dict[str, float]:
    """Median over rounds of the mean seconds per call in a block of ``inner`` calls.

    Candidates alternate block by block, so they share the machine's noise, while each block
    measures one implementation's steady state (its own allocations reused, as in a loop).
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)

    x = np.random.default_rng(0).integers(0, V, size=(args.batch, args.seq), dtype=np.int64)
    plain = PlainHasher()
    ours = NgramHasher(V, SIZES, N, K, LAYERS, PAD, SEED)
    ref = plain.hash(x)
    got = ours.hash_all(x)
    for i, layer in enumerate(LAYERS):
        assert np.array_equal(got[i], ref[layer]), f"layer {layer} differs"
    buf = np.empty_like(got)
    # The same ids with a document separator every ~850 tokens (a Bible chapter's length):
    # n-grams reset at each boundary. The plain implementation has no resets: informative row.
    xs = x.copy()
    xs[:, ::850] = SEP
    xt = torch.from_numpy(x)
    portable = NgramHasher(V, SIZES, N, K, LAYERS, PAD, SEED)
    portable._portable_kernel = True  # the scalar code path that CPUs without AVX-512 run
    sel = list(range(len(LAYERS)))

    fns = {
        "plain (each layer once)": lambda: plain.hash(x),
        "demo flow (re-hash per layer)": lambda: [plain.hash(x) for _ in LAYERS],
        "engram hash_all": lambda: ours.hash_all(x),
        "engram hash_all(out=buf)": lambda: ours.hash_all(x, out=buf),
        "engram hash_all(sep_id=...)": lambda: ours.hash_all(xs, sep_id=SEP, out=buf),
        "engram, portable C (no AVX-512)": lambda: portable.hash_all(x, out=buf),
        "engram numpy fallback": lambda: ours._run_numpy(x, None, None, sel, buf),
        "engram torch ops": lambda: ours._run_torch(xt, None, None, sel),
    }
    t = timeit(fns, args.rounds)
    tokens = x.size
    base = t["plain (each layer once)"]
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} | kernel built: {kernel_available()}"
    )
    print(
        f"batch {args.batch} x {args.seq} tokens, layers {LAYERS}, orders 2-{N}, {K} heads, 1 thread"
    )
    print(f"{'implementation':32s} {'ms':>8s} {'Mtok/s':>8s} {'vs plain':>9s}")
    for name, sec in t.items():
        print(f"{name:32s} {sec * 1e3:8.2f} {tokens / sec / 1e6:8.2f} {base / sec:8.2f}x")
    demo = t["demo flow (re-hash per layer)"]
    print(f"engram hash_all vs demo flow: {demo / t['engram hash_all']:.1f}x")


if __name__ == "__main__":
    main()
