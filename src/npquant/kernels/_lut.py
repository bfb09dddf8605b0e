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
target has AVX-512 (:func:`npquant.kernels.has_avx512`); this module is imported only
there, and the portable kernels serve every other machine. Tables hold
exact values, so each decoded weight is exact.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._decode import _FASTMATH, _ROWS
from ._jobs import JOBS, SIGNATURE, _f32, _f32_1d, _f32_2d, _f32_3d, _i64_1d, _u8_2d, _u8_3d
from ._llvm import _claim, _stack_empty

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


@intrinsic
def _lanes_dot(typingctx, table, codes, x_even, x_odd, t):
    """``t[r] += sum_j table[codes[j, r] & 15] * x_even[j] + table[codes[j, r] >> 4] * x_odd[j]``, r < 64.

    ``table`` float32 (16,); ``codes`` uint8 (n, 64), C-contiguous (byte
    ``j`` of 64 rows side by side); ``x_even``, ``x_odd`` float32 (n,);
    ``t`` float32 (64,).

    The 64 bytes of a column are loaded as 16 int32 words; ``vpermps``
    reads the low four bits of each word, so the word shifted right by
    0, 4, ..., 28 bits puts each of its eight nibbles there in turn: seven
    shifts and eight lookups decode 128 weights, with no widening of bytes
    (measured with codes in cache, 256 x 4096 w4-g128 on one thread:
    0.067 -> 0.034 ms against widening each 16 bytes first). Accumulator
    ``b`` then holds rows ``4 d + b`` in lane ``d``; they are interleaved
    back into row order once per block of columns.
    """
    if not (_is_f32(table, 1) and _is_u8(codes, 2) and _is_f32(x_even, 1) and _is_f32(x_odd, 1) and _is_f32(t, 1)):
        return None
    sig = types.void(table, codes, x_even, x_odd, t)

    def codegen(context, builder, signature, args):
        lookup, fma = _vector_ops(builder)
        tp, cp, ep, op, accp = (_data(context, builder, ty, v) for ty, v in zip(signature.args, args))
        n = _length(context, builder, signature.args[2], args[2])
        tbl = builder.load(_vector_at(builder, tp, 0, _VF), align=4)
        parts = _ROWS // _LANES  # bytes per word
        slots = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * _LANES)) for _ in range(parts)]
        with cgutils.for_range(builder, n) as loop:
            j = loop.index
            words = builder.load(_vector_at(builder, cp, j, _VI), align=1)  # 64 bytes: byte 4 d + b of word d
            ev = _splat(builder, builder.load(builder.gep(ep, [j])))
            ov = _splat(builder, builder.load(builder.gep(op, [j])))
            for b in range(parts):
                low = words if b == 0 else builder.lshr(words, ir.Constant(_VI, [8 * b] * _LANES))
                high = builder.lshr(words, ir.Constant(_VI, [8 * b + 4] * _LANES))
                s = fma(lookup(tbl, low), ev, builder.load(slots[b]))
                builder.store(fma(lookup(tbl, high), ov, s), slots[b])
        # slots[b] lane d is row 4 d + b: interleave into rows 0..63 and add to t.
        v = [builder.load(slot) for slot in slots]
        pairs = ir.Constant(ir.VectorType(_I32, 2 * _LANES), [i for d in range(_LANES) for i in (d, _LANES + d)])
        ab = builder.shuffle_vector(v[0], v[1], pairs)
        cd = builder.shuffle_vector(v[2], v[3], pairs)
        quads = ir.Constant(ir.VectorType(_I32, _ROWS),
                            [i for d in range(_LANES) for i in (2 * d, 2 * d + 1, 2 * _LANES + 2 * d, 2 * _LANES + 2 * d + 1)])
        rows = builder.shuffle_vector(ab, cd, quads)
        tv = builder.bitcast(accp, ir.VectorType(ir.FloatType(), _ROWS).as_pointer())
        builder.store(builder.fadd(builder.load(tv, align=4), rows), tv, align=4)
        return context.get_dummy_value()

    return sig, codegen


