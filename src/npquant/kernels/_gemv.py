"""Batch-1 kernels: ``y (1, O) = x @ W.T`` reading each code once."""

import numpy as np
from numba import njit

from ._decode import _FASTMATH, _block_scales, _FP4_UNSCALE, _I32, _LANE_ROWS, _ROWS, _SIXTEENTH, _U8_15, _U8_4, _U8_88, _e4m3_as_f16, _e4m3_as_f32_bits, _e5m2_as_f16, _int8_as_f32, _fp4_high_as_f16, _fp4_low_as_f16, _high_nibble_x16, _low_nibble_x16
from ._llvm import AHEAD_COLUMNS, PREFETCH_AHEAD, PREFETCH_FROM, _claim, _prefetch, _prefetch_l2, _stack_empty

# Columns of a step of gemv_bytes: before each, its eight rows' lines a pass ahead are asked for into L2 (64
# prefetches), and its float32 sums are reduced across SIMD lanes (8 reductions per 4 KiB of codes). Codes from
# PREFETCH_FROM bytes on take those steps; smaller ones read all columns of a block in one loop, unprefetched.
_SUB_BLOCK = 512


_NO_SUMS = (np.float32(0.0),) * 8


@njit(inline="always")
def _x_as_is(xs, k, xm):
    return xs[k]


@njit(inline="always")
def _x_scaled(xs, k, xm):
    return xs[k] * xm


