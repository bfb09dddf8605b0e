"""GPTQ and AWQ over a checkpoint for ``quantize --method gptq|awq|awq+gptq``, and the checks a plan gets first.

A BERT sentence encoder runs through :class:`~npquant.models.SentenceEncoder`
(its sentences are the calibration texts); a Llama-family decoder through
:func:`~npquant.models.calibrated_lm.gptq_decoder`, the calibration texts
joined by newlines, tokenized by the model's own ``tokenizer.json`` and cut
into windows of ``--seq-len`` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress, calibration_texts, encoder_name, model_tokenizer

__all__ = ["calibrate_checkpoint", "check_plan_fits", "check_gptq_schemes", "decoder_windows", "smooth_checkpoint"]


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


def check_gptq_schemes(scheme, args, model=None) -> None:
    """Refuse a calibrated --method with float codes only (fp8, fp4: rounded to nearest), before any work; a sentence
    encoder (``model`` not a decoder) with the model objective rounds their float targets, and takes them."""
    from .eval import is_decoder

    if (getattr(args, "objective", None) or "model") == "model" and not is_decoder(model):
        return
    if isinstance(scheme, dict):
        if all(s.is_float for s in scheme.values()):
            raise NpquantError(f"--method {args.method} needs int schemes; this plan has fp8 layers only: use "
                               f"--method rtn")
    elif scheme.is_float:
        raise NpquantError(f"--method {args.method} takes int schemes; {args.scheme} has {scheme.dtype} codes, "
                           f"which are rounded to nearest: use --method rtn")


def smooth_checkpoint(model, args) -> dict:
    """SmoothQuant's float tensors for a decoder directory (:func:`~npquant.models.smooth_lm.smooth_decoder`), on
    the calibration text in windows of ``--seq-len``; a BERT encoder is refused (nothing folds there)."""
    from ..models.smooth_lm import smooth_decoder
    from ..safetensors_io import Checkpoint

    root = Path(model)
    with Checkpoint(root) as ckpt:
        config = ckpt.config if isinstance(ckpt.config, dict) else {}
        if not (root.is_dir() and _is_decoder(config)):
            raise NpquantError(f"--smooth runs on decoders (Llama, Mistral, Qwen2, Qwen3); {model} is not one (a "
                               f"post-LayerNorm BERT's norms also feed the residual: SmoothQuant has nowhere to fold)")
        windows = decoder_windows(root, config, args, calibration_texts(args))
        with Progress(1, f"on {sum(w.size for w in windows):,} tokens", unit="steps", prefix="SmoothQuant ") as bar:
            out = smooth_decoder(config, _unmapped(ckpt), windows, alpha=args.smooth)
            bar("done", 1)
    return out


def calibrate_checkpoint(model, scheme, args, smoothed=None):
    """``(quantized, rows, replaced)`` of ``args.method`` (gptq, awq, awq+gptq) on a BERT encoder or a decoder.

    ``quantized``: QuantizedTensors keyed by the checkpoint's tensor names;
    ``rows``: the method's per-layer rows (same names); ``replaced``: float32
    arrays by checkpoint name that AWQ's folds changed (norm weights, the
    producers' biases; empty for GPTQ), written in place of the checkpoint's.
    ``scheme``: one Scheme, or ``{checkpoint tensor name: Scheme}`` (a plan's). ``smoothed``: a decoder's
    float tensors by checkpoint name that stand in for the checkpoint's (:func:`smooth_checkpoint`), or None.
    """
    from ..models import SentenceEncoder
    from ..safetensors_io import Checkpoint
    from ..tensor import QuantizedTensor

    check_gptq_schemes(scheme, args, model)
    root = Path(model)
    config = {}
    if (root / "config.json").is_file():
        try:
            config = json.loads((root / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise NpquantError(f"{root / 'config.json'} is not valid JSON: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if root.is_dir() and _is_decoder(config):
        return _calibrate_decoder(root, config, scheme, args, smoothed or {})
    if getattr(args, "seq_len", None) is not None:
        raise NpquantError("--seq-len is for decoders (Llama, Mistral, Qwen2, Qwen3): a sentence encoder is "
                           "calibrated on whole sentences")
    if not root.is_dir() or model_type != "bert":
        raise NpquantError(
            f"--method {args.method} runs the model on calibration text, and npquant runs BERT sentence encoders "
            f"(config.json model_type 'bert', e.g. all-MiniLM-L6-v2) and Llama-family decoders "
            f"({', '.join(_architectures())}); {model} has model_type {model_type!r}. "
            f"--method rtn quantizes any checkpoint"
        )
    texts = calibration_texts(args)
    encoder = SentenceEncoder.from_pretrained(root)
    if isinstance(scheme, dict):
        scheme = {encoder_name(n): s for n, s in scheme.items() if encoder_name(n) in encoder.linear_names()}
    quantized = _run_calibrated(encoder, scheme, texts, args.observer, getattr(args, "objective", None) or "model",
                                args.method)
    from ..models.calibrated import changed_tensors

    with Checkpoint(root) as ckpt:
        names = set(ckpt.tensors)
    key = lambda n: n if n in names else f"bert.{n}"
    out = {key(n): t for n, t in quantized.tensors.items()
           if n in encoder.linear_names() and isinstance(t, QuantizedTensor)}
    replaced = {key(n): t for n, t in changed_tensors(encoder.tensors, quantized.tensors)[1].items()}
    rows = [{**r, "name": key(r["name"])} for r in quantized.layer_report]
    return out, rows, replaced


def _run_calibrated(encoder, scheme, texts, observer, objective="model", method="gptq"):
    """``encoder.quantized(scheme, method, ...)`` with a progress bar per layer on a terminal."""
    total = len(scheme) if isinstance(scheme, dict) else len(encoder.linear_names())
    with Progress(total, f"on {len(texts)} texts", unit="steps", prefix=f"{method.upper()} ") as bar:
        return encoder.quantized(scheme, method, texts, observer=observer, objective=objective,
                                 progress=lambda name, done, total: bar(name.removesuffix(".weight"), 1))



def _architectures() -> tuple[str, ...]:
    from ..models.causal_lm_config import ARCHITECTURES

    return tuple(ARCHITECTURES)


def _is_decoder(config) -> bool:
    """Whether config.json names a decoder the forward runs (its architectures, or else its model_type)."""
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures")
    if isinstance(archs, list) and archs:
        return archs[0] in _architectures()
    return config.get("model_type") in ("llama", "mistral", "qwen2", "qwen3")


def decoder_windows(root: Path, config: dict, args, texts: list[str]):
    """The calibration texts as windows of ``--seq-len`` tokens of the model's own tokenizer (int ``(B, T)`` list)."""
    from ..models.calibrated_lm import DEFAULT_SEQ_LEN, calibration_windows

    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit < seq_len:
        if args.seq_len is not None:
            raise NpquantError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings={limit}")
        seq_len = limit
    tokenizer = model_tokenizer(root, "calibrating", "GPTQ tokenizes the calibration text")
    ids = tokenizer.encode("\n".join(texts), add_special_tokens=False).ids
    return calibration_windows(ids, seq_len)


def _calibrate_decoder(root: Path, config: dict, scheme, args, smoothed: dict):
    """Sequential GPTQ of a decoder directory: its quantized tensors by checkpoint name, and GPTQ's rows."""
    from ..checkpoints import select_layers
    from ..checkpoints.writer import _stored_scheme
    from ..models.awq_calibrated_lm import awq_decoder
    from ..models.calibrated_lm import gptq_decoder
    from ..models.causal_lm_config import CausalLMConfig
    from ..safetensors_io import Checkpoint

    texts = calibration_texts(args)
    windows = decoder_windows(root, config, args, texts)
    tokens = sum(w.size for w in windows)
    with Checkpoint(root) as ckpt:
        if isinstance(scheme, dict):
            schemes = dict(scheme)
        else:
            picked = [c.name for c in select_layers(ckpt, scheme, args.include, args.exclude) if c.quantize]
            schemes = {name: scheme for name in picked}
        # Tensors outside the decoder layers that --include picked (lm_head, say) are rounded to nearest.
        linears = set(CausalLMConfig.from_json(ckpt.config).linear_names())
        schemes = {n: s for n, s in schemes.items() if n in linears}
        # fp8/fp4 layers of a plan are left to the writer, which rounds them to nearest as it stores them; int
        # layers get the scheme the writer stores (full-grid scales in a 16-bit layer's dtype, as RTN's).
        schemes = {n: _stored_scheme(s, ckpt.tensors[n]) for n, s in schemes.items() if not s.is_float}
        if not schemes:
            raise NpquantError(f"--method {args.method} has no int decoder-layer linear weight to calibrate: the "
                               f"scheme or --include/--exclude left none; use --method rtn")
        total = len(schemes)
        with Progress(total, f"on {tokens:,} tokens in windows of up to {windows[0].shape[1]}", unit="steps",
                      prefix=f"{args.method.upper()} ") as bar:
            step = lambda name, done, n: bar(name.removesuffix(".weight"), 1)
            objective = getattr(args, "objective", None)
            source = _unmapped(ckpt, smoothed)
            if args.method == "gptq":
                quantized, rows, _ = gptq_decoder(ckpt.config, source, schemes, windows,
                                                  observer=args.observer, objective=objective, progress=step)
                replaced = {}
            else:
                quantized, replaced, rows, _ = awq_decoder(ckpt.config, source, schemes, windows,
                                                           method=args.method, observer=args.observer,
                                                           objective=objective, progress=step)
    return quantized, rows, replaced


def _unmapped(ckpt, replaced=None):
    """A tensor source that reads each tensor of ``ckpt`` with one file read, not through its memory map.

    GPTQ reads every weight of the model several times while a Hessian of up
    to ``8 F**2`` bytes is held: pages of a memory-mapped file stay in the
    process's resident set (RssFile) until the kernel reclaims them, which
    would add up to the whole model to its peak. A plain read leaves them in
    the page cache only.
    """
    import math

    import numpy as np

    def read(name: str):
        if replaced and name in replaced:  # SmoothQuant's tensors, in place of the checkpoint's
            return replaced[name]
        t = ckpt.tensors[name]  # a KeyError for a missing tensor: CausalLM names it
        if t.code.startswith("F8"):
            return t.read()
        count = math.prod(t.shape)
        return np.fromfile(t.file, dtype=t.dtype, count=count, offset=t.offset).reshape(t.shape)

    return read
