"""Microscaling and block formats by compressed-tensors 0.20's own rules: NVFP4, MXFP4/6/8, fp8 blocks.

These formats are defined by what compressed-tensors (and llm-compressor's
memoryless min-max observer) compute, so npquant computes the same, bit for
bit: a checkpoint npquant writes is byte-equal to the one compressed-tensors
writes for the same weights (facts in
``shared/spec/compressed-tensors-modern-formats.md``).

``D`` is the weight's dtype (float32, bfloat16 or float16; float64 is read
as float32). An "op in D" is computed in float32 and rounded once to D,
as torch does on CPU. Rounding is always to nearest, ties to even.

NVFP4 (``nvfp4``: fp4 e2m1 codes, groups of 16, fp8 e4m3 scales, a float32 global scale)
    ``gs = float32((1 / max(absmax(w), tiny(D))) [in D] * 2688 [in D])``
    (a reciprocal, then a product: not a division); Inf/NaN become 1.
    Per group: ``s = e4m3(clamp(gs * (amax / 6 [in D]), +-448))``, 0 becomes
    0.125. Codes: ``x = float32(w) / (float32(s) / gs)`` (two float32
    divisions), clamped to +-6, rounded to the fp4 grid; the sign bit is
    ``x < 0``, so an exact -0.0 gets code 0 but a tiny negative code 8.
MX (``mxfp4``, ``mxfp6``, ``mxfp8``: groups of 32, e8m0 scales)
    ``amax`` rounded to a power of two on D's bits (add ``1 << (mant_D - m - 1)``
    with ``m`` 1 for fp4 and fp8, 3 for fp6; keep sign and exponent): up
    when amax's mantissa is at least 1.75 (fp6: 1.9375), else down.
    ``E = clamp(127 + log2(p2) - off, 0, 255)`` with ``off`` 2 (fp4, fp6) or
    8 (fp8); ``log2(0) = -inf``. The scale ``2**(E-127)`` is taken in D (an
    underflow to 0 becomes 1, so float16 stores E = 127 for such groups).
    Codes: ``x = w / scale [in D]``, clamped to the code's max, rounded; fp4
    takes its sign from ``x < 0``, fp6 and fp8 from the sign bit (fp8 adds
    the zero point 0 first, so -0.0 gets +0).
fp8 blocks (``fp8-block``: fp8 e4m3 codes, 128 x 128 blocks)
    ``s = amax(block) / 448 [in D]``, 0 becomes ``eps(D)``; the weight is
    read as zero-padded to whole blocks. Codes ``e4m3(clamp(w / s [in D] + 0, +-448))``.

Dequantization is ``float32(code) * float32(scale)`` (NVFP4's scale
``float32(s) / gs``); compressed-tensors rounds it once to bfloat16 (MX,
NVFP4) or to the scale dtype (fp8 blocks), which the float32 result rounds to.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_finite_rows, dtype_name, rows_per_chunk
from .errors import NpquantError
from .packing import pack_codes
from .schemes import Scheme
from .tensor import QuantizedTensor, code_numpy_dtype, code_value_dtype, scale_numpy_dtype, scale_values

__all__ = ["quantize_microscaled", "compute_dtype", "fp4_codes", "e8m0_exponents", "nvfp4_global_scale"]

# float32 values per row chunk (rows of whole blocks for fp8-block)
_CHUNK_ELEMENTS = 1 << 20
# (mantissa bits, exponent bias) of each compute dtype
_FLOAT_BITS = {"float32": (23, 127), "bfloat16": (7, 127), "float16": (10, 15)}
# m (mantissa bits of the element the power-of-two rounding uses) and off (floor(log2(element max)))
_MX = {"fp4_e2m1": (1, 2), "fp6_e2m3": (3, 2), "fp8_e4m3": (1, 8)}


def compute_dtype(w) -> np.dtype:
    """D: the dtype compressed-tensors computes in for ``w`` (float64 is read as float32)."""
    name = dtype_name(w)
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16 if name == "float16" else np.float32)


def _in(x: np.ndarray, d: np.dtype) -> np.ndarray:
    """float32 ``x`` rounded once to ``d`` and back (an op in D); float32 itself unchanged."""
    return x if d == np.float32 else x.astype(d).astype(np.float32)


def fp4_codes(x: np.ndarray) -> np.ndarray:
    """uint8 fp4 e2m1 bit patterns of float32 ``x``: clamped to +-6, ties to even, sign bit ``x < 0``.

    ml_dtypes rounds to the grid; an exact zero (also -0.0) gets code 0,
    as compressed-tensors' ``x < 0`` sign rule gives.
    """
    import ml_dtypes

    codes = np.clip(x, -6.0, 6.0).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    codes[x == 0] = 0
    return codes


def nvfp4_global_scale(absmax: float, d: np.dtype) -> np.ndarray:
    """float32 (1,): ``(1 / max(absmax, tiny(D))) [in D] * 2688 [in D]``; Inf or NaN give 1."""
    f32 = np.float32
    tiny = f32(np.finfo(np.float16).tiny) if d == np.float16 else f32(np.finfo(np.float32).tiny)
    m = np.array([max(f32(absmax), tiny)], f32)
    with np.errstate(over="ignore", divide="ignore"):
        gs = _in(_in(f32(1) / m, d) * f32(2688), d)
    return np.where(np.isfinite(gs), gs, f32(1)).astype(f32)


def e8m0_exponents(amax: np.ndarray, d: np.dtype, dtype: str) -> np.ndarray:
    """uint8 biased exponents E of the MX scales of groups with float32 maxima ``amax`` (values of D)."""
    m_elem, off = _MX[dtype]
    mant, bias = _FLOAT_BITS[np.dtype(d).name]
    if d == np.float32:
        bits = amax.view(np.uint32).astype(np.int64)
    else:
        bits = amax.astype(d).view(np.uint16).astype(np.int64)
    bits += 1 << (mant - m_elem - 1)
    field = bits >> mant  # sign is 0: the exponent field of p2
    e = np.where(field == 0, -1, np.clip(127 + field - bias - off, 0, 255))  # p2 == 0: log2 = -inf
    e = np.maximum(e, 0)
    if d == np.float16:  # 2**(E-127) in float16: an underflow is 0, which becomes 1.0 (E = 127)
        e = np.where(e - 127 < -24, 127, e)
    return e.astype(np.uint8)


def quantize_microscaled(w, scheme: Scheme, name: str, measure: bool):
    """``(QuantizedTensor, (error sum of squares, weight sum of squares) or None)`` by the rules above.

    ``w``: float (O, I), an ndarray or a row source; read in row chunks.
    """
    out_features, in_features = w.shape
    d = compute_dtype(w)
    bo, bi = scheme.block_shape(w.shape)
    if scheme.granularity == "group" and in_features % bi:
        raise NpquantError(f"{name}: group_size={bi} must divide in_features={in_features} (weight shape {w.shape})")
    rows_out, cols_out = scheme.scale_shape(w.shape)
    codes = np.empty((out_features, -(-in_features * scheme.bits // 8)), code_numpy_dtype(scheme))
    scale = np.empty((rows_out, cols_out), scale_numpy_dtype(scheme))
    step = rows_per_chunk(in_features, _CHUNK_ELEMENTS)
    if bo > 1:
        step = max(1, step // bo) * bo  # whole blocks of rows
    global_scale = None
    if scheme.global_scale:
        absmax = 0.0
        for r0 in range(0, out_features, step):
            chunk = _chunk(w, r0, step, name)
            if chunk.size:
                absmax = max(absmax, float(np.abs(chunk).max()))
        global_scale = nvfp4_global_scale(absmax, d)
    for r0 in range(0, out_features, step):
        chunk = _chunk(w, r0, step, name, check=global_scale is None)
        amax = _block_absmax(chunk, bo, bi)  # (RB, CB) values of D
        stored = _scales(amax, scheme, d, global_scale)
        scale[r0 // bo : r0 // bo + amax.shape[0]] = stored
        codes[r0 : r0 + chunk.shape[0]] = _encode(chunk, scale_values(stored, scheme), scheme, d, bo, bi, global_scale)
    qt = QuantizedTensor(codes, scale, None, w.shape, scheme, global_scale)
    if not measure:
        return qt, None
    sums = np.zeros(2)
    for r0 in range(0, out_features, step):
        chunk = _chunk(w, r0, step, name, check=False)
        diff = chunk - qt.dequantize_rows(r0, r0 + chunk.shape[0])
        sums[0] += np.sum(np.square(diff), dtype=np.float64)
        sums[1] += np.sum(np.square(chunk), dtype=np.float64)
    return qt, tuple(float(v) for v in sums)


def _chunk(w, r0: int, step: int, name: str, check: bool = True) -> np.ndarray:
    chunk = np.asarray(w[r0 : r0 + step]).astype(np.float32)  # (R, I)
    if check:
        check_finite_rows(chunk, r0, name)
    return chunk


def _blocks(chunk: np.ndarray, bo: int, bi: int) -> np.ndarray:
    """``(RB, bo, CB, bi)`` view of ``chunk (R, I)`` zero-padded to whole blocks."""
    rows, cols = chunk.shape
    pr, pc = -(-rows // bo) * bo, -(-cols // bi) * bi
    if (pr, pc) != (rows, cols):
        chunk = np.pad(chunk, ((0, pr - rows), (0, pc - cols)))
    return chunk.reshape(pr // bo, bo, pc // bi, bi)


def _block_absmax(chunk: np.ndarray, bo: int, bi: int) -> np.ndarray:
    """float32 ``(RB, CB)``: each block's largest magnitude (zero padding changes no maximum)."""
    return np.abs(_blocks(chunk, bo, bi)).max(axis=(1, 3))


