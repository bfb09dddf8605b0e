"""The W8A8 linear, exact numpy reference: 8-bit activations per token times 8-bit weights per output channel.

``y (M, N) = x (M, K) @ W.T`` with ``x`` quantized per token at each call
(:mod:`npquant.activations`) and ``W`` stored as codes with one float32
scale per output row. The integer (or exact) dot products come first, then
the two scales, in float32, in vLLM's epilogue order (CUTLASS's
``ScaledEpilogue``, ``D = a_scale * (b_scale * float(accum))``, plus bias
after)::

    acc[m, n] = sum_k xq[m, k] * wq[n, k]                 # exact (int64 here, int32 in the kernels)
    y[m, n]   = x_scale[m] * (w_scale[n] * float32(acc[m, n]))   # three float32 roundings, in this order
    y[m, n]   = y[m, n] + bias[n]                                # a fourth, when there is a bias

**int8** (:func:`w8a8_int8_matmul`, :func:`w8a8_int8_linear`): weight codes
int8 in ``[-128, 127]``, activation codes int8 likewise; ``acc`` is exact
in int64 (computed through float64 BLAS: every product is an integer of
at most ``2**14`` and every partial sum an integer below ``2**53`` for
``K < 2**39``, so any summation order gives the exact integer). It fits
int32 for ``K <= 131071`` (``|acc| <= 16384 K``), which the kernels
(:mod:`npquant.kernels._w8a8`) accumulate in. ``float32(acc)`` rounds to
nearest even where ``|acc| > 2**24``.

**fp8 e4m3** (:func:`w8a8_fp8_matmul`, :func:`w8a8_fp8_linear`): codes
decoded exactly (every e4m3 value is an integer times ``2**-9``, at most
``448 = 229376 * 2**-9``), products and sums in float64, which is exact:
each product is a multiple of ``2**-18`` below ``2**17.62``, so every
partial sum of ``K <= 2**17`` of them is a multiple of ``2**-18`` below
``2**35``, and those are float64 numbers (53 bits). ``acc`` is then that
exact sum rounded once to float32, and the scales follow as for int8.

Shapes: ``x`` float32/float16/bfloat16 ``(..., K)``, output float32
``(..., N)``. The matmul functions take codes and scales already made
(``xq (M, K)``, ``x_scale (M,)``); the linear functions quantize ``x``.
"""

from __future__ import annotations

import numpy as np

from .activations import quantize_activations_fp8, quantize_activations_int8
from .errors import NpquantError

__all__ = ["int8_dot", "fp8_dot", "scale_outputs", "w8a8_int8_matmul", "w8a8_int8_linear", "w8a8_fp8_matmul",
           "w8a8_fp8_linear", "MAX_INT32_K", "MAX_FP8_K"]

#: Longest rows whose int8 dot products fit int32 whatever the codes: ``131071 * 128 * 128 < 2**31``.
MAX_INT32_K = (2**31 - 1) // (128 * 128)
#: Longest rows whose fp8 products sum exactly in float64 in any order (the module docstring).
MAX_FP8_K = 2**17


def _check_codes(q: np.ndarray, name: str, dtype, ndim: int = 2) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype != dtype or q.ndim != ndim:
        raise NpquantError(f"{name} must be a {ndim}-d {np.dtype(dtype).name} array, got {q.dtype} {q.shape}")
    return q


def _check_scales(scale, n: int, name: str) -> np.ndarray:
    s = np.asarray(scale)
    if s.dtype != np.float32 or s.shape != (n,):
        raise NpquantError(f"{name} must be float32 ({n},), got {s.dtype} {s.shape}")
    return s


