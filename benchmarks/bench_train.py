"""Training benchmarks: Engram vs its iso-FLOP MoE baseline, the trainer vs a bare loop, quality.

    python benchmarks/bench_train.py speed     [--steps 30] [--variants] [--quick]
    python benchmarks/bench_train.py breakdown [--steps 30] [--quick]
    python benchmarks/bench_train.py yardstick [--steps 40] [--rounds 2] [--model both]
    python benchmarks/bench_train.py quality   [--seeds 0 1] [--steps 200] [--out runs/bench]
    (any mode) --avx2-only: re-run with numpy, PyTorch and oneDNN/MKL limited to AVX2 and the
    hashing kernel's avx2 path (portable where the kernel has none), as on an AVX2-only CPU.

Every mode first prints the machine: CPU model, the SIMD flags found, PyTorch's kernel
capability, threads, the hashing path, and the emulation variables set. Models are the demo
presets (`engram.demo.demo_configs`; `--quick`: the `--quick` presets, the same models) with
one PyTorch thread, as the demo trains them.

Timing is wall time; `--cpu-time` (speed, breakdown) uses the main thread's CPU time instead,
which a machine shared with other work disturbs far less (PyTorch runs one thread here, so all
of a step's compute is on it; memory and cache contention still show).

speed: both models built in one process and trained on the SAME batches with their steps
interleaved (A, B, A, B, ...), so machine noise hits both alike; median step time of each and
the ratio. Batches (and their hash rows) are made beforehand, as the loader's thread does.
`--variants` also times bf16 autocast and torch.compile.

breakdown: where the Engram model's extra step time goes. (1) The step split into phases
(forward, backward, clipping, AdamW, the tables' sparse Adam, zeroing + router biases), both
models interleaved; (2) isolated forward+backward of the parts that differ, on the inputs they
see in a real step: the Engram layer and its pieces (row gather, gate = key projection and
norms, value projection, short conv), the four MoE feed-forwards (32 experts vs 24), and making
one batch (windows + hashing, what the loader's thread does per step).

yardstick: the trainer's step against a bare PyTorch loop of the same model. The trainer is
`engram.run.train` as the demo calls it (loader thread, metrics.jsonl, progress off, final
checkpoint; its `step_s` excludes validation and checkpoints); the bare loop is forward,
backward, clip, optimizer step, zero_grad and router-bias update on the same precomputed
batches (no loader, no metrics, no checkpoints). Rounds alternate the order (trainer first,
then bare first, ...). Prints both medians, trainer throughput / bare throughput (target
>= 0.95) and checks that both produced the same losses bit for bit. Then the achieved FLOP/s of
a step, convention: the planner's forward FLOPs/token (`engram.model.flops_per_token`: 2 per
multiply-accumulate of every weight, plus attention scores) x tokens per step x 3 (backward =
2 x forward), against a plain matmul of the output layer's shape on the same thread count
(h (tokens x d_model) @ W^T (d_model x vocab) forward, and its two backward matmuls, 6 x tokens
x d_model x vocab FLOPs): how close a step comes to what this machine does on a dense matmul.

quality: trains both models with `engram.run.train` for each seed (seeds change model init and
batch order; the validation split is fixed) and prints final validation losses, their paired
difference, and tokens/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import machine  # benchmarks/machine.py
import numpy as np
import torch

from engram import hashing
from engram.data import BatchLoader, prepare_data
from engram.data.loader import Batch
from engram.data.tokenize import data_tokenizer
from engram.demo import demo_configs
from engram.model import flops_per_token
from engram.optim import build_optimizer, lr_multiplier
from engram.run import train
from engram.run_config import RunConfig, apply_overrides
from engram.tokenizer import separator_id
from engram.train import build_run

_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512dq", "avx512bw",
               "avx512vl", "avx512_bf16", "amx_tile", "asimd", "sve")  # fmt: skip


# ----------------------------------------------------------------------------- the machine
def print_machine() -> None:
    """CPU model and flags, PyTorch's capability and threads, hashing path, emulation."""
    model, flags = machine.cpu_model_and_flags()
    have = set(flags)
    print(f"cpu: {model} ({platform.machine()}, {os.cpu_count()} logical CPUs)")
    print("cpu flags: " + " ".join(f"{f}={'yes' if f in have else 'no'}" for f in _SIMD_FLAGS))
    _, np_active = machine.numpy_simd()
    print(
        f"torch {torch.__version__}: kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} thread(s); numpy {np.__version__} SIMD targets active: "
        f"{' '.join(np_active) or 'none'}"
    )
    print(
        f"engram hashing: path {hashing.kernel_path()} (available {', '.join(hashing.available_paths())})"
    )
    env = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
           "MKL_ENABLE_INSTRUCTIONS", "NPY_DISABLE_CPU_FEATURES", hashing.HASH_PATH_ENV)
           if k in os.environ]  # fmt: skip
    emulated = machine.emulated()
    print(f"AVX2-only emulation: {'on (' + ', '.join(env) + ')' if emulated else 'off'}")
    if env and not emulated:
        print("environment: " + ", ".join(env))


