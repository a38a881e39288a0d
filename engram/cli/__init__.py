"""The ``engram`` command line: thin wrappers over the library.

Design choices:
- Every command is a call into the library; the CLI only parses arguments and prints. Each
  report formats itself (``engram.analysis.<name>.format_text``, ``engram.sweep.sweep_report``,
  ``engram.ablate.ablation_report``, ``engram.plan.format_plan``).
- Every value is validated where it enters (``engram.cli.common``): a non-finite or out-of-range
  number, text that is not UTF-8, a missing file, an unknown ``--set`` key, a missing optional
  package ends in a one-line ``engram: error: ...`` naming the flag, exit code 2, never a
  traceback. What only the library can check (an empty corpus, a checkpoint from another
  configuration, ...) raises ``ValueError`` subclasses, printed the same way.
- Heavy imports (torch models, matplotlib) happen inside the commands, so ``engram --help`` is fast.
- Ctrl-C prints ``engram: interrupted`` (exit 130); a training run saves its own step and says
  where.

Commands (one module per group):
- ``run``: ``engram demo`` (MoE baseline vs its iso-parameter Engram model and that model's
  no-information control), ``engram train`` (``--nproc N`` or torchrun: sharded tables),
  ``engram eval``, ``engram generate`` (tables in RAM or on disk); ``engram train --base PATH``
  trains a Hugging Face causal LM with (or without) Engram attached.
- ``model``: ``engram info`` (the memory's figures), ``engram rows TEXT`` (rows per token),
  ``engram plan`` (the expert/table allocation that matches an MoE's params and FLOPs).
- ``experiments``: ``engram sweep`` (loss against rho and table size), ``engram ablate`` (an
  Engram run's controls over seeds, in-domain and on a second text).
- ``analyze``: ``engram analyze gates|sensitivity|lens|cka|memory|access``.
- ``table``: ``engram table export|inspect``.
- ``base``: ``engram base init|export|info`` (Hugging Face model directories for
  ``engram train --base``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from engram.cli import analyze, base, experiments, model, run, table
from engram.cli.common import OPTIONAL, CLIError, Parser, check_files
from engram.parallel.context import DistributedError
from engram.version import __version__

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> Parser:
    p = Parser(prog="engram", description="Engram conditional memory for PyTorch")
    p.add_argument("--version", action="version", version=f"engram {__version__} (engram-lm)")
    sub = p.add_subparsers(dest="command", required=True)
    run.add_parsers(sub)
    experiments.add_parsers(sub)
    analyze.add_parsers(sub)
    table.add_parsers(sub)
    model.add_parsers(sub)
    base.add_parsers(sub)
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _missing_optional(exc: ImportError) -> str | None:
    """The optional package an ImportError is about (itself or its cause), if any."""
    for e in (exc, exc.__cause__):
        name = (getattr(e, "name", None) or "").split(".")[0]
        if name in OPTIONAL:
            return name
    return None


def _run(args) -> int:
    try:
        check_files(args)
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as exc:  # fmt: skip
        print(f"engram: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        name = _missing_optional(exc)
        if name is None:
            raise
        msg = _one_line(exc)
        hint = "" if "pip install" in msg else f"; install it: {OPTIONAL[name]}"
        print(f"engram: error: {msg}{hint}", file=sys.stderr)
        return 2
    except DistributedError as exc:
        print(f"engram: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = argv
    try:
        return _run(args)
    except KeyboardInterrupt as exc:
        from engram.train import TrainingInterrupted  # lazy: torch; imported by then if training

        if not isinstance(exc, TrainingInterrupted):  # a saved run has already said where
            print("engram: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
