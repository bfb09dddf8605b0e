"""int8 x int8 -> int32 GEMM on AVX2 (``vpmaddwd``), over the layout of :mod:`npquant.kernels._w8a8_core`.

Every AVX2 CPU has ``vpmaddwd``: in each of 8 int32 lanes, two int16
products added, in full precision (``|x w| <= 2**14``, a pair at most
``2**15``: nothing saturates, nothing rounds). Codes enter as int16:
``x`` widened once per call (int16 ``(M, Kp)``), the weight's 16 bytes
widened in registers (``vpmovsxbw``), once per ``MR`` tokens. 16 bytes of
the layout are 4 rows' quads of columns, so lane ``2 r + h`` of a product
holds row ``r``'s columns ``2 h, 2 h + 1`` of the quad, against ``x``'s
four codes of the quad broadcast (``vpbroadcastq``); the epilogue adds the
two lanes of each row (:func:`~npquant.kernels._w8a8_core.store_tile`).

Why not ``vpmaddubsw`` (32 byte products an instruction into saturating
int16 pairs): with ``x`` offset to unsigned bytes, a pair reaches ``2 *
255 * 127 = 64770``, past int16, so results would saturate (wrong); the
exact form, ``|x|`` against ``w`` given ``x``'s sign (``vpsignb``, one per
product pair, since each ``x`` meets many weight registers), is exact only
for ``|w| <= 127`` and takes four instructions per 32 multiply-adds, as
many per multiply-add as this path's two per 16.

A tile is ``MR = 6`` tokens (3 to 6) by 8 weight rows (two registers of 4
rows): 12 accumulators, two weight registers and a broadcast in AVX2's 16;
one or two tokens take 16 rows (four registers: 64 bytes, a whole line of
the layout, per quad).

The first tile of each pass over a block's quads (the one that reads the
codes from memory) prefetches each line ``PREFETCH_AHEAD`` (32 KiB) on into
L2, as :mod:`~npquant.kernels._w8a8_vnni` does. One thread, numba
targeting Zen 2 on the AVX-512 host, 11008 x 4096, medians of 60, a second
core busy, before -> after: batch 1 3.58 -> 2.11 ms, 4 6.73 -> 3.71, 8
8.91 -> 6.59.

Compiled only where numba's target has AVX2 (:func:`compile_jobs` refuses
others; LLVM would abort on the intrinsic).
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import NpquantError
from ._jobs import JOBS, SIGNATURE, _u8_3d
from ._llvm import PREFETCH_AHEAD, _claim, prefetch_call
from ._target import target_features, target_has
from ._w8a8_core import BLOCK, QUAD_BYTES, _i16_2d, store_tile, unpack_tail

#: Tokens per tile.
MR = 6
#: Weight rows per tile (two registers of four rows).
NR = 8
#: Quads of columns per pass of every tile over a block: 64 rows x 16 quads, 4 KiB of codes, in L1 beside 128
#: tokens' int16 codes for those columns (16 KiB).
KC = 16
_V8 = ir.VectorType(ir.IntType(32), 8)
_V16W = ir.VectorType(ir.IntType(16), 16)
_V16B = ir.VectorType(ir.IntType(8), 16)
_I64 = ir.IntType(64)


@intrinsic
def _tile(typingctx, xi, m0, rows, nr, wp, blk, q0, nq, group, out, pf):
    """``out[m0 + i, 2 nr group + 2 r + h] += sum_q sum_{c < 2} xi[m0 + i, 4 q + 2 h + c] * w[nr group + r, 4 q + 2 h + c]`` (int32,
    wrapping) for ``i < rows`` (a literal, 1 to ``MR``) and the ``nr`` rows (a literal, 8 or 16) ``nr group ..`` of
    block ``blk``, over the ``nq`` quads from ``q0``.

    ``xi`` int16 (M, Kp); ``wp`` uint8 (B, Kp / 4, 256); ``out`` int32
    (M, 128), C-contiguous. ``pf`` (a literal): 1 prefetches, per line read,
    the line ``PREFETCH_AHEAD`` on into L2; 0 not.
    """
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(nr, types.IntegerLiteral)
            and isinstance(pf, types.IntegerLiteral) and isinstance(xi, types.Array) and xi.dtype == types.int16
            and xi.layout == "C" and isinstance(wp, types.Array) and wp.dtype == types.uint8 and wp.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.int32 and out.layout == "C"):
        return None
    n_rows = rows.literal_value
    n_regs = nr.literal_value // 4
    prefetch = pf.literal_value != 0

    def codegen(context, builder, signature, args):
        xi_t, m0_t, _, _, wp_t, blk_t, q0_t, nq_t, g_t, out_t, _ = signature.args
        x_ary = context.make_array(xi_t)(context, builder, args[0])
        w_ary = context.make_array(wp_t)(context, builder, args[4])
        o_ary = context.make_array(out_t)(context, builder, args[9])
        q0_ = context.cast(builder, args[6], q0_t, types.int64)
        nq_ = context.cast(builder, args[7], nq_t, types.int64)
        k_pad = cgutils.unpack_tuple(builder, x_ary.shape)[1]
        n_quads = cgutils.unpack_tuple(builder, w_ary.shape)[1]
        m0_ = context.cast(builder, args[1], m0_t, types.int64)
        blk_ = context.cast(builder, args[5], blk_t, types.int64)
        g_ = context.cast(builder, args[8], g_t, types.int64)
        x_rows = [builder.gep(x_ary.data, [builder.add(builder.mul(builder.add(m0_, ir.Constant(_I64, i)), k_pad),
                                                       builder.mul(q0_, ir.Constant(_I64, 4)))])
                  for i in range(n_rows)]
        w_start = builder.gep(w_ary.data, [builder.add(
            builder.mul(builder.add(builder.mul(blk_, n_quads), q0_), ir.Constant(_I64, QUAD_BYTES)),
            builder.mul(g_, ir.Constant(_I64, 4 * 4 * n_regs)))])
        madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8, [_V16W, _V16W]),
                                              "llvm.x86.avx2.pmadd.wd")
        def out_ptr(i, j):
            col = builder.add(builder.mul(g_, ir.Constant(_I64, 8 * n_regs)), ir.Constant(_I64, 8 * j))
            ptr = cgutils.get_item_pointer(context, builder, out_t, o_ary, [builder.add(m0_, ir.Constant(_I64, i)), col])
            return builder.bitcast(ptr, _V8.as_pointer())

        acc = [[cgutils.alloca_once_value(builder, builder.load(out_ptr(i, j), align=4)) for j in range(n_regs)]
               for i in range(n_rows)]
        v4q = ir.VectorType(_I64, 4)
        i32 = ir.IntType(32)
        splat_mask = ir.Constant(ir.VectorType(i32, 4), None)
        with cgutils.for_range(builder, nq_) as loop:
            q = loop.index
            w_at = builder.gep(w_start, [builder.mul(q, ir.Constant(_I64, QUAD_BYTES))])
            wv = [builder.sext(builder.load(builder.bitcast(builder.gep(w_at, [ir.Constant(_I64, 16 * j)]),
                                                            _V16B.as_pointer()), align=1), _V16W) for j in range(n_regs)]
            if prefetch:  # the line PREFETCH_AHEAD on in the layout's one stream, into L2
                prefetch_call(builder, builder.gep(w_at, [ir.Constant(_I64, PREFETCH_AHEAD)]), 2)
            for i in range(n_rows):
                word = builder.load(builder.bitcast(builder.gep(x_rows[i], [builder.mul(q, ir.Constant(_I64, 4))]),
                                                    _I64.as_pointer()), align=2)
                xb = builder.shuffle_vector(builder.insert_element(ir.Constant(v4q, ir.Undefined), word,
                                                                   ir.Constant(i32, 0)),
                                            ir.Constant(v4q, ir.Undefined), splat_mask)
                xb = builder.bitcast(xb, _V16W)
                for j in range(n_regs):
                    builder.store(builder.add(builder.load(acc[i][j]), builder.call(madd, [wv[j], xb])), acc[i][j])
        for i in range(n_rows):
            for j in range(n_regs):
                builder.store(builder.load(acc[i][j]), out_ptr(i, j), align=4)
        return context.get_dummy_value()

    return types.void(xi, m0, rows, nr, wp, blk, q0, nq, group, out, pf), codegen


@njit(nogil=True, cache=True)
def gemm_avx2(xi, wp, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per):
    """``y (M, N)`` (or the int32 ``acc_out``) for int16 codes ``xi (M, Kp)`` and the layout ``wp``: blocks of 64
    rows claimed from ``work``, tiles of ``MR`` tokens by 8 rows, results through
    :func:`~npquant.kernels._w8a8_core.store_tile`."""
    m_rows = xi.shape[0]
    n_blocks, n_quads = wp.shape[0], wp.shape[1]
    acc = np.empty((m_rows, 2 * BLOCK), np.int32)  # the block's sums, two lanes a row, every token
    while True:
        lo, hi = _claim(work, per, n_blocks)
        if lo >= hi:
            break
        for b in range(lo, hi):
            acc[:] = 0
            for q0 in range(0, n_quads, KC):  # KC quads of the block stay in L1 for every tile
                nq = min(KC, n_quads - q0)
                for m0 in range(0, m_rows, MR):
                    rows = min(MR, m_rows - m0)
                    if rows <= 2:  # 16 rows a tile: 8 accumulators, four weight registers, a line per quad
                        for g in range(BLOCK // 16):  # the first tile of a pass reads the codes from memory
                            if rows == 2:
                                if m0 == 0:
                                    _tile(xi, m0, 2, 16, wp, b, q0, nq, g, acc, 1)
                                else:
                                    _tile(xi, m0, 2, 16, wp, b, q0, nq, g, acc, 0)
                            elif m0 == 0:
                                _tile(xi, m0, 1, 16, wp, b, q0, nq, g, acc, 1)
                            else:
                                _tile(xi, m0, 1, 16, wp, b, q0, nq, g, acc, 0)
                    elif m0 == 0:  # prefetching, each line once (two tiles of 8 rows a line)
                        for g in range(BLOCK // NR):
                            if g % 2 == 0:
                                if rows == 6:
                                    _tile(xi, m0, 6, 8, wp, b, q0, nq, g, acc, 1)
                                elif rows == 5:
                                    _tile(xi, m0, 5, 8, wp, b, q0, nq, g, acc, 1)
                                elif rows == 4:
                                    _tile(xi, m0, 4, 8, wp, b, q0, nq, g, acc, 1)
                                else:
                                    _tile(xi, m0, 3, 8, wp, b, q0, nq, g, acc, 1)
                            elif rows == 6:
                                _tile(xi, m0, 6, 8, wp, b, q0, nq, g, acc, 0)
                            elif rows == 5:
                                _tile(xi, m0, 5, 8, wp, b, q0, nq, g, acc, 0)
                            elif rows == 4:
                                _tile(xi, m0, 4, 8, wp, b, q0, nq, g, acc, 0)
                            else:
                                _tile(xi, m0, 3, 8, wp, b, q0, nq, g, acc, 0)
                    else:
                        for g in range(BLOCK // NR):
                            if rows == 6:
                                _tile(xi, m0, 6, 8, wp, b, q0, nq, g, acc, 0)
                            elif rows == 5:
                                _tile(xi, m0, 5, 8, wp, b, q0, nq, g, acc, 0)
                            elif rows == 4:
                                _tile(xi, m0, 4, 8, wp, b, q0, nq, g, acc, 0)
                            else:
                                _tile(xi, m0, 3, 8, wp, b, q0, nq, g, acc, 0)
            store_tile(acc, m_rows, 0, b * BLOCK, 2, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out)


def _gemm_avx2_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemm_avx2` (xi, wp, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per)."""
    blk = carray(a, (n,))
    xi, i = _i16_2d(blk, 0)
    wp, i = _u8_3d(blk, i)
    gemm_avx2(xi, wp, *unpack_tail(blk, i))
    return 0


@functools.cache
def compile_jobs() -> None:
    """Compile :func:`gemm_avx2`'s job for OpenBLAS's threads and enter it in ``JOBS``, once.

    Raises
    ------
    NpquantError
        Where numba's target has no AVX2 (nothing reaches LLVM then).
    """
    if not target_has("avx2"):
        raise NpquantError("the AVX2 int8 GEMM needs AVX2, which numba's target CPU lacks "
                           f"(features: {target_features()[:80]}...); the portable kernel serves there")
    JOBS[gemm_avx2] = cfunc(SIGNATURE, cache=True)(_gemm_avx2_job)
