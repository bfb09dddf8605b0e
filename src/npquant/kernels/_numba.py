"""numba kernels that read the codes directly (private; see :mod:`npquant.kernels`).

Each code format decodes to ``v - z``, where ``v`` is the code's value and
``z`` is ``2**(bits-1)`` for packed symmetric codes (their stored offset), the
zero point for asymmetric ones, and 0 otherwise; the weight is
``(v - z) * scale``:

====  =====================  ==================================================
kind  codes                  ``v`` of element ``i`` of a row
====  =====================  ==================================================
0     int8, unpacked         ``int8(byte[i])``
1     uint8, unpacked        ``byte[i]``
2     4-bit packed           ``(byte[i // 2] >> 4 * (i % 2)) & 15``
3     2..7-bit packed        bits ``[i * bits, (i + 1) * bits)`` of the row stream
4     fp8 (e4m3 or e5m2)     the float16 whose sign, exponent and mantissa
                             fields are the fp8 code's (integer shifts and a
                             mask), converted to float32 (one instruction per
                             vector: vcvtph2ps), times ``fp8_mult``: 1 for
                             e5m2 (the float16 is the value: e5m2 is float16's
                             top byte), 2**8 for e4m3 (float16's exponent bias
                             is 8 more than e4m3's; subnormals map to float16
                             subnormals, which convert exactly)
====  =====================  ==================================================

At batch 1, :func:`gemv_bytes` decodes e4m3 with one op fewer: its fields
go straight into a float32's (:func:`_e4m3_as_f32_bits`, the value times
2**-120).

Every decode is exact (integer ops, int-to-float or half-to-float
conversion, a power-of-two multiply), so a dequantized weight is bit-equal to the numpy reference.

Performance notes, measured on the kernels below:

- loops index slices from 0, so numba knows indices are non-negative, skips
  its negative-index wraparound, and LLVM vectorises them;
- integer ops are cast back to narrow types (numba widens small integers to
  int64, which makes LLVM convert 64-bit lanes);
- float constants arrive as float32 arguments, not literals.

Dot products accumulate in float32 with reassociation allowed (``fastmath``
flags ``reassoc``/``contract``/``arcp`` only: nothing assumes away NaN or
Inf), so linear results differ from the numpy reference by float32
summation order only.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

_FASTMATH = {"reassoc", "contract", "arcp"}
_CHUNK = 512  # columns decoded per step: four float32 buffers and x's chunks stay in L1

_U8_15 = np.uint8(15)
_U8_4 = np.uint8(4)


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """The float32 value of the float16 whose bit pattern is the int16 ``h``.

    An LLVM bitcast to half and an fpext, which x86 vectorises to
    vcvtph2ps: exact for every float16, subnormals included.
    """
    if h != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _stack_empty(typingctx, n0, n1, dtype):
    """An uninitialised C-contiguous ``(n0, n1)`` array on the calling thread's stack.

    ``n0`` and ``n1`` are compile-time constants. LLVM, seeing memory that
    nothing else can reach, keeps the lane accumulators of
    :func:`gemv_int4_blocks` in registers instead of storing them after
    every column, as it does for ``np.empty`` (whose memory could alias the
    codes). Measured with codes in cache (2048 x 4096, medians of 30
    interleaved rounds): 0.210 -> 0.202 ms. The small-M kernels measured no
    faster this way and keep ``np.empty``. The array lives until the
    function returns: it must not escape it.
    """
    if not (isinstance(n0, types.IntegerLiteral) and isinstance(n1, types.IntegerLiteral)):
        return None
    dt = dtype.dtype if isinstance(dtype, types.DTypeSpec) else dtype.instance_type
    arrty = types.Array(dt, 2, "C")
    dims = (n0.literal_value, n1.literal_value)

    def codegen(context, builder, signature, args):
        ety = context.get_data_type(dt)
        itemsize = context.get_abi_sizeof(ety)
        ptr = cgutils.alloca_once(builder, ety, size=dims[0] * dims[1])  # in the entry block: once per call

        def intp(v):
            return context.get_constant(types.intp, v)

        ary = context.make_array(arrty)(context, builder)
        context.populate_array(ary, data=ptr, shape=[intp(dims[0]), intp(dims[1])],
                               strides=[intp(dims[1] * itemsize), intp(itemsize)],
                               itemsize=intp(itemsize), meminfo=None)
        return ary._getvalue()

    return arrty(n0, n1, dtype), codegen


_I16 = np.int16
_I32 = np.int32
_E4M3_TO_F16_MASK = np.int16(-16512)  # 0xBF80: sign bit, exponent bits 13..10, mantissa bits 9..7


@njit(inline="always")
def _e4m3_as_f16(b):
    """float32 of the float16 holding an e4m3 byte's fields: the e4m3 value / 2**8.

    The byte is sign-extended to 16 bits and shifted left 7: its sign lands
    on bit 15, a copy of it on bit 14 (masked off: float16's exponent is one
    bit wider), exponent on 13..10, mantissa on 9..7. Every op is cast back
    to int16 and shifts are by constants, or numba widens them to 64 bits.
    The two NaN codes (0x7F, 0xFF) decode to +-480; quantization never makes
    them and :class:`~npquant.QuantizedTensor` refuses them.
    """
    return _f16_bits_to_f32(_I16(_I16(_I16(np.int8(b)) << _I16(7)) & _E4M3_TO_F16_MASK))


@intrinsic
def _i32_bits_to_f32(typingctx, v):
    """The float32 whose bit pattern is the int32 ``v`` (an LLVM bitcast: no instruction)."""
    if v != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_I32_20 = np.int32(20)
_E4M3_TO_F32_MASK = np.int32(-2014314496)  # 0x87F00000: sign bit, exponent bits 26..23, mantissa bits 22..20


@njit(inline="always")
def _e4m3_as_f32_bits(b):
    """The float32 holding an e4m3 byte's fields: the e4m3 value * 2**-120.

    The byte is sign-extended to 32 bits and shifted left 20: sign on bit
    31 (copies of it on 30..27, masked off), exponent on 26..23, mantissa
    on 22..20. float32's exponent bias is 120 more than e4m3's, and e4m3's
    subnormals (exponent 0) land on float32's subnormals, which carry the
    same fraction: exact for every finite code, but only where the FPU does
    not flush subnormal inputs to zero (see :func:`gemv_bytes`). Three
    integer vector ops, no conversion instruction.
    """
    return _i32_bits_to_f32(_I32(_I32(_I32(np.int8(b)) << _I32_20) & _E4M3_TO_F32_MASK))


@njit(inline="always")
def _e5m2_as_f16(b):
    """float32 of the float16 whose top byte is the e5m2 byte: the e5m2 value itself."""
    return _f16_bits_to_f32(_I16(_I16(np.int8(b)) << _I16(8)))


@njit(inline="always", fastmath=_FASTMATH)
def _decode(kind, row, c0, n, z, s, bits, fp8_e4m3, fp8_mult, buf):
    """``buf[:n] = (v - z) * s``: the weights of columns ``[c0, c0 + n)`` of one code row (uint8 bytes).

    ``(v - z)`` is exact in float32 and ``* s`` rounds once, as in the numpy
    reference, so the result is the dequantized weight bit for bit.
    """
    if kind == 0:
        src = row[c0 : c0 + n]
        for k in range(n):
            buf[k] = np.float32(np.int8(src[k])) * s
    elif kind == 1:
        src = row[c0 : c0 + n]
        for k in range(n):
            buf[k] = (np.float32(src[k]) - z) * s
    elif kind == 2:
        # c0 is even: the caller picks kind 2 only for byte-aligned blocks.
        half = n // 2
        src = row[c0 // 2 : c0 // 2 + (n + 1) // 2]
        for k in range(half):
            b = src[k]
            buf[2 * k] = (np.float32(np.uint8(b & _U8_15)) - z) * s
            buf[2 * k + 1] = (np.float32(np.uint8(b >> _U8_4)) - z) * s
        if n % 2:
            buf[n - 1] = (np.float32(np.uint8(src[half] & _U8_15)) - z) * s
    elif kind == 3:
        mask = np.int32((1 << bits) - 1)
        last = row.shape[0] - 1
        for k in range(n):
            bit = (c0 + k) * bits
            j = bit >> 3
            v = np.int32(row[j])
            if j < last:
                v = np.int32(v | (np.int32(row[j + 1]) << np.int32(8)))
            buf[k] = (np.float32(np.int32((v >> np.int32(bit & 7)) & mask)) - z) * s
    elif fp8_e4m3:
        src = row[c0 : c0 + n]
        for k in range(n):
            buf[k] = (_e4m3_as_f16(src[k]) * fp8_mult) * s
    else:
        src = row[c0 : c0 + n]
        for k in range(n):
            buf[k] = (_e5m2_as_f16(src[k]) * fp8_mult) * s


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemm_small_m(x, codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, y):
    """``y (M, O) = x (M, I) @ W.T`` for small M: each code is read and decoded once.

    Parallel over quads of output rows. Each chunk of the four weight rows is
    dequantized into float32 buffers in L1, then rows of ``x`` are dotted with
    all four, two rows of ``x`` at a time (six loads feed eight products).
    ``scale`` float32 and ``zp`` uint8 are ``(O // bo, I // bi)`` (``zp``
    unused unless ``has_zp``).
    """
    m_rows, in_features = x.shape
    out_features = y.shape[1]
    last = out_features - 1
    for quad in prange((out_features + 3) // 4):
        bufs = np.empty((4, _CHUNK), np.float32)
        acc = np.zeros((m_rows, 4), np.float32)
        o = quad * 4
        rows = (o, min(o + 1, last), min(o + 2, last), min(o + 3, last))  # past the end: repeat, not stored
        for g in range(in_features // bi):
            end = (g + 1) * bi
            for c0 in range(g * bi, end, _CHUNK):
                n = min(_CHUNK, end - c0)
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


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemv_bytes(x, codes, scale, bo, bi, code_kind, e4m3_mults, y):
    """``y (1, O) = x @ W_hat.T`` for one-byte codes, eight rows per pass over ``x``.

    ``code_kind``: 0 symmetric int8, 1 fp8 e4m3, 2 fp8 e5m2, decoded in
    registers. Eight independent accumulators per load of ``x`` keep the
    FMA units and the memory streams busy (measured for int8: 4 rows 1.96
    ms, 8 rows 1.60 ms for 11008 x 4096 on 2 cores). Rows past the end
    repeat the last row and are not stored.

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
    for blk in prange((out_features + 7) // 8):
        o = blk * 8
        r = (o, min(o + 1, last), min(o + 2, last), min(o + 3, last),
             min(o + 4, last), min(o + 5, last), min(o + 6, last), min(o + 7, last))
        acc = np.zeros(8, np.float32)
        # Does this thread keep subnormal inputs? Two values loaded at run time: nothing to fold.
        f32_bits = e4m3_mults[4] * e4m3_mults[5] != np.float32(0.0)
        xm = e4m3_mults[0] if f32_bits else e4m3_mults[2]
        ym = e4m3_mults[1] if f32_bits else e4m3_mults[3]
        for g in range(n_col_blocks):
            c0 = g * bi
            xs = xs_all[c0 : c0 + bi]
            a0 = codes[r[0], c0 : c0 + bi]
            a1 = codes[r[1], c0 : c0 + bi]
            a2 = codes[r[2], c0 : c0 + bi]
            a3 = codes[r[3], c0 : c0 + bi]
            a4 = codes[r[4], c0 : c0 + bi]
            a5 = codes[r[5], c0 : c0 + bi]
            a6 = codes[r[6], c0 : c0 + bi]
            a7 = codes[r[7], c0 : c0 + bi]
            t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = np.float32(0.0)
            if code_kind == 0:
                for k in range(bi):
                    xv = xs[k]
                    t0 += xv * np.float32(np.int8(a0[k]))
                    t1 += xv * np.float32(np.int8(a1[k]))
                    t2 += xv * np.float32(np.int8(a2[k]))
                    t3 += xv * np.float32(np.int8(a3[k]))
                    t4 += xv * np.float32(np.int8(a4[k]))
                    t5 += xv * np.float32(np.int8(a5[k]))
                    t6 += xv * np.float32(np.int8(a6[k]))
                    t7 += xv * np.float32(np.int8(a7[k]))
            elif code_kind == 1 and f32_bits:
                for k in range(bi):
                    xv = xs[k] * xm
                    t0 += xv * _e4m3_as_f32_bits(a0[k])
                    t1 += xv * _e4m3_as_f32_bits(a1[k])
                    t2 += xv * _e4m3_as_f32_bits(a2[k])
                    t3 += xv * _e4m3_as_f32_bits(a3[k])
                    t4 += xv * _e4m3_as_f32_bits(a4[k])
                    t5 += xv * _e4m3_as_f32_bits(a5[k])
                    t6 += xv * _e4m3_as_f32_bits(a6[k])
                    t7 += xv * _e4m3_as_f32_bits(a7[k])
            elif code_kind == 1:
                for k in range(bi):
                    xv = xs[k] * xm
                    t0 += xv * _e4m3_as_f16(a0[k])
                    t1 += xv * _e4m3_as_f16(a1[k])
                    t2 += xv * _e4m3_as_f16(a2[k])
                    t3 += xv * _e4m3_as_f16(a3[k])
                    t4 += xv * _e4m3_as_f16(a4[k])
                    t5 += xv * _e4m3_as_f16(a5[k])
                    t6 += xv * _e4m3_as_f16(a6[k])
                    t7 += xv * _e4m3_as_f16(a7[k])
            else:
                for k in range(bi):
                    xv = xs[k]
                    t0 += xv * _e5m2_as_f16(a0[k])
                    t1 += xv * _e5m2_as_f16(a1[k])
                    t2 += xv * _e5m2_as_f16(a2[k])
                    t3 += xv * _e5m2_as_f16(a3[k])
                    t4 += xv * _e5m2_as_f16(a4[k])
                    t5 += xv * _e5m2_as_f16(a5[k])
                    t6 += xv * _e5m2_as_f16(a6[k])
                    t7 += xv * _e5m2_as_f16(a7[k])
            acc[0] += scale[r[0] // bo, g] * t0
            acc[1] += scale[r[1] // bo, g] * t1
            acc[2] += scale[r[2] // bo, g] * t2
            acc[3] += scale[r[3] // bo, g] * t3
            acc[4] += scale[r[4] // bo, g] * t4
            acc[5] += scale[r[5] // bo, g] * t5
            acc[6] += scale[r[6] // bo, g] * t6
            acc[7] += scale[r[7] // bo, g] * t7
        if code_kind != 1:
            ym = np.float32(1.0)
        for j in range(min(8, out_features - o)):
            y[0, o + j] = acc[j] * ym


_I8 = np.int8
_I8_4 = np.int8(4)
_U8_88 = np.uint8(0x88)


@njit(inline="always")
def _low_nibble_signed(c):
    """int8 value of the two's complement low nibble of the byte ``c``.

    8-bit shifts (left, then arithmetic right), cast back at each step:
    LLVM turns them into GFNI byte transforms (vgf2p8affineqb, 16 bytes an
    op) before widening, where 32-bit shifts after widening cost four
    times the vector width. Measured: 6% faster batch-1 int4.
    """
    return _I8(_I8(np.uint8(c << _U8_4)) >> _I8_4)


@njit(inline="always")
def _high_nibble_signed(c):
    """int8 value of the two's complement high nibble of the byte ``c`` (arithmetic shift)."""
    return _I8(_I8(c) >> _I8_4)


_U8_F0 = np.uint8(0xF0)
_SIXTEENTH = np.float32(0.0625)


@njit(inline="always")
def _low_nibble_x16(c):
    """16 times the two's complement low nibble of the byte ``c``, as int8: the nibble shifted to the top.

    With :func:`_high_nibble_x16`, the batch-1 4-bit kernels' decode: one
    byte op per nibble (a shift, a mask) where the value itself needs a
    second shift for the low nibble. The dot products are then exactly 16
    times the true ones (a power of two: every product and partial sum
    rounds alike, short of float32's overflow), and the sum of each block
    of columns is multiplied by 1/16, exactly. Measured with codes in cache
    (prepared, 2048 x 4096): 0.187 -> 0.170 ms.
    """
    return _I8(np.uint8(c << _U8_4))


@njit(inline="always")
def _high_nibble_x16(c):
    """16 times the two's complement high nibble of the byte ``c``, as int8: the low nibble masked off."""
    return _I8(np.uint8(c & _U8_F0))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemv_int4(x_even, x_odd, codes, scale, zp, has_zp, bo, bi, base_off, y):
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
    for o in prange(out_features):
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
def dequantize_rows(codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, o0, out):
    """``out (T, I)`` = float32 rows ``[o0, o0 + T)`` of the weight, ``(v - z) * scale``.

    Serial and GIL-free: the tiled paths run it in one Python thread per
    share of the rows.
    """
    rows, in_features = out.shape
    n_col_blocks = in_features // bi
    for t in range(rows):
        o = o0 + t
        row = codes[o]
        so = o // bo
        for g in range(n_col_blocks):
            z = np.float32(base_off)
            if has_zp:
                z += np.float32(zp[so, g])
            s = scale[so, g]
            end = (g + 1) * bi
            for c0 in range(g * bi, end, _CHUNK):
                n = min(_CHUNK, end - c0)
                _decode(kind, row, c0, n, z, s, bits, fp8_e4m3, fp8_mult, out[t, c0 : c0 + n])


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_rows_int4_split(codes, scale, zp, has_zp, bo, bi, base_off, o0, out):
    """As :func:`dequantize_rows` for 4-bit codes in byte-aligned blocks, columns reordered.

    ``out (T, I)`` holds each row's even columns in ``[0, I / 2)`` and its
    odd columns in ``[I / 2, I)`` (``I`` even): low nibbles to one half and
    high nibbles to the other, both at unit stride, where the natural order
    interleaves them (measured for 11008 x 4096: 8.3 -> 4 ms). The values
    are bit-equal to the natural order's; the large-M path multiplies by
    ``x`` with its columns reordered alike.
    """
    rows, in_features = out.shape
    half = in_features // 2
    half_block = bi // 2
    n_col_blocks = in_features // bi
    for t in range(rows):
        o = o0 + t
        row = codes[o]
        so = o // bo
        lo = out[t, :half]
        hi = out[t, half:]
        for g in range(n_col_blocks):
            z = np.float32(base_off)
            if has_zp:
                z += np.float32(zp[so, g])
            s = scale[so, g]
            j0 = g * half_block
            src = row[j0 : j0 + half_block]
            dlo = lo[j0 : j0 + half_block]
            dhi = hi[j0 : j0 + half_block]
            for k in range(half_block):
                b = src[k]
                dlo[k] = (np.float32(np.uint8(b & _U8_15)) - z) * s
                dhi[k] = (np.float32(np.uint8(b >> _U8_4)) - z) * s


# --- 4-bit codes in blocks of rows (npquant.prepared) ---------------------------------
_ROWS = 64  # npquant.prepared.ROWS
# Byte positions of a block the small-M kernels decode at a time: 64 columns,
# 16 KiB of float32 (one buffer for one-byte codes, two for 4-bit ones).
_KCHUNK = 64
_KCHUNK4 = _KCHUNK // 2
# codes (B, I / 2, R): byte j of rows R b .. R b + R - 1 side by side; scale and
# zero point (B, G, R). Symmetric nibbles hold q in two's complement. A loop
# over r (the R rows of a block) is a loop over SIMD lanes: each lane is one
# output row, so sums never cross lanes.


_I16_FP4_BITS = np.int16(-29184)  # 0x8E00: float16's sign, exponent bits 11..10, top mantissa bit 9
_I16_3 = np.int16(3)
_I16_8 = np.int16(8)
_I16_12 = np.int16(12)
_FP4_UNSCALE = np.float32(2.0**14)


@njit(inline="always")
def _fp4_low_as_f16(c):
    """float32 of the float16 holding the low nibble's fp4 e2m1 fields: the fp4 value times 2**-14.

    fp4's sign (bit 3) goes to float16's sign (bit 15), its exponent and
    mantissa (bits 2..0) to float16's exponent bits 11..10 and top mantissa
    bit 9: an fp4 exponent e >= 1 is the float16 2**(e-15) * (1 + m/2), and
    e = 0 (0 and 0.5) the float16 subnormal m * 2**-15, which the
    half-to-float conversion keeps exactly whatever the FPU does with
    subnormals. Three int16 ops: the nibble shifted to the top (sign on
    bit 15), an arithmetic shift right by 3 (mantissa to bit 9, the sign
    copied over bits 14..12) and a mask; each cast back to int16.
    """
    h = _I16(np.uint8(c))
    return _f16_bits_to_f32(_I16(_I16(_I16(h << _I16_12) >> _I16_3) & _I16_FP4_BITS))


@njit(inline="always")
def _fp4_high_as_f16(c):
    """:func:`_fp4_low_as_f16` for the high nibble."""
    h = _I16(np.uint8(c))
    return _f16_bits_to_f32(_I16(_I16(_I16(h << _I16_8) >> _I16_3) & _I16_FP4_BITS))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemv_int4_blocks(x_even, x_odd, codes, scale, zp, has_zp, fp4, half_block, y_mult, y):
    """``y (1, O) = x @ W.T`` for 4-bit codes in blocks of rows: int (``zp`` when ``has_zp``) or fp4 e2m1.

    ``x_even``/``x_odd`` ``(I / 2,)`` hold x's even and odd columns;
    ``half_block`` is the bytes per block of columns (``bi / 2``). Each
    output row accumulates ``x . (q - z)`` over a block of columns in its
    own lane (``t``), then adds ``scale * t``: the same products and
    rounding as the checkpoint-layout kernels. Padding rows are not stored.
    fp4 (NVFP4, MXFP4) decodes through float16 (:func:`_fp4_low_as_f16`):
    the block sums are 2**-14 times the true ones, taken back exactly
    before the scale. Every output is multiplied by ``y_mult`` (NVFP4: one
    over the global scale; else 1).
    """
    n_blocks = codes.shape[0]  # codes (B, I / 2, _ROWS): PreparedTensor checks the last dimension
    rows = _ROWS  # a compile-time constant: LLVM unrolls the lanes loops and keeps t in registers
    n_col_blocks = scale.shape[1]
    out_features = y.shape[1]
    for blk in prange(n_blocks):
        acc = _stack_empty(1, _ROWS, np.float32)[0]
        acc[:] = 0
        t = _stack_empty(1, _ROWS, np.float32)[0]
        zi = _stack_empty(1, _ROWS, np.int32)[0]
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
                    b = cg[j]
                    e = xe[j]
                    f = xo[j]
                    for r in range(rows):
                        c = _I32(b[r])
                        z = zi[r]
                        t[r] += e * np.float32(_I32(_I32(c & _I32(15)) - z)) + f * np.float32(_I32(_I32(c >> _I32(4)) - z))
            elif fp4:
                for j in range(half_block):
                    b = cg[j]
                    e = xe[j]
                    f = xo[j]
                    for r in range(rows):
                        c = b[r]
                        t[r] += e * _fp4_low_as_f16(c) + f * _fp4_high_as_f16(c)
                for r in range(rows):
                    t[r] *= _FP4_UNSCALE
            else:
                for j in range(half_block):
                    b = cg[j]
                    e = xe[j]
                    f = xo[j]
                    for r in range(rows):
                        c = b[r]
                        t[r] += e * np.float32(_low_nibble_x16(c)) + f * np.float32(_high_nibble_x16(c))
                for r in range(rows):
                    t[r] *= _SIXTEENTH
            sc = scale[blk, g]
            for r in range(rows):
                acc[r] += sc[r] * t[r]
        o0 = blk * rows
        for r in range(min(rows, out_features - o0)):
            y[0, o0 + r] = acc[r] * y_mult


@njit(inline="always", fastmath=_FASTMATH)
def _add_pair_sums(acc, m, m1, sc, t):
    """``acc[m] += sc * t[0]`` and ``acc[m1] += sc * t[1]``, the second unless ``m1 == m`` (an odd last row)."""
    a0 = acc[m]
    t0 = t[0]
    for r in range(_ROWS):
        a0[r] += sc[r] * t0[r]
    if m1 != m:
        a1 = acc[m1]
        t1 = t[1]
        for r in range(_ROWS):
            a1[r] += sc[r] * t1[r]


@njit(inline="always")
def _store_block(acc, o0, y):
    """``y[:, o0 : o0 + R] = acc (M, R)``, leaving out the padding rows past ``y``'s end."""
    for m in range(acc.shape[0]):
        for r in range(min(_ROWS, y.shape[1] - o0)):
            y[m, o0 + r] = acc[m, r]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemm_small_m_int4_blocks(x_even, x_odd, codes, scale, zp, has_zp, half_block, y):
    """``y (M, O) = x @ W.T`` for small M and 4-bit codes in blocks of rows.

    ``x_even``/``x_odd`` ``(M, I / 2)``. ``_KCHUNK`` byte positions of a
    block are decoded at a time into two buffers in L1 (low and high
    nibbles, ``q - z``, exact), then two rows of ``x`` at a time accumulate
    against them in registers, and each chunk's sums are scaled into
    ``acc`` (as :func:`gemm_small_m_bytes_blocks`).
    """
    n_blocks = codes.shape[0]
    m_rows = y.shape[0]
    for blk in prange(n_blocks):
        acc = np.zeros((m_rows, _ROWS), np.float32)
        lo = _stack_empty(_KCHUNK4, _ROWS, np.float32)
        hi = _stack_empty(_KCHUNK4, _ROWS, np.float32)
        t = _stack_empty(2, _ROWS, np.float32)
        for g in range(scale.shape[1]):
            zg = zp[blk, g] if has_zp else zp[0, 0]
            sc = scale[blk, g]
            for j0 in range(g * half_block, (g + 1) * half_block, _KCHUNK4):
                n = min(_KCHUNK4, (g + 1) * half_block - j0)
                for jj in range(n):
                    b = codes[blk, j0 + jj]
                    lj = lo[jj]
                    hj = hi[jj]
                    if has_zp:
                        for r in range(_ROWS):
                            c = _I32(b[r])
                            z = _I32(zg[r])
                            lj[r] = np.float32(_I32(_I32(c & _I32(15)) - z))
                            hj[r] = np.float32(_I32(_I32(c >> _I32(4)) - z))
                    else:
                        for r in range(_ROWS):
                            c = b[r]
                            lj[r] = np.float32(_low_nibble_signed(c))
                            hj[r] = np.float32(_high_nibble_signed(c))
                for m in range(0, m_rows, 2):
                    m1 = min(m + 1, m_rows - 1)  # an odd last row pairs with itself, stored once
                    t0 = t[0]
                    t1 = t[1]
                    t0[:] = 0
                    t1[:] = 0
                    ea = x_even[m, j0 : j0 + n]
                    fa = x_odd[m, j0 : j0 + n]
                    eb = x_even[m1, j0 : j0 + n]
                    fb = x_odd[m1, j0 : j0 + n]
                    for jj in range(n):
                        e0 = ea[jj]
                        f0 = fa[jj]
                        e1 = eb[jj]
                        f1 = fb[jj]
                        lj = lo[jj]
                        hj = hi[jj]
                        for r in range(_ROWS):
                            t0[r] += e0 * lj[r] + f0 * hj[r]
                            t1[r] += e1 * lj[r] + f1 * hj[r]
                    _add_pair_sums(acc, m, m1, sc, t)
        _store_block(acc, blk * _ROWS, y)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_int4_blocks_t(codes, scale, zp, has_zp, half_block, blk0, out_t):
    """``out_t (I, T)``: the weight's rows ``[R blk0, R blk0 + T)`` as columns, bit-equal to the numpy reference.

    ``(q - z)`` is an exact integer, converted exactly, times the scale:
    one rounding, as in the reference. Each step writes the ``R`` rows of
    one byte position to two rows of ``out_t`` at unit stride.
    """
    _, half_in, rows = codes.shape
    n_cols = out_t.shape[1]
    for bb in range((n_cols + rows - 1) // rows):
        blk = blk0 + bb
        c0 = bb * rows
        n = min(rows, n_cols - c0)
        for g in range(scale.shape[1]):
            sc = scale[blk, g]
            zg = zp[blk, g] if has_zp else zp[0, 0]
            for j in range(g * half_block, (g + 1) * half_block):
                b = codes[blk, j]
                lo = out_t[2 * j, c0 : c0 + n]
                hi = out_t[2 * j + 1, c0 : c0 + n]
                if has_zp:
                    for r in range(n):
                        c = _I32(b[r])
                        z = _I32(zg[r])
                        lo[r] = np.float32(_I32(_I32(c & _I32(15)) - z)) * sc[r]
                        hi[r] = np.float32(_I32(_I32(c >> _I32(4)) - z)) * sc[r]
                else:
                    for r in range(n):
                        c = b[r]
                        lo[r] = np.float32(_low_nibble_signed(c)) * sc[r]
                        hi[r] = np.float32(_high_nibble_signed(c)) * sc[r]


# One-byte codes in blocks of rows (PreparedTensor of 8 bits): codes (B, I, R),
# scale and zero point (B, G, R). ``code_kind``: 0 int8 (symmetric), 1 fp8
# e4m3, 2 fp8 e5m2, 3 uint8 minus a zero point (asymmetric). As for 4-bit
# blocks, a loop over r is a loop over SIMD lanes, one output row each.


@njit(inline="always")
def _decode_lanes(code_kind, b, zi, fp8_mult, out):
    """``out[:R] = v - z`` for one byte position of a block (``b`` uint8 (R,)), exact in float32.

    fp8 through float16 (:func:`_e4m3_as_f16` times ``fp8_mult`` = 2**8,
    or :func:`_e5m2_as_f16`): exact whatever the FPU does with subnormals.
    """
    if code_kind == 0:
        for r in range(_ROWS):
            out[r] = np.float32(np.int8(b[r]))
    elif code_kind == 1:
        for r in range(_ROWS):
            out[r] = _e4m3_as_f16(b[r]) * fp8_mult
    elif code_kind == 2:
        for r in range(_ROWS):
            out[r] = _e5m2_as_f16(b[r])
    else:
        for r in range(_ROWS):
            out[r] = np.float32(_I32(_I32(b[r]) - zi[r]))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemv_bytes_blocks(x, codes, scale, zp, code_kind, bi, e4m3_mults, y):
    """``y (1, O) = x @ W.T`` for one-byte codes in blocks of rows.

    Each block's codes are read as one stream, a cache line per column,
    and every lane accumulates its own row in a register: measured for
    11008 x 4096 int8, codes from memory, 1.43 ms against 1.93 ms for
    :func:`gemv_bytes` over the checkpoint layout. e4m3 as in
    :func:`gemv_bytes` (``e4m3_mults``); ``zp`` is read for
    ``code_kind`` 3 only. Padding rows are not stored.
    """
    n_blocks = codes.shape[0]
    n_col_blocks = scale.shape[1]
    out_features = y.shape[1]
    xs = x[0]
    for blk in prange(n_blocks):
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
                    b = cg[k]
                    e = xg[k]
                    for r in range(_ROWS):
                        t[r] += e * np.float32(np.int8(b[r]))
            elif code_kind == 1 and f32_bits:
                for k in range(bi):
                    b = cg[k]
                    e = xg[k] * xm
                    for r in range(_ROWS):
                        t[r] += e * _e4m3_as_f32_bits(b[r])
            elif code_kind == 1:
                for k in range(bi):
                    b = cg[k]
                    e = xg[k] * xm
                    for r in range(_ROWS):
                        t[r] += e * _e4m3_as_f16(b[r])
            elif code_kind == 2:
                for k in range(bi):
                    b = cg[k]
                    e = xg[k]
                    for r in range(_ROWS):
                        t[r] += e * _e5m2_as_f16(b[r])
            else:
                zg = zp[blk, g]
                for r in range(_ROWS):
                    zi[r] = _I32(zg[r])
                for k in range(bi):
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


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemm_small_m_bytes_blocks(x, codes, scale, zp, code_kind, fp8_mult, bi, y):
    """``y (M, O) = x (M, I) @ W.T`` for small M and one-byte codes in blocks of rows.

    ``_KCHUNK`` columns of a block are decoded at a time into a buffer in
    L1 (``v - z``, exact), then two rows of ``x`` at a time accumulate
    against it in registers (eight vectors of lanes), and each chunk's sums
    are scaled into ``acc``. Measured for 11008 x 4096 int8, batch 8: 6.0
    ms, where one decoded column at a time against every row of ``x``,
    accumulating in memory, took 9.1.
    """
    n_blocks = codes.shape[0]
    m_rows = y.shape[0]
    for blk in prange(n_blocks):
        acc = np.zeros((m_rows, _ROWS), np.float32)
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
                    _decode_lanes(code_kind, codes[blk, c0 + kk], zi, fp8_mult, buf[kk])
                for m in range(0, m_rows, 2):
                    m1 = min(m + 1, m_rows - 1)  # an odd last row pairs with itself, stored once
                    t0 = t[0]
                    t1 = t[1]
                    t0[:] = 0
                    t1[:] = 0
                    xa = x[m, c0 : c0 + n]
                    xb = x[m1, c0 : c0 + n]
                    for kk in range(n):
                        e = xa[kk]
                        f = xb[kk]
                        bk = buf[kk]
                        for r in range(_ROWS):
                            t0[r] += e * bk[r]
                            t1[r] += f * bk[r]
                    _add_pair_sums(acc, m, m1, sc, t)
        _store_block(acc, blk * _ROWS, y)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def dequantize_bytes_blocks_t(codes, scale, zp, code_kind, fp8_mult, bi, blk0, out_t):
    """``out_t (I, T)``: the weight's rows ``[R blk0, R blk0 + T)`` as columns, bit-equal to the numpy reference.

    ``(v - z)`` is exact, times the scale: one rounding, as in the reference.
    """
    rows = codes.shape[2]
    n_cols = out_t.shape[1]
    # On the stack, where LLVM knows they alias nothing: with np.empty, 2.3x
    # slower (2048 x 4096 int8 in tiles of 256 rows, one thread).
    w = _stack_empty(1, _ROWS, np.float32)[0]
    zi = _stack_empty(1, _ROWS, np.int32)[0]
    for bb in range((n_cols + rows - 1) // rows):
        blk = blk0 + bb
        c0 = bb * rows
        n = min(rows, n_cols - c0)
        for g in range(scale.shape[1]):
            sc = scale[blk, g]
            if code_kind == 3:
                zg = zp[blk, g]
                for r in range(_ROWS):
                    zi[r] = _I32(zg[r])
            for k in range(g * bi, (g + 1) * bi):
                _decode_lanes(code_kind, codes[blk, k], zi, fp8_mult, w)
                dst = out_t[k, c0 : c0 + n]
                for r in range(n):
                    dst[r] = w[r] * sc[r]


# --- quantization -----------------------------------------------------------------
# Exact IEEE division and rounding: fastmath only for the reductions ("reassoc"
# to vectorise the sums, "nnan"/"nsz" to vectorise the max; callers have
# refused NaN and Inf already). No "arcp" (reciprocals) and no "contract".
_QUANT_FASTMATH = {"reassoc", "nnan", "nsz"}


@njit(nogil=True, cache=True, fastmath=_QUANT_FASTMATH)
def quantize_sym_rows(chunk, bi, qmax, offset, codes, scale, sums):
    """Symmetric int codes of float32 rows ``chunk (R, I)``, blocks of ``bi`` columns.

    The numpy engine's rule bit for bit: ``s = absmax / qmax`` (float32),
    ``q = clip(rint(w / s), -qmax, qmax)``, 0 where ``s == 0``. Writes
    ``codes (R, I)`` as ``q + offset`` (int8 with offset 0, or uint8 stored
    values), ``scale (R, I // bi)``, and adds the squared error of
    ``q * s`` and the squared weights (float32 squares, float64 sums) to
    ``sums[0]`` and ``sums[1]``.
    Serial and GIL-free: tensors run in parallel threads.
    """
    rows, in_features = chunk.shape
    qm = np.float32(qmax)
    err = 0.0
    ref = 0.0
    for r in range(rows):
        for g in range(in_features // bi):
            seg = chunk[r, g * bi : (g + 1) * bi]
            out = codes[r, g * bi : (g + 1) * bi]
            m = np.float32(0.0)
            for k in range(bi):
                a = abs(seg[k])
                m = a if a > m else m
            s = m / qm
            scale[r, g] = s
            e = 0.0  # float64 sums of float32 squares, as the numpy engine
            w2 = 0.0
            if s == 0:
                for k in range(bi):
                    out[k] = offset
                    w2 += seg[k] * seg[k]
                e = w2
            else:
                for k in range(bi):
                    v = min(max(np.rint(seg[k] / s), -qm), qm)
                    out[k] = v + offset
                    d = seg[k] - v * s
                    e += d * d
                    w2 += seg[k] * seg[k]
            err += e
            ref += w2
    sums[0] += err
    sums[1] += ref
