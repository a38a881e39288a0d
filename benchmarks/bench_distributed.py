"""Distributed training on this machine: row exchange volume and the time split, 1 vs 2 processes.

Runs the same config three ways, one after the other from this one script:
  - `plain`: one process, `engram.run.train` with the table in RAM (the yardstick);
  - `nproc=1`: the distributed code path on one rank (gloo; every lookup is a local all-to-all);
  - `nproc=2`: two ranks, tables row-sharded, DDP on the dense weights (`engram train --nproc 2`).
Each run logs, per step, what rank 0 sent to the other rank and how long its exchanges took
(`xchg_*` in metrics.jsonl, from `ShardedRowStore.stats`). This prints per-step medians:
  - rows received from the other rank against the ideal, the unique rows this rank needed from
    it times the row size, and against an exchange without deduplication (every looked-up id
    owned elsewhere); and everything this rank sent (ids, rows it served, row gradients);
  - the step split into lookup exchange (3 all-to-alls), gradient exchange (1 all-to-all in
    backward) and the rest (compute, including DDP's dense all-reduce); and the all-reduce's own
    in-flight time (issue to completion per bucket, summed: it overlaps backward) and bytes;
  - tokens/s against the plain run, and the final loss of each run (they agree).

With `--exchange`, instead: the row exchange alone on 2 ranks (gloo over loopback), unique
ids from 1k to 256k per rank, to read off the all-to-all's fixed cost and bandwidth here
(the constants of the scaling arithmetic in docs/distributed.md).

Usage: python benchmarks/bench_distributed.py [--steps 30] [--rounds 2] [--preset demo-engram]
       [--set K=V ...]
       python benchmarks/bench_distributed.py --exchange [--dim 80]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from engram.presets import preset
from engram.run_config import apply_overrides

SKIP = 3  # first steps pay one-off allocation and connection costs


def _run(kind: str, cfg_path: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "engram", "train", "--config", str(cfg_path), "--out", str(out),
           "--no-progress"]  # fmt: skip
    if kind != "plain":
        cmd += ["--nproc", kind.split("=")[1]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{r.stdout}\n{r.stderr}")


def _median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records[SKIP:])


def _exchange_worker(rank: int, world: int, port: int, dim: int, out: str) -> None:
    """One rank of `--exchange`: time gather (3 all-to-alls) and its backward (1) per size."""
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    from engram.parallel import init_from_env, shutdown
    from engram.store.sharded import ShardedRowStore

    ctx = init_from_env("cpu", timeout_s=120)
    num_rows = 4_000_000
    store = ShardedRowStore(num_rows, dim, ctx.table_group, init=False, check_bounds=False)
    store.weight.uniform_()  # touch every page: first-touch faults are not the exchange's cost
    gen = torch.Generator().manual_seed(rank)
    results = []
    for n in (1_000, 4_000, 16_000, 64_000, 256_000):
        fwd, bwd = [], []
        draws = [torch.randperm(num_rows, generator=gen)[:n] for _ in range(12)]  # unique ids
        for ids in draws:
            ctx.barrier("benchmark")  # start together: the timings hold no rank skew
            store.stats.reset()
            rows = store.gather(ids)  # (n, dim)
            rows.sum().backward()
            store.zero_grad()
            fwd.append(store.stats.forward_s)
            bwd.append(store.stats.backward_s)
        results.append(
            {"n": n, "remote": store.stats.remote_ids, "row_bytes": store.stats.row_bytes_received,
             "fwd_s": statistics.median(fwd[2:]), "bwd_s": statistics.median(bwd[2:])}
        )  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    shutdown(ctx)


def exchange_main(dim: int) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "exchange.json")
        mp.spawn(_exchange_worker, args=(2, port, dim, out), nprocs=2, join=True)
        results = json.loads(Path(out).read_text())
    print(f"row exchange alone, 2 ranks over gloo loopback, rows of {dim} fp32 ({dim * 4} B), "
          "1 thread each; medians of 10")  # fmt: skip
    print()
    print("| unique ids per rank | remote | rows received | lookup (3 all-to-alls + row gather) ms "
          "| gradient (1 all-to-all) ms | gradient MB/s |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        mbps = r["row_bytes"] / r["bwd_s"] / 1e6
        print(
            f"| {r['n']:,} | {r['remote']:,} | {r['row_bytes'] / 1e6:.2f} MB | "
            f"{r['fwd_s'] * 1e3:.2f} | {r['bwd_s'] * 1e3:.2f} | {mbps:,.0f} |"
        )
    rates = [r["row_bytes"] / r["bwd_s"] for r in results]
    print(
        f"\ngradient all-to-all: {results[0]['bwd_s'] * 1e3:.2f} ms at the smallest size (its "
        f"fixed cost, a), peak {max(rates) / 1e9:.2f} GB/s, {rates[-1] / 1e9:.2f} GB/s at "
        f"{results[-1]['row_bytes'] / 1e6:.0f} MB (B; not linear: large buffers slow down here)"
    )


def _ratio(a: float, ideal: float) -> str:
    return f"{a / ideal:.2f}x" if ideal else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="demo-engram")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each kind, alternating")
    ap.add_argument("--exchange", action="store_true", help="time the row exchange alone")
    ap.add_argument("--dim", type=int, default=80, help="row width for --exchange")
    args = ap.parse_args()
    if args.exchange:
        exchange_main(args.dim)
        return
    cfg = apply_overrides(
        preset(args.preset),
        [f"train.steps={args.steps}", "train.eval_every=0", "train.final_eval_batches=4",
         "train.ckpt_every=0", *args.set],
    )  # fmt: skip
    assert cfg.engram is not None, "the benchmark needs an Engram model"
    e = cfg.engram
    row_bytes = e.head_dim * 4
    print(
        f"config {cfg.name}: batch {cfg.data.batch_size} x {cfg.data.seq_len} tokens (global), "
        f"Engram layers {list(e.layer_ids)}, rows of {e.head_dim} fp32 ({row_bytes} B), "
        f"{args.steps} steps (medians over steps {SKIP + 1}..{args.steps}); "
        f"{os.cpu_count()} cores"
    )
    # Kinds alternate round by round so that slow phases of a noisy machine hit all of them;
    # each kind reports its fastest round (median step of that run) and the others' spread.
    rounds: dict[str, list[list[dict]]] = {k: [] for k in ("plain", "nproc=1", "nproc=2")}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "cfg.json"
        cfg.save(cfg_path)
        for i in range(args.rounds):
            for kind in rounds:
                out = Path(tmp) / f"{kind.replace('=', '')}-{i}"
                _run(kind, cfg_path, out)
                lines = (out / "metrics.jsonl").read_text().splitlines()
                rounds[kind].append([json.loads(x) for x in lines])
    runs = {k: min(rs, key=lambda r: _median(r, "step_s")) for k, rs in rounds.items()}
    spread = {k: sorted(_median(r, "step_s") * 1e3 for r in rs) for k, rs in rounds.items()}

    base_step = _median(runs["plain"], "step_s")
    print()
    print("| run | step ms | all rounds ms | tokens/s | vs plain | lookup exchange ms "
          "| gradient exchange ms | rest (compute + dense all-reduce) ms "
          "| dense all-reduce in flight ms (MB) | final loss |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, records in runs.items():
        step = _median(records, "step_s")
        tok = _median(records, "tokens_per_s")
        fwd = _median(records, "xchg_forward_s") if "xchg_forward_s" in records[0] else 0.0
        bwd = _median(records, "xchg_backward_s") if "xchg_backward_s" in records[0] else 0.0
        ddp = (
            f"{_median(records, 'ddp_allreduce_s') * 1e3:.1f} "
            f"({_median(records, 'ddp_allreduce_bytes') / 1e6:.1f})"
            if "ddp_allreduce_s" in records[0] else "-"
        )  # fmt: skip
        print(
            f"| {kind} | {step * 1e3:.1f} | {' / '.join(f'{t:.0f}' for t in spread[kind])} | "
            f"{tok:,.0f} | {base_step / step:.2f}x | "
            f"{fwd * 1e3:.2f} | {bwd * 1e3:.2f} | {(step - fwd - bwd) * 1e3:.1f} | {ddp} | "
            f"{records[-1]['loss']:.5f} |"
        )

    print()
    print("| rank 0, per step | ids looked up | unique | unique on the other rank | rows received "
          "| ideal (unique remote x row) | received / ideal | without dedup (remote ids x row) "
          "| sent: ids + rows + grads | sent / ideal |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("nproc=1", "nproc=2"):
        records = runs[kind]
        m = {k: _median(records, f"xchg_{k}") for k in (
            "ids", "unique_ids", "remote_ids", "remote_ids_dup", "id_bytes_sent",
            "row_bytes_sent", "row_bytes_received", "grad_bytes_sent",
        )}  # fmt: skip
        ideal = m["remote_ids"] * row_bytes
        sent = m["id_bytes_sent"] + m["row_bytes_sent"] + m["grad_bytes_sent"]
        print(
            f"| {kind} | {m['ids']:,.0f} | {m['unique_ids']:,.0f} | {m['remote_ids']:,.0f} | "
            f"{m['row_bytes_received']:,.0f} B | {ideal:,.0f} B | "
            f"{_ratio(m['row_bytes_received'], ideal)} | {m['remote_ids_dup'] * row_bytes:,.0f} B "
            f"| {m['id_bytes_sent']:,.0f} + {m['row_bytes_sent']:,.0f} + "
            f"{m['grad_bytes_sent']:,.0f} = {sent:,.0f} B | {_ratio(sent, ideal)} |"
        )
    print()
    for step in (1, 5, len(runs["plain"])):
        losses = {k: runs[k][step - 1]["loss"] for k in runs}
        spread = max(losses.values()) - min(losses.values())
        print(f"training loss at step {step}: " + ", ".join(
            f"{k} {v:.6f}" for k, v in losses.items()) + f" (spread {spread:.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
