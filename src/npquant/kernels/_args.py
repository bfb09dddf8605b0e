"""What the kernels take of a tensor: its arrays and constants in the kernels' order, its code kind, and the
placeholders where a kernel reads nothing; worked out once per tensor (:func:`_plan`) and kept beside it.

Below the kernel choice (:mod:`npquant.kernels`): nothing here knows which kernel runs.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np

from ..prepared import ROWS, PreparedTensor
from ..tensor import QuantizedTensor, _float_code_values, scale_numpy_dtype, scale_values
from ._decode import table_values
from ._tiles import dequantize_rows, dequantize_rows_16
from ._vector import VK_BITS, VK_E4M3, VK_E5M2, VK_FP4, VK_FP6, VK_INT4, VK_INT8, VK_UINT8

# _kernel_args' code kind -> the vector kind of dequantize_rows_16 (4, fp8: by its format; 3: VK_BITS + bits)
_VK_OF_KIND = {0: VK_INT8, 1: VK_UINT8, 2: VK_INT4, 5: VK_FP4, 6: VK_FP6}

# Each nibble's value, for the table-lookup kernels: checkpoint-layout symmetric
# int4 (stored q + 8), prepared symmetric int4 (two's complement q), stored q
# (asymmetric), fp4 e2m1.
_NIBBLES = np.arange(16, dtype=np.float32)
_INT4_OFFSET = _NIBBLES - 8
_INT4_TWOS = np.where(_NIBBLES < 8, _NIBBLES, _NIBBLES - 16).astype(np.float32)
_NO_SCALE_TABLE = np.zeros(1, np.float32)
_NO_SCALE_BLOCKS = np.zeros((1, 1, ROWS), np.float32)  # float32 scales of prepared blocks, where codes are read
_NO_SCALE_CODES = np.zeros((1, 1, ROWS), np.uint8)  # scale codes of prepared blocks, where float32 scales are read
# fp8: (e4m3?, power of two taking the float16 the fields make to the value)
_FP8 = {"fp8_e4m3": (1, 2.0**8), "fp8_e5m2": (0, 1.0)}
# e4m3_mults of the batch-1 kernels where no e4m3 is decoded
_NO_E4M3 = np.array([1.0, 1.0, 1.0, 1.0, 2.0**-140, 2.0**100], np.float32)
# code_kind of the one-byte blocks kernels (int8: 0 symmetric, 3 asymmetric)
_BYTE_KIND = {"fp8_e4m3": 1, "fp8_e5m2": 2}
_NO_ZP = np.zeros((1, 1), np.uint8)
_NO_ZP_BLOCKS = np.zeros((1, 1, 1), np.uint8)
_NO_SCALE_2D = np.zeros((0, 1), np.float32)  # float32 scales, where one-byte ones are read as stored
_NO_SCALE_CODES_2D = np.zeros((0, 1), np.uint8)  # one-byte scales, where float32 ones are read


def _code_kind(qt: QuantizedTensor) -> int:
    """How the kernels read ``qt``'s codes: 0 symmetric int8, 1 uint8 with a zero point, 2 4-bit int in
    byte-aligned blocks, 3 a bit stream (int2-7, 4-bit in odd blocks), 4 fp8, 5 fp4 e2m1, 6 fp6 e2m3."""
    scheme = qt.scheme
    if scheme.dtype == "fp4_e2m1":
        return 5
    if scheme.dtype == "fp6_e2m3":
        return 6
    if scheme.is_float:
        return 4
    if scheme.packed:  # the 4-bit fast path reads whole bytes: blocks must start on a byte
        return 2 if scheme.bits == 4 and qt.block_shape[1] % 2 == 0 else 3
    return 1 if qt.zero_point is not None else 0


def _kernel_args(qt: QuantizedTensor, convert_scales: bool = True) -> tuple:
    """The arrays and constants every kernel takes, in order; one-byte scales left out (an empty float32 array in
    their place) where not ``convert_scales``."""
    scheme = qt.scheme
    bo, bi = qt.block_shape
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    scale = _scale_values(qt) if convert_scales or qt.scale.dtype.itemsize != 1 else _NO_SCALE_2D
    has_zp = qt.zero_point is not None
    zp = qt.zero_point if has_zp else _NO_ZP
    fp8_e4m3, fp8_mult = _FP8.get(scheme.dtype, (0, 1.0))
    kind = _code_kind(qt)
    base_off = 1 << (scheme.bits - 1) if kind in (2, 3) and not has_zp else 0
    return (codes, scale, zp, has_zp, bo, bi, kind, scheme.bits, base_off, fp8_e4m3, np.float32(fp8_mult))


# id(tensor) -> (weak reference to it, its plan); an entry leaves when its tensor does
_PLANS: dict[int, tuple] = {}


def _plan(qt: QuantizedTensor) -> tuple:
    """``(kernel args or None, whether its format suits the 4-bit table kernels, whether the kernels read it,
    the table kernels' args or None)`` for ``qt``.

    Worked out at a tensor's first call and kept beside it (not on it: a
    pickled tensor stays the same): a model calls its layers right after
    numpy's own work has left the interpreter's memory out of cache, where
    each line of Python a call saves counts. The arguments are kept only
    when they are the tensor's own arrays (float32 scales), not converted
    copies (bfloat16 or one-byte scales, converted at each call as before),
    which writing into the tensor's scales would leave stale.
    """
    key = id(qt)
    entry = _PLANS.get(key)
    if entry is not None and entry[0]() is qt:
        return entry[1]
    dequantizes = _dequantizes(qt)
    args = _kernel_args(qt) if dequantizes else None
    own = args is not None and np.may_share_memory(args[0], qt.codes) and np.may_share_memory(args[1], qt.scale)
    lut_shape = dequantizes and _lut_rows_shape(qt)
    lut = _lut_args(qt) if lut_shape else None
    lut_own = (lut is not None and np.may_share_memory(lut[1], qt.codes) and np.may_share_memory(lut[2], qt.scale)
               and qt.global_scale is None)  # NVFP4's table is divided by its global scale
    plan = (args if own else None, lut_shape, dequantizes, lut if lut_own else None)
    _PLANS[key] = (weakref.ref(qt, lambda _, key=key: _PLANS.pop(key, None)), plan)
    return plan


def _scale_values(qt: QuantizedTensor) -> np.ndarray:
    """float32 C-contiguous values of ``qt``'s scales; one-byte ones (e8m0, NVFP4's e4m3) looked up in a table of
    their 256 values, compiled (for an 11008 x 4096 weight, medians of 20 calls: NVFP4 4.2 -> 1.0 ms, its
    table divided by the global scale included; MXFP4 and MXFP8 2.0 -> 0.4 ms, where numpy's ``table[codes]``
    took the time)."""
    if qt.scale.dtype.itemsize == 1:
        return table_values(_scale_table(qt.scheme, qt.global_scale), np.ascontiguousarray(qt.scale).view(np.uint8))
    return np.ascontiguousarray(scale_values(qt.scale, qt.scheme, qt.global_scale))


def _lut_rows_shape(qt: QuantizedTensor) -> bool:
    """Whether ``qt``'s format and blocks are those :func:`_lut_rows_fit` asks for."""
    scheme = qt.scheme
    four_bit = scheme.dtype == "fp4_e2m1" or (scheme.packed and not scheme.is_float and scheme.bits == 4)
    bo, bi = qt.block_shape
    fits = (bi % 32 == 0 or (bi == 16 and qt.shape[1] % 32 == 0)) and qt.shape[1] % bi == 0 and qt.shape[0] % bo == 0
    return four_bit and fits


