"""`engram info`, `engram rows` and `engram plan`: a configuration's figures, rows and budget."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from engram.cli.common import (
    CLIError,
    add_data,
    add_json,
    add_run_source,
    fraction,
    layer_ids,
    nonneg_int,
    positive_int,
    run_config,
    utf8_text,
)
from engram.config import EngramConfig, small_config
from engram.hashing import available_paths
from engram.indexer import NgramIndexer


def _config_from_args(args: argparse.Namespace) -> EngramConfig:
    cfg = small_config()
    overrides = {}
    if getattr(args, "layers", None):
        overrides["layer_ids"] = args.layers
    if getattr(args, "table_size", None):
        overrides["engram_vocab_size"] = (args.table_size,) * (cfg.max_ngram_size - 1)
    if not overrides:
        return cfg
    try:
        return EngramConfig(**{**cfg.to_dict(), **overrides})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


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
    from engram.plan import format_bytes, optimizer_bytes, table_bytes

    all_rows = sum(ix.hasher.total_rows(i) for i in cfg.layer_ids)
    print(
        f"memory          tables {format_bytes(table_bytes(all_rows, cfg.head_dim))} (fp32); "
        f"optimizer {format_bytes(optimizer_bytes(all_rows, cfg.head_dim))} (Adam's 2 moments)"
    )
    paths = ", ".join(available_paths())
    print(f"hash kernel     {ix.hasher.path} (available here: {paths})")
    from engram.store.cache import kernel_available as cache_kernel
    from engram.store.readkernel import kernel_available as pread_kernel

    built = {"row reader": pread_kernel(), "row-cache probe": cache_kernel()}
    print(
        "C kernels       "
        + ", ".join(f"{k} {'built' if v else 'NOT built'}" for k, v in built.items())
    )
    print(f"fingerprint     {ix.hasher.fingerprint()}")


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


def cmd_plan(args: argparse.Namespace) -> None:
    from engram.plan import format_plan
    from engram.presets import engram_template, plan_for

    base = run_config(args, default_preset="demo-moe")
    if base.base is not None:
        raise CLIError(
            f"{base.name!r} trains a Hugging Face base model ({base.base.path!r}); `engram plan` "
            "splits engram's own MoE backbone between experts and tables"
        )
    _, plan = plan_for(base, args.rho, template=engram_template(args.layers or (1,)))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan))


def _memory_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--layers", type=layer_ids,
                    help="comma-separated 0-based Engram layer ids (default: 1)")  # fmt: skip
    sp.add_argument("--table-size", type=positive_int,
                    help="target rows per sub-table (default 20000)")  # fmt: skip
    sp.add_argument("--tokenizer", type=utf8_text,
                    help="gpt2 (default), bpe:N, a tokenizer.json or a Hugging Face model directory")  # fmt: skip
    add_data(sp, "the corpus a bpe:N tokenizer trains on (default builtin:kjv)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """info, rows, plan."""
    i = sub.add_parser("info", help="print the memory's figures for a configuration")
    _memory_args(i)
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("rows", help="show which rows each token's n-grams hit")
    _memory_args(r)
    r.add_argument("text", metavar="TEXT", type=utf8_text)
    r.add_argument("--layer", type=nonneg_int, help="Engram layer id (default: the first)")
    r.set_defaults(func=cmd_rows)

    pl = sub.add_parser("plan", help="allocate a sparse budget between experts and Engram tables")
    add_run_source(pl)
    pl.add_argument("--rho", type=fraction, default=0.75, help="fraction kept in routed experts")
    pl.add_argument("--layers", type=layer_ids,
                    help="comma-separated 0-based Engram layer ids (default: 1)")  # fmt: skip
    add_json(pl, "print the plan as JSON")
    pl.set_defaults(func=cmd_plan)