# ------------------------------------------------------------------------------- shared bits
def _data(cfg: RunConfig) -> Any:
    tok = data_tokenizer(cfg.data)
    return prepare_data(cfg.data, tok, separator_id(tok))


def _batches(cfg: RunConfig, parts: Any, data: Any, n: int) -> list[Batch]:
    """The trainer's batches for steps 0..n-1 (same seed), made synchronously."""
    loader = BatchLoader(data.train, cfg.data, parts.indexer, seed=cfg.train.seed)
    try:
        return [loader.make_batch(i) for i in range(n)]
    finally:
        loader.close()


def _stepper(
    cfg: RunConfig,
    bf16: bool = False,
    compile_: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Any, Callable]:
    """A bare training step of a freshly built `cfg` model: batch -> (seconds, loss)."""
    parts = build_run(cfg)
    model = parts.model
    opt = build_optimizer(model, cfg.optim)
    fwd = torch.compile(model) if compile_ else model
    oc, tc = cfg.optim, cfg.train

    def step(batch: Batch) -> tuple[float, float]:
        t0 = clock()
        opt.set_lr(lr_multiplier(batch.step, tc.steps, oc.warmup_steps, oc.min_lr_ratio))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fwd(batch.x, batch.rows, targets=batch.y)
        (out.loss + out.aux_loss).backward()
        loss = float(out.loss.detach())
        opt.clip_grad_norm()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
        return clock() - t0, loss

    return parts, step


def _clock(args: argparse.Namespace) -> Callable[[], float]:
    """Wall time, or with --cpu-time this thread's CPU time (steady on a shared machine)."""
    return time.thread_time if args.cpu_time else time.perf_counter


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


# ---------------------------------------------------------------------------------- speed
def speed(args: argparse.Namespace) -> None:
    base_cfg, eng_cfg, plan = demo_configs(args.quick)
    data = _data(base_cfg)
    clock = _clock(args)
    eng_parts, eng_step = _stepper(eng_cfg, clock=clock)
    _, base_step = _stepper(base_cfg, clock=clock)
    batches = _batches(eng_cfg, eng_parts, data, args.steps)
    no_rows = [replace(b, rows=None) for b in batches]
    contenders = {"moe fp32": (base_step, no_rows), "engram fp32": (eng_step, batches)}
    if args.variants:
        contenders["engram bf16"] = (_stepper(eng_cfg, bf16=True, clock=clock)[1], batches)
        contenders["moe bf16"] = (_stepper(base_cfg, bf16=True, clock=clock)[1], no_rows)
        t0 = time.perf_counter()
        compiled = _stepper(eng_cfg, compile_=True, clock=clock)[1]
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


