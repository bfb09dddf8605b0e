"""A decoder size plan against the uniform presets it must beat: SmolLM2-135M-Instruct at 4.5 bits per weight.

1. Costs: :func:`npquant.models.sensitivity_lm.unit_costs` on the built-in
   calibration text (the first ``--tokens`` SmolLM2 tokens of its first 128
   texts, what ``npquant plan`` measures), every unit (q/k/v, o, gate/up,
   down per layer) under every candidate, with the wall time.
2. The plan: the exact knapsack over those costs at ``--bits`` (what
   ``npquant plan MODEL --bits 4.5`` writes; the same solver and costs).
3. Evaluation on the decoder evaluation text (``npquant/data/eval_text.txt``,
   never seen by the costs): its first ``--eval-tokens`` tokens in windows of
   512, the plan and every uniform preset of at most ``--bits`` bits per
   weight that fits every layer, each rounded to nearest: bits per weight,
   mean KL(float32 || quantized), top-1 agreement, perplexity ratio; each
   KL as a ratio to the plan's, measured in this run.
4. Additivity: on the calibration tokens, the summed unit costs each plan
   was predicted to cost beside the KL of the whole model so quantized.
5. ``--rank-check`` (``--rank-only``: this alone, after the costs): the
   costs of a subset of units (layers 0, 10, 20, 29) at 4x the tokens, and
   the Spearman rank correlation with the costs at ``--tokens``: whether the
   token count ranks units as more tokens do.

The caveat for every figure: SmolLM2's linears were stored by llama.cpp as
Q4_1 (4-bit asymmetric, blocks of 32); every scheme is measured against
those dequantized weights.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_plan_decoder.py   # about 30 minutes on 2 shared cores
    python benchmarks/bench_plan_decoder.py --costs costs.json # reuse (or save) the measured costs
    python benchmarks/bench_plan_decoder.py --quick            # 2 layers, 32 tokens: a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

UNIFORM = ("w4-channel", "mxfp4", "w4-g128", "w4-g128-asym", "w4-g64", "nvfp4")


def main() -> None:
    from npquant.calibrate import calibration_texts
    from npquant.checkpoints.gguf import default_decoder_path, read_gguf
    from npquant.fidelity_lm import eval_text, token_windows
    from npquant.models.sensitivity_lm import (DECODER_CANDIDATES, DEFAULT_COST_TOKENS, calibration_batches,
                                               plan_units, unit_costs)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, default=4.5)
    ap.add_argument("--tokens", type=int, default=DEFAULT_COST_TOKENS,
                    help=f"calibration tokens of the costs (default {DEFAULT_COST_TOKENS}, as npquant plan)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    ap.add_argument("--costs", metavar="FILE", help="read the costs from FILE if it exists, else write them there")
    ap.add_argument("--rank-check", action="store_true", help="also the Spearman check at 4x the tokens")
    ap.add_argument("--rank-only", action="store_true", help="the costs, the plan and the rank check only")
    ap.add_argument("--quick", action="store_true", help="the first 2 layers only, 32 tokens: a smoke test")
    args = ap.parse_args()

    model = read_gguf(default_decoder_path())
    config = dict(model.config)
    if args.quick:
        config["num_hidden_layers"] = 2
        args.tokens, args.eval_tokens = 32, 64
    weights = {n: model[n] for n in model if not n.startswith("model.layers.")
               or int(n.split(".")[2]) < config["num_hidden_layers"]}  # float32, held: read once
    tokenizer = model.tokenizer()
    model.close()
    candidates = {label: label for label in DECODER_CANDIDATES}
    units = plan_units(config)
    calib = calibration_batches(tokenizer, calibration_texts(max_samples=128), args.tokens)
    n_calib = sum(b.shape[0] * (b.shape[1] - 1) for b in calib)
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32): {config['num_hidden_layers']} layers, "
          f"{len(units)} units; costs on {sum(b.size for b in calib)} calibration tokens ({n_calib} positions)")

    cached = Path(args.costs) if args.costs else None
    if cached is not None and cached.is_file():
        saved = json.loads(cached.read_text())
        costs, nbytes, seconds = saved["costs"], saved["nbytes"], saved["seconds"]
        print(f"costs read from {cached} (measured in {seconds:.0f} s)")
        cpu = saved.get("cpu", float("nan"))
    else:
        start, cpu = time.perf_counter(), time.process_time()

        def progress(unit, label, done, total):
            if done % 25 == 0 or done == total:
                print(f"  {done}/{total} {unit} {label} {time.perf_counter() - start:.0f} s", file=sys.stderr,
                      flush=True)

        costs, nbytes = unit_costs(config, weights, calib, candidates, units=units, progress=progress)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if cached is not None:
            cached.write_text(json.dumps({"costs": costs, "nbytes": nbytes, "seconds": seconds, "cpu": cpu}))
    pairs = sum(len(c) for c in costs.values())
    print(f"measured {pairs} unit and scheme pairs in {seconds:.0f} s wall ({seconds / pairs:.2f} s each), "
          f"{cpu:.0f} s of CPU time; the machine was shared, so the CPU time is the figure to read")

    plan = solve(costs, nbytes, units, config, args.bits)
    counts = {}
    for label in plan.values():
        counts[label] = counts.get(label, 0) + 1
    print(f"plan at {args.bits} bits: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    per_layer = {u: plan[u] for u in units}
    kinds = {}
    for u, label in per_layer.items():
        kinds.setdefault(u.rsplit(".", 1)[1], []).append(label)
    for kind, labels in kinds.items():
        print(f"  {kind:<13} " + " ".join(labels))

    if args.rank_only:
        rank_check(config, weights, tokenizer, units, costs, candidates, args.tokens)
        return
    weights_count = sum(np.prod(weights[n].shape) for m in units.values() for n in m)
    rows = {"plan": {n: plan[u] for u, m in units.items() for n in m}}
    for label in UNIFORM:
        assignment = {n: label for m in units.values() for n in m}
        if label in costs[next(iter(units))] and all(label in costs[u] for u in units):
            rows[label] = assignment
        else:
            print(f"uniform {label}: does not fit every layer (group size and in_features), left out")
    eval_ids = tokenizer.encode(eval_text(), add_special_tokens=False).ids
    eval_batches = token_windows(eval_ids, min(512, args.eval_tokens), max_tokens=args.eval_tokens)
    results = evaluate(config, weights, eval_batches, rows, units, costs, nbytes, weights_count, calib)
    plan_kl = results["plan"]["kl"]
    print(f"\nnext-token predictions on the first {sum(b.size for b in eval_batches)} tokens of the evaluation "
          f"text (windows of {eval_batches[0].shape[1]}), RTN, vs float32")
    print(f"{'':<13}{'bits/w':>8}{'mean KL':>11}{'KL / plan':>11}{'top-1':>9}{'ppl ratio':>11}"
          f"{'pred. cost':>12}{'calib KL':>11}")
    for name, r in results.items():
        if name != "plan" and r["bits"] > args.bits + 1e-9:
            note = f"  (over {args.bits} bits)"
        else:
            note = ""
        print(f"{name:<13}{r['bits']:8.3f}{r['kl']:11.5f}{r['kl'] / plan_kl:11.2f}{100 * r['top1']:8.2f}%"
              f"{r['ppl_ratio']:11.4f}{r['predicted']:12.5f}{r['calib_kl']:11.5f}{note}")
    print("pred. cost: the summed unit costs on the calibration text; calib KL: the whole model so quantized, "
          "on the same calibration tokens (additivity: their ratio)")
    fits = [n for n, r in results.items() if n != "plan" and r["bits"] <= args.bits + 1e-9]
    beaten = all(plan_kl < results[n]["kl"] for n in fits)
    print(f"the plan's mean KL is lower than every uniform preset within {args.bits} bits "
          f"({', '.join(fits)}): {beaten}")
    if args.rank_check:
        rank_check(config, weights, tokenizer, units, costs, candidates, args.tokens)


def solve(costs, nbytes, units, config, bits):
    """``{unit: label}``: the knapsack ``npquant plan`` solves, over the same costs and bytes."""
    from npquant.plan import budget_bytes, solve_budget
    from npquant.models.causal_lm_config import CausalLMConfig

    shapes = CausalLMConfig.from_json(config).tensor_shapes()
    budget = budget_bytes({n: shapes[n] for m in units.values() for n in m}, bits=bits)
    names = list(units)
    options = [list(costs[u]) for u in names]
    chosen = solve_budget([[costs[u][k] for k in o] for u, o in zip(names, options)],
                          [[nbytes[u][k] for k in o] for u, o in zip(names, options)], budget)
    return {u: o[c] for u, o, c in zip(names, options, chosen)}


def evaluate(config, weights, eval_batches, rows, units, costs, nbytes, weights_count, calib):
    """Per row (a ``{weight: scheme}``): bits, eval KL, top-1, perplexity ratio, predicted cost, calibration KL."""
    from npquant.fidelity_lm import compare_logits
    from npquant.models import CausalLM
    from npquant.models.sensitivity_lm import plan_quantizer

    V = config["vocab_size"]
    reference = CausalLM(config, weights)
    ref_eval = [reference.logits(ids)[:, :-1].reshape(-1, V) for ids in eval_batches]
    ref_calib = [reference.logits(ids)[:, :-1].reshape(-1, V) for ids in calib]
    targets = [ids[:, 1:].reshape(-1) for ids in eval_batches]
    calib_targets = [ids[:, 1:].reshape(-1) for ids in calib]
    float_lp = sum(float(compare_logits(r, r, t)["log_prob"].sum()) for r, t in zip(ref_eval, targets))
    out = {}
    for name, assignment in rows.items():
        model = CausalLM(config, weights, quantizer=plan_quantizer(assignment))
        kl = top1 = lp = n = 0.0
        for ids, ref, t in zip(eval_batches, ref_eval, targets):
            c = compare_logits(ref, model.logits(ids)[:, :-1].reshape(-1, V), t)
            kl += float(c["kl"].sum())
            top1 += int(c["same_top1"].sum())
            lp += float(c["log_prob"].sum())
            n += len(t)
        calib_kl = calib_n = 0.0
        for ids, ref, t in zip(calib, ref_calib, calib_targets):
            calib_kl += float(compare_logits(ref, model.logits(ids)[:, :-1].reshape(-1, V), t)["kl"].sum())
            calib_n += len(t)
        by_unit = {u: assignment[m[0]] for u, m in units.items()}
        out[name] = {"bits": 8.0 * sum(nbytes[u][by_unit[u]] for u in units) / weights_count, "kl": kl / n,
                     "top1": top1 / n, "ppl_ratio": math.exp((float_lp - lp) / n),
                     "predicted": sum(costs[u][by_unit[u]] for u in units), "calib_kl": calib_kl / calib_n}
    return out


def rank_check(config, weights, tokenizer, units, costs, candidates, tokens):
    """Spearman correlation of a subset's costs at ``tokens`` and at ``4 * tokens`` calibration tokens."""
    from npquant.calibrate import calibration_texts
    from npquant.models.sensitivity_lm import calibration_batches, unit_costs

    layers = sorted({0, 10, 20, config["num_hidden_layers"] - 1} & set(range(config["num_hidden_layers"])))
    subset = {u: m for u, m in units.items() if int(u.split(".")[2]) in layers}
    labels = ("w4-channel", "w4-g64", "w8-channel")
    more = calibration_batches(tokenizer, calibration_texts(max_samples=128), 4 * tokens)
    start = time.perf_counter()
    big, _ = unit_costs(config, weights, more, {k: candidates[k] for k in labels}, units=subset)
    seconds = time.perf_counter() - start
    a = [costs[u][k] for u in subset for k in labels]
    b = [big[u][k] for u in subset for k in labels]
    within = [spearman([costs[u][k] for u in subset], [big[u][k] for u in subset]) for k in labels]
    print(f"\nrank check: {len(a)} unit and scheme pairs (layers {layers}; {', '.join(labels)}) at "
          f"{sum(x.size for x in more)} tokens ({seconds:.0f} s): Spearman with the costs at {tokens} tokens "
          f"{spearman(a, b):.3f} over all pairs; per scheme across units "
          + ", ".join(f"{k} {r:.3f}" for k, r in zip(labels, within)))


def spearman(a, b) -> float:
    """Spearman's rank correlation (no ties expected among measured costs)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


if __name__ == "__main__":
    main()
