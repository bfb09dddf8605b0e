"""GPTQ over a checkpoint for ``quantize --method gptq``, and the checks a plan gets before it is used."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress, calibration_texts, encoder_name

__all__ = ["calibrate_checkpoint", "check_plan_fits"]


def check_plan_fits(plan, model, plan_path) -> None:
    """Refuse a plan whose layers the model lacks or whose shapes differ (a plan for another model)."""
    from ..safetensors_io import Checkpoint

    with Checkpoint(model) as ckpt:
        for name, entry in plan["layers"].items():
            t = ckpt.tensors.get(name)
            if t is None:
                raise NpquantError(f"--plan {plan_path} names layer {name!r}, which {ckpt.path} lacks: "
                                   f"is the plan for another model ({plan.get('model')})?")
            if list(t.shape) != entry["shape"]:
                raise NpquantError(f"--plan {plan_path}: layer {name!r} is {entry['shape']} in the plan but "
                                   f"{list(t.shape)} in {ckpt.path}: the plan is for another model")


def calibrate_checkpoint(model, scheme, args):
    """GPTQ tensors of a BERT encoder checkpoint, keyed by the checkpoint's tensor names, and GPTQ's rows.

    ``scheme``: one Scheme, or ``{checkpoint tensor name: Scheme}`` (a plan's).
    """
    from ..models import SentenceEncoder
    from ..safetensors_io import Checkpoint
    from ..tensor import QuantizedTensor

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
    texts = calibration_texts(args)
    encoder = SentenceEncoder.from_pretrained(root)
    if isinstance(scheme, dict):
        scheme = {encoder_name(n): s for n, s in scheme.items() if encoder_name(n) in encoder.linear_names()}
    encoder = _run_gptq(encoder, scheme, texts, args.observer)
    with Checkpoint(root) as ckpt:
        names = set(ckpt.tensors)
    out = {}
    for key in encoder.linear_names():
        if isinstance(encoder.tensors[key], QuantizedTensor):
            out[key if key in names else f"bert.{key}"] = encoder.tensors[key]
    rows = [{**r, "name": r["name"] if r["name"] in names else f"bert.{r['name']}"} for r in encoder.layer_report]
    return out, rows


def _run_gptq(encoder, scheme, texts, observer):
    """``encoder.quantized(scheme, "gptq", ...)`` with a progress bar per layer on a terminal."""
    total = len(scheme) if isinstance(scheme, dict) else len(encoder.linear_names())
    with Progress(total, f"on {len(texts)} texts", unit="steps", prefix="GPTQ ") as bar:
        return encoder.quantized(scheme, "gptq", texts, observer=observer,
                                 progress=lambda name, done, total: bar(name.removesuffix(".weight"), 1))
