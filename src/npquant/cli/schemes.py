"""``npquant schemes``: the presets, one line each with its bits per weight and rule."""

from __future__ import annotations

import json

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``schemes`` subcommand and its options."""
    sch = sub.add_parser("schemes", help="list the presets and their rules",
                         description="List the named presets, one line each with its rule.")
    sch.add_argument("--json", action="store_true", help="print the presets as JSON")
    sch.set_defaults(run=run)


def run(args) -> int:
    from ..schemes import schemes

    presets = schemes()
    if args.json:
        from dataclasses import asdict

        print(json.dumps({name: {**asdict(s), "rule": s.describe()} for name, s in presets.items()}, indent=2))
        return 0
    width = max(len(n) for n in presets)
    print(f"{'preset':<{width}}  {'bits/w':>6}  rule (bits/w: codes and scales of a 4096 x 4096 weight)")
    for name, s in presets.items():
        print(f"{name:<{width}}  {s.bits_per_weight():6.3f}  {s.describe()}")
    return 0
