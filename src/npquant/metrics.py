"""Error metrics between a weight and its reconstruction, computed in float64.

>>> import numpy as np
>>> w = np.array([[3.0, 4.0]])
>>> relative_error(w, w), sqnr_db(w, w)
(0.0, inf)
>>> round(sqnr_db(w, w * 1.1), 6)
20.0
"""

from __future__ import annotations

import math

import numpy as np

from .errors import NpquantError

__all__ = [
    "relative_error",
    "sqnr_db",
    "max_abs_error",
    "per_channel_relative_error",
    "output_relative_error",
    "weight_error",
]


def _pair(w, w_hat) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w).astype(np.float64)
    w_hat = np.asarray(w_hat).astype(np.float64)
    if w.shape != w_hat.shape:
        raise NpquantError(f"w_hat must have the shape of w {w.shape}, got {w_hat.shape}")
    return w, w_hat


def _ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 = 0 and x/0 = inf, no warnings."""
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(num / den)


def relative_error(w, w_hat) -> float:
    """``||w - w_hat||_F / ||w||_F``; 0 when both are zero."""
    w, w_hat = _pair(w, w_hat)
    return _ratio(float(np.linalg.norm(w - w_hat)), float(np.linalg.norm(w)))


def sqnr_db(w, w_hat) -> float:
    """Signal to quantization noise ratio ``20 * log10(||w|| / ||w - w_hat||)`` in dB.

    ``inf`` for an exact reconstruction, without warnings.
    """
    rel = relative_error(w, w_hat)
    if rel == 0.0:
        return float("inf")
    if rel == float("inf"):
        return float("-inf")
    return float(-20.0 * np.log10(rel))


def max_abs_error(w, w_hat) -> float:
    """``max |w - w_hat|``."""
    w, w_hat = _pair(w, w_hat)
    return float(np.max(np.abs(w - w_hat))) if w.size else 0.0


def per_channel_relative_error(w, w_hat) -> np.ndarray:
    """float64 ``(O,)``: relative error of each output row; 0 for an exact zero row."""
    w, w_hat = _pair(w, w_hat)
    if w.ndim != 2:
        raise NpquantError(f"w must be 2-D (out_features, in_features), got shape {w.shape}")
    num = np.linalg.norm(w - w_hat, axis=1)
    den = np.linalg.norm(w, axis=1)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    out[(den == 0) & (num != 0)] = np.inf
    return out


def output_relative_error(x, w, w_hat) -> float:
    """Relative Frobenius error of ``x @ w_hat.T`` against ``x @ w.T``.

    ``x`` is ``(..., I)``; ``w`` and ``w_hat`` are ``(O, I)``.
    """
    w, w_hat = _pair(w, w_hat)
    x = np.asarray(x).astype(np.float64)
    if x.shape[-1] != w.shape[1]:
        raise NpquantError(f"x last dimension must be in_features={w.shape[1]}, got x shape {x.shape}")
    y = x @ w.T
    return _ratio(float(np.linalg.norm(y - x @ w_hat.T)), float(np.linalg.norm(y)))


def weight_error(w, qt, rows_per_chunk: int | None = None) -> tuple[float, float]:
    """``(relative_error, sqnr_db)`` of ``qt`` against ``w``, row chunk by row chunk.

    Neither the float32 weight nor its reconstruction is held whole, so this
    works on memory-mapped or row-sliced sources (anything ``w[r0:r1]`` reads).
    Differences and squares are taken in float32 (each rounded by at most
    2**-24 relative; ``w`` itself is float32-exact for float16, bfloat16 and
    float32 inputs) and summed in float64, so the result is within about
    2**-23 relative of the float64 computation, at half its cost.
    """
    from ._checks import rows_per_chunk as default_rows

    out_features, in_features = qt.shape
    step = rows_per_chunk or default_rows(in_features)
    err2 = 0.0
    ref2 = 0.0
    for r0 in range(0, out_features, step):
        r1 = min(r0 + step, out_features)
        w_rows = np.asarray(w[r0:r1]).astype(np.float32).reshape(-1)
        diff = qt.dequantize_rows(r0, r1).reshape(-1)
        np.subtract(w_rows, diff, out=diff)
        err2 += float(np.sum(np.square(diff, out=diff), dtype=np.float64))
        ref2 += float(np.sum(np.square(w_rows, out=w_rows), dtype=np.float64))
    rel = _ratio(math.sqrt(err2), math.sqrt(ref2))
    if rel == 0.0:
        return rel, float("inf")
    if math.isinf(rel):
        return rel, float("-inf")
    return rel, float(-20.0 * np.log10(rel))
