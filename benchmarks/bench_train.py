"""Training benchmarks: Engram vs its iso-parameter MoE baseline, speed and quality.

    python benchmarks/bench_train.py speed   [--steps 30] [--variants]
    python benchmarks/bench_train.py quality [--seeds 0 1] [--steps 200] [--out runs/bench]

speed: both models (the demo presets) are built in one process and trained on the SAME batches
with their steps interleaved (A, B, A, B, ...), so machine noise hits both alike; the median step
time of each and their ratio are printed. Steps include the optimizer and, for Engram, the row
gather, sparse gradients and SparseAdam; batches (and their hash rows) are prepared beforehand,
as the background loader does during training. `--variants` also times bf16 autocast and
torch.compile for the Engram model against its plain fp32 eager step.

quality: trains both models with `engram.run.train` for each seed (seeds change model init and
batch order; the validation split is fixed) and prints final validation losses, their paired
difference, and tokens/s. The corpus is the demo's (King James Version, 5% of chapters held out).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from engram.data import BatchLoader, prepare_data
from engram.data.tokenize import data_tokenizer
from engram.demo import demo_configs
from engram.optim import build_optimizer
from engram.run import train
from engram.run_config import apply_overrides
from engram.tokenizer import separator_id
from engram.train import build_run


def _stepper(cfg, bf16=False, compile_=False):
    parts = build_run(cfg)
    model = parts.model
    opt = build_optimizer(model, cfg.optim)
    fwd = torch.compile(model) if compile_ else model

    def step(batch):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fwd(batch.x, batch.rows, targets=batch.y)
        (out.loss + out.aux_loss).backward()
        opt.clip_grad_norm()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        return time.perf_counter() - t0, float(out.loss.detach())

    return parts, step


def speed(args: argparse.Namespace) -> None:
    base_cfg, eng_cfg, plan = demo_configs()
    tok = data_tokenizer(base_cfg.data)
    data = prepare_data(base_cfg.data, tok, separator_id(tok))
    eng_parts, eng_step = _stepper(eng_cfg)
    _, base_step = _stepper(base_cfg)
    loader = BatchLoader(data.train, eng_cfg.data, eng_parts.indexer, seed=0)
    batches = [loader.make_batch(i) for i in range(args.steps)]
    loader.close()
    no_rows = [replace(b, rows=None) for b in batches]
    contenders = {"moe fp32": (base_step, no_rows), "engram fp32": (eng_step, batches)}
    if args.variants:
        contenders["engram bf16"] = (_stepper(eng_cfg, bf16=True)[1], batches)
        contenders["moe bf16"] = (_stepper(base_cfg, bf16=True)[1], no_rows)
        t0 = time.perf_counter()
        compiled = _stepper(eng_cfg, compile_=True)[1]
        compiled(batches[0])  # compile outside the timed loop
        print(f"torch.compile warm-up: {time.perf_counter() - t0:.1f}s")
        contenders["engram compile"] = (compiled, batches)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(args.steps):
        for name, (fn, bs) in contenders.items():
            dt, _ = fn(bs[i])
            if i >= 2:  # the first steps allocate optimizer state
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = base_cfg.data.batch_size * base_cfg.data.seq_len
    print(f"{args.steps} interleaved steps of {tokens} tokens, {torch.get_num_threads()} threads")
    print(f"active FLOPs/token gap (plan): {plan.flops_gap:+.3%}")
    for name, m in med.items():
        print(
            f"  {name:15s} median {m * 1000:7.1f} ms  ({tokens / m:7.0f} tok/s)  "
            f"vs moe fp32: {m / med['moe fp32']:.3f}x"
        )


def quality(args: argparse.Namespace) -> None:
    base_cfg, eng_cfg, plan = demo_configs()
    tok = data_tokenizer(base_cfg.data)
    data = prepare_data(base_cfg.data, tok, separator_id(tok))
    rows = []
    for seed in args.seeds:
        pair = []
        for cfg in (base_cfg, eng_cfg):
            cfg = apply_overrides(cfg, [f"train.seed={seed}", f"train.steps={args.steps}"])
            out = Path(args.out) / f"seed{seed}" / cfg.name
            r = train(cfg, out, progress=False, data=data)
            pair.append(r)
            print(f"seed {seed} {cfg.name:7s} val {r.val_loss:.4f}  {r.tokens_per_s:6.0f} tok/s")
        rows.append(pair)
    print(f"\ncorpus {base_cfg.data.source}, {args.steps} steps x "
          f"{base_cfg.data.batch_size * base_cfg.data.seq_len} tokens, rho={plan.rho}")  # fmt: skip
    print("seed  moe val  engram val  diff (engram - moe)  step-time ratio")
    for seed, (b, e) in zip(args.seeds, rows, strict=True):
        print(
            f"{seed:4d}  {b.val_loss:7.4f}  {e.val_loss:10.4f}  {e.val_loss - b.val_loss:+19.4f}"
            f"  {e.step_time_s / b.step_time_s:15.3f}"
        )
    diffs = [e.val_loss - b.val_loss for b, e in rows]
    print(f"mean diff {statistics.mean(diffs):+.4f} over {len(diffs)} seed(s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--variants", action="store_true", help="also bf16 and torch.compile")
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--out", default="runs/bench-quality")
    args = p.parse_args()
    speed(args) if args.mode == "speed" else quality(args)


if __name__ == "__main__":
    main()
