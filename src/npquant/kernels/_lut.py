"""Batch-1 kernels for 4-bit codes that decode through a 16-entry table in a register (AVX-512).

A 4-bit code has 16 values, so a whole vector of codes decodes in one
instruction: ``vpermps`` picks, for each of 16 lanes, the entry of a
16-float table (one register) that the lane's low four bits name. One
table serves every 4-bit format: int4 (``n - 8`` for stored ``q + 8``,
``n - z`` with a zero point), and fp4 e2m1 (its 16 values). A byte of two
codes costs about a shift and two permutes; the masks, sign extensions and
int-to-float (or half-to-float) conversions of the portable kernels
(:mod:`~npquant.kernels._gemv`) are gone. Measured for 11008 x 4096 on
2 cores, batch 1, each call alternating with a float32 matmul of another
matrix: nvfp4 prepared 1.64 -> 1.17 ms, w4-g128 prepared 1.22 -> 1.10 ms.

LLVM has no instruction-independent table lookup, so the inner loops are
written here as LLVM vector IR (numba intrinsics) calling
``llvm.x86.avx512.permvar.sf.512``. They compile only where numba's
target has AVX-512 (:func:`npquant.kernels.has_avx512`): nothing compiles at import,
:func:`compile_jobs` refuses other targets, and the portable kernels serve there. Tables hold
exact values, so each decoded weight is exact.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import NpquantError
from ._decode import _FASTMATH, _ROWS
from ._jobs import JOBS, SIGNATURE, _f32, _f32_1d, _f32_2d, _f32_3d, _i64_1d, _u8_2d, _u8_3d
from ._llvm import _claim, _stack_empty, prefetch_call
from ._target import has_avx512, target_features

_LANES = 16  # float32 lanes of one 512-bit register
_VF = ir.VectorType(ir.FloatType(), _LANES)
_VI = ir.VectorType(ir.IntType(32), _LANES)
_VB = ir.VectorType(ir.IntType(8), _LANES)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)


def _data(context, builder, aryty, value):
    """The data pointer of a numba array value."""
    return context.make_array(aryty)(context, builder, value).data


def _length(context, builder, aryty, value):
    """The first dimension of a numba array value (intp)."""
    return cgutils.unpack_tuple(builder, context.make_array(aryty)(context, builder, value).shape)[0]


def _splat(builder, scalar):
    """A float32 vector holding ``scalar`` in every lane."""
    undef = ir.Constant(_VF, ir.Undefined)
    one = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(_VI, [0] * _LANES))


def _vector_ops(builder):
    """The table lookup (vpermps) and the fused multiply-add of 16 float32 lanes."""
    module = builder.module
    lookup = cgutils.get_or_insert_function(module, ir.FunctionType(_VF, [_VF, _VI]), "llvm.x86.avx512.permvar.sf.512")
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(_VF, [_VF, _VF, _VF]), "llvm.fma.v16f32")
    return (lambda table, index: builder.call(lookup, [table, index])), (lambda a, b, c: builder.call(fma, [a, b, c]))


def _vector_at(builder, ptr, i, ty):
    """Pointer to vector ``i`` (an int or an LLVM integer) of type ``ty`` in the memory at ``ptr``."""
    index = ir.Constant(_I64, i) if isinstance(i, int) else i
    return builder.gep(builder.bitcast(ptr, ty.as_pointer()), [index])


def _is_f32(a, ndim):
    return isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == ndim and a.layout == "C"


def _is_u8(a, ndim):
    return isinstance(a, types.Array) and a.dtype == types.uint8 and a.ndim == ndim and a.layout == "C"


_PREFETCH_AHEAD = 4096  # bytes ahead in a block's stream of codes: 8-15% faster from memory (2-8 KiB alike)
_E4M3_SCALE = 256.0  # the float16 holding an e4m3 byte's fields is its value / 2**8
_E8M0_ZERO = 0x00400000  # float32 bits of 2**-127, e8m0's exponent 0 (a float32 subnormal)


def _interleave(builder, parts):
    """Rows ``0..63`` from four vectors whose lane ``d`` holds row ``4 d + b`` (``parts[b]``)."""
    pairs = ir.Constant(ir.VectorType(_I32, 2 * _LANES), [i for d in range(_LANES) for i in (d, _LANES + d)])
    ab = builder.shuffle_vector(parts[0], parts[1], pairs)
    cd = builder.shuffle_vector(parts[2], parts[3], pairs)
    half = 2 * _LANES
    quads = ir.Constant(ir.VectorType(_I32, _ROWS),
                        [i for d in range(_LANES) for i in (2 * d, 2 * d + 1, half + 2 * d, half + 2 * d + 1)])
    return builder.shuffle_vector(ab, cd, quads)


def _byte_lanes(builder, words, b):
    """Byte ``b`` of each of 16 int32 words, zero-extended: rows ``4 d + b`` of a column of 64 bytes."""
    shifted = words if b == 0 else builder.lshr(words, ir.Constant(_VI, [8 * b] * _LANES))
    return builder.and_(shifted, ir.Constant(_VI, [0xFF] * _LANES))


def _e4m3_lanes(builder, byte):
    """float32 values of 16 fp8 e4m3 bytes (int32 lanes), through float16: exact for every finite code, subnormals too."""
    sign = builder.shl(builder.and_(byte, ir.Constant(_VI, [0x80] * _LANES)), ir.Constant(_VI, [8] * _LANES))
    rest = builder.shl(builder.and_(byte, ir.Constant(_VI, [0x7F] * _LANES)), ir.Constant(_VI, [7] * _LANES))
    half = builder.bitcast(builder.trunc(builder.or_(sign, rest), ir.VectorType(ir.IntType(16), _LANES)),
                           ir.VectorType(ir.HalfType(), _LANES))
    return builder.fmul(builder.fpext(half, _VF), ir.Constant(_VF, [_E4M3_SCALE] * _LANES))


def _e8m0_lanes(builder, byte):
    """float32 values ``2**(E - 127)`` of 16 e8m0 bytes (int32 lanes): the exponent field itself, 2**-127 for 0."""
    bits = builder.shl(byte, ir.Constant(_VI, [23] * _LANES))
    is_zero = builder.icmp_unsigned("==", byte, ir.Constant(_VI, [0] * _LANES))
    return builder.bitcast(builder.select(is_zero, ir.Constant(_VI, [_E8M0_ZERO] * _LANES), bits), _VF)


@intrinsic
def _lanes_block(typingctx, table, codes, scale, scale_codes, scale_kind, n_groups, x_even, x_odd, out):
    """``out[r] = sum_g scale[g, r] * sum_j (table[low nibble] * x_even[j] + table[high nibble] * x_odd[j])``, r < 64.

    One block of 64 rows of :class:`~npquant.PreparedTensor`: ``table``
    float32 (16,); ``codes`` uint8 (N, 64) (byte ``j`` of the 64 rows side
    by side); ``n_groups`` blocks of ``N / n_groups`` bytes; their scales
    ``scale`` float32 (n_groups, 64) (``scale_kind`` 0), or the codes
    ``scale_codes`` uint8 (n_groups, 64) of fp8 e4m3 (1) or e8m0 (2)
    scales, decoded here (the other array is not read); ``x_even``,
    ``x_odd`` float32 (N,); ``out`` float32 (64,).

    The 64 bytes of a column are loaded as 16 int32 words; ``vpermps``
    reads the low four bits of each word, so the word shifted right by
    0, 4, ..., 28 bits puts each of its eight nibbles there in turn: seven
    shifts and eight lookups decode 128 weights, with no widening of bytes
    (measured with codes in cache, 256 x 4096 w4-g128 on one thread:
    0.067 -> 0.034 ms against widening each 16 bytes first). Accumulator
    ``b`` then holds rows ``4 d + b`` in lane ``d``; one-byte scales are
    decoded in that same order from their words, float32 ones shuffled
    into it, and the sums are interleaved back into row order once per
    block of rows. Per block of columns: the exact sum of ``x . v`` per row
    (``t``), then ``acc += scale * t`` (one fused multiply-add).
    """
    if not (_is_f32(table, 1) and _is_u8(codes, 2) and _is_f32(scale, 2) and _is_u8(scale_codes, 2)
            and isinstance(scale_kind, types.Integer) and isinstance(n_groups, types.Integer)
            and _is_f32(x_even, 1) and _is_f32(x_odd, 1) and _is_f32(out, 1)):
        return None
    sig = types.void(table, codes, scale, scale_codes, scale_kind, n_groups, x_even, x_odd, out)

    def codegen(context, builder, signature, args):
        lookup, fma = _vector_ops(builder)
        aty = signature.args
        tp, cp, sp, scp = (_data(context, builder, aty[i], args[i]) for i in range(4))
        ep, op, outp = (_data(context, builder, aty[i], args[i]) for i in (6, 7, 8))
        kind = context.cast(builder, args[4], aty[4], types.intp)
        groups = context.cast(builder, args[5], aty[5], types.intp)
        n = _length(context, builder, aty[6], args[6])
        per_group = builder.udiv(n, groups)
        tbl = builder.load(_vector_at(builder, tp, 0, _VF), align=4)
        parts = _ROWS // _LANES  # bytes per word
        zero = ir.Constant(_VF, [0.0] * _LANES)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(parts)]
        t = [cgutils.alloca_once(builder, _VF) for _ in range(parts)]  # low nibbles' sums
        u = [cgutils.alloca_once(builder, _VF) for _ in range(parts)]  # high nibbles': twice the chains in flight
        sc = [cgutils.alloca_once(builder, _VF) for _ in range(parts)]
        with cgutils.for_range(builder, groups) as group:
            g = group.index
            for b in range(parts):
                builder.store(zero, t[b])
                builder.store(zero, u[b])
            with cgutils.for_range(builder, per_group) as col:
                j = builder.add(builder.mul(g, per_group), col.index)
                at = _vector_at(builder, cp, j, _VI)
                prefetch_call(builder, builder.gep(builder.bitcast(at, ir.IntType(8).as_pointer()),
                                                   [ir.Constant(_I64, _PREFETCH_AHEAD)]), 3)
                words = builder.load(at, align=1)  # byte 4 d + b of word d
                ev = _splat(builder, builder.load(builder.gep(ep, [j])))
                ov = _splat(builder, builder.load(builder.gep(op, [j])))
                for b in range(parts):
                    low = words if b == 0 else builder.lshr(words, ir.Constant(_VI, [8 * b] * _LANES))
                    high = builder.lshr(words, ir.Constant(_VI, [8 * b + 4] * _LANES))
                    builder.store(fma(lookup(tbl, low), ev, builder.load(t[b])), t[b])
                    builder.store(fma(lookup(tbl, high), ov, builder.load(u[b])), u[b])
            is_float = builder.icmp_signed("==", kind, ir.Constant(kind.type, 0))
            with builder.if_else(is_float) as (float_scales, byte_scales):
                with float_scales:
                    row = builder.load(_vector_at(builder, sp, g, ir.VectorType(ir.FloatType(), _ROWS)), align=4)
                    for b in range(parts):
                        gather = ir.Constant(_VI, [4 * d + b for d in range(_LANES)])
                        builder.store(builder.shuffle_vector(row, row, gather), sc[b])
                with byte_scales:
                    words = builder.load(_vector_at(builder, scp, g, _VI), align=1)
                    is_e4m3 = builder.icmp_signed("==", kind, ir.Constant(kind.type, 1))
                    for b in range(parts):
                        byte = _byte_lanes(builder, words, b)
                        builder.store(builder.select(is_e4m3, _e4m3_lanes(builder, byte), _e8m0_lanes(builder, byte)),
                                      sc[b])
            for b in range(parts):
                block_sum = builder.fadd(builder.load(t[b]), builder.load(u[b]))
                builder.store(fma(builder.load(sc[b]), block_sum, builder.load(acc[b])), acc[b])
        rows = _interleave(builder, [builder.load(a) for a in acc])
        builder.store(rows, builder.bitcast(outp, ir.VectorType(ir.FloatType(), _ROWS).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


_ROW_SET = 4  # checkpoint-layout rows per pass over x


@intrinsic
def _rows_dot(typingctx, values, c0, c1, c2, c3, s0, s1, s2, s3, scale_table, has_zp, z0, z1, z2, z3, x_even, x_odd,
              ahead, acc):
    """``acc[i] = lanes of x . W[row i]`` for four rows of 4-bit codes in the checkpoint layout.

    ``values`` float32 (16,): each nibble's value; ``c0..c3`` uint8 (N,):
    the four rows' codes; ``s0..s3`` (G,): their scales per block of
    ``N / G`` bytes (8, or a multiple of 16), float32 values or uint8 codes
    whose values ``scale_table`` float32 (256,) holds (read only then);
    ``z0..z3`` uint8 (G,): their zero points, read when ``has_zp``; ``x_even``, ``x_odd`` float32 (N,); ``ahead``: bytes
    from each row to the line to prefetch; ``acc`` float32 (4, 16)
    receives each row's 16 partial sums (lane ``l`` takes bytes
    ``l``, ``l + 16``, ...), for the caller to add at the row's end.

    Each row's table for a block is ``(values - z) * s``: the dequantized
    weights themselves, rounded once as :meth:`~npquant.QuantizedTensor.dequantize`
    rounds them, so the sums need no scale afterwards and no sum across
    lanes until the row ends. The loads of ``x`` serve four rows. Blocks of
    8 bytes (NVFP4) split each 16-byte step between two tables, which
    ``vpermi2ps`` picks from by the index's bit 4.
    """
    rows, scales, zps = (c0, c1, c2, c3), (s0, s1, s2, s3), (z0, z1, z2, z3)
    coded = all(_is_u8(s, 1) for s in scales)
    if not (_is_f32(values, 1) and all(_is_u8(c, 1) for c in rows) and (coded or all(_is_f32(s, 1) for s in scales))
            and _is_f32(scale_table, 1) and isinstance(has_zp, types.Boolean) and all(_is_u8(z, 1) for z in zps)
            and _is_f32(x_even, 1) and _is_f32(x_odd, 1) and isinstance(ahead, types.Integer) and _is_f32(acc, 2)):
        return None
    sig = types.void(values, *rows, *scales, scale_table, has_zp, *zps, x_even, x_odd, ahead, acc)

    def codegen(context, builder, signature, args):
        lookup, fma = _vector_ops(builder)
        aty = signature.args
        ptrs = [_data(context, builder, ty, v) if isinstance(ty, types.Array) else v for ty, v in zip(aty, args)]
        vp, cps, sps, stp, zp_flag, zps_ = ptrs[0], ptrs[1:5], ptrs[5:9], ptrs[9], ptrs[10], ptrs[11:15]
        ep, op, ahead_v, accp = ptrs[15:]
        zp_flag = context.cast(builder, zp_flag, aty[10], types.boolean)
        n_bytes = _length(context, builder, aty[1], args[1])
        n_groups = _length(context, builder, aty[5], args[5])
        per_group = builder.udiv(n_bytes, n_groups)
        lookup2 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VI, _VF]),
                                                 "llvm.x86.avx512.vpermi2var.ps.512")
        vals = builder.load(_vector_at(builder, vp, 0, _VF), align=4)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * _LANES)) for _ in range(_ROW_SET)]
        tables = [[cgutils.alloca_once(builder, _VF) for _ in range(_ROW_SET)] for _ in range(2)]
        four = ir.Constant(_VI, [4] * _LANES)

        def make_tables(g, dest):
            """dest[i] = row i's dequantized weights of block ``g``: ``(values - z) * s``."""
            for i in range(_ROW_SET):
                s = builder.load(builder.gep(sps[i], [g]))
                if coded:
                    s = builder.load(builder.gep(stp, [builder.zext(s, _I32)]))
                s = _splat(builder, s)
                with builder.if_else(zp_flag) as (with_zp, symmetric):
                    with with_zp:
                        z = _splat(builder, builder.uitofp(builder.load(builder.gep(zps_[i], [g])), ir.FloatType()))
                        builder.store(builder.fmul(builder.fsub(vals, z), s), dest[i])  # exact difference, one rounding
                    with symmetric:
                        builder.store(builder.fmul(vals, s), dest[i])

        def step(k, i, low_of, high_of):
            """Row ``i``'s 16 bytes ``k``: both nibbles looked up, multiplied by x and added to its lanes."""
            ev = builder.load(_vector_at(builder, ep, k, _VF), align=4)
            ov = builder.load(_vector_at(builder, op, k, _VF), align=4)
            at = _vector_at(builder, cps[i], k, _VB)
            line = builder.gep(builder.bitcast(at, ir.IntType(8).as_pointer()), [ahead_v])
            prefetch_call(builder, line, 3)
            index = builder.zext(builder.load(at, align=1), _VI)
            a = fma(low_of(index), ev, builder.load(slots[i]))
            builder.store(fma(high_of(builder.lshr(index, four)), ov, a), slots[i])

        eight = builder.icmp_unsigned("==", per_group, ir.Constant(per_group.type, 8))
        with builder.if_else(eight) as (pairs, whole):
            with whole:  # blocks of 16 bytes or more: one table per row and block
                steps = builder.udiv(per_group, ir.Constant(per_group.type, _LANES))
                with cgutils.for_range(builder, n_groups) as group:
                    g = group.index
                    make_tables(g, tables[0])
                    tbls = [builder.load(t) for t in tables[0]]
                    with cgutils.for_range(builder, steps) as col:
                        k = builder.add(builder.mul(g, steps), col.index)
                        for i in range(_ROW_SET):
                            # vpermps reads the index's bits 0..3: the low nibble as it is
                            step(k, i, lambda idx, t=tbls[i]: lookup(t, idx), lambda idx, t=tbls[i]: lookup(t, idx))
            with pairs:  # blocks of 8 bytes (NVFP4's 16 columns): lanes 0..7 in one, 8..15 in the next
                second = ir.Constant(_VI, [0] * (_LANES // 2) + [16] * (_LANES // 2))  # bit 4: the second table
                nibble = ir.Constant(_VI, [15] * _LANES)
                with cgutils.for_range(builder, builder.udiv(n_groups, ir.Constant(n_groups.type, 2))) as pair:
                    k = pair.index
                    g0 = builder.mul(k, ir.Constant(k.type, 2))
                    make_tables(g0, tables[0])
                    make_tables(builder.add(g0, ir.Constant(k.type, 1)), tables[1])
                    for i in range(_ROW_SET):
                        ta, tb = builder.load(tables[0][i]), builder.load(tables[1][i])

                        def pick(idx, ta=ta, tb=tb):  # vpermi2ps: bits 0..3 pick the entry, bit 4 the table
                            return builder.call(lookup2, [ta, builder.or_(idx, second), tb])

                        step(k, i, lambda idx, pick=pick: pick(builder.and_(idx, nibble)), pick)
        for i in range(_ROW_SET):
            builder.store(builder.load(slots[i]), _vector_at(builder, accp, i, _VF), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_lut_blocks(x_even, x_odd, codes, scale, scale_codes, scale_kind, table, y_mult, y, work, per):
    """``y (1, O) = x @ W.T`` for 4-bit codes in blocks of 64 rows (:class:`~npquant.PreparedTensor`), no zero point.

    ``table`` float32 (16,): the value of each nibble (symmetric int4 in
    two's complement, or fp4 e2m1). Scales: ``scale`` float32 (B, G, 64)
    when ``scale_kind`` is 0, else ``scale_codes`` uint8 (B, G, 64) of fp8
    e4m3 (1, NVFP4) or e8m0 (2, MXFP4) scales; the array not read may be
    (1, 1, 64). Each block of rows is :func:`_lanes_block`; every output is
    multiplied by ``y_mult`` (NVFP4: one over the global scale; else 1).
    Padding rows are not stored.
    """
    n_blocks = codes.shape[0]
    n_groups = scale_codes.shape[1] if scale_kind else scale.shape[1]
    out_features = y.shape[1]
    out = _stack_empty(1, _ROWS, np.float32)[0]
    while True:
        u_lo, u_hi = _claim(work, per, n_blocks)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            _lanes_block(table, codes[blk], scale[0 if scale_kind else blk], scale_codes[blk if scale_kind else 0],
                         scale_kind, n_groups, x_even, x_odd, out)
            o0 = blk * _ROWS
            for r in range(min(_ROWS, out_features - o0)):
                y[0, o0 + r] = out[r] * y_mult


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_lut_rows(x_even, x_odd, codes, scale, scale_table, zp, has_zp, values, bo, y, work, per):
    """``y (1, O) = x @ W.T`` for 4-bit codes in the checkpoint layout, four rows per pass over ``x`` (:func:`_rows_dot`).

    ``codes`` uint8 (O, I / 2); ``scale`` float32 (O / bo, G), the scales'
    values (``scale_table`` is then not read), or uint8 (O / bo, G), codes
    of the values in ``scale_table`` float32 (256,) (e8m0, or NVFP4's fp8
    over its global scale); ``zp`` uint8 (O / bo, G), all zero unless ``has_zp`` (then
    it may be (1, G)); ``values`` float32 (16,): each nibble's value
    (``n - 8`` for symmetric int4's stored ``q + 8``, ``n`` with a zero
    point, fp4 e2m1's values). A block of columns spans a multiple of 16
    bytes. Rows past the end repeat the last row and are not stored.
    """
    out_features = y.shape[1]
    last = out_features - 1
    ahead = 2 * _ROW_SET * codes.shape[1]  # the same bytes eight rows on: the hardware prefetcher sees short rows late
    n_units = (out_features + _ROW_SET - 1) // _ROW_SET
    acc = _stack_empty(_ROW_SET, 16, np.float32)
    while True:
        u_lo, u_hi = _claim(work, per, n_units)
        if u_lo >= u_hi:
            break
        for unit in range(u_lo, u_hi):
            o = unit * _ROW_SET
            r0, r1, r2, r3 = o, min(o + 1, last), min(o + 2, last), min(o + 3, last)
            z0 = zp[r0 // bo] if has_zp else zp[0]
            z1 = zp[r1 // bo] if has_zp else zp[0]
            z2 = zp[r2 // bo] if has_zp else zp[0]
            z3 = zp[r3 // bo] if has_zp else zp[0]
            _rows_dot(values, codes[r0], codes[r1], codes[r2], codes[r3], scale[r0 // bo], scale[r1 // bo],
                      scale[r2 // bo], scale[r3 // bo], scale_table, has_zp, z0, z1, z2, z3, x_even, x_odd, ahead, acc)
            for i in range(min(_ROW_SET, out_features - o)):
                total = np.float32(0.0)
                for n in range(16):
                    total += acc[i, n]
                y[0, o + i] = total


#: :func:`gemv_lut_rows` for scales stored as one-byte codes (its own dispatcher: OpenBLAS's threads run one job per kernel).
gemv_lut_rows_coded = njit(nogil=True, cache=True, fastmath=_FASTMATH)(gemv_lut_rows.py_func)


def _gemv_lut_blocks_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_lut_blocks` (x_even, x_odd, codes, scale, scale_codes, scale_kind, table, y_mult, y, work, per)."""
    blk = carray(a, (n,))
    x_even, i = _f32_1d(blk, 0)
    x_odd, i = _f32_1d(blk, i)
    codes, i = _u8_3d(blk, i)
    scale, i = _f32_3d(blk, i)
    scale_codes, i = _u8_3d(blk, i)
    scale_kind = blk[i]
    table, i = _f32_1d(blk, i + 1)
    y_mult, i = _f32(blk, i)
    y, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    gemv_lut_blocks(x_even, x_odd, codes, scale, scale_codes, scale_kind, table, y_mult, y, work, blk[i])
    return 0


@njit(inline="always")
def _lut_rows_job_args(a, n):
    """The arrays and constants of :func:`gemv_lut_rows` before ``scale`` and after it, from a job block."""
    blk = carray(a, (n,))
    x_even, i = _f32_1d(blk, 0)
    x_odd, i = _f32_1d(blk, i)
    codes, i = _u8_2d(blk, i)
    return blk, x_even, x_odd, codes, i


@njit(inline="always")
def _lut_rows_job_rest(blk, i):
    scale_table, i = _f32_1d(blk, i)
    zp, i = _u8_2d(blk, i)
    has_zp = blk[i] != 0
    values, i = _f32_1d(blk, i + 1)
    bo = blk[i]
    y, i = _f32_2d(blk, i + 1)
    work, i = _i64_1d(blk, i)
    return scale_table, zp, has_zp, values, bo, y, work, blk[i]


def _gemv_lut_rows_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_lut_rows` (x_even, x_odd, codes, scale, scale_table, zp, has_zp, values, bo, y, work, per), float32 scales."""
    blk, x_even, x_odd, codes, i = _lut_rows_job_args(a, n)
    scale, i = _f32_2d(blk, i)
    gemv_lut_rows(x_even, x_odd, codes, scale, *_lut_rows_job_rest(blk, i))
    return 0


def _gemv_lut_rows_coded_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_lut_rows_coded`: the same arguments, scales as one-byte codes."""
    blk, x_even, x_odd, codes, i = _lut_rows_job_args(a, n)
    scale, i = _u8_2d(blk, i)
    gemv_lut_rows_coded(x_even, x_odd, codes, scale, *_lut_rows_job_rest(blk, i))
    return 0


@functools.cache
def compile_jobs() -> None:
    """Compile the jobs of this module's kernels for OpenBLAS's threads and enter them in ``JOBS``, once.

    Nothing in this module compiles at import: its kernels and jobs name
    AVX-512 intrinsics, which LLVM cannot lower for a target without them
    (it aborts the process). This is the one place that compiles them, and
    only where numba's target has AVX-512 (:func:`~npquant.kernels._target.has_avx512`).

    Raises
    ------
    NpquantError
        Where numba's target has no AVX-512.
    """
    if not has_avx512():
        raise NpquantError("the table-lookup kernels need AVX-512, which numba's target CPU lacks "
                           f"(features: {target_features()[:80]}...); the portable kernels serve there")
    jobs = {gemv_lut_blocks: _gemv_lut_blocks_job, gemv_lut_rows: _gemv_lut_rows_job,
            gemv_lut_rows_coded: _gemv_lut_rows_coded_job}
    JOBS.update({kernel: cfunc(SIGNATURE, cache=True)(job) for kernel, job in jobs.items()})
