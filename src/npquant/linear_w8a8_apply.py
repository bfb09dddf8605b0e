"""The W8A8 reference on a tensor: :func:`npquant.linear`'s numpy backend for schemes with activations.

A :class:`~npquant.QuantizedTensor` (or its :class:`~npquant.prepared.PreparedW8A8`)
whose ``scheme.activations`` is ``"int8-token"`` or ``"fp8-token"`` holds
the weight codes ``wq (O, I)`` (int8 or float8_e4m3fn) and one scale per
output row; :func:`w8a8_reference` quantizes ``x`` per token and multiplies
by :mod:`npquant.linear_w8a8`'s exact rules (integer or exact sums, then
``x_scale * (w_scale * float32(acc))`` in float32). The numba backend's
int8 GEMM and fp8 GEMM (exact float64 sums) are bit-equal to it; tensors
neither takes (act-order, rows past their limits) run this function there too.

>>> import numpy as np, npquant
>>> w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
>>> w8a8_reference(np.ones((3, 64), np.float32), npquant.quantize(w, "w8a8-int8")).shape
(3, 32)
"""

from __future__ import annotations

import numpy as np

from .errors import NpquantError
from .linear_w8a8 import w8a8_fp8_linear, w8a8_int8_linear
from .prepared import PreparedW8A8
from .tensor import QuantizedTensor, scale_values

__all__ = ["w8a8_reference", "weight_codes"]


def weight_codes(t: QuantizedTensor | PreparedW8A8) -> tuple[np.ndarray, np.ndarray]:
    """``(wq, w_scale)``: the codes ``(O, I)`` (int8 or float8_e4m3fn) and float32 ``(O,)`` scales of a W8A8 tensor."""
    qt = t.quantized() if isinstance(t, PreparedW8A8) else t
    if qt.scheme.activations is None or qt.scheme.granularity != "channel":
        raise NpquantError(f"a W8A8 tensor (scheme with activations, per-channel scales) was expected, got {qt.scheme}")
    return qt.codes, scale_values(qt.scale, qt.scheme).reshape(-1)


def w8a8_reference(x2: np.ndarray, t: QuantizedTensor | PreparedW8A8) -> np.ndarray:
    """float32 ``(M, O)``: float32 ``x2 (M, I)`` quantized per token by ``t.scheme.activations``, times ``t``'s codes,
    scaled (:func:`npquant.linear_w8a8.w8a8_int8_linear` or :func:`~npquant.linear_w8a8.w8a8_fp8_linear`)."""
    wq, w_scale = weight_codes(t)
    if t.scheme.activations == "int8-token":
        return w8a8_int8_linear(x2, wq, w_scale)
    return w8a8_fp8_linear(x2, wq, w_scale)
