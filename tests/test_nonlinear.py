"""The one-pass GELU, residual LayerNorm and softmax kernels against float64 references written here."""

import math

import numpy as np
import pytest

pytest.importorskip("numba", reason="the one-pass kernels are numba's (npquant[fast]); the numpy ones are the reference")

from numba import njit  # noqa: E402

from npquant import NpquantError  # noqa: E402
from npquant.kernels import _nonlinear, add_layer_norm, gelu, softmax_scaled  # noqa: E402

U = 2.0**-24  # float32's unit roundoff


@njit
def _exp_all(y, out):
    for i in range(y.shape[0]):
        out[i] = _nonlinear._exp(y[i])


def _exp(y: np.ndarray) -> np.ndarray:
    out = np.empty_like(y)
    _exp_all(y, out)
    return out


def test_exp_within_two_ulp_wherever_the_result_is_normal():
    rng = np.random.default_rng(0)
    # A dense sweep of the whole range and random float32 bit patterns in it.
    y = np.concatenate([np.linspace(-87.33, 88.72, 1_000_001, dtype=np.float32),
                        rng.uniform(-87.33, 88.72, 200_000).astype(np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.7, -87.3])])
    ref = np.exp(y.astype(np.float64))
    got = _exp(y).astype(np.float64)
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - ref) <= 2 * ulp).all(), np.max(np.abs(got - ref) / ulp)


def test_exp_edges():
    y = np.float32([np.nan, -np.inf, np.inf, -87.4, -100.0, -1e30, 88.73, 1e30])
    got = _exp(y)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], np.float32([0, np.inf, 0, 0, 0, np.inf, np.inf]))


def _gelu64(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64).ravel()]).reshape(
        x.shape)


def test_gelu_against_exact_erf():
    x = np.concatenate([np.linspace(-12, 12, 48_001, dtype=np.float32),
                        np.random.default_rng(1).standard_normal(20_000).astype(np.float32) * 3])
    ref = _gelu64(x)
    got = gelu(x).astype(np.float64)
    # erf's approximation is within 1.5e-7 (Abramowitz-Stegun 7.1.26); float32
    # evaluation of its polynomial and exponential adds a few units of 1 (8 U),
    # and x / 2 * (1 + erf) rounds three more times (4 ulp of the result).
    tol = np.abs(x) / 2 * (1.5e-7 + 8 * U) + 4 * np.spacing(np.abs(ref).astype(np.float32))
    assert (np.abs(got - ref) <= tol).all()
    # A relative error of 1e-5 (a wrong coefficient, say) is outside the bound.
    assert not (np.abs(ref * (1 + 1e-5) - ref) <= tol).all()


def test_gelu_shapes_in_place_and_input_untouched():
    h = np.random.default_rng(2).standard_normal((2, 3, 40)).astype(np.float32)
    keep = h.copy()
    out = gelu(h)
    assert out.shape == h.shape and out.dtype == np.float32
    np.testing.assert_array_equal(h, keep)  # a new array unless asked
    again = gelu(h, out=h)
    assert again is h
    np.testing.assert_array_equal(h, out)
    assert np.isnan(gelu(np.float32([np.nan]))[0])
    np.testing.assert_array_equal(gelu(np.float32([np.inf, -30.0, 0.0])), np.float32([np.inf, 0, 0]))
    with pytest.raises(NpquantError, match=r"h must be float32, got float64"):
        gelu(np.zeros(3))
    with pytest.raises(NpquantError, match=r"out must be a C-contiguous float32 \(3,\) array"):
        gelu(np.zeros(3, np.float32), out=np.zeros(4, np.float32))


def _layer_norm64(s: np.ndarray, gamma, beta, eps) -> np.ndarray:
    s = s.astype(np.float64)
    mean = s.mean(axis=-1, keepdims=True)
    var = ((s - mean) ** 2).mean(axis=-1, keepdims=True)
    return (s - mean) / np.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("shape", [(1, 384), (3, 7, 384), (5, 33)])
def test_add_layer_norm_against_float64(shape):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(shape) * 4 + 1).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.standard_normal(shape[-1]).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32)
    keep = a.copy(), b.copy()
    got = add_layer_norm(a, b, gamma, beta, 1e-12)
    s = a.astype(np.float64) + b  # the sum as the kernel forms it is a + b rounded once: within U |a + b|
    ref = _layer_norm64(s, gamma, beta, 1e-12)
    sigma = s.std(axis=-1, keepdims=True)
    # Each input to the normalisation carries ~2 U of |a| + |b| (the rounded sum,
    # the float32 mean), divided by sigma and scaled by gamma; the float32 product
    # and sum with beta add a few ulp of their terms.
    tol = 4 * U * ((np.abs(a) + np.abs(b)) / sigma * np.abs(gamma) + np.abs(ref - beta) + np.abs(beta))
    assert got.shape == shape and got.dtype == np.float32
    assert (np.abs(got - ref) <= tol).all()
    np.testing.assert_array_equal(a, keep[0])
    np.testing.assert_array_equal(b, keep[1])
    # The unbiased variance (n - 1), a likely slip, is outside the bound.
    n = shape[-1]
    assert not (np.abs((ref - beta) * math.sqrt((n - 1) / n) + beta - ref) <= tol).all()


def test_add_layer_norm_bad_shapes():
    a = np.zeros((2, 4), np.float32)
    with pytest.raises(NpquantError, match=r"a \(2, 4\), b \(2, 3\), gamma \(4,\) and beta \(4,\)"):
        add_layer_norm(a, np.zeros((2, 3), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32), 1e-12)
    with pytest.raises(NpquantError, match=r"a must be float32, got float64"):
        add_layer_norm(a.astype(np.float64), a, np.ones(4, np.float32), np.zeros(4, np.float32), 1e-12)


def test_softmax_scaled_against_float64_with_padded_keys():
    rng = np.random.default_rng(4)
    B, H, T, K = 3, 4, 5, 19
    scores = (rng.standard_normal((B, H, T, K)) * 6).astype(np.float32)
    key_bias = np.zeros((B, K), np.float32)
    key_bias[1, 11:] = np.finfo(np.float32).min  # padded keys of sentence 1
    keep = scores.copy()
    scale = np.float32(0.125)
    got = softmax_scaled(scores, scale, key_bias)
    s = scores.astype(np.float64) * np.float64(scale) + key_bias[:, None, None, :]
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    ref = e / e.sum(axis=-1, keepdims=True)
    # s * scale + bias is one fused rounding (U |s|, and |s| < 2**7 here: a relative
    # error of U |s| in each exponential), exp is within 2 ulp, the sum of K terms
    # and the division add (K + 1) U: relative to each probability.
    tol = ref * ((2 ** 7 + 2 + K + 1) * U) + 1e-45
    assert got.shape == scores.shape and got.dtype == np.float32
    assert (np.abs(got - ref) <= tol).all()
    np.testing.assert_array_equal(got[1, :, :, 11:], 0)  # padded keys get no weight
    np.testing.assert_array_equal(scores, keep)
    np.testing.assert_allclose(got.sum(axis=-1), 1, rtol=K * U * 4)


def test_softmax_scaled_bad_shapes():
    with pytest.raises(NpquantError, match=r"scores \(2, 3, 4\) must be \(B, H, T, K\)"):
        softmax_scaled(np.zeros((2, 3, 4), np.float32), 1.0, np.zeros((2, 4), np.float32))
    with pytest.raises(NpquantError, match=r"key_bias \(2, 5\) \(B, K\)"):
        softmax_scaled(np.zeros((2, 1, 1, 4), np.float32), 1.0, np.zeros((2, 5), np.float32))
