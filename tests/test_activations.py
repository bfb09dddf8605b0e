"""Per-token activation quantization (npquant.activations) and the W8A8 numpy reference (npquant.linear_w8a8),
against float64 references written here."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npquant import NpquantError
from npquant.activations import (FP8_MIN_SCALE, dequantize_activations, quantize_activations_fp8,
                                 quantize_activations_int8)
from npquant.linear_w8a8 import (MAX_INT32_K, fp8_dot, int8_dot, scale_outputs, w8a8_fp8_linear, w8a8_int8_linear,
                                 w8a8_int8_matmul)


def f32(v):
    """float64 ``v`` rounded to float32 and back: one float32 rounding. For a sum, product or quotient of two
    float32 numbers computed in float64 this equals float32 arithmetic (53 >= 2 * 24 + 2: double rounding is
    innocuous), so the references below compute in float64 and round where the rule rounds."""
    with np.errstate(over="ignore"):
        return np.asarray(v, np.float64).astype(np.float32).astype(np.float64)


def ref_int8(x):
    """vLLM's dynamic per-token int8 rule in float64: scale = absmax / 127, codes = rint(x * (127 / absmax))."""
    x = np.asarray(x, np.float32).astype(np.float64)
    absmax = np.abs(x).max(axis=-1)
    scale = f32(absmax / 127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, f32(127.0 / np.where(absmax > 0, absmax, 1.0)), 0.0)
        inv = np.where((absmax > 0) & (127.0 / np.where(absmax > 0, absmax, 1.0) > 3.4028235e38), np.inf, inv)
    with np.errstate(invalid="ignore"):
        prod = f32(x * inv[..., None])
    q = np.where(np.isnan(prod), 0.0, np.clip(np.round(prod), -128, 127))  # np.round: ties to even
    return q.astype(np.int8), scale.astype(np.float32)


# Every finite e4m3fn value, by bit pattern (0x7F and 0xFF are NaN).
_E4M3_BITS = np.array([b for b in range(256) if b & 0x7F != 0x7F], np.uint8)
_E4M3_VALUES = _E4M3_BITS.view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def round_e4m3(v):
    """float64 ``v`` (|v| <= 448) to the nearest e4m3 value, ties to the even bit pattern; written from the table."""
    v = np.asarray(v, np.float64)
    d = np.abs(v[..., None] - _E4M3_VALUES)  # (..., 254)
    best = d.min(axis=-1, keepdims=True)
    ties = d == best
    even = ties & (_E4M3_BITS % 2 == 0)
    pick = np.where(even.any(axis=-1, keepdims=True), even, ties).argmax(axis=-1)
    out = _E4M3_VALUES[pick]
    return np.where(v == 0, v, out)  # keep the sign of zero


def ref_fp8(x):
    x = np.asarray(x, np.float32).astype(np.float64)
    absmax = np.abs(x).max(axis=-1)
    scale = np.maximum(f32(absmax / 448.0), float(FP8_MIN_SCALE))
    q = round_e4m3(np.clip(f32(x / scale[..., None]), -448, 448))
    return q, scale.astype(np.float32)


def test_int8_ties_zero_tokens_and_extremes():
    x = np.array([[127.0, 2.5, 3.5, -0.5, -1.5, 126.5, -127.0],  # absmax 127: inv = 1 exactly, ties to even
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # all zero: scale 0, codes 0
                  [3e38, -3e38, 1.0, 0.0, 1e30, -1e-30, 2e38],  # huge
                  [1e-45, -1e-45, 0.0, 1e-45, 0.0, 0.0, 0.0],  # subnormal absmax: 127 / absmax overflows
                  [1e-30, -2e-30, 5e-31, 0.0, 1e-31, 3e-31, -1e-30]], np.float32)  # tiny, normal
    q, scale = quantize_activations_int8(x)
    q_ref, s_ref = ref_int8(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, s_ref)
    assert q[0].tolist() == [127, 2, 4, 0, -2, 126, -127]
    assert scale[1] == 0 and not q[1].any()
    assert q[3].tolist() == [127, -128, 0, 127, 0, 0, 0]  # vLLM: +-inf saturates, 0 * inf (NaN) gives 0
    assert q.dtype == np.int8 and scale.dtype == np.float32


