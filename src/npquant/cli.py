"""The ``npquant`` command line: argument parsing and rendering only."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import NpquantError

__all__ = ["main"]


def _columns_help() -> str:
    from .report import COLUMNS

    width = max(len(k) for k in COLUMNS)
    return "columns:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in COLUMNS.items())


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npquant",
        description="Weight quantization for numpy: what each scheme saves and what it loses.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="compare schemes on a built-in matrix with one outlier channel",
        description=(
            "Quantize a seeded Gaussian weight (std 0.02) whose row 0 is 100x larger, "
            "with every preset (or those named by --scheme), and print one row per scheme."
        ),
        epilog=_columns_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--shape", nargs=2, type=int, default=(512, 1024), metavar=("OUT", "IN"),
                      help="weight shape (default: 512 1024)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the weight and the batch (default: 0)")
    demo.add_argument("--batch", type=int, default=16, help="rows of the random batch x for output error (default: 16)")
    demo.add_argument("--scheme", action="append", metavar="PRESET",
                      help="preset to compare (repeatable; default: all, see 'npquant schemes')")
    demo.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")

    sch = sub.add_parser("schemes", help="list the presets and their rules",
                         description="List the named presets, one line each with its rule.")
    sch.add_argument("--json", action="store_true", help="print the presets as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "schemes":
            return _schemes(args)
    except NpquantError as exc:
        print(f"npquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


def _json_value(v):
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _demo(args) -> int:
    from .report import compare_schemes, demo_matrix

    out_features, in_features = args.shape
    if args.batch < 1:
        raise NpquantError(f"--batch must be at least 1, got {args.batch}")
    w = demo_matrix(out_features, in_features, seed=args.seed)
    rows = compare_schemes(w, args.scheme, batch=args.batch, seed=args.seed)
    if args.json:
        print(json.dumps([{k: _json_value(v) for k, v in r.items()} for r in rows], indent=2))
        return 0
    title = (
        f"W ({out_features}, {in_features}) float32, std 0.02, row 0 x100 (outlier channel); "
        f"x ({args.batch}, {in_features}); seed {args.seed}"
    )
    _print_table(title, rows)
    return 0


def _fmt(key: str, v) -> str:
    if key == "scheme":
        return v
    if key == "bytes":
        return f"{v:,}"
    if key == "bits_per_weight":
        return f"{v:.3g}" if v < 10 else f"{v:.0f}"
    if key == "saving":
        return f"{v:.2f}x"
    if key == "sqnr_db":
        return "inf" if math.isinf(v) else f"{v:.1f}"
    return "0" if v == 0 else f"{v:.2e}"


def _print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    headers = {
        "scheme": "scheme",
        "bits_per_weight": "bits/w",
        "bytes": "bytes",
        "saving": "saving",
        "rel_error": "rel error",
        "sqnr_db": "SQNR dB",
        "max_abs_error": "max abs err",
        "output_rel_error": "output err",
    }
    table = Table(title=title, title_justify="left")
    for key, head in headers.items():
        table.add_column(head, justify="left" if key == "scheme" else "right")
    for r in rows:
        table.add_row(*(_fmt(k, r[k]) for k in headers))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # pipes and files get the whole table, unwrapped
    console.print(table)


def _schemes(args) -> int:
    from .schemes import schemes

    presets = schemes()
    if args.json:
        from dataclasses import asdict

        print(json.dumps({name: {**asdict(s), "rule": s.describe()} for name, s in presets.items()}, indent=2))
        return 0
    width = max(len(n) for n in presets)
    for name, s in presets.items():
        print(f"{name:<{width}}  {s.describe()}")
    return 0