# ------------------------------------------------------------------------------ breakdown
def _phased_step(
    model: Any, opt: Any, batch: Batch, rows: Any, clock: Callable[[], float]
) -> list[float]:
    """One training step split into phases (seconds): fwd, bwd, clip, adamw, table, zero."""
    t = [clock()]
    out = model(batch.x, rows, targets=batch.y)
    t.append(clock())
    (out.loss + out.aux_loss).backward()
    t.append(clock())
    opt.clip_grad_norm()
    t.append(clock())
    opt.dense.step()
    t.append(clock())
    if opt.table is not None:
        opt.table.step()
    t.append(clock())
    opt.zero_grad()
    model.update_router_biases()
    t.append(clock())
    return [b - a for a, b in itertools.pairwise(t)]


PHASES = ("forward", "backward", "clip grad norm", "AdamW (dense)", "table sparse Adam",
          "zero grad + router")  # fmt: skip


def breakdown(args: argparse.Namespace) -> None:
    base_cfg, eng_cfg, plan = demo_configs(args.quick)
    clock = _clock(args)
    data = _data(base_cfg)
    models = {}
    for name, cfg in (("moe", base_cfg), ("engram", eng_cfg)):
        parts = build_run(cfg)
        models[name] = (parts, build_optimizer(parts.model, cfg.optim))
    batches = _batches(eng_cfg, models["engram"][0], data, args.steps)
    build_s = [b.build_seconds for b in batches]

    # (1) phases of the real step, interleaved
    res: dict[str, list[list[float]]] = {"moe": [], "engram": []}
    for i, b in enumerate(batches):
        for name, (parts, opt) in models.items():
            r = _phased_step(parts.model, opt, b, b.rows if name == "engram" else None, clock)
            if i >= 3:
                res[name].append(r)
    tokens = base_cfg.data.batch_size * base_cfg.data.seq_len
    print(f"\n(1) step phases, median of {args.steps - 3} interleaved steps of {tokens} tokens")
    print(f"  {'phase':22s} {'moe':>11s} {'engram':>11s} {'difference':>11s}")
    for j, label in enumerate(PHASES):
        a = statistics.median(r[j] for r in res["moe"])
        e = statistics.median(r[j] for r in res["engram"])
        print(f"  {label:22s} {_ms(a)} {_ms(e)} {(e - a) * 1000:+8.1f} ms")
    a = statistics.median(sum(r) for r in res["moe"])
    e = statistics.median(sum(r) for r in res["engram"])
    print(f"  {'step':22s} {_ms(a)} {_ms(e)} {(e - a) * 1000:+8.1f} ms  ratio {e / a:.3f}")
    print(
        f"  (active FLOPs/token gap (plan) {plan.flops_gap:+.2%}; making a batch in the "
        f"loader's thread, off the step: {statistics.median(build_s) * 1000:.2f} ms median)"
    )

    # (2) isolated parts on the inputs a real step gives them
    eng_model, moe_model = models["engram"][0].model, models["moe"][0].model
    layers = eng_model.engram_layers()
    lid, layer = next(iter(layers.items()))
    seen: dict[str, Any] = {"ffn_moe": [], "ffn_engram": []}
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0].detach()))]
    for name, model in (("moe", moe_model), ("engram", eng_model)):
        for blk in model.blocks:
            hooks.append(
                blk.ffn.register_forward_pre_hook(
                    lambda m, a, n=name: seen[f"ffn_{n}"].append(a[0].detach())
                )
            )
    b = batches[0]
    with torch.no_grad():
        eng_model(b.x, b.rows, targets=b.y)
        moe_model(b.x, None, targets=b.y)
    for h in hooks:
        h.remove()
    slot = list(layers).index(lid)
    rows, hid = b.rows[slot], seen["h"].requires_grad_(True)
    mem = layer.lookup(rows).detach().requires_grad_(True)  # (B, T, E)
    with torch.no_grad():
        gate = layer.gate(hid, mem)  # (B, T, M)
        v_gated = (gate.unsqueeze(-1) * layer.value_proj(mem).unsqueeze(2)).clone()
    v_gated.requires_grad_(True)
    conv = layer.short_conv
    parts: dict[str, Callable[[], Any]] = {
        f"Engram layer {lid} (all)": lambda: layer(hid, rows),
        "  row gather": lambda: layer.lookup(rows),
        "  gate (keys, norms)": lambda: layer.gate(hid, mem),
        "  value projection": lambda: layer.value_proj(mem),
    }
    if conv is not None:
        parts["  short conv (+norm, SiLU)"] = lambda: conv(v_gated)[0]
    for name, model in (("moe", moe_model), ("engram", eng_model)):
        n_exp = next(model.moe_layers()).n_experts
        parts[f"4 x MoE FFN, {name} ({n_exp} experts)"] = lambda m=model, n=name: sum(
            blk.ffn(x)[0].sum() for blk, x in zip(m.blocks, seen[f"ffn_{n}"], strict=True)
        )
    leaves = [hid, mem, v_gated, *eng_model.parameters(), *moe_model.parameters()]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in parts}
    for i in range(args.steps):
        for key, fn in parts.items():
            t0 = clock()
            y = fn()
            t1 = clock()
            y.backward(torch.full_like(y, 1e-3))
            t2 = clock()
            if i >= 3:
                times[key].append((t1 - t0, t2 - t1))
            for p in leaves:
                p.grad = None
    print(f"\n(2) isolated forward + backward, median of {args.steps - 3} rounds")
    print(f"  {'part':36s} {'forward':>11s} {'backward':>11s} {'total':>11s}")
    for key, v in times.items():
        f = statistics.median(x for x, _ in v)
        g = statistics.median(x for _, x in v)
        t = statistics.median(x + y for x, y in v)
        print(f"  {key:36s} {_ms(f)} {_ms(g)} {_ms(t)}")


