"""``npquant demo``: every preset (or the chosen ones) on a built-in weight with one outlier row."""

from __future__ import annotations

import argparse
import json

from ..errors import NpquantError
from ._common import json_value

__all__ = ["add_parser", "run"]


def _columns_help() -> str:
    from ..report import COLUMNS

    width = max(len(k) for k in COLUMNS)
    return "columns:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in COLUMNS.items())


def add_parser(sub) -> None:
    """The ``demo`` subcommand and its options."""
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
    demo.set_defaults(run=run)


def run(args) -> int:
    from .. import render
    from ..report import compare_schemes, demo_matrix

    out_features, in_features = args.shape
    if args.batch < 1:
        raise NpquantError(f"--batch must be at least 1, got {args.batch}")
    w = demo_matrix(out_features, in_features, seed=args.seed)
    rows = compare_schemes(w, args.scheme, batch=args.batch, seed=args.seed)
    if args.json:
        print(json.dumps([{k: json_value(v) for k, v in r.items()} for r in rows], indent=2))
        return 0
    title = (
        f"W ({out_features}, {in_features}) float32, std 0.02, row 0 x100 (outlier channel); "
        f"x ({args.batch}, {in_features}); seed {args.seed}"
    )
    render.print_table(title, rows)
    return 0
