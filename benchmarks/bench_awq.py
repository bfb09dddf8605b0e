"""AWQ beside round to nearest and GPTQ on all-MiniLM-L6-v2: what each method keeps, on text it never saw.

For each 4-bit group preset (w4-g128, w4-g64, w4-g32, and their
``-restricted`` twins where the presets have them), five methods:

- ``rtn``: round to nearest;
- ``gptq/layer``: sequential GPTQ as published, each layer reproducing its
  own output on the inputs the quantized layers before it give
  (``SentenceEncoder.quantized(method="gptq", objective="layer")``);
- ``gptq``: sequential GPTQ with npquant's default objective, the float
  model's output at each layer, then the scales refitted to the codes
  (``objective="model"``, see ``npquant.calibrate.target``);
- ``awq``: AWQ's activation-aware input scales where they fold into the
  model, then round to nearest (in this post-LayerNorm encoder only the
  attention output's scale folds, into the value projection: see
  ``npquant.models.calibrated``);
- ``awq+gptq``: the same scales, then GPTQ (objective ``model``).

Calibration: npquant's built-in calibration texts (all of them, or
``--max-samples``). Evaluation: mean and min cosine of each sentence's
embedding to float32's on ``npquant eval``'s own sentences and on
``benchmarks/heldout_sentences.txt``; neither set shares a sentence with
the calibration texts (checked here). AWQ's grid is its published default
(20 exponents from 0 to 0.95), not tuned on anything evaluated here.
Seconds are the wall time of ``quantized()``, with its ratio to GPTQ's for
the same preset in the same process (the machine may be shared: the
figures are rough).

    python benchmarks/bench_awq.py            # every preset and method (about 20 minutes on 2 quiet cores;
                                              # 90 on a machine loaded by other runs)
    python benchmarks/bench_awq.py --quick    # w4-g128 only, 32 calibration texts: a smoke test
    python benchmarks/bench_awq.py --observer mse --preset w4-g128 --preset w4-g32
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELDOUT = Path(__file__).resolve().parent / "heldout_sentences.txt"
# (label, method, objective)
METHODS = (("rtn", "rtn", "model"), ("gptq/layer", "gptq", "layer"), ("gptq", "gptq", "model"),
           ("awq", "awq", "model"), ("awq+gptq", "awq+gptq", "model"))
# The targets for the best method on the held-out sentences (mean cosine).
TARGETS = {"w4-g128": 0.990, "w4-g32": 0.993}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="w4-g128 only, 32 calibration texts")
    p.add_argument("--max-samples", type=int, default=None, help="first N built-in calibration texts (default all)")
    p.add_argument("--observer", choices=["minmax", "mse"], default="minmax", help="block ranges (default minmax)")
    p.add_argument("--preset", action="append", default=None, help="only these presets (repeatable)")
    args = p.parse_args()

    import numpy as np

    import npquant
    from npquant.calibrate import calibration_texts
    from npquant.fidelity import SENTENCES
    from npquant.models import SentenceEncoder
    from npquant.schemes import schemes

    presets = [n for n in ("w4-g128", "w4-g64", "w4-g32") if n in schemes()]
    presets += [f"{n}-restricted" for n in presets if f"{n}-restricted" in schemes()]
    calib = calibration_texts(max_samples=32 if args.quick else args.max_samples)
    if args.quick:
        presets = presets[:1]
    if args.preset:
        presets = list(args.preset)
    sets = {"eval": list(SENTENCES), "held-out": [s.strip() for s in HELDOUT.read_text().splitlines() if s.strip()]}
    for name, sentences in sets.items():
        shared = set(sentences) & set(calib)
        if shared:
            raise SystemExit(f"{name} sentences are also calibration texts (e.g. {min(shared)!r})")
    enc = SentenceEncoder.from_pretrained()
    bases = {k: enc.encode(v) for k, v in sets.items()}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}, npquant {npquant.__version__}")
    print(f"all-MiniLM-L6-v2, observer {args.observer}; calibration: {len(calib)} built-in texts; eval: {len(sets['eval'])} sentences "
          f"(npquant eval's), held-out: {len(sets['held-out'])} ({HELDOUT.name}); cosine to float32")
    for preset in presets:
        print(f"  {preset}: {npquant.get_scheme(preset).describe()}")
    print(f"{'preset':<20} {'method':<10} {'bits/w':>6} {'eval mean':>10} {'eval min':>9} {'held mean':>10} "
          f"{'held min':>9} {'seconds':>8} {'/ gptq':>7}")
    best: dict[str, tuple[float, str]] = {}
    for preset in presets:
        results = []
        for label, method, objective in METHODS:
            start = time.perf_counter()
            q = enc.quantized(preset, method=method, calibration=None if method == "rtn" else calib,
                              observer=args.observer, objective=objective)
            seconds = time.perf_counter() - start
            cells = []
            for key, sentences in sets.items():
                cos = np.sum(q.encode(sentences).astype(np.float64) * bases[key], axis=1)
                cells.append((cos.mean(), cos.min()))
            results.append((label, q.linear_bits_per_weight, cells, seconds))
            if cells[1][0] > best.get(preset, (-1.0, ""))[0]:
                best[preset] = (cells[1][0], label)
        gptq_seconds = next(r[3] for r in results if r[0] == "gptq")
        for method, bits, cells, seconds in results:
            (em, en), (hm, hn) = cells
            print(f"{preset:<20} {method:<10} {bits:6.2f} {em:10.4f} {en:9.4f} {hm:10.4f} {hn:9.4f} {seconds:8.1f} "
                  f"{seconds / gptq_seconds:7.2f}", flush=True)
    print("best method per preset on the held-out sentences (mean cosine), against the issue's targets:")
    for preset, (value, method) in best.items():
        target = TARGETS.get(preset)
        verdict = "" if target is None else f"  target {target:.3f}: {'met' if value >= target else 'not met'}"
        print(f"  {preset:<20} {method:<9} {value:.4f}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
