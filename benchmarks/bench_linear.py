"""Quantized linear against numpy's float32 matmul, measured in one process, as a model runs it.

Default (``in-model``): every quantized call alternates with a float32
``x @ V.T`` of another matrix ``V`` of the same shape, as a model's forward
alternates npquant's linears with numpy's own work (attention, norms, other
layers), all cases in this one process. It prints, per weight shape, batch
size M and scheme, the median time of ``npquant.linear`` (numba backend when
installed, else numpy) in that loop and its ratio to float32 ``x @ V.T``
timed alone (a loop of float32 calls only, in the same process, rounds
interleaved with the others); ``f32 in loop`` is the float32 call's median
inside the loop over its median alone: how much npquant's calls slow
numpy's. ``rounds q1-q3`` is the spread of the ratio: the quartiles, over
the rounds, of each round's quantized median over the same round's
float32-alone median.

Every weight comes from memory, as each layer's does in a model larger than
the cache: float32 and quantized weights alike are taken in turn from equal
copies that together outgrow the last-level cache (5/4 of its size, read
from sysfs; ``--rotate-mib`` to set it), one copy per call.

``--bursts``: the old measurement, a best case: each (shape, batch) in a
fresh process, each function timed in bursts of five calls of its own kind
after a warm-up, nothing else in between.

The bandwidth limit is the time to read the codes and scales once at the
read bandwidth measured just before the case (the best of a few rounds of a
parallel sum), as a ratio to the same float32 time.
A ``prep`` row is the scheme above it after :func:`npquant.prepare` (codes
in blocks of 64 rows, the numba kernels' layout; prepared once, outside the
timing, as an engine does after loading). Where torch is installed it adds
``torch._weight_int8pack_mm`` (bf16 activations, int8 per-channel weights)
beside ``w8-channel``.

W8A8 schemes (``w8a8-int8`` by default, ``w8a8-fp8`` with ``--scheme``)
quantize ``x`` per token inside each call: ``w8a8-int8`` runs the int8 GEMM
on the instruction path the header names (``W8A8 int8 path``: vnni, avx2
or portable; its ``prep`` row is the GEMM's own layout), ``w8a8-fp8`` its
exact float64 GEMM (about float32's time at small batches, 2-3x at large).
Each W8A8 row adds the float32 GFLOP/s and the integer GOP/s reached (``2 M
O I`` operations over the median time).

    python benchmarks/bench_linear.py --shape 11008 4096 --batch 1 --batch 8 --batch 128 --scheme w8a8-int8
    python benchmarks/bench_linear.py              # full run (a few minutes)
    python benchmarks/bench_linear.py --quick      # seconds, small shapes
    python benchmarks/bench_linear.py --bursts     # fresh process per case, bursts: a best case
    python benchmarks/bench_linear.py --threads 1

Lower ratios are better; below 1 beats float32 BLAS.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for BLAS and numba (default: all cores)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats, for CI")
    p.add_argument("--repeats", type=int, default=None, help="rounds per case (default 11, quick 2)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba"], help="npquant backend")
    p.add_argument("--batch", type=int, action="append", help="batch sizes M (repeatable; default 1, 8, 128)")
    p.add_argument("--shape", type=int, nargs=2, action="append", metavar=("OUT", "IN"),
                   help="weight shapes (repeatable; default 4096 4096 and 11008 4096)")
    p.add_argument("--scheme", action="append", metavar="PRESET",
                   help="presets (repeatable; default w8-channel, w4-g128, fp8-channel, nvfp4, mxfp4, w8a8-int8)")
    p.add_argument("--bursts", action="store_true",
                   help="time each function in bursts of its own calls, each shape and batch in a fresh "
                        "process: a best case, not what a model sees (default: calls alternate with float32 "
                        "matmuls of another matrix, all in this process)")
    p.add_argument("--same-process", action="store_true", help="with --bursts: every case in this process")
    p.add_argument("--rotate-mib", type=int, default=None, metavar="MIB",
                   help="each weight (float32 and quantized) is taken in turn from copies totalling at least "
                        "this many MiB, so that every call reads it from memory (default: 5/4 of the "
                        "last-level cache, at least 128; --quick: 128)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rotate_mib is not None and args.rotate_mib < 0:
        p.error(f"--rotate-mib must be 0 or more, got {args.rotate_mib}")
    return args


ARGS = _parse()
# Thread counts must be set before numpy, numba or torch start their pools.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NPQUANT_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

import npquant  # noqa: E402
from _machine import instruction_set, last_level_cache_bytes  # noqa: E402 (a module beside this script)


BURST = 5  # timed calls of one function in a row within a round
WARM_S = 0.3  # untimed calls first, for at least this long (OpenBLAS workers poll ~0.1 s or more after a call)


def interleaved(fns: dict, repeats: int, warm_s: float = WARM_S) -> tuple[dict, dict]:
    """Median seconds of each function over ``repeats`` rounds, and each round's median.

    Each round runs every function in turn: first untimed for at least
    ``warm_s`` seconds (at least twice), then ``BURST`` timed calls. Rounds
    interleave the functions, so drift in the machine's state hits all of
    them alike; the warm-up absorbs what switching costs on this 2-core
    machine: the other library's idle threads keep polling for a while after
    its last call (OpenBLAS's and OpenMP's), and a core left idle wakes slowly.
    Each function is timed as it runs in a sequence of calls of its own kind.
    Returns ``(median, rounds)``: the median over all timed calls, and the
    list of per-round medians (for the spread of a ratio across rounds).
    """
    times = {k: [] for k in fns}
    rounds = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t_end = time.perf_counter() + warm_s
            n = 0
            while n < 2 or time.perf_counter() < t_end:
                f()
                n += 1
            burst = []
            for _ in range(BURST):
                t0 = time.perf_counter()
                f()
                burst.append(time.perf_counter() - t0)
            times[k] += burst
            rounds[k].append(statistics.median(burst))
    return {k: statistics.median(v) for k, v in times.items()}, rounds


STEPS = 8  # calls in a row per round and function in the in-model loop (the first two untimed)


def in_model(qfns: dict, f32, repeats: int) -> tuple[dict, dict, dict]:
    """Times of each quantized call alternating with ``f32()``, and of ``f32()`` alone.

    Each round runs ``f32`` alone ``STEPS`` times, then for each quantized
    function ``STEPS`` steps of ``q(); f32()``; the first two calls or steps
    of each run are untimed (they pay for the switch from the previous
    run). Returns ``(median, rounds, f32_in_loop)``: medians over all timed
    calls (key ``"f32"``: float32 alone), per-round medians, and the median
    float32 time inside each function's loop.
    """
    alone, alone_rounds = [], []
    times = {k: [] for k in qfns}
    rounds = {k: [] for k in qfns}
    f_loop = {k: [] for k in qfns}
    clock = time.perf_counter
    for _ in range(repeats):
        run = []
        for i in range(STEPS):
            t0 = clock()
            f32()
            if i >= 2:
                run.append(clock() - t0)
        alone += run
        alone_rounds.append(statistics.median(run))
        for k, q in qfns.items():
            run = []
            for i in range(STEPS):
                t0 = clock()
                q()
                t1 = clock()
                f32()
                t2 = clock()
                if i >= 2:
                    run.append(t1 - t0)
                    f_loop[k].append(t2 - t1)
            times[k] += run
            rounds[k].append(statistics.median(run))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["f32"] = statistics.median(alone)
    rounds["f32"] = alone_rounds
    return med, rounds, {k: statistics.median(v) for k, v in f_loop.items()}


def ratio_spread(num: list, den: list) -> str:
    """Quartiles of the per-round ratios ``num[i] / den[i]`` as ``"q1-q3"`` (one value for one round)."""
    r = sorted(a / b for a, b in zip(num, den))
    if len(r) < 2:
        return f"{r[0]:.2f}"
    q1, _, q3 = statistics.quantiles(r, n=4, method="inclusive")
    return f"{q1:.2f}-{q3:.2f}"


ROTATE_MIN = 128 << 20  # the least bytes of copies a case rotates over


def rotate_bytes() -> int:
    """Bytes of copies each case rotates over: ``--rotate-mib``, else 5/4 of the last-level cache.

    Every weight, float32 or quantized, is taken from a set of equal copies
    in turn, one per call, that together outgrow the last-level cache: each
    call reads its weight from memory, as each layer of a model larger than
    the cache does. (Calling one float32 matrix back to back would let part
    of it stay in a large L3 between calls: a baseline no model sees.)
    """
    if ARGS.rotate_mib is not None:
        return ARGS.rotate_mib << 20
    if ARGS.quick:
        return ROTATE_MIN
    return max(ROTATE_MIN, last_level_cache_bytes() * 5 // 4)


def _copies(item, copy, nbytes: int, rotate: int) -> list:
    """``item`` and enough copies of it (``copy(item)``, each ``nbytes``) that together they hold ``rotate``
    bytes: at least ``item`` itself."""
    return [item] + [copy(item) for _ in range(-(-rotate // nbytes) - 1)]


def _rotating(items: list, fn):
    """A callable applying ``fn`` to ``items`` in turn, one per call."""
    state = {"i": 0}

    def call():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return fn(item)

    return call


def read_bandwidth(nbytes: int = 1 << 29, repeats: int = 7) -> float:
    """Bytes per second to read a large buffer with every thread (numba) or numpy's sum.

    The best of ``repeats`` rounds (each the median of a few reads): a limit
    should be what the machine can do, not what it usually does.
    """
    buf = np.ones(nbytes // 4, np.float32)
    try:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def total(a):
            s = np.float32(0.0)
            for i in prange(a.shape[0]):
                s += a[i]
            return s

    except ImportError:
        total = np.sum
    rounds = interleaved({"read": lambda: total(buf)}, repeats, warm_s=0.0)[1]["read"]
    return buf.nbytes / min(rounds)


def torch_case(w, x, rotate: int):
    """A callable running torch's int8 weight-only kernel on copies of w's per-channel codes in turn, or None."""
    try:
        import torch
    except ImportError:
        return None
    q, scales = npquant.quantize_per_channel(w)
    tqs = [torch.from_numpy(c) for c in _copies(q, np.copy, q.nbytes, rotate)]
    ts = torch.from_numpy(scales).to(torch.bfloat16)
    tx = torch.from_numpy(x).to(torch.bfloat16)
    torch.set_num_threads(ARGS.threads)
    return _rotating(tqs, lambda tq: torch._weight_int8pack_mm(tx, tq, ts))


def main() -> int:
    shapes = [tuple(s) for s in ARGS.shape] if ARGS.shape else (
        [(512, 512), (1024, 1024)] if ARGS.quick else [(4096, 4096), (11008, 4096)])
    batches = ARGS.batch or ([1, 8, 32] if ARGS.quick else [1, 8, 128])
    names = ARGS.scheme or ["w8-channel", "w4-g128", "fp8-channel", "nvfp4", "mxfp4", "w8a8-int8"]
    repeats = ARGS.repeats or (2 if ARGS.quick else 11)
    backend = ARGS.backend
    if backend == "auto":
        backend = npquant.available_backends()[-1]
    if ARGS.child:
        return _run_cases(shapes, batches, names, repeats, backend)
    bw = _read_bandwidth()
    if ARGS.bursts and not ARGS.quick and not ARGS.same_process:
        return _run_children(shapes, batches, bw)
    _header(bw, repeats, backend, isolated=False)
    return _run_cases(shapes, batches, names, repeats, backend)


def explain(qt, m: int) -> str:
    from npquant.kernels import explain as kernel_choice

    return kernel_choice(qt, m)


def _read_bandwidth() -> float:
    if ARGS.quick:
        return read_bandwidth(1 << 26, 3)
    return read_bandwidth(max(1 << 29, 2 * last_level_cache_bytes()), 7)


def _header(bw: float, repeats: int, backend: str, isolated: bool = True) -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}")
    print(f"numpy {np.__version__}, npquant {npquant.__version__}, backend {backend}, threads {ARGS.threads}")
    print(f"instruction set: {instruction_set()}")
    if backend == "numba":
        from npquant.kernels._w8a8 import int8_path

        print(f"W8A8 int8 path: {int8_path()} (the int8 GEMM of w8a8-int8: vnni, avx2 or portable)")
    print(f"read bandwidth (measured, best round): {bw / 1e9:.1f} GB/s at the start; each case's limit uses "
          f"its own, measured just before it")
    if ARGS.bursts:
        where = "each shape and batch in a fresh process" if isolated else "all in this process"
        print(f"BURSTS (a best case): medians of {repeats} interleaved rounds of {BURST} calls of one function "
              f"after a warm-up; {where}")
    else:
        print(f"IN A MODEL: each quantized call alternates with a float32 matmul of another matrix, all in this "
              f"process; medians of {repeats} rounds of {STEPS - 2} timed steps; ratio = quantized in the loop / "
              f"float32 alone")
    rotate, llc = rotate_bytes() >> 20, last_level_cache_bytes() >> 20
    if rotate >= llc:
        print(f"weights from memory: each taken in turn from copies totalling {rotate} MiB or more "
              f"(last-level cache {llc} MiB)")
    elif rotate > 0:
        print(f"each weight taken in turn from copies totalling {rotate} MiB or more, less than the last-level "
              f"cache ({llc} MiB): part of them may come from cache (--rotate-mib sets it)")
    else:
        print(f"one copy of each weight (--rotate-mib 0): the last-level cache ({llc} MiB) may serve part of it "
              f"between calls, as no model larger than it sees")
    print()
    loop = "" if ARGS.bursts else f" {'f32 in loop':>11}"
    head = (f"{'shape':>13} {'M':>4} {'scheme':<16} {'f32 ms':>8} {'quant ms':>9} {'ratio':>6} "
            f"{'rounds q1-q3':>12}{loop} {'bw limit':>8}")
    print(head)
    print("-" * len(head))


def _run_children(shapes, batches, bw: float) -> int:
    """Each (shape, batch) in a child process of this script; their rows printed in order."""
    import subprocess

    repeats = ARGS.repeats or 11
    backend = ARGS.backend if ARGS.backend != "auto" else npquant.available_backends()[-1]
    _header(bw, repeats, backend)
    for shape in shapes:
        for m in batches:
            cmd = [sys.executable, __file__, "--threads", str(ARGS.threads), "--repeats", str(repeats),
                   "--backend", ARGS.backend, "--shape", str(shape[0]), str(shape[1]), "--batch", str(m),
                   "--child", "--bursts"] + [a for name in ARGS.scheme or [] for a in ("--scheme", name)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            sys.stdout.write(done.stdout)
            sys.stdout.flush()
        print()
    return 0


def _copy(qt):
    """An equal quantized tensor (QuantizedTensor, PreparedTensor or PreparedW8A8) with arrays of its own."""
    if hasattr(qt, "packed"):  # PreparedW8A8: the int8 GEMM's layout
        return type(qt)(qt.packed.copy(), qt.corr.copy(), qt.w_scale.copy(), qt.shape, qt.scheme)
    own = None if qt.zero_point is None else qt.zero_point.copy()
    gs = None if qt.global_scale is None else qt.global_scale.copy()
    return type(qt)(qt.codes.copy(), qt.scale.copy(), own, qt.shape, qt.scheme, gs)


def _run_cases(shapes, batches, names, repeats, backend) -> int:
    rng = np.random.default_rng(0)
    for out_features, in_features in shapes:
        w = (0.02 * rng.standard_normal((out_features, in_features))).astype(np.float32)
        qts = {}
        for name in names:
            qts[name] = npquant.quantize(w, name)
            prepared = npquant.prepare(qts[name])  # blocks of 64 rows, the kernels' own layout
            if prepared is not qts[name]:
                qts[f"{name} prep"] = prepared
        # Enough copies of each quantized weight, taken in turn, that their
        # codes outgrow the last-level cache as the float32 weight does:
        # every call reads its weight from memory.
        rotate = rotate_bytes()
        copies = {name: _copies(qt, _copy, qt.nbytes, rotate) for name, qt in qts.items()}
        for name, qt in qts.items():  # w8a8-int8 not prepared: its GEMM layout is made at each copy's first call,
            if qt.scheme.activations == "int8-token" and backend == "numba":  # outside the timing (a first forward)
                for c in copies[name]:
                    npquant.linear(np.ones((1, in_features), np.float32), c, backend=backend)
        # float32 in bursts: copies of w; in a model: of another matrix, called alone and between quantized calls
        base = w if ARGS.bursts else (0.02 * rng.standard_normal((out_features, in_features))).astype(np.float32)
        f32_copies = _copies(base, np.copy, base.nbytes, rotate)
        for m in batches:
            x = rng.standard_normal((m, in_features)).astype(np.float32)
            fns = {"f32": _rotating(f32_copies, lambda v: x @ v.T)}
            for name, qt in qts.items():
                fns[name] = _rotating(copies[name], lambda qt: npquant.linear(x, qt, backend=backend))
            tc = torch_case(w, x, rotate)
            if tc is not None:
                fns["torch int8"] = tc
            bw = _read_bandwidth()  # the machine's memory now, for this case's limits
            if ARGS.bursts:
                t, rounds = interleaved(fns, repeats, warm_s=0.0 if ARGS.quick else WARM_S)
                f_loop = {}
            else:
                del fns["f32"]  # timed on other matrices, alone and in the loop
                t, rounds, f_loop = in_model(fns, _rotating(f32_copies, lambda v: x @ v.T), repeats)
            for name in fns:
                if name == "f32":
                    continue
                limit = ""
                if name in qts:
                    limit = f"{qts[name].nbytes / bw / t['f32']:8.3f}"
                loop = "" if ARGS.bursts else f" {f_loop[name] / t['f32']:10.2f}x"
                print(
                    f"{str((out_features, in_features)):>13} {m:>4} {name:<16} "
                    f"{t['f32'] * 1e3:8.2f} {t[name] * 1e3:9.2f} {t[name] / t['f32']:6.3f} "
                    f"{ratio_spread(rounds[name], rounds['f32']):>12}{loop} {limit:>8}"
                )
                if name in qts and qts[name].scheme.activations is not None:
                    ops = 2.0 * m * out_features * in_features
                    print(f"{'':>13} {'':>4} {name:<16} float32 {ops / t['f32'] / 1e9:.1f} GFLOP/s, "
                          f"W8A8 {ops / t[name] / 1e9:.1f} GOP/s")
            if backend == "numba":
                for name, qt in qts.items():
                    print(f"{'':>13} {'':>4} {name:<16} kernel: {explain(qt, m)}")
        if not ARGS.child:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
