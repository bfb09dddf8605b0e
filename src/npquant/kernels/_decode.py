"""The code formats, decoded to float32 inside the kernels (private; see :mod:`npquant.kernels`).

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
6     fp6 e2m3, packed       kind 3's 6-bit stream, each code's value through
                             float16 as fp4's (see :func:`_fp6_as_f16`)
5     fp4 e2m1, packed       the float16 holding the nibble's fields (see
                             :func:`_fp4_low_as_f16`) times 2**14
4     fp8 (e4m3 or e5m2)     the float16 whose sign, exponent and mantissa
                             fields are the fp8 code's (integer shifts and a
                             mask), converted to float32 (one instruction per
                             vector: vcvtph2ps), times ``fp8_mult``: 1 for
                             e5m2 (the float16 is the value: e5m2 is float16's
                             top byte), 2**8 for e4m3 (float16's exponent bias
                             is 8 more than e4m3's; subnormals map to float16
                             subnormals, which convert exactly)
====  =====================  ==================================================

At batch 1, ``_gemv.gemv_bytes`` decodes e4m3 with one op fewer: its fields
go straight into a float32's (:func:`_e4m3_as_f32_bits`, the value times
2**-120).

Every decode is exact (integer ops, int-to-float or half-to-float
conversion, a power-of-two multiply), so a dequantized weight is bit-equal to the numpy reference.

Performance notes, measured on the kernels that use these decoders:

- loops index slices from 0, so numba knows indices are non-negative, skips
  its negative-index wraparound, and LLVM vectorises them;
- integer ops are cast back to narrow types (numba widens small integers to
  int64, which makes LLVM convert 64-bit lanes);
- float constants arrive as float32 arguments, not literals.

Dot products accumulate in float32 with reassociation allowed (``fastmath``
flags ``reassoc``/``contract``/``arcp`` only: nothing assumes away NaN or
Inf), so linear results differ from the numpy reference by float32
summation order only. One kernel sums in integers instead:
:mod:`~npquant.kernels._vnni` (batch-1 int8 where AVX-512 VNNI is), exact
but for ``x`` rounded to ``2**-30`` of its largest element.
"""

import math

import numpy as np

from numba import njit

from ._llvm import _f16_bits_to_f32, _i32_bits_to_f32
from ._target import has_avx512

_FASTMATH = {"reassoc", "contract", "arcp"}
_CHUNK = 512  # columns decoded per step: four float32 buffers and x's chunks stay in L1

