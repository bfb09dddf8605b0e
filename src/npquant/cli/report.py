"""``npquant report``: per layer of a real checkpoint, what each scheme saves and loses (writes nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._common import Progress, json_value, model_path, need_matplotlib
from ._gguf import GGUF_MODEL_HELP, converted_gguf, is_gguf, lossy_note

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``report`` subcommand and its options."""
    rep = sub.add_parser(
        "report",
        help="per layer of a real checkpoint: what each scheme saves and loses",
        description=(
            "Quantize every linear layer of a safetensors checkpoint with each scheme, without writing "
            "anything, and report per layer: shape, bits/weight, bytes before and after, relative error, "
            "SQNR and the outlier ratio (largest row absmax / median row absmax), then totals per scheme. "
            "The worst layers are highlighted. Tensors are read one at a time from the memory-mapped file. "
            "A .gguf file is converted first (float32, in a temporary directory under TMPDIR, removed "
            "afterwards), and the GGML types llama.cpp had quantized already are named."
        ),
    )
    rep.add_argument("model", nargs="?", metavar="MODEL", help=GGUF_MODEL_HELP)
    rep.add_argument("--scheme", action="append", metavar="PRESET",
                     help="preset to try (repeatable; default: w8-channel, w4-g128, fp8-channel)")
    rep.add_argument("--include", action="append", metavar="REGEX", help="also quantize tensors whose name matches")
    rep.add_argument("--exclude", action="append", metavar="REGEX", help="leave tensors whose name matches")
    out = rep.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list of per-layer objects")
    out.add_argument("--csv", action="store_true", help="print per-layer rows as CSV")
    rep.add_argument("--plot", metavar="FILE.png", help="draw per-layer SQNR for each scheme (needs matplotlib)")
    rep.add_argument("--worst", type=int, default=3, metavar="N", help="highlight the N worst layers per scheme (default 3)")
    rep.set_defaults(run=run)


def run(args) -> int:
    model = model_path(args)
    if args.plot:
        need_matplotlib()
    if not is_gguf(model):
        return _report(args, model, model)
    import tempfile

    notes: list[str] = []
    with converted_gguf(model, Path(tempfile.gettempdir()), notes) as conversion:
        lossy = lossy_note(conversion.lossy)
        for note in notes + ([f"{model}: {lossy}"] if lossy else []):
            print(f"npquant report: note: {note}", file=sys.stderr)
        return _report(args, conversion.out, model)


def _report(args, model, label) -> int:
    """The report of the safetensors checkpoint ``model``, titled ``label`` (the path the user gave)."""
    from .. import render
    from ..report import LAYER_KEYS, layer_report, totals
    from ..safetensors_io import Checkpoint

    with Checkpoint(model) as ckpt:
        total = ckpt.nbytes
    with Progress(total, "reading") as progress:
        rows, skipped = layer_report(model, args.scheme, args.include, args.exclude, progress)
    if args.json:
        print(json.dumps([{k: json_value(r[k]) for k in LAYER_KEYS} for r in rows], indent=2))
    elif args.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(LAYER_KEYS)
        for r in rows:
            writer.writerow(["x".join(map(str, r[k])) if k == "shape" else r[k] for k in LAYER_KEYS])
    else:
        render.print_layer_table(str(label), rows, totals(rows), skipped, args.worst)
    if args.plot:
        render.plot_sqnr(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