def test_int8_multiplies_by_the_reciprocal_as_vllm():
    # Where x * (127 / absmax) and x / (absmax / 127) round to different float32 numbers, the codes follow the
    # first. Search a seeded sample for such a case: the test fails if the implementation divides.
    rng = np.random.default_rng(3)
    absmax = rng.uniform(0.5, 50, 2000).astype(np.float32)
    half = ((rng.integers(0, 127, 2000) + 0.5) * absmax / 127).astype(np.float32)  # near a tie k + 1/2
    x = np.stack([absmax, half, np.nextafter(half, 0), np.nextafter(half, np.inf)], axis=1)  # (2000, 4)
    q, scale = quantize_activations_int8(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        by_division = np.clip(np.rint(x / scale[:, None]), -128, 127).astype(np.int8)
    assert not np.array_equal(q, by_division)
    np.testing.assert_array_equal(q, ref_int8(x)[0])


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                  elements=st.floats(-1e6, 1e6, width=32)))
@example(np.array([-1.1754944e-38], np.float32))  # a normal absmax whose 127 / absmax overflows: code -128
def test_int8_invariants(x):
    q, scale = quantize_activations_int8(x)
    q_ref, s_ref = ref_int8(x.reshape(-1, x.shape[-1]))
    np.testing.assert_array_equal(q.reshape(q_ref.shape), q_ref)
    np.testing.assert_array_equal(scale.reshape(-1), s_ref)
    assert q.shape == x.shape and scale.shape == x.shape[:-1]
    with np.errstate(divide="ignore", over="ignore"):
        normal = np.isfinite(np.float32(127) / np.abs(x).max(axis=-1))  # inv finite (absmax >= about 3.7e-37)
    assert (np.abs(q.astype(np.int64)).max(axis=-1, initial=0)[normal] <= 127).all()
    # Within range each value is within half a step of its code (plus the float32 roundings of inv and the product:
    # each at most 2**-24 relative, of a code at most 127: 127 * 2 * 2**-24 < 2**-16 of a step).
    err = np.abs(dequantize_activations(q, scale).astype(np.float64) - x)
    assert (err[normal] <= (scale[..., None].astype(np.float64) * (0.5 + 2**-16))[normal]).all()


def test_fp8_rule_scale_floor_and_extremes():
    x = np.array([[448.0, 1.0, -3.0, 0.1, 1e-3, -447.9, 300.0],
                  [0.0] * 7,  # zero token: the floor scale, codes 0
                  [3e38, -1e38, 1.0, 0.0, 5e37, 1e30, 2.9e38],
                  [1e-45, 0.0, -1e-45, 0.0, 0.0, 0.0, 0.0],
                  [1e-6, 3e-7, -2e-6, 0.0, 1e-7, 5e-8, 1.1e-6]], np.float32)
    q, scale = quantize_activations_fp8(x)
    q_ref, s_ref = ref_fp8(x)
    np.testing.assert_array_equal(q.astype(np.float64), q_ref)
    np.testing.assert_array_equal(scale, s_ref)
    assert scale[1] == FP8_MIN_SCALE and np.float32(1.0) / (np.float32(448) * np.float32(512)) == FP8_MIN_SCALE
    assert q.dtype == ml_dtypes.float8_e4m3fn and np.isfinite(q.astype(np.float32)).all()


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=12),
                  elements=st.floats(-1e5, 1e5, width=32)))
def test_fp8_invariants(x):
    q, scale = quantize_activations_fp8(x)
    q_ref, s_ref = ref_fp8(x.reshape(-1, x.shape[-1]))
    np.testing.assert_array_equal(q.astype(np.float64).reshape(q_ref.shape), q_ref)
    np.testing.assert_array_equal(scale.reshape(-1), s_ref)
    assert np.abs(q.astype(np.float32)).max(initial=0) <= 448


@pytest.mark.parametrize("fn", [quantize_activations_int8, quantize_activations_fp8])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_naming_x(fn, bad):
    x = np.ones((2, 5), np.float32)
    x[1, 3] = bad
    with pytest.raises(NpquantError, match=r"^x must be finite: token 1, column 3") as info:
        fn(x)
    assert "\n" not in str(info.value)