# ------------------------------------------------------------------------------ yardstick
def _matmul_flops(n: int, d: int, v: int, reps: int) -> float:
    """FLOP/s of the output layer's matmuls: (n, d) @ (d, v) forward and its two backward."""
    gen = torch.Generator().manual_seed(0)
    h, w, g = (torch.randn(*s, generator=gen) for s in ((n, d), (v, d), (n, v)))
    out, gh, gw = torch.empty(n, v), torch.empty(n, d), torch.empty(v, d)
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        torch.mm(h, w.T, out=out)
        torch.mm(g, w, out=gh)
        torch.mm(g.T, h, out=gw)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 6 * n * d * v / statistics.median(times)


def yardstick(args: argparse.Namespace) -> None:
    base_cfg, eng_cfg, _ = demo_configs(args.quick)
    data = _data(base_cfg)
    chosen = {"engram": [eng_cfg], "moe": [base_cfg], "both": [eng_cfg, base_cfg]}[args.model]
    overrides = [f"train.steps={args.steps}", "train.eval_every=0", "train.ckpt_every=0",
                 "train.final_eval_batches=1"]  # fmt: skip
    skip = 2  # the first steps allocate optimizer state (the trainer's median skips one)
    for cfg in chosen:
        cfg = apply_overrides(cfg, overrides)
        tc = cfg.train
        tokens = tc.grad_accum * cfg.data.batch_size * cfg.data.seq_len
        trainer_s: list[float] = []
        bare_s: list[float] = []
        same = True
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            for r in range(args.rounds):
                order = ("trainer", "bare") if r % 2 == 0 else ("bare", "trainer")
                losses: dict[str, list[float]] = {}
                for who in order:
                    if who == "trainer":
                        res = train(cfg, Path(tmp) / f"round{r}", progress=False, data=data)
                        trainer_s += [h["step_s"] for h in res.history[skip:]]
                        losses[who] = [h["loss"] for h in res.history]
                    else:
                        threads = torch.get_num_threads()
                        torch.set_num_threads(tc.threads or threads)
                        try:
                            parts, step = _stepper(cfg)
                            batches = _batches(cfg, parts, data, tc.steps)
                            out = [step(b) for b in batches]
                        finally:
                            torch.set_num_threads(threads)
                        bare_s += [dt for dt, _ in out[skip:]]
                        losses[who] = [loss for _, loss in out]
                same = same and losses["trainer"] == losses["bare"]
        t_med, b_med = statistics.median(trainer_s), statistics.median(bare_s)
        ratio = b_med / t_med
        print(f"\n{cfg.name}: {args.rounds} round(s) x {tc.steps} steps of {tokens} tokens, "
              f"{tc.threads or torch.get_num_threads()} thread(s), medians of steps {skip + 1}..")  # fmt: skip
        print(f"  trainer (engram.run.train) {_ms(t_med)}  {tokens / t_med:8.0f} tok/s")
        print(f"  bare PyTorch loop          {_ms(b_med)}  {tokens / b_med:8.0f} tok/s")
        verdict = "meets" if ratio >= 0.95 else "MISSES"
        print(f"  trainer / bare throughput  {ratio:.3f}x ({verdict} the 0.95x target); "
              f"losses bit-identical: {'yes' if same else 'NO'}")  # fmt: skip
        fpt = flops_per_token(cfg.model, cfg.engram, cfg.data.seq_len)
        step_flops = 3 * fpt * tokens
        threads = torch.get_num_threads()
        torch.set_num_threads(tc.threads or threads)
        try:
            mm = _matmul_flops(tokens, cfg.model.d_model, cfg.model.vocab_size, args.mm_reps)
        finally:
            torch.set_num_threads(threads)
        achieved = step_flops / t_med
        print(f"  FLOPs per step: 3 x {fpt:,} FLOPs/token (planner, forward) x {tokens} tokens "
              f"= {step_flops / 1e9:.2f} GFLOP")  # fmt: skip
        print(f"  achieved {achieved / 1e9:6.2f} GFLOP/s (trainer step) vs {mm / 1e9:6.2f} GFLOP/s "
              f"of the output layer's matmuls ({tokens} x {cfg.model.d_model} @ "
              f"{cfg.model.d_model} x {cfg.model.vocab_size}, fwd + bwd): {achieved / mm:.1%}")  # fmt: skip


