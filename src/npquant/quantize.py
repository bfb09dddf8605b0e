"""The quantization engine: one code path for every scheme.

Rules (all arithmetic in float32, true division, round half to even):

- symmetric int, ``b`` bits: ``qmax = 2**(b-1) - 1``;
  ``scale = absmax(block) / qmax``; ``q = clip(round(w / scale), -qmax, qmax)``;
  dequantized ``float32(q) * scale``.
- asymmetric int: ``lo = min(min(block), 0)``, ``hi = max(max(block), 0)``;
  ``scale = (hi - lo) / (2**b - 1)``; ``zero_point = clip(round(-lo / scale), 0, 2**b - 1)``;
  ``q = clip(round(w / scale) + zero_point, 0, 2**b - 1)``;
  dequantized ``(float32(q) - float32(zero_point)) * scale``.
- fp8: ``scale = absmax(block) / fmax`` (448 for e4m3, 57344 for e5m2);
  codes are ``w / scale`` cast to ``float8_e4m3fn`` / ``float8_e5m2`` (round to
  nearest even); dequantized ``float32(codes) * scale``.
- A block whose scale is 0 (all zeros) gets codes 0 (zero point 0) and
  dequantizes to 0, without warnings.
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

import functools
from dataclasses import dataclass

import numpy as np

from ._backends import resolve_backend
from ._checks import check_finite_rows, check_weight, dtype_name, rows_per_chunk
from .errors import NpquantError
from .packing import pack_codes, packed_row_bytes, unpack_codes
from .schemes import FLOAT_BITS, Scheme, get_scheme

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
# Bytes per step of the fp8 non-finite scan (bounds its temporary mask).
_FP8_SCAN_BYTES = 16 << 20


def scale_numpy_dtype(scheme: Scheme) -> np.dtype:
    """The numpy dtype scales are stored in (``"e8m0"``: uint8, the biased exponent)."""
    if scheme.scale_dtype in ("bfloat16", "fp8_e4m3"):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16 if scheme.scale_dtype == "bfloat16" else ml_dtypes.float8_e4m3fn)
    if scheme.scale_dtype == "e8m0":
        return np.dtype(np.uint8)
    return np.dtype(scheme.scale_dtype)


def code_numpy_dtype(scheme: Scheme) -> np.dtype:
    """The dtype of :attr:`QuantizedTensor.codes`.

    uint8 when packed (bits < 8: int2-7, fp4 and fp6 as their bit patterns)
    or asymmetric, int8 for symmetric int8, ml_dtypes' float8 for fp8.
    """
    if scheme.dtype in ("fp8_e4m3", "fp8_e5m2"):
        return code_value_dtype(scheme.dtype)
    if scheme.packed or not scheme.symmetric:
        return np.dtype(np.uint8)
    return np.dtype(np.int8)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized weight: codes, scales, zero points, shape and scheme.

    Attributes
    ----------
    codes : ndarray
        ``(O, ceil(I * bits / 8))`` uint8 when packed (bits < 8; see
        :mod:`npquant.packing`, stored value ``q + 2**(bits-1)`` symmetric,
        ``q`` asymmetric, the bit pattern for fp4/fp6); otherwise ``(O, I)``
        int8 (symmetric int8), uint8 (asymmetric int8) or float8 (fp8).
    scale : ndarray ``scheme.scale_shape(shape)`` in ``scheme.scale_dtype``
        (``"e8m0"``: uint8 biased exponents ``E``, the scale is ``2**(E-127)``)
    zero_point : uint8 ndarray, same shape as ``scale``, or None (symmetric)
    shape : (O, I)
    scheme : Scheme
    global_scale : float32 ndarray (1,) or None
        NVFP4 only: each block's scale is ``float32(scale) / global_scale``.
    perm : int64 ndarray (I,) or None
        Input columns in stored order: codes and scales describe
        ``W[:, perm]`` (act-order groups read from a ``weight_g_idx``);
        None for the plain order. :meth:`dequantize` returns ``W`` itself.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    shape: tuple[int, int]
    scheme: Scheme
    global_scale: np.ndarray | None = None
    perm: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        out_features, in_features = self.shape
        scheme = self.scheme
        bo, bi = scheme.block_shape(self.shape)
        want_codes = (
            (out_features, packed_row_bytes(in_features, scheme.bits)) if scheme.packed else self.shape
        )
        if self.codes.shape != want_codes or self.codes.dtype != code_numpy_dtype(scheme):
            raise NpquantError(
                f"codes must be {code_numpy_dtype(scheme).name} {want_codes} for {scheme} and shape "
                f"{self.shape}, got {dtype_name(self.codes)} {self.codes.shape}"
            )
        want_scale = scheme.scale_shape(self.shape)
        if self.scale.shape != want_scale or self.scale.dtype != scale_numpy_dtype(scheme):
            raise NpquantError(
                f"scale must be {scheme.scale_dtype} {want_scale}, got {dtype_name(self.scale)} {self.scale.shape}"
            )
        if scheme.symmetric != (self.zero_point is None):
            raise NpquantError(
                "zero_point must be given exactly when the scheme is asymmetric "
                f"(symmetric={scheme.symmetric}, zero_point={'None' if self.zero_point is None else 'array'})"
            )
        if self.zero_point is not None and (
            self.zero_point.shape != want_scale or self.zero_point.dtype != np.uint8
        ):
            raise NpquantError(
                f"zero_point must be uint8 {want_scale}, got {dtype_name(self.zero_point)} {self.zero_point.shape}"
            )
        if scheme.global_scale != (self.global_scale is not None):
            raise NpquantError(
                f"global_scale must be given exactly when scale_dtype='fp8_e4m3' (NVFP4), "
                f"got {'None' if self.global_scale is None else 'array'} for {scheme.scale_dtype!r} scales"
            )
        if self.global_scale is not None and (
            self.global_scale.shape != (1,) or self.global_scale.dtype != np.float32
            or not (np.isfinite(self.global_scale).all() and self.global_scale[0] > 0)
        ):
            raise NpquantError(
                f"global_scale must be a positive finite float32 (1,), got {dtype_name(self.global_scale)} "
                f"{self.global_scale.shape} {self.global_scale.ravel()[:1].tolist()}"
            )
        if self.perm is not None:
            p = self.perm
            if (p.shape != (in_features,) or p.dtype != np.int64
                    or not np.array_equal(np.sort(p), np.arange(in_features))):
                raise NpquantError(f"perm must be a permutation of range({in_features}) as int64 (I,), "
                                   f"got {dtype_name(p)} {p.shape}")
        if scheme.dtype in ("fp8_e4m3", "fp8_e5m2"):
            _check_fp8_codes_finite(self.codes, scheme.dtype)
        if scheme.scale_dtype in ("fp8_e4m3", "e8m0"):
            _check_small_scales(self.scale, scheme.scale_dtype)

    @classmethod
    def from_int_codes(cls, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                       scheme: Scheme | str) -> "QuantizedTensor":
        """Build a tensor from unpacked int codes, e.g. those a calibrated method chose.

        Parameters
        ----------
        q : integer array (O, I)
            Codes in ``[qmin, qmax]``: signed when symmetric, unsigned with a
            zero point. Packed (below 8 bits) as :func:`quantize` packs them.
        scale, zero_point : as the attributes (``zero_point`` None when symmetric)
        scheme : an int Scheme or preset name
        """
        scheme = get_scheme(scheme)
        if scheme.is_float:
            raise NpquantError(f"from_int_codes takes int schemes, got dtype={scheme.dtype!r}")
        q = np.asarray(q)
        if q.ndim != 2 or q.dtype.kind not in "iu":
            raise NpquantError(f"q must be 2-D integer codes (out_features, in_features), got {q.dtype} {q.shape}")
        if q.size and (q.min() < scheme.qmin or q.max() > scheme.qmax):
            raise NpquantError(
                f"q holds codes in [{int(q.min())}, {int(q.max())}]; {scheme} takes [{scheme.qmin}, {scheme.qmax}]"
            )
        if scheme.packed:
            offset = 1 << (scheme.bits - 1) if scheme.symmetric else 0
            codes = pack_codes((q.astype(np.int16) + offset).astype(np.uint8), scheme.bits)
        else:
            codes = q.astype(code_numpy_dtype(scheme))
        return cls(codes, scale, zero_point, q.shape, scheme)

    # --- accounting ----------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Exact bytes held: codes + scale (+ zero point).

        ``O * ceil(I * bits / 8) + n_blocks * scale_bytes (+ n_blocks)``
        (+ 4 for NVFP4's global scale).
        """
        total = self.codes.nbytes + self.scale.nbytes
        if self.zero_point is not None:
            total += self.zero_point.nbytes
        if self.global_scale is not None:
            total += self.global_scale.nbytes
        return int(total)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (O * I)``: storage cost per weight, scales included."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(block_rows, block_cols)`` sharing one scale."""
        return self.scheme.block_shape(self.shape)

    # --- decoding ------------------------------------------------------
    def int_codes(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Unpacked codes of rows ``[start, stop)``.

        Returns int8 ``(R, I)`` for symmetric int (in ``[-qmax, qmax]``),
        uint8 for asymmetric int (in ``[0, 2**bits - 1]``), ml_dtypes'
        float8/float6/float4 for float codes. Columns in stored order (see ``perm``).
        """
        scheme = self.scheme
        rows = self.codes[start:stop]
        if not scheme.packed:
            return rows.copy()
        u = unpack_codes(rows, scheme.bits, self.shape[1])
        if scheme.is_float:
            return u.view(code_value_dtype(scheme.dtype))
        if not scheme.symmetric:
            return u
        return (u.astype(np.int16) - (1 << (scheme.bits - 1))).astype(np.int8)

    def row_scales(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 ``(R, ceil(I / block_cols))``: the scale of each block of rows ``[start, stop)``.

        e8m0: ``2**(E - 127)``; NVFP4: ``float32(scale) / global_scale`` (one
        float32 division, as compressed-tensors dequantizes).
        """
        stop = self.shape[0] if stop is None else stop
        index = np.arange(start, stop) // self.block_shape[0]
        return scale_values(self.scale[index], self.scheme, self.global_scale)

    def dequantize_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 ``(R, I)``: rows ``[start, stop)`` of the dequantized weight.

        Allocates the float32 rows and, when packed, one byte per code.
        """
        stored = self.stored_rows(start, stop)
        if self.perm is None:
            return stored
        out = np.empty_like(stored)
        out[:, self.perm] = stored
        return out

    def stored_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 ``(R, I)``: rows ``[start, stop)`` dequantized, columns in stored order (see ``perm``)."""
        stop = self.shape[0] if stop is None else stop
        scheme = self.scheme
        in_features = self.shape[1]
        bi = self.block_shape[1]
        rows = self.codes[start:stop]
        if scheme.packed:
            u = unpack_codes(rows, scheme.bits, in_features)  # (R, I)
            q = _float_code_values(scheme.dtype)[u] if scheme.is_float else u.astype(np.float32)
            if scheme.symmetric and not scheme.is_float:
                q -= np.float32(1 << (scheme.bits - 1))  # stored offset; exact
        else:
            q = rows.astype(np.float32)  # (R, I)
        n_rows = q.shape[0]
        n_col_blocks = -(-in_features // bi)
        if n_col_blocks * bi != in_features:  # blocks cut at the edge
            q = np.pad(q, ((0, 0), (0, n_col_blocks * bi - in_features)))
        q = q.reshape(n_rows, n_col_blocks, bi)  # (R, CB, bi)
        if self.zero_point is not None:
            index = np.arange(start, stop) // self.block_shape[0]
            q -= self.zero_point[index].astype(np.float32)[:, :, None]
        q *= self.row_scales(start, stop)[:, :, None]
        q = q.reshape(n_rows, n_col_blocks * bi)
        return q if q.shape[1] == in_features else np.ascontiguousarray(q[:, :in_features])

    def dequantize(self) -> np.ndarray:
        """float32 ``(O, I)``: the weight the codes stand for."""
        return self.dequantize_rows(0, self.shape[0])

    def in_stored_order(self) -> "QuantizedTensor":
        """The same arrays without ``perm``: the weight ``W[:, perm]``, for ``x[..., perm]``."""
        return QuantizedTensor(self.codes, self.scale, self.zero_point, self.shape, self.scheme, self.global_scale)


@functools.cache
def _float_code_values(dtype: str) -> np.ndarray:
    """float32 (2**bits,): the value of every fp4/fp6 bit pattern (a table: ml_dtypes converts these one by one)."""
    return np.arange(1 << FLOAT_BITS[dtype], dtype=np.uint8).view(code_value_dtype(dtype)).astype(np.float32)


def code_value_dtype(dtype: str) -> np.dtype:
    """ml_dtypes' dtype of one float code of ``Scheme.dtype`` ``dtype`` (float4_e2m1fn, float6_e2m3fn,
    float8_*); its bits are the stored pattern."""
    import ml_dtypes

    return np.dtype({"fp4_e2m1": ml_dtypes.float4_e2m1fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
                     "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}[dtype])


def scale_values(scale: np.ndarray, scheme: Scheme, global_scale: np.ndarray | None = None) -> np.ndarray:
    """float32 values of stored scales: ``2**(E - 127)`` for e8m0, ``float32(s) / global_scale`` for NVFP4."""
    if scheme.scale_dtype == "e8m0":
        return np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
    values = scale.astype(np.float32, copy=global_scale is not None)  # float32 scales: no copy
    if global_scale is not None:
        values /= global_scale[0]
    return values


def _check_small_scales(scale: np.ndarray, scale_dtype: str) -> None:
    """Refuse NaN e8m0 bytes (0xFF) and NaN or negative fp8 scales: they mean corrupt data."""
    raw = scale.view(np.uint8)
    bad = (raw == 0xFF) if scale_dtype == "e8m0" else ((raw & 0x7F) == 0x7F) | ((raw & 0x80) != 0) & (raw != 0x80)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        what = "the e8m0 NaN byte 0xFF" if scale_dtype == "e8m0" else "a NaN or negative fp8 e4m3 scale"
        raise NpquantError(f"scale{list(idx)} holds {what} (byte 0x{int(raw[idx]):02X}): scales must be finite "
                           f"and non-negative")


# Bits that are all ones exactly in the NaN (e4m3) or Inf/NaN (e5m2) patterns.
_FP8_NONFINITE_MASK = {"fp8_e4m3": 0x7F, "fp8_e5m2": 0x7C}


def _check_fp8_codes_finite(codes: np.ndarray, dtype: str) -> None:
    """Refuse fp8 codes that are NaN or Inf: quantization never makes them, so they mean corrupt data."""
    raw = codes.view(np.uint8)  # (O, I)
    bad = first_nonfinite_fp8(raw, dtype)
    if bad is not None:
        row, col = divmod(bad, raw.shape[1])
        raise NpquantError(
            f"codes hold a NaN or Inf {dtype} pattern at row {row}, column {col} "
            f"(byte 0x{int(raw[row, col]):02X}): fp8 codes must be finite"
        )


def first_nonfinite_fp8(raw: np.ndarray, dtype: str) -> int | None:
    """The flat index of the first NaN or Inf byte of ``raw`` (uint8, C-contiguous) as ``dtype`` codes, or None.

    Scans ``_FP8_SCAN_BYTES`` (16 MiB) at a time.
    """
    mask = np.uint8(_FP8_NONFINITE_MASK[dtype])
    flat = raw.reshape(-1)
    step = _FP8_SCAN_BYTES
    for start in range(0, flat.size, step):
        bad = np.flatnonzero((flat[start : start + step] & mask) == mask)
        if bad.size:
            return start + int(bad[0])
    return None


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
        from .microscaling import quantize_microscaled

        return quantize_microscaled(w, scheme, name, measure)
    out_features, in_features = w.shape
    bo, bi = scheme.block_shape(w.shape)
    if observer == "mse" and bo != 1:
        raise NpquantError(
            "observer='mse' chooses channel or group scales, not granularity='tensor'; use observer='minmax'"
        )
    fused = _fused_kernel(scheme, w.shape, backend) if observer == "minmax" else None
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
                lo, hi = _mse_range(chunk, lo, hi, scheme, name, importance)
            scale[rows], scale32, zp = _scales(lo, hi, scheme, name)
            if zero_point is not None:
                zero_point[rows] = zp
            codes[rows] = _encode(chunk, scale32, zp, scheme, sums if measure else None)
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
                chunk, scale32[index], None if zp is None else zp[index], scheme, sums if measure else None
            )
    qt = QuantizedTensor(codes, scale, zero_point, w.shape, scheme)
    return qt, (tuple(float(v) for v in sums) if measure else None)


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
    from .kernels._quantizer import quantize_sym_rows

    return quantize_sym_rows


def _fused_rows(kernel, chunk, bi: int, scheme: Scheme, scale_rows: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """Codes of float32 ``chunk`` rows from the numba quantizer (it fills ``scale_rows``, adds to ``sums``)."""
    if scheme.packed:
        stored = np.empty(chunk.shape, np.uint8)
        kernel(chunk, bi, scheme.qmax, 1 << (scheme.bits - 1), stored, scale_rows, sums)
        return pack_codes(stored, scheme.bits)
    codes = np.empty(chunk.shape, np.int8)
    kernel(chunk, bi, scheme.qmax, 0, codes, scale_rows, sums)
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
            scale = hi / f32(scheme.qmax)
        else:
            lo = np.minimum(lo, f32(0))
            hi = np.maximum(hi, f32(0))
            scale = (hi - lo) / f32(scheme.qmax)
        # The engine reads the stored scale, so quantize with it.
        stored = scale.astype(scale_numpy_dtype(scheme))
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


def _mse_range(chunk, lo, hi, scheme: Scheme, name: str, importance: np.ndarray | None):
    """``lo``, ``hi`` ``(R, CB)`` shrunk, block by block, by the factor of least round-trip error."""
    rows, n_col_blocks = hi.shape
    blocks = chunk.reshape(rows, n_col_blocks, -1)  # (R, CB, bi)
    weight = None if importance is None else importance.reshape(1, n_col_blocks, -1)  # (1, CB, bi)
    best_err = best_lo = best_hi = None
    for shrink in MSE_SHRINKS:
        f = np.float32(shrink)
        lo_f, hi_f = lo * f, hi * f
        _, scale32, zp = _scales(lo_f, hi_f, scheme, name)
        diff = blocks - _round_trip(blocks, scale32, zp, scheme)  # (R, CB, bi)
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


def _round_trip(blocks, scale32, zp, scheme: Scheme) -> np.ndarray:
    """float32 ``(R, CB, bi)``: ``blocks`` quantized with ``scale32``/``zp`` ``(R, CB)`` and dequantized."""
    ratio = _safe_divide(blocks, scale32[:, :, None])  # (R, CB, bi)
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


def _encode(chunk, scale32, zp, scheme: Scheme, sums: np.ndarray | None = None) -> np.ndarray:
    """Codes of float32 rows ``chunk (R, I)`` given their blocks' ``scale32``/``zp`` ``(R, CB)``.

    With ``sums``, adds the chunk's squared error against its dequantized
    codes to ``sums[0]`` and its squared norm to ``sums[1]``.
    """
    rows, in_features = chunk.shape
    n_col_blocks = scale32.shape[1]
    blocks = chunk.reshape(rows, n_col_blocks, -1)  # (R, CB, bi)
    ratio = _safe_divide(blocks, scale32[:, :, None])  # (R, CB, bi)
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
