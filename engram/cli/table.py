"""`engram table export|inspect`: a checkpoint's tables as `.engt` files; a file's header."""

from __future__ import annotations

import argparse
import json

from engram.cli.common import add_json
from engram.cli.run import DTYPES

_HEADER_KEYS = ("path", "version", "dtype", "num_rows", "dim", "layer_id", "fingerprint",
                "size_on_disk", "bytes_per_row", "dirty", "verified")  # fmt: skip
_META_KEYS = ("run_name", "step", "source_checkpoint", "sub_table_sizes")


def cmd_export(args: argparse.Namespace) -> None:
    from engram.export import describe_table, export_tables

    files = export_tables(args.ckpt, args.out, dtype=args.dtype)
    for lid, f in files.items():
        info = describe_table(f, verify=False, sample_rows=0)
        print(
            f"layer {lid}: {f} ({info['num_rows']:,} rows x {info['dim']}, {args.dtype}, "
            f"{info['size_on_disk'] / 2**20:.1f} MiB)"
        )


def cmd_inspect(args: argparse.Namespace) -> None:
    from engram.export import describe_table

    info = describe_table(args.file, verify=not args.no_verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key in _HEADER_KEYS:
        if key in info:
            print(f"{key:>17}: {info[key]}")
    if "row_norm" in info:
        rn = info["row_norm"]
        print(
            f"{'row norms':>17}: mean {rn['mean']:.4f}, std {rn['std']:.4f}, "
            f"min {rn['min']:.4f}, max {rn['max']:.4f} over {rn['sampled_rows']} sampled rows"
        )
    meta = info.get("meta") or {}
    for key in _META_KEYS:
        if key in meta:
            print(f"{key:>17}: {meta[key]}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """table export, table inspect."""
    tb = sub.add_parser("table", help="export a checkpoint's tables to files; inspect a file")
    tsub = tb.add_subparsers(dest="table_command", required=True)
    tx = tsub.add_parser("export", help="write each Engram layer's table to an .engt file")
    tx.add_argument("--ckpt", required=True, help="run directory or checkpoint directory")
    tx.add_argument("--out", required=True, help="directory (or one .engt file for one layer)")
    tx.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="row format: float32 is exact; int8 has a per-row scale (4x smaller)")  # fmt: skip
    tx.set_defaults(func=cmd_export)
    ti = tsub.add_parser("inspect", help="header, checksum and row statistics of an .engt file")
    ti.add_argument("file", help="the table file")
    ti.add_argument("--no-verify", action="store_true", help="skip the data checksum")
    add_json(ti, "print one JSON object")
    ti.set_defaults(func=cmd_inspect)
