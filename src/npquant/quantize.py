"""The quantization engine: one code path for every scheme.

Rules (all arithmetic in float32, true division, round half to even):

- symmetric int, ``b`` bits, full grid (``Scheme.grid="full"``, the
  default; compressed-tensors' rule, bit for bit):
  ``scale = absmax(block) / (2**(b-1) - 0.5)``, rounded to the scale dtype,
  and a scale of 0 (an all-zero block) becomes that dtype's machine epsilon
  (float32 ``2**-23``, bfloat16 ``2**-7``, float16 ``2**-10``), as
  compressed-tensors stores it; ``q = clip(round(w / scale), -2**(b-1),
  2**(b-1) - 1)``, so int4's ``-7.5`` is ``-8`` and int8's ``-127.5`` is
  ``-128``. Where the weight and the scales share a 16-bit dtype ``D``
  (bfloat16 or float16: compressed-tensors' scales for such a model),
  ``w / scale`` is rounded to ``D`` before it is rounded to an integer, as
  torch divides two ``D`` tensors.
- symmetric int, restricted grid (``grid="restricted"``, npquant's earlier
  rule): ``qmax = 2**(b-1) - 1``; ``scale = absmax(block) / qmax``;
  ``q = clip(round(w / scale), -qmax, qmax)``.
- dequantized ``float32(q) * scale`` (both grids).
- asymmetric int: ``lo = min(min(block), 0)``, ``hi = max(max(block), 0)``;
  ``scale = (hi - lo) / (2**b - 1)``; ``zero_point = clip(round(-lo / scale), 0, 2**b - 1)``;
  ``q = clip(round(w / scale) + zero_point, 0, 2**b - 1)``;
  dequantized ``(float32(q) - float32(zero_point)) * scale``.
- fp8: ``scale = absmax(block) / fmax`` (448 for e4m3, 57344 for e5m2);
  codes are ``w / scale`` cast to ``float8_e4m3fn`` / ``float8_e5m2`` (round to
  nearest even); dequantized ``float32(codes) * scale``.
- Otherwise a block whose scale is 0 (all zeros) gets codes 0 (zero point
  0) and dequantizes to 0, without warnings.
- With a float16/bfloat16 ``scale_dtype`` the scale is rounded to that dtype
  first and the codes are computed with the rounded scale.

With ``observer="mse"`` each block's ``lo``/``hi`` (symmetric: ``absmax``)
is first multiplied by the factor of :data:`MSE_SHRINKS` whose round trip
(the rules above, with that range) has the least squared error over the
block, optionally weighted per input column (GPTQ passes its Hessian's
diagonal); ties keep the larger range, so 1.0 (minmax) wins unless a shrink
is strictly better. Channel and group scales only.

Blocks follow :meth:`Scheme.block_shape`; the scale has shape
``(O // block_rows, I // block_cols)``: ``(1, 1)`` per tensor, ``(O, 1)`` per
channel, ``(O, I // group_size)`` per group.

>>> import numpy as np
>>> w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
>>> qt = quantize(w, "w4-g128")
>>> qt.codes.shape, qt.scale.shape, qt.dequantize().shape, qt.nbytes
((64, 128), (64, 2), (64, 256), 8704)
"""

from __future__ import annotations

import numpy as np

from ._backends import resolve_backend
from ._checks import check_finite_rows, check_weight, dtype_name, rows_per_chunk
from .errors import NpquantError
from .microscaling import quantize_microscaled
from .packing import pack_codes, packed_row_bytes
from .schemes import Scheme, get_scheme
from .tensor import QuantizedTensor, code_numpy_dtype, scale_numpy_dtype

__all__ = ["QuantizedTensor", "quantize", "quantize_measured", "scale_numpy_dtype", "code_numpy_dtype", "OBSERVERS"]

#: How the engine picks each block's range: ``"minmax"`` (the block's own
#: extremes, the rules above) or ``"mse"`` (the shrink of that range, from
#: :data:`MSE_SHRINKS`, whose round trip has the least squared error).
OBSERVERS = ("minmax", "mse")
#: The ``"mse"`` observer's candidates: the range times 1.00, 0.99, ..., 0.80.
MSE_SHRINKS = tuple(1.0 - k / 100 for k in range(21))

