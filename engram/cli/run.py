"""`engram train`, `eval`, `generate` and `demo`: train runs, measure them, sample from them."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from engram.cli.common import (
    CLIError,
    add_data,
    add_json,
    add_no_progress,
    add_run_source,
    add_tokenizer,
    finite_float,
    layer_ids,
    none_to_none,
    nonneg_int,
    positive_int,
    require,
    run_config,
    seed_int,
    utf8_text,
)
from engram.parallel import context as dist_context
from engram.parallel.context import DEFAULT_TIMEOUT_S as DEFAULT_DIST_TIMEOUT_S

DTYPES = ["float32", "bfloat16", "float16", "int8"]

# ----------------------------------------------------------------------------- train


def _without_nproc(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(cfg, out: str, resume: bool) -> None:
    """Refuse to resume a run of another configuration, naming the keys that differ."""
    from engram.run_config import RunConfig, base_difference

    run = Path(out)
    if not resume or not (run / "config.json").is_file() or not any(run.glob("checkpoints/*")):
        return
    saved = RunConfig.load(run / "config.json").to_dict()
    other_base = base_difference(saved, cfg.to_dict())
    if other_base is not None:
        raise CLIError(
            f"--out {out} holds a run that cannot continue with this config: {other_base}; "
            "resume it from the same base or choose a new --out"
        )
    before, now = _flat(saved), _flat(cfg.to_dict())
    keys = sorted(k for k in before.keys() | now.keys()
                  if k != "train.steps" and before.get(k) != now.get(k))  # fmt: skip
    if keys:
        diff = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:8])
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        raise CLIError(
            f"--out {out} holds a run with a different config ({diff}{more}); resume it with the "
            "same config (only train.steps may change) or choose a new --out"
        )


def _launch(cfg, args: argparse.Namespace) -> None:
    from engram.data import check_shard
    from engram.parallel.launch import LaunchError, launch

    check_shard(cfg.data.batch_size, 0, args.nproc)  # before starting any worker
    try:
        launch(args.nproc, _without_nproc(args.argv))
    except LaunchError as e:
        raise CLIError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> None:
    from engram.run import train

    require("matplotlib", "`engram train` (its loss.png)")
    if getattr(args, "base", None):
        require("transformers", "`engram train` with a base model")
    cfg = run_config(args)
    if cfg.base is not None:  # its fingerprint, before comparing with a run to resume
        from engram.hf.base import resolve_base

        require("transformers", "`engram train` with a base model")
        cfg = resolve_base(cfg)
    check_resume(cfg, args.out, not args.no_resume)
    worker = dist_context.launched_by_torchrun()
    if args.nproc is not None and not worker:
        _launch(cfg, args)
        return
    ctx = dist_context.init_from_env(cfg.train.device, args.dist_timeout) if worker else None
    try:
        result = train(
            cfg, args.out, resume=not args.no_resume, progress=not args.no_progress, dist=ctx
        )
    finally:
        dist_context.shutdown(ctx)
    if ctx is not None and not ctx.is_main:
        return
    c = result.counts
    print(
        f"{cfg.name}: step {result.step}, "
        + (f"train loss {result.train_loss:.4f}, " if result.train_loss is not None else "")
        + (f"validation loss {result.val_loss:.4f} (ppl {result.val_ppl:.1f}), "
           if result.val_loss is not None else "")
        + f"{result.tokens_per_s:,.0f} tokens/s"
    )  # fmt: skip
    print(f"params: total {c.total:,}, active {c.active:,}, table {c.table:,}")
    if cfg.base is not None:
        b = cfg.base
        arch = ((b.hf_config or {}).get("architectures") or ["?"])[0]
        what = "trained with Engram" if cfg.engram is not None else "trained alone"
        print(f"base: {b.path} ({arch}, {what if b.train_base else 'frozen: only Engram trained'})")
    print(f"run directory: {result.out_dir} (config.json, metrics.jsonl, checkpoints/, loss.png)")


# ----------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> None:
    from engram.data import prepare_data
    from engram.train import evaluate, load_trained

    parts, ckpt = load_trained(args.ckpt)
    data_cfg = parts.cfg.data
    if args.data:
        data_cfg = replace(data_cfg, source=str(args.data))
    splits = prepare_data(data_cfg, parts.tokenizer, parts.eot_id)
    positions = bool(getattr(parts.indexer, "needs_positions", False))
    batches = list(splits.val_batches(args.batches, with_positions=positions))
    loss = evaluate(parts.model, batches, parts.indexer)
    n_tokens = sum(int(b[1].size) for b in batches)
    result = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "data": data_cfg.source,
        "split": "validation",
        "tokens": n_tokens,
        "val_loss": loss,
        "perplexity": math.exp(loss),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{ckpt.path} (step {ckpt.step}) on {data_cfg.source} validation split, "
            f"{n_tokens:,} tokens: loss {loss:.4f}, perplexity {result['perplexity']:.2f}"
        )


# ----------------------------------------------------------------------------- generate


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CLIError("give at least one --prompt TEXT (or a --prompt-file)")
    return prompts


def _tier(args: argparse.Namespace):  # -> TierConfig
    from engram.serving import TierConfig

    return TierConfig(
        store=args.store, tables=args.tables, dtype=args.table_dtype, cache_rows=args.cache_rows,
        cache_bytes=int(args.cache_mib * 2**20), prefetch=not args.no_prefetch,
        verify=args.verify_table, reader=args.reader, reader_threads=args.reader_threads,
        direct=args.direct_io,
    )  # fmt: skip


def _print_generated(args, prompts: list[str], texts: list[str], res, stats: dict, tier) -> None:
    for p, t in zip(prompts, texts, strict=True):
        print(f"{p}\033[1m{t}\033[0m" if sys.stdout.isatty() else p + t)
        print()
    line = f"[{tier.store}] {res.tokens_per_s:.1f} tokens/s decoding, prefill {res.prefill_s:.2f} s"
    latency = _step_latency(res)
    if latency:
        line += f"; step {latency['median']:.1f} ms median, {latency['p90']:.1f} ms p90"
    for lid, rec in stats.items():
        if "reader" in rec:
            line += f"; layer {lid} read by {rec['reader']['kind']}"
        if "cache" in rec:
            line += f"; layer {lid} cache hit rate {rec['cache']['hit_rate']:.1%}"
    decode = res.stats.get("rows", {}).get("decode")
    if decode and decode["read_s"] > 0:
        line += f"; row reads {decode['hidden_fraction']:.0%} hidden behind compute"
    print(line, file=sys.stderr)


def _step_latency(res) -> dict[str, float] | None:
    """Median and 90th percentile of the decode steps' wall time, in ms (None without steps)."""
    steps = sorted(res.stats.get("decode_step_s", []))
    if not steps:
        return None
    return {
        "median": 1e3 * steps[len(steps) // 2],
        "p90": 1e3 * steps[min(len(steps) - 1, int(0.9 * len(steps)))],
    }


def cmd_generate(args: argparse.Namespace) -> None:
    from engram.generate import generate
    from engram.serving import load_served

    prompts = _prompts(args)
    tier = _tier(args)
    with load_served(args.ckpt, tier) as served:
        parts = served.parts
        res = generate(
            parts.model, [parts.tokenizer.encode(p).ids for p in prompts],
            indexer=parts.indexer, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k,
            top_p=None if args.top_p == 1.0 else args.top_p, seed=args.seed,
            eos_id=None if args.no_stop else parts.eot_id,
            prefill_chunk=args.prefill_chunk or None,
        )  # fmt: skip
        texts = [parts.tokenizer.decode(t) for t in res.tokens]
        stats = served.stats()
    if not args.json:
        _print_generated(args, prompts, texts, res, stats, tier)
        return
    report = {
        "checkpoint": str(served.ckpt.path),
        "store": tier.store,
        "outputs": [{"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True)],
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "decode_tokens_per_s": res.tokens_per_s,
        "decode_step_ms": _step_latency(res),
        "rows": res.stats.get("rows"),
        "tiers": stats,
    }
    print(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> None:
    from engram.demo import run_demo

    require("matplotlib", "`engram demo` (its plots)")
    run_demo(
        args.out, quick=args.quick, progress=not args.no_progress, jobs=args.jobs,
        second_text=none_to_none(args.second_text),
    )  # fmt: skip


# ----------------------------------------------------------------------------- parsers

SECOND_TEXT_HELP = "a text the models do not train on (builtin:NAME, a file, or 'none')"


def _add_train(sub: argparse._SubParsersAction) -> None:
    from engram.presets import PRESETS

    t = sub.add_parser("train", help="train a model", description=f"presets: {', '.join(PRESETS)}")
    add_run_source(t)
    add_data(t, "builtin[:kjv,web,...], or a .txt/.jsonl/.parquet file or dir")
    add_tokenizer(t)
    t.add_argument("--out", required=True, help="run directory (resumed if it holds a run)")
    t.add_argument("--steps", type=positive_int, help="total optimizer steps (train.steps)")
    t.add_argument("--lr", type=finite_float(0.0, lo_open=True),
                   help="peak learning rate of the dense weights (optim.lr)")  # fmt: skip
    t.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    b = t.add_argument_group(
        "a Hugging Face model as the backbone (instead of --preset/--config; pip install "
        "'engram-lm[hf]')"
    )
    b.add_argument("--base", type=utf8_text, metavar="PATH",
                   help="a local model directory (Llama, Mistral, Qwen2/3, GPT-2; config.json, "
                   "weights, tokenizer.json): Engram is attached to it and both train")  # fmt: skip
    b.add_argument("--freeze-base", action="store_true",
                   help="keep the base's weights frozen: only Engram trains (adapter mode)")  # fmt: skip
    b.add_argument("--no-engram", action="store_true",
                   help="train the base alone (pretrain or fine-tune a plain model)")  # fmt: skip
    b.add_argument("--layers", type=layer_ids,
                   help="0-based Engram layer ids (default: 1 and n/2, within the model)")  # fmt: skip
    b.add_argument("--table-size", type=positive_int,
                   help="target rows per Engram sub-table (default 20000)")  # fmt: skip
    add_no_progress(t, "no progress bar")
    t.add_argument(
        "--nproc", type=positive_int,
        help="train on N local processes (torchrun; tables sharded, dense weights with DDP)",
    )  # fmt: skip
    t.add_argument(
        "--dist-timeout", type=finite_float(0.0, lo_open=True), default=DEFAULT_DIST_TIMEOUT_S,
        metavar="SECONDS",
        help="a distributed rank whose peer died or hangs stops after this long (default 300)",
    )  # fmt: skip
    t.set_defaults(func=cmd_train)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gn = sub.add_parser("generate", help="continue prompts with a trained model")
    gn.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    gn.add_argument("--prompt", action="append", type=utf8_text,
                    help="prompt text (repeatable: one batch)")  # fmt: skip
    gn.add_argument("--prompt-file", type=utf8_text,
                    help="a UTF-8 file of prompts, one per non-empty line (added to --prompt)")  # fmt: skip
    gn.add_argument("--max-new-tokens", type=positive_int, default=48,
                    help="tokens to add (default 48)")  # fmt: skip
    gn.add_argument("--temperature", type=finite_float(0.0), default=0.8,
                    help="0 = greedy (default 0.8)")  # fmt: skip
    gn.add_argument("--top-k", type=positive_int, default=40,
                    help="sample among the k likeliest (40)")  # fmt: skip
    gn.add_argument("--top-p", type=finite_float(0.0, 1.0, lo_open=True), default=1.0,
                    help="sample among the likeliest tokens holding this much probability, in "
                    "(0, 1] (default 1 = all)")  # fmt: skip
    gn.add_argument("--seed", type=seed_int, default=0, help="sampling seed (default 0)")
    gn.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    gn.add_argument("--store", choices=["ram", "mmap"], default="ram",
                    help="tables in RAM, or memory-mapped table files (default ram)")  # fmt: skip
    gn.add_argument("--tables", help="directory of exported table files (mmap; default: "
                    "the checkpoint's own, or exported on first use)")  # fmt: skip
    gn.add_argument("--table-dtype", default="float32", choices=DTYPES,
                    help="row format when exporting on first use (mmap)")  # fmt: skip
    gn.add_argument("--cache-rows", type=nonneg_int, default=0,
                    help="hot-row cache size per Engram layer (mmap; default 0 = none)")  # fmt: skip
    gn.add_argument("--cache-mib", type=finite_float(0.0), default=0,
                    help="or the cache size per Engram layer in MiB of rows (mmap)")  # fmt: skip
    gn.add_argument("--no-prefetch", action="store_true", help="no background row prefetch")
    gn.add_argument("--reader", choices=["mmap", "pread", "auto"], default="auto",
                    help="how table files are read (--store mmap): memory-mapped, or exactly "
                    "the rows with pread; auto (default) = pread for a file larger than half "
                    "the RAM, else mmap")  # fmt: skip
    gn.add_argument("--reader-threads", type=nonneg_int, default=0,
                    help="pread reader: threads for a request's blocking reads (default 0)")  # fmt: skip
    gn.add_argument("--direct-io", action="store_true",
                    help="pread reader: O_DIRECT, bypassing the page cache")  # fmt: skip
    gn.add_argument("--prefill-chunk", type=nonneg_int, default=0,
                    help="feed prompts in chunks of N tokens, reading the next chunk's rows while "
                    "one computes (default 0 = the whole prompt at once)")  # fmt: skip
    gn.add_argument("--verify-table", action="store_true",
                    help="verify the table file's data checksum when opening: reads the whole "
                    "file once")  # fmt: skip
    add_json(gn, "print the outputs and stats as JSON")
    gn.set_defaults(func=cmd_generate)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """demo, train, eval, generate."""
    d = sub.add_parser(
        "demo",
        help="train an MoE baseline, its iso-parameter Engram model and that model's "
        "no-information control; compare them",
    )
    d.add_argument("--out", default="engram-demo", help="output directory (default engram-demo)")
    d.add_argument("--quick", action="store_true", help="a smaller run for a smoke test (< 3 min)")
    add_no_progress(d)
    d.add_argument("--jobs", type=positive_int, default=3,
                   help="models trained side by side (default 3)")  # fmt: skip
    d.add_argument("--second-text", type=utf8_text, default="builtin:bbe",
                   help=SECOND_TEXT_HELP)  # fmt: skip
    d.set_defaults(func=cmd_demo)

    _add_train(sub)

    e = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    e.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    add_data(e, "data to evaluate on (default: the run's own); its validation split")
    e.add_argument("--batches", type=positive_int,
                   help="evaluate at most this many batches (default all)")  # fmt: skip
    add_json(e, "print one JSON object")
    e.set_defaults(func=cmd_eval)

    _add_generate(sub)
