"""`engram analyze gates|sensitivity|lens|cka|memory|access`: what the memory learned, as files.

Each analysis is `analyze_*` in `engram.analysis.<module>`; its text is that module's
`format_text(report.to_dict())`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from engram.cli.common import (
    CLIError,
    add_data,
    add_json,
    nonneg_int,
    positive_int,
    require,
    row_address,
    utf8_text,
)

# Each analysis and the module that owns it (its analyze_* and format_text).
MODULES = {
    "gates": "gate_report",
    "sensitivity": "sensitivity",
    "lens": "lens",
    "cka": "cka",
    "memory": "memory",
    "access": "access",
}


def _gates(args: argparse.Namespace, out: Path) -> Any:
    from engram.analysis.gate_report import analyze_gates

    text = args.text
    if args.text_file is not None:
        text = Path(args.text_file).read_text(encoding="utf-8")
    return analyze_gates(args.ckpt[0], out, text=text)


def _sensitivity(args: argparse.Namespace, out: Path) -> Any:
    from engram.analysis.sensitivity import analyze_sensitivity

    return analyze_sensitivity(args.ckpt[0], out, max_batches=args.batches, data_source=args.data)


def _lens(args: argparse.Namespace, out: Path) -> Any:
    from engram.analysis.lens import analyze_logit_lens
    from engram.checkpoint import read_checkpoint

    names = [str(read_checkpoint(c, verify=False).config.get("name", c)) for c in args.ckpt]
    if len(set(names)) < len(names):
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    return analyze_logit_lens(
        dict(zip(names, args.ckpt, strict=True)), out, max_batches=args.batches or 8,
        data_source=args.data,
    )  # fmt: skip


def _cka(args: argparse.Namespace, out: Path) -> Any:
    from engram.analysis.cka import analyze_cka

    if len(args.ckpt) != 2:
        raise CLIError(f"cka compares two runs: give --ckpt twice, got {len(args.ckpt)}")
    return analyze_cka(
        args.ckpt[0], args.ckpt[1], out, max_batches=args.batches or 8, data_source=args.data
    )


def _access(args: argparse.Namespace, out: Path) -> Any:
    from engram.analysis.access import analyze_access
    from engram.analysis.runs import load_engram_run

    parts, _ = load_engram_run(args.ckpt[0], "the access analysis")
    return analyze_access(
        out, indexer=parts.indexer, data_source=args.data or parts.cfg.data.source,
        max_tokens=args.tokens, layer_id=args.layer,
    )  # fmt: skip


def _memory(args: argparse.Namespace, out: Path) -> Any:
    from engram.analysis.memory import analyze_memory

    return analyze_memory(
        args.ckpt[0], out, ngrams=args.ngram or (), rows=args.row or (), data_source=args.data
    )


RUNNERS = {
    "gates": _gates,
    "sensitivity": _sensitivity,
    "lens": _lens,
    "cka": _cka,
    "memory": _memory,
    "access": _access,
}


def cmd_analyze(args: argparse.Namespace) -> None:
    require("matplotlib", f"`engram analyze {args.analysis}` (its plots)")
    out = Path(args.out)
    report = RUNNERS[args.analysis](args, out)
    d = report.to_dict()
    if args.json:
        print(json.dumps(d, indent=1))
        return
    module = importlib.import_module(f"engram.analysis.{MODULES[args.analysis]}")
    print("\n".join(module.format_text(d)))
    print(f"wrote into {out}/")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """analyze and its six analyses."""
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
        add_json(sp, "print the summary as JSON")
        sp.set_defaults(func=cmd_analyze)
        return sp

    def on_data(sp: argparse.ArgumentParser, batches: str) -> None:
        add_data(sp, "text to read (default: the run's own validation split)")
        sp.add_argument("--batches", type=positive_int,
                        help=f"validation batches to read ({batches})")  # fmt: skip

    g = analysis("gates", "gate value per token, Engram layer and branch, over a text")
    one_text = g.add_mutually_exclusive_group()
    one_text.add_argument("--text", type=utf8_text,
                   help="the text (default: a sentence with names and fixed phrases)")  # fmt: skip
    one_text.add_argument("--text-file", type=utf8_text, help="read the text from this UTF-8 file")
    on_data(analysis("sensitivity", "loss with Engram switched off at inference, per token"),
            "default all")  # fmt: skip
    on_data(analysis("lens", "LogitLens: KL from each layer's early exit to the final one", "two"),
            "default 8")  # fmt: skip
    on_data(analysis("cka", "linear CKA between every layer of two models", "two"), "default 8")
    me = analysis("memory", "rows an n-gram hits, their norms and collisions; n-grams of a row")
    me.add_argument("--ngram", action="append", type=utf8_text,
                    help="an n-gram to look up (repeatable)")  # fmt: skip
    me.add_argument("--row", action="append", metavar="LAYER:HEAD:ROW", type=row_address,
                    help="a row to explain, local to its sub-table (repeatable)")  # fmt: skip
    add_data(me, "corpus to count n-grams on (default: the run's own)")
    ac = analysis("access", "row-access distribution (Zipf fit) and cache hit rate vs size")
    add_data(ac, "text to read (default: the run's own training split)")
    ac.add_argument("--tokens", type=positive_int, default=200_000,
                    help="tokens to read (200,000)")  # fmt: skip
    ac.add_argument("--layer", type=nonneg_int, help="Engram layer id (default: the first)")
