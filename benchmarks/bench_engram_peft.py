"""engram against the PyPI package `engram-peft==1.2.7`: does it import, and its n-gram hashing.

    pip install --no-deps --target /tmp/ep_site engram_peft-1.2.7-py3-none-any.whl
    python benchmarks/bench_engram_peft.py [--site /tmp/ep_site] [--rounds 15]

What is measured, and how (nothing here imports engram-peft into the main environment):
1. Import: `import engram_peft` in a subprocess with `--site` (a `pip install --no-deps --target`
   directory) on PYTHONPATH; its error is printed as it comes. A second subprocess defines
   `typing.override` (Python 3.12+, missing on 3.11) first, to show what fails next; that is a
   diagnosis only, nothing below depends on it.
2. Its hashing, loaded ALONE: `engram_peft/hashing.py` is executed from its file as a standalone
   module (it has no package-relative imports; it needs numpy, torch and sympy), so the package's
   `__init__`, which is what fails, never runs. Its class `NgramHashMapping` (the "deepseek"
   engine) is used exactly as shipped.
3. Agreement with engram's reference-exact `engram.hashing.NgramHasher` on the SAME compressed
   ids (the demo's configuration, as in `bench_hashing.py`: V' = 99,092 uniform random ids,
   orders 2-3, 8 heads per order, layers [1, 15], pad 2, seed 0, 8 x 4096 tokens): the fraction
   of positions where every row of a layer (all 16 sub-tables) is equal, per layer and for both
   layers, and per order. Two ways of passing the configuration:
   a. as documented: `engram_vocab_size_per_ngram` = the per-order size engram takes (its
      default is the demo's); engram-peft divides it among the heads, so its primes are 8x
      smaller and rows cannot agree;
   b. sizes scaled by the heads, so its prime moduli are engram's exactly (checked): what is
      left is the mixing of the ids.
   A diagnosis re-computes engram-peft's rows from engram's multipliers and primes with two
   changes to the reference formula (the n-gram window and the multiplier order, read from its
   source) and checks it reproduces them bit for bit.
4. Throughput, one thread, on configuration b (equal primes, equal work: (8, 4096, 16) rows for
   both layers): engram-peft's `hash(ids)` against engram's `hash_all(ids)` (fresh output) and
   `hash_all(ids, out=buf)`; median over rounds of 5-call blocks, candidates alternating.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from engram.hashing import NgramHasher, kernel_available

V = 99_092
SIZE = 129280 * 5
N, K, LAYERS, PAD, SEED = 3, 8, [1, 15], 2, 0
VERSION = "1.2.7"


def cpu_line() -> str:
    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = [f for f in ("avx2", "fma", "avx512f", "avx512dq") if f in flags]
    return (
        f"cpu: {model} | flags: {' '.join(have)} | python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__} | engram C kernel: {kernel_available()}"
    )


def installed_version(site: Path) -> str | None:
    for d in site.glob("engram_peft-*.dist-info"):
        return d.name.removeprefix("engram_peft-").removesuffix(".dist-info")
    return None


def try_import(site: Path, prelude: str = "") -> str:
    """`import engram_peft` in a fresh interpreter: 'ok' or the last line of its error."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = f"{prelude}\nimport engram_peft\nprint('ok', engram_peft.__file__)"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    if r.returncode == 0:
        return r.stdout.strip()
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    where = [ln.strip() for ln in lines if ln.strip().startswith("File ")]
    return (
        f"{lines[-1] if lines else 'exit ' + str(r.returncode)}  (at {where[-1] if where else '?'})"
    )