_ROW_SET = 4  # checkpoint-layout rows per pass over x


@intrinsic
def _rows_dot(typingctx, values, c0, c1, c2, c3, s0, s1, s2, s3, scale_table, has_zp, z0, z1, z2, z3, x_even, x_odd,
              ahead, acc):
    """``acc[i] = lanes of x . W[row i]`` for four rows of 4-bit codes in the checkpoint layout.

    ``values`` float32 (16,): each nibble's value; ``c0..c3`` uint8 (N,):
    the four rows' codes; ``s0..s3`` (G,): their scales per block of
    ``N / G`` bytes (a multiple of 16), float32 values or uint8 codes
    whose values ``scale_table`` float32 (256,) holds (read only then);
    ``z0..z3`` uint8 (G,): their zero points, read when ``has_zp``; ``x_even``, ``x_odd`` float32 (N,); ``ahead``: bytes
    from each row to the line to prefetch; ``acc`` float32 (4, 16)
    receives each row's 16 partial sums (lane ``l`` takes bytes
    ``l``, ``l + 16``, ...), for the caller to add at the row's end.

    Each row's table for a block is ``(values - z) * s``: the dequantized
    weights themselves, rounded once as :meth:`~npquant.QuantizedTensor.dequantize`
    rounds them, so the sums need no scale afterwards and no sum across
    lanes until the row ends. The loads of ``x`` serve four rows.
    """
    rows, scales, zps = (c0, c1, c2, c3), (s0, s1, s2, s3), (z0, z1, z2, z3)
    coded = all(_is_u8(s, 1) for s in scales)
    if not (_is_f32(values, 1) and all(_is_u8(c, 1) for c in rows) and (coded or all(_is_f32(s, 1) for s in scales))
            and _is_f32(scale_table, 1) and isinstance(has_zp, types.Boolean) and all(_is_u8(z, 1) for z in zps) and _is_f32(x_even, 1) and _is_f32(x_odd, 1)
            and isinstance(ahead, types.Integer) and _is_f32(acc, 2)):
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
        steps = builder.udiv(builder.udiv(n_bytes, n_groups), ir.Constant(n_bytes.type, _LANES))  # per block
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
            "llvm.prefetch.p0i8")
        vals = builder.load(_vector_at(builder, vp, 0, _VF), align=4)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(_VF, [0.0] * _LANES)) for _ in range(_ROW_SET)]
        tables = [cgutils.alloca_once(builder, _VF) for _ in range(_ROW_SET)]
        four = ir.Constant(_VI, [4] * _LANES)
        with cgutils.for_range(builder, n_groups) as group:
            g = group.index
            for i in range(_ROW_SET):
                s = builder.load(builder.gep(sps[i], [g]))
                if coded:
                    s = builder.load(builder.gep(stp, [builder.zext(s, _I32)]))
                s = _splat(builder, s)
                with builder.if_else(zp_flag) as (with_zp, symmetric):
                    with with_zp:
                        z = _splat(builder, builder.uitofp(builder.load(builder.gep(zps_[i], [g])), ir.FloatType()))
                        builder.store(builder.fmul(builder.fsub(vals, z), s), tables[i])  # exact difference, one rounding
                    with symmetric:
                        builder.store(builder.fmul(vals, s), tables[i])
            tbls = [builder.load(t) for t in tables]
            with cgutils.for_range(builder, steps) as step:
                k = builder.add(builder.mul(g, steps), step.index)
                ev = builder.load(_vector_at(builder, ep, k, _VF), align=4)
                ov = builder.load(_vector_at(builder, op, k, _VF), align=4)
                for i in range(_ROW_SET):
                    at = _vector_at(builder, cps[i], k, _VB)
                    line = builder.gep(builder.bitcast(at, ir.IntType(8).as_pointer()), [ahead_v])
                    builder.call(prefetch, [line, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                    index = builder.zext(builder.load(at, align=1), _VI)
                    a = fma(lookup(tbls[i], index), ev, builder.load(slots[i]))  # low nibble: vpermps reads bits 0..3
                    builder.store(fma(lookup(tbls[i], builder.lshr(index, four)), ov, a), slots[i])
        for i in range(_ROW_SET):
            builder.store(builder.load(slots[i]), _vector_at(builder, accp, i, _VF), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gemv_lut_blocks(x_even, x_odd, codes, scale, table, half_block, y_mult, y, work, per):
    """``y (1, O) = x @ W.T`` for 4-bit codes in blocks of 64 rows (:class:`~npquant.PreparedTensor`), no zero point.

    ``table`` float32 (16,): the value of each nibble (symmetric int4 in
    two's complement, or fp4 e2m1). Each block of columns accumulates
    ``x . v`` per row (:func:`_lanes_dot`), then ``acc += scale * t``:
    the products and roundings of :func:`~npquant.kernels._gemv.gemv_int4_blocks`.
    Every output is multiplied by ``y_mult`` (NVFP4: one over the global
    scale; else 1). Padding rows are not stored.
    """
    n_blocks = codes.shape[0]
    n_col_blocks = scale.shape[1]
    out_features = y.shape[1]
    while True:
        u_lo, u_hi = _claim(work, per, n_blocks)
        if u_lo >= u_hi:
            break
        for blk in range(u_lo, u_hi):
            acc = _stack_empty(1, _ROWS, np.float32)[0]
            acc[:] = 0
            t = _stack_empty(1, _ROWS, np.float32)[0]
            for g in range(n_col_blocks):
                t[:] = 0
                j0 = g * half_block
                _lanes_dot(table, codes[blk, j0 : j0 + half_block], x_even[j0 : j0 + half_block],
                           x_odd[j0 : j0 + half_block], t)
                sc = scale[blk, g]
                for r in range(_ROWS):
                    acc[r] += sc[r] * t[r]
            o0 = blk * _ROWS
            for r in range(min(_ROWS, out_features - o0)):
                y[0, o0 + r] = acc[r] * y_mult


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


@cfunc(SIGNATURE, cache=True)
def gemv_lut_blocks_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_lut_blocks` (x_even, x_odd, codes, scale, table, half_block, y_mult, y, work, per)."""
    blk = carray(a, (n,))
    x_even, i = _f32_1d(blk, 0)
    x_odd, i = _f32_1d(blk, i)
    codes, i = _u8_3d(blk, i)
    scale, i = _f32_3d(blk, i)
    table, i = _f32_1d(blk, i)
    half_block = blk[i]
    y_mult, i = _f32(blk, i + 1)
    y, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    gemv_lut_blocks(x_even, x_odd, codes, scale, table, half_block, y_mult, y, work, blk[i])
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


@cfunc(SIGNATURE, cache=True)
def gemv_lut_rows_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_lut_rows` (x_even, x_odd, codes, scale, scale_table, zp, has_zp, values, bo, y, work, per), float32 scales."""
    blk, x_even, x_odd, codes, i = _lut_rows_job_args(a, n)
    scale, i = _f32_2d(blk, i)
    gemv_lut_rows(x_even, x_odd, codes, scale, *_lut_rows_job_rest(blk, i))
    return 0


@cfunc(SIGNATURE, cache=True)
def gemv_lut_rows_coded_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_lut_rows_coded`: the same arguments, scales as one-byte codes."""
    blk, x_even, x_odd, codes, i = _lut_rows_job_args(a, n)
    scale, i = _u8_2d(blk, i)
    gemv_lut_rows_coded(x_even, x_odd, codes, scale, *_lut_rows_job_rest(blk, i))
    return 0


JOBS.update({gemv_lut_blocks: gemv_lut_blocks_job, gemv_lut_rows: gemv_lut_rows_job,
             gemv_lut_rows_coded: gemv_lut_rows_coded_job})
