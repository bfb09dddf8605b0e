"""Fused quantized-linear kernels (optional extra ``npquant[fast]``, needs numba).

Importing this package imports numba; :func:`npquant.linear` imports it only
when the ``"numba"`` backend is asked for (or ``"auto"`` finds numba).
Kernels compile on first use and are cached on disk, so a second process
loads them instead of compiling.

- ``M <= SMALL_M`` (decoding, batch 1 to 16): :func:`gemm_small_m` reads
  each weight row once, decodes it chunk by chunk into float32 in L1, and
  accumulates all ``M`` rows of ``x`` against it, in parallel over output rows.
- larger ``M`` (prefill): tiles of rows are dequantized in parallel into a
  reused float32 buffer and multiplied with BLAS; the full float32 weight
  never exists.
"""

from __future__ import annotations

import numpy as np

from ..quantize import QuantizedTensor
from ._numba import dequantize_rows, gemm_small_m, gemv_fp8, gemv_int4, gemv_int8

__all__ = ["numba_linear", "numba_dequantize", "SMALL_M"]

#: Largest batch handled by the fused small-M kernel.
SMALL_M = 16
_TILE_ELEMENTS = 1 << 20  # 4 MiB float32 tile for the large-M path (BLAS likes wide tiles)
# fp8: (shift moving the fields into float32's, 2**(127 - bias))
_FP8 = {"fp8_e4m3": (20, 2.0**120), "fp8_e5m2": (21, 2.0**112)}
_NO_ZP = np.zeros((1, 1), np.uint8)


def _kernel_args(qt: QuantizedTensor) -> tuple:
    """The arrays and constants every kernel takes, in order."""
    scheme = qt.scheme
    bo, bi = qt.block_shape
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    scale = np.ascontiguousarray(qt.scale, dtype=np.float32)
    has_zp = qt.zero_point is not None
    zp = qt.zero_point if has_zp else _NO_ZP
    fp8_shift, fp8_mult = _FP8.get(scheme.dtype, (0, 1.0))
    base_off = 0
    if scheme.is_float:
        kind = 4
    elif scheme.packed:
        # The 4-bit fast path reads whole bytes: blocks must start on a byte.
        kind = 2 if scheme.bits == 4 and bi % 2 == 0 else 3
        base_off = 0 if has_zp else 1 << (scheme.bits - 1)
    else:
        kind = 1 if has_zp else 0
    return (codes, scale, zp, has_zp, bo, bi, kind, scheme.bits, base_off, fp8_shift, np.float32(fp8_mult))


def numba_dequantize(qt: QuantizedTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 ``(R, I)``: rows ``[start, stop)`` of ``qt``'s weight, bit-equal to ``qt.dequantize_rows``."""
    stop = qt.shape[0] if stop is None else stop
    out = np.empty((stop - start, qt.shape[1]), np.float32)
    dequantize_rows(*_kernel_args(qt), start, out)
    return out


def numba_linear(x2: np.ndarray, qt: QuantizedTensor, tile_elements: int = _TILE_ELEMENTS) -> np.ndarray:
    """float32 ``(M, O)`` = ``x2 (M, I) @ W.T`` for a float32 ``x2``.

    ``tile_elements`` bounds the float32 tile of the large-M path.
    """
    out_features, in_features = qt.shape
    x2 = np.ascontiguousarray(x2, dtype=np.float32)
    m_rows = x2.shape[0]
    y = np.empty((m_rows, out_features), np.float32)
    args = _kernel_args(qt)
    codes, scale, zp, has_zp, bo, bi, kind, bits, base_off = args[:9]
    if m_rows == 1 and kind == 0:
        gemv_int8(x2, codes, scale, bo, bi, y)
        return y
    if m_rows == 1 and kind == 4:
        gemv_fp8(x2, codes, scale, bo, bi, args[9], args[10], y)
        return y
    if m_rows == 1 and kind == 2:
        x_even = np.ascontiguousarray(x2[0, 0::2])  # (I / 2,)
        x_odd = np.ascontiguousarray(x2[0, 1::2])  # (I / 2,)
        gemv_int4(x_even, x_odd, codes, scale, zp, has_zp, bo, bi, base_off, y)
        return y
    if m_rows <= SMALL_M:
        gemm_small_m(x2, *args, y)
        return y
    tile = max(1, tile_elements // in_features)
    buf = np.empty((min(tile, out_features), in_features), np.float32)
    for o0 in range(0, out_features, tile):
        w_tile = buf[: min(tile, out_features - o0)]  # (T, I)
        dequantize_rows(*args, o0, w_tile)
        np.matmul(x2, w_tile.T, out=y[:, o0 : o0 + w_tile.shape[0]])
    return y
