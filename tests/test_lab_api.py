"""The lab-01 API against the float64 reference, its invariants and its errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npquant
from npquant import (
    NpquantError,
    dequantize,
    memory_bytes,
    memory_bytes_quant,
    quant_linear,
    quantize_per_channel,
    quantize_per_tensor,
)
from reference import reference_quantize

EPS32 = 2.0**-24

weights = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 8), st.integers(1, 64)),
    elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False),
).map(lambda w: np.where(np.abs(w) < 1e-4, np.float32(0), w))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_per_channel_matches_reference_bit_for_bit(dtype):
    w = (np.random.default_rng(0).standard_normal((16, 100)) * np.logspace(-3, 2, 16)[:, None]).astype(dtype)
    q, scales = quantize_per_channel(w)
    # The lab's rule is the restricted grid: /127, codes in [-127, 127].
    codes, ref_scales, _ = reference_quantize(w.astype(np.float32), bits=8, granularity="channel", grid="restricted")
    assert codes.min() >= -127
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scales.dtype == np.float32 and scales.shape == (16,)
    np.testing.assert_array_equal(q, codes)
    np.testing.assert_array_equal(scales, ref_scales)
    # The engine gives the same bits.
    qt = npquant.quantize(w, "w8-channel-restricted")
    np.testing.assert_array_equal(qt.codes, q)
    np.testing.assert_array_equal(qt.scale[:, 0], scales)


def test_per_tensor_matches_reference():
    w = np.random.default_rng(1).standard_normal((7, 33)).astype(np.float32)
    q, scale = quantize_per_tensor(w)
    codes, ref_scales, _ = reference_quantize(w, bits=8, granularity="tensor", grid="restricted")
    np.testing.assert_array_equal(q, codes)
    assert isinstance(scale, np.float32) and scale == ref_scales[0]
    np.testing.assert_array_equal(dequantize(q, scale), q.astype(np.float32) * scale)


@settings(max_examples=300, deadline=None)
@given(weights)
def test_lab_invariants(w):
    before = w.copy()
    q, scales = quantize_per_channel(w)
    np.testing.assert_array_equal(w, before)  # input untouched
    assert q.min() >= -127 and q.max() <= 127
    # Each nonzero row's largest-magnitude element maps to +-127.
    for o in range(w.shape[0]):
        if np.any(w[o]):
            i = np.argmax(np.abs(w[o]))
            assert q[o, i] == 127 * np.sign(w[o, i])
        else:
            assert scales[o] == 0 and not np.any(q[o])
    w_hat = dequantize(q, scales)
    assert w_hat.dtype == np.float32
    # |W - dequant| <= s/2, plus float32 rounding of W/s and of q*s.
    bound = scales[:, None].astype(np.float64) / 2 + 2 * EPS32 * (np.abs(w) + np.abs(w_hat))
    assert np.all(np.abs(w.astype(np.float64) - w_hat) <= bound)


def test_zero_rows_get_zero_scale_codes_and_values_without_warnings(recwarn):
    w = np.zeros((3, 5), np.float32)
    w[1] = [1, -2, 3, -4, 5]
    q, scales = quantize_per_channel(w)
    assert scales[0] == 0 and scales[2] == 0
    assert not np.any(q[[0, 2]])
    w_hat = dequantize(q, scales)
    assert not np.any(w_hat[[0, 2]]) and not np.isnan(w_hat).any()
    assert len(recwarn) == 0


def test_dequantize_accepts_column_scales():
    q = np.array([[1, -2], [3, 4]], np.int8)
    np.testing.assert_array_equal(dequantize(q, np.array([[0.5], [2.0]], np.float32)), [[0.5, -1], [6, 8]])


def test_quant_linear_shapes():
    w = np.random.default_rng(2).standard_normal((5, 12)).astype(np.float32)
    q, scales = quantize_per_channel(w)
    w_hat = dequantize(q, scales).astype(np.float64)
    x = np.random.default_rng(3).standard_normal((2, 3, 12)).astype(np.float32)
    y = quant_linear(x, q, scales)
    assert y.shape == (2, 3, 5) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_hat.T, rtol=1e-5, atol=1e-5)
    assert quant_linear(x[0, 0], q, scales).shape == (5,)


def test_memory_accounting():
    w = np.ones((10, 20), np.float16)
    q, scales = quantize_per_channel(w)
    assert memory_bytes(w) == 400
    assert memory_bytes_quant(q, scales) == 200 + 40


# --- bad input ------------------------------------------------------------------
@pytest.mark.parametrize(
    "w, match",
    [
        (np.ones(4, np.float32), r"W must be 2-D \(out_features, in_features\), got shape \(4,\)"),
        (np.ones((2, 2, 2), np.float32), r"W must be 2-D"),
        (np.ones((3, 0), np.float32), r"W must not be empty, got shape \(3, 0\)"),
        (np.ones((2, 2), np.int8), r"W must be floating .* got dtype int8"),
        (np.array([[1.0, np.nan], [np.inf, 1.0]], np.float32), r"W row 0 holds NaN or Inf"),
        (np.array([[1.0, 2.0], [-np.inf, 1.0]], np.float32), r"W row 1 holds NaN or Inf"),
    ],
)
@pytest.mark.parametrize("fn", [quantize_per_channel, quantize_per_tensor])
def test_bad_weights(fn, w, match):
    with pytest.raises(NpquantError, match=match):
        fn(w)


def test_bad_codes_and_scales():
    q = np.zeros((3, 4), np.int8)
    with pytest.raises(NpquantError, match=r"q_int8 must be a 2-D int8 array .* got int16 \(3, 4\)"):
        dequantize(q.astype(np.int16), np.ones(3, np.float32))
    with pytest.raises(NpquantError, match=r"scales must be a scalar or have shape \(3,\) .* got \(4,\)"):
        dequantize(q, np.ones(4, np.float32))
    with pytest.raises(NpquantError, match=r"scales must be floating, got dtype int64"):
        dequantize(q, np.ones(3, np.int64))
    with pytest.raises(NpquantError, match=r"scales holds NaN or Inf"):
        dequantize(q, np.array([1, np.nan, 1], np.float32))


def test_x_of_the_wrong_width_names_both_shapes():
    q, scales = quantize_per_channel(np.ones((5, 12), np.float32))
    with pytest.raises(NpquantError, match=r"x shape \(2, 11\) does not fit the weight shape \(5, 12\)"):
        quant_linear(np.ones((2, 11), np.float32), q, scales)
    with pytest.raises(NpquantError, match=r"x must be a floating numpy array .* got int64"):
        quant_linear(np.ones((2, 12), np.int64), q, scales)
