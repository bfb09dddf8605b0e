"""``npquant plan``: one scheme per layer under a size budget, written to plan.json."""

from __future__ import annotations

import json
import math

from ..errors import NpquantError
from ._common import Progress, add_method_arguments, calibration_texts, encoder_name, model_path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``plan`` subcommand and its options."""
    from ..plan import DECODER_CANDIDATES, DEFAULT_CANDIDATES, DEFAULT_COST_TOKENS
    from ._gguf import GGUF_MODEL_HELP

    pl = sub.add_parser(
        "plan",
        help="choose a scheme per layer under a size budget (mixed precision)",
        description=(
            "Measure what each candidate scheme costs each linear layer, then choose one scheme per layer "
            "minimising the summed cost with the layers' total bytes (codes, scales, zero points) within the "
            "budget: an exact multiple-choice knapsack. Layers vLLM fuses into one module (q/k/v, gate/up; "
            "BERT's query/key/value) get one scheme, as vLLM requires. For BERT sentence encoders the cost is "
            "the model's output error on calibration text with only that layer quantized, mean(1 - cosine) of "
            "the embeddings; for Llama-family decoders (a directory or a .gguf file) it is the mean KL divergence "
            "of the next-token distributions on calibration text with only that unit rounded to nearest; for "
            "any other checkpoint it is a weight-only proxy (the layer's relative squared weight error), and the "
            "output says so. Writes plan.json, which 'npquant quantize --plan' turns into one checkpoint and "
            "'npquant eval --plan' evaluates."
        ),
    )
    pl.add_argument("model", nargs="?", metavar="MODEL", help=GGUF_MODEL_HELP)
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--bits", type=float, metavar="B", help="budget in bits per linear weight (scales included)")
    budget.add_argument("--size", type=int, metavar="BYTES", help="budget in bytes for the planned layers")
    pl.add_argument("--schemes", default=None, metavar="LIST",
                    help=f"comma-separated candidate presets (default {','.join(DEFAULT_CANDIDATES)}; for decoders "
                         f"{','.join(DECODER_CANDIDATES)})")
    pl.add_argument("-o", "--out", required=True, metavar="plan.json", help="where to write the plan")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    pl.add_argument("--tokens", type=int, metavar="N", default=None,
                    help=f"decoders: calibration tokens the costs are measured on (default {DEFAULT_COST_TOKENS}; "
                         f"the time grows in proportion)")
    add_method_arguments(pl, plan_mode=True)
    pl.set_defaults(run=run)


def run(args) -> int:
    import sys
    import tempfile
    from pathlib import Path

    from ..plan import check_plan_path
    from ._gguf import converted_gguf, is_gguf, lossy_note

    model = model_path(args)
    if args.schemes is not None:
        _labels(args, decoder=False)  # unknown presets and unwritable schemes, before anything is read
    check_plan_path(args.out)  # before measuring, not after
    if args.bits is not None and not (args.bits > 0 and math.isfinite(args.bits)):
        raise NpquantError(f"--bits must be a positive number, got {args.bits}")
    if args.size is not None and args.size < 1:
        raise NpquantError(f"--size must be a positive number of bytes, got {args.size}")
    if args.tokens is not None and args.tokens < 2:
        raise NpquantError(f"--tokens must be at least 2 (one token to condition on, one to predict), "
                           f"got {args.tokens}")
    if not is_gguf(model):
        return _plan(args, model, model)
    notes: list[str] = []
    with converted_gguf(model, Path(tempfile.gettempdir()), notes) as conversion:
        lossy = lossy_note(conversion.lossy)
        for note in notes + ([f"{model}: {lossy}"] if lossy else []):
            print(f"npquant plan: note: {note}", file=sys.stderr)
        return _plan(args, conversion.out, model)


def _labels(args, decoder: bool) -> dict:
    """``{label: Scheme}`` of ``--schemes`` (or the defaults for the model's kind), each one writable."""
    from ..checkpoints import check_loadable
    from ..plan import DECODER_CANDIDATES, DEFAULT_CANDIDATES
    from ..schemes import get_scheme

    if args.schemes is None:
        labels = list(DECODER_CANDIDATES if decoder else DEFAULT_CANDIDATES)
    else:
        labels = list(dict.fromkeys(x.strip() for x in args.schemes.split(",") if x.strip()))
    if not labels:
        raise NpquantError("--schemes must name at least one preset")
    candidates = {label: get_scheme(label) for label in labels}
    for sch in candidates.values():
        check_loadable(sch)  # every candidate must be writable
    return candidates


def _plan(args, model, shown) -> int:
    """The plan of the safetensors checkpoint ``model`` (``shown``: the path the user gave)."""
    from pathlib import Path

    from .. import render
    from ..checkpoints import select_layers
    from ..plan import PLAN_VERSION, budget_bytes, check_budget, fused_units, solve_budget, write_plan
    from ..safetensors_io import Checkpoint
    from ._plan_decoder import decoder_costs, is_decoder

    args.observer = args.observer or "minmax"
    with Checkpoint(model) as ckpt:
        layers = {c.name: c.shape for c in select_layers(ckpt) if c.quantize}
        config = ckpt.config or {}
    if not layers:
        raise NpquantError(f"{shown} has no linear layer to plan")
    decoder = is_decoder(config)
    runnable = config.get("model_type") == "bert" and Path(model).is_dir()
    # The best measured method by default where npquant runs the model and measures its costs: GPTQ on encoders.
    method = args.method or ("gptq" if runnable else "rtn")
    if args.method is None and runnable and not args.json:
        print("method: gptq (the default where npquant runs the model: its checkpoint keeps the most; "
              "--method rtn plans in a fraction of the time)")
    candidates = _labels(args, decoder)
    labels = list(candidates)
    units = fused_units(layers)
    # From the shapes alone, before any layer is measured: a budget no plan meets is refused here.
    budget = budget_bytes(layers, bits=args.bits, size=args.size)
    sizes = check_budget(layers, candidates, budget, units)
    if args.tokens is not None and not decoder:
        raise NpquantError("--tokens is for decoders (Llama-family models), whose costs are measured on tokens")
    if method != "rtn" and not (runnable or decoder):
        raise NpquantError(f"--method {method} runs the model, and npquant runs BERT sentence encoders and "
                           f"Llama-family decoders; {shown} has model_type {config.get('model_type')!r}: plan with "
                           f"--method rtn")
    # AWQ's scales depend on the schemes of a whole group, which the plan is choosing: its costs are measured
    # with the method AWQ runs after (GPTQ or RTN), and quantize --plan runs AWQ with the plan's schemes.
    measured = {"awq": "rtn", "awq+gptq": "gptq"}.get(method, method)
    calibration, seconds, layer_cost = None, None, None
    if decoder:
        unit_cost, unit_bytes, cost_kind, calibration, seconds = decoder_costs(args, model, config, units,
                                                                               candidates, method)
        measured = "rtn"  # GPTQ costs are not measured for decoders (decoder_costs says so)
        method = "rtn" if method == "gptq" else method
    else:
        if runnable:
            texts = calibration_texts(args)
            calibration = {"texts": len(texts), "file": args.calibration}
            layer_cost, nbytes, cost_kind = _encoder_costs(model, layers, candidates, sizes, texts, measured,
                                                           args.observer)
        else:
            if args.calibration:
                raise NpquantError("--calibration is for models npquant runs (BERT sentence encoders, "
                                   "Llama-family decoders)")
            layer_cost, nbytes, cost_kind = _proxy_costs(model, layers, candidates, sizes, args.observer)
        # A fused unit's cost: the sum of its layers' costs, each measured alone.
        unit_cost = {u: {label: sum(layer_cost[n][label] for n in m) for label in sizes[m[0]]} for u, m in units.items()}
        unit_bytes = {u: {label: sum(nbytes[n][label] for n in m) for label in sizes[m[0]]} for u, m in units.items()}
        if any(len(m) > 1 for m in units.values()):
            cost_kind += "; layers vLLM fuses (q/k/v, gate/up) share one scheme, their costs summed"
    names = list(units)
    weights = sum(layers[n][0] * layers[n][1] for n in layers)
    options = [[label for label in labels if label in unit_cost[u]] for u in names]
    chosen = solve_budget([[unit_cost[u][label] for label in opts] for u, opts in zip(names, options)],
                          [[unit_bytes[u][label] for label in opts] for u, opts in zip(names, options)], budget)
    picked = {u: opts[k] for u, opts, k in zip(names, options, chosen)}
    total_bytes = sum(unit_bytes[u][picked[u]] for u in names)
    layer_entries = {}
    for u, members in units.items():
        for n in members:
            entry = {"shape": list(layers[n]), "scheme": picked[u], "bytes": sizes[n][picked[u]], "unit": u}
            if layer_cost is not None:
                entry.update(cost=layer_cost[n][picked[u]], costs=layer_cost[n])
            layer_entries[n] = entry
    plan = {
        "version": PLAN_VERSION,
        "model": str(shown),
        "method": method,
        "cost_method": measured,
        "observer": args.observer,
        "cost": cost_kind,
        "calibration": calibration,
        "budget": {"bits_per_weight": args.bits, "bytes": budget},
        "candidates": labels,
        "total_bytes": total_bytes,
        "bits_per_weight": 8.0 * total_bytes / weights,
        "predicted_cost": sum(unit_cost[u][picked[u]] for u in names),
        "uniform": {label: {"bytes": sum(unit_bytes[u][label] for u in names),
                            "predicted_cost": sum(unit_cost[u][label] for u in names)}
                    for label in labels if all(label in unit_cost[u] for u in names)},
        "units": {u: {"layers": list(units[u]), "shape": [sum(layers[n][0] for n in units[u]), layers[units[u][0]][1]],
                      "scheme": picked[u], "bytes": unit_bytes[u][picked[u]], "cost": unit_cost[u][picked[u]],
                      "costs": unit_cost[u]} for u in names},
        "layers": layer_entries,
    }
    if seconds is not None:
        plan["seconds"] = round(seconds, 1)
    write_plan(args.out, plan)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        render.print_plan({**plan, "layers": plan["units"]}, args.out)
        if seconds is not None:
            steps = sum(len(c) for c in unit_cost.values())
            print(f"measured {steps} unit and scheme pairs on {calibration['tokens']:,} calibration tokens in "
                  f"{seconds:.0f} s")
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
