"""The stored form of a quantized weight: :class:`QuantizedTensor`, and the dtypes its codes and scales take.

Below everything that makes these tensors (the engine, :mod:`npquant.quantize`;
the microscaling formats, :mod:`npquant.microscaling`; GPTQ) and everything
that reads them (:mod:`npquant.prepared`, :mod:`npquant.kernels`, the
checkpoint code): it knows how stored codes and scales decode, never how they
were chosen.

>>> from npquant import get_scheme
>>> scheme = get_scheme("w4-g128")
>>> code_numpy_dtype(scheme), scale_numpy_dtype(scheme), scheme.scale_shape((64, 256))
(dtype('uint8'), dtype('float32'), (64, 2))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ._checks import dtype_name
from .errors import NpquantError
from .packing import pack_codes, packed_row_bytes, unpack_codes
from .schemes import FLOAT_BITS, Scheme, get_scheme

__all__ = ["QuantizedTensor", "code_numpy_dtype", "scale_numpy_dtype", "code_value_dtype", "scale_values",
           "first_nonfinite_fp8"]

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
        :mod:`npquant.packing`, stored value ``q + 2**(bits-1)`` symmetric, on
        either grid (int4's -8 is 0),
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

        Returns int8 ``(R, I)`` for symmetric int (in ``[qmin, qmax]``: the
        stored value minus ``2**(bits-1)``, so any of ``[-2**(bits-1), 2**(bits-1) - 1]``),
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
