"""The kernels as C functions that OpenBLAS's own threads can run (see :mod:`npquant.kernels._blas_threads`).

Each ``*_job`` has the signature OpenBLAS gives the functions it runs in
its threads (``blas_level1_thread``'s legacy routine: ``m, n, k, alpha, a,
lda, b, ldb, c, ldc, sb``) and reads only ``a``, an int64 job block of ``n``
entries holding the kernel's arguments in order: an array as its data
address and its dimensions (C-contiguous), an integer or a flag as itself,
a float as its float64 bit pattern (:func:`launch` packs it). It rebuilds the arrays
around the same memory and calls the kernel, which takes its chunks of
work from the shared counter as in every other thread.

A job is compiled at its kernel's first call on OpenBLAS's threads
(:func:`job_address`), its kernel first, and cached on disk like the
kernels.
"""

import numpy as np
from numba import carray, cfunc, literal_unroll, njit, typeof, types
from numba.extending import overload

from ._env import threads_allowed
from ._gemv import gemv_bytes, gemv_bytes_blocks, gemv_int4, gemv_int4_blocks
from ._nonlinear import add_layer_norm, gelu, softmax_scaled
from ._llvm import _address_as, _blas_level1_thread, _call_int_function, _i64_bits_to_f64, _stack_empty
from ._small_m import gemm_small_m, gemm_small_m_bytes_blocks, gemm_small_m_int4_blocks
from ._tiles import (dequantize_bytes_blocks_t, dequantize_int4_blocks_t, dequantize_rows, dequantize_rows_16,
                     dequantize_rows_int4_split, units16)

# int (m, n, k, double alpha, int64 *a, lda, void *b, ldb, void *c, ldc, void *sb); ``b`` read as the integer
# its address is (see _own_units)
SIGNATURE = types.int32(types.int64, types.int64, types.int64, types.float64, types.CPointer(types.int64),
                        types.int64, types.int64, types.int64, types.voidptr, types.int64, types.voidptr)


_MAX_JOB = 64  # int64 entries of a job block: every kernel's arguments fit


def _put(item, out, i):
    """Write ``item`` into ``out`` from ``i`` (an array: address, then dimensions; a float: its float64 bits; an
    integer or flag: itself); return the next index. Compiled only (see the overload below)."""
    raise NotImplementedError


@overload(_put, jit_options={"cache": True})
def _put_typed(item, out, i):
    if isinstance(item, types.Array) and item.layout == "C":
        nd = item.ndim

        def put_array(item, out, i):
            out[i] = item.ctypes.data
            for d in range(nd):
                out[i + 1 + d] = item.shape[d]
            return i + 1 + nd

        return put_array
    if isinstance(item, types.Float):

        def put_float(item, out, i):
            out.view(np.float64)[i] = np.float64(item)
            return i + 1

        return put_float
    if isinstance(item, (types.Integer, types.Boolean)):

        def put_int(item, out, i):
            out[i] = np.int64(item)
            return i + 1

        return put_int
    return None


