"""`engram base init|export|info`: Hugging Face model directories for `engram train --base`.

- `init` writes a randomly initialised model of a supported family with its tokenizer: the
  start of pretraining a plain model (`engram train --base DIR --no-engram`).
- `export` turns a finished `--base` run into a model directory (its trained base and
  tokenizer), usable as the next `--base`.
- `info` prints what engram reads from a model directory, and its fingerprint.
"""

from __future__ import annotations

import argparse

from engram.cli.common import add_data, positive_int, require, seed_int, utf8_text

FAMILY_CHOICES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def cmd_init(args: argparse.Namespace) -> None:
    from engram.hf.base import init_base, read_base

    require("transformers", "`engram base init`")
    path = init_base(
        args.out, args.family, hidden=args.hidden, layers=args.layers, heads=args.heads,
        kv_heads=args.kv_heads, intermediate=args.intermediate, max_positions=args.max_positions,
        tokenizer=args.tokenizer, data=args.data or "builtin:kjv", seed=args.seed,
    )  # fmt: skip
    info = read_base(path)
    print(
        f"wrote {path}: {info.architecture}, {info.n_layers} layers, hidden {info.hidden_size}, "
        f"{info.n_heads} heads, {info.vocab_size:,} ids (tokenizer {args.tokenizer}), "
        f"{info.max_positions} positions, random init (seed {args.seed})"
    )
    print(f"next: engram train --base {path} --out RUN  (--no-engram to pretrain it alone)")


def cmd_export(args: argparse.Namespace) -> None:
    from engram.hf.export import export_base

    require("transformers", "`engram base export`")
    done = export_base(args.ckpt, args.out)
    kind = "trained base" if done.trained_base else "frozen base (unchanged by the run)"
    print(f"wrote {done.path}: the {kind} ({done.architecture}, step {done.step}) + tokenizer.json")
    if done.engram is not None:
        print(
            f"Engram's layers: {done.engram} (engram.hf.load_engram attaches them to the base; "
            "the next --base run starts a new Engram)"
        )


def cmd_info(args: argparse.Namespace) -> None:
    from engram.hf.base import base_fingerprint, default_layer_ids, read_base

    info = read_base(args.path)
    print(f"model        {info.architecture} (model_type {info.model_type})")
    print(
        f"shape        {info.n_layers} layers, hidden {info.hidden_size}, {info.n_heads} heads, "
        f"{info.vocab_size:,} ids, {info.max_positions or 'unlimited'} positions"
    )
    print(f"weights      {', '.join(f.name for f in info.weight_files)}")
    tok = info.path / "tokenizer.json"
    print(f"tokenizer    {tok if tok.is_file() else 'none (give --set data.tokenizer=...)'}")
    print(f"Engram at    layers {list(default_layer_ids(info.n_layers))} by default")
    print(f"fingerprint  {base_fingerprint(info)}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """base init, base export, base info."""
    bp = sub.add_parser("base", help="Hugging Face model directories for `engram train --base`")
    bsub = bp.add_subparsers(dest="base_command", required=True)

    bi = bsub.add_parser("init", help="write a randomly initialised model and its tokenizer")
    bi.add_argument("--family", choices=FAMILY_CHOICES, default="llama",
                    help="model family (default llama)")  # fmt: skip
    bi.add_argument("--out", required=True, help="the new model directory")
    bi.add_argument("--hidden", type=positive_int, default=128, help="hidden size (128)")
    bi.add_argument("--layers", type=positive_int, default=4, help="decoder layers (4)")
    bi.add_argument("--heads", type=positive_int, default=4, help="attention heads (4)")
    bi.add_argument("--kv-heads", type=positive_int,
                    help="key/value heads (default: --heads; not GPT-2)")  # fmt: skip
    bi.add_argument("--intermediate", type=positive_int,
                    help="feed-forward width (default 4 x hidden for GPT-2, ~8/3 x otherwise)")  # fmt: skip
    bi.add_argument("--max-positions", type=positive_int, default=512,
                    help="longest sequence (512)")  # fmt: skip
    bi.add_argument("--tokenizer", type=utf8_text, default="gpt2",
                    help="gpt2 (default), bpe:N (trained on --data) or a tokenizer.json")  # fmt: skip
    add_data(bi, "the corpus a bpe:N tokenizer trains on (default builtin:kjv)")
    bi.add_argument("--seed", type=seed_int, default=0, help="init seed (0)")
    bi.set_defaults(func=cmd_init)

    bx = bsub.add_parser("export", help="a finished --base run as a model directory")
    bx.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    bx.add_argument("--out", required=True, help="the new model directory")
    bx.set_defaults(func=cmd_export)

    bn = bsub.add_parser("info", help="what engram reads from a model directory")
    bn.add_argument("path", type=utf8_text, help="the model directory")
    bn.set_defaults(func=cmd_info)
