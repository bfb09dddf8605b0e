"""Sixteen codes decoded, scaled and stored as one LLVM vector (private; see :mod:`npquant.kernels._tiles`).

:func:`_dequantize16` writes the weights of 16 consecutive columns of one
code row: one load, the decode, one multiply by the scale and one store,
each an operation on a vector of 16 lanes (one or two instructions where
the CPU has 512- or 256-bit registers). numba's loops reach the same
instructions only through LLVM's loop vectorizer, whose main loop takes 64
columns a step (16 lanes, unrolled four times): a block of 16 or 32 columns
never enters it and went through the scalar remainder; bit streams went
eight codes at a time through scalar shifts. Measured with
:func:`~npquant.kernels._tiles.dequantize_rows_16` against the kernels it
replaced, one thread, 11008 x 4096 in 256-column pieces, codes from memory,
ns a piece (two runs each, ``/tmp`` scripts): NVFP4 200-300 -> 50-90,
MXFP4 110-165 -> 40-45, MXFP8 130-150 -> 45-60, w4-g32 115-120 -> 45,
w3-g128 150-250 -> 44, w2-g64 160-190 -> 34, MXFP6 300-500 -> 71; the long
blocks gain a little (w8-channel 33-47 -> 27-35).

The decodes are the ones :mod:`~npquant.kernels._decode` documents, lane by
lane, exact; the multiply has no fast-math flag, so each weight is
``(v - z) * scale`` rounded once, bit-equal to the numpy reference. Vector
kinds (compile-time constants, ``VK_*``):

==  ===========  =====================================================  =====
vk  codes        ``v - z`` of lane ``i``                                bytes
==  ===========  =====================================================  =====
0   int8         ``int8(byte[i])``                                      16
1   uint8        ``byte[i] - z``                                        16
2   fp8 e4m3     float16 of the byte's fields times ``mult`` (2**8)     16
3   fp8 e5m2     the float16 whose top byte is the byte                 16
4   fp4 e2m1     the nibble's float16 times 2**14, low nibble first     8
5   4-bit ints   ``nibble - z``, low nibble first                       8
6   fp6 e2m3     code ``i`` of the LSB-first 6-bit stream, its float16  12
                 times 2**14 (see ``_decode._fp6_as_f16``)
8+b b-bit ints   code ``i`` of the LSB-first b-bit stream minus ``z``   2b
==  ===========  =====================================================  =====

A bit stream's 16 codes are ``2 b`` whole bytes: each lane takes the two
bytes its code lies in (a shuffle at constant indices), shifts them right
by its own constant count and masks ``b`` bits.
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

VK_INT8, VK_UINT8, VK_E4M3, VK_E5M2, VK_FP4, VK_INT4, VK_FP6 = range(7)
VK_BITS = 8  # VK_BITS + b: ints of b = 2..7 bits in a stream
VK_INT2, VK_INT3, VK_INT5, VK_INT6, VK_INT7 = (VK_BITS + b for b in (2, 3, 5, 6, 7))


def code_bits(vk: int) -> int:
    """Bits a code of vector kind ``vk`` takes: 16 codes are ``2 * code_bits`` whole bytes."""
    if vk >= VK_BITS:
        return vk - VK_BITS
    return {VK_FP4: 4, VK_INT4: 4, VK_FP6: 6}.get(vk, 8)

_LANES = 16
# Lane order of two 8-lane vectors (low nibbles, high nibbles) interleaved: column 2p is p's low, 2p + 1 its high.
_INTERLEAVE = [q for p in range(_LANES // 2) for q in (p, p + _LANES // 2)]


def _splat(builder, value, n: int):
    """The ``n``-lane vector holding ``value`` (an LLVM scalar) in every lane."""
    vty = ir.VectorType(value.type, n)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _consts(ty, n: int, value):
    """The ``n``-lane constant vector of ``ty`` holding ``value``."""
    return ir.Constant(ir.VectorType(ty, n), [ir.Constant(ty, value)] * n)


def _half_to_float(builder, h16):
    """float32 lanes of the float16 whose bits are the int16 lanes ``h16`` (vcvtph2ps: exact)."""
    n = h16.type.count
    return builder.fpext(builder.bitcast(h16, ir.VectorType(ir.HalfType(), n)), ir.VectorType(ir.FloatType(), n))


def _stream_codes(builder, raw, bits: int):
    """int16 ``<16>`` lanes: code ``i`` of the LSB-first stream of ``bits``-bit codes in the bytes ``raw``
    (``<2 bits x i8>``), as an unsigned integer."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    n, n_bytes = _LANES, 2 * bits
    first = [i * bits >> 3 for i in range(n)]
    # the byte after each code's first, where the code reaches it; else a zero lane (index n_bytes: past raw)
    second = [j + 1 if (i * bits & 7) + bits > 8 else n_bytes for i, j in enumerate(first)]
    zeros = ir.Constant(ir.VectorType(i8, n_bytes), [ir.Constant(i8, 0)] * n_bytes)

    def pick(order):
        return builder.zext(builder.shuffle_vector(raw, zeros, ir.Constant(ir.VectorType(i32, n), order)),
                            ir.VectorType(i16, n))

    pair = builder.or_(pick(first), builder.shl(pick(second), _consts(i16, n, 8)))
    shifts = ir.Constant(ir.VectorType(i16, n), [ir.Constant(i16, i * bits & 7) for i in range(n)])
    return builder.and_(builder.lshr(pair, shifts), _consts(i16, n, (1 << bits) - 1))


