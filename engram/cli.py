"""The ``engram`` command line: thin wrappers over the library.

Design choices:
- Every command is a call into the library; the CLI only parses arguments and prints.
- Bad input (a missing file, an empty corpus, an unknown config key, a checkpoint from another
  configuration, ...) ends in a one-line ``engram: error: ...`` and exit code 2, never a
  traceback; the library raises ``ValueError`` subclasses for all of these.
- Heavy imports (torch models, matplotlib) happen inside the commands, so ``engram --help`` is fast.

Commands:
- ``engram demo``: MoE baseline vs its iso-parameter Engram model (and that model's
  no-information control) on the built-in corpus.
- ``engram train``: train a preset or config file on the built-in corpus or the user's text;
  ``--nproc N`` (or torchrun) trains on N processes with sharded tables.
- ``engram eval``: validation loss and perplexity of a checkpoint.
- ``engram plan``: the expert/table allocation that matches an MoE's params and FLOPs.
- ``engram sweep``: loss against rho at equal params/FLOPs, and against table size.
- ``engram ablate``: an Engram run's controls (no-information, address, capacity ladder,
  frozen table, expert count, baseline) over seeds, in-domain and on a second text.
- ``engram analyze gates|sensitivity|lens|cka|memory|access``: what the memory learned and how
  it is read, as files.
- ``engram generate``: continue prompts with a trained model, tables in RAM or on disk.
- ``engram table export|inspect``: a checkpoint's tables as `.engt` files; a file's header.
- ``engram info``: the memory configuration's figures; ``engram rows TEXT``: rows per token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from engram.config import EngramConfig, small_config
from engram.hashing import kernel_available
from engram.indexer import NgramIndexer
from engram.parallel import context as dist_context
from engram.parallel.context import DEFAULT_TIMEOUT_S as DEFAULT_DIST_TIMEOUT_S
from engram.parallel.context import DistributedError


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _config_from_args(args: argparse.Namespace) -> EngramConfig:
    cfg = small_config()
    overrides = {}
    if getattr(args, "layers", None):
        overrides["layer_ids"] = tuple(int(v) for v in args.layers.split(","))
    if getattr(args, "table_size", None):
        overrides["engram_vocab_size"] = (args.table_size,) * (cfg.max_ngram_size - 1)
    if not overrides:
        return cfg
    try:
        return EngramConfig(**{**cfg.to_dict(), **overrides})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ----------------------------------------------------------------------------- info


def _indexer(args: argparse.Namespace) -> tuple[NgramIndexer, str]:
    """The indexer of `--tokenizer` (default GPT-2) and a description of the tokenizer."""
    cfg = _config_from_args(args)
    spec = getattr(args, "tokenizer", None) or "gpt2"
    if spec == "gpt2":
        return NgramIndexer.builtin(cfg), "GPT-2 BPE (built in, offline)"
    from engram.compress import TokenizerCompressor
    from engram.data import DataConfig
    from engram.data.tokenize import bpe_vocab_size, data_tokenizer
    from engram.tokenizer import separator_id

    source = getattr(args, "data", None) or "builtin:kjv"
    _check_data(source)
    tok = data_tokenizer(DataConfig(source=source, tokenizer=spec))
    eot = separator_id(tok)
    ix = NgramIndexer(replace(cfg, pad_id=eot), TokenizerCompressor.from_tokenizer(tok), tok, eot)
    what = f"{spec} (byte-level BPE trained on the training split of {source})"
    return ix, what if bpe_vocab_size(spec) is not None else spec


def cmd_info(args: argparse.Namespace) -> None:
    ix, what = _indexer(args)
    cfg = ix.cfg
    c = ix.compressor
    print(f"tokenizer       {what}")
    print(
        f"compression     {c.vocab_size:,} raw ids -> {c.compressed_vocab_size:,} "
        f"({1 - c.compressed_vocab_size / c.vocab_size:.1%} fewer)"
    )
    print(f"orders          2..{cfg.max_ngram_size}, {cfg.n_head_per_ngram} heads each")
    print(f"row width       {cfg.head_dim} (memory width {cfg.memory_dim})")
    for layer_id in cfg.layer_ids:
        sizes = ix.hasher.table_sizes(layer_id)
        rows = ix.hasher.total_rows(layer_id)
        print(
            f"layer {layer_id:<9d} {rows:,} rows = {rows * cfg.head_dim:,} table params; primes {sizes}"
        )
    print(f"hash kernel     {'compiled C' if kernel_available() else 'numpy fallback'}")
    print(f"fingerprint     {ix.hasher.fingerprint()}")


# ----------------------------------------------------------------------------- rows


def cmd_rows(args: argparse.Namespace) -> None:
    cfg = _config_from_args(args)
    if not args.text.strip():
        raise CLIError("TEXT is empty; expected some words, e.g. 'Alexander the Great'")
    ix, _ = _indexer(args)
    layer_id = cfg.layer_ids[0] if args.layer is None else args.layer
    if layer_id not in cfg.layer_ids:
        raise CLIError(
            f"--layer {layer_id} is not an Engram layer; expected one of {list(cfg.layer_ids)}"
        )
    print(f"layer {layer_id}: rows per order (one per head, local to each sub-table)")
    for hit in ix.explain(args.text, layer_id):
        print(f"  {hit.position:3d} {hit.token!r}")
        for gram, rows in zip(hit.ngrams, hit.rows, strict=True):
            print(f"        {gram!r:40s} {list(rows)}")


# ----------------------------------------------------------------------------- runs


def _check_data(data: str | None) -> None:
    if data and not str(data).startswith("builtin") and not Path(data).exists():
        raise CLIError(f"--data {data!r} does not exist; expected a file or directory")


def _run_config(args: argparse.Namespace, default_preset: str | None = None):  # -> RunConfig
    from engram.presets import preset
    from engram.run_config import RunConfig, apply_overrides

    if getattr(args, "preset", None) and getattr(args, "config", None):
        raise CLIError("give either --preset or --config, not both")
    if getattr(args, "config", None):
        cfg = RunConfig.load(args.config)
    elif getattr(args, "preset", None) or default_preset:
        cfg = preset(args.preset or default_preset)
    else:
        raise CLIError("give --preset NAME or --config FILE (see `engram train --help`)")
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "data", None):
        overrides.append(f"data.source={json.dumps(str(args.data))}")
    if getattr(args, "steps", None) is not None:
        overrides.append(f"train.steps={args.steps}")
    return apply_overrides(cfg, overrides)


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


def cmd_train(args: argparse.Namespace) -> None:
    from engram.train import train

    cfg = _run_config(args)
    _check_data(args.data)
    if args.dist_timeout <= 0:
        raise CLIError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    worker = dist_context.launched_by_torchrun()
    if args.nproc is not None and not worker:
        from engram.data import check_shard
        from engram.parallel.launch import LaunchError, launch

        if args.nproc < 1:
            raise CLIError(f"--nproc must be >= 1, got {args.nproc}")

        check_shard(cfg.data.batch_size, 0, args.nproc)  # before starting any worker
        try:
            launch(args.nproc, _without_nproc(args.argv))
        except LaunchError as e:
            raise CLIError(str(e)) from None
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
    print(f"run directory: {result.out_dir} (config.json, metrics.jsonl, checkpoints/, loss.png)")


def cmd_eval(args: argparse.Namespace) -> None:
    from engram.data import prepare_data
    from engram.train import evaluate, load_trained

    parts, ckpt = load_trained(args.ckpt)
    data_cfg = parts.cfg.data
    if args.data:
        _check_data(args.data)
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


def cmd_plan(args: argparse.Namespace) -> None:
    from engram.plan import format_plan
    from engram.presets import engram_template, plan_for

    base = _run_config(args, default_preset="demo-moe")
    layers = tuple(int(v) for v in args.layers.split(",")) if args.layers else (1,)
    _, plan = plan_for(base, args.rho, template=engram_template(layers))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan))


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _print_report(args: argparse.Namespace, result: Any, fmt: Callable[[Any], str]) -> None:
    """A sweep's or an ablation's result: its JSON with --json, else its text and its files."""
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(fmt(result))
        print("wrote " + ", ".join(str(v) for v in result.files.values()))


def cmd_sweep(args: argparse.Namespace) -> None:
    from engram.presets import engram_template
    from engram.sweep import SweepConfig, format_sweep, run_sweep

    base = _run_config(args, default_preset="demo-moe")
    _check_data(args.data)
    kwargs: dict = {}
    for name, value in (("rhos", _floats(args.rhos, "--rhos")),
                        ("table_scales", _floats(args.table_scales, "--table-scales"))):  # fmt: skip
        if value is not None:
            kwargs[name] = value
    if args.table_rho is not None:
        kwargs["table_rho"] = args.table_rho
    if args.seeds is not None:
        seeds = _floats(args.seeds, "--seeds") or ()
        if any(s != int(s) for s in seeds):
            raise CLIError(f"--seeds must be integers, got {args.seeds!r}")
        kwargs["seeds"] = tuple(int(s) for s in seeds)
    kwargs["second_text"] = None if args.second_text == "none" else args.second_text
    if kwargs["second_text"] is not None:
        _check_data(kwargs["second_text"])
    kwargs["jobs"] = args.jobs
    kwargs["second_batches"] = args.second_batches
    layers = tuple(int(v) for v in args.layers.split(",")) if args.layers else (1,)
    result = run_sweep(
        args.out, base, SweepConfig(**kwargs), template=engram_template(layers),
        progress=not args.no_progress, echo=(lambda _: None) if args.json else print,
    )  # fmt: skip
    _print_report(args, result, format_sweep)


def _baseline_config(spec: str | None):  # -> RunConfig | None
    from engram.presets import PRESETS, preset
    from engram.run_config import RunConfig

    if spec is None:
        return None
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if (path / "config.json").is_file():
        return RunConfig.load(path / "config.json")
    if path.is_file():
        return RunConfig.load(path)
    raise CLIError(
        f"--baseline {spec!r} is neither a preset ({', '.join(PRESETS)}), a run directory "
        "nor a config file"
    )


def cmd_ablate(args: argparse.Namespace) -> None:
    from engram.ablate import CONTROLS, AblationConfig, format_ablation, parse_scales, run_ablation

    kwargs: dict = {"jobs": args.jobs, "threads": args.threads}
    if args.seeds is not None:
        seeds = _floats(args.seeds, "--seeds") or ()
        if not seeds or any(s != int(s) for s in seeds):
            raise CLIError(f"--seeds must be integers, got {args.seeds!r}")
        kwargs["seeds"] = tuple(int(s) for s in seeds)
    if args.controls is not None:
        kwargs["controls"] = tuple(c.strip() for c in args.controls.split(",") if c.strip())
        unknown = sorted(set(kwargs["controls"]) - set(CONTROLS))
        if unknown:
            raise CLIError(f"unknown --controls {unknown}; expected some of {', '.join(CONTROLS)}")
    if args.capacity is not None:
        kwargs["capacity_scales"] = parse_scales(args.capacity)
    if args.second_text is not None:
        kwargs["second_text"] = None if args.second_text == "none" else args.second_text
        if kwargs["second_text"] is not None:
            _check_data(kwargs["second_text"])
    kwargs["second_split"] = args.second_split
    kwargs["second_batches"] = args.second_batches
    result = run_ablation(
        args.ckpt, args.out, AblationConfig(**kwargs), baseline=_baseline_config(args.baseline),
        progress=not args.no_progress, echo=(lambda _: None) if args.json else print,
    )  # fmt: skip
    _print_report(args, result, format_ablation)


def cmd_generate(args: argparse.Namespace) -> None:
    from engram.generate import generate
    from engram.serving import TierConfig, load_served

    if not args.prompt:
        raise CLIError("give at least one --prompt TEXT")
    tier = TierConfig(
        store=args.store, tables=args.tables, dtype=args.table_dtype, cache_rows=args.cache_rows,
        cache_bytes=int(args.cache_mib * 2**20), prefetch=not args.no_prefetch,
    )  # fmt: skip
    with load_served(args.ckpt, tier) as served:
        parts = served.parts
        prompts = [parts.tokenizer.encode(p).ids for p in args.prompt]
        res = generate(
            parts.model, prompts, indexer=parts.indexer, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, seed=args.seed,
            eos_id=None if args.no_stop else parts.eot_id,
        )  # fmt: skip
        texts = [parts.tokenizer.decode(t) for t in res.tokens]
        stats = served.stats()
    report = {
        "checkpoint": str(served.ckpt.path),
        "store": tier.store,
        "outputs": [
            {"prompt": p, "completion": t} for p, t in zip(args.prompt, texts, strict=True)
        ],
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "decode_tokens_per_s": res.tokens_per_s,
        "tiers": stats,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for p, t in zip(args.prompt, texts, strict=True):
        print(f"{p}\033[1m{t}\033[0m" if sys.stdout.isatty() else p + t)
        print()
    line = f"[{tier.store}] {res.tokens_per_s:.1f} tokens/s decoding, prefill {res.prefill_s:.2f} s"
    for lid, rec in stats.items():
        if "cache" in rec:
            line += f"; layer {lid} cache hit rate {rec['cache']['hit_rate']:.1%}"
    print(line, file=sys.stderr)


def cmd_table(args: argparse.Namespace) -> None:
    from engram.export import describe_table, export_tables

    if args.table_command == "export":
        files = export_tables(args.ckpt, args.out, dtype=args.dtype)
        for lid, f in files.items():
            info = describe_table(f, verify=False, sample_rows=0)
            print(
                f"layer {lid}: {f} ({info['num_rows']:,} rows x {info['dim']}, {args.dtype}, "
                f"{info['size_on_disk'] / 2**20:.1f} MiB)"
            )
        return
    info = describe_table(args.file, verify=not args.no_verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key in ("path", "version", "dtype", "num_rows", "dim", "layer_id", "fingerprint",
                "size_on_disk", "bytes_per_row", "dirty", "verified"):  # fmt: skip
        if key in info:
            print(f"{key:>17}: {info[key]}")
    if "row_norm" in info:
        rn = info["row_norm"]
        print(
            f"{'row norms':>17}: mean {rn['mean']:.4f}, std {rn['std']:.4f}, "
            f"min {rn['min']:.4f}, max {rn['max']:.4f} over {rn['sampled_rows']} sampled rows"
        )
    meta = info.get("meta") or {}
    for key in ("run_name", "step", "source_checkpoint", "sub_table_sizes"):
        if key in meta:
            print(f"{key:>17}: {meta[key]}")


def _parse_row(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        layer, head, row = (int(v) for v in parts)
    except ValueError:
        raise CLIError(f"--row must be LAYER:HEAD:ROW (three integers), got {text!r}") from None
    return layer, head, row


def cmd_analyze(args: argparse.Namespace) -> None:
    _check_data(getattr(args, "data", None))
    out = Path(args.out)
    what = args.analysis
    if what == "gates":
        from engram.analysis.gate_report import analyze_gates

        if args.text is not None and args.text_file is not None:
            raise CLIError("give either --text or --text-file, not both")
        text = args.text
        if args.text_file is not None:
            text = Path(args.text_file).read_text(encoding="utf-8")
        report = analyze_gates(args.ckpt[0], out, text=text)
    elif what == "sensitivity":
        from engram.analysis.sensitivity import analyze_sensitivity

        report = analyze_sensitivity(
            args.ckpt[0], out, max_batches=args.batches, data_source=args.data
        )
    elif what == "lens":
        from engram.analysis.lens import analyze_logit_lens
        from engram.checkpoint import read_checkpoint

        names = [str(read_checkpoint(c, verify=False).config.get("name", c)) for c in args.ckpt]
        if len(set(names)) < len(names):
            names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
        report = analyze_logit_lens(
            dict(zip(names, args.ckpt, strict=True)), out, max_batches=args.batches or 8,
            data_source=args.data,
        )  # fmt: skip
    elif what == "cka":
        from engram.analysis.cka import analyze_cka

        if len(args.ckpt) != 2:
            raise CLIError(f"cka compares two runs: give --ckpt twice, got {len(args.ckpt)}")
        report = analyze_cka(
            args.ckpt[0], args.ckpt[1], out, max_batches=args.batches or 8, data_source=args.data
        )
    elif what == "access":
        from engram.analysis.access import analyze_access
        from engram.analysis.runs import load_engram_run

        parts, _ = load_engram_run(args.ckpt[0], "the access analysis")
        report = analyze_access(
            out, indexer=parts.indexer, data_source=args.data or parts.cfg.data.source,
            max_tokens=args.tokens, layer_id=args.layer,
        )  # fmt: skip
    else:
        from engram.analysis.memory import analyze_memory

        report = analyze_memory(
            args.ckpt[0], out, ngrams=args.ngram or (),
            rows=[_parse_row(r) for r in args.row or ()], data_source=args.data,
        )  # fmt: skip
    d = report.to_dict()
    if args.json:
        print(json.dumps(d, indent=1))
    else:
        print("\n".join(_ANALYSIS_TEXT[what](d)))
        print(f"wrote into {out}/")


def _lens_text(d: dict) -> list[str]:
    lines = [f"mean KL(final || layer) in nats over {d['n_tokens']:,} validation tokens"]
    for name, r in d["runs"].items():
        cells = "  ".join(f"{lab}:{v:.4f}" for lab, v in zip(r["layers"], r["kl"], strict=True))
        lines.append(f"  {name:<12} {cells}")
    return lines


def _cka_text(d: dict) -> list[str]:
    a, b = d["run_a"]["name"], d["run_b"]["name"]
    lines = [f"linear CKA, rows = {a} layers, columns = {b} layers ({d['n_tokens']:,} tokens)"]
    lines.append("       " + " ".join(f"{c:>6}" for c in d["cols"]))
    for lab, row in zip(d["rows"], d["cka"], strict=True):
        lines.append(f"  {lab:>4} " + " ".join(f"{v:6.3f}" for v in row))
    return lines


def _memory_text(d: dict) -> list[str]:
    lines = []
    for layer in d["layers"]:
        lines.append(
            f"layer {layer['layer_id']}: {layer['frac_rows_hit']:.2%} of rows hit by a frequent "
            f"n-gram; {layer['mean_collisions']:.2f} collisions per frequent n-gram "
            f"(uniform hashing: {layer['expected_collisions_uniform']:.2f})"
        )
    for q in d["ngrams"]:
        lines.append(f"n-gram {q['tokenized']!r}:")
        for h in q["hits"]:
            lines.append(
                f"  layer {h['layer_id']} head {h['head']} ({h['ngram_text']!r}, count "
                f"{h['count']}): row {h['local_row']}, norm {h['norm']:.3f} "
                f"(p{h['norm_percentile']:.0f}), {h['n_colliding']} colliding n-grams"
            )
    for r in d["rows"]:
        top = ", ".join(f"{g['text']!r} x{g['count']}" for g in r["ngrams"][:5])
        lines.append(
            f"row {r['layer_id']}:{r['head']}:{r['local_row']} (norm {r['norm']:.3f}): "
            f"{r['n_ngrams']} frequent n-grams: {top}"
        )
    return lines


def _gates_text(d: dict) -> list[str]:
    lines = [f"{d['n_tokens_read']} tokens" + (" (truncated)" if d["truncated"] else "")]
    for label, values in d["rows"].items():
        lines.append(f"  {label}: mean gate {sum(values) / len(values):.3f}")
    for key in ("highest", "lowest"):
        items = ", ".join(f"{r['token']!r} {r['mean_gate']:.2f}" for r in d["ranking"][key][:8])
        lines.append(f"{key} gates: {items}")
    return lines


def _sensitivity_text(d: dict) -> list[str]:
    loss = d["val_loss"]
    lines = [f"validation loss over {d['n_tokens']:,} tokens:"]
    lines += [f"  {name:<24} {v:.4f}" for name, v in loss.items()]
    st = d["delta"]
    lines.append(
        f"per-token loss change with Engram off: mean {st['mean']:+.4f}, median "
        f"{st['median']:+.4f}, {st['frac_positive']:.1%} of tokens lose"
    )
    types = ", ".join(f"{t['token']!r} {t['mean_delta']:+.2f}"
                      for t in d["token_types_losing_most"][:8])  # fmt: skip
    lines.append(f"token types losing the most: {types}")
    return lines


def _access_text(d: dict) -> list[str]:
    fit = d["zipf"]
    lines = [
        f"layer {d['layer_id']}: {d['n_reads']:,} row reads from {d['n_tokens']:,} tokens hit "
        f"{d['n_distinct']:,} of {d['num_rows']:,} rows",
        f"Zipf exponent {fit['exponent']:.3f} (R^2 {fit['r2']:.3f}); reads taken by the "
        + ", ".join(f"{k} of rows: {v:.1%}" for k, v in d["top_share"].items()),
        "hit rate by cache size (rows):",
    ]
    for policy, curve in d["hit_rate"].items():
        cells = "  ".join(f"{c['rows']:,}:{c['hit_rate']:.1%}" for c in curve)
        lines.append(f"  {policy:<7} {cells}")
    return lines


_ANALYSIS_TEXT = {
    "gates": _gates_text,
    "sensitivity": _sensitivity_text,
    "lens": _lens_text,
    "cka": _cka_text,
    "memory": _memory_text,
    "access": _access_text,
}


def cmd_demo(args: argparse.Namespace) -> None:
    from engram.demo import run_demo

    if args.jobs < 1:
        raise CLIError(f"--jobs must be >= 1, got {args.jobs}")
    second = None if args.second_text == "none" else args.second_text
    if second is not None:
        _check_data(second)
    run_demo(
        args.out, quick=args.quick, progress=not args.no_progress, jobs=args.jobs,
        second_text=second,
    )  # fmt: skip


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram", description="Engram conditional memory for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--layers", help="comma-separated 0-based Engram layer ids (default: 1)")
        sp.add_argument("--table-size", type=int, help="target rows per sub-table (default 20000)")
        sp.add_argument("--tokenizer", help="gpt2 (default), bpe:N or a tokenizer.json path")
        sp.add_argument("--data", help="the corpus a bpe:N tokenizer trains on (default "
                        "builtin:kjv)")  # fmt: skip

    def run_source(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", help="a named configuration (see `engram train --help`)")
        sp.add_argument("--config", help="a run config JSON file (as written to config.json)")
        sp.add_argument(
            "--set", action="append", metavar="KEY=VALUE",
            help="override a config value, e.g. train.steps=100 or model.d_model=64 (repeatable)",
        )  # fmt: skip

    from engram.presets import PRESETS

    d = sub.add_parser(
        "demo",
        help="train an MoE baseline, its iso-parameter Engram model and that model's "
        "no-information control; compare them",
    )
    d.add_argument("--out", default="engram-demo", help="output directory (default engram-demo)")
    d.add_argument("--quick", action="store_true", help="a smaller run for a smoke test (< 3 min)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--jobs", type=int, default=3, help="models trained side by side (default 3)")
    d.add_argument("--second-text", default="builtin:bbe",
                   help="a text the models do not train on (builtin:NAME, a file, or 'none')")  # fmt: skip
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model", description=f"presets: {', '.join(PRESETS)}")
    run_source(t)
    t.add_argument("--data", help="builtin[:kjv,web,...], or a .txt/.jsonl/.parquet file or dir")
    t.add_argument("--out", required=True, help="run directory (resumed if it holds a run)")
    t.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    t.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--nproc", type=int,
        help="train on N local processes (torchrun; tables sharded, dense weights with DDP)",
    )  # fmt: skip
    t.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
        help="a distributed rank whose peer died or hangs stops after this long (default 300)",
    )  # fmt: skip
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    e.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    e.add_argument(
        "--data", help="data to evaluate on (default: the run's own); its validation split"
    )
    e.add_argument("--batches", type=int, help="evaluate at most this many batches (default all)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="allocate a sparse budget between experts and Engram tables")
    run_source(pl)
    pl.add_argument("--rho", type=float, default=0.75, help="fraction kept in routed experts")
    pl.add_argument("--layers", help="comma-separated 0-based Engram layer ids (default: 1)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    sw = sub.add_parser(
        "sweep", help="validation loss against rho at a fixed budget, and against table size",
    )  # fmt: skip
    run_source(sw)
    sw.add_argument("--data", help="builtin[:kjv,web,...], or a .txt/.jsonl/.parquet file or dir")
    sw.add_argument("--out", default="engram-sweep", help="sweep directory (resumed)")
    sw.add_argument("--steps", type=int, help="optimizer steps per run (train.steps)")
    sw.add_argument("--rhos", help="comma-separated rho values (default 1,0.875,0.75,0.5,0.25)")
    sw.add_argument(
        "--table-scales",
        help="table sizes as multiples of the planned one (default 0.0625,0.25,1,4,16; 'none')",
    )
    sw.add_argument("--table-rho", type=float, help="backbone of the table sweep (default 0.75)")
    sw.add_argument("--seeds", help="comma-separated train seeds (default 0)")
    sw.add_argument("--layers", help="comma-separated 0-based Engram layer ids (default: 1)")
    sw.add_argument(
        "--second-text",
        default="builtin:bbe",
        help="a text not trained on, every point evaluated on it ('none' skips)",
    )
    sw.add_argument("--second-batches", type=int, help="cap on the second text's eval batches")
    sw.add_argument("--jobs", type=int, default=1, help="runs trained side by side (processes)")
    sw.add_argument("--json", action="store_true", help="print the result as JSON")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_sweep)

    ab = sub.add_parser(
        "ablate", help="train an Engram run's controls over seeds and report what the table adds",
    )  # fmt: skip
    ab.add_argument("--ckpt", required=True, help="the Engram run directory to ablate")
    ab.add_argument("--out", default="engram-ablation", help="ablation directory (resumed)")
    ab.add_argument("--seeds", help="comma-separated train seeds (default 0,1,2)")
    ab.add_argument(
        "--controls",
        help="comma-separated subset of no-information,address,capacity,frozen,experts (all)",
    )
    ab.add_argument("--capacity", help="ladder scales of the table, e.g. 1/64,1/16,1/4 (default)")
    ab.add_argument("--baseline", help="the iso-parameter baseline: a preset, run dir or config")
    ab.add_argument(
        "--second-text", help="a text not trained on: builtin:NAME or a file ('none' skips; "
        "default builtin:bbe)",
    )  # fmt: skip
    ab.add_argument("--second-split", choices=["val", "all"], default="val",
                    help="its held-out documents (default) or all of it")  # fmt: skip
    ab.add_argument("--second-batches", type=int, help="cap on the second text's eval batches")
    ab.add_argument("--jobs", type=int, default=2, help="runs trained side by side (default 2)")
    ab.add_argument("--threads", type=int, default=1, help="PyTorch threads per run (default 1)")
    ab.add_argument("--json", action="store_true", help="print the report as JSON")
    ab.add_argument("--no-progress", action="store_true", help="no progress bars")
    ab.set_defaults(func=cmd_ablate)

    an = sub.add_parser(
        "analyze",
        help="see what the memory learned: gates, sensitivity, lens, cka, memory, access",
    )  # fmt: skip
    asub = an.add_subparsers(dest="analysis", required=True)

    def analysis(name: str, help_: str, n_ckpt: str = "one") -> argparse.ArgumentParser:
        sp = asub.add_parser(name, help=help_, description=help_)
        ckpt_help = "run or checkpoint directory" + (
            " (twice: the two runs to compare)" if n_ckpt == "two" else ""
        )
        sp.add_argument("--ckpt", required=True, action="append", help=ckpt_help)
        sp.add_argument("--out", default="engram-analysis", help="output directory")
        sp.add_argument("--json", action="store_true", help="print the summary as JSON")
        sp.set_defaults(func=cmd_analyze)
        return sp

    def on_data(sp: argparse.ArgumentParser, batches: str) -> None:
        sp.add_argument("--data", help="text to read (default: the run's own validation split)")
        sp.add_argument("--batches", type=int, help=f"validation batches to read ({batches})")

    g = analysis("gates", "gate value per token, Engram layer and branch, over a text")
    g.add_argument("--text", help="the text (default: a sentence with names and fixed phrases)")
    g.add_argument("--text-file", help="read the text from this file")
    se = analysis("sensitivity", "loss with Engram switched off at inference, per token")
    on_data(se, "default all")
    le = analysis("lens", "LogitLens: KL from each layer's early exit to the final one", "two")
    on_data(le, "default 8")
    ck = analysis("cka", "linear CKA between every layer of two models", "two")
    on_data(ck, "default 8")
    me = analysis("memory", "rows an n-gram hits, their norms and collisions; n-grams of a row")
    me.add_argument("--ngram", action="append", help="an n-gram to look up (repeatable)")
    me.add_argument("--row", action="append", metavar="LAYER:HEAD:ROW",
                    help="a row to explain, local to its sub-table (repeatable)")  # fmt: skip
    me.add_argument("--data", help="corpus to count n-grams on (default: the run's own)")
    ac = analysis("access", "row-access distribution (Zipf fit) and cache hit rate vs size")
    ac.add_argument("--data", help="text to read (default: the run's own training split)")
    ac.add_argument("--tokens", type=int, default=200_000, help="tokens to read (200,000)")
    ac.add_argument("--layer", type=int, help="Engram layer id (default: the first)")

    gn = sub.add_parser("generate", help="continue prompts with a trained model")
    gn.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    gn.add_argument("--prompt", action="append", help="prompt text (repeatable: one batch)")
    gn.add_argument("--max-new-tokens", type=int, default=48, help="tokens to add (default 48)")
    gn.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    gn.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (40)")
    gn.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gn.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    gn.add_argument("--store", choices=["ram", "mmap"], default="ram",
                    help="tables in RAM, or memory-mapped table files (default ram)")  # fmt: skip
    gn.add_argument("--tables", help="directory of exported table files (mmap; default: "
                    "the checkpoint's own, or exported on first use)")  # fmt: skip
    gn.add_argument("--table-dtype", default="float32",
                    choices=["float32", "bfloat16", "float16", "int8"],
                    help="row format when exporting on first use (mmap)")  # fmt: skip
    gn.add_argument("--cache-rows", type=int, default=0,
                    help="hot-row cache size per Engram layer (mmap; default 0 = none)")  # fmt: skip
    gn.add_argument("--cache-mib", type=float, default=0,
                    help="or the cache size per Engram layer in MiB of rows (mmap)")  # fmt: skip
    gn.add_argument("--no-prefetch", action="store_true", help="no background row prefetch")
    gn.add_argument("--json", action="store_true", help="print the outputs and stats as JSON")
    gn.set_defaults(func=cmd_generate)

    tb = sub.add_parser("table", help="export a checkpoint's tables to files; inspect a file")
    tsub = tb.add_subparsers(dest="table_command", required=True)
    tx = tsub.add_parser("export", help="write each Engram layer's table to an .engt file")
    tx.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    tx.add_argument("--out", required=True, help="directory (or one .engt file for one layer)")
    tx.add_argument("--dtype", default="float32",
                    choices=["float32", "bfloat16", "float16", "int8"],
                    help="row format: float32 is exact; int8 has a per-row scale (4x smaller)")  # fmt: skip
    tx.set_defaults(func=cmd_table)
    ti = tsub.add_parser("inspect", help="header, checksum and row statistics of an .engt file")
    ti.add_argument("file", help="the table file")
    ti.add_argument("--no-verify", action="store_true", help="skip the data checksum")
    ti.add_argument("--json", action="store_true", help="print one JSON object")
    ti.set_defaults(func=cmd_table)

    i = sub.add_parser("info", help="print the memory's figures for a configuration")
    common(i)
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("rows", help="show which rows each token's n-grams hit")
    common(r)
    r.add_argument("text")
    r.add_argument("--layer", type=int, help="Engram layer id (default: the first)")
    r.set_defaults(func=cmd_rows)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    for name in ("steps", "batches", "max_new_tokens", "tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"engram: error: --{name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    try:
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        msg = " ".join(str(exc).split())
        print(f"engram: error: {msg}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"engram: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engram: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
