"""Per-token dynamic symmetric activation quantization (W8A8): the exact numpy reference.

An 8-bit GEMM (:mod:`npquant.linear_w8a8`) needs ``x`` in 8 bits too. Each
token (a row of ``x``) gets its own scale, computed from that row alone at
run time ("dynamic", "per token"), symmetric (no zero point), as vLLM's
``dynamic_scaled_int8_quant`` and ``dynamic_per_token_scaled_fp8_quant``
do and as compressed-tensors' ``input_activations`` ``{strategy: token,
dynamic: true, symmetric: true}`` describe. The rules, all in float32 (each
operation rounded to nearest even, as IEEE float32 arithmetic is):

**int8** (:func:`quantize_activations_int8`), as vLLM's CUDA kernel::

    absmax = max_k |x[t, k]|
    scale[t] = absmax / 127                      # float32 division
    inv = 127 / absmax                           # float32 division, not 1 / scale
    q[t, k] = clip(rint(x[t, k] * inv), -128, 127)   # float32 product, ties to even

vLLM multiplies by ``127 / absmax`` rather than dividing by ``scale``:
the two differ in the last bit of some products, and so in some codes at
ties. Every code lies in ``[-127, 127]`` whenever ``127 / absmax`` is finite
(``|x * inv| <= 127 (1 + 2**-24)**2`` rounds to at most 127).
**An all-zero token** gets ``scale = 0`` and codes 0 (vLLM: ``127 / 0`` is
infinite, ``0 * inf`` NaN, and CUDA's saturating conversion turns NaN into
0; ``q * scale`` then gives the token back exactly). Where ``absmax`` is
so small (below ``127 / 3.4e38``, about ``3.7e-37``) that ``127 / absmax``
overflows, ``inv`` is infinite as in vLLM: zeros stay 0 (NaN -> 0), the
others saturate to 127 or -128.

**fp8 e4m3** (:func:`quantize_activations_fp8`), as vLLM's
``dynamic_per_token_scaled_fp8_quant`` without its optional upper bound::

    scale[t] = max(absmax / 448, 1 / (448 * 512))   # float32; the floor keeps zeros and tiny tokens finite
    q[t, k] = e4m3(clip(x[t, k] / scale[t], -448, 448))   # float32 division, then rounded to nearest even

(vLLM divides here, "to match FBGEMM", where its int8 kernel multiplies.)
The e4m3 rounding is ml_dtypes' float32 -> float8_e4m3fn conversion,
correctly rounded, ties to even; the clip keeps it off NaN.

NaN and Inf have no code: both functions refuse them with an
:class:`~npquant.errors.NpquantError` naming ``x``. ``x`` may be float32,
float16 or bfloat16; it is converted to float32 first (exactly).
"""

from __future__ import annotations

import numpy as np

from .errors import NpquantError

__all__ = ["FP8_E4M3_MAX", "FP8_MIN_SCALE", "INT8_MAX", "quantize_activations_fp8", "quantize_activations_int8",
           "dequantize_activations"]

#: The largest int8 code the scale maps ``absmax`` to.
INT8_MAX = np.float32(127.0)
#: The largest finite float8 e4m3fn value.
FP8_E4M3_MAX = np.float32(448.0)
#: vLLM's floor on a per-token fp8 scale, ``1 / (448 * 512)`` in float32.
FP8_MIN_SCALE = np.float32(1.0) / (FP8_E4M3_MAX * np.float32(512.0))


def _tokens(x, name: str = "x") -> np.ndarray:
    """float32 ``(T, K)``: ``x (..., K)`` as rows, finite; a view where it is one already."""
    a = np.asarray(x)
    if a.ndim < 1 or a.shape[-1] == 0:
        raise NpquantError(f"{name} must be (..., in_features) with in_features >= 1, got shape {a.shape}")
    if a.dtype != np.float32:
        if a.dtype.kind not in "fV" and a.dtype.name != "bfloat16":
            raise NpquantError(f"{name} must be float32, float16 or bfloat16, got {a.dtype}")
        a = a.astype(np.float32)
    a2 = a.reshape(-1, a.shape[-1])  # (T, K)
    if a2.size and not np.isfinite(a2).all():
        bad = np.argwhere(~np.isfinite(a2))[0]
        raise NpquantError(f"{name} must be finite: token {bad[0]}, column {bad[1]} holds {a2[bad[0], bad[1]]}; "
                           "NaN and Inf have no 8-bit code")
    return a2


