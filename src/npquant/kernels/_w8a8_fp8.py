"""The W8A8 fp8 GEMM: e4m3 activation codes per token times e4m3 weight codes per output row, exact, in float64.

The CPUs npquant compiles for have no fp8 multiply. But every e4m3 value is an integer
times ``2**-9`` of at most 18 bits, so each product of two is exact in
float64, and so is every partial sum of up to ``2**17`` of them
(:mod:`npquant.linear_w8a8`'s docstring): summed in float64 in *any*
order, with or without fused multiply-adds, the sum is the exact one. So
these kernels reassociate freely (vector lanes, BLAS's blocking) and still
give the numpy reference's bits (:func:`npquant.linear_w8a8.fp8_dot`);
the epilogue is the reference's own :func:`~npquant.linear_w8a8.scale_outputs`.

Codes are decoded through float16's bits
(:func:`~npquant.kernels._decode._e4m3_as_f16`: the value over ``2**8``,
exact, three integer operations), so the sums come out ``2**16`` times too
small, which one exact multiplication restores.

Two regimes (:func:`fp8_linear`):

- up to :data:`DOT_MAX_M` tokens, :func:`fp8_sums`: each thread takes
  rows of the weight; ``_KC`` codes of a row at a time are decoded into a
  float64 buffer in L1, and every token's dot product with them is summed,
  two tokens per pass over the buffer. The weight is read once, one byte
  an element.
- more tokens: tiles of rows decoded to float64 (:func:`decode_rows`) and
  multiplied by BLAS (``dgemm``, exact too for the same reason), as the
  weight-only kernels' large-batch path does in float32.

float64 has half float32's lanes: 11008 x 4096, each call after a float32
matmul (``benchmarks/bench_linear.py``), 1.36, 1.04 and 2.98 of float32's
time at batches 1, 8 and 128 (one thread decodes and sums 45 M codes in
11 ms at batch 1: the decode, not the memory, bounds it).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from ._decode import _e4m3_as_f16
from ._jobs import JOBS, _f64_2d, _i64_1d, _u8_2d
from ._llvm import _claim

#: Tokens up to which :func:`fp8_sums` runs; more take decoded tiles and BLAS.
DOT_MAX_M = 16
#: Codes of a weight row decoded at a time: 4 KiB of float64, in L1 beside two tokens' columns.
_KC = 512
#: float64 elements of one decoded tile of the large-batch path (8 MiB).
TILE_ELEMENTS = 1 << 20
#: The decoded values are the codes' values over 2**8; a product over 2**16.
UNSCALE = 65536.0
# Reassociation (vector lanes) and contraction only: every sum is exact either way. Not "nsz": a sum of
# zeros keeps the reference's sign.
_FAST = {"reassoc", "contract"}


@njit(nogil=True, cache=True, fastmath=_FAST)
def fp8_sums(xd, codes, acc, work, per):
    """``acc (M, N) = xd (M, K) @ decode(codes (N, K)).T`` in float64, exact (the module docstring): ``xd`` the
    tokens' codes decoded as :func:`_e4m3_as_f16` does, ``codes`` uint8 e4m3 bytes; rows of ``codes`` claimed in
    chunks of ``per`` from ``work``."""
    m_rows, k = xd.shape
    n = codes.shape[0]
    buf = np.empty(_KC, np.float64)
    while True:
        lo, hi = _claim(work, per, n)
        if lo >= hi:
            break
        for r in range(lo, hi):
            row = codes[r]
            for m in range(m_rows):
                acc[m, r] = 0.0
            for k0 in range(0, k, _KC):
                kc = min(_KC, k - k0)
                src = row[k0 : k0 + kc]  # a slice: indices from 0 (numba then reads the bytes as one vector)
                for j in range(kc):
                    buf[j] = np.float64(_e4m3_as_f16(src[j]))
                for m in range(0, m_rows - 1, 2):
                    xa = xd[m, k0 : k0 + kc]
                    xb = xd[m + 1, k0 : k0 + kc]
                    sa = 0.0
                    sb = 0.0
                    for j in range(kc):
                        sa += xa[j] * buf[j]
                        sb += xb[j] * buf[j]
                    acc[m, r] += sa
                    acc[m + 1, r] += sb
                if m_rows % 2:
                    xa = xd[m_rows - 1, k0 : k0 + kc]
                    sa = 0.0
                    for j in range(kc):
                        sa += xa[j] * buf[j]
                    acc[m_rows - 1, r] += sa


@njit(nogil=True, cache=True)
def decode_rows(codes, r0, out, work, per):
    """``out (T, K)`` float64 = rows ``r0 .. r0 + T`` of e4m3 ``codes (N, K)`` (uint8) decoded as
    :func:`_e4m3_as_f16` does; rows of ``out`` claimed in chunks of ``per`` from ``work``."""
    t, k = out.shape
    while True:
        lo, hi = _claim(work, per, t)
        if lo >= hi:
            break
        for i in range(lo, hi):
            src = codes[r0 + i]
            dst = out[i]
            for j in range(k):
                dst[j] = np.float64(_e4m3_as_f16(src[j]))


def decode_x(codes: np.ndarray) -> np.ndarray:
    """float64 ``(M, K)`` of e4m3 ``codes (M, K)`` (uint8, C-contiguous), decoded as :func:`_e4m3_as_f16` does
    (:func:`decode_rows` on this thread)."""
    out = np.empty(codes.shape, np.float64)
    decode_rows(codes, 0, out, np.zeros(1, np.int64), max(1, codes.shape[0]))
    return out


def fp8_sums_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`fp8_sums` (xd, codes, acc, work, per)."""
    blk = carray(a, (n,))
    xd, i = _f64_2d(blk, 0)
    codes, i = _u8_2d(blk, i)
    acc, i = _f64_2d(blk, i)
    work, i = _i64_1d(blk, i)
    fp8_sums(xd, codes, acc, work, blk[i])
    return 0


def decode_rows_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`decode_rows` (codes, r0, out, work, per)."""
    blk = carray(a, (n,))
    codes, i = _u8_2d(blk, 0)
    r0 = blk[i]
    out, i = _f64_2d(blk, i + 1)
    work, i = _i64_1d(blk, i)
    decode_rows(codes, r0, out, work, blk[i])
    return 0


JOBS.update({fp8_sums: fp8_sums_job, decode_rows: decode_rows_job})
