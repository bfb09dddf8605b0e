"""Fused quantized-linear kernels (optional extra ``npquant[fast]``: numba, threadpoolctl).

Importing this package imports numba; :func:`npquant.linear` imports it only
when the ``"numba"`` backend is asked for (or ``"auto"`` finds numba).
Kernels compile on first use and are cached on disk, so a second process
loads them instead of compiling.

For a :class:`~npquant.QuantizedTensor` (the checkpoint layout):

- ``M == 1``: kernels of their own for int8 (eight rows per pass over
  ``x``), 4-bit codes in byte-aligned blocks (nibbles against ``x``'s even
  and odd columns) and fp8 (decoded in registers: e4m3's fields shifted
  into a float32's, e5m2 through float16).
- ``M <= SMALL_M``: :func:`gemm_small_m` reads each weight row once,
  decodes it chunk by chunk into float32 in L1, and accumulates all ``M``
  rows of ``x`` against it, in parallel over output rows.
- larger ``M`` (prefill): tiles of rows are dequantized into a reused
  float32 buffer and multiplied with BLAS; the full float32 weight never
  exists. With ``B > 1`` BLAS threads configured, ``B`` Python threads each
  take a contiguous share of the output rows and run single-threaded BLAS
  on their own tiles; BLAS is limited to one thread through threadpoolctl
  for the duration of the call and restored after (a process-wide setting:
  BLAS calls made meanwhile by other threads run single-threaded too).
  Measured for 11008 x 4096, M = 128, on 2 cores: about 1.0 to 1.1x
  float32 BLAS, where one thread alternating serial dequantization with
  2-thread BLAS calls ran at 1.1x or, after some seconds of calls, ~1.8x.

For a :class:`~npquant.PreparedTensor` (:func:`npquant.prepare`: 4-bit or
one-byte codes in blocks of 64 rows): ``M == 1`` and ``M <= SMALL_M``
kernels whose SIMD lanes are output rows (no horizontal sums, one memory
stream per block), and for larger ``M`` tiles dequantized transposed,
``(I, T)``, for BLAS, threaded as above.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import numpy as np

from ..quantize import QuantizedTensor, scale_values
from ..prepared import ROWS, PreparedTensor
from ._numba import (
    dequantize_bytes_blocks_t,
    dequantize_int4_blocks_t,
    dequantize_rows,
    dequantize_rows_int4_split,
    gemm_small_m,
    gemm_small_m_bytes_blocks,
    gemm_small_m_int4_blocks,
    gemv_bytes,
    gemv_bytes_blocks,
    gemv_int4,
    gemv_int4_blocks,
)

__all__ = ["numba_linear", "numba_dequantize", "has_kernels", "SMALL_M"]

#: Largest batch handled by the fused small-M kernel.
SMALL_M = 16
_TILE_ELEMENTS = 1 << 20  # 4 MiB float32 tile for the large-M path (BLAS likes wide tiles)
# fp8: (e4m3?, power of two taking the float16 the fields make to the value)
_FP8 = {"fp8_e4m3": (1, 2.0**8), "fp8_e5m2": (0, 1.0)}
# x * 2**8 is exact below this (and far below float32's 2**128)
_FP8_X_LIMIT = 2.0**100
# e4m3_mults of the batch-1 kernels where no e4m3 is decoded
_NO_E4M3 = np.array([1.0, 1.0, 1.0, 1.0, 2.0**-140, 2.0**100], np.float32)
# code_kind of the one-byte blocks kernels (int8: 0 symmetric, 3 asymmetric)
_BYTE_KIND = {"fp8_e4m3": 1, "fp8_e5m2": 2}
_NO_ZP = np.zeros((1, 1), np.uint8)
_NO_ZP_BLOCKS = np.zeros((1, 1, 1), np.uint8)
_ALIGN = 64  # bytes: one cache line
# Arrays smaller than this are left as malloc places them: asking numpy for
# an address costs about a microsecond, which a small layer's call notices
# and its few cache lines do not repay.
_ALIGN_FROM_BYTES = 1 << 14


def _aligned_empty(shape: tuple) -> np.ndarray:
    """An uninitialised C-contiguous float32 array whose data starts on a cache line (from 16 KiB).

    malloc aligns large blocks to 16 bytes only; BLAS and the kernels read
    and write these tiles, outputs and copies of ``x`` by whole lines.
    """
    nbytes = math.prod(shape) * 4
    if nbytes < _ALIGN_FROM_BYTES:
        return np.empty(shape, np.float32)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(np.float32).reshape(shape)


def _kernel_args(qt: QuantizedTensor) -> tuple:
    """The arrays and constants every kernel takes, in order."""
    scheme = qt.scheme
    bo, bi = qt.block_shape
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    scale = np.ascontiguousarray(scale_values(qt.scale, scheme, qt.global_scale))
    has_zp = qt.zero_point is not None
    zp = qt.zero_point if has_zp else _NO_ZP
    fp8_e4m3, fp8_mult = _FP8.get(scheme.dtype, (0, 1.0))
    base_off = 0
    if scheme.is_float:
        kind = 4
    elif scheme.packed:
        # The 4-bit fast path reads whole bytes: blocks must start on a byte.
        kind = 2 if scheme.bits == 4 and bi % 2 == 0 else 3
        base_off = 0 if has_zp else 1 << (scheme.bits - 1)
    else:
        kind = 1 if has_zp else 0
    return (codes, scale, zp, has_zp, bo, bi, kind, scheme.bits, base_off, fp8_e4m3, np.float32(fp8_mult))


def _e4m3_multipliers(x2: np.ndarray) -> np.ndarray:
    """The ``e4m3_mults`` of :func:`gemv_bytes` and :func:`gemv_bytes_blocks` for ``x2 (1, I)``.

    Both e4m3 decodes leave out a power of two (2**120, 2**8). ``x`` takes
    all of it when it stays finite: every product and partial sum is then
    the one with the true weight, bit for bit. Past that, ``x`` takes what
    it can and ``y`` the rest; the sums are then a power of two smaller,
    which rounds alike unless they fall among float32's subnormals.
    """
    amax = float(np.abs(x2).max())
    finite = math.isfinite(amax)
    # float32-bits decode (value * 2**-120): amax < 2**e, so x * 2**(127 - e) stays finite.
    e = math.frexp(amax)[1] if finite else 0
    y_shift = max(0, e - 7)
    # float16 decode (value * 2**-8).
    x_f16, y_f16 = (2.0**8, 1.0) if amax < _FP8_X_LIMIT else (1.0, 2.0**8)  # NaN: not below
    # Past 2**127, x itself would be scaled down, rounding its subnormals: the float16 decode then.
    tiny = 2.0**-140 if y_shift <= 120 else 0.0
    return np.array([2.0 ** (120 - y_shift), 2.0**y_shift, x_f16, y_f16, tiny, 2.0**100], np.float32)


def _copy_aligned(a: np.ndarray) -> np.ndarray:
    """float32 copy of ``a`` starting on a cache line."""
    out = _aligned_empty(a.shape)
    out[...] = a
    return out


def _even_odd(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x's even and odd columns, each C-contiguous float32 ``(M, I / 2)``: what byte ``j``'s two nibbles meet."""
    return np.ascontiguousarray(x2[:, 0::2]), np.ascontiguousarray(x2[:, 1::2])


