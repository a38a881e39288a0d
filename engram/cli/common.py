"""What every command shares: the one-line error, argument validators, shared argument groups.

Every value is checked where it enters: argparse `type=` callables below turn a bad value into
`engram: error: --flag ...` (exit 2) before any work starts, so the message names the flag as the
user typed it. The parser prints one line (no usage block), never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import difflib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

# The optional packages a command may need, and how to get each.
OPTIONAL = {
    "pyarrow": "pip install 'engram-lm[parquet]' (or pyarrow)",
    "matplotlib": "pip install matplotlib",
    "transformers": "pip install 'engram-lm[hf]' (transformers, for Hugging Face base models)",
}
MAX_SEED = 2**63 - 1
_UTF8_CHUNK = 1 << 20


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `engram: error: --flag message`."""

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --lr: must be ..."; say "--lr must be ..." instead.
        message = re.sub(r"^argument ([^:]+): (must|names|is) ", r"\1 \2 ", message)
        message = re.sub(r"^argument ", "", message)
        self.exit(2, f"engram: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def require(module: str, why: str) -> None:
    """A one-line error when the optional `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise CLIError(f"{why} needs {module}, which is not installed: {OPTIONAL[module]}")


# ----------------------------------------------------------------------------- numbers


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def num(v: float) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if hi is None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {num(hi)}"
    return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"


def _in_range(value: float, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    return not (hi is not None and (value >= hi if hi_open else value > hi))


def finite_float(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], float]:  # fmt: skip
    """An argparse type: a finite float in [lo, hi] (either end open or absent)."""

    def parse(text: str) -> float:
        value = _number(text, float)
        if not _in_range(value, lo, hi, lo_open, hi_open):
            rng = _range_text(lo, hi, lo_open, hi_open)
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}")
        return value

    parse.__name__ = "finite_float"
    return parse


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if not _in_range(value, lo, hi, False, False):
            raise argparse.ArgumentTypeError(
                f"must be {_range_text(lo, hi, False, False)}, got {value}"
            )
        return value

    parse.__name__ = "int_range"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)
seed_int = int_range(0, MAX_SEED)
fraction = finite_float(0.0, 1.0)


def comma_list(item: Callable[[str], Any], what: str, empty_ok: bool = False):
    """An argparse type: comma-separated `item`s (`what` names them); 'none' or '' = () if ok."""

    def parse(text: str) -> tuple:
        if text.strip().lower() in ("", "none"):
            if empty_ok:
                return ()
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        try:
            return tuple(item(part) for part in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated {what}, got {text!r}"
            ) from None

    parse.__name__ = "comma_list"
    return parse


def distinct(parse: Callable[[str], tuple]) -> Callable[[str], tuple]:
    def check(text: str) -> tuple:
        values = parse(text)
        if not values or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"must be non-empty and distinct, got {text!r}")
        return values

    check.__name__ = "distinct"
    return check


def scale(text: str) -> float:
    """A table scale: a positive finite number or a fraction such as 1/16."""
    num, slash, den = text.strip().partition("/")
    value = _number(num, float)
    if slash:
        denominator = _number(den, float)
        value = value / denominator if denominator else math.inf
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text.strip()!r}")
    return value


layer_ids = distinct(comma_list(nonneg_int, "0-based layer ids"))
seed_list = distinct(comma_list(seed_int, "integer seeds >= 0"))
rho_list = comma_list(fraction, "numbers in [0, 1]", empty_ok=True)
scale_list = comma_list(scale, "positive numbers (e.g. 0.25 or 1/16)", empty_ok=True)


def row_address(text: str) -> tuple[int, int, int]:
    """LAYER:HEAD:ROW, three integers >= 0."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        layer, head, row = (int(v) for v in parts)
        if min(layer, head, row) < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be LAYER:HEAD:ROW (three integers >= 0), got {text!r}"
        ) from None
    return layer, head, row


# ----------------------------------------------------------------------------- text and files