def _vector_kind(args: tuple) -> int | None:
    """The vector kind (``VK_*`` of :mod:`~npquant.kernels._vector`) in which :func:`dequantize_rows_16` reads the
    codes of :func:`_kernel_args` ``args`` (of a tensor :func:`_dequantizes`: its rows are whole blocks), or None
    where it does not: blocks whose columns are not whole 16s."""
    bi, kind, bits, fp8_e4m3 = args[5], args[6], args[7], args[9]
    if bi % 16:
        return None
    if kind == 4:
        return VK_E4M3 if fp8_e4m3 else VK_E5M2
    return _VK_OF_KIND.get(kind, VK_BITS + bits)


def _dequantize_rows_args(qt: QuantizedTensor, args: tuple | None) -> tuple:
    """``(kernel, its arguments before o0)`` of the fastest row kernel reading ``qt``, whose :func:`_kernel_args`
    are ``args`` (None: worked out here, one-byte scales left as stored where the kernel reads them so)."""
    args = args or _kernel_args(qt, convert_scales=False)
    vk = _vector_kind(args)
    coded = args[1] is _NO_SCALE_2D  # one-byte scales (the Scheme allows them for fp4, fp6 and e4m3 codes only)
    if vk is not None and (not coded or vk in (VK_FP4, VK_FP6, VK_E4M3)):
        codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult = args
        if coded:  # read as stored: see dequantize_rows_16
            scale_codes, table = np.ascontiguousarray(qt.scale).view(np.uint8), _scale_table(qt.scheme, qt.global_scale)
        else:
            scale_codes, table = _NO_SCALE_CODES_2D, _NO_SCALE_TABLE
        return dequantize_rows_16, (codes, scale, scale_codes, table, zp, has_zp, bo, bi, vk, base_off, fp8_mult,
                                    False)
    return dequantize_rows, _kernel_args(qt) if coded else args


