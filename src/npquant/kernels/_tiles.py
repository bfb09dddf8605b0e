"""Dequantization into float32 tiles for BLAS (the large-batch path), bit-equal to the numpy reference."""

import numpy as np
from numba import njit

from ._decode import (_block_scales, _decode, _e4m3_as_f16_value, _e4m3_value, _e5m2_value, _FASTMATH,
                      _fp4_nibbles, _I32, _int8_value, _offset_nibbles, _offset_value, _ROWS, _signed_nibbles,
                      _U8_15, _U8_4)
from ._llvm import _claim, _prefetch, _stack_empty
from ._vector import (_dequantize16, _transpose16, VK_E4M3, VK_E5M2, VK_FP4, VK_FP6, VK_INT2, VK_INT3, VK_INT4,
                      VK_INT5, VK_INT6, VK_INT7, VK_INT8, VK_UINT8)

# Rows ahead of the one being dequantized whose codes a tile narrower than the weight asks for (see _prefetch_piece).
_AHEAD = 8
# The prepared layout's tiles (_bytes_block_t, _int4_block_t): with each line of a block it reads, the kernel asks
# for the same column's line of the block this many on, into L1. A tile reads each block's columns as one short
# stream (128 lines at 128 columns), which the hardware prefetcher takes up too late; asked for while the block
# two before is dequantized, the lines are there when their turn comes (a line past the layout's end is only a
# hint, never read). 11008 x 4096, w8-channel prepared, each call after a float32 matmul, copies in turn, with
# and without in one process alternating (ratio to float32): batch 32 0.887 -> 0.857 (host), 0.915 -> 0.884
# (Zen 2 target), batch 128 0.981 -> 0.984 and 1.014 -> 1.012; one block on 0.924 -> 0.907 (batch 32, Zen 2
# target), four on no gain, two into L2 0.950 -> 0.926.
_BLOCKS_AHEAD = 2
_F32_INF = np.float32(np.inf)


@njit(inline="always")
def _prefetch_piece(codes, o, b0, b1):
    """Ask for bytes ``[b0, b1)`` of code row ``o`` into L1, if there is such a row.

    A tile narrower than the weight reads a few lines of each row, a row
    apart: too short a stream for the hardware prefetcher, so each row waited
    on memory. Measured with a minimal int8 loop, one thread, 11008 x 4096
    in pieces of 256 columns: 52 ns a piece, 33 with the lines of the row
    ``_AHEAD`` on asked for (into L2: no faster), 28 with codes in cache.
    The line of byte ``b1 - 1`` is asked for too: where rows do not start
    on a line, the bytes straddle one more.
    """
    if o < codes.shape[0]:
        base = o * codes.shape[1]
        for b in range(b0, b1, 64):
            _prefetch(codes, base + b)
        _prefetch(codes, base + b1 - 1)


@njit(inline="always")
def _prefetch_scales(scale, so, g0, g1):
    """Ask for scales ``[g0, g1)`` of scale row ``so`` (the first and last one's lines), if there is such a row.

    A piece of a row with blocks of 16 or 32 columns reads 32-64 bytes of
    scales a row, a scale row apart: it waited on memory as the codes did
    (:func:`_prefetch_piece`). Measured with :func:`dequantize_rows_16`,
    one thread, 11008 x 4096 in 256-column pieces: NVFP4 170 -> 100 ns a
    piece, MXFP8 96 -> 57; and w4-g32, whose scales did not start on a
    line, 90 -> 45 with the last one's line asked for too.
    """
    if so < scale.shape[0]:
        base = so * scale.shape[1]
        _prefetch(scale, base + g0)
        _prefetch(scale, base + g1 - 1)