def utf8_text(text: str) -> str:
    """Text typed on the command line: the OS hands undecodable bytes over as surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 (byte {exc.start} of {text!r}); expected UTF-8 text"
        ) from None
    return text


def check_utf8_file(flag: str, path: Path) -> None:
    """A CLIError naming `flag` and the first invalid byte of a file that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as f:
        while True:
            chunk = f.read(_UTF8_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                pos = max(exc.start - len(exc.object) + len(chunk), 0)
                line += chunk.count(b"\n", 0, pos)
                raise CLIError(
                    f"{flag} {str(path)!r} is not valid UTF-8: {exc.reason} at byte "
                    f"{offset + pos} (line {line}); expected UTF-8 text, re-encode the file"
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


_TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json")


def check_source(flag: str, source: str | None) -> None:
    """`builtin[:names]`, 'none' or an existing file or directory; text UTF-8, parquet readable."""
    if source is None or source == "none" or source.startswith("builtin"):
        return
    path = Path(source)
    if not path.exists():
        raise CLIError(f"{flag} {source!r} does not exist; expected a file or directory")
    parquet = path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet")))
    if parquet:
        require("pyarrow", f"{flag} {source!r} (parquet)")
    if path.is_file() and path.suffix.lower() in _TEXT_SUFFIXES:
        check_utf8_file(flag, path)


def check_text_file(flag: str, name: str | None) -> None:
    if name is None:
        return
    if not Path(name).is_file():
        raise CLIError(f"{flag} {name!r} does not exist or is not a file")
    check_utf8_file(flag, Path(name))


def check_files(args: argparse.Namespace) -> None:
    """The files and sources a command was given: they exist and read as promised.

    Checked before the command starts, not while parsing, so `--help` and the docs' example
    command lines parse without the files.
    """
    for dest in ("data", "second_text"):
        check_source("--" + dest.replace("_", "-"), getattr(args, dest, None))
    for dest in ("text_file", "prompt_file"):
        check_text_file("--" + dest.replace("_", "-"), getattr(args, dest, None))
    config = getattr(args, "config", None)
    if config is not None and Path(config).is_file():  # a missing one: the library says so
        check_utf8_file("--config", Path(config))


def none_to_none(text: str | None) -> str | None:
    """A second text: 'none' skips it."""
    return None if text == "none" else text


# ----------------------------------------------------------------------------- config overrides


def _override_key(key: str) -> None:
    import dataclasses

    from engram.run_config import _SECTIONS

    fields = {s: sorted(f.name for f in dataclasses.fields(k)) for s, k in _SECTIONS.items()}
    every = ["name", *(f"{s}.{f}" for s, names in fields.items() for f in names)]
    section, dot, name = key.partition(".")
    if key in every or key == "engram":
        return
    if not dot and any(key in names for names in fields.values()):
        return  # a bare field name: the library resolves it (or calls it ambiguous)
    near = difflib.get_close_matches(key, every, n=3)
    if not near:  # a right field in the wrong section, or a misspelt bare name
        leaves = difflib.get_close_matches(name or section, [k.split(".")[-1] for k in every], 3)
        near = [k for k in every if k.split(".")[-1] in leaves][:3]
    hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
    known = (
        f"{section} has {', '.join(fields[section])}"
        if dot and section in fields
        else (f"sections are {', '.join(fields)}")
    )
    raise argparse.ArgumentTypeError(f"names an unknown config key {key!r}; {hint}({known})")


def override(text: str) -> str:
    """`--set section.field=value`: a known key and, for numbers, a finite value."""
    utf8_text(text)
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"must look like section.field=VALUE, got {text!r}")
    _override_key(key.strip())
    try:
        parsed = json.loads(value.strip())
    except json.JSONDecodeError:
        parsed = None
    numbers = parsed if isinstance(parsed, list) else [parsed]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise argparse.ArgumentTypeError(f"must set a finite number, got {text!r}")
    return text


# ----------------------------------------------------------------------------- argument groups


def add_run_source(sp: argparse.ArgumentParser) -> None:
    """--preset / --config / --set: where a command's run configuration comes from."""
    sp.add_argument("--preset", help="a named configuration (see `engram train --help`)")
    sp.add_argument(
        "--config", type=utf8_text, help="a run config JSON file (as written to config.json)"
    )
    sp.add_argument(
        "--set", action="append", metavar="KEY=VALUE", type=override,
        help="override a config value, e.g. train.steps=100 or model.d_model=64 (repeatable)",
    )  # fmt: skip


def add_data(sp: argparse.ArgumentParser, help_: str) -> None:
    sp.add_argument("--data", type=utf8_text, help=help_)


def add_tokenizer(sp: argparse.ArgumentParser) -> None:
    """--tokenizer, as the override data.tokenizer (for the commands that build runs)."""
    sp.add_argument("--tokenizer", type=utf8_text,
                    help="gpt2, bpe:N (trained on the run's training split), a tokenizer.json "
                    "or a Hugging Face model directory (data.tokenizer)")  # fmt: skip


def add_json(sp: argparse.ArgumentParser, help_: str = "print the result as JSON") -> None:
    sp.add_argument("--json", action="store_true", help=help_)


def add_no_progress(sp: argparse.ArgumentParser, help_: str = "no progress bars") -> None:
    sp.add_argument("--no-progress", action="store_true", help=help_)


def run_config(args: argparse.Namespace, default_preset: str | None = None):  # -> RunConfig
    """The run config of --preset/--config, with --set, --data, --steps and --lr applied."""
    from engram.presets import preset
    from engram.run_config import RunConfig, apply_overrides

    if getattr(args, "preset", None) and getattr(args, "config", None):
        raise CLIError("give either --preset or --config, not both")
    base_flags = [f for f, v in _base_flags(args).items() if v]
    if not getattr(args, "base", None) and base_flags:
        raise CLIError(
            f"{base_flags[0]} applies to a run with --base PATH (with a preset or config use "
            "--set engram.layer_ids=[...] / --set engram=null)"
        )
    overrides = _overrides(args)
    if getattr(args, "base", None):
        if getattr(args, "preset", None) or getattr(args, "config", None):
            raise CLIError(
                "give --base or --preset/--config, not both (a base run's config.json names its "
                "base: continue or copy it with --config alone)"
            )
        from engram.hf.base import base_run_config

        return base_run_config(
            args.base, engram=not args.no_engram, layers=args.layers, table_size=args.table_size,
            train_base=not args.freeze_base, overrides=overrides,
        )  # fmt: skip
    if getattr(args, "config", None):
        cfg = RunConfig.load(args.config)
    elif getattr(args, "preset", None) or default_preset:
        cfg = preset(args.preset or default_preset)
    else:
        base = " (or --base PATH, a Hugging Face model)" if hasattr(args, "base") else ""
        raise CLIError(f"give --preset NAME or --config FILE{base} (see `engram train --help`)")
    return apply_overrides(cfg, overrides)


def _base_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that only a --base run takes, and their values."""
    return {
        "--freeze-base": getattr(args, "freeze_base", False),
        "--no-engram": getattr(args, "no_engram", False),
        "--layers": getattr(args, "layers", None) if hasattr(args, "base") else None,
        "--table-size": getattr(args, "table_size", None) if hasattr(args, "base") else None,
    }


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set, then --data, --tokenizer, --steps and --lr as overrides."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "data", None):
        overrides.append(f"data.source={json.dumps(str(args.data))}")
    if getattr(args, "tokenizer", None):
        overrides.append(f"data.tokenizer={json.dumps(str(args.tokenizer))}")
    if getattr(args, "steps", None) is not None:
        overrides.append(f"train.steps={args.steps}")
    if getattr(args, "lr", None) is not None:
        overrides.append(f"optim.lr={args.lr!r}")
    return overrides


def print_err(line: str) -> None:
    print(line, file=sys.stderr)