@njit(cache=True)
def launch(fn, get_threads, mode, alpha, job, unit, threads, n_units, chunks, *args):
    """Run ``job`` for ``kernel(*args, work, per)`` on OpenBLAS's threads: as many as BLAS has, ``threads`` at most.

    ``fn``: the address of ``blas_level1_thread``; ``get_threads``: of
    ``openblas_get_num_threads``; ``alpha``: of the routine's ``alpha``;
    ``job``: of one of the ``*_job`` functions below; ``unit``: the step
    between the threads' ``b`` that the probe measured (0 where unknown).
    The kernel takes chunks of ``per`` of its ``n_units`` units, about
    ``chunks`` per thread (one chunk of all on one thread, which OpenBLAS
    runs in the caller). ``chunks`` 0 asks for OpenBLAS's own split: each
    thread the part of the units that it takes of a GEMM's ``N``, in jobs
    that know their position (:func:`_own_units`; the others take chunks of
    a thread's share). ``threads`` 0 (or less) means
    :func:`npquant.kernels.default_threads`, read here
    (:func:`~npquant.kernels._env.threads_allowed`); where only Python can
    read it, nothing runs and the call returns 0. Returns the threads used.

    All of it compiled, in one call from Python: a model calls a kernel right
    after numpy's own work has left the interpreter's memory out of cache,
    and then each line of Python costs (see :mod:`npquant.kernels._buffers`).
    Measured on 2 cores right after a float32 11008 x 4096 matmul, with a job
    that does nothing: 135 us for this part of a call when Python read BLAS's
    thread count, packed the block and called through ctypes, 40 us so. The
    block lives on this function's stack until the job returns.
    """
    if threads <= 0:
        threads = threads_allowed()
        if threads <= 0:
            return 0
    n = max(1, min(threads, _call_int_function(get_threads), n_units))
    if n == 1:
        per = n_units
    elif chunks <= 0:
        per = -(-n_units // n)
    else:
        per = max(1, -(-n_units // (n * chunks)))
    parts = n if chunks <= 0 and n > 1 and unit > 0 else 0
    work = np.zeros(3 * parts if parts else 1, np.int64)  # one counter for all; with parts, three entries a thread
    block = _stack_empty(1, _MAX_JOB, np.int64)[0]
    k = _pack_into(block, *(args + (work, per)))
    _blas_level1_thread(fn, mode, n, k, alpha, block.ctypes.data, job, parts, unit)
    return n


@njit(inline="always")
def _own_units(work, per, n_units, parts, b, unit):
    """``(work, per)`` for this thread: as given where ``parts`` is 0 (the threads share the units out by chunks),
    else its own part of the ``n_units`` units in one chunk (a ``work`` of three entries, see
    :func:`~npquant.kernels._llvm._claim`).

    With ``parts`` threads OpenBLAS's GEMM cuts a tile's ``N`` (its rows,
    or the columns of a transposed tile) into ``parts`` parts as here,
    widths rounded up from an even share, and each thread packs its own
    part for the microkernels: given the same part to dequantize, each
    thread reads back from its own L2 what it has just written. The
    position comes from ``b`` (``position * unit``, see
    :func:`~npquant.kernels._llvm._blas_level1_thread`): OpenBLAS runs its
    parts in the same order of threads for both calls.
    """
    if parts <= 0:
        return work, per
    position = b // unit
    first = 0
    for j in range(position):
        first += -(-(n_units - first) // (parts - j))
    width = -(-(n_units - first) // (parts - position))
    own = work[3 * position : 3 * position + 3]
    own[0], own[1], own[2] = 0, first, first + width
    return own, max(1, width)


@njit(cache=True)
def _pack_into(out, *args):
    """Fill ``out`` int64 (_MAX_JOB,) with the job block of ``args``; return its length."""
    i = 0
    for a in literal_unroll(args):
        i = _put(a, out, i)
    return i


@njit(inline="always")
def _f32_1d(blk, i):
    return carray(_address_as(blk[i], np.float32), (blk[i + 1],)), i + 2


@njit(inline="always")
def _f32_2d(blk, i):
    return carray(_address_as(blk[i], np.float32), (blk[i + 1], blk[i + 2])), i + 3


@njit(inline="always")
def _f32_3d(blk, i):
    return carray(_address_as(blk[i], np.float32), (blk[i + 1], blk[i + 2], blk[i + 3])), i + 4


@njit(inline="always")
def _f64_2d(blk, i):
    return carray(_address_as(blk[i], np.float64), (blk[i + 1], blk[i + 2])), i + 3


@njit(inline="always")
def _u8_2d(blk, i):
    return carray(_address_as(blk[i], np.uint8), (blk[i + 1], blk[i + 2])), i + 3


@njit(inline="always")
def _u8_3d(blk, i):
    return carray(_address_as(blk[i], np.uint8), (blk[i + 1], blk[i + 2], blk[i + 3])), i + 4


@njit(inline="always")
def _i64_1d(blk, i):
    return carray(_address_as(blk[i], np.int64), (blk[i + 1],)), i + 2


@njit(inline="always")
def _f32(blk, i):
    return np.float32(_i64_bits_to_f64(blk[i])), i + 1


@njit(inline="always")
def _f64(blk, i):
    return _i64_bits_to_f64(blk[i]), i + 1


def gemv_bytes_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_bytes` (x, codes, scale, bo, bi, code_kind, e4m3_mults, y, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    codes, i = _u8_2d(blk, i)
    scale, i = _f32_2d(blk, i)
    bo, bi, code_kind = blk[i], blk[i + 1], blk[i + 2]
    mults, i = _f32_1d(blk, i + 3)
    y, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    gemv_bytes(x, codes, scale, bo, bi, code_kind, mults, y, work, blk[i])
    return 0


def gemv_int4_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_int4` (x_even, x_odd, codes, scale, zp, has_zp, bo, bi, base_off, y, work, per)."""
    blk = carray(a, (n,))
    x_even, i = _f32_1d(blk, 0)
    x_odd, i = _f32_1d(blk, i)
    codes, i = _u8_2d(blk, i)
    scale, i = _f32_2d(blk, i)
    zp, i = _u8_2d(blk, i)
    has_zp, bo, bi, base_off = blk[i] != 0, blk[i + 1], blk[i + 2], blk[i + 3]
    y, i = _f32_2d(blk, i + 4)
    work, i = _i64_1d(blk, i)
    gemv_int4(x_even, x_odd, codes, scale, zp, has_zp, bo, bi, base_off, y, work, blk[i])
    return 0


def gemv_int4_blocks_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_int4_blocks` (x_even, x_odd, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block,
    y_mult, y, work, per)."""
    blk = carray(a, (n,))
    x_even, i = _f32_1d(blk, 0)
    x_odd, i = _f32_1d(blk, i)
    codes, i = _u8_3d(blk, i)
    scale, i = _f32_3d(blk, i)
    scale_codes, i = _u8_3d(blk, i)
    scale_table, i = _f32_1d(blk, i)
    zp, i = _u8_3d(blk, i)
    has_zp, fp4, half_block = blk[i] != 0, blk[i + 1] != 0, blk[i + 2]
    y_mult, i = _f32(blk, i + 3)
    y, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    gemv_int4_blocks(x_even, x_odd, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, y_mult, y,
                     work, blk[i])
    return 0


def gemv_bytes_blocks_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemv_bytes_blocks` (x, codes, scale, zp, code_kind, bi, e4m3_mults, y, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    codes, i = _u8_3d(blk, i)
    scale, i = _f32_3d(blk, i)
    zp, i = _u8_3d(blk, i)
    code_kind, bi = blk[i], blk[i + 1]
    mults, i = _f32_1d(blk, i + 2)
    y, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    gemv_bytes_blocks(x, codes, scale, zp, code_kind, bi, mults, y, work, blk[i])
    return 0


def gemm_small_m_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemm_small_m` (x, codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, y, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    codes, i = _u8_2d(blk, i)
    scale, i = _f32_2d(blk, i)
    zp, i = _u8_2d(blk, i)
    has_zp, bo, bi, kind, bits, base_off, fp8_e4m3 = (blk[i] != 0, blk[i + 1], blk[i + 2], blk[i + 3], blk[i + 4],
                                                      blk[i + 5], blk[i + 6])
    fp8_mult, i = _f32(blk, i + 7)
    y, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    gemm_small_m(x, codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, y, work, blk[i])
    return 0


def gemm_small_m_int4_blocks_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemm_small_m_int4_blocks` (x, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, y,
    work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    codes, i = _u8_3d(blk, i)
    scale, i = _f32_3d(blk, i)
    scale_codes, i = _u8_3d(blk, i)
    scale_table, i = _f32_1d(blk, i)
    zp, i = _u8_3d(blk, i)
    has_zp, fp4, half_block = blk[i] != 0, blk[i + 1] != 0, blk[i + 2]
    y, i = _f32_2d(blk, i + 3)
    work, i = _i64_1d(blk, i)
    gemm_small_m_int4_blocks(x, codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, y, work, blk[i])
    return 0


def gemm_small_m_bytes_blocks_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`gemm_small_m_bytes_blocks` (x, codes, scale, zp, code_kind, fp8_mult, bi, y, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    codes, i = _u8_3d(blk, i)
    scale, i = _f32_3d(blk, i)
    zp, i = _u8_3d(blk, i)
    code_kind = blk[i]
    fp8_mult, i = _f32(blk, i + 1)
    bi = blk[i]
    y, i = _f32_2d(blk, i + 1)
    work, i = _i64_1d(blk, i)
    gemm_small_m_bytes_blocks(x, codes, scale, zp, code_kind, fp8_mult, bi, y, work, blk[i])
    return 0


#: kernel -> its job: a Python function (compiled by :func:`job_address`; ``_w8a8_core`` enters two), or a compiled
#: ``cfunc`` where a module compiles its own after a check of the CPU's features (``_lut``, ``_vnni``, the W8A8 GEMMs)
JOBS = {
    gemv_bytes: gemv_bytes_job,
    gemv_int4: gemv_int4_job,
    gemv_int4_blocks: gemv_int4_blocks_job,
    gemv_bytes_blocks: gemv_bytes_blocks_job,
    gemm_small_m: gemm_small_m_job,
    gemm_small_m_int4_blocks: gemm_small_m_int4_blocks_job,
    gemm_small_m_bytes_blocks: gemm_small_m_bytes_blocks_job,
}


def dequantize_rows_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`dequantize_rows` (codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, o0, k0, out, work, per)."""
    blk = carray(a, (n,))
    codes, i = _u8_2d(blk, 0)
    scale, i = _f32_2d(blk, i)
    zp, i = _u8_2d(blk, i)
    has_zp, bo, bi, kind, bits, base_off, fp8_e4m3 = (blk[i] != 0, blk[i + 1], blk[i + 2], blk[i + 3], blk[i + 4],
                                                      blk[i + 5], blk[i + 6])
    fp8_mult, i = _f32(blk, i + 7)
    o0, k0 = blk[i], blk[i + 1]
    out, i = _f32_2d(blk, i + 2)
    work, i = _i64_1d(blk, i)
    work, per = _own_units(work, blk[i], out.shape[0], k, b, ldc)
    dequantize_rows(codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult, o0, k0, out, work,
                    per)
    return 0


def dequantize_rows_int4_split_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`dequantize_rows_int4_split` (codes, scale, zp, has_zp, bo, bi, base_off, o0, k0, out, work, per)."""
    blk = carray(a, (n,))
    codes, i = _u8_2d(blk, 0)
    scale, i = _f32_2d(blk, i)
    zp, i = _u8_2d(blk, i)
    has_zp, bo, bi, base_off, o0, k0 = blk[i] != 0, blk[i + 1], blk[i + 2], blk[i + 3], blk[i + 4], blk[i + 5]
    out, i = _f32_2d(blk, i + 6)
    work, i = _i64_1d(blk, i)
    work, per = _own_units(work, blk[i], out.shape[0], k, b, ldc)
    dequantize_rows_int4_split(codes, scale, zp, has_zp, bo, bi, base_off, o0, k0, out, work, per)
    return 0


def dequantize_rows_16_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`dequantize_rows_16` (codes, scale, scale_codes, table, zp, has_zp, bo, bi, vk, base_off, fp8_mult,
    transposed, o0, k0, out, work, per)."""
    blk = carray(a, (n,))
    codes, i = _u8_2d(blk, 0)
    scale, i = _f32_2d(blk, i)
    scale_codes, i = _u8_2d(blk, i)
    table, i = _f32_1d(blk, i)
    zp, i = _u8_2d(blk, i)
    has_zp, bo, bi, vk, base_off = blk[i] != 0, blk[i + 1], blk[i + 2], blk[i + 3], blk[i + 4]
    fp8_mult, i = _f32(blk, i + 5)
    transposed, o0, k0 = blk[i] != 0, blk[i + 1], blk[i + 2]
    out, i = _f32_2d(blk, i + 3)
    work, i = _i64_1d(blk, i)
    work, per = _own_units(work, blk[i], units16(out, transposed, codes.shape[0], o0), k, b, ldc)
    dequantize_rows_16(codes, scale, scale_codes, table, zp, has_zp, bo, bi, vk, base_off, fp8_mult, transposed, o0,
                       k0, out, work, per)
    return 0


def dequantize_int4_blocks_t_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`dequantize_int4_blocks_t` (codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk0,
    k0, out_t, work, per)."""
    blk = carray(a, (n,))
    codes, i = _u8_3d(blk, 0)
    scale, i = _f32_3d(blk, i)
    scale_codes, i = _u8_3d(blk, i)
    scale_table, i = _f32_1d(blk, i)
    zp, i = _u8_3d(blk, i)
    has_zp, fp4, half_block, blk0, k0 = blk[i] != 0, blk[i + 1] != 0, blk[i + 2], blk[i + 3], blk[i + 4]
    out_t, i = _f32_2d(blk, i + 5)
    work, i = _i64_1d(blk, i)
    work, per = _own_units(work, blk[i], -(-out_t.shape[1] // codes.shape[2]), k, b, ldc)
    dequantize_int4_blocks_t(codes, scale, scale_codes, scale_table, zp, has_zp, fp4, half_block, blk0, k0, out_t,
                             work, per)
    return 0


def dequantize_bytes_blocks_t_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`dequantize_bytes_blocks_t` (codes, scale, zp, code_kind, fp8_mult, bi, blk0, k0, out_t, work, per)."""
    blk = carray(a, (n,))
    codes, i = _u8_3d(blk, 0)
    scale, i = _f32_3d(blk, i)
    zp, i = _u8_3d(blk, i)
    code_kind = blk[i]
    fp8_mult, i = _f32(blk, i + 1)
    bi, blk0, k0 = blk[i], blk[i + 1], blk[i + 2]
    out_t, i = _f32_2d(blk, i + 3)
    work, i = _i64_1d(blk, i)
    work, per = _own_units(work, blk[i], -(-out_t.shape[1] // codes.shape[2]), k, b, ldc)
    dequantize_bytes_blocks_t(codes, scale, zp, code_kind, fp8_mult, bi, blk0, k0, out_t, work, per)
    return 0


JOBS.update({
    dequantize_rows: dequantize_rows_job,
    dequantize_rows_int4_split: dequantize_rows_int4_split_job,
    dequantize_rows_16: dequantize_rows_16_job,
    dequantize_int4_blocks_t: dequantize_int4_blocks_t_job,
    dequantize_bytes_blocks_t: dequantize_bytes_blocks_t_job,
})


def gelu_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`~npquant.kernels._nonlinear.gelu` (x, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    work, i = _i64_1d(blk, i)
    gelu(x, work, blk[i])
    return 0


def add_layer_norm_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`~npquant.kernels._nonlinear.add_layer_norm` (a, b, gamma, beta, eps, out, work, per)."""
    blk = carray(a, (n,))
    x, i = _f32_2d(blk, 0)
    y, i = _f32_2d(blk, i)
    gamma, i = _f32_1d(blk, i)
    beta, i = _f32_1d(blk, i)
    eps, i = _f64(blk, i)
    out, i = _f32_2d(blk, i)
    work, i = _i64_1d(blk, i)
    add_layer_norm(x, y, gamma, beta, eps, out, work, blk[i])
    return 0


def softmax_scaled_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    """:func:`~npquant.kernels._nonlinear.softmax_scaled` (scores, scale, bias, n_heads, out, work, per)."""
    blk = carray(a, (n,))
    scores, i = _f32_3d(blk, 0)
    scale, i = _f32(blk, i)
    bias, i = _f32_2d(blk, i)
    n_heads = blk[i]
    out, i = _f32_3d(blk, i + 1)
    work, i = _i64_1d(blk, i)
    softmax_scaled(scores, scale, bias, n_heads, out, work, blk[i])
    return 0


JOBS.update({gelu: gelu_job, add_layer_norm: add_layer_norm_job, softmax_scaled: softmax_scaled_job})


_ADDRESSES: dict = {}  # kernel -> the address of its compiled job


def job_address(kernel, args: tuple) -> int:
    """The address of ``kernel``'s job for ``kernel(*args, work, per)``: compiled (or loaded from the cache) at its first
    use, ``kernel`` itself first, for the types ``args`` have.

    A job's machine code holds a copy of its kernel, and numba's linker
    binds the job's call to a copy already loaded in the process under the
    same name (the kernel for the same types), else to the job's own. The
    two copies are compiled apart, with different register allocation, and
    need not run alike: measured for ``gemv_int4`` (numba targeting Zen 2,
    11008 x 4096 w4-g128 at batch 1, each call after a float32 matmul, 30
    calls), 4.3-5.3 ms on both threads where the job was loaded first, 2.7-2.8
    ms where the kernel was (the same 1.8-2.0 ms either way with the codes in
    cache). Loading the kernel first makes the order of a process's first
    calls not matter: a job runs the code the kernel runs on one thread.
    """
    address = _ADDRESSES.get(kernel)
    if address is None:
        job = JOBS[kernel]
        if not hasattr(job, "address"):
            kernel.compile(tuple(typeof(a) for a in args) + (types.int64[::1], types.int64))
            job = JOBS[kernel] = cfunc(SIGNATURE, cache=True)(job)
        address = _ADDRESSES[kernel] = job.address
    return address