def _values(builder, vk: int, raw, z, mult):
    """float32 ``<16>`` lanes ``v - z`` of the loaded bytes ``raw`` (``<2 code_bits(vk) x i8>``)."""
    f32, i16, i32 = ir.FloatType(), ir.IntType(16), ir.IntType(32)
    n = _LANES
    if vk >= VK_BITS:
        w = builder.sub(_stream_codes(builder, raw, vk - VK_BITS), _splat(builder, builder.trunc(z, i16), n))
        return builder.sitofp(w, ir.VectorType(f32, n))
    if vk == VK_FP6:  # the code's fields into a float16's: shifted to the top, arithmetic shift right 3, masked
        h = builder.shl(_stream_codes(builder, raw, 6), _consts(i16, n, 10))
        h = builder.and_(builder.ashr(h, _consts(i16, n, 3)), _consts(i16, n, -28800))  # 0x8F80
        return builder.fmul(_half_to_float(builder, h), _consts(f32, n, 2.0**14))
    if vk == VK_INT8:
        return builder.sitofp(raw, ir.VectorType(f32, n))
    if vk == VK_UINT8:
        w = builder.sub(builder.zext(raw, ir.VectorType(i32, n)), _splat(builder, z, n))
        return builder.sitofp(w, ir.VectorType(f32, n))
    if vk == VK_E4M3:  # sign-extended, shifted left 7, masked to float16's sign, exponent 13..10, mantissa 9..7
        h = builder.sext(raw, ir.VectorType(i16, n))
        h = builder.and_(builder.shl(h, _consts(i16, n, 7)), _consts(i16, n, -16512))  # 0xBF80
        return builder.fmul(_half_to_float(builder, h), _splat(builder, mult, n))
    if vk == VK_E5M2:
        return _half_to_float(builder, builder.shl(builder.zext(raw, ir.VectorType(i16, n)), _consts(i16, n, 8)))
    half = n // 2  # 4-bit codes: a byte's low nibble, then its high one
    h = builder.zext(raw, ir.VectorType(i16, half))
    order = ir.Constant(ir.VectorType(i32, n), _INTERLEAVE)
    if vk == VK_FP4:  # each nibble's fields into a float16's (see _decode._fp4_low_as_f16)
        fields = _consts(i16, half, -29184)  # 0x8E00
        lo = builder.and_(builder.ashr(builder.shl(h, _consts(i16, half, 12)), _consts(i16, half, 3)), fields)
        hi = builder.and_(builder.ashr(builder.shl(h, _consts(i16, half, 8)), _consts(i16, half, 3)), fields)
        value = _half_to_float(builder, builder.shuffle_vector(lo, hi, order))
        return builder.fmul(value, _consts(f32, n, 2.0**14))
    lo = builder.and_(h, _consts(i16, half, 15))
    hi = builder.lshr(h, _consts(i16, half, 4))
    w = builder.sub(builder.shuffle_vector(lo, hi, order), _splat(builder, builder.trunc(z, i16), n))
    return builder.sitofp(w, ir.VectorType(f32, n))