def _dequantizes(qt: QuantizedTensor) -> bool:
    """Whether the dequantizing and portable kernels read ``qt``: not blocks cut at the weight's edge."""
    bo, bi = qt.block_shape
    return qt.shape[0] % bo == 0 and qt.shape[1] % bi == 0


def _scale_table(scheme, global_scale: np.ndarray | None = None) -> np.ndarray:
    """float32 (256,): the value of each one-byte scale code (e8m0, fp8 e4m3 over ``global_scale`` if given),
    computed as :func:`~npquant.tensor.scale_values` computes each (a float32 division by the global scale)."""
    table = _code_scale_values(scheme)
    return table if global_scale is None else table / global_scale[0]


@functools.cache
def _code_scale_values(scheme) -> np.ndarray:
    """float32 (256,): :func:`~npquant.tensor.scale_values` of every one-byte scale code of ``scheme``.

    Shared by every call: the kernels only read it (a read-only array would
    make numba compile each kernel once more for that type).
    """
    every = np.arange(256, dtype=np.uint8).view(scale_numpy_dtype(scheme))
    with np.errstate(over="ignore", invalid="ignore"):  # the NaN codes: QuantizedTensor and PreparedTensor refuse them
        return np.ascontiguousarray(scale_values(every, scheme), np.float32)


def _lut_args(qt: QuantizedTensor) -> tuple:
    """``(coded, codes, scale, scale_table, zp, has_zp, values, bo)`` for :func:`_run_lut_rows`.

    One-byte scales (e8m0, NVFP4's fp8) stay codes (``coded``), read through
    a table of their 256 values (computed as
    :func:`~npquant.tensor.scale_values` computes each); decoding them all
    would cost more than the call.
    """
    scheme = qt.scheme
    has_zp = qt.zero_point is not None
    if scheme.dtype == "fp4_e2m1":
        values = _float_code_values("fp4_e2m1")
    else:
        values = _NIBBLES if has_zp else _INT4_OFFSET
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    coded = qt.scale.dtype.itemsize == 1
    if coded:
        scale = np.ascontiguousarray(qt.scale).view(np.uint8)
        scale_table = _scale_table(scheme, qt.global_scale)
    else:
        scale = _scale_values(qt)
        scale_table = _NO_SCALE_TABLE
    zp = qt.zero_point if has_zp else np.zeros((1, scale.shape[1]), np.uint8)
    return coded, codes, scale, scale_table, zp, has_zp, values, qt.block_shape[0]


def _prepared_scales(p: PreparedTensor) -> tuple:
    """``(scale, scale_codes, scale_table)`` of the prepared 4-bit kernels: fp4's one-byte scale codes with their
    values in a table (NVFP4's over its global scale, as dequantize divides), int4's float32 scales."""
    if p.scheme.dtype == "fp4_e2m1":
        return _NO_SCALE_BLOCKS, p.scale, _scale_table(p.scheme, p.global_scale)
    return p.scale, _NO_SCALE_CODES, _NO_SCALE_TABLE


def _prepared_zp(p: PreparedTensor) -> tuple:
    """``(zp, has_zp)`` of a prepared tensor, a placeholder where it has no zero point."""
    has_zp = p.zero_point is not None
    return (p.zero_point if has_zp else _NO_ZP_BLOCKS), has_zp


def _y_mult(p: PreparedTensor) -> np.float32:
    """What the batch-1 4-bit kernels multiply ``y`` by: one over NVFP4's global scale, else 1."""
    return np.float32(1.0) if p.global_scale is None else np.float32(1.0) / p.global_scale[0]