@njit(inline="always", fastmath=_FASTMATH)
def _bytes_piece(value, row, c, zi, fp8_mult, s, dst):
    """``dst[:n] = value(row[c + k]) * s``: one-byte codes of one column block into a tile row.

    ``value`` is the code kind's decoder, passed in as in :func:`_bytes_block_t`:
    one loop per kind, where one generic decode branching on the kind took
    51 ns a 256-column int8 piece against 34 (one thread, codes in cache).
    """
    src = row[c : c + dst.shape[0]]
    for k in range(dst.shape[0]):
        dst[k] = value(src[k], zi, fp8_mult) * s


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_rows(codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, o0, k0, out, work, per):
    """``out (T, K)`` = float32 rows ``[o0, o0 + T)``, columns ``[k0, k0 + K)`` of the weight, ``(v - z) * scale``.

    Any block length and column range (:func:`dequantize_rows_16` takes blocks of whole 16 columns, faster).
    ``k0`` is even where codes are 4-bit (kinds 2 and 5). Rows taken in chunks from
    ``work`` (see :func:`npquant.kernels._llvm._claim`): every thread of the
    tiled path runs it on the same tile.
    """
    rows, width = out.shape
    k1 = k0 + width
    g0, g1 = k0 // bi, (k1 - 1) // bi + 1  # the column blocks the tile's columns cross
    code_bits = 8 if kind in (0, 1, 4) else 4 if kind in (2, 5) else bits
    p0, p1 = k0 * code_bits // 8, -(-k1 * code_bits // 8)  # the bytes of a row the tile reads
    narrow = p1 - p0 < codes.shape[1]
    n_units = rows
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for t in range(u_lo, u_hi):
            o = o0 + t
            if narrow:
                _prefetch_piece(codes, o + _AHEAD, p0, p1)
            row = codes[o]
            so = o // bo
            dst = out[t]
            for g in range(g0, g1):
                c = max(g * bi, k0)
                end = min((g + 1) * bi, k1)
                zi = _I32(base_off)
                if has_zp:
                    zi += _I32(zp[so, g])
                s = scale[so, g]
                d = dst[c - k0 : end - k0]
                if kind == 0:
                    _bytes_piece(_int8_value, row, c, zi, fp8_mult, s, d)
                elif kind == 1:
                    _bytes_piece(_offset_value, row, c, zi, fp8_mult, s, d)
                elif kind == 4 and fp8_e4m3:
                    _bytes_piece(_e4m3_value, row, c, zi, fp8_mult, s, d)
                elif kind == 4:
                    _bytes_piece(_e5m2_value, row, c, zi, fp8_mult, s, d)
                else:  # packed codes
                    _decode(kind, row, c, end - c, np.float32(zi), s, bits, fp8_e4m3, fp8_mult, d)


@njit(inline="always")
def _row16(vk, bits, coded, codes, scale_row, zp_row, has_zp, bi, base_off, fp8_mult, table, base, c0, c1, out, dst):
    """Columns ``[c0, c1)`` (multiples of 16) of the code row whose first byte is ``codes.flat[base]``, dequantized
    into ``out.flat[dst + c]``: walked 16 columns at a time, the next block's scale taken where one starts."""
    g = c0 // bi
    block_end = (g + 1) * bi  # the column where the next block starts
    zi = _I32(base_off + zp_row[g]) if has_zp else _I32(base_off)
    s = table[scale_row[g]] if coded else scale_row[g]
    for cc in range(c0, c1, 16):
        if cc == block_end:
            g += 1
            block_end += bi
            zi = _I32(base_off + zp_row[g]) if has_zp else _I32(base_off)
            s = table[scale_row[g]] if coded else scale_row[g]
        _dequantize16(vk, codes, base + (cc * bits >> 3), out, dst + cc, s, zi, fp8_mult)


_T_COLS = 256  # columns of 16 rows dequantized into a stack buffer before they are transposed (16 KiB)


@njit(inline="always")
def units16(out, transposed, weight_rows, o0):
    """The units of work of :func:`dequantize_rows_16`'s tile ``out`` (at the weight's row ``o0`` of
    ``weight_rows``): its groups of 16 rows where ``transposed`` (see :func:`tile_rows16`), else its rows."""
    return (tile_rows16(out, transposed, weight_rows, o0) + 15) // 16 if transposed else out.shape[0]


@njit(inline="always")
def tile_rows16(out, transposed, weight_rows, o0):
    """The weight's rows in :func:`dequantize_rows_16`'s tile ``out`` from row ``o0``: ``out (T, K)``'s rows, or,
    ``transposed``, as many of ``out (K, L)``'s columns as the weight has rows left (the last tile's ``L``
    is padded, see ``kernels._tiling.tiled``)."""
    return min(out.shape[1], weight_rows - o0) if transposed else out.shape[0]