def has_kernels(qt: QuantizedTensor | PreparedTensor, m_rows: int = 1) -> bool:
    """Whether the kernels read ``qt``'s codes for a batch of ``m_rows``.

    Every format but fp4, fp6 and blocks cut at the weight's edge; prepared
    fp4 at batch 1 only. :func:`npquant.linear` takes the numpy path for the others.
    """
    if isinstance(qt, PreparedTensor):
        return qt.scheme.dtype != "fp4_e2m1" or m_rows == 1
    scheme = qt.scheme
    if scheme.dtype in ("fp4_e2m1", "fp6_e2m3"):
        return False
    bo, bi = qt.block_shape
    return qt.shape[0] % bo == 0 and qt.shape[1] % bi == 0


def numba_dequantize(qt: QuantizedTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 ``(R, I)``: rows ``[start, stop)`` of ``qt``'s weight, bit-equal to ``qt.dequantize_rows``."""
    if not has_kernels(qt):
        return qt.dequantize_rows(start, stop)
    stop = qt.shape[0] if stop is None else stop
    out = np.empty((stop - start, qt.shape[1]), np.float32)
    dequantize_rows(*_kernel_args(qt), start, out)
    return out


def numba_linear(x2: np.ndarray, qt: QuantizedTensor | PreparedTensor, tile_elements: int = _TILE_ELEMENTS,
                 threads: int | None = None) -> np.ndarray:
    """float32 ``(M, O)`` = ``x2 (M, I) @ W.T`` for a floating ``x2 (M, I)``.

    ``tile_elements`` bounds each float32 tile of the tiled paths;
    ``threads`` is their number of threads (default: BLAS's thread count,
    1 without threadpoolctl).
    """
    out_features, in_features = qt.shape
    m_rows = x2.shape[0]
    if (x2.dtype != np.float32 or not x2.flags.c_contiguous
            or (x2.nbytes >= _ALIGN_FROM_BYTES and x2.ctypes.data % _ALIGN)):
        x2 = _copy_aligned(x2)
    y = _aligned_empty((m_rows, out_features))
    if isinstance(qt, PreparedTensor):
        _prepared_linear(x2, qt, y, tile_elements, threads)
        return y
    args = _kernel_args(qt)
    codes, scale, zp, has_zp, bo, bi, kind, bits, base_off = args[:9]
    if m_rows == 1 and kind == 0:
        gemv_bytes(x2, codes, scale, bo, bi, 0, _NO_E4M3, y)
        return y
    if m_rows == 1 and kind == 4:
        if args[9]:  # e4m3
            gemv_bytes(x2, codes, scale, bo, bi, 1, _e4m3_multipliers(x2), y)
        else:  # e5m2: the float16 decode is the value itself
            gemv_bytes(x2, codes, scale, bo, bi, 2, _NO_E4M3, y)
        return y
    if m_rows == 1 and kind == 2:
        x_even, x_odd = _even_odd(x2)
        gemv_int4(x_even[0], x_odd[0], codes, scale, zp, has_zp, bo, bi, base_off, y)
        return y
    if m_rows <= SMALL_M:
        gemm_small_m(x2, *args, y)
        return y
    if kind == 2:
        # 4-bit codes dequantize faster into even|odd column order (unit-stride
        # stores: 8.3 -> 4 ms for 11008 x 4096); x's columns follow suit.
        x_split = _aligned_empty(x2.shape)  # (M, I): even columns, then odd ones
        x_split[:, : in_features // 2], x_split[:, in_features // 2 :] = _even_odd(x2)
        x2 = x_split

        def dequantize(o0: int, w_tile: np.ndarray) -> None:
            dequantize_rows_int4_split(codes, scale, zp, has_zp, bo, bi, base_off, o0, w_tile)
    else:

        def dequantize(o0: int, w_tile: np.ndarray) -> None:
            dequantize_rows(*args, o0, w_tile)

    tile = max(1, tile_elements // in_features)

    def share(lo: int, hi: int) -> None:
        """``y[:, lo:hi]``, ``tile`` rows at a time."""
        buf = _aligned_empty((min(tile, hi - lo), in_features))
        for o0 in range(lo, hi, tile):
            w_tile = buf[: min(tile, hi - o0)]  # (T, I)
            dequantize(o0, w_tile)
            np.matmul(x2, w_tile.T, out=y[:, o0 : o0 + w_tile.shape[0]])

    _in_threads(out_features, out_features * in_features // tile_elements, threads, share)
    return y


def _prepared_linear(x2: np.ndarray, p: PreparedTensor, y: np.ndarray, tile_elements: int, threads: int | None) -> None:
    """``y (M, O) = x2 @ W.T`` for codes in blocks of rows."""
    m_rows, in_features = x2.shape
    out_features = p.shape[0]
    has_zp = p.zero_point is not None
    zp = p.zero_point if has_zp else _NO_ZP_BLOCKS
    bi = p.block_shape[1]
    if p.scheme.dtype == "fp4_e2m1":  # batch 1 only (see has_kernels)
        y_mult = np.float32(1.0) if p.global_scale is None else np.float32(1.0) / p.global_scale[0]
        x_even, x_odd = _even_odd(x2)
        gemv_int4_blocks(x_even[0], x_odd[0], p.codes, p.scale, _NO_ZP_BLOCKS, False, True, bi // 2, y_mult, y)
        return
    if p.scheme.bits == 8:
        code_kind = _BYTE_KIND.get(p.scheme.dtype, 3 if has_zp else 0)
        fp8_mult = np.float32(_FP8.get(p.scheme.dtype, (0, 1.0))[1])
        if m_rows == 1:
            mults = _e4m3_multipliers(x2) if code_kind == 1 else _NO_E4M3
            gemv_bytes_blocks(x2, p.codes, p.scale, zp, code_kind, bi, mults, y)
            return
        if m_rows <= SMALL_M:
            gemm_small_m_bytes_blocks(x2, p.codes, p.scale, zp, code_kind, fp8_mult, bi, y)
            return

        def dequantize_t(b0: int, w_t: np.ndarray) -> None:
            dequantize_bytes_blocks_t(p.codes, p.scale, zp, code_kind, fp8_mult, bi, b0, w_t)
    else:
        half_block = bi // 2
        if m_rows == 1:
            x_even, x_odd = _even_odd(x2)
            gemv_int4_blocks(x_even[0], x_odd[0], p.codes, p.scale, zp, has_zp, False, half_block, np.float32(1.0), y)
            return
        if m_rows <= SMALL_M:
            gemm_small_m_int4_blocks(*_even_odd(x2), p.codes, p.scale, zp, has_zp, half_block, y)
            return

        def dequantize_t(b0: int, w_t: np.ndarray) -> None:
            dequantize_int4_blocks_t(p.codes, p.scale, zp, has_zp, half_block, b0, w_t)

    # Other batches: tiles of whole blocks dequantized transposed, (I, T), and BLAS.
    n_blocks = p.codes.shape[0]
    per_tile = max(1, tile_elements // (ROWS * in_features))  # blocks

    def share(b_lo: int, b_hi: int) -> None:
        """``y`` for blocks ``[b_lo, b_hi)``, ``per_tile`` blocks at a time."""
        buf = _aligned_empty((in_features * ROWS * min(per_tile, b_hi - b_lo),))
        for b0 in range(b_lo, b_hi, per_tile):
            o0 = b0 * ROWS
            n = min(per_tile * ROWS, out_features - o0)
            w_t = buf[: in_features * n].reshape(in_features, n)  # (I, T), C-contiguous
            dequantize_t(b0, w_t)
            np.matmul(x2, w_t, out=y[:, o0 : o0 + n])

    _in_threads(n_blocks, max(1, n_blocks // per_tile), threads, share)


def _in_threads(n: int, max_workers: int, threads: int | None, share) -> None:
    """``share(lo, hi)`` over ``[0, n)`` cut into contiguous shares, one per thread.

    As many threads as BLAS has (or ``threads``), at most ``max_workers``;
    with more than one, BLAS runs single-threaded in each for the duration.
    The caller's thread takes the first share; errors reach the caller.
    """
    blas = _blas_controller()
    workers = threads or (1 if blas is None else max(lib.num_threads for lib in blas.lib_controllers))
    workers = max(1, min(workers, max_workers, n))
    if workers == 1:
        share(0, n)
        return
    bounds = [n * k // workers for k in range(workers + 1)]
    errors = []

    def run(k: int) -> None:
        try:
            share(bounds[k], bounds[k + 1])
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    with contextlib.nullcontext() if blas is None else blas.limit(limits=1):
        pool = [threading.Thread(target=run, args=(k,)) for k in range(1, workers)]
        for t in pool:
            t.start()
        run(0)
        for t in pool:
            t.join()
    if errors:
        raise errors[0]


@functools.cache
def _blas_controller():
    """threadpoolctl's controller of the BLAS libraries loaded in this process, or None.

    None when threadpoolctl is not installed or finds no BLAS it can limit;
    the tiled paths then run in one thread (BLAS threading as configured).
    Looked up once per process.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None