def quantize_activations_int8(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-token dynamic symmetric int8 codes of ``x``, vLLM's rule (see the module docstring).

    Parameters
    ----------
    x : array (..., K)
        float32, float16 or bfloat16, finite.

    Returns
    -------
    q : int8 (..., K)
        Codes in ``[-128, 127]`` (``[-127, 127]`` unless a token's absmax is below about ``3.7e-37``, where
        ``127 / absmax`` overflows).
    scale : float32 (...,)
        ``absmax / 127`` per token; 0 for an all-zero token.

    Examples
    --------
    >>> q, s = quantize_activations_int8(np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]], np.float32))
    >>> q.tolist(), s.tolist()
    ([[127, -64, 32], [0, 0, 0]], [0.007874015718698502, 0.0])
    """
    x2 = _tokens(x)  # (T, K)
    absmax = np.abs(x2).max(axis=1)  # (T,)
    scale = absmax / INT8_MAX
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.where(absmax > 0, INT8_MAX / absmax, np.float32(0.0)).astype(np.float32)  # (T,)
        prod = x2 * inv[:, None]  # float32, rounded once
        q = np.rint(prod)
    q = np.where(np.isnan(q), np.float32(0.0), q)  # 0 * inf (a subnormal absmax): CUDA's saturating cast gives 0
    q = np.clip(q, -128, 127).astype(np.int8)
    shape = np.shape(x)
    return q.reshape(shape), scale.astype(np.float32).reshape(shape[:-1])


def quantize_activations_fp8(x) -> tuple[np.ndarray, np.ndarray]:
    """Per-token dynamic fp8 e4m3 codes of ``x``, vLLM's rule (see the module docstring).

    Parameters
    ----------
    x : array (..., K)
        float32, float16 or bfloat16, finite.

    Returns
    -------
    q : ml_dtypes.float8_e4m3fn (..., K)
        Codes, finite, ``|q| <= 448``.
    scale : float32 (...,)
        ``max(absmax / 448, 1 / (448 * 512))`` per token.

    Examples
    --------
    >>> q, s = quantize_activations_fp8(np.array([[448.0, 1.0, -3.0]], np.float32))
    >>> q.astype(np.float32).tolist(), s.tolist()
    ([[448.0, 1.0, -3.0]], [1.0])
    """
    import ml_dtypes

    x2 = _tokens(x)  # (T, K)
    absmax = np.abs(x2).max(axis=1)  # (T,)
    scale = np.maximum(absmax / FP8_E4M3_MAX, FP8_MIN_SCALE).astype(np.float32)  # (T,)
    scaled = np.clip(x2 / scale[:, None], -FP8_E4M3_MAX, FP8_E4M3_MAX)  # float32, rounded once
    q = scaled.astype(ml_dtypes.float8_e4m3fn)  # correctly rounded, ties to even
    shape = np.shape(x)
    return q.reshape(shape), scale.reshape(shape[:-1])


def dequantize_activations(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``(..., K)``: ``float32(q) * scale[..., None]``, the value each code stands for (one rounding).

    ``q`` int8 or float8_e4m3fn ``(..., K)``; ``scale`` float32 ``(...,)``.
    """
    if np.shape(scale) != np.shape(q)[:-1]:
        raise NpquantError(f"scale must have shape {np.shape(q)[:-1]} (one per token of q {np.shape(q)}), "
                           f"got {np.shape(scale)}")
    return q.astype(np.float32) * np.asarray(scale, np.float32)[..., None]