@njit(inline="always")
def _rows16(vk, bits, coded, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed, o0, k0, out,
            work, per):
    """:func:`dequantize_rows_16` for one vector kind ``vk`` of ``bits``-bit codes, its scales one-byte codes where
    ``coded`` (constants where compiled).

    A unit is one row written into ``out`` where it goes, or, ``transposed``,
    16 rows written into a stack buffer ``_T_COLS`` columns at a time, each
    16 x 16 block then moved into ``out (K, L)`` transposed."""
    rows = tile_rows16(out, transposed, codes.shape[0], o0)
    width, ld = (out.shape[0], out.shape[1]) if transposed else (out.shape[1], 0)  # ld: out's row stride
    k1 = k0 + width
    g0, g1 = k0 // bi, (k1 - 1) // bi + 1
    p0, p1 = k0 * bits >> 3, k1 * bits >> 3  # the bytes of a row the tile reads; column c's 16 start at c bits / 8
    stride = codes.shape[1]
    narrow = p1 - p0 < stride
    group, piece = (16, _T_COLS) if transposed else (1, max(width, 16))  # a row in one piece
    buf = _stack_empty(16, _T_COLS, np.float32)  # stack memory: nothing to set up where unused
    square = _stack_empty(16, 16, np.float32)
    while True:
        u_lo, u_hi = _claim(work, per, units16(out, transposed, codes.shape[0], o0))
        if u_lo >= u_hi:
            break
        for u in range(u_lo, u_hi):
            t0 = group * u
            n = min(group, rows - t0)
            for c0 in range(k0, k1, piece):
                c1 = min(c0 + piece, k1)
                for r in range(n):
                    o = o0 + t0 + r
                    if narrow:
                        _prefetch_piece(codes, o + _AHEAD, p0, p1)
                        _prefetch_scales(scale, (o + _AHEAD) // bo, g0, g1)
                    so = o // bo
                    dest, dst = (buf, r * _T_COLS - c0) if transposed else (out, t0 * width - k0)
                    _row16(vk, bits, coded, codes, scale[so], zp[so if has_zp else 0], has_zp, bi, base_off,
                           fp8_mult, table, o * stride, c0, c1, dest, dst)
                if not transposed:
                    continue
                for cc in range(c0, c1, 16):
                    if n == 16:
                        _transpose16(buf, cc - c0, _T_COLS, out, (cc - k0) * ld + t0, ld)
                    else:  # the tile's last rows: the valid lanes only
                        _transpose16(buf, cc - c0, _T_COLS, square, 0, 16)
                        for c in range(16):
                            for r in range(n):
                                out[cc - k0 + c, t0 + r] = square[c, r]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_rows_16(codes, scale, scale_codes, table, zp, has_zp, bo, bi, vk, base_off, fp8_mult, transposed, o0,
                       k0, out, work, per):
    """As :func:`dequantize_rows`, 16 columns at a time: blocks, ``k0`` and the tile's width multiples of 16.

    ``vk``: the codes' vector kind (``VK_*`` of :mod:`~npquant.kernels._vector`).
    Every block, however short, is whole vectors of 16 lanes, where
    :func:`dequantize_rows`'s loops left blocks of 16 or 32 columns to
    scalar code, and bit streams are decoded 16 codes at a time (measured in
    :mod:`~npquant.kernels._vector`); 4-bit codes come out in natural
    column order. A row is walked 16 columns at a time, the next block's
    scale taken where one starts: a loop per block cost about 3.5 ns a
    block (one thread, 256-column pieces of 11008 x 4096: nvfp4 75 -> 35-53
    ns, w4-g32 65 -> 34-48, mxfp4 59 -> 39). ``transposed``: ``out`` is ``(K, L)``, the tile's rows
    as its first columns (as many as the weight has rows from ``o0``, :func:`tile_rows16`; the rest left
    as they are), for BLAS to multiply as it is (see ``kernels._tile_kernel``): each unit of work is 16
    rows, dequantized into a 16 KiB stack buffer and moved out in 16 x 16 blocks transposed in registers
    (:func:`~npquant.kernels._vector._transpose16`). Scales are float32 ``scale (O / bo, G)``, or, where
    ``scale_codes`` has rows, one-byte codes ``(O / bo, G)`` whose values
    ``table`` float32 ``(256,)`` holds (fp4, fp6 and fp8 kinds): read as
    they are stored, where converting them to float32 before each call took
    0.4-1 ms for 11008 x 4096 and wrote and read back four times their
    bytes. The tiles' dequantization alone at batch 128 (BLAS left out, each
    call after a float32 matmul, medians of 10 in one process): NVFP4 10.6 ->
    9.2 ms, MXFP4 7.6 -> 7.2, MXFP8 8.0 -> 7.3, MXFP6 8.6 -> 7.9.
    """
    if scale_codes.shape[0] > 0:  # one-byte scales: the microscaled formats and NVFP4
        if vk == VK_FP4:
            _rows16(VK_FP4, 4, True, codes, scale_codes, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                    o0, k0, out, work, per)
        elif vk == VK_FP6:
            _rows16(VK_FP6, 6, True, codes, scale_codes, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                    o0, k0, out, work, per)
        else:
            _rows16(VK_E4M3, 8, True, codes, scale_codes, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                    o0, k0, out, work, per)
    elif vk == VK_INT8:
        _rows16(VK_INT8, 8, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_UINT8:
        _rows16(VK_UINT8, 8, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_E4M3:
        _rows16(VK_E4M3, 8, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_E5M2:
        _rows16(VK_E5M2, 8, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_FP4:
        _rows16(VK_FP4, 4, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_INT4:
        _rows16(VK_INT4, 4, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_FP6:
        _rows16(VK_FP6, 6, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_INT2:
        _rows16(VK_INT2, 2, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_INT3:
        _rows16(VK_INT3, 3, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_INT5:
        _rows16(VK_INT5, 5, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    elif vk == VK_INT6:
        _rows16(VK_INT6, 6, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)
    else:
        _rows16(VK_INT7, 7, False, codes, scale, zp, has_zp, bo, bi, base_off, fp8_mult, table, transposed,
                o0, k0, out, work, per)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_rows_int4_split(codes, scale, zp, has_zp, bo, bi, base_off, o0, k0, out, work, per):
    """As :func:`dequantize_rows` for 4-bit codes in byte-aligned blocks not whole 16 columns, columns reordered.

    ``out (T, K)`` (``k0`` and ``K`` even) holds each row's even columns of
    ``[k0, k0 + K)`` in ``[0, K / 2)`` and its odd ones in ``[K / 2, K)``:
    low nibbles to one half and high nibbles to the other, both at unit
    stride, where the natural order interleaves them (measured for
    11008 x 4096: 8.3 -> 4 ms). The values are bit-equal to the natural
    order's; the large-M path multiplies by ``x`` with its columns
    reordered alike.
    """
    rows, width = out.shape
    half = width // 2
    j1 = (k0 + width) // 2  # bytes [k0 / 2, j1) of each code row
    half_block = bi // 2
    n_units = rows
    narrow = j1 - k0 // 2 < codes.shape[1]
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for t in range(u_lo, u_hi):
            o = o0 + t
            if narrow:
                _prefetch_piece(codes, o + _AHEAD, k0 // 2, j1)
            row = codes[o]
            so = o // bo
            lo = out[t, :half]
            hi = out[t, half:]
            j = k0 // 2
            while j < j1:  # the column blocks the tile's columns cross, each cut to them
                g = j // half_block
                end = min((g + 1) * half_block, j1)
                z = np.float32(base_off)
                if has_zp:
                    z += np.float32(zp[so, g])
                s = scale[so, g]
                d0 = j - k0 // 2
                src = row[j:end]
                dlo = lo[d0 : d0 + end - j]
                dhi = hi[d0 : d0 + end - j]
                for k in range(end - j):
                    b = src[k]
                    dlo[k] = (np.float32(np.uint8(b & _U8_15)) - z) * s
                    dhi[k] = (np.float32(np.uint8(b >> _U8_4)) - z) * s
                j = end


@njit(inline="always", fastmath=_FASTMATH)
def _int4_block_t(nibbles, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk, k0, c0, n,
                  out_t, sc, zi):
    """Block ``blk`` of 4-bit codes, weight columns ``[k0, k0 + K)``, into columns ``[c0, c0 + n)`` of
    ``out_t (K, T)`` (``k0`` and ``K`` even).

    ``nibbles`` is the code kind's decoder (``_signed_nibbles`` ... in
    :mod:`~npquant.kernels._decode`), as in :func:`_bytes_block_t`: each
    inner loop one kind, a full block at a constant count. Measured on
    11008 x 4096 in tiles of 256 rows, 2 threads: int4 7.7 -> 7.1 ms,
    with zero points 9.8 -> 7.1, NVFP4 10.7 -> 6.7, MXFP4 7.8 -> 6.3.
    """
    j0 = k0 // 2  # bytes [j0, j1) of each code row
    j1 = j0 + out_t.shape[0] // 2
    for g in range(j0 // half_block, (j1 - 1) // half_block + 1):  # the column blocks the columns cross
        _block_scales(scale, scale_codes, scale_table, fp4, blk, g, sc)
        if has_zp:
            zi[:] = zp[blk, g]
        for j in range(max(g * half_block, j0), min((g + 1) * half_block, j1)):
            _prefetch(codes, ((blk + _BLOCKS_AHEAD) * codes.shape[1] + j) * _ROWS)  # see _BLOCKS_AHEAD
            b = codes[blk, j]
            lo = out_t[2 * (j - j0), c0 : c0 + n]
            hi = out_t[2 * (j - j0) + 1, c0 : c0 + n]
            if n == _ROWS:
                for r in range(_ROWS):
                    v_lo, v_hi = nibbles(b[r], zi[r])
                    lo[r] = v_lo * sc[r]
                    hi[r] = v_hi * sc[r]
            else:
                for r in range(n):
                    v_lo, v_hi = nibbles(b[r], zi[r])
                    lo[r] = v_lo * sc[r]
                    hi[r] = v_hi * sc[r]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_int4_blocks_t(codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk0, k0, out_t,
                             work, per):
    """``out_t (K, T)``: the weight's rows ``[R blk0, R blk0 + T)``, columns ``[k0, k0 + K)`` (``k0`` and ``K``
    even), as columns, bit-equal to the numpy reference.

    ``(q - z)`` is an exact integer, converted exactly (fp4: the code's
    value, exactly), times the scale: one rounding, as in the reference.
    Each step writes the ``R`` rows of one byte position to two rows of
    ``out_t`` at unit stride. fp4 scales are one-byte codes as in
    :func:`~npquant.kernels._small_m.gemm_small_m_int4_blocks`; ``zp`` is
    read only where ``has_zp``.
    """
    _, half_in, rows = codes.shape
    n_cols = out_t.shape[1]
    n_units = (n_cols + rows - 1) // rows
    sc = _stack_empty(1, _ROWS, np.float32)[0]
    zi = _stack_empty(1, _ROWS, np.uint8)[0]  # the block's zero points; 0 where there are none
    zi[:] = 0
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for bb in range(u_lo, u_hi):
            blk = blk0 + bb
            c0 = bb * rows
            n = min(rows, n_cols - c0)
            if fp4:
                _int4_block_t(_fp4_nibbles, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk,
                              k0, c0, n, out_t, sc, zi)
            elif has_zp:
                _int4_block_t(_offset_nibbles, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk,
                              k0, c0, n, out_t, sc, zi)
            else:
                _int4_block_t(_signed_nibbles, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk,
                              k0, c0, n, out_t, sc, zi)


@njit(cache=True)
def _scale_unfolded(dst, mult, s, n):
    """``dst[:n] = (dst * mult) * s``, in that order: compiled without fastmath (whose reassociation may take
    ``mult * s`` first, Inf where ``s`` is past float32's largest / ``mult``)."""
    for r in range(n):
        dst[r] = (dst[r] * mult) * s[r]


@njit(inline="always", fastmath=_FASTMATH)
def _bytes_block_t(value, codes, scale, zp, has_zp, mult, bi, blk, k0, c0, n, out_t, zi, sc):
    """Block ``blk`` of one-byte codes, weight columns ``[k0, k0 + K)``, into columns ``[c0, c0 + n)`` of
    ``out_t (K, T)``.

    ``value`` is the code kind's decoder (``_int8_value`` ... in
    :mod:`~npquant.kernels._decode`): compiled once per kind, each inner loop
    is one decode, one multiply and one store per lane, a full block's
    ``_ROWS`` lanes at a constant count. Written before as a decode into a
    stack buffer, then a second loop scaling it, over a count known only at
    run time: 11008 x 4096 in tiles of 256 rows, 2 threads, 10.0 -> 7.0 ms
    (int8), 8.6 -> 7.6 ms (e4m3) a call.

    ``sc`` float32 ``(_ROWS,)``, stack space for the block's scales times
    ``mult``: e4m3 passes its float16 decode (the value / 2**8) with
    ``mult`` 2**8, one multiply less per lane. Bit-equal: the decode and
    ``scale * 2**8`` are exact, so both ways round the same product once. A
    block whose ``scale * mult`` overflows (past 1.3e36: quantize and load
    never make one, a tensor built by hand may) takes the multiplier per
    lane, in that order (:func:`_scale_unfolded`). Dequantization alone
    (BLAS skipped), 11008 x 4096 at batch 128, numba targeting Zen 2,
    processes alternating: 7.90 / 7.89 / 8.74 -> 7.50 / 6.86 / 7.56 ms a
    call.
    """
    k1 = k0 + out_t.shape[0]
    for g in range(k0 // bi, (k1 - 1) // bi + 1):  # the column blocks the columns cross
        sg = scale[blk, g]
        folded = True
        for r in range(_ROWS):
            sc[r] = sg[r] * mult
            folded &= sc[r] < _F32_INF
        if not folded:  # a scale past float32's largest / mult (only built by hand): the multiplier per lane
            for r in range(_ROWS):
                sc[r] = sg[r]
        if has_zp:
            zg = zp[blk, g]
            for r in range(_ROWS):
                zi[r] = _I32(zg[r])
        for k in range(max(g * bi, k0), min((g + 1) * bi, k1)):
            _prefetch(codes, ((blk + _BLOCKS_AHEAD) * codes.shape[1] + k) * _ROWS)  # see _BLOCKS_AHEAD
            src = codes[blk, k]
            dst = out_t[k - k0, c0 : c0 + n]
            if not folded:  # rare: no loop of its own at a constant count
                for r in range(n):
                    dst[r] = value(src[r], zi[r], mult)
                _scale_unfolded(dst, mult, sc, n)
            elif n == _ROWS:
                for r in range(_ROWS):
                    dst[r] = value(src[r], zi[r], mult) * sc[r]
            else:
                for r in range(n):
                    dst[r] = value(src[r], zi[r], mult) * sc[r]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_bytes_blocks_t(codes, scale, zp, code_kind, fp8_mult, bi, blk0, k0, out_t, work, per):
    """``out_t (K, T)``: the weight's rows ``[R blk0, R blk0 + T)``, columns ``[k0, k0 + K)``, as columns,
    bit-equal to the numpy reference.

    ``(v - z)`` is exact, times the scale: one rounding, as in the reference.
    ``code_kind`` as :func:`~npquant.kernels._decode._decode_lanes`'s.
    """
    rows = codes.shape[2]
    n_cols = out_t.shape[1]
    # On the stack, where LLVM knows it aliases nothing (see _stack_empty)
    zi = _stack_empty(1, _ROWS, np.int32)[0]
    zi[:] = 0
    sc = _stack_empty(1, _ROWS, np.float32)[0]
    one = np.float32(1.0)
    n_units = (n_cols + rows - 1) // rows
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for bb in range(u_lo, u_hi):
            blk = blk0 + bb
            c0 = bb * rows
            n = min(rows, n_cols - c0)
            if code_kind == 0:
                _bytes_block_t(_int8_value, codes, scale, zp, False, one, bi, blk, k0, c0, n, out_t, zi, sc)
            elif code_kind == 1:  # e4m3's 2**8 folded into the scales: see _bytes_block_t
                _bytes_block_t(_e4m3_as_f16_value, codes, scale, zp, False, fp8_mult, bi, blk, k0, c0, n, out_t, zi,
                               sc)
            elif code_kind == 2:
                _bytes_block_t(_e5m2_value, codes, scale, zp, False, one, bi, blk, k0, c0, n, out_t, zi, sc)
            else:
                _bytes_block_t(_offset_value, codes, scale, zp, True, one, bi, blk, k0, c0, n, out_t, zi, sc)
