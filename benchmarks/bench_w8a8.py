"""The W8A8 int8 GEMM against numpy's float32 matmul, in one process.

For each weight shape ``(N, K)`` and batch ``M`` it prints the median time
of float32 ``x @ W.T`` (numpy, BLAS) and of the W8A8 kernel
(:func:`npquant.kernels._w8a8.w8a8_int8_linear`: the per-token int8
quantization of ``x`` inside the call, the integer GEMM, the scales), the
ratio (kernel over float32; lower is better, below 1 beats float32), the
float32 GFLOP/s and the integer GOP/s reached (``2 M N K`` operations), and
which instruction path ran (VNNI, AVX2, portable). Rounds interleave the
two calls (each warmed up before its timed calls), so drift hits both.
Each function calls one weight back to back, in bursts: a best case for
both (a large last-level cache keeps part of either weight between calls);
``bench_linear.py`` measures what a model sees (weights from memory, calls
alternating with other work).

    python benchmarks/bench_w8a8.py --shape 11008 4096 --batch 1 --batch 8 --batch 128
    python benchmarks/bench_w8a8.py --quick

As for an AVX2 CPU (Zen 2), on any x86 machine::

    NUMBA_CPU_NAME=znver2 OPENBLAS_CORETYPE=Haswell \\
    NUMBA_CPU_FEATURES="$(python -c 'from npquant.kernels._target import features_of; print(features_of("znver2"))')" \\
    python benchmarks/bench_w8a8.py --shape 11008 4096 --batch 1 --batch 8 --batch 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=2, action="append", metavar=("OUT", "IN"),
                   help="weight shape N K (repeatable; default 11008 4096)")
    p.add_argument("--batch", type=int, action="append", help="batch sizes M (repeatable; default 1, 8, 128)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 9, quick 2)")
    p.add_argument("--path", default=None, choices=["vnni", "avx2", "portable"],
                   help="ask for this path (default: the fastest the target has)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for BLAS and the kernel")
    p.add_argument("--quick", action="store_true", help="a small shape and few rounds, for CI")
    return p.parse_args()


ARGS = _parse()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NPQUANT_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

from _machine import instruction_set  # noqa: E402 (a module beside this script)
from npquant.kernels import _w8a8  # noqa: E402

BURST = 5  # timed calls in a row per round and function
WARM_S = 0.2  # untimed calls first, for at least this long (OpenBLAS's workers poll after a call)


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function over ``repeats`` rounds of ``BURST`` calls, the functions taking turns."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t_end = time.perf_counter() + WARM_S
            n = 0
            while n < 2 or time.perf_counter() < t_end:
                f()
                n += 1
            for _ in range(BURST):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    shapes = [tuple(s) for s in ARGS.shape] if ARGS.shape else [(512, 768)] if ARGS.quick else [(11008, 4096)]
    batches = ARGS.batch or ([1, 8] if ARGS.quick else [1, 8, 128])
    repeats = ARGS.repeats or (2 if ARGS.quick else 9)
    path = _w8a8.int8_path(ARGS.path)
    print(f"instruction set: {instruction_set()}; int8 GEMM path: {path}; threads {ARGS.threads}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; medians of {repeats} x {BURST}; "
          f"load average {os.getloadavg()[0]:.1f} (others share this machine where it exceeds the threads)")
    print(f"{'N x K':>12} {'M':>5} {'f32 ms':>9} {'w8a8 ms':>9} {'ratio':>6} {'f32 GFLOP/s':>12} {'int GOP/s':>10}"
          "  path")
    rng = np.random.default_rng(0)
    for n, k in shapes:
        w = rng.standard_normal((n, k), dtype=np.float32)
        w_scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
        wq = np.clip(np.rint(w / w_scale[:, None]), -128, 127).astype(np.int8)
        weight = _w8a8.prepare_int8(wq, w_scale)
        for m in batches:
            x = rng.standard_normal((m, k), dtype=np.float32)
            med = interleaved({"f32": lambda: x @ w.T, "w8a8": lambda: _w8a8.w8a8_int8_linear(x, weight, path=path)},
                              repeats)
            ops = 2.0 * m * n * k
            print(f"{f'{n} x {k}':>12} {m:>5} {med['f32'] * 1e3:>9.3f} {med['w8a8'] * 1e3:>9.3f} "
                  f"{med['w8a8'] / med['f32']:>6.2f} {ops / med['f32'] / 1e9:>12.1f} {ops / med['w8a8'] / 1e9:>10.1f}"
                  f"  {path}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