@intrinsic
def _dequantize16(typingctx, vk, codes, i, out, j, s, z, mult):
    """``out.flat[j : j + 16] = (v - z) * s`` for the 16 codes in the ``2 code_bits(vk)`` bytes from byte ``i`` of
    ``codes.flat``.

    ``vk`` a literal ``VK_*``; ``codes`` C-contiguous uint8, ``out``
    C-contiguous float32 (any number of dimensions); ``i`` and ``j`` flat
    offsets, unchecked: the caller keeps them in range. ``s`` float32,
    ``z`` int32 (vk 1, 5 and the ints of bit streams), ``mult`` float32 (vk 2).
    """
    if not (isinstance(vk, types.IntegerLiteral) and isinstance(codes, types.Array) and codes.dtype == types.uint8
            and codes.layout == "C" and isinstance(out, types.Array) and out.dtype == types.float32
            and out.layout == "C" and isinstance(i, types.Integer) and isinstance(j, types.Integer)
            and s == types.float32 and z == types.int32 and mult == types.float32):
        return None

    def codegen(context, builder, signature, args):
        # The kind from the call's own signature: numba may lower calls of several kinds with one of their codegens.
        kind = signature.args[0].literal_value
        _, codes_v, i_v, out_v, j_v, s_v, z_v, mult_v = args
        data = context.make_array(signature.args[1])(context, builder, codes_v).data
        dest = context.make_array(signature.args[3])(context, builder, out_v).data
        src = builder.gep(data, [context.cast(builder, i_v, signature.args[2], types.intp)])
        dst = builder.gep(dest, [context.cast(builder, j_v, signature.args[4], types.intp)])
        raw_type = ir.VectorType(ir.IntType(8), 2 * code_bits(kind))
        raw = builder.load(builder.bitcast(src, raw_type.as_pointer()), align=1)
        w = builder.fmul(_values(builder, kind, raw, z_v, mult_v), _splat(builder, s_v, _LANES))
        builder.store(w, builder.bitcast(dst, ir.VectorType(ir.FloatType(), _LANES).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(vk, codes, i, out, j, s, z, mult), codegen


@intrinsic
def _transpose16(typingctx, src, i, src_stride, dst, j, dst_stride):
    """``dst.flat[j + c dst_stride + r] = src.flat[i + r src_stride + c]`` for ``r, c`` in ``0 .. 15``: a 16 x 16
    block of float32 transposed in registers (16 loads, four rounds of 16 two-vector shuffles, 16 stores).

    ``src`` and ``dst`` C-contiguous float32 (any number of dimensions);
    offsets and strides in elements, unchecked. Round ``b`` (8, 4, 2, 1)
    swaps the off-diagonal ``b x b`` blocks of each ``2b x 2b`` block: lane
    ``l`` of row ``r`` (bit ``b`` of ``r`` clear) pairs with lane ``l + b``
    of row ``r + b``. Moves only: every value comes out bit-equal.
    """
    if not (isinstance(src, types.Array) and src.dtype == types.float32 and src.layout == "C"
            and isinstance(dst, types.Array) and dst.dtype == types.float32 and dst.layout == "C"
            and all(isinstance(a, types.Integer) for a in (i, src_stride, j, dst_stride))):
        return None

    def codegen(context, builder, signature, args):
        src_v, i_v, ss_v, dst_v, j_v, ds_v = args
        intp = context.get_value_type(types.intp)
        i_v, ss_v, j_v, ds_v = (context.cast(builder, v, t, types.intp) for v, t in
                                zip((i_v, ss_v, j_v, ds_v), (signature.args[k] for k in (1, 2, 4, 5))))
        base_in = context.make_array(signature.args[0])(context, builder, src_v).data
        base_out = context.make_array(signature.args[3])(context, builder, dst_v).data
        vty = ir.VectorType(ir.FloatType(), _LANES)
        rows = []
        for r in range(_LANES):
            at = builder.add(i_v, builder.mul(ss_v, ir.Constant(intp, r)))
            rows.append(builder.load(builder.bitcast(builder.gep(base_in, [at]), vty.as_pointer()), align=4))
        b = _LANES // 2
        while b:
            low = ir.Constant(ir.VectorType(ir.IntType(32), _LANES),
                              [l if not l & b else l - b + _LANES for l in range(_LANES)])
            high = ir.Constant(ir.VectorType(ir.IntType(32), _LANES),
                               [l + b if not l & b else l + _LANES for l in range(_LANES)])
            for r in range(_LANES):
                if not r & b:
                    rows[r], rows[r + b] = (builder.shuffle_vector(rows[r], rows[r + b], low),
                                            builder.shuffle_vector(rows[r], rows[r + b], high))
            b //= 2
        for c in range(_LANES):
            at = builder.add(j_v, builder.mul(ds_v, ir.Constant(intp, c)))
            builder.store(rows[c], builder.bitcast(builder.gep(base_out, [at]), vty.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(src, i, src_stride, dst, j, dst_stride), codegen
