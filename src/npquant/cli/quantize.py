"""``npquant quantize``: a compressed-tensors checkpoint that vLLM loads, from any safetensors checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress, add_method_arguments, json_value, model_path
from ._gguf import GGUF_MODEL_HELP, converted_gguf, is_gguf, lossy_note, own_notes_removed

__all__ = ["add_parser", "run", "presets_help", "fallback_presets", "kept_in_float_note"]


def presets_help(width: int = 78) -> str:
    """Every preset by code family, and those refused because vLLM cannot load them (for ``--help``)."""
    from ..checkpoints import check_loadable
    from ..schemes import schemes

    families = {"int": [], "fp8": [], "NVFP4, MX": [], "refused": []}
    for name, s in schemes().items():
        try:
            check_loadable(s)
        except NpquantError:
            families["refused"].append(name)
            continue
        family = "NVFP4, MX" if s.scale_dtype in ("fp8_e4m3", "e8m0") else "int" if s.dtype == "int" else "fp8"
        families[family].append(name)
    lines = ["presets for --scheme ('npquant schemes' gives each one's rule and bits per weight):"]
    for family, names in families.items():
        text = ", ".join(names) + (" (per-tensor int: vLLM cannot load it)" if family == "refused" else "")
        # names are never broken, at their hyphens or anywhere else
        lines += textwrap.wrap(text, width, initial_indent=f"  {family:<11}", subsequent_indent=" " * 13,
                               break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)


def add_parser(sub) -> None:
    """The ``quantize`` subcommand and its options."""
    qz = sub.add_parser(
        "quantize",
        help="write a checkpoint quantized in the compressed-tensors format vLLM loads",
        description=(
            "Quantize the linear layers of a safetensors checkpoint and write a model directory in the "
            "compressed-tensors format (pack-quantized for int schemes, float-quantized for fp8, "
            "nvfp4-pack-quantized, mxfp4/6-pack-quantized and mxfp8-quantized for NVFP4 and MX) that vLLM "
            "loads: other tensors, shards, the index, config.json (with its quantization_config) and the "
            "tokenizer files come along. Memory stays at a few tensors whatever the checkpoint's size. "
            "OUT is written under a temporary name and renamed when complete. A llama.cpp .gguf file is "
            "converted first (float32, in a temporary directory beside OUT, removed afterwards; the GGML "
            "types llama.cpp had quantized already are named)."
        ),
        epilog=presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    qz.add_argument("model", nargs="?", metavar="MODEL", help=GGUF_MODEL_HELP)
    qz.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (must not exist unless --force)")
    qz.add_argument("--scheme", default="w4-g128", metavar="PRESET",
                    help="preset (default w4-g128; every preset is listed below)")
    qz.add_argument("--include", action="append", metavar="REGEX", help="also quantize tensors whose name matches")
    qz.add_argument("--exclude", action="append", metavar="REGEX", help="leave tensors whose name matches")
    qz.add_argument("--force", action="store_true",
                    help="replace an existing OUT once the new one is complete; replaces only a directory npquant "
                         "wrote (it holds .npquant-output.json), never the input, a file or another folder")
    qz.add_argument("--workers", type=int, default=2, help="tensors quantized at once (default 2)")
    qz.add_argument("--json", action="store_true", help="print the per-layer results as JSON")
    qz.add_argument("--plan", metavar="plan.json",
                    help="one scheme per layer from 'npquant plan': a mixed-precision checkpoint (replaces --scheme; "
                         "the plan's method unless --method is given)")
    add_method_arguments(qz)
    qz.add_argument("--seq-len", type=int, metavar="N",
                    help="decoders with a calibrated --method: tokens per calibration window (default 512, or the model's "
                         "max_position_embeddings where that is less); the calibration texts are joined by "
                         "newlines and cut into windows of N tokens")
    qz.add_argument("--smooth", type=float, metavar="ALPHA",
                    help="decoders, W8A8 schemes: smooth the model first (SmoothQuant: each input channel of "
                         "q/k/v and gate/up divided by max|x|^ALPHA / max|W|^(1-ALPHA), measured on the "
                         "calibration text, folded into the RMSNorm before it; the checkpoint holds the smoothed "
                         "norms); with --method rtn or gptq; 0.5 is SmoothQuant's default")
    qz.set_defaults(run=run)


def fallback_presets(scheme, in_features) -> list[str]:
    """Presets vLLM loads that fit every width in ``in_features`` where ``scheme``'s group size does not.

    The same codes (and grid) with the largest group size that divides every
    width (the fewest scales), then the same codes with one scale per row. Where
    the codes come in no such preset (int2, int3, asymmetric int4, fp6): the
    narrowest channel preset of the same kind (int or float) with at least
    as many bits.

    >>> from npquant.schemes import get_scheme
    >>> fallback_presets(get_scheme("w4-g128"), [96, 384])
    ['w4-g32', 'w4-channel']
    >>> fallback_presets(get_scheme("nvfp4"), [24])
    ['fp8-channel']
    """
    from ..checkpoints import check_loadable
    from ..schemes import schemes

    def loadable(s) -> bool:
        try:
            check_loadable(s)
        except NpquantError:
            return False
        return True

    presets = {n: s for n, s in schemes().items() if s != scheme and loadable(s) and s.activations == scheme.activations}

    def fits(s) -> bool:
        return s.granularity != "group" or all(i % s.group_size == 0 for i in in_features)

    codes = (scheme.dtype, scheme.bits, scheme.symmetric, scheme.grid)
    same = [n for n, s in presets.items()
            if (s.dtype, s.bits, s.symmetric, s.grid) == codes and s.granularity in ("group", "channel") and fits(s)]
    groups = sorted((n for n in same if presets[n].granularity == "group"), key=lambda n: -presets[n].group_size)
    same = groups[:1] + [n for n in same if presets[n].granularity == "channel"]
    if same:
        return same
    wider = [n for n, s in presets.items()
             if s.granularity == "channel" and s.is_float == scheme.is_float and s.bits >= scheme.bits]
    return sorted(wider, key=lambda n: presets[n].bits)[:1]


def kept_in_float_note(scheme, label: str, skipped) -> str | None:
    """Which layers ``scheme``'s group size left in float, why, and the presets that would fit them.

    ``skipped``: the :class:`~npquant.checkpoints.LayerChoice` list of a
    quantize summary. None when the group size divided every layer.
    """
    if scheme.granularity != "group":
        return None
    kept = [c for c in skipped if "does not divide" in c.reason and len(c.shape) == 2]
    if not kept:
        return None
    widths = sorted({c.shape[1] for c in kept})
    names = ", ".join(f"{c.module} ({c.shape[0]}x{c.shape[1]})" for c in kept)
    fits = fallback_presets(scheme, widths)
    them = "them" if len(kept) > 1 else "it"
    instead = (f"; --scheme {' or '.join(fits)} fits {them} (and every other layer), or 'npquant plan --schemes "
               f"{label},{fits[0]}' picks one scheme per layer") if fits else ""
    return (f"{len(kept)} linear layer{'s' if len(kept) > 1 else ''} kept in float, unquantized: "
            f"group_size={scheme.group_size} does not divide in_features={', '.join(map(str, widths))}: "
            f"{names}{instead}")


def run(args) -> int:
    from ..checkpoints import check_loadable, check_output
    from ..schemes import get_scheme

    model = model_path(args)
    if args.workers < 1:
        raise NpquantError(f"--workers must be at least 1, got {args.workers}")
    plan = None
    if args.plan:
        from ..plan import plan_schemes, read_plan

        plan = read_plan(args.plan)
        args.method = args.method or plan.get("method", "rtn")
        args.observer = args.observer or plan.get("observer", "minmax")
        scheme = plan_schemes(plan)
        args.scheme = f"plan {args.plan}"
        for sch in set(scheme.values()):
            check_loadable(sch)
    else:
        scheme = get_scheme(args.scheme)
        check_loadable(scheme)  # refuse before any calibration work
    args.method = args.method or "rtn"
    args.observer = args.observer or "minmax"
    calibrated_method = args.method != "rtn"
    smooth = getattr(args, "smooth", None)
    if smooth is not None:
        _check_smooth(smooth, args, scheme)
    if not calibrated_method and smooth is None and (args.calibration or args.max_samples):
        raise NpquantError("--calibration and --max-samples are for --method gptq, awq or awq+gptq, or --smooth")
    if not calibrated_method and smooth is None and args.seq_len is not None:
        raise NpquantError("--seq-len is for --method gptq, awq or awq+gptq on decoders, or --smooth")
    if args.seq_len is not None and args.seq_len < 1:
        raise NpquantError(f"--seq-len must be at least 1 token per calibration window, got {args.seq_len}")
    if args.method not in ("gptq", "awq+gptq") and getattr(args, "objective", None) is not None:
        raise NpquantError("--objective is for --method gptq or awq+gptq")
    if calibrated_method:
        from ._gptq import check_gptq_schemes

        check_gptq_schemes(scheme, args, model)
    # OUT is checked before any work (a GGUF conversion, GPTQ's calibration): a bad OUT fails at once;
    # quantize_checkpoint checks it again when it writes.
    check_output(model, args.out, force=args.force)
    if not is_gguf(model):
        return _quantize(args, model, scheme, plan)
    if calibrated_method or smooth is not None:
        from ._common import calibration_texts

        calibration_texts(args)  # a bad --calibration file is refused before the conversion
    notes: list[str] = []
    with converted_gguf(model, Path(os.path.abspath(args.out)).parent, notes) as conversion:
        lossy = lossy_note(conversion.lossy)
        notes += [f"{model}: {lossy}"] if lossy else []
        notes.append(f"tensors left in float (the embedding, the norms) are written in float32, as converted; for "
                     f"bfloat16 ones convert first, 'npquant convert {model} -o DIR --dtype bfloat16', and "
                     f"quantize DIR")
        for note in notes:
            print(f"npquant quantize: note: {note}", file=sys.stderr)
        return _quantize(args, conversion.out, scheme, plan, conversion)


def _check_smooth(smooth: float, args, scheme) -> None:
    """Refuse --smooth where it cannot run, before any work."""
    if not 0 <= smooth <= 1:
        raise NpquantError(f"--smooth must be in [0, 1] (SmoothQuant's migration strength; 0.5 its default), got "
                           f"{smooth}")
    if args.method not in ("rtn", "gptq"):
        raise NpquantError(f"--smooth takes --method rtn or gptq: {args.method}'s scales fold into the same norms")
    schemes = scheme.values() if isinstance(scheme, dict) else [scheme]
    if not any(s.activations for s in schemes):
        raise NpquantError("--smooth is for W8A8 schemes (w8a8-int8, w8a8-fp8), whose activations are quantized")


def _quantize(args, model, scheme, plan, conversion=None) -> int:
    """Quantize the safetensors checkpoint ``model`` (``conversion``: the GGUF conversion it came from, or None)."""
    from .. import render
    from ..checkpoints import quantize_checkpoint, refuse_quantized
    from ..safetensors_io import Checkpoint
    from ._gptq import calibrate_checkpoint, check_plan_fits

    if plan is not None:
        check_plan_fits(plan, model, args.plan)
    with Checkpoint(model) as ckpt:  # an already-quantized model is refused before GPTQ's calibration
        refuse_quantized(ckpt)
        total = ckpt.nbytes
    calibrated, gptq_rows, replaced = {}, None, {}
    if getattr(args, "smooth", None) is not None:
        from ._gptq import smooth_checkpoint

        replaced = smooth_checkpoint(model, args)
    if args.method != "rtn":
        calibrated, gptq_rows, folded = calibrate_checkpoint(model, scheme, args, replaced)
        replaced = {**replaced, **folded}
    with Progress(total, "writing" if calibrated else "quantizing") as progress:
        summary = quantize_checkpoint(model, args.out, scheme, include=args.include, exclude=args.exclude,
                                      force=args.force, workers=args.workers, progress=progress,
                                      quantized=calibrated, observer=args.observer, replaced=replaced)
    folded = {r["name"]: r["weight_error"] for r in gptq_rows or [] if "weight_error" in r}
    # AWQ: the error of a folded weight's codes is against that folded weight, not the checkpoint's
    summary["layers"] = [dataclasses.replace(r, rel_error=folded[r.name][0], sqnr_db=folded[r.name][1])
                         if r.name in folded else r for r in summary["layers"]]
    notes = own_notes_removed(summary["warnings"], conversion)
    if plan is None:
        note = kept_in_float_note(scheme, args.scheme, summary["skipped"])
        notes += [note] if note else []
    for note in notes:
        print(f"npquant quantize: warning: {note}", file=sys.stderr)
    layers = summary["layers"]
    gptq_by_name = {r["name"]: r for r in gptq_rows or []}
    if args.json:
        rows = []
        for r in layers:
            label = plan["layers"][r.name]["scheme"] if args.plan else args.scheme
            row = {"name": r.name, "shape": list(r.shape), "scheme": label, "bytes_before": r.bytes_before,
                   "bytes_after": r.bytes_after, "rel_error": r.rel_error, "sqnr_db": json_value(r.sqnr_db),
                   "method": args.method if r.name in gptq_by_name else "rtn", "observer": args.observer}
            if r.name in gptq_by_name:
                g = gptq_by_name[r.name]
                row.update(rtn_loss=g["rtn_loss"], loss=g.get("loss", g.get("gptq_loss")), loss_ratio=g["ratio"], seconds=g["seconds"])
                if "gptq_loss" in g:
                    row["gptq_loss"] = g["gptq_loss"]
                if "alpha" in g:
                    row["awq_alpha"] = g["alpha"]
            rows.append(row)
        print(json.dumps(rows, indent=2))
        return 0
    rtn_only = [r.name for r in layers if calibrated and r.name not in calibrated]
    render.print_quantized(summary, args.scheme, args.observer, gptq_rows, rtn_only)
    return 0
