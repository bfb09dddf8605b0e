"""A transformer's non-linear parts, each in one pass: GELU, residual + LayerNorm, scaled and masked softmax.

numpy evaluates ``x / 2 * (1 + erf(x / sqrt(2)))`` as about twenty passes
over the array, each a ufunc call: for the MiniLM encoder's feed-forward
activations (``(B T, 1536)`` float32) that is 85 us for one sentence and
8 ms for a batch of 480 tokens, more than any of its linear layers. Here
each element is read and written once, in float32 SIMD lanes.

numba vectorizes no ``exp``, so :func:`_exp` is written out: Cody-Waite
range reduction ``y = n ln2 + r`` (``ln 2`` in two parts, the first exact
in 9 bits so ``n * ln2_hi`` is exact) and Cephes' degree-7 polynomial for
``e**r`` on ``|r| <= ln(2) / 2``: within 2 ulp of ``e**y`` for every float32
``y`` whose ``e**y`` is a normal float32 (checked against float64 in the
tests), 0 where it would be subnormal (below ``-87.34``). These
functions are compiled without reassociation, which would fold the
reduction's two steps into one. ``n`` is rounded down in float32
(``np.floor``): ``math.floor`` returns an integer, an int64 that AVX2 has
no vector conversion for, so the loops ran a lane at a time there
(measured, the same bits either way: GELU of 12 x 1536, numba targeting
Zen 2, 44 -> 20 us; on the AVX-512 host 24 -> 14 us).

The erf is the one :mod:`npquant.models.bert` uses on the numpy backend
(Abramowitz and Stegun 7.1.26, within 1.5e-7), so the backends differ by
float32 rounding only. LayerNorm sums in float64 (numpy's float32 pairwise
sums are a little less exact); softmax rows take ``exp(s - max)`` as numpy's
does.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._llvm import _claim, _i32_bits_to_f32

__all__ = ["gelu", "add_layer_norm", "softmax_scaled"]

_EXACT = {"contract"}  # fused multiply-adds only: no reassociation (it would undo the range reduction)
_SUMS = {"contract", "reassoc"}  # no exp: sums in any order (SIMD lanes)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # 9 significant bits: n * _LN2_HI is exact for |n| < 2**15
_LN2_LO = np.float32(-2.12194440e-4)  # ln 2 - _LN2_HI
_EXP_LOW = np.float32(-87.33654)  # ln(2**-126): below, e**y is subnormal; 0 instead
_EXP_HIGH = np.float32(88.72284)  # ln(float32's largest): above, e**y overflows
# Cephes expf: e**r ~ 1 + r + r**2 * P(r) on |r| <= ln(2) / 2
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
# Abramowitz & Stegun 7.1.26, as npquant.models.bert._erf
_AS_P = np.float32(0.3275911)
_AS_A1 = np.float32(0.254829592)
_AS_A2 = np.float32(-0.284496736)
_AS_A3 = np.float32(1.421413741)
_AS_A4 = np.float32(-1.453152027)
_AS_A5 = np.float32(1.061405429)
_RSQRT2 = np.float32(1.0 / math.sqrt(2.0))
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


@njit(inline="always", fastmath=_EXACT, error_model="numpy")
def _exp(y):
    """float32 ``e**y``: 0 where it is subnormal or less (-inf too), inf where it overflows, NaN for NaN; else
    within 2 ulp."""
    yc = min(max(y, _EXP_LOW), _EXP_HIGH)
    n = np.floor(yc * _LOG2E + _HALF)  # float32 (see the module's docstring)
    r = (yc - n * _LN2_HI) - n * _LN2_LO
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    e = (p * (r * r) + r) + _ONE
    # 2**n in two normal halves (n in [-126, 128]: 2**128 itself is not a float32)
    n_i = np.int32(n)
    half = n_i >> np.int32(1)
    low = _i32_bits_to_f32(np.int32(np.int32(half + np.int32(127)) << np.int32(23)))
    high = _i32_bits_to_f32(np.int32(np.int32(np.int32(n_i - half) + np.int32(127)) << np.int32(23)))
    out = (e * low) * high
    if y < _EXP_LOW:
        out = np.float32(0.0)
    elif y > _EXP_HIGH:
        out = np.float32(np.inf)
    elif y != y:
        out = y
    return out


@njit(inline="always", fastmath=_EXACT, error_model="numpy")
def _gelu_one(v):
    """Exact-erf GELU of one float32, ``v / 2 * (1 + erf(v / sqrt(2)))``."""
    z = v * _RSQRT2
    a = abs(z)
    t = _ONE / (_AS_P * a + _ONE)
    poly = ((((_AS_A5 * t + _AS_A4) * t + _AS_A3) * t + _AS_A2) * t + _AS_A1) * t
    erf_a = _ONE - poly * _exp(-(a * a))
    erf_z = erf_a if z >= 0 else -erf_a
    return _HALF * v * (_ONE + erf_z)


@njit(nogil=True, cache=True, fastmath=_EXACT, error_model="numpy")
def gelu(x, work, per):
    """``x (N, C) = GELU(x)`` in place, float32, exact-erf GELU; rows taken in chunks of ``per`` from ``work``.

    In place by design: given an output array that is the input, the
    vectorized loop's overlap check fails and numba runs it one element at a
    time (10x slower). Each row is computed alone, so the threads that share
    a call out (:func:`npquant.kernels._parallel`) change no bit.
    """
    n_rows = x.shape[0]
    while True:
        lo, hi = _claim(work, per, n_rows)
        if lo >= hi:
            break
        for i in range(lo, hi):
            xi = x[i]
            for j in range(x.shape[1]):
                xi[j] = _gelu_one(xi[j])


@njit(nogil=True, cache=True, fastmath=_SUMS, error_model="numpy")
def add_layer_norm(a, b, gamma, beta, eps, out, work, per):
    """``out (N, C) = LayerNorm(a + b)`` over the last axis: ``(s - mean) / sqrt(var + eps) * gamma + beta``.

    ``a``, ``b``, ``out`` float32 (N, C) (``out`` may be either input),
    ``gamma``, ``beta`` float32 (C,), ``eps`` float. Biased variance, as
    torch; mean and variance summed in float64, the rest in float32. Rows
    taken in chunks of ``per`` from ``work``, each computed alone.
    """
    n_cols = a.shape[1]
    s = np.empty(n_cols, np.float32)
    while True:
        lo, hi = _claim(work, per, a.shape[0])
        if lo >= hi:
            break
        for i in range(lo, hi):
            _norm_row(a[i], b[i], gamma, beta, eps, out[i], s)


@njit(inline="always", fastmath=_SUMS, error_model="numpy")
def _norm_row(ai, bi, gamma, beta, eps, oi, s):
    """``oi = LayerNorm(ai + bi)`` for one row (``s`` float32 scratch of its length)."""
    n_cols = ai.shape[0]
    total = 0.0
    for j in range(n_cols):
        s[j] = ai[j] + bi[j]
        total += s[j]
    mean = np.float32(total / n_cols)
    sq = 0.0
    for j in range(n_cols):
        d = s[j] - mean
        s[j] = d
        sq += np.float64(d) * d
    inv = np.float32(1.0 / math.sqrt(np.float32(sq / n_cols) + eps))
    for j in range(n_cols):
        oi[j] = s[j] * inv * gamma[j] + beta[j]


@njit(nogil=True, cache=True, fastmath=_EXACT, error_model="numpy")
def softmax_scaled(scores, scale, bias, n_heads, out, work, per):
    """``out (B H, T, K) = softmax(scores * scale + bias)`` over the last axis; heads in chunks of ``per`` from ``work``.

    ``scores`` float32 (B H, T, K), batch-major, ``n_heads`` heads a batch
    entry; ``scale`` float32, ``bias`` float32 (B, K): added to every head
    and query row (0, or float32's lowest for padded keys). Each row:
    ``e = exp(s - max(s))``, ``e / sum(e)``. A head's ``T K`` exponentials
    run as one loop (SIMD lanes across rows: ``K`` is often below a
    vector's 16 lanes); each head is computed alone.
    """
    _, n_queries, n_keys = scores.shape
    shifted = np.empty(n_queries * n_keys, np.float32)  # (T K,)
    while True:
        lo, hi = _claim(work, per, scores.shape[0])
        if lo >= hi:
            break
        for bh in range(lo, hi):
            kb = bias[bh // n_heads]
            for t in range(n_queries):
                si = scores[bh, t]
                row = shifted[t * n_keys : (t + 1) * n_keys]
                top = np.float32(-np.inf)
                for k in range(n_keys):
                    v = si[k] * scale + kb[k]
                    row[k] = v
                    top = max(top, v)
                for k in range(n_keys):
                    row[k] -= top
            for j in range(n_queries * n_keys):
                shifted[j] = _exp(shifted[j])
            for t in range(n_queries):
                total = np.float32(0.0)
                for k in range(n_keys):
                    total += shifted[t * n_keys + k]
                inv = _ONE / total
                oi = out[bh, t]
                for k in range(n_keys):
                    oi[k] = shifted[t * n_keys + k] * inv
