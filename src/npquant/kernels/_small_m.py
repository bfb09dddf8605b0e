"""Small-batch kernels: ``y (M, O) = x @ W.T`` for ``M`` up to ``kernels.small_m(t)``, each code decoded once
into L1."""

import numpy as np
from numba import njit

from ._decode import (_block_scales, _CHUNK, _decode, _decode_lanes, _FASTMATH, _fp4_high_as_f16, _fp4_low_as_f16,
                      _FP4_UNSCALE, _high_nibble_x16, _I32, _KCHUNK, _KCHUNK4, _LANE_ROWS, _low_nibble_x16, _ROWS,
                      _SIXTEENTH)
from ._llvm import AHEAD_COLUMNS, PREFETCH_FROM, _claim, _prefetch, _stack_empty

_ONE = np.float32(1.0)  # a compile-time 1: LLVM drops the multiply by it


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemm_small_m(x, codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, y, work, per):
    """``y (M, O) = x (M, I) @ W.T`` for small M: each code is read and decoded once.

    Work in quads of output rows. Each chunk of the four weight rows is
    dequantized into float32 buffers in L1, then rows of ``x`` are dotted with
    all four, two rows of ``x`` at a time (six loads feed eight products).
    ``scale`` float32 and ``zp`` uint8 are ``(O // bo, I // bi)`` (``zp``
    unused unless ``has_zp``).
    """
    m_rows, in_features = x.shape
    out_features = y.shape[1]
    last = out_features - 1
    n_units = (out_features + 3) // 4
    prefetch = codes.size >= PREFETCH_FROM
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for quad in range(u_lo, u_hi):
            bufs = np.empty((4, _CHUNK), np.float32)
            acc = np.zeros((m_rows, 4), np.float32)
            o = quad * 4
            rows = (o, min(o + 1, last), min(o + 2, last), min(o + 3, last))  # past the end: repeat, not stored
            for g in range(in_features // bi):
                end = (g + 1) * bi
                for c0 in range(g * bi, end, _CHUNK):
                    n = min(_CHUNK, end - c0)
                    if prefetch:  # the same columns of the next quad's rows, read a quad from now
                        for j in range(4):
                            nxt = codes[min(o + 4 + j, last)]
                            for c in range(c0 * bits // 8, (c0 + n) * bits // 8, 64):
                                _prefetch(nxt, c)
                    for j in range(4):
                        z = np.float32(base_off)
                        if has_zp:
                            z += np.float32(zp[rows[j] // bo, g])
                        s = scale[rows[j] // bo, g]
                        _decode(kind, codes[rows[j]], c0, n, z, s, bits, fp8_e4m3, fp8_mult, bufs[j])
                    b0 = bufs[0, :n]
                    b1 = bufs[1, :n]
                    b2 = bufs[2, :n]
                    b3 = bufs[3, :n]
                    # Two rows of x at a time: six loads feed eight products.
                    for m in range(0, m_rows - 1, 2):
                        xa = x[m, c0 : c0 + n]
                        xb = x[m + 1, c0 : c0 + n]
                        a0 = a1 = a2 = a3 = np.float32(0.0)
                        d0 = d1 = d2 = d3 = np.float32(0.0)
                        for k in range(n):
                            u = xa[k]
                            v = xb[k]
                            a0 += u * b0[k]
                            a1 += u * b1[k]
                            a2 += u * b2[k]
                            a3 += u * b3[k]
                            d0 += v * b0[k]
                            d1 += v * b1[k]
                            d2 += v * b2[k]
                            d3 += v * b3[k]
                        acc[m, 0] += a0
                        acc[m, 1] += a1
                        acc[m, 2] += a2
                        acc[m, 3] += a3
                        acc[m + 1, 0] += d0
                        acc[m + 1, 1] += d1
                        acc[m + 1, 2] += d2
                        acc[m + 1, 3] += d3
                    if m_rows % 2:
                        m = m_rows - 1
                        xs = x[m, c0 : c0 + n]
                        t0 = t1 = t2 = t3 = np.float32(0.0)
                        for k in range(n):
                            xv = xs[k]
                            t0 += xv * b0[k]
                            t1 += xv * b1[k]
                            t2 += xv * b2[k]
                            t3 += xv * b3[k]
                        acc[m, 0] += t0
                        acc[m, 1] += t1
                        acc[m, 2] += t2
                        acc[m, 3] += t3
            for j in range(min(4, out_features - o)):
                for m in range(m_rows):
                    y[m, o + j] = acc[m, j]


@njit(inline="always", fastmath=_FASTMATH)
def _add_pair_sums(acc, m, m1, sc, t, k):
    """``acc[m] += sc * (k * t[0])`` and ``acc[m1] += sc * (k * t[1])``, the second unless ``m1 == m`` (an odd last
    row). ``k`` a power of two that takes the decode's own factor back out of the sums, exactly (1: none)."""
    a0 = acc[m]
    t0 = t[0]
    for r in range(_ROWS):
        a0[r] += sc[r] * (t0[r] * k)
    if m1 != m:
        a1 = acc[m1]
        t1 = t[1]
        for r in range(_ROWS):
            a1[r] += sc[r] * (t1[r] * k)


@njit(inline="always")
def _store_block(acc, o0, y):
    """``y[:, o0 : o0 + R] = acc (M, R)``, leaving out the padding rows past ``y``'s end."""
    for m in range(acc.shape[0]):
        for r in range(min(_ROWS, y.shape[1] - o0)):
            y[m, o0 + r] = acc[m, r]


@njit(inline="always", fastmath=_FASTMATH)
def _pairs_against_block(x, c0, n, buf, t, acc, sc, k):
    """Every row of ``x (M, I)``, two at a time, against the ``n`` decoded columns ``buf[:n]`` of a block
    (columns ``c0 ..`` of ``x``): the sums in registers (eight vectors of lanes), then ``acc += sc * k * sums``."""
    m_rows = x.shape[0]
    for m in range(0, m_rows, 2):
        m1 = min(m + 1, m_rows - 1)  # an odd last row pairs with itself, stored once
        t0 = t[0]
        t1 = t[1]
        t0[:] = 0
        t1[:] = 0
        xa = x[m, c0 : c0 + n]
        xb = x[m1, c0 : c0 + n]
        for h0 in range(0, _ROWS, _LANE_ROWS):
            for kk in range(n):
                e = xa[kk]
                f = xb[kk]
                bk = buf[kk]
                for r in range(h0, h0 + _LANE_ROWS):
                    t0[r] += e * bk[r]
                    t1[r] += f * bk[r]
        _add_pair_sums(acc, m, m1, sc, t, k)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemm_small_m_int4_blocks(x, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, y, work, per):
    """``y (M, O) = x (M, I) @ W.T`` for small M and 4-bit codes in blocks of rows: int (``zp`` when ``has_zp``) or
    fp4 e2m1.

    ``_KCHUNK4`` byte positions of a block are decoded at a time into one
    buffer in L1, in column order (byte ``j``'s low nibble is column
    ``2 j``, its high nibble ``2 j + 1``: ``q - z`` or the fp4 value,
    exact; symmetric ints 16 times ``q``, the nibble left where it lies in
    the byte, one shift fewer, taken back out of each chunk's sums by
    ``k`` = 1/16), then two rows of ``x`` at a time accumulate against it
    in registers, as :func:`gemm_small_m_bytes_blocks` does. Measured on
    an AMD EPYC (Zen 3, AVX2), one thread, codes in cache, against the
    kernel this replaced (low and high nibbles in two buffers, against
    ``x``'s even and odd columns, two multiply-adds into each sum a byte):
    0.88-0.93 of its time at 8 and 12 rows (4096 x 4096 and 1536 x 384
    w4-g128; 0.85-0.87 in a first script), 0.91-0.94 with the nibbles
    decoded to ``q``. fp4 scales are one-byte codes, ``scale_codes`` uint8
    (B, G, R), whose values ``scale_table`` float32 (256,) holds (NVFP4's
    over its global scale); ``scale`` is then not read.
    """
    n_blocks = codes.shape[0]
    n_col_blocks = scale_codes.shape[1] if fp4 else scale.shape[1]
    k = _SIXTEENTH if not (fp4 or has_zp) else _ONE
    while True:
        u_lo, u_hi = _claim(work, per, n_blocks)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            acc = np.zeros((y.shape[0], _ROWS), np.float32)
            buf = _stack_empty(_KCHUNK, _ROWS, np.float32)
            t = _stack_empty(2, _ROWS, np.float32)
            sc = _stack_empty(1, _ROWS, np.float32)[0]
            for g in range(n_col_blocks):
                zg = zp[blk, g] if has_zp else zp[0, 0]
                _block_scales(scale, scale_codes, scale_table, fp4, blk, g, sc)
                for j0 in range(g * half_block, (g + 1) * half_block, _KCHUNK4):
                    n = min(_KCHUNK4, (g + 1) * half_block - j0)
                    for jj in range(n):
                        _prefetch(codes[blk], (j0 + jj + AHEAD_COLUMNS) * _ROWS)
                        b = codes[blk, j0 + jj]
                        lj = buf[2 * jj]
                        hj = buf[2 * jj + 1]
                        if fp4:
                            for r in range(_ROWS):
                                c = b[r]
                                lj[r] = _fp4_low_as_f16(c) * _FP4_UNSCALE
                                hj[r] = _fp4_high_as_f16(c) * _FP4_UNSCALE
                        elif has_zp:
                            for r in range(_ROWS):
                                c = _I32(b[r])
                                z = _I32(zg[r])
                                lj[r] = np.float32(_I32(_I32(c & _I32(15)) - z))
                                hj[r] = np.float32(_I32(_I32(c >> _I32(4)) - z))
                        else:
                            for r in range(_ROWS):
                                c = b[r]
                                lj[r] = np.float32(_low_nibble_x16(c))
                                hj[r] = np.float32(_high_nibble_x16(c))
                    _pairs_against_block(x, 2 * j0, 2 * n, buf, t, acc, sc, k)
            _store_block(acc, blk * _ROWS, y)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemm_small_m_bytes_blocks(x, codes, scale, zp, code_kind, fp8_mult, bi, y, work, per):
    """``y (M, O) = x (M, I) @ W.T`` for small M and one-byte codes in blocks of rows.

    ``_KCHUNK`` columns of a block are decoded at a time into a buffer in
    L1 (``v - z``, exact), then two rows of ``x`` at a time accumulate
    against it in registers (eight vectors of lanes), and each chunk's sums
    are scaled into ``acc``. Measured for 11008 x 4096 int8, batch 8: 6.0
    ms, where one decoded column at a time against every row of ``x``,
    accumulating in memory, took 9.1.
    """
    n_blocks = codes.shape[0]
    while True:
        u_lo, u_hi = _claim(work, per, n_blocks)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            acc = np.zeros((y.shape[0], _ROWS), np.float32)
            buf = _stack_empty(_KCHUNK, _ROWS, np.float32)
            t = _stack_empty(2, _ROWS, np.float32)
            zi = _stack_empty(1, _ROWS, np.int32)[0]
            for g in range(scale.shape[1]):
                if code_kind == 3:
                    zg = zp[blk, g]
                    for r in range(_ROWS):
                        zi[r] = _I32(zg[r])
                sc = scale[blk, g]
                for c0 in range(g * bi, (g + 1) * bi, _KCHUNK):
                    n = min(_KCHUNK, (g + 1) * bi - c0)
                    for kk in range(n):
                        _prefetch(codes[blk], (c0 + kk + AHEAD_COLUMNS) * _ROWS)
                        _decode_lanes(code_kind, codes[blk, c0 + kk], zi, fp8_mult, buf[kk])
                    _pairs_against_block(x, c0, n, buf, t, acc, sc, _ONE)
            _store_block(acc, blk * _ROWS, y)