def int8_dot(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """int64 ``(M, N)``: the exact ``xq (M, K) @ wq (N, K).T`` of int8 codes (see the module docstring)."""
    xq = _check_codes(xq, "xq", np.int8)
    wq = _check_codes(wq, "wq", np.int8)
    if xq.shape[1] != wq.shape[1]:
        raise NpquantError(f"xq {xq.shape} and wq {wq.shape} must share in_features (their last axis)")
    return (xq.astype(np.float64) @ wq.astype(np.float64).T).astype(np.int64)  # exact: integers below 2**53


def fp8_dot(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """float32 ``(M, N)``: the exact ``xq (M, K) @ wq (N, K).T`` of float8_e4m3fn codes, rounded once to float32."""
    import ml_dtypes

    e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)
    xq = _check_codes(xq, "xq", e4m3)
    wq = _check_codes(wq, "wq", e4m3)
    if xq.shape[1] != wq.shape[1]:
        raise NpquantError(f"xq {xq.shape} and wq {wq.shape} must share in_features (their last axis)")
    if xq.shape[1] > MAX_FP8_K:
        raise NpquantError(f"in_features={xq.shape[1]}: fp8 sums are exact in float64 up to 2**17 columns")
    xf = xq.astype(np.float64)
    wf = wq.astype(np.float64)
    if not (np.isfinite(xf).all() and np.isfinite(wf).all()):
        raise NpquantError("xq and wq must hold finite e4m3 codes, got NaN")
    return (xf @ wf.T).astype(np.float32)  # exact in float64 (module docstring), then one rounding


def scale_outputs(acc: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None = None
                  ) -> np.ndarray:
    """float32 ``(M, N)``: ``x_scale[:, None] * (w_scale[None, :] * float32(acc))`` (+ ``bias[None, :]``).

    ``acc`` integer or float32 ``(M, N)``; ``x_scale`` float32 ``(M,)``;
    ``w_scale`` float32 ``(N,)``; ``bias`` float32 ``(N,)`` or None. Each
    operation in float32, rounded, in this order (vLLM's epilogue).
    """
    m, n = acc.shape
    x_scale = _check_scales(x_scale, m, "x_scale")
    w_scale = _check_scales(w_scale, n, "w_scale")
    y = w_scale[None, :] * acc.astype(np.float32)
    y = x_scale[:, None] * y
    if bias is not None:
        y = y + _check_scales(bias, n, "bias")[None, :]
    return y


def w8a8_int8_matmul(xq, x_scale, wq, w_scale, bias=None) -> np.ndarray:
    """float32 ``(M, N)`` from int8 activation codes ``xq (M, K)`` with float32 ``x_scale (M,)`` and int8 weight
    codes ``wq (N, K)`` with float32 ``w_scale (N,)``, optional float32 ``bias (N,)``: :func:`int8_dot`, then
    :func:`scale_outputs`."""
    return scale_outputs(int8_dot(xq, wq), x_scale, w_scale, bias)


def w8a8_fp8_matmul(xq, x_scale, wq, w_scale, bias=None) -> np.ndarray:
    """As :func:`w8a8_int8_matmul` for float8_e4m3fn codes: :func:`fp8_dot`, then :func:`scale_outputs`."""
    return scale_outputs(fp8_dot(xq, wq), x_scale, w_scale, bias)


def _linear(x, wq, w_scale, bias, quantize, matmul) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim < 1 or a.shape[-1] != np.shape(wq)[-1]:
        raise NpquantError(f"x must be (..., {np.shape(wq)[-1]}) for a weight of shape {np.shape(wq)}, got {a.shape}")
    xq, x_scale = quantize(a)
    y = matmul(xq.reshape(-1, a.shape[-1]), x_scale.reshape(-1), wq, w_scale, bias)  # (M, N)
    return y.reshape(*a.shape[:-1], y.shape[1])


def w8a8_int8_linear(x, wq, w_scale, bias=None) -> np.ndarray:
    """float32 ``(..., N)``: ``x (..., K)`` quantized per token to int8
    (:func:`~npquant.activations.quantize_activations_int8`) times int8 ``wq (N, K)`` with float32 ``w_scale (N,)``,
    optional float32 ``bias (N,)``.

    Examples
    --------
    >>> wq = np.array([[127, -128], [1, 2]], np.int8)
    >>> w8a8_int8_linear(np.array([[1.0, 2.0]], np.float32), wq, np.array([0.5, 1.0], np.float32)).shape
    (1, 2)
    """
    return _linear(x, wq, w_scale, bias, quantize_activations_int8, w8a8_int8_matmul)


def w8a8_fp8_linear(x, wq, w_scale, bias=None) -> np.ndarray:
    """float32 ``(..., N)``: ``x (..., K)`` quantized per token to fp8 e4m3
    (:func:`~npquant.activations.quantize_activations_fp8`) times float8_e4m3fn ``wq (N, K)`` with float32
    ``w_scale (N,)``, optional float32 ``bias (N,)``."""
    return _linear(x, wq, w_scale, bias, quantize_activations_fp8, w8a8_fp8_matmul)
