"""The int8 GEMM's shared parts: the weight's layout, the per-token quantization pass, the portable kernel, the
epilogue and the threads (see :mod:`npquant.kernels._w8a8` for the design).

**The layout** (:func:`pack_weight`, made once): int8 codes ``wq (N, K)``,
``K`` padded with zeros to ``Kp``, a multiple of 4, and ``N`` to ``Np``, a
multiple of ``BLOCK`` (64), as uint8 ``(Np / 64, Kp / 4, 256)``: for each
block of 64 rows and each quad of columns ``4 q .. 4 q + 3``, 256 bytes,
row after row, four bytes each (``packed[b, q, 4 r + j] = wq[64 b + r, 4 q +
j]``). One 512-bit register holds 16 rows' quads, the operand of
``vpdpbusd``; 16 bytes hold 4 rows' quads, which widened to int16 are
``vpmaddwd``'s (each int32 lane a row and half a quad). With it, per row,
``corr = 128 * sum_k wq[n, k]`` (int32) for the VNNI kernel's offset ``x``.

**Exactness.** Every kernel sums ``xq[m, k] * wq[n, k]`` in int32 lanes that
wrap on overflow (``vpdpbusd``, ``vpmaddwd``, ``vpaddd``): the result is
right modulo ``2**32``, so right whenever the true sum fits int32, which
``K <= 131071`` guarantees (:data:`npquant.linear_w8a8.MAX_INT32_K`),
whatever the partial sums did on the way. The epilogue (:func:`store_tile`)
then applies the scales as :func:`npquant.linear_w8a8.scale_outputs` does:
``x_scale[m] * (w_scale[n] * float32(acc))``, then ``+ bias[n]``, each
rounded in float32 (no fastmath: no fused multiply-add, no reassociation).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from ._jobs import JOBS, _f32_1d, _f32_2d, _i64_1d, _u8_2d, _u8_3d
from ._llvm import _address_as, _claim

#: Weight rows per block of the layout (one unit of work for the threads).
BLOCK = 64
#: Bytes of one quad of columns of one block: 64 rows x 4 columns.
QUAD_BYTES = 4 * BLOCK
_FLT_MAX = np.float32(np.finfo(np.float32).max)


def pack_weight(wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(packed, corr)`` of int8 ``wq (N, K)``: uint8 ``(Np / 64, Kp / 4, 256)`` (the layout above, zeros padding)
    and int32 ``(Np,)`` ``128 * rowsum(wq)`` (0 for padding rows)."""
    n, k = wq.shape
    n_pad, k_pad = -(-n // BLOCK) * BLOCK, -(-k // 4) * 4
    w = np.zeros((n_pad, k_pad), np.int8)
    w[:n, :k] = wq
    packed = w.view(np.uint8).reshape(n_pad // BLOCK, BLOCK, k_pad // 4, 4)  # (B, 64, Q, 4)
    packed = np.ascontiguousarray(packed.transpose(0, 2, 1, 3)).reshape(n_pad // BLOCK, k_pad // 4, QUAD_BYTES)
    corr = (128 * w.astype(np.int64).sum(axis=1)).astype(np.int32)  # |128 * rowsum| <= 2**14 K: fits for K < 2**17
    return packed, corr


@njit(nogil=True, cache=True)
def quantize_x_int8(x, offset, codes_u8, codes_i16, scale, bad, work, per):
    """Per-token int8 codes of float32 ``x (M, K)`` by :func:`npquant.activations.quantize_activations_int8`'s rule,
    bit for bit, rows claimed in chunks of ``per`` from ``work``.

    ``offset``: codes ``+ 128`` into uint8 ``codes_u8 (M, Kp)`` (its padding
    columns left as they are: 128, for ``vpdpbusd``'s unsigned operand),
    else into int16 ``codes_i16 (M, Kp)`` (padding 0); the other may be a
    placeholder. ``scale`` float32 ``(M,)``. ``bad`` int64 ``(1,)`` is set
    to 1 when ``x`` holds NaN or Inf (the codes are then meaningless). Each
    row is read once from memory: its two passes (max, then codes) find it
    in L1.
    """
    m_rows, k = x.shape
    while True:
        lo, hi = _claim(work, per, m_rows)
        if lo >= hi:
            break
        for m in range(lo, hi):
            # |x| as int32 bits: for finite floats their order is the floats' (an integer max, which vectorises);
            # NaN and Inf are the patterns from 0x7F800000 up.
            bits = x[m].view(np.int32)
            top = np.int32(0)
            for j in range(k):
                top = max(top, bits[j] & np.int32(0x7FFFFFFF))
            if top >= np.int32(0x7F800000):
                bad[0] = 1
            absmax = np.array([top], np.int32).view(np.float32)[0]
            scale[m] = absmax / np.float32(127.0)
            inv = np.float32(127.0) / absmax if absmax > 0 else np.float32(0.0)
            for j in range(k):
                p = np.rint(x[m, j] * inv)
                p = np.float32(0.0) if p != p else min(max(p, np.float32(-128.0)), np.float32(127.0))  # 0 * inf: 0
                if offset:
                    codes_u8[m, j] = np.uint8(np.int32(p) + 128)
                else:
                    codes_i16[m, j] = np.int16(p)


@njit(inline="always")
def store_tile(acc, rows, m0, n0, pairs, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out):
    """Rows ``m0 .. m0 + rows - 1`` of the int32 tile ``acc (MR, 64 * pairs)`` (``pairs`` 2: two lanes per output
    row, summed here) for weight rows ``n0 .. n0 + 63``, minus ``corr[n]``, into ``acc_out`` (``want_acc``) or
    scaled into ``y``: ``x_scale[m] * (w_scale[n] * float32(acc))`` (+ ``bias[n]``), each step rounded in float32."""
    n_out = y.shape[1] if not want_acc else acc_out.shape[1]
    width = min(BLOCK, n_out - n0)
    if pairs == 1 and not want_acc:  # the common case, a loop of its own: SIMD lanes across the row
        cs = corr[n0 : n0 + width]
        ws = w_scale[n0 : n0 + width]
        bs = bias[n0 : n0 + width] if has_bias else ws
        for i in range(rows):
            xs = x_scale[m0 + i]
            ai = acc[i]
            yi = y[m0 + i, n0 : n0 + width]
            if has_bias:
                for j in range(width):
                    yi[j] = xs * (ws[j] * np.float32(np.int32(np.int64(ai[j]) - np.int64(cs[j])))) + bs[j]
            else:
                for j in range(width):
                    yi[j] = xs * (ws[j] * np.float32(np.int32(np.int64(ai[j]) - np.int64(cs[j]))))
        return
    for i in range(rows):
        m = m0 + i
        xs = x_scale[m]
        for j in range(width):
            n = n0 + j
            a = np.int64(acc[i, j]) if pairs == 1 else np.int64(acc[i, 2 * j]) + np.int64(acc[i, 2 * j + 1])
            exact = np.int32(a - np.int64(corr[n]))  # wraps as the lanes did: right when the true sum fits
            if want_acc:
                acc_out[m, n] = exact
            else:
                v = xs * (w_scale[n] * np.float32(exact))
                if has_bias:
                    v = v + bias[n]
                y[m, n] = v


@njit(nogil=True, cache=True)
def gemm_portable(xi, wp, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per):
    """int8 GEMM without SIMD intrinsics: int16 codes ``xi (M, Kp)`` against the layout ``wp``, blocks of 64 rows
    claimed from ``work``; results through :func:`store_tile` (``corr`` zeros: ``x`` is not offset here)."""
    m_rows = xi.shape[0]
    n_blocks, n_quads = wp.shape[0], wp.shape[1]
    w8 = wp.view(np.int8)
    acc = np.empty((1, BLOCK), np.int32)
    while True:
        lo, hi = _claim(work, per, n_blocks)
        if lo >= hi:
            break
        for b in range(lo, hi):
            for m in range(m_rows):
                acc64 = np.zeros(BLOCK, np.int64)
                for q in range(n_quads):
                    x0, x1 = np.int64(xi[m, 4 * q]), np.int64(xi[m, 4 * q + 1])
                    x2, x3 = np.int64(xi[m, 4 * q + 2]), np.int64(xi[m, 4 * q + 3])
                    for r in range(BLOCK):
                        acc64[r] += (w8[b, q, 4 * r] * x0 + w8[b, q, 4 * r + 1] * x1 + w8[b, q, 4 * r + 2] * x2
                                     + w8[b, q, 4 * r + 3] * x3)
                for r in range(BLOCK):
                    acc[0, r] = np.int32(acc64[r])
                store_tile(acc, 1, m, b * BLOCK, 1, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out)


# --- job twins: the kernels' arguments read back from OpenBLAS's job block (see npquant.kernels._jobs) -----------


@njit(inline="always")
def _i16_2d(blk, i):
    return carray(_address_as(blk[i], np.int16), (blk[i + 1], blk[i + 2])), i + 3


@njit(inline="always")
def _i32_1d(blk, i):
    return carray(_address_as(blk[i], np.int32), (blk[i + 1],)), i + 2


@njit(inline="always")
def _i32_2d(blk, i):
    return carray(_address_as(blk[i], np.int32), (blk[i + 1], blk[i + 2])), i + 3


@njit(inline="always")
def unpack_tail(blk, i):
    """``(corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per)`` from the job block at ``i``."""
    corr, i = _i32_1d(blk, i)
    x_scale, i = _f32_1d(blk, i)
    w_scale, i = _f32_1d(blk, i)
    bias, i = _f32_1d(blk, i)
    has_bias = blk[i] != 0
    y, i = _f32_2d(blk, i + 1)
    want_acc = blk[i] != 0
    acc_out, i = _i32_2d(blk, i + 1)
    work, i = _i64_1d(blk, i)
    return corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, blk[i]


def _quantize_x_int8_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`quantize_x_int8` (x, offset, codes_u8, codes_i16, scale, bad, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    offset = blk[i] != 0
    codes_u8, i = _u8_2d(blk, i + 1)
    codes_i16, i = _i16_2d(blk, i)
    scale, i = _f32_1d(blk, i)
    bad, i = _i64_1d(blk, i)
    work, i = _i64_1d(blk, i)
    quantize_x_int8(x, offset, codes_u8, codes_i16, scale, bad, work, blk[i])
    return 0


def _gemm_portable_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemm_portable` (xi, wp, corr, x_scale, w_scale, bias, has_bias, y, want_acc, acc_out, work, per)."""
    blk = carray(a, (n,))
    xi, i = _i16_2d(blk, 0)
    wp, i = _u8_3d(blk, i)
    gemm_portable(xi, wp, *unpack_tail(blk, i))
    return 0


#: Compiled at their kernels' first call on OpenBLAS's threads, the kernel first (see _jobs.job_address)
JOBS.update({gemm_portable: _gemm_portable_job, quantize_x_int8: _quantize_x_int8_job})
