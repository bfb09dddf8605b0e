"""int8 x int8 -> int32 GEMM on AVX-512 VNNI (``vpdpbusd``), over the layout of :mod:`npquant.kernels._w8a8_core`.

``vpdpbusd`` multiplies, in each of 16 int32 lanes, four unsigned bytes of
one operand by four signed bytes of the other and adds the four products to
the lane: 64 multiply-adds an instruction. ``x``'s codes are signed, so
they enter offset by 128 (``u = x + 128``, in ``[0, 255]``), and
``sum_k u_k w_k = sum_k x_k w_k + 128 sum_k w_k``: the kernel subtracts
``corr = 128 * rowsum(w)``, made once with the layout. No saturation is
possible (``vpdpbusd`` adds in full 32-bit precision, wrapping: the sum is
exact modulo ``2**32``, and the true one fits for ``K <= 131071``).

A tile is ``MR`` tokens (``MR <= 6``) by 64 weight rows (four registers of
16 rows): per quad of columns, four loads of 64 bytes of weights, ``MR``
broadcasts of 4 bytes of ``x``, ``4 MR`` ``vpdpbusd``; the 24
accumulators, four weight registers and one broadcast fit AVX-512's 32
registers. Each thread claims blocks of 64 rows; within a block, passes of
``KC`` quads (8 KiB of codes) stay in L1 while every tile of tokens goes
over them, the block's int32 sums kept for every token (``M x 64``) and
scaled once at its end. One thread, 1024 x 4096 at batch 128, operands in
cache: 448-483 GOP/s (``KC`` 16 to 128 all within that, on a loaded
machine), where float32's BLAS reached 51-64 GFLOP/s.

The first tile of each pass (the one that reads the codes from memory; the
others find them in L1) asks, for each line it reads, for the one
``PREFETCH_AHEAD`` (32 KiB) on into L2, as :mod:`~npquant.kernels._vnni`
does: the layout is one stream per thread, which the hardware prefetcher
gives up at each 4 KiB page. 11008 x 4096, 2 cores, each kernel alone in a
loop (medians of 60, quiet machine; the weight partly in L3), before ->
after: batch 1 0.91 -> 0.84 ms, 4 1.91 -> 1.18, 8 2.71 -> 1.57; one thread
(a second core busy) 1.72 -> 1.65, 4.25 -> 3.15, 5.22 -> 3.56.

Compiled only where numba's target has AVX-512 VNNI
(:func:`~npquant.kernels._target.has_vnni`): nothing compiles at import, and
:func:`compile_jobs` refuses other targets (LLVM would abort the process).
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import NpquantError
from ._jobs import JOBS, SIGNATURE, _u8_2d, _u8_3d
from ._llvm import PREFETCH_AHEAD, _claim, prefetch_call
from ._target import has_vnni, target_features
from ._w8a8_core import BLOCK, QUAD_BYTES, store_tile, unpack_tail

#: Tokens per tile.
MR = 6
#: Quads of columns per pass of every token over a block: 64 rows x 32 quads, 8 KiB of codes, in L1 beside 128
#: tokens' offset codes for those columns (16 KiB).
KC = 32
_LANES = 16
_VI = ir.VectorType(ir.IntType(32), _LANES)
_I64 = ir.IntType(64)


@intrinsic
def _tile(typingctx, xu, m0, rows, wp, blk, q0, nq, out, pf):
    """``out[m0 + i, 16 j + l] += sum_k xu[m0 + i, k] * int8(wp[blk, k // 4, 64 j + 4 l + k % 4])`` (int32, wrapping)
    for ``i < rows`` (a literal, 1 to ``MR``), over the ``nq`` quads from ``q0``.

    ``xu`` uint8 (M, Kp): ``x + 128``; ``wp`` uint8 (B, Kp / 4, 256); ``out``
    int32 (M, 64), C-contiguous. ``pf`` (a literal): 1 prefetches, per line read,
    the line ``PREFETCH_AHEAD`` on into L2; 0 not.
    """
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(pf, types.IntegerLiteral)
            and isinstance(xu, types.Array) and xu.dtype == types.uint8
            and xu.layout == "C" and isinstance(wp, types.Array) and wp.dtype == types.uint8 and wp.layout == "C"
            and isinstance(out, types.Array) and out.dtype == types.int32 and out.layout == "C"):
        return None
    n_rows = rows.literal_value
    prefetch = pf.literal_value != 0

    def codegen(context, builder, signature, args):
        xu_t, m0_t, _, wp_t, blk_t, q0_t, nq_t, out_t, _ = signature.args
        x_ary = context.make_array(xu_t)(context, builder, args[0])
        w_ary = context.make_array(wp_t)(context, builder, args[3])
        o_ary = context.make_array(out_t)(context, builder, args[7])
        q0_ = context.cast(builder, args[5], q0_t, types.int64)
        nq_ = context.cast(builder, args[6], nq_t, types.int64)
        k_pad = cgutils.unpack_tuple(builder, x_ary.shape)[1]
        n_quads = cgutils.unpack_tuple(builder, w_ary.shape)[1]
        m0_ = context.cast(builder, args[1], m0_t, types.int64)
        blk_ = context.cast(builder, args[4], blk_t, types.int64)
        x_rows = [builder.gep(x_ary.data, [builder.add(builder.mul(builder.add(m0_, ir.Constant(_I64, i)), k_pad),
                                                       builder.mul(q0_, ir.Constant(_I64, 4)))])
                  for i in range(n_rows)]
        w_start = builder.gep(w_ary.data, [builder.mul(builder.add(builder.mul(blk_, n_quads), q0_),
                                                       ir.Constant(_I64, QUAD_BYTES))])
        dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VI, _VI]),
                                             "llvm.x86.avx512.vpdpbusd.512")
        def out_ptr(i, j):
            ptr = cgutils.get_item_pointer(context, builder, out_t, o_ary,
                                           [builder.add(m0_, ir.Constant(_I64, i)), context.get_constant(types.intp, 16 * j)])
            return builder.bitcast(ptr, _VI.as_pointer())

        acc = [[cgutils.alloca_once_value(builder, builder.load(out_ptr(i, j), align=4)) for j in range(4)]
               for i in range(n_rows)]
        i32 = ir.IntType(32)
        splat_mask = ir.Constant(ir.VectorType(i32, _LANES), None)
        with cgutils.for_range(builder, nq_) as loop:
            q = loop.index
            w_at = builder.gep(w_start, [builder.mul(q, ir.Constant(_I64, QUAD_BYTES))])
            wv = [builder.load(builder.bitcast(builder.gep(w_at, [ir.Constant(_I64, 64 * j)]), _VI.as_pointer()),
                               align=1) for j in range(4)]
            if prefetch:  # the line PREFETCH_AHEAD on in the layout's one stream, into L2
                for j in range(4):
                    prefetch_call(builder, builder.gep(w_at, [ir.Constant(_I64, PREFETCH_AHEAD + 64 * j)]), 2)
            for i in range(n_rows):
                word = builder.load(builder.bitcast(builder.gep(x_rows[i], [builder.mul(q, ir.Constant(_I64, 4))]),
                                                    i32.as_pointer()), align=1)
                xb = builder.shuffle_vector(builder.insert_element(ir.Constant(_VI, ir.Undefined), word,
                                                                   ir.Constant(i32, 0)),
                                            ir.Constant(_VI, ir.Undefined), splat_mask)
                for j in range(4):
                    builder.store(builder.call(dot, [builder.load(acc[i][j]), xb, wv[j]]), acc[i][j])
        for i in range(n_rows):
            for j in range(4):
                builder.store(builder.load(acc[i][j]), out_ptr(i, j), align=4)
        return context.get_dummy_value()

    return types.void(xu, m0, rows, wp, blk, q0, nq, out, pf), codegen


@njit(nogil=True, cache=True)
def gemm_vnni(xu, wp, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per):
    """``y (M, N)`` (or the int32 ``acc_out``) for offset codes ``xu`` uint8 ``(M, Kp)`` and the layout ``wp``: blocks
    of 64 rows claimed from ``work``, ``MR`` tokens a tile, results through
    :func:`~npquant.kernels._w8a8_core.store_tile` (``corr`` removes the offset)."""
    m_rows = xu.shape[0]
    n_blocks, n_quads = wp.shape[0], wp.shape[1]
    acc = np.empty((m_rows, BLOCK), np.int32)  # the block's sums, every token
    while True:
        lo, hi = _claim(work, per, n_blocks)
        if lo >= hi:
            break
        for b in range(lo, hi):
            acc[:] = 0
            for q0 in range(0, n_quads, KC):  # KC quads of the block (8 KiB) stay in L1 for every token
                nq = min(KC, n_quads - q0)
                for m0 in range(0, m_rows, MR):
                    rows = min(MR, m_rows - m0)
                    if m0 == 0:  # the first tile of a pass reads the codes from memory: it prefetches
                        if rows == 6:
                            _tile(xu, m0, 6, wp, b, q0, nq, acc, 1)
                        elif rows == 5:
                            _tile(xu, m0, 5, wp, b, q0, nq, acc, 1)
                        elif rows == 4:
                            _tile(xu, m0, 4, wp, b, q0, nq, acc, 1)
                        elif rows == 3:
                            _tile(xu, m0, 3, wp, b, q0, nq, acc, 1)
                        elif rows == 2:
                            _tile(xu, m0, 2, wp, b, q0, nq, acc, 1)
                        else:
                            _tile(xu, m0, 1, wp, b, q0, nq, acc, 1)
                    elif rows == 6:
                        _tile(xu, m0, 6, wp, b, q0, nq, acc, 0)
                    elif rows == 5:
                        _tile(xu, m0, 5, wp, b, q0, nq, acc, 0)
                    elif rows == 4:
                        _tile(xu, m0, 4, wp, b, q0, nq, acc, 0)
                    elif rows == 3:
                        _tile(xu, m0, 3, wp, b, q0, nq, acc, 0)
                    elif rows == 2:
                        _tile(xu, m0, 2, wp, b, q0, nq, acc, 0)
                    else:
                        _tile(xu, m0, 1, wp, b, q0, nq, acc, 0)
            store_tile(acc, m_rows, 0, b * BLOCK, 1, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out)


def _gemm_vnni_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemm_vnni` (xu, wp, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per)."""
    blk = carray(a, (n,))
    xu, i = _u8_2d(blk, 0)
    wp, i = _u8_3d(blk, i)
    gemm_vnni(xu, wp, *unpack_tail(blk, i))
    return 0


@functools.cache
def compile_jobs() -> None:
    """Compile :func:`gemm_vnni`'s job for OpenBLAS's threads and enter it in ``JOBS``, once.

    Raises
    ------
    NpquantError
        Where numba's target has no AVX-512 VNNI (nothing reaches LLVM then).
    """
    if not has_vnni():
        raise NpquantError("the VNNI int8 GEMM needs AVX-512 VNNI, which numba's target CPU lacks "
                           f"(features: {target_features()[:80]}...); the AVX2 or portable kernel serves there")
    JOBS[gemm_vnni] = cfunc(SIGNATURE, cache=True)(_gemm_vnni_job)
