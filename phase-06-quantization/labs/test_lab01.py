"""Lab-01's definition of done: the four properties of per-channel int8.

Each threshold is derived in a comment from the quantization rule
``|W - dequant(quant(W))| <= scale / 2`` (round to nearest), not guessed.
"""

import numpy as np

from npquant import (
    dequantize,
    memory_bytes,
    memory_bytes_quant,
    quant_linear,
    quantize_per_channel,
    quantize_per_tensor,
)

EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


def rel_error(w, w_hat):
    w = w.astype(np.float64)
    return np.linalg.norm(w - w_hat.astype(np.float64)) / np.linalg.norm(w)


def test_round_trip_error_is_small():
    w = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    q, scales = quantize_per_channel(w)
    w_hat = dequantize(q, scales)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and w_hat.dtype == np.float32
    err = rel_error(w, w_hat)
    # Rounding error is about uniform on [-s/2, s/2], rms s/sqrt(12), with
    # s = absmax/127. The absmax of 1024 standard normals is about 3.3 sigma,
    # so rel error ~ 3.3 / (127 * sqrt(12)) = 0.75%: below 1% with margin.
    assert err < 0.01
    # The hard bound: every element within s/2, so ||E||_F <= sqrt(I * sum s_o^2) / 2.
    bound = np.sqrt(w.shape[1] * np.sum(scales.astype(np.float64) ** 2)) / 2
    assert np.linalg.norm(w.astype(np.float64) - w_hat) <= bound * (1 + 1e-6)


def test_per_channel_beats_per_tensor_with_an_outlier_row():
    rng = np.random.default_rng(1)
    w = (0.02 * rng.standard_normal((256, 1024))).astype(np.float32)
    w[3] *= 100.0  # one output channel ~100x larger
    q_c, s_c = quantize_per_channel(w)
    q_t, s_t = quantize_per_tensor(w)
    err_channel = rel_error(w, dequantize(q_c, s_c))
    err_tensor = rel_error(w, dequantize(q_t, s_t))
    # Per tensor, the shared scale is ~100x too big for the 255 ordinary rows:
    # most of their weights round to 0, so each row's error is about its own
    # norm (rms ~0.37 s_t per element). Per channel, only the outlier row keeps
    # that coarse scale (rms s_t/sqrt(12) = 0.29 s_t), the rest become 100x finer.
    # Ratio ~ sqrt(1 + 255 * (0.37/0.29)^2) ~ 20: demand 10x.
    assert err_tensor >= 10 * err_channel


def test_int8_storage_is_about_4x_smaller():
    out_features, in_features = 256, 1024
    w = np.random.default_rng(2).standard_normal((out_features, in_features)).astype(np.float32)
    q, scales = quantize_per_channel(w)
    assert memory_bytes(w) == 4 * out_features * in_features
    # 1 byte per code plus one float32 scale per row.
    assert memory_bytes_quant(q, scales) == out_features * in_features + 4 * out_features
    ratio = memory_bytes(w) / memory_bytes_quant(q, scales)
    # Exactly 4 I / (I + 4) = 3.984 for I = 1024: within 0.4% of 4.
    assert ratio == 4 * in_features / (in_features + 4)
    assert abs(ratio - 4) / 4 < 0.005


def test_quant_linear_matches_float_matmul():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 512)).astype(np.float32)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    q, scales = quantize_per_channel(w)
    y = quant_linear(x, q, scales)
    assert y.shape == (8, 300) and y.dtype == np.float32
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    exact = x64 @ w64.T
    # |y - x W^T| <= sum_i |x_i| s_o / 2 (weight rounding) plus float32
    # summation error of a length-I dot product, gamma_I * sum_i |x_i w_oi|
    # with gamma_I = I eps / (1 - I eps), counted for both products.
    in_features = w.shape[1]
    gamma = in_features * EPS32 / (1 - in_features * EPS32)
    abs_prod = np.abs(x64) @ np.abs(w64).T
    tol = np.abs(x64) @ np.broadcast_to(scales.astype(np.float64)[:, None] / 2, w.shape).T + 2 * gamma * abs_prod
    assert np.all(np.abs(y - exact) <= tol)
    # And the "apply" path is x @ dequantize(...).T, up to float32 summation order.
    y_ref = x64 @ dequantize(q, scales).astype(np.float64).T
    assert np.all(np.abs(y - y_ref) <= gamma * (np.abs(x64) @ np.abs(dequantize(q, scales).astype(np.float64)).T))