def test_float16_and_bfloat16_inputs_convert_exactly():
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    for dt in (np.float16, ml_dtypes.bfloat16):
        xd = x.astype(dt)
        for fn in (quantize_activations_int8, quantize_activations_fp8):
            q, s = fn(xd)
            q32, s32 = fn(xd.astype(np.float32))
            np.testing.assert_array_equal(q.astype(np.float32), q32.astype(np.float32))
            np.testing.assert_array_equal(s, s32)
    with pytest.raises(NpquantError, match="x must be float32, float16 or bfloat16, got int32"):
        quantize_activations_int8(np.ones((2, 2), np.int32))


# --- the W8A8 linear reference ------------------------------------------------------------------------------------


def test_int8_dot_is_the_exact_integer_sum_at_the_extremes():
    rng = np.random.default_rng(1)
    xq = rng.integers(-128, 128, (5, 37)).astype(np.int8)
    wq = rng.integers(-128, 128, (11, 37)).astype(np.int8)
    xq[0], wq[0] = -128, -128  # the largest product, 2**14, in every column
    wq[1] = 127
    ref = np.array([[sum(int(a) * int(b) for a, b in zip(r, c)) for c in wq] for r in xq])
    np.testing.assert_array_equal(int8_dot(xq, wq), ref)
    assert int8_dot(xq, wq)[0, 0] == 37 * 2**14
    assert MAX_INT32_K * 2**14 < 2**31 <= (MAX_INT32_K + 1) * 2**14


def test_scales_are_applied_in_the_stated_order():
    rng = np.random.default_rng(2)
    acc = rng.integers(-(2**30), 2**30, (6, 9)).astype(np.int64)
    xs = rng.random(6).astype(np.float32)
    ws = rng.random(9).astype(np.float32)
    bias = rng.standard_normal(9).astype(np.float32)
    # x_scale * (w_scale * float32(acc)), then + bias: each step one float32 rounding, written in float64.
    ref = f32(f32(xs[:, None].astype(np.float64) * f32(ws[None, :].astype(np.float64) * f32(acc))) + bias)
    got = scale_outputs(acc, xs, ws, bias)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.astype(np.float64), ref)
    # Another order, (x_scale * w_scale) * acc, gives other bits somewhere in this sample: the order is observable.
    other = f32(f32(f32(xs[:, None].astype(np.float64) * ws[None, :]) * f32(acc)) + bias)
    assert not np.array_equal(ref, other)


def test_int8_linear_is_quantize_then_matmul():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    wq = rng.integers(-128, 128, (7, 40)).astype(np.int8)
    ws = rng.random(7).astype(np.float32)
    y = w8a8_int8_linear(x, wq, ws)
    xq, xs = ref_int8(x.reshape(-1, 40))
    ref = f32(xs[:, None].astype(np.float64) * f32(ws[None, :].astype(np.float64)
                                                   * f32(xq.astype(np.int64) @ wq.astype(np.int64).T)))
    assert y.shape == (2, 3, 7) and y.dtype == np.float32
    np.testing.assert_array_equal(y.reshape(6, 7).astype(np.float64), ref)
    with pytest.raises(NpquantError, match=r"x must be \(\.\.\., 40\)"):
        w8a8_int8_linear(x[..., :39], wq, ws)
    with pytest.raises(NpquantError, match=r"x_scale must be float32 \(6,\)"):
        w8a8_int8_matmul(xq, xs[:5], wq, ws)


def test_fp8_dot_is_exact_then_rounded_once():
    rng = np.random.default_rng(5)
    # Every e4m3 value meets every other once: the exact sums (fractions) against fp8_dot's.
    from fractions import Fraction

    xq = _E4M3_BITS.view(ml_dtypes.float8_e4m3fn)[None, :]  # (1, 254)
    wq = np.stack([np.roll(xq[0], s) for s in range(0, 254, 23)])  # (12, 254)
    exact = [sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(xq[0], row)) for row in wq]
    got = fp8_dot(xq, wq)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[0], np.array([float(e) for e in exact]).astype(np.float32))
    x = rng.standard_normal((3, 254)).astype(np.float32)
    ws = rng.random(12).astype(np.float32)
    xq2, xs = quantize_activations_fp8(x)
    np.testing.assert_array_equal(w8a8_fp8_linear(x, wq, ws), scale_outputs(fp8_dot(xq2, wq), xs, ws))