def load_hashing(site: Path) -> ModuleType:
    """engram_peft/hashing.py executed alone, as module `engram_peft_hashing_standalone`."""
    path = site / "engram_peft" / "hashing.py"
    spec = importlib.util.spec_from_file_location("engram_peft_hashing_standalone", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def peft_rows(mapping: Any, x: np.ndarray) -> np.ndarray:
    """engram-peft's rows as (L, B, T, H), layers in LAYERS order."""
    out = mapping.hash(x)
    return np.stack([np.asarray(out[layer], dtype=np.int64) for layer in LAYERS])


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Fractions of positions where all rows agree: per layer, both layers, per order."""
    eq = a == b  # (L, B, T, H)
    res = {f"layer {layer}": float(eq[i].all(-1).mean()) for i, layer in enumerate(LAYERS)}
    res["both layers"] = float(eq.all(-1).all(0).mean())
    for n in range(2, N + 1):
        heads = slice((n - 2) * K, (n - 1) * K)
        res[f"order {n} (both layers)"] = float(eq[..., heads].all(-1).all(0).mean())
    res["single rows"] = float(eq.mean())
    return res


def diagnosis_rows(ours: NgramHasher, x: np.ndarray) -> np.ndarray:
    """engram-peft's formula written with engram's multipliers and primes.

    Reference (engram, the DeepSeek demo): row_n(t) = (XOR_{k<n} x[t-k] * m_k) mod p.
    engram-peft: window w = padded[t : t+n] = x[t-(N-1)], ..., x[t-(N-1)+n-1] (left-padded by N-1
    for every order, so for n < N the window ends before t), and w[j] * m_j: the multipliers run
    oldest-first.
    """
    B, T = x.shape
    padded = np.concatenate([np.full((B, N - 1), PAD, np.int64), x], axis=1)
    out = np.empty((len(LAYERS), B, T, (N - 1) * K), np.int64)
    for li, layer in enumerate(LAYERS):
        m, primes = ours.multipliers(layer), ours.table_sizes(layer)
        for n in range(2, N + 1):
            mix = np.zeros((B, T), np.int64)
            for j in range(n):
                mix ^= padded[:, j : j + T] * m[j]
            p = np.array(primes[n - 2], np.int64)
            out[li, :, :, (n - 2) * K : (n - 1) * K] = mix[..., None] % p
    return out


def timeit(fns: dict[str, Callable[[], object]], rounds: int, inner: int = 5) -> dict[str, float]:
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
    ap.add_argument("--site", default="/tmp/ep_site", help="pip install --no-deps --target DIR")
    ap.add_argument("--wheel", default=f"/tmp/ep/engram_peft-{VERSION}-py3-none-any.whl")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())

    site = Path(args.site)
    if installed_version(site) is None:
        if not Path(args.wheel).is_file():
            sys.exit(
                f"engram-peft is not in {site} and no wheel at {args.wheel}: run "
                f"`pip download engram-peft=={VERSION} --no-deps` and pass --wheel"
            )
        print(f"installing {args.wheel} into {site} (pip --no-deps --target)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
             args.wheel], check=True,
        )  # fmt: skip
    version = installed_version(site)
    print(f"engram-peft {version} in {site} (installed with --no-deps, outside the environment)")
    if version != VERSION:
        print(f"  note: this benchmark was written against {VERSION}")

    print("\n1. import engram_peft:")
    print(f"   as installed:                {try_import(site)}")
    shim = "import typing\nif not hasattr(typing, 'override'):\n    typing.override = lambda f: f"
    print(f"   with typing.override shimmed: {try_import(site, shim)}")

    print("\n2. engram_peft/hashing.py executed alone (the package __init__ is NOT run)")
    hp = load_hashing(site)
    x = np.random.default_rng(0).integers(0, V, size=(args.batch, args.seq), dtype=np.int64)
    ours = NgramHasher(V, [SIZE, SIZE], N, K, LAYERS, PAD, SEED)
    ref = ours.hash_all(x)  # (L, B, T, H)

    def mapping(per_order: int) -> Any:
        return hp.NgramHashMapping(
            compressed_vocab_size=V, engram_vocab_size_per_ngram=[per_order, per_order],
            ngram_sizes=[2, 3], max_ngram_size=N, n_head_per_ngram=K, layer_ids=list(LAYERS),
            pad_id=PAD, seed=SEED,
        )  # fmt: skip

    as_doc, scaled = mapping(SIZE), mapping(SIZE * K)
    for name, mp in (("a. as documented", as_doc), ("b. sizes x heads", scaled)):
        same_mult = all(
            np.array_equal(mp.all_multipliers[layer], ours.multipliers(layer)) for layer in LAYERS
        )
        same_primes = all(mp.prime_tables[layer] == ours.table_sizes(layer) for layer in LAYERS)
        first = mp.prime_tables[LAYERS[0]][0][:2]
        print(
            f"\n3{name[0]}. {name[3:]}: engram_vocab_size_per_ngram={mp.engram_vocab_size_per_ngram}"
            f"; multipliers equal engram's: {same_mult}; primes equal: {same_primes} "
            f"(its first two: {first}, engram's: {ours.table_sizes(LAYERS[0])[0][:2]})"
        )
        got = peft_rows(mp, x)
        for k, v in agreement(got, ref).items():
            print(f"     positions with all rows equal, {k:22s} {v:8.4%}")

    got_b = peft_rows(scaled, x)
    diag = diagnosis_rows(ours, x)
    print(
        "\n   diagnosis: engram-peft's rows == the reference formula with its window and "
        f"multiplier order (engram's multipliers and primes): {np.array_equal(got_b, diag)}"
    )

    print(f"\n4. throughput, one thread, {args.batch} x {args.seq} tokens, config b (equal primes)")
    buf = np.empty_like(ref)
    fns: dict[str, Callable[[], object]] = {
        "engram-peft NgramHashMapping.hash": lambda: scaled.hash(x),
        "engram hash_all (fresh output)": lambda: ours.hash_all(x),
        "engram hash_all(out=buf)": lambda: ours.hash_all(x, out=buf),
    }
    t = timeit(fns, args.rounds)
    base = t["engram-peft NgramHashMapping.hash"]
    for name, sec in t.items():
        print(
            f"   {name:36s} {sec * 1e3:8.2f} ms  {x.size / sec / 1e6:7.2f} M tok/s  "
            f"{base / sec:6.2f}x engram-peft"
        )


if __name__ == "__main__":
    main()
