"""Codes in the order the batch-1 kernels read them: the step an engine takes after loading.

An inference engine stores codes and scales as the checkpoint has them
(vLLM's ``create_weights``), then may rearrange them once for its kernel
(``process_weights_after_loading``) before any ``apply``. :func:`prepare`
is that step for the numba backend, for 4-bit codes and one-byte codes
(int8, fp8).

Why: :class:`~npquant.QuantizedTensor` keeps each output row's codes
together. A batch-1 kernel over that layout multiplies a group of one row
with ``x`` in SIMD lanes and must then add the lanes together (a horizontal
sum per row and group: 32 per row for ``w4-g128`` at ``in_features=4096``),
or read several rows at once as as many separate memory streams.
:class:`PreparedTensor` puts ``ROWS`` = 64 output rows side by side instead:
byte ``j`` of 64 consecutive rows is 64 adjacent bytes (one cache line), a
block is read as one stream, each SIMD lane accumulates its own output row,
and no horizontal sum is ever needed. Measured, 11008 x 4096, batch 1:
``w4-g128`` codes in cache 1.1 ms against 1.6 ms; int8 codes from memory
1.43 ms against 1.93 ms.

Layout, ``B = ceil(O / 64)`` blocks of rows, ``G = I / block_cols``, ``N``
bytes of codes per row (``I / 2`` for 4 bits, ``I`` for 8):

- ``codes`` uint8 ``(B, N, 64)``: ``codes[b, j, r]`` is byte ``j`` of row
  ``64 b + r``. 4 bits: low nibble column ``2 j``, high nibble ``2 j + 1``;
  symmetric int nibbles hold ``q`` in two's complement (the stored ``q + 8``
  with its top bit flipped), so the kernel sign-extends it with shifts;
  asymmetric ones the stored ``q`` and fp4 ones the e2m1 pattern, as in the
  checkpoint layout. 8 bits:
  the checkpoint's byte (int8 ``q``, uint8 ``q``, or the fp8 code).
- ``scale`` float32 ``(B, G, 64)``: the scale of row ``64 b + r``, block ``g``;
  for fp4 (NVFP4, MXFP4) uint8 ``(B, G, 64)``: the stored one-byte scale
  itself (NVFP4's fp8 e4m3 bits, MXFP4's e8m0 exponent), a quarter of the
  bytes, decoded by the kernel.
- ``zero_point`` uint8 ``(B, G, 64)`` or None (symmetric, fp8).

Rows past ``O`` (the last block's padding) hold code 0 and scale 0.

**W8A8 int8** (``Scheme.activations == "int8-token"``, ``w8a8-int8``):
:func:`prepare` makes a :class:`PreparedW8A8` instead, the integer GEMM's
layout (:mod:`npquant.kernels._w8a8_core`: uint8 ``(ceil(O / 64), ceil(I /
4), 256)``, byte ``4 r + j`` of quad ``q`` of block ``b`` is code ``(64 b +
r, 4 q + j)``, zeros padding; ``128 * rowsum`` per row for the VNNI
kernel's offset ``x``; the float32 scale per row). fp8 W8A8 tensors
(``w8a8-fp8``) have no kernel of their own and are returned as they are.
The layout holds the same information as the tensor it came from:
:meth:`PreparedTensor.quantized` gives that tensor back, bit for bit.

>>> import numpy as np, npquant
>>> w = np.random.default_rng(0).standard_normal((100, 256)).astype(np.float32)
>>> p = npquant.prepare(npquant.quantize(w, "w4-g128"))
>>> p.codes.shape, p.scale.shape
((2, 128, 64), (2, 2, 64))
>>> np.array_equal(p.dequantize(), npquant.quantize(w, "w4-g128").dequantize())
True
>>> npquant.prepare(npquant.quantize(w, "w8-channel")).codes.shape
(2, 256, 64)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from .errors import NpquantError
from .schemes import Scheme
from .tensor import (QuantizedTensor, _check_small_scales, code_numpy_dtype, first_nonfinite_fp8, scale_numpy_dtype,
                     scale_values)

__all__ = ["PreparedTensor", "PreparedW8A8", "prepare", "preparable", "ROWS"]

#: Output rows side by side in one block of :class:`PreparedTensor`.
ROWS = 64
_SIGN_FLIP = np.uint8(0x88)  # stored q + 8 <-> two's complement q, both nibbles at once


def preparable(scheme: Scheme, shape: tuple[int, int]) -> bool:
    """Whether :func:`prepare` rearranges a tensor of this scheme and shape.

    4-bit int or fp4 codes whose blocks span an even number of columns (so
    that blocks start on a byte), and every one-byte format (int8, fp8) with
    float scales over whole rows.
    """
    if scheme.activations is not None:  # W8A8: PreparedW8A8's layout (int8) or none (fp8)
        return False
    if scheme.dtype == "fp4_e2m1":  # NVFP4, MXFP4: groups of 16 or 32 start on a byte
        return scheme.group_size % 2 == 0
    if scheme.microscaled:
        return False
    if scheme.bits == 8:
        return True
    return not scheme.is_float and scheme.bits == 4 and scheme.block_shape(shape)[1] % 2 == 0


@dataclass(frozen=True, eq=False)
class PreparedTensor:
    """Codes, scales and zero points in blocks of 64 output rows (see the module docstring).

    Attributes
    ----------
    codes : uint8 ``(B, N, 64)``, ``N = I / 2`` (4 bits) or ``I`` (8 bits)
    scale : float32 ``(B, G, 64)``: the stored scales' values; fp4 (NVFP4, MXFP4):
        uint8 ``(B, G, 64)``, the stored scale bytes (fp8 e4m3 bits, not yet
        divided by the global scale; e8m0 exponents)
    zero_point : uint8 ``(B, G, 64)`` or None (symmetric, fp8)
    shape : (O, I)
    scheme : Scheme (4-bit int or fp4 with an even block width, or one-byte codes)
    global_scale : float32 (1,) or None (NVFP4's)
    parts : tuple of int or None: the row counts of the layers stacked in this
        tensor, in order (an engine's fused QKV; vLLM's ``output_partition_sizes``),
        each a multiple of ``ROWS``, summing to ``O``. The large-batch path then
        hands each part to BLAS as that layer alone would be (see :func:`prepare`).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    shape: tuple[int, int]
    scheme: Scheme
    global_scale: np.ndarray | None = None
    parts: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        out_features, in_features = self.shape
        scheme = self.scheme
        if self.parts is not None:
            object.__setattr__(self, "parts", _checked_parts(self.parts, out_features))
        if not preparable(scheme, self.shape):
            raise NpquantError(
                f"PreparedTensor holds one-byte codes or 4-bit int codes in blocks of an even width, got {scheme}"
            )
        n_blocks = -(-out_features // ROWS)
        n_col_blocks = in_features // self.block_shape[1]
        scale_dtype = np.uint8 if scheme.dtype == "fp4_e2m1" else np.float32
        checks = [
            ("codes", self.codes, np.uint8, (n_blocks, in_features * scheme.bits // 8, ROWS)),
            ("scale", self.scale, scale_dtype, (n_blocks, n_col_blocks, ROWS)),
        ]
        if scheme.symmetric != (self.zero_point is None):
            raise NpquantError(f"zero_point must be given exactly when the scheme is asymmetric ({scheme})")
        if self.zero_point is not None:
            checks.append(("zero_point", self.zero_point, np.uint8, (n_blocks, n_col_blocks, ROWS)))
        for name, arr, dtype, shape in checks:
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape or not arr.flags.c_contiguous:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise NpquantError(
                    f"{name} must be C-contiguous {np.dtype(dtype).name} {shape} for shape {self.shape} "
                    f"and {scheme}, got {got}"
                )
        if scale_dtype == np.uint8:  # as QuantizedTensor: NaN or negative scale bytes mean corrupt data
            _check_small_scales(self.scale, scheme.scale_dtype)
        if scheme.dtype in ("fp8_e4m3", "fp8_e5m2"):  # as QuantizedTensor: NaN and Inf codes mean corrupt data
            bad = first_nonfinite_fp8(self.codes, scheme.dtype)
            if bad is not None:
                b, j, r = np.unravel_index(bad, self.codes.shape)
                raise NpquantError(
                    f"codes hold a NaN or Inf {scheme.dtype} pattern at row {b * ROWS + r}, column {j} "
                    f"(byte 0x{int(self.codes[b, j, r]):02X}): fp8 codes must be finite"
                )

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(block_rows, block_cols)`` sharing one scale in the original tensor."""
        return self.scheme.block_shape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales (float32; fp4: one byte) and zero points, one per row and block, padding included."""
        total = self.codes.nbytes + self.scale.nbytes
        if self.zero_point is not None:
            total += self.zero_point.nbytes
        if self.global_scale is not None:
            total += self.global_scale.nbytes
        return int(total)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (O * I)``."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def quantized(self) -> QuantizedTensor:
        """The :class:`~npquant.QuantizedTensor` this was prepared from, bit for bit."""
        return self._rows(0, self.shape[0])

    def dequantize_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 ``(R, I)``: rows ``[start, stop)`` of the dequantized weight."""
        stop = self.shape[0] if stop is None else stop
        return self._rows(start, stop).dequantize()

    def dequantize(self) -> np.ndarray:
        """float32 ``(O, I)``: the weight the codes stand for."""
        return self.dequantize_rows(0, self.shape[0])

    def _rows(self, start: int, stop: int) -> QuantizedTensor:
        """Rows ``[start, stop)`` in the checkpoint layout, as a QuantizedTensor of shape ``(R, I)``."""
        b0, b1 = start // ROWS, -(-stop // ROWS)
        first = start - b0 * ROWS

        def rows_of(blocks: np.ndarray) -> np.ndarray:  # (b, K, 64) -> (R, K)
            flat = blocks[b0:b1].transpose(0, 2, 1).reshape(-1, blocks.shape[1])  # (b * 64, K)
            return np.ascontiguousarray(flat[first : first + stop - start])

        codes = rows_of(self.codes)  # (R, N)
        if self.scheme.bits == 4 and self.zero_point is None and not self.scheme.is_float:
            codes ^= _SIGN_FLIP
        codes = codes.view(code_numpy_dtype(self.scheme))
        scale = rows_of(self.scale)  # (R, G)
        zero_point = None if self.zero_point is None else rows_of(self.zero_point)
        if self.scheme.granularity == "tensor":  # one scale for every row
            scale = scale[:1]
            zero_point = None if zero_point is None else zero_point[:1]
        if scale.dtype == np.uint8:  # fp4: the stored bytes themselves
            scale = scale.view(scale_numpy_dtype(self.scheme))
        else:
            scale = scale.astype(scale_numpy_dtype(self.scheme))  # exact: the values came from this dtype
        return QuantizedTensor(codes, scale, zero_point, (stop - start, self.shape[1]), self.scheme,
                               self.global_scale)


#: Longest rows the W8A8 GEMM takes: int32 sums exact whatever the codes (npquant.linear_w8a8.MAX_INT32_K).
_W8A8_MAX_K = (2**31 - 1) // (128 * 128)


@dataclass(frozen=True, eq=False)
class PreparedW8A8:
    """A ``w8a8-int8`` weight in the integer GEMM's layout (see the module docstring), made by :func:`prepare`.

    Attributes
    ----------
    packed : uint8 ``(ceil(O / 64), ceil(I / 4), 256)``
    corr : int32 ``(64 ceil(O / 64),)``: ``128 * rowsum(codes)``, 0 past ``O``
    w_scale : float32 ``(64 ceil(O / 64),)``: each row's scale, 0 past ``O``
    shape : (O, I)
    scheme : Scheme with ``activations == "int8-token"``
    """

    packed: np.ndarray
    corr: np.ndarray
    w_scale: np.ndarray
    shape: tuple[int, int]
    scheme: Scheme

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.scheme.activations != "int8-token":
            raise NpquantError(f"PreparedW8A8 holds w8a8-int8 weights (activations='int8-token'), got {self.scheme}")
        o, i = self.shape
        n_pad = -(-o // ROWS) * ROWS
        for name, arr, dtype, shape in (("packed", self.packed, np.uint8, (n_pad // ROWS, -(-i // 4), 4 * ROWS)),
                                        ("corr", self.corr, np.int32, (n_pad,)),
                                        ("w_scale", self.w_scale, np.float32, (n_pad,))):
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape or not arr.flags.c_contiguous:
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise NpquantError(f"{name} must be C-contiguous {np.dtype(dtype).name} {shape} for shape {self.shape}, "
                                   f"got {got}")

    @property
    def nbytes(self) -> int:
        """Bytes held: the laid-out codes, the row sums and the scales, padding included."""
        return int(self.packed.nbytes + self.corr.nbytes + self.w_scale.nbytes)

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / (O * I)``."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def quantized(self) -> QuantizedTensor:
        """The :class:`~npquant.QuantizedTensor` this was prepared from, bit for bit."""
        o, i = self.shape
        n_blocks, quads, _ = self.packed.shape
        rows = self.packed.reshape(n_blocks, quads, ROWS, 4).transpose(0, 2, 1, 3).reshape(n_blocks * ROWS, quads * 4)
        codes = np.ascontiguousarray(rows[:o, :i]).view(np.int8)
        scale = self.w_scale[:o].reshape(o, 1).astype(scale_numpy_dtype(self.scheme))  # exact: values of that dtype
        return QuantizedTensor(codes, scale, None, self.shape, self.scheme)

    def dequantize_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 ``(R, I)``: rows ``[start, stop)`` of the dequantized weight."""
        return self.quantized().dequantize_rows(start, stop)

    def dequantize(self) -> np.ndarray:
        """float32 ``(O, I)``: the weight the codes stand for."""
        return self.quantized().dequantize()


def _prepare_w8a8(qt: QuantizedTensor) -> PreparedW8A8 | QuantizedTensor:
    """The integer GEMM's layout of a ``w8a8-int8`` tensor (:mod:`npquant.kernels._w8a8_core`'s ``pack_weight``,
    in numpy here: this module sits below the kernels); ``qt`` itself where the GEMM does not take it."""
    out_features, in_features = qt.shape
    if qt.perm is not None or in_features > _W8A8_MAX_K:
        return qt
    n_pad, k_pad = -(-out_features // ROWS) * ROWS, -(-in_features // 4) * 4
    w = np.zeros((n_pad, k_pad), np.int8)
    w[:out_features, :in_features] = qt.codes
    packed = w.view(np.uint8).reshape(n_pad // ROWS, ROWS, k_pad // 4, 4).transpose(0, 2, 1, 3)  # (B, Q, 64, 4)
    packed = np.ascontiguousarray(packed).reshape(n_pad // ROWS, k_pad // 4, 4 * ROWS)
    corr = (128 * w.astype(np.int64).sum(axis=1)).astype(np.int32)  # |128 rowsum| <= 2**14 I: fits int32
    w_scale = np.zeros(n_pad, np.float32)
    w_scale[:out_features] = scale_values(qt.scale, qt.scheme).reshape(-1)
    return PreparedW8A8(packed, corr, w_scale, qt.shape, qt.scheme)


def _checked_parts(parts, out_features: int) -> tuple[int, ...]:
    """``parts`` as a tuple of ints, each a positive multiple of ``ROWS``, summing to ``out_features``."""
    try:
        sizes = tuple(operator.index(n) for n in parts)
    except TypeError:
        raise NpquantError(f"parts must be a sequence of row counts, got {parts!r}") from None
    if not sizes or any(n <= 0 or n % ROWS for n in sizes) or sum(sizes) != out_features:
        raise NpquantError(f"parts must be positive multiples of {ROWS} rows summing to out_features "
                           f"{out_features}, got {list(sizes)}")
    return sizes


def prepare(qt: QuantizedTensor, parts=None) -> PreparedTensor | PreparedW8A8 | QuantizedTensor:
    """Rearrange ``qt`` for the numba backend's kernels, when a layout of its own helps.

    One-byte codes (``w8-channel``, ``fp8-channel``, ...) and 4-bit int
    codes whose blocks span an even number of columns (``w4-g128``,
    ``w4-channel``, ...) become a :class:`PreparedTensor` (see
    :func:`preparable`); ``w8a8-int8`` tensors a :class:`PreparedW8A8`
    (the integer GEMM's layout; in_features up to 131071); every other
    tensor (``w8a8-fp8`` included) is returned as it is. Any result goes
    to :func:`npquant.linear` with any backend.

    ``parts``: where ``qt`` is several layers' tensors stacked by rows (an
    engine's fused QKV projection, vLLM's ``output_partition_sizes``), their
    row counts, each a multiple of 64. One call still runs the whole tensor,
    and at large batches each part's tiles are handed to BLAS as that layer
    alone would hand them, so every output is that layer's bit for bit:
    BLAS's summation order may depend on the shape of the product it is
    given (OpenBLAS's AVX2 kernels on an AMD EPYC sum some outputs of ``x @
    W.T`` for a 1152-row ``W`` in another order than for its first 384
    rows alone). Kept only where the result is a PreparedTensor.

    Parameters
    ----------
    qt : QuantizedTensor of shape (O, I)
    parts : sequence of int summing to O, or None

    Returns
    -------
    PreparedTensor or PreparedW8A8 (holding the same information; ``.quantized()`` gives ``qt`` back) or ``qt``
    """
    if not isinstance(qt, QuantizedTensor):
        raise NpquantError(f"qt must be a QuantizedTensor (see npquant.quantize), got {type(qt).__name__}")
    scheme = qt.scheme
    out_features, in_features = qt.shape
    if parts is not None:
        parts = _checked_parts(parts, out_features)
    if scheme.activations == "int8-token":
        return _prepare_w8a8(qt)
    if not preparable(scheme, qt.shape) or qt.perm is not None:
        return qt
    n_blocks = -(-out_features // ROWS)
    pad = n_blocks * ROWS - out_features

    def blocks_of(rows: np.ndarray) -> np.ndarray:  # (O, K) -> (B, K, 64), padded with zeros
        rows = np.pad(rows, ((0, pad), (0, 0)))  # (B * 64, K)
        return np.ascontiguousarray(rows.reshape(n_blocks, ROWS, rows.shape[1]).transpose(0, 2, 1))

    codes = qt.codes.view(np.uint8)  # (O, N)
    if scheme.bits == 4 and scheme.symmetric and not scheme.is_float:
        codes = codes ^ _SIGN_FLIP
    index = np.arange(out_features) // qt.block_shape[0]  # the scale row of each weight row
    zero_point = None if qt.zero_point is None else blocks_of(qt.zero_point[index])
    if scheme.dtype == "fp4_e2m1":  # the stored bytes (NVFP4: the global scale stays apart)
        scale = np.ascontiguousarray(qt.scale[index]).view(np.uint8)
    else:
        scale = scale_values(qt.scale[index], scheme)
    return PreparedTensor(blocks_of(codes), blocks_of(scale), zero_point, qt.shape, scheme, qt.global_scale, parts)