def _scales(amax: np.ndarray, scheme: Scheme, d: np.dtype, global_scale):
    """Stored scales (``scheme.scale_dtype``) from block maxima ``amax (RB, CB)``; the codes are made with their values."""
    f32 = np.float32
    if scheme.scale_dtype == "e8m0":
        return e8m0_exponents(amax, d, scheme.dtype)
    if scheme.scale_dtype == "fp8_e4m3":
        raw = global_scale[0] * _in(amax / f32(6), d)
        s = np.clip(raw, -448, 448).astype(scale_numpy_dtype(scheme))
        s[s.astype(f32) == 0] = f32(0.125)
        return s
    s = _in(amax / f32(448), d)
    s[s == 0] = f32(np.finfo(d).eps)
    return s.astype(scale_numpy_dtype(scheme))


def _encode(chunk: np.ndarray, s_used: np.ndarray, scheme: Scheme, d: np.dtype, bo: int, bi: int,
            global_scale: np.ndarray | None) -> np.ndarray:
    """Stored codes of ``chunk (R, I)`` (packed bytes for fp4/fp6, float8 for fp8) given block scales."""
    rows, cols = chunk.shape
    blocks = _blocks(chunk, bo, bi)  # (RB, bo, CB, bi)
    with np.errstate(under="ignore"):
        if global_scale is not None:  # NVFP4: two float32 divisions
            x = blocks / (s_used / global_scale[0])[:, None, :, None]
        else:
            x = _in(blocks / s_used[:, None, :, None], d)
    x = x.reshape(blocks.shape[0] * bo, -1)[:rows, :cols]  # (R, I)
    if scheme.dtype == "fp4_e2m1":
        return pack_codes(fp4_codes(x), 4)
    if scheme.dtype == "fp6_e2m3":
        return pack_codes(np.clip(x, -7.5, 7.5).astype(code_value_dtype(scheme.dtype)).view(np.uint8), 6)
    x = np.clip(x + np.float32(0), -448, 448)  # + the zero point 0: -0.0 becomes +0.0
    return np.ascontiguousarray(x).astype(code_numpy_dtype(scheme))
