"""``npquant plan``: one scheme per layer under a size budget, written to plan.json."""

from __future__ import annotations

import json
import math

from ..errors import NpquantError
from ._common import MODEL_HELP, Progress, add_method_arguments, calibration_texts, encoder_name, model_path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``plan`` subcommand and its options."""
    from ..plan import DEFAULT_CANDIDATES

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
    pl.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_HELP)
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, metavar="B", help="budget in bits per linear weight (scales included)")
    budget.add_argument("--size", type=int, metavar="BYTES", help="budget in bytes for the planned layers")
    pl.add_argument("--schemes", default=",".join(DEFAULT_CANDIDATES), metavar="LIST",
                    help=f"comma-separated candidate presets (default {','.join(DEFAULT_CANDIDATES)})")
    pl.add_argument("-o", "--out", required=True, metavar="plan.json", help="where to write the plan")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    add_method_arguments(pl, plan_mode=True)
    pl.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from .. import render
    from ..checkpoints import check_loadable, select_layers
    from ..plan import PLAN_VERSION, budget_bytes, check_budget, check_plan_path, solve_budget, write_plan
    from ..safetensors_io import Checkpoint
    from ..schemes import get_scheme

    model = model_path(args)
    labels = [x.strip() for x in args.schemes.split(",") if x.strip()]
    if not labels:
        raise NpquantError("--schemes must name at least one preset")
    candidates = {label: get_scheme(label) for label in labels}
    for sch in candidates.values():
        check_loadable(sch)  # every candidate must be writable
    check_plan_path(args.out)  # before measuring, not after
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
    # From the shapes alone, before any layer is measured: a budget no plan meets is refused here.
    budget = budget_bytes(layers, bits=args.bits, size=args.size)
    sizes = check_budget(layers, candidates, budget)
    runnable = config.get("model_type") == "bert" and Path(model).is_dir()
    if method == "gptq" and not runnable:
        raise NpquantError(f"--method gptq runs the model, and npquant runs BERT sentence encoders only; {model} "
                           f"has model_type {config.get('model_type')!r}: plan with --method rtn")
    texts = None
    if runnable:
        texts = calibration_texts(args)
        costs, nbytes, cost_kind = _encoder_costs(model, layers, candidates, sizes, texts, method, args.observer)
    else:
        if args.calibration:
            raise NpquantError("--calibration is for models npquant runs (BERT sentence encoders)")
        costs, nbytes, cost_kind = _proxy_costs(model, layers, candidates, sizes, args.observer)
    names = list(layers)
    weights = sum(layers[n][0] * layers[n][1] for n in names)
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


def _encoder_costs(model, layers, candidates, sizes, texts, method, observer):
    """Output costs of a BERT encoder's layers (others, like the pooler, cost 0: not on the output path).

    ``sizes``: each layer's bytes per fitting candidate, from :func:`npquant.plan.check_budget`.
    """
    from ..models import SentenceEncoder
    from ..models.sensitivity import layer_costs

    encoder = SentenceEncoder.from_pretrained(model)
    on_path = {n: encoder_name(n) for n in layers if encoder_name(n) in encoder.linear_names()}
    with Progress(len(encoder.linear_names()), "layers", unit="steps", prefix="measuring ") as bar:
        costs, nbytes = layer_costs(encoder, candidates, texts, method=method, observer=observer,
                                    progress=lambda name, done, total: bar(name.removesuffix(".weight"), 1))
    out_costs, out_bytes = {}, {}
    for name in layers:
        if name in on_path:
            out_costs[name], out_bytes[name] = costs[on_path[name]], nbytes[on_path[name]]
        else:
            out_bytes[name] = dict(sizes[name])
            out_costs[name] = {label: 0.0 for label in out_bytes[name]}
    kind = (f"output: mean(1 - cosine) of the embeddings of {len(texts)} calibration texts with only that layer "
            f"quantized ({method}); layers off the embedding path (e.g. the pooler) cost 0")
    return out_costs, out_bytes, kind


def _proxy_costs(model, layers, candidates, sizes, observer):
    """Weight-only proxy costs: each layer's relative squared weight error under each candidate that fits it."""
    from ..quantize import quantize_measured
    from ..safetensors_io import Checkpoint

    costs, nbytes = {}, {}
    with Checkpoint(model) as ckpt, Progress(sum(ckpt.tensors[n].nbytes for n in layers), "measuring") as progress:
        for name in layers:
            src = ckpt.tensors[name]
            costs[name], nbytes[name] = {}, {}
            for label in sizes[name]:
                qt, rel, _ = quantize_measured(src, candidates[label], name=f"tensor {name!r}:", observer=observer)
                costs[name][label] = rel * rel if math.isfinite(rel) else 0.0
                nbytes[name][label] = qt.nbytes
            progress(name, src.nbytes)
    kind = ("weight-only proxy: the layer's relative squared weight error ||W - W_hat||^2 / ||W||^2 "
            "(npquant cannot run this model, so its output error is not measured)")
    return costs, nbytes, kind