# float32 values per row chunk of the engine (1 MiB: its passes stay in L2).
# Read at each call, so tests can shrink it to exercise many chunks.
_CHUNK_ELEMENTS = 1 << 18


def quantize(w: np.ndarray, scheme: Scheme | str, *, name: str = "w", backend: str = "auto",
             observer: str = "minmax") -> QuantizedTensor:
    """Quantize a weight matrix with a scheme (a :class:`Scheme` or a preset name).

    See :func:`quantize_measured` for the same with its error measured on the way.

    Parameters
    ----------
    w : float16, bfloat16, float32 or float64 (O, I)
        The weight, ``(out_features, in_features)``. Never modified; read in
        row chunks, so a memory-mapped ``w`` is never copied whole.
    scheme : Scheme or str
    name : str
        How error messages call ``w``.
    backend : {"auto", "numpy", "numba"}
        ``"numba"`` runs symmetric int codes with channel or group scales in
        one fused pass (same codes and scales, bit for bit); other schemes,
        and ``"numpy"``, use numpy. ``"auto"``: numba when installed.
    observer : {"minmax", "mse"}
        How each block's range is chosen (see the module docstring); ``"mse"``
        takes channel and group scales only.

    Returns
    -------
    QuantizedTensor
    """
    return _quantize(w, scheme, name, measure=False, backend=backend, observer=observer)[0]


def quantize_measured(
    w, scheme: Scheme | str, *, name: str = "w", backend: str = "auto", observer: str = "minmax"
) -> tuple[QuantizedTensor, float, float]:
    """:func:`quantize`, plus ``(relative_error, sqnr_db)`` measured chunk by chunk as it goes.

    The error of each float32 chunk against its dequantized codes is summed
    while the chunk is at hand (squares in float32, sums in float64), so a
    big or memory-mapped ``w`` is read once more only for per-tensor scales.
    Same codes and scales as :func:`quantize`.
    """
    qt, (err2, ref2) = _quantize(w, scheme, name, measure=True, backend=backend, observer=observer)
    if err2 == 0.0:
        return qt, 0.0, float("inf")
    if ref2 == 0.0:
        return qt, float("inf"), float("-inf")
    rel = float(np.sqrt(err2 / ref2))
    return qt, rel, float(-20.0 * np.log10(rel))


