"""Batch-1 kernel for int8 codes as exact integer dot products (AVX-512 VNNI's ``vpdpwssd``).

``y (1, O) = x @ W_hat.T`` for symmetric int8 codes in the checkpoint
layout, with ``x`` turned into integers so that every product and every
sum is an integer, computed exactly:

1. ``x`` (float32) is scaled by the power of two ``2**(30 - e)``, where
   ``2**(e - 1) <= max|x| < 2**e``, and rounded to the integer ``X``
   (``|X| <= 2**30``). An element within a factor 64 of ``max|x|``
   converts exactly; a smaller one moves by at most ``2**(e - 31)``, a
   ``2**-30`` share of the largest element (float32 rounds each product
   it takes part in by up to ``2**-24`` of itself).
2. ``X = 2**16 H + L`` with ``L`` in ``[-2**15, 2**15)``: two int16 words.
3. ``vpdpwssd`` multiplies 32 int16 pairs and adds each two products into
   an int32 lane: the codes, widened to int16 (``vpmovsxbw``, 32 per
   instruction), meet ``L`` and ``H``. Per row and block of columns,
   ``sum_k c_k X_k = S_L + 2**16 S_H`` in int64, exactly.
4. ``acc += float64(that sum) * scale[g]`` per block of columns ``g``
   (float64), and ``y = float32(acc * 2**(e - 30))``.

So each output is the exact dot product of the codes with ``X``, scaled in
float64 and rounded once to float32: nearer ``x @ W_hat.T`` than a float32
sum of products, whose rounding grows with the length of the rows. ``x``
holding NaN or Inf has no such integers: each thread then writes NaN into
every output, and :func:`npquant.kernels.numba_linear` (seeing a NaN)
runs the float32 kernel (:func:`~npquant.kernels._gemv.gemv_bytes`),
which gives NaN and Inf their float32 meaning.

Why. The float32 kernel widens every byte to a 32-bit lane
(``vpmovsxbd``), converts it and multiplies it: three instructions per 16
weights, and on Zen 4 that held one core to about 25 GB/s of codes in
cache, so that two cores barely outran memory. Here one widening serves 32
weights and two ``vpdpwssd`` take them, with nothing to convert: with its
codes in cache (512 x 4096, one thread) 42 GB/s against 27. Eight rows
share each load of ``x``'s words (16 int32 accumulators): the codes come
as eight streams, as in the float32 kernel. Measured for 11008 x 4096 on 2
cores, each call alternating with a float32 matmul of another matrix, the
two kernels alternating in one process through :func:`npquant.linear`
(medians of 60): w8-channel 1.60 -> 1.47 ms and 1.90 -> 1.81 ms (two
runs), int8 in groups of 128 2.29 -> 2.05 and 3.21 -> 2.80 ms, of 512
1.81 -> 1.70 ms. Memory, not instructions, now bounds it: eight streams of
one 4 KiB row each, where the prepared layout's single stream runs faster.
Also tried and slower or no better: ``vpdpbusd`` on four signed base-256
digits of ``X`` (64 weights an instruction, but 16 accumulators for four
rows: four streams, 1.72 against 1.58 ms for the float32 kernel), the same
with three digits and eight rows (``x`` rounded to 22 bits; as fast as
this), one or two rows at a time (1.9-2.2 ms: too few streams),
prefetching into L1 the next block of rows (in address order, or at the
same columns one row or a block ahead) or 256 B-2 KiB ahead within the
rows.

Prefetching into L2 does pay: each line read asks for the one
``PREFETCH_AHEAD`` (32 KiB) on, for 4096 columns the same line of the
next pass's rows (as :func:`~npquant.kernels._gemv.gemv_bytes` does).
Measured as above, the kernel without and with it alternating: w8-channel
11008 x 4096 1.97 -> 1.67 ms, 4096 x 4096 0.98 -> 0.87 and 0.83 -> 0.76,
44032 x 1024 (1 KiB rows: four streams a page, which the hardware
prefetcher barely follows) 4.49 -> 2.60, int8 in groups of 128 3.55 ->
3.13. Also tried: prefetching 64 KiB or 128 KiB ahead (no better),
``prefetcht2`` (the same), one row at a time with its next lines
prefetched (one stream: slower than eight). With its codes in cache (512
x 4096, one thread) it costs about 5% (55 -> 59 us).

Each thread turns ``x`` into its words itself (8 KiB for 4096 columns,
microseconds): nothing extra to pass from Python. The int32 lanes stay
exact while a block of columns is at most ``_MAX_CHUNKS`` chunks of 64
(each ``vpdpwssd`` adds at most ``2 * 128 * 2**15`` to a lane, two per
chunk); longer blocks are summed in parts.

Compiled only where numba's target has AVX-512 VNNI
(:func:`npquant.kernels.has_vnni`): nothing compiles at import, and
:func:`compile_jobs` refuses other targets.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import NpquantError
from ._jobs import JOBS, SIGNATURE, _f32_2d, _i64_1d, _u8_2d
from ._llvm import PREFETCH_AHEAD, _claim, _stack_empty, prefetch_call
from ._target import has_vnni, target_features

_LANES = 16  # int32 lanes of one 512-bit register
_VI = ir.VectorType(ir.IntType(32), _LANES)
_I64 = ir.IntType(64)
_CHUNK = 64  # columns of one step: two vpdpwssd of 32 per row and word
_X_BITS = 30  # |X| <= 2**30: X = 2**16 H + L, L in [-2**15, 2**15), H in [-2**14, 2**14]
#: Rows per pass over x's words.
ROW_SET = 8
#: Chunks of 64 columns one lane may sum without overflow: two vpdpwssd each, each adding at most 2 * 128 * 2**15.
_MAX_CHUNKS = (2**31 - 1) // (2 * 2 * 128 * 2**15)


@intrinsic
def _dot_words(typingctx, codes, rows, c0, n_chunks, words, out):
    """``out[2 j + w] += sum_k int8(codes[rows[j], c0 + k]) * words[w, c0 + k]`` over ``64 n_chunks`` columns.

    ``codes`` uint8 (O, I), int8 codes as bytes; ``rows`` ``ROW_SET`` row
    indices; ``words`` int16 (2, I): ``L`` then ``H``; ``out`` int64
    (>= 2 ROW_SET,). Exact while ``n_chunks <= _MAX_CHUNKS``. Each line
    read asks for the one ``PREFETCH_AHEAD`` bytes on into L2.
    """
    if not (isinstance(codes, types.Array) and codes.dtype == types.uint8 and codes.ndim == 2 and codes.layout == "C"
            and isinstance(words, types.Array) and words.dtype == types.int16 and words.ndim == 2
            and words.layout == "C" and isinstance(rows, types.UniTuple) and rows.count == ROW_SET
            and isinstance(out, types.Array) and out.dtype == types.int64 and out.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        codes_t, rows_t, c0_t, n_t, words_t, out_t = signature.args
        code_ary = context.make_array(codes_t)(context, builder, args[0])
        word_ary = context.make_array(words_t)(context, builder, args[4])
        out_ary = context.make_array(out_t)(context, builder, args[5])
        n_cols = cgutils.unpack_tuple(builder, code_ary.shape)[1]
        c0_ = context.cast(builder, args[2], c0_t, types.int64)
        row_starts = []
        for j in range(ROW_SET):
            r = context.cast(builder, builder.extract_value(args[1], j), rows_t.dtype, types.int64)
            row_starts.append(builder.gep(code_ary.data, [builder.add(builder.mul(r, n_cols), c0_)]))
        word_starts = [builder.gep(word_ary.data, [builder.add(builder.mul(ir.Constant(_I64, w), n_cols), c0_)])
                       for w in range(2)]
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VI, _VI]),
                                             "llvm.x86.avx512.vpdpwssd.512")
        wide_lanes = ir.VectorType(_I64, _LANES)
        lane_sum = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, [wide_lanes]),
                                                  "llvm.vector.reduce.add.v16i64")
        # In the entry block: LLVM keeps them in registers through the loop.
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(_VI, None)) for _ in range(2)] for _ in range(ROW_SET)]
        bytes32 = ir.VectorType(ir.IntType(8), 32)
        words32 = ir.VectorType(ir.IntType(16), 32)

        def load(start, offset, ty, align):
            return builder.load(builder.bitcast(builder.gep(start, [offset]), ty.as_pointer()), align=align)

        with cgutils.for_range(builder, context.cast(builder, args[3], n_t, types.int64)) as loop:
            column = builder.mul(loop.index, ir.Constant(_I64, _CHUNK))
            ahead = builder.add(column, ir.Constant(_I64, PREFETCH_AHEAD))
            for j in range(ROW_SET):  # the same line a pass later, into L2
                prefetch_call(builder, builder.gep(row_starts[j], [ahead]), 2)
            for half in range(2):
                offset = builder.add(column, ir.Constant(_I64, 32 * half))
                xw = [load(word_starts[w], offset, _VI, 2) for w in range(2)]
                for j in range(ROW_SET):
                    wide = builder.bitcast(builder.sext(load(row_starts[j], offset, bytes32, 1), words32), _VI)
                    for w in range(2):
                        builder.store(builder.call(dot, [builder.load(acc[j][w]), wide, xw[w]]), acc[j][w])
        for j in range(ROW_SET):
            for w in range(2):
                # Summed in int64: 16 lanes near 2**31 each would overflow an int32.
                total = builder.call(lane_sum, [builder.sext(builder.load(acc[j][w]), wide_lanes)])
                ptr = cgutils.get_item_pointer(context, builder, out_t, out_ary,
                                               [context.get_constant(types.intp, 2 * j + w)])
                builder.store(builder.add(builder.load(ptr), total), ptr)
        return context.get_dummy_value()

    return types.void(codes, rows, c0, n_chunks, words, out), codegen


@njit(nogil=True, cache=True)
def split_x(x):
    """``(words, unit)`` for float32 ``x (I,)``: int16 ``(2, I)`` holding ``L`` and ``H`` of ``X = round(x / unit)``
    (``X = 2**16 H + L``), and the power of two ``unit = 2**(e - 30)``, ``2**(e - 1) <= max|x| < 2**e``
    (``2**-30`` for zeros). ``unit`` is NaN, and ``words`` zeros, when ``x`` holds NaN or Inf."""
    n = x.shape[0]
    largest = np.float32(0.0)
    poison = np.float32(0.0)  # stays 0 unless some x is NaN or Inf (times 0: NaN)
    for k in range(n):
        a = abs(x[k])
        largest = a if a > largest else largest
        poison += x[k] * np.float32(0.0)
    if poison != 0:
        return np.zeros((2, n), np.int16), math.nan  # zeros: nothing out of bounds, whatever reads them
    e = math.frexp(np.float64(largest))[1] if largest > 0 else 0
    mult = math.ldexp(1.0, _X_BITS - e)  # x * mult is exact in float64: a power of two, far from over- or underflow
    words = np.empty((2, n), np.int16)
    for k in range(n):
        v = np.int64(np.rint(np.float64(x[k]) * mult))
        low = ((v + 32768) & 65535) - 32768  # in [-2**15, 2**15); v - low is a multiple of 2**16
        words[0, k] = np.int16(low)
        words[1, k] = np.int16((v - low) >> 16)
    return words, math.ldexp(1.0, e - _X_BITS)


@njit(inline="always")
def _row_set(o, last):
    """Rows ``o .. o + 7``, the ones past ``last`` repeating it."""
    return (o, min(o + 1, last), min(o + 2, last), min(o + 3, last), min(o + 4, last), min(o + 5, last),
            min(o + 6, last), min(o + 7, last))


@njit(nogil=True, cache=True)
def gemv_int8_exact(x, codes, scale, bo, bi, y, work, per):
    """``y (1, O) = x (1, I) @ W_hat.T`` for symmetric int8 ``codes`` uint8 ``(O, I)``, float32 ``scale (O / bo, I / bi)``.

    ``bi`` is a multiple of 64. Chunks of ``per`` blocks of eight rows come
    from the counter ``work``; rows past the end repeat the last row and
    are not stored. Where ``x`` holds NaN or Inf, every output this thread
    would have written is NaN.
    """
    out_features = y.shape[1]
    n_col_blocks = codes.shape[1] // bi
    n_chunks = bi // _CHUNK
    last = out_features - 1
    n_units = (out_features + ROW_SET - 1) // ROW_SET
    words, unit = split_x(x[0])
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            o = blk * ROW_SET
            r = _row_set(o, last)
            acc = _stack_empty(1, ROW_SET, np.float64)[0]
            acc[:] = 0
            part = _stack_empty(1, 16, np.int64)[0]  # (2 ROW_SET,): row j's sums against L and H at 2 j, 2 j + 1
            if unit == unit:  # else NaN or Inf in x: acc stays 0, and 0 * NaN is NaN
                for g in range(n_col_blocks):
                    part[:] = 0
                    for done in range(0, n_chunks, _MAX_CHUNKS):
                        _dot_words(codes, r, g * bi + done * _CHUNK, min(_MAX_CHUNKS, n_chunks - done), words, part)
                    for j in range(ROW_SET):
                        exact = part[2 * j] + (part[2 * j + 1] << 16)
                        acc[j] += np.float64(exact) * np.float64(scale[r[j] // bo, g])
            for j in range(min(ROW_SET, out_features - o)):
                y[0, o + j] = np.float32(acc[j] * unit)


def _gemv_int8_exact_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_int8_exact` (x, codes, scale, bo, bi, y, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    codes, i = _u8_2d(blk, i)
    scale, i = _f32_2d(blk, i)
    bo, bi = blk[i], blk[i + 1]
    y, i = _f32_2d(blk, i + 2)
    work, i = _i64_1d(blk, i)
    gemv_int8_exact(x, codes, scale, bo, bi, y, work, blk[i])
    return 0


@functools.cache
def compile_jobs() -> None:
    """Compile :func:`gemv_int8_exact`'s job for OpenBLAS's threads and enter it in ``JOBS``, once.

    Nothing in this module compiles at import: its kernel names AVX-512
    VNNI's intrinsic, which LLVM cannot lower for a target without it (it
    aborts the process). This is the one place that compiles it, and only
    where numba's target has AVX-512 VNNI (:func:`~npquant.kernels._target.has_vnni`).

    Raises
    ------
    NpquantError
        Where numba's target has no AVX-512 VNNI.
    """
    if not has_vnni():
        raise NpquantError("the exact int8 kernel needs AVX-512 VNNI, which numba's target CPU lacks "
                           f"(features: {target_features()[:80]}...); the float32 kernel serves there")
    JOBS[gemv_int8_exact] = cfunc(SIGNATURE, cache=True)(_gemv_int8_exact_job)