# -------------------------------------------------------------------------------- quality
def quality(args: argparse.Namespace) -> None:
    base_cfg, eng_cfg, plan = demo_configs(args.quick)
    data = _data(base_cfg)
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
    p.add_argument("--avx2-only", action="store_true", help="emulate an AVX2-only CPU")
    p.add_argument("--quick", action="store_true", help="the `engram demo --quick` presets")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="speed/breakdown: time with this thread's CPU time instead of wall time (for a "
        "machine shared with other work; PyTorch must run one thread)",
    )
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--variants", action="store_true", help="also bf16 and torch.compile")
    b = sub.add_parser("breakdown")
    b.add_argument("--steps", type=int, default=30)
    y = sub.add_parser("yardstick")
    y.add_argument("--steps", type=int, default=40)
    y.add_argument("--rounds", type=int, default=2)
    y.add_argument("--model", choices=("engram", "moe", "both"), default="both")
    y.add_argument("--mm-reps", type=int, default=20)
    q = sub.add_parser("quality")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--out", default="runs/bench-quality")
    args = p.parse_args()
    if args.avx2_only and not machine.emulated():
        machine.rerun_as_avx2_only("avx2" if "avx2" in hashing.available_paths() else "portable")
    torch.set_num_threads(1)  # the demo's models train with one PyTorch thread each
    print_machine()
    {"speed": speed, "breakdown": breakdown, "yardstick": yardstick, "quality": quality}[args.mode](
        args
    )


if __name__ == "__main__":
    main()
