"""`engram sweep` and `engram ablate`: many runs trained side by side, one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from engram.cli.common import (
    CLIError,
    add_data,
    add_json,
    add_no_progress,
    add_run_source,
    add_tokenizer,
    fraction,
    layer_ids,
    none_to_none,
    positive_int,
    require,
    rho_list,
    run_config,
    scale_list,
    seed_list,
    utf8_text,
)


def _echo(args: argparse.Namespace):
    return (lambda _: None) if args.json else print


def cmd_sweep(args: argparse.Namespace) -> None:
    from engram.presets import engram_template
    from engram.sweep import SweepConfig, run_sweep, sweep_report

    require("matplotlib", "`engram sweep` (its plots)")
    base = run_config(args, default_preset="demo-moe")
    given = {"rhos": args.rhos, "table_scales": args.table_scales, "table_rho": args.table_rho,
             "seeds": args.seeds}  # fmt: skip
    sweep = SweepConfig(
        **{k: v for k, v in given.items() if v is not None},
        second_text=none_to_none(args.second_text), jobs=args.jobs, second_batches=args.second_batches,
    )  # fmt: skip
    result = run_sweep(
        args.out, base, sweep, template=engram_template(args.layers or (1,)),
        progress=not args.no_progress, echo=_echo(args),
    )  # fmt: skip
    print(sweep_report(result, as_json=args.json))


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
    from engram.ablate import CONTROLS, AblationConfig, ablation_report, run_ablation

    require("matplotlib", "`engram ablate` (its plots)")
    kwargs: dict = {"jobs": args.jobs, "threads": args.threads, "second_split": args.second_split,
                    "second_batches": args.second_batches}  # fmt: skip
    for name, value in (("seeds", args.seeds), ("capacity_scales", args.capacity)):
        if value is not None:
            kwargs[name] = value
    if args.controls is not None:
        kwargs["controls"] = tuple(c.strip() for c in args.controls.split(",") if c.strip())
        unknown = sorted(set(kwargs["controls"]) - set(CONTROLS))
        if unknown:
            raise CLIError(f"unknown --controls {unknown}; expected some of {', '.join(CONTROLS)}")
    if args.second_text is not None:
        kwargs["second_text"] = none_to_none(args.second_text)
    result = run_ablation(
        args.ckpt, args.out, AblationConfig(**kwargs), baseline=_baseline_config(args.baseline),
        progress=not args.no_progress, echo=_echo(args),
    )  # fmt: skip
    print(ablation_report(result, as_json=args.json))


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser(
        "sweep", help="validation loss against rho at a fixed budget, and against table size",
    )  # fmt: skip
    add_run_source(sw)
    add_data(sw, "builtin[:kjv,web,...], or a .txt/.jsonl/.parquet file or dir")
    add_tokenizer(sw)
    sw.add_argument("--out", default="engram-sweep", help="sweep directory (resumed)")
    sw.add_argument("--steps", type=positive_int, help="optimizer steps per run (train.steps)")
    sw.add_argument("--rhos", type=rho_list,
                    help="comma-separated rho values (default 1,0.875,0.75,0.5,0.25)")  # fmt: skip
    sw.add_argument(
        "--table-scales", type=scale_list,
        help="table sizes as multiples of the planned one (default 0.0625,0.25,1,4,16; 'none')",
    )  # fmt: skip
    sw.add_argument("--table-rho", type=fraction,
                    help="backbone of the table sweep (default 0.75)")  # fmt: skip
    sw.add_argument("--seeds", type=seed_list, help="comma-separated train seeds (default 0)")
    sw.add_argument("--layers", type=layer_ids,
                    help="comma-separated 0-based Engram layer ids (default: 1)")  # fmt: skip
    sw.add_argument("--second-text", type=utf8_text, default="builtin:bbe",
                    help="a text not trained on, every point evaluated on it ('none' skips)")  # fmt: skip
    sw.add_argument("--second-batches", type=positive_int,
                    help="cap on the second text's eval batches")  # fmt: skip
    sw.add_argument("--jobs", type=positive_int, default=1,
                    help="runs trained side by side (processes)")  # fmt: skip
    add_json(sw)
    add_no_progress(sw)
    sw.set_defaults(func=cmd_sweep)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    ab = sub.add_parser(
        "ablate", help="train an Engram run's controls over seeds and report what the table adds",
    )  # fmt: skip
    ab.add_argument("--ckpt", required=True, help="the Engram run directory to ablate")
    ab.add_argument("--out", default="engram-ablation", help="ablation directory (resumed)")
    ab.add_argument("--seeds", type=seed_list, help="comma-separated train seeds (default 0,1,2)")
    ab.add_argument(
        "--controls",
        help="comma-separated subset of no-information,address,capacity,frozen,experts (all)",
    )
    ab.add_argument("--capacity", type=scale_list,
                    help="ladder scales of the table, e.g. 1/64,1/16,1/4 (default)")  # fmt: skip
    ab.add_argument("--baseline", help="the iso-parameter baseline: a preset, run dir or config")
    ab.add_argument(
        "--second-text", type=utf8_text, help="a text not trained on: "
        "builtin:NAME or a file ('none' skips; default builtin:bbe)",
    )  # fmt: skip
    ab.add_argument("--second-split", choices=["val", "all"], default="val",
                    help="its held-out documents (default) or all of it")  # fmt: skip
    ab.add_argument("--second-batches", type=positive_int,
                    help="cap on the second text's eval batches")  # fmt: skip
    ab.add_argument("--jobs", type=positive_int, default=2,
                    help="runs trained side by side (default 2)")  # fmt: skip
    ab.add_argument("--threads", type=positive_int, default=1,
                    help="PyTorch threads per run (default 1)")  # fmt: skip
    add_json(ab, "print the report as JSON")
    add_no_progress(ab)
    ab.set_defaults(func=cmd_ablate)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """sweep, ablate."""
    _add_sweep(sub)
    _add_ablate(sub)
