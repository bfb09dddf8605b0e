"""The lab-01 API: per-channel int8 with one float32 scale per output row.

Thin wrappers over :func:`npquant.quantize` with the lab's own rule: int8
on the restricted grid (codes ``[-127, 127]``, ``scale = absmax / 127``),
``w8-channel-restricted`` and its per-tensor twin, bit for bit the same codes
and scales. (npquant's ``w8-*`` presets use the full grid, ``[-128, 127]``
and ``absmax / 127.5``; the lab keeps its definition.)

>>> import numpy as np
>>> w = np.array([[0.5, -1.0], [0.0, 0.0]], np.float32)
>>> q, scales = quantize_per_channel(w)
>>> q.tolist(), scales.dtype, scales.shape
([[64, -127], [0, 0]], dtype('float32'), (2,))
>>> dequantize(q, scales).shape
(2, 2)
"""

from __future__ import annotations

import numpy as np

from ._checks import dtype_name
from .errors import NpquantError
from .linear import linear
from .quantize import QuantizedTensor, quantize
from .schemes import Scheme

# The lab's definition: int8 codes in [-127, 127], scale = absmax / 127.
_LAB_CHANNEL = Scheme("int", 8, "channel", grid="restricted")
_LAB_TENSOR = Scheme("int", 8, "tensor", grid="restricted")

__all__ = [
    "quantize_per_channel",
    "quantize_per_tensor",
    "dequantize",
    "quant_linear",
    "memory_bytes",
    "memory_bytes_quant",
]


def quantize_per_channel(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and one float32 scale per output row.

    ``scale[o] = max(abs(W[o])) / 127``; ``q[o] = clip(round(W[o] / scale[o]), -127, 127)``.

    Parameters
    ----------
    W : float16, bfloat16, float32 or float64 (O, I)

    Returns
    -------
    q : int8 (O, I)
    scales : float32 (O,)
    """
    qt = quantize(W, _LAB_CHANNEL, name="W")
    return qt.codes, qt.scale[:, 0].copy()


def quantize_per_tensor(W: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """int8 codes and a single float32 scale ``max(abs(W)) / 127``; ``q = clip(round(W / scale), -127, 127)``.

    Returns
    -------
    q : int8 (O, I)
    scale : numpy.float32 scalar
    """
    qt = quantize(W, _LAB_TENSOR, name="W")
    return qt.codes, np.float32(qt.scale[0, 0])


def _as_quantized(q_int8, scales) -> QuantizedTensor:
    """Wrap the lab's ``(q, scales)`` pair; scales ``(O,)``/``(O, 1)`` per channel or a scalar per tensor."""
    if not isinstance(q_int8, np.ndarray) or q_int8.dtype != np.int8 or q_int8.ndim != 2:
        got = f"{dtype_name(q_int8)} {q_int8.shape}" if isinstance(q_int8, np.ndarray) else type(q_int8).__name__
        raise NpquantError(f"q_int8 must be a 2-D int8 array (out_features, in_features), got {got}")
    scales = np.asarray(scales)
    if scales.dtype.kind != "f" and dtype_name(scales) != "bfloat16":
        raise NpquantError(f"scales must be floating, got dtype {dtype_name(scales)}")
    out_features = q_int8.shape[0]
    if scales.shape in ((out_features,), (out_features, 1)):
        scheme = _LAB_CHANNEL
        scale2 = scales.reshape(out_features, 1)
    elif scales.shape in ((), (1,), (1, 1)):
        scheme = _LAB_TENSOR
        scale2 = scales.reshape(1, 1)
    else:
        raise NpquantError(
            f"scales must be a scalar or have shape ({out_features},) for q_int8 {q_int8.shape}, got {scales.shape}"
        )
    if not np.isfinite(scale2.astype(np.float32)).all():
        raise NpquantError("scales holds NaN or Inf")
    return QuantizedTensor(q_int8, scale2.astype(np.float32), None, q_int8.shape, scheme)


def dequantize(q_int8: np.ndarray, scales) -> np.ndarray:
    """float32 ``(O, I)``: ``q * scale`` with ``scales`` ``(O,)`` or a per-tensor scalar."""
    return _as_quantized(q_int8, scales).dequantize()


def quant_linear(x: np.ndarray, q_int8: np.ndarray, scales, backend: str = "auto") -> np.ndarray:
    """float32 ``(..., O)``: ``x @ dequantize(q_int8, scales).T`` for ``x`` ``(I,)`` or ``(..., I)``.

    Runs :func:`npquant.linear`, which never builds the float32 weight.
    """
    return linear(x, _as_quantized(q_int8, scales), backend=backend)


def memory_bytes(W: np.ndarray) -> int:
    """Bytes of the dense weight: ``W.nbytes``."""
    return int(np.asarray(W).nbytes)


def memory_bytes_quant(q_int8: np.ndarray, scales) -> int:
    """Bytes of the quantized weight: ``q.nbytes + scales.nbytes``."""
    return int(np.asarray(q_int8).nbytes + np.asarray(scales).nbytes)