def _quantize(w, scheme, name: str, measure: bool, backend: str = "auto", observer: str = "minmax",
              importance: np.ndarray | None = None):
    """The engine: ``(QuantizedTensor, (error sum of squares, weight sum of squares) or None)``.

    ``importance``: float32 ``(I,)`` weights of the ``"mse"`` observer's squared errors, or None.
    """
    scheme = get_scheme(scheme)
    check_weight(w, name)
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {OBSERVERS}")
    if scheme.microscaled:
        if observer != "minmax":
            raise NpquantError(f"observer={observer!r} is not for {scheme.dtype} with {scheme.scale_dtype} scales: "
                               f"these formats follow compressed-tensors' min-max rules; use observer='minmax'")
        return quantize_microscaled(w, scheme, name, measure)
    out_features, in_features = w.shape
    bo, bi = scheme.block_shape(w.shape)
    if observer == "mse" and bo != 1:
        raise NpquantError(
            "observer='mse' chooses channel or group scales, not granularity='tensor'; use observer='minmax'"
        )
    ratio_dtype = _ratio_dtype(w, scheme)
    fused = _fused_kernel(scheme, w.shape, backend) if observer == "minmax" and ratio_dtype is None else None
    n_col_blocks = in_features // bi
    step = rows_per_chunk(in_features, _CHUNK_ELEMENTS)
    codes = np.empty(
        (out_features, packed_row_bytes(in_features, scheme.bits)) if scheme.packed else w.shape,
        dtype=code_numpy_dtype(scheme),
    )
    scale = np.empty((out_features // bo, n_col_blocks), scale_numpy_dtype(scheme))
    zero_point = None if scheme.symmetric else np.empty(scale.shape, np.uint8)

    sums = np.zeros(2)  # squared error, squared weight
    if bo == 1:
        # Channel and group scales depend on their own row alone: one pass.
        for r0, chunk in _row_chunks(w, step, name):
            rows = slice(r0, r0 + chunk.shape[0])
            if fused is not None:
                codes[rows] = _fused_rows(fused, chunk, bi, scheme, scale[rows], sums)
                continue
            lo, hi = _block_stats(chunk, n_col_blocks, bi, scheme.symmetric)
            if observer == "mse":
                lo, hi = _mse_range(chunk, lo, hi, scheme, name, importance, ratio_dtype)
            scale[rows], scale32, zp = _scales(lo, hi, scheme, name)
            if zero_point is not None:
                zero_point[rows] = zp
            codes[rows] = _encode(chunk, scale32, zp, scheme, sums if measure else None, ratio_dtype)
    else:
        # One scale for all rows: statistics first, then codes.
        lo_rows = np.empty((out_features, n_col_blocks), np.float32)
        hi_rows = np.empty((out_features, n_col_blocks), np.float32)
        for r0, chunk in _row_chunks(w, step, name):
            rows = slice(r0, r0 + chunk.shape[0])
            lo_rows[rows], hi_rows[rows] = _block_stats(chunk, n_col_blocks, bi, scheme.symmetric)
        lo = lo_rows.reshape(-1, bo, n_col_blocks).min(axis=1)  # (RB, CB)
        hi = hi_rows.reshape(-1, bo, n_col_blocks).max(axis=1)  # (RB, CB)
        scale[:], scale32, zp = _scales(lo, hi, scheme, name)
        if zero_point is not None:
            zero_point[:] = zp
        for r0, chunk in _row_chunks(w, step, name, check=False):
            index = np.arange(r0, r0 + chunk.shape[0]) // bo
            codes[r0 : r0 + chunk.shape[0]] = _encode(
                chunk, scale32[index], None if zp is None else zp[index], scheme, sums if measure else None,
                ratio_dtype,
            )
    qt = QuantizedTensor(codes, scale, zero_point, w.shape, scheme)
    return qt, (tuple(float(v) for v in sums) if measure else None)


def _full_int_grid(scheme: Scheme) -> bool:
    """True for symmetric int codes on the full grid (compressed-tensors' rule)."""
    return scheme.dtype == "int" and scheme.symmetric and scheme.grid == "full"


def _ratio_dtype(w, scheme: Scheme) -> np.dtype | None:
    """The 16-bit dtype ``w / scale`` is rounded to (full grid, weight and scales both bfloat16 or float16), else None.

    torch divides a ``D`` weight by ``D`` scales in float32 and rounds the
    quotient to ``D``; with float32 on either side the quotient is float32.
    """
    if not _full_int_grid(scheme) or scheme.scale_dtype not in ("bfloat16", "float16"):
        return None
    return scale_numpy_dtype(scheme) if dtype_name(w) == scheme.scale_dtype else None


#: Machine epsilon of each scale dtype: the full grid's scale of an all-zero block, as compressed-tensors stores it.
_EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _fused_kernel(scheme: Scheme, shape, backend: str):
    """The numba quantizer when ``backend`` asks for it and the scheme has it, else None."""
    if resolve_backend(backend) == "numpy":
        return None
    fits = (
        scheme.dtype == "int" and scheme.symmetric and scheme.scale_dtype == "float32"
        and scheme.block_shape(shape)[0] == 1
    )
    if not fits:
        return None
    from ._quantize_numba import quantize_sym_rows

    return quantize_sym_rows


def _fused_rows(kernel, chunk, bi: int, scheme: Scheme, scale_rows: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Codes of float32 ``chunk`` rows from the numba quantizer (it fills ``scale_rows``, adds to ``sums``)."""
    zero_scale = _EPS["float32"] if _full_int_grid(scheme) else 0.0
    limits = (scheme.qmin, scheme.qmax, scheme.scale_divisor, zero_scale)
    if scheme.packed:
        stored = np.empty(chunk.shape, np.uint8)
        kernel(chunk, bi, *limits, 1 << (scheme.bits - 1), stored, scale_rows, sums)
        return pack_codes(stored, scheme.bits)
    codes = np.empty(chunk.shape, np.int8)
    kernel(chunk, bi, *limits, 0, codes, scale_rows, sums)
    return codes


def _row_chunks(w, step: int, name: str, check: bool = True):
    """Yield ``(r0, float32 rows)`` of ``w`` in chunks of ``step`` rows, refusing NaN/Inf rows."""
    for r0 in range(0, w.shape[0], step):
        chunk = np.asarray(w[r0 : r0 + step]).astype(np.float32)  # (R, I)
        if check:
            check_finite_rows(chunk, r0, name)
        yield r0, chunk


def _block_stats(chunk: np.ndarray, n_col_blocks: int, bi: int, symmetric: bool):
    """float32 ``(R, CB)`` block minimum and maximum (symmetric: ``lo`` unused, ``hi`` = absmax)."""
    blocks = chunk.reshape(chunk.shape[0], n_col_blocks, bi)  # (R, CB, bi)
    if symmetric:
        return np.zeros((chunk.shape[0], n_col_blocks), np.float32), np.abs(blocks).max(axis=2)
    return blocks.min(axis=2), blocks.max(axis=2)


def _scales(lo: np.ndarray, hi: np.ndarray, scheme: Scheme, name: str):
    """Stored scale (scale dtype), the float32 scale codes are made with, and the zero point."""
    f32 = np.float32
    with np.errstate(over="ignore"):
        if scheme.symmetric:
            scale = hi / f32(scheme.scale_divisor)  # 7.5, 127.5, ... are exact in float32
        else:
            lo = np.minimum(lo, f32(0))
            hi = np.maximum(hi, f32(0))
            scale = (hi - lo) / f32(scheme.scale_divisor)
        # The engine reads the stored scale, so quantize with it.
        stored = scale.astype(scale_numpy_dtype(scheme))
    if _full_int_grid(scheme) and not stored.all():
        stored[stored == 0] = _EPS[scheme.scale_dtype]  # compressed-tensors' scale of an all-zero block
    scale32 = stored.astype(f32)
    if not np.isfinite(scale32).all():
        raise NpquantError(
            f"{name}: a scale overflows {scheme.scale_dtype} (weights up to {float(np.abs(hi).max()):.3g}); "
            f"use scale_dtype='float32'"
        )
    zp = None
    if not scheme.symmetric:
        zp = np.clip(np.rint(_safe_divide(-lo, scale32)), 0, scheme.qmax).astype(np.uint8)
    return stored, scale32, zp


def _mse_range(chunk, lo, hi, scheme: Scheme, name: str, importance: np.ndarray | None, ratio_dtype=None):
    """``lo``, ``hi`` ``(R, CB)`` shrunk, block by block, by the factor of least round-trip error."""
    rows, n_col_blocks = hi.shape
    blocks = chunk.reshape(rows, n_col_blocks, -1)  # (R, CB, bi)
    weight = None if importance is None else importance.reshape(1, n_col_blocks, -1)  # (1, CB, bi)
    best_err = best_lo = best_hi = None
    for shrink in MSE_SHRINKS:
        f = np.float32(shrink)
        lo_f, hi_f = lo * f, hi * f
        _, scale32, zp = _scales(lo_f, hi_f, scheme, name)
        diff = blocks - _round_trip(blocks, scale32, zp, scheme, ratio_dtype)  # (R, CB, bi)
        np.square(diff, out=diff)
        if weight is not None:
            diff *= weight
        err = diff.sum(axis=2, dtype=np.float64)  # (R, CB)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo_f, hi_f
            continue
        better = err < best_err  # ties keep the larger range
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, lo_f, best_lo)
        best_hi = np.where(better, hi_f, best_hi)
    return best_lo, best_hi


def _round_trip(blocks, scale32, zp, scheme: Scheme, ratio_dtype=None) -> np.ndarray:
    """float32 ``(R, CB, bi)``: ``blocks`` quantized with ``scale32``/``zp`` ``(R, CB)`` and dequantized."""
    ratio = _ratio(blocks, scale32, ratio_dtype)  # (R, CB, bi)
    if scheme.is_float:
        np.clip(ratio, -scheme.qmax, scheme.qmax, out=ratio)
        levels = ratio.astype(code_numpy_dtype(scheme)).astype(np.float32)
    else:
        np.rint(ratio, out=ratio)
        if zp is not None:
            zp32 = zp.astype(np.float32)[:, :, None]
            ratio += zp32
            np.clip(ratio, scheme.qmin, scheme.qmax, out=ratio)
            ratio -= zp32
        else:
            np.clip(ratio, scheme.qmin, scheme.qmax, out=ratio)
        levels = ratio
    levels *= scale32[:, :, None]
    return levels


def _ratio(blocks, scale32, ratio_dtype) -> np.ndarray:
    """float32 ``blocks (R, CB, bi) / scale32 (R, CB)`` (0 where the scale is 0), rounded to ``ratio_dtype``
    if given."""
    ratio = _safe_divide(blocks, scale32[:, :, None])  # (R, CB, bi)
    if ratio_dtype is not None:
        with np.errstate(over="ignore"):
            ratio = ratio.astype(ratio_dtype).astype(np.float32)  # a float16 overflow is Inf, then clipped
    return ratio


def _encode(chunk, scale32, zp, scheme: Scheme, sums: np.ndarray | None = None, ratio_dtype=None) -> np.ndarray:
    """Codes of float32 rows ``chunk (R, I)`` given their blocks' ``scale32``/``zp`` ``(R, CB)``.

    With ``sums``, adds the chunk's squared error against its dequantized
    codes to ``sums[0]`` and its squared norm to ``sums[1]``. ``ratio_dtype``:
    see :func:`_ratio_dtype`.
    """
    rows, in_features = chunk.shape
    n_col_blocks = scale32.shape[1]
    blocks = chunk.reshape(rows, n_col_blocks, -1)  # (R, CB, bi)
    ratio = _ratio(blocks, scale32, ratio_dtype)  # (R, CB, bi)
    if scheme.is_float:
        np.clip(ratio, -scheme.qmax, scheme.qmax, out=ratio)
        codes = ratio.reshape(rows, in_features).astype(code_numpy_dtype(scheme))
        if sums is not None:
            np.copyto(ratio, codes.reshape(ratio.shape), casting="unsafe")  # float32(codes)
            _add_error(sums, blocks, ratio, scale32)
        return codes
    np.rint(ratio, out=ratio)
    if zp is not None:
        zp32 = zp.astype(np.float32)[:, :, None]
        ratio += zp32
    np.clip(ratio, scheme.qmin, scheme.qmax, out=ratio)
    if sums is not None:
        levels = ratio - zp32 if zp is not None else ratio.copy()  # float32(q) - float32(zp), exact
        _add_error(sums, blocks, levels, scale32)
    q = ratio.reshape(rows, in_features)
    if scheme.packed:
        q += np.float32(0 if zp is not None else 1 << (scheme.bits - 1))  # stored values
        return pack_codes(q.astype(np.uint8), scheme.bits)
    return q.astype(code_numpy_dtype(scheme))


def _add_error(sums: np.ndarray, blocks: np.ndarray, levels: np.ndarray, scale32: np.ndarray) -> None:
    """``sums += (sum (w - levels * scale)**2, sum w**2)``; ``levels`` is overwritten.

    ``levels * scale`` is the dequantized weight bit for bit (float32 product,
    as in :meth:`QuantizedTensor.dequantize_rows`); the squares are float32,
    their sums float64.
    """
    levels *= scale32[:, :, None]
    np.subtract(blocks, levels, out=levels)
    sums[0] += np.sum(np.square(levels, out=levels), dtype=np.float64)
    sums[1] += np.sum(np.square(blocks), dtype=np.float64)


def _safe_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 ``a / b`` with 0 where ``b == 0`` (no warning); ``b`` broadcasts against ``a``."""
    shape = np.broadcast_shapes(a.shape, b.shape)
    if b.all():
        out = np.empty(shape, np.float32)
        return np.divide(a, b, out=out)
    out = np.zeros(shape, np.float32)
    np.divide(a, b, out=out, where=b != 0)
    return out