@njit(inline="always", fastmath=_FASTMATH)
def _eight_dots(decode, x_at, xs, xm, a, t):
    """``t[j] + sum_k x_at(xs, k, xm) * decode(a[j][k])`` for the eight rows ``a`` (uint8, each as long as ``xs``).

    One loop per code kind and ``x`` multiplier (``decode`` and ``x_at``
    passed in: each pair compiled on its own), eight independent float32
    sums per load of ``x``.
    """
    t0, t1, t2, t3, t4, t5, t6, t7 = t
    a0, a1, a2, a3, a4, a5, a6, a7 = a
    for k in range(xs.shape[0]):
        xv = x_at(xs, k, xm)
        t0 += xv * decode(a0[k])
        t1 += xv * decode(a1[k])
        t2 += xv * decode(a2[k])
        t3 += xv * decode(a3[k])
        t4 += xv * decode(a4[k])
        t5 += xv * decode(a5[k])
        t6 += xv * decode(a6[k])
        t7 += xv * decode(a7[k])
    return t0, t1, t2, t3, t4, t5, t6, t7


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_bytes(x, codes, scale, bo, bi, code_kind, e4m3_mults, y, work, per):
    """``y (1, O) = x @ W_hat.T`` for one-byte codes, eight rows per pass over ``x``.

    ``code_kind``: 0 symmetric int8, 1 fp8 e4m3, 2 fp8 e5m2, decoded in
    registers. Eight independent accumulators per load of ``x`` keep the
    FMA units and the memory streams busy (measured for int8: 4 rows 1.96
    ms, 8 rows 1.60 ms for 11008 x 4096 on 2 cores; also measured, each
    call after a float32 matmul: 16 rows no faster; one or two rows at a
    time, rows started at staggered columns, and software prefetch into L1
    within the rows or of the next rows' first lines 5-50% slower; the
    codes' address modulo 64 made no difference). Rows past the end repeat
    the last row and are not stored.

    Every ``_SUB_BLOCK`` columns, the lines ``PREFETCH_AHEAD`` bytes on from
    the eight rows' next ones are asked for into L2 (``prefetcht1``): for
    4096 columns, the same lines of the next pass's rows. Eight 4 KiB rows
    are eight short streams, each on a page of its own, that the hardware
    prefetcher starts late; asked for a pass ahead, they come in at the
    pace of one stream. Into L2, not L1: there they would push out ``x``.
    Measured in one process, the previous kernel and this one alternating
    through :func:`npquant.linear`, each call after a float32 matmul of
    another 11008 x 4096 matrix (medians of 60): fp8-channel 11008 x 4096
    2.24 -> 1.85 and 2.14 -> 1.77 ms, fp8-block 2.43 -> 2.26 ms, 5504 x
    8192 2.00 -> 1.88 ms; 4096 x 4096 no faster nor slower (0.99-1.08x,
    three runs). Steps of 1024 or 2048 columns (bursts of 128 or 256
    prefetches) were 5% slower than no prefetching. With its codes in
    cache, prefetching cost 12-25% (512 x 4096, one thread), so codes
    under ``PREFETCH_FROM`` bytes are read as before, each block of
    columns in one loop.

    e4m3 decodes to its value times a power of two that ``x`` and ``y``
    take back. ``e4m3_mults`` float32 (6,) holds ``x``'s and ``y``'s
    multipliers for the float32-bits decode (value * 2**-120, four vector
    ops per 16 weights), then for the float16 decode (value * 2**-8, five),
    then a float32 subnormal and 2**100. Each thread takes the float16
    decode when its floating-point unit flushes subnormal inputs to zero
    (their product is then 0; a 0 in place of the subnormal forces that
    decode): e4m3's subnormal codes decode to float32 subnormals, while the
    half-to-float conversion ignores that mode. Measured for 11008 x 4096
    fp8-channel, codes from memory: 1.75 -> 1.52 ms.
    """
    in_features = x.shape[1]
    out_features = y.shape[1]
    xs_all = x[0]
    n_col_blocks = in_features // bi
    last = out_features - 1
    n_units = (out_features + 7) // 8
    far = codes.size >= PREFETCH_FROM  # else the codes are likely in cache, where prefetching only costs
    sub = min(_SUB_BLOCK, bi) if far else bi
    flat = codes.reshape(-1)
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            o = blk * 8
            r = (o, min(o + 1, last), min(o + 2, last), min(o + 3, last),
                 min(o + 4, last), min(o + 5, last), min(o + 6, last), min(o + 7, last))
            acc = np.zeros(8, np.float32)
            # Does this thread keep subnormal inputs? Two values loaded at run time: nothing to fold.
            f32_bits = e4m3_mults[4] * e4m3_mults[5] != np.float32(0.0)
            xm = e4m3_mults[0] if f32_bits else e4m3_mults[2]
            ym = e4m3_mults[1] if f32_bits else e4m3_mults[3]
            for g in range(n_col_blocks):
                t = _NO_SUMS
                for k0 in range(g * bi, (g + 1) * bi, sub):
                    k1 = min(k0 + sub, (g + 1) * bi)
                    if far:
                        ahead = o * in_features + k0 + PREFETCH_AHEAD  # these lines a pass later, into L2
                        for q in range(0, 8 * in_features, in_features):
                            for c in range(0, k1 - k0, 64):
                                _prefetch_l2(flat, ahead + q + c)
                    xs = xs_all[k0:k1]
                    a = (codes[r[0], k0:k1], codes[r[1], k0:k1], codes[r[2], k0:k1], codes[r[3], k0:k1],
                         codes[r[4], k0:k1], codes[r[5], k0:k1], codes[r[6], k0:k1], codes[r[7], k0:k1])
                    if code_kind == 0:
                        t = _eight_dots(_int8_as_f32, _x_as_is, xs, xm, a, t)
                    elif code_kind == 1 and f32_bits:
                        t = _eight_dots(_e4m3_as_f32_bits, _x_scaled, xs, xm, a, t)
                    elif code_kind == 1:
                        t = _eight_dots(_e4m3_as_f16, _x_scaled, xs, xm, a, t)
                    else:
                        t = _eight_dots(_e5m2_as_f16, _x_as_is, xs, xm, a, t)
                for j in range(8):
                    acc[j] += scale[r[j] // bo, g] * t[j]
            if code_kind != 1:
                ym = np.float32(1.0)
            for j in range(min(8, out_features - o)):
                y[0, o + j] = acc[j] * ym


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_int4(x_even, x_odd, codes, scale, zp, has_zp, bo, bi, base_off, y, work, per):
    """``y (1, O) = x @ W.T`` for 4-bit packed codes with byte-aligned blocks.

    ``bi`` is even. ``x_even``/``x_odd`` ``(I / 2,)`` hold x's even and odd
    columns, so byte ``j``'s low and high codes meet them at unit stride.
    Symmetric codes (stored ``q + 8``, ``base_off`` 8) are decoded with
    integer ops only: XOR with 0x88 turns both nibbles into two's
    complement ``q``, and a byte shift and a mask make ``16 q`` (measured
    for 11008 x 4096: ~10% faster than subtracting 8 in float32; vector
    ops, not memory, bound this kernel). What remains is a horizontal sum
    per row and block of columns; :func:`gemv_int4_blocks` has none.
    """
    out_features = y.shape[1]
    n_col_blocks = scale.shape[1]
    half_block = bi // 2
    n_units = out_features
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for o in range(u_lo, u_hi):
            row = codes[o]
            so = o // bo
            acc = np.float32(0.0)
            for g in range(n_col_blocks):
                j0 = g * half_block
                src = row[j0 : j0 + half_block]
                xe = x_even[j0 : j0 + half_block]
                xo = x_odd[j0 : j0 + half_block]
                t = np.float32(0.0)
                if has_zp:
                    z = np.float32(base_off) + np.float32(zp[so, g])
                    for k in range(half_block):
                        b = src[k]
                        t += xe[k] * (np.float32(np.uint8(b & _U8_15)) - z) + xo[k] * (np.float32(np.uint8(b >> _U8_4)) - z)
                else:
                    for k in range(half_block):
                        c = np.uint8(src[k] ^ _U8_88)  # stored q + 8 -> two's complement q, both nibbles
                        t += xe[k] * np.float32(_low_nibble_x16(c)) + xo[k] * np.float32(_high_nibble_x16(c))
                    t *= _SIXTEENTH
                acc += scale[so, g] * t
            y[0, o] = acc


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_int4_blocks(x_even, x_odd, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, y_mult, y,
                     work, per):
    """``y (1, O) = x @ W.T`` for 4-bit codes in blocks of rows: int (``zp`` when ``has_zp``) or fp4 e2m1.

    ``x_even``/``x_odd`` ``(I / 2,)`` hold x's even and odd columns;
    ``half_block`` is the bytes per block of columns (``bi / 2``). Each
    output row accumulates ``x . (q - z)`` over a block of columns in its
    own lane (``t``), then adds ``scale * t``: the same products and
    rounding as the checkpoint-layout kernels. Padding rows are not stored.
    fp4 (NVFP4, MXFP4) decodes through float16 (:func:`_fp4_low_as_f16`):
    the block sums are 2**-14 times the true ones, taken back exactly
    before the scale; its scales are one-byte codes, ``scale_codes`` uint8
    (B, G, R), whose values ``scale_table`` float32 (256,) holds (``scale``
    is then not read, and ``scale_codes`` not otherwise). Every output is
    multiplied by ``y_mult`` (NVFP4: one over the global scale; else 1).

    Each byte position asks for the line ``AHEAD_COLUMNS`` positions on
    (4 KiB): the 64 lanes of sums fill the out-of-order window with
    dependent work, so without it too few loads run ahead. Measured on AVX2
    (numba targeting Zen 2), 11008 x 4096 w4-g128 from memory, each call
    after a float32 matmul: 2.1-2.2 -> 1.68-1.74 ms (1.4 ms in cache).

    Symmetric int codes go over each block of columns in passes of
    ``_LANE_ROWS`` lanes: one pass where AVX-512 is, two of 32 lanes on
    AVX2, whose 16 registers did not hold 64 lanes of sums beside the two
    nibbles' decodes and spilled. Measured (AVX2 build, the same weight,
    six copies in turn, each call after a float32 matmul, processes
    alternating): 1.69-1.72 -> 1.58-1.65 ms, 1.30-1.32 -> 1.21-1.24 ms in
    cache; 16-lane passes did not vectorise (8 ms).
    """
    n_blocks = codes.shape[0]  # codes (B, I / 2, _ROWS): PreparedTensor checks the last dimension
    rows = _ROWS  # a compile-time constant: LLVM unrolls the lanes loops and keeps t in registers
    n_col_blocks = scale_codes.shape[1] if fp4 else scale.shape[1]
    out_features = y.shape[1]
    n_units = n_blocks
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            acc = _stack_empty(1, _ROWS, np.float32)[0]
            acc[:] = 0
            t = _stack_empty(1, _ROWS, np.float32)[0]
            zi = _stack_empty(1, _ROWS, np.int32)[0]
            sc = _stack_empty(1, _ROWS, np.float32)[0]
            for g in range(n_col_blocks):
                t[:] = 0
                j0 = g * half_block
                # Slices from 0: numba then knows indices are non-negative.
                cg = codes[blk, j0 : j0 + half_block]  # (half_block, rows)
                xe = x_even[j0 : j0 + half_block]
                xo = x_odd[j0 : j0 + half_block]
                if has_zp:
                    zg = zp[blk, g]
                    for r in range(rows):
                        zi[r] = _I32(zg[r])
                    for j in range(half_block):
                        _prefetch(codes[blk], (j0 + j + AHEAD_COLUMNS) * rows)
                        b = cg[j]
                        e = xe[j]
                        f = xo[j]
                        for r in range(rows):
                            c = _I32(b[r])
                            z = zi[r]
                            t[r] += e * np.float32(_I32(_I32(c & _I32(15)) - z)) + f * np.float32(_I32(_I32(c >> _I32(4)) - z))
                elif fp4:
                    for j in range(half_block):
                        _prefetch(codes[blk], (j0 + j + AHEAD_COLUMNS) * rows)
                        b = cg[j]
                        e = xe[j]
                        f = xo[j]
                        for r in range(rows):
                            c = b[r]
                            t[r] += e * _fp4_low_as_f16(c) + f * _fp4_high_as_f16(c)
                    for r in range(rows):
                        t[r] *= _FP4_UNSCALE
                else:
                    for h0 in range(0, rows, _LANE_ROWS):  # AVX2: two passes of 32 lanes, the second from L1
                        for j in range(half_block):
                            if h0 == 0:
                                _prefetch(codes[blk], (j0 + j + AHEAD_COLUMNS) * rows)
                            b = cg[j]
                            e = xe[j]
                            f = xo[j]
                            for r in range(h0, h0 + _LANE_ROWS):
                                c = b[r]
                                t[r] += e * np.float32(_low_nibble_x16(c)) + f * np.float32(_high_nibble_x16(c))
                    for r in range(rows):
                        t[r] *= _SIXTEENTH
                _block_scales(scale, scale_codes, scale_table, fp4, blk, g, sc)
                for r in range(rows):
                    acc[r] += sc[r] * t[r]
            o0 = blk * rows
            for r in range(min(rows, out_features - o0)):
                y[0, o0 + r] = acc[r] * y_mult


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_bytes_blocks(x, codes, scale, zp, code_kind, bi, e4m3_mults, y, work, per):
    """``y (1, O) = x @ W.T`` for one-byte codes in blocks of rows.

    Each block's codes are read as one stream, a cache line per column
    (the line ``AHEAD_COLUMNS`` on prefetched: measured 4-30% faster from
    memory, each call alternating with a float32 matmul), and every lane
    accumulates its own row in a register: measured for
    11008 x 4096 int8, codes from memory, 1.43 ms against 1.93 ms for
    :func:`gemv_bytes` over the checkpoint layout. e4m3 as in
    :func:`gemv_bytes` (``e4m3_mults``); ``zp`` is read for
    ``code_kind`` 3 only. Padding rows are not stored.
    """
    n_blocks = codes.shape[0]
    n_col_blocks = scale.shape[1]
    out_features = y.shape[1]
    xs = x[0]
    n_units = n_blocks
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            acc = _stack_empty(1, _ROWS, np.float32)[0]
            acc[:] = 0
            t = _stack_empty(1, _ROWS, np.float32)[0]
            zi = _stack_empty(1, _ROWS, np.int32)[0]
            # Does this thread keep subnormal inputs? Two values loaded at run time: nothing to fold.
            f32_bits = e4m3_mults[4] * e4m3_mults[5] != np.float32(0.0)
            xm = e4m3_mults[0] if f32_bits else e4m3_mults[2]
            ym = e4m3_mults[1] if f32_bits else e4m3_mults[3]
            for g in range(n_col_blocks):
                t[:] = 0
                c0 = g * bi
                cg = codes[blk, c0 : c0 + bi]  # (bi, R)
                xg = xs[c0 : c0 + bi]
                if code_kind == 0:
                    for k in range(bi):
                        _prefetch(codes[blk], (c0 + k + AHEAD_COLUMNS) * _ROWS)
                        b = cg[k]
                        e = xg[k]
                        for r in range(_ROWS):
                            t[r] += e * np.float32(np.int8(b[r]))
                elif code_kind == 1 and f32_bits:
                    for k in range(bi):
                        _prefetch(codes[blk], (c0 + k + AHEAD_COLUMNS) * _ROWS)
                        b = cg[k]
                        e = xg[k] * xm
                        for r in range(_ROWS):
                            t[r] += e * _e4m3_as_f32_bits(b[r])
                elif code_kind == 1:
                    for k in range(bi):
                        _prefetch(codes[blk], (c0 + k + AHEAD_COLUMNS) * _ROWS)
                        b = cg[k]
                        e = xg[k] * xm
                        for r in range(_ROWS):
                            t[r] += e * _e4m3_as_f16(b[r])
                elif code_kind == 2:
                    for k in range(bi):
                        _prefetch(codes[blk], (c0 + k + AHEAD_COLUMNS) * _ROWS)
                        b = cg[k]
                        e = xg[k]
                        for r in range(_ROWS):
                            t[r] += e * _e5m2_as_f16(b[r])
                else:
                    zg = zp[blk, g]
                    for r in range(_ROWS):
                        zi[r] = _I32(zg[r])
                    for k in range(bi):
                        _prefetch(codes[blk], (c0 + k + AHEAD_COLUMNS) * _ROWS)
                        b = cg[k]
                        e = xg[k]
                        for r in range(_ROWS):
                            t[r] += e * np.float32(_I32(_I32(b[r]) - zi[r]))
                sc = scale[blk, g]
                for r in range(_ROWS):
                    acc[r] += sc[r] * t[r]
            if code_kind != 1:
                ym = np.float32(1.0)
            o0 = blk * _ROWS
            for r in range(min(_ROWS, out_features - o0)):
                y[0, o0 + r] = acc[r] * ym
