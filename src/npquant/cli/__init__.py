"""The ``npquant`` command line: one module per command, each with its arguments and its work.

``npquant COMMAND``: :mod:`.demo`, :mod:`.schemes`, :mod:`.report`,
:mod:`.quantize`, :mod:`.inspect`, :mod:`.eval`, :mod:`.plan`,
:mod:`.convert`. Each command module has ``add_parser(sub)`` (its options)
and ``run(args)`` (the work, returning the exit code); what it prints as
tables and plots is in :mod:`npquant.render`. :mod:`._common` runs a command
with its errors turned into one line on stderr (exit 2) and holds what the
commands share; :mod:`._gguf` converts a ``.gguf`` MODEL for report and
quantize; :mod:`._gptq` runs GPTQ for quantize. Command modules import the
library inside ``run``, so ``--help`` and the first error line come without
numpy's heavier imports or ml_dtypes.
"""

from __future__ import annotations

import argparse

from .. import __version__
from . import convert
from . import demo
from . import eval as eval_command
from . import inspect as inspect_command
from . import plan
from . import quantize
from . import report
from . import schemes
from ._common import run_command
from ._common import terminate_as_interrupt as _terminate_as_interrupt  # noqa: F401  (tests stop a run with SIGTERM)

__all__ = ["main"]

#: The commands in the order ``npquant --help`` lists them.
_COMMANDS = (demo, schemes, report, quantize, inspect_command, eval_command, plan, convert)


def build_parser() -> argparse.ArgumentParser:
    """``npquant`` and every command's options."""
    parser = argparse.ArgumentParser(
        prog="npquant",
        description="Weight quantization for numpy: what each scheme saves and what it loses.",
    )
    parser.add_argument("--version", action="version", version=f"npquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_command(args.command, args.run, args)
