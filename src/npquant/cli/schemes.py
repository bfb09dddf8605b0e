"""``npquant schemes``: the presets, one line each with its bits per weight, its bits per activation and rule.

``bits/w`` is the weights' storage (codes and scales); ``bits/a`` the bits
of each activation code :func:`npquant.linear` multiplies: ``8`` for the
W8A8 schemes (``x`` quantized per token at each call), ``32`` for the
weight-only ones (``x`` stays float32).
"""

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

        print(json.dumps({name: {**asdict(s), "bits_per_activation": s.activation_bits or 32, "rule": s.describe()}
                          for name, s in presets.items()}, indent=2))
        return 0
    width = max(len(n) for n in presets)
    print(f"{'preset':<{width}}  {'bits/w':>6}  {'bits/a':>6}  rule (bits/w: codes and scales of a 4096 x 4096 "
          f"weight; bits/a: each activation linear multiplies, 32 = float32)")
    for name, s in presets.items():
        print(f"{name:<{width}}  {s.bits_per_weight():6.3f}  {s.activation_bits or 32:6d}  {s.describe()}")
    return 0