_U8_15 = np.uint8(15)
_U8_4 = np.uint8(4)

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
    not flush subnormal inputs to zero (see ``_gemv.gemv_bytes``). Three
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
    elif kind == 3 or kind == 6:
        mask = np.int32((1 << bits) - 1)
        last = row.shape[0] - 1
        for k in range(n):
            bit = (c0 + k) * bits
            j = bit >> 3
            v = np.int32(row[j])
            if j < last:
                v = np.int32(v | (np.int32(row[j + 1]) << np.int32(8)))
            u = np.int32((v >> np.int32(bit & 7)) & mask)
            if kind == 6:
                buf[k] = _fp6_value(u, z) * s
            else:
                buf[k] = (np.float32(u) - z) * s
    elif kind == 5:
        # fp4 e2m1, two a byte; c0 and n are even (blocks of 16 or 32 columns).
        src = row[c0 // 2 : c0 // 2 + n // 2]
        for k in range(n // 2):
            b = src[k]
            buf[2 * k] = (_fp4_low_as_f16(b) * _FP4_UNSCALE) * s
            buf[2 * k + 1] = (_fp4_high_as_f16(b) * _FP4_UNSCALE) * s
    elif fp8_e4m3:
        src = row[c0 : c0 + n]
        for k in range(n):
            buf[k] = (_e4m3_as_f16(src[k]) * fp8_mult) * s
    else:
        src = row[c0 : c0 + n]
        for k in range(n):
            buf[k] = (_e5m2_as_f16(src[k]) * fp8_mult) * s


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


# --- 4-bit codes in blocks of rows (npquant.prepared) ---------------------------------
_ROWS = 64  # npquant.prepared.ROWS
# Lanes (rows of a block) summed in one pass where the kernels keep a vector of sums per lane group: 64 lanes are
# 8 of AVX-512's 32 registers, but with a second set of sums, or two nibbles' decodes, more than AVX2's 16 hold
# (its sums then spill): there, two passes of 32 lanes.
_LANE_ROWS = _ROWS if has_avx512() else _ROWS // 2
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


_I16_10 = np.int16(10)
_I16_FP6_BITS = np.int16(-28800)  # 0x8F80: float16's sign, exponent bits 11..10, mantissa bits 9..7


@njit(inline="always")
def _fp6_as_f16(u):
    """float32 of the float16 holding the fp6 e2m3 code ``u``'s fields (int, 0..63): the fp6 value times 2**-14.

    As :func:`_fp4_low_as_f16`, with three mantissa bits: the code shifted
    to the top (sign on bit 15), an arithmetic shift right by 3 (exponent to
    bits 11..10, mantissa to 9..7) and a mask. An exponent e >= 1 is the
    float16 2**(e-15) * (1 + m/8) and e = 0 the subnormal m/8 * 2**-14:
    fp6's 2**(e-1) * (1 + m/8) and m/8, times 2**-14, exactly.
    """
    return _f16_bits_to_f32(_I16(_I16(_I16(_I16(u) << _I16_10) >> _I16_3) & _I16_FP6_BITS))


@njit(inline="always")
def _fp6_value(u, z):
    """The fp6 code ``u`` (int32, its six bits)'s value, float32 and exact (``z`` unused: fp6 has no zero point)."""
    return _fp6_as_f16(u) * _FP4_UNSCALE


@njit(cache=True)
def table_values(table, codes):
    """float32, ``codes``' shape: ``table[codes]`` for float32 ``table (256,)`` and uint8 ``codes (A, B)``."""
    out = np.empty(codes.shape, np.float32)
    flat, src = out.reshape(-1), codes.reshape(-1)
    for i in range(src.shape[0]):
        flat[i] = table[src[i]]
    return out


@njit(inline="always")
def _block_scales(scale, scale_codes, scale_table, coded, blk, g, out):
    """``out[:R]``: the scales of block of rows ``blk``, block of columns ``g``, as float32 values.

    ``scale`` float32 (B, G, R), or, when ``coded``, ``scale_codes`` uint8
    (B, G, R) (fp4's one-byte scales) whose values ``scale_table`` float32
    (256,) holds.
    """
    if coded:
        sg = scale_codes[blk, g]
        for r in range(out.shape[0]):
            out[r] = scale_table[sg[r]]
    else:
        out[:] = scale[blk, g]


# --- one-byte codes in blocks of rows (npquant.prepared) ----------------------------
# Codes uint8 (B, I, R), scale and zero point (B, G, R). ``code_kind``: 0
# int8 (symmetric), 1 fp8 e4m3, 2 fp8 e5m2, 3 uint8 minus a zero point
# (asymmetric), 4 fp8 e4m3 over 2**8 (the float16 decode alone, for a
# caller whose ``x`` holds the 2**8). As for 4-bit blocks, a loop over r is
# a loop over SIMD lanes, one output row each.
#
# One byte code's ``v - z`` as float32, exact, one function per code kind: a
# kernel passed one of them is compiled for it alone, with no branch on the
# kind in its inner loop (see :func:`npquant.kernels._tiles._bytes_block_t`;
# :func:`_decode_lanes` branches to them).
# ``z`` is the lane's zero point (int32), ``mult`` e4m3's 2**8.


@njit(inline="always")
def _int8_as_f32(b):
    """float32 of the uint8 ``b`` read as int8 (two's complement), exactly."""
    return np.float32(np.int8(b))


@njit(inline="always")
def _int8_value(b, z, mult):
    return _int8_as_f32(b)


@njit(inline="always")
def _e4m3_value(b, z, mult):
    return _e4m3_as_f16(b) * mult


@njit(inline="always")
def _e4m3_as_f16_value(b, z, mult):
    """e4m3's value / 2**8 (the float16 decode, not scaled back): for callers that fold 2**8 into their scales."""
    return _e4m3_as_f16(b)


@njit(inline="always")
def _e5m2_value(b, z, mult):
    return _e5m2_as_f16(b)


@njit(inline="always")
def _offset_value(b, z, mult):
    return np.float32(_I32(_I32(b) - z))


@njit(inline="always")
def _decode_lanes(code_kind, b, zi, fp8_mult, out):
    """``out[:R] = v - z`` for one byte position of a block (``b`` uint8 (R,)), exact in float32.

    fp8 through float16 (:func:`_e4m3_as_f16` times ``fp8_mult`` = 2**8,
    or without it, kind 4; :func:`_e5m2_as_f16`): exact whatever the FPU
    does with subnormals.
    """
    if code_kind == 0:
        for r in range(_ROWS):
            out[r] = _int8_value(b[r], zi[r], fp8_mult)
    elif code_kind == 1:
        for r in range(_ROWS):
            out[r] = _e4m3_value(b[r], zi[r], fp8_mult)
    elif code_kind == 2:
        for r in range(_ROWS):
            out[r] = _e5m2_value(b[r], zi[r], fp8_mult)
    elif code_kind == 4:
        for r in range(_ROWS):
            out[r] = _e4m3_as_f16_value(b[r], zi[r], fp8_mult)
    else:
        for r in range(_ROWS):
            out[r] = _offset_value(b[r], zi[r], fp8_mult)


# A byte of two 4-bit codes as its two values ``(low, high)``, float32 and
# exact, one function per code kind, as the one-byte ones above: ``z`` the
# lane's zero point (uint8). fp4's values are ``_FP4_UNSCALE`` times
# float16's, exactly.


@njit(inline="always")
def _signed_nibbles(c, z):
    return np.float32(_low_nibble_signed(c)), np.float32(_high_nibble_signed(c))


@njit(inline="always")
def _offset_nibbles(c, z):
    ci = _I32(c)
    zi = _I32(z)
    return np.float32(_I32(_I32(ci & _I32(15)) - zi)), np.float32(_I32(_I32(ci >> _I32(4)) - zi))


@njit(inline="always")
def _fp4_nibbles(c, z):
    return _fp4_low_as_f16(c) * _FP4_UNSCALE, _fp4_high_as_f16(c) * _FP4_UNSCALE


# x * 2**8 is exact below this (and far below float32's 2**128)
_FP8_X_LIMIT = 2.0**100


@njit(cache=True)
def e4m3_multipliers(x):
    """float32 (6,): the ``e4m3_mults`` of the batch-1 kernels for float32 ``x`` (any shape, C-contiguous).

    Both e4m3 decodes leave out a power of two (2**120, 2**8). ``x`` takes
    all of it when it stays finite: every product and partial sum is then
    the one with the true weight, bit for bit. Past that, ``x`` takes what
    it can and ``y`` the rest; the sums are then a power of two smaller,
    which rounds alike unless they fall among float32's subnormals.
    Compiled: a batch-1 call comes right after a model's own work has left
    the interpreter out of cache, where the six numpy calls this took cost
    about 80 us.
    """
    flat = x.ravel()
    top = np.float32(0.0)
    nans = 0
    for i in range(flat.size):
        a = abs(flat[i])
        nans += a != a
        top = a if a > top else top
    amax = math.nan if nans else float(top)
    finite = math.isfinite(amax)
    # float32-bits decode (value * 2**-120): amax < 2**e, so x * 2**(127 - e) stays finite.
    e = math.frexp(amax)[1] if finite else 0
    y_shift = max(0, e - 7)
    # float16 decode (value * 2**-8); NaN is not below the limit.
    x_f16, y_f16 = (2.0**8, 1.0) if amax < _FP8_X_LIMIT else (1.0, 2.0**8)
    # Past 2**127, x itself would be scaled down, rounding its subnormals: the float16 decode then.
    tiny = 2.0**-140 if y_shift <= 120 else 0.0
    out = np.empty(6, np.float32)
    out[0], out[1], out[2], out[3], out[4], out[5] = 2.0 ** (120 - y_shift), 2.0**y_shift, x_f16, y_f16, tiny, 2.0**100
    return out
