"""GPTQ's cost and what it buys: one large layer from its Hessian, and all-MiniLM-L6-v2 end to end.

1. Layer: a (11008, 4096) weight and a Hessian from 8192 correlated input
   rows; times ``npquant.gptq`` (median of --repeats) beside a float64
   matmul of the same shape (the floating-point work GPTQ does is about one
   ``(O, I) @ (I, I)`` product), and its loss against round to nearest.
2. Model: every 4-bit preset, round to nearest and GPTQ (built-in
   calibration set, minmax and mse observers), mean and min embedding cosine
   to float32 on sentences GPTQ never saw: ``npquant eval``'s own set and
   ``benchmarks/heldout_sentences.txt`` (disjoint from both calibration and
   evaluation sets; tests/test_gptq.py checks it), and the seconds
   ``SentenceEncoder.quantized(..., method="gptq")`` took.

    python benchmarks/bench_gptq.py                 # both parts (a few minutes on 2 cores)
    python benchmarks/bench_gptq.py --part layer
    python benchmarks/bench_gptq.py --quick         # small shapes, two presets: a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HELDOUT = Path(__file__).resolve().parent / "heldout_sentences.txt"


def bench_layer(shape, tokens, repeats, scheme):
    import numpy as np

    import npquant
    from npquant.calibrate import Hessian, gptq, hessian_loss

    out_features, in_features = shape
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((in_features, in_features)).astype(np.float32) * np.float32(0.5 / np.sqrt(in_features))
    x = rng.standard_normal((tokens, in_features)).astype(np.float32)
    x = x + x @ mix  # correlated inputs
    w = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    start = time.perf_counter()
    hess = Hessian(in_features)
    for r0 in range(0, tokens, 1024):
        hess.add(x[r0 : r0 + 1024])
    h = hess.matrix()
    t_hessian = time.perf_counter() - start
    times, qt = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        qt = gptq(w, h, scheme)
        times.append(time.perf_counter() - start)
    w64 = w.astype(np.float64)
    matmul = []
    for _ in range(repeats):
        start = time.perf_counter()
        w64 @ h
        matmul.append(time.perf_counter() - start)
    rtn = hessian_loss(w, npquant.quantize(w, scheme), h)
    ours = hessian_loss(w, qt, h)
    t = statistics.median(times)
    m = statistics.median(matmul)
    print(f"layer {shape[0]} x {shape[1]}, {scheme}, Hessian of {tokens} tokens (made in {t_hessian:.1f} s)")
    print(f"  npquant.gptq           {t:8.2f} s  (median of {repeats}; runs {min(times):.2f}-{max(times):.2f} s)")
    print(f"  float64 (O, I) @ (I, I) {m:7.2f} s  (same process; GPTQ / matmul = {t / m:.2f})")
    print(f"  loss tr(dW H dW^T): RTN {rtn:.4e}, GPTQ {ours:.4e}, GPTQ / RTN = {ours / rtn:.3f}")


def bench_model(presets, max_samples):
    import numpy as np

    from npquant.calibrate import calibration_texts
    from npquant.fidelity import SENTENCES
    from npquant.models import SentenceEncoder

    enc = SentenceEncoder.from_pretrained()
    calib = calibration_texts(max_samples=max_samples)
    sets = {"eval set": list(SENTENCES), "held-out": [s.strip() for s in HELDOUT.read_text().splitlines() if s.strip()]}
    bases = {k: enc.encode(v) for k, v in sets.items()}
    print(f"\nall-MiniLM-L6-v2: mean / min embedding cosine to float32; GPTQ on {len(calib)} built-in calibration texts")
    print(f"  eval set: {len(sets['eval set'])} sentences (npquant eval's); held-out: {len(sets['held-out'])} "
          f"sentences ({HELDOUT.name}); neither is calibration text")
    print(f"{'preset':<14} {'method':<12} {'bits/w':>6} {'eval mean':>10} {'eval min':>9} {'held mean':>10} "
          f"{'held min':>9} {'seconds':>8}")
    for preset in presets:
        for method, observer in (("rtn", "minmax"), ("gptq", "minmax"), ("gptq", "mse")):
            start = time.perf_counter()
            q = enc.quantized(preset, method=method, calibration=calib if method == "gptq" else None,
                              observer=observer)
            seconds = time.perf_counter() - start
            cells = []
            for key, sentences in sets.items():
                cos = np.sum(q.encode(sentences) * bases[key], axis=1)
                cells += [f"{cos.mean():10.4f}", f"{cos.min():9.4f}"]
            label = method if observer == "minmax" else f"{method} mse"
            print(f"{preset:<14} {label:<12} {q.linear_bits_per_weight:6.2f} {' '.join(cells)} {seconds:8.1f}",
                  flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["layer", "model", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3, help="GPTQ runs on the large layer (default 3)")
    p.add_argument("--quick", action="store_true", help="small layer, two presets, 32 calibration texts")
    args = p.parse_args()

    import numpy as np

    import npquant

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; numpy {np.__version__}, npquant {npquant.__version__}")
    if args.part in ("layer", "both"):
        shape, tokens = ((512, 1024), 2048) if args.quick else ((11008, 4096), 8192)
        bench_layer(shape, tokens, 1 if args.quick else args.repeats, "w4-g128")
    if args.part in ("model", "both"):
        presets = ["w4-g128", "w4-g32"] if args.quick else ["w4-g128", "w4-g64", "w4-g32", "w4-g128-asym", "w4-channel"]
        bench_model(presets, 32 if args.quick else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
