"""AWQ's pure functions (npquant.calibrate.awq): the scale, the loss, the search, the folds.

The reference here is written separately: the output error is measured on the activations themselves, in
float64 (``||X W.T - (X / s) Q(W * s).T||**2 / N``), never through the Hessian the module uses; the scale
formula is AWQ's, written out again.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npquant
from npquant import NpquantError
from npquant.calibrate.awq import (
    InputStats,
    awq_loss,
    awq_scale,
    fold_into_norm,
    fold_into_rows,
    scale_columns,
    scale_hessian,
    search_scale,
)

W4G16 = npquant.Scheme("int", 4, "group", 16)


def ref_scale(abs_mean, a):
    """AWQ's: m ** a, at least 1e-4, divided by sqrt(max * min); float64, then float32."""
    s = np.maximum(np.asarray(abs_mean, np.float64) ** a, 1e-4)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def ref_output_error(x, ws, s, scheme):
    """Mean over the rows of x of the squared error of the group's concatenated outputs, float64, from x itself."""
    x64 = x.astype(np.float64)
    total = 0.0
    for w in ws:
        q = npquant.quantize((w * s[None, :]).astype(np.float32), scheme, backend="numpy").dequantize()
        y = x64 @ w.astype(np.float64).T
        y_hat = (x64 / s.astype(np.float64)) @ q.astype(np.float64).T  # the folded input times the stored weight
        total += float(((y - y_hat) ** 2).sum())
    return total / x.shape[0]


def layer(seed, tokens=200, in_features=48, loud=3):
    rng = np.random.default_rng(seed)
    gain = np.ones(in_features)
    gain[rng.choice(in_features, loud, replace=False)] = 15.0  # a few channels that fire much harder
    x = (rng.standard_normal((tokens, in_features)) * gain).astype(np.float32)
    ws = [rng.standard_normal((o, in_features)).astype(np.float32) for o in (24, 8)]
    return x, ws


def stats_of(x):
    stats = InputStats(x.shape[1])
    stats.add(x)
    return stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_picks_the_exponent_with_the_least_output_error(seed):
    x, ws = layer(seed)
    stats = stats_of(x)
    got = search_scale(ws, stats.abs_mean(), stats.hessian(), W4G16, grid=20)
    m = np.abs(x.astype(np.float64)).mean(axis=0)
    ref = np.array([ref_output_error(x, ws, ref_scale(m, j / 20), W4G16) for j in range(20)])
    # The module's loss goes through H = X.T X / N in float64; the reference sums the errors themselves.
    # Both are float64 sums of ~10^4 terms of one sign: they agree to ~1e-12 relative; 1e-9 leaves room.
    np.testing.assert_allclose(got.losses, ref, rtol=1e-9)
    assert got.alpha == int(np.argmin(ref)) / 20
    np.testing.assert_array_equal(got.scale, ref_scale(m, got.alpha))
    assert got.loss == got.losses.min() and got.rtn_loss == got.losses[0]
    assert got.alpha > 0 and got.loss < 0.9 * got.rtn_loss  # loud channels: the scale pays here


def test_exponent_zero_is_round_to_nearest_so_awq_is_never_worse():
    x, ws = layer(3)
    stats = stats_of(x)
    rtn = sum(ref_output_error(x, [w], np.ones(48, np.float32), W4G16) for w in ws)
    got = search_scale(ws, stats.abs_mean(), stats.hessian(), W4G16)
    np.testing.assert_allclose(got.rtn_loss, rtn, rtol=1e-9)
    np.testing.assert_array_equal(awq_scale(stats.abs_mean(), 0.0), np.ones(48, np.float32))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([8, 16, 32]),
       grid=st.integers(1, 12))
def test_awq_loss_is_at_most_round_to_nearest(seed, bits, group, grid):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 32)) * rng.lognormal(0, 1.5, 32)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    h = x.T @ x / 64
    scheme = npquant.Scheme("int", bits, "group", group)
    got = search_scale([w], np.abs(x).mean(0), h, scheme, grid=grid)
    assert got.loss <= got.rtn_loss
    assert got.rtn_loss == awq_loss([w], h, np.ones(32, np.float32), scheme)
    assert np.isclose(float(got.scale.max()) * float(got.scale.min()), 1.0, rtol=1e-6)  # AWQ's normalisation


def test_scale_formula():
    m = np.array([0.0, 0.5, 2.0, 8.0])
    for a in (0.0, 0.3, 1.0):
        np.testing.assert_array_equal(awq_scale(m, a), ref_scale(m, a))
    assert awq_scale(m, 1.0)[0] > 0  # a dead channel keeps a finite, positive scale


def test_scaled_hessian_is_the_hessian_of_the_scaled_inputs():
    x, _ = layer(4)
    s = np.random.default_rng(4).lognormal(0, 1, 48).astype(np.float32)
    want = stats_of(x.astype(np.float64) / s.astype(np.float64)).hessian()
    # Both float64 sums of 200 products: they differ by the summation's rounding, ~200 * 1e-16 of the largest
    # term; off-diagonal sums cancel, so the bound is taken against the largest entry.
    got = scale_hessian(stats_of(x).hessian(), s)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_input_stats_leave_out_padding():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    stats = InputStats(4)
    stats.add(x, mask)
    kept = x.reshape(6, 4)[[0, 1, 3]].astype(np.float64)
    assert stats.tokens == 3
    np.testing.assert_array_equal(stats.abs_mean(), np.abs(kept).mean(axis=0))
    np.testing.assert_allclose(stats.hessian(), kept.T @ kept / 3, rtol=1e-15)


def test_folds_divide_the_producer_and_leave_inputs_alone():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 16)).astype(np.float32)
    w, b = rng.standard_normal((12, 16)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    s = rng.lognormal(0, 1, 12).astype(np.float32)
    before = (w.copy(), b.copy(), s.copy())
    w2, b2 = fold_into_rows(w, b, s)
    y = x.astype(np.float64) @ w.astype(np.float64).T + b
    # (x @ (w / s).T + b / s) * s: two float32 roundings per term (w / s, b / s) on float64 sums: ~1e-7 relative
    # of each term, at most 16 terms: 1e-5 of the largest output covers it.
    np.testing.assert_allclose((x.astype(np.float64) @ w2.T.astype(np.float64) + b2) * s, y,
                               atol=1e-5 * np.abs(y).max())
    g, beta = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    g2, beta2 = fold_into_norm(g, beta, s)
    np.testing.assert_allclose(g2 * s, g, rtol=2**-23)  # one rounding each way
    np.testing.assert_allclose(beta2 * s, beta, rtol=2**-23)
    assert fold_into_norm(g, None, s)[1] is None
    np.testing.assert_array_equal(scale_columns(w, s[:16] if len(s) >= 16 else np.ones(16, np.float32)) / 1,
                                  w * (s[:16] if len(s) >= 16 else np.ones(16, np.float32)))
    for a, a0 in zip((w, b, s), before):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("call, message", [
    (lambda w, h, m: search_scale(w[0], m, h, W4G16), "ws must be a non-empty list"),
    (lambda w, h, m: search_scale([w[0], w[1][:, :8]], m, h, W4G16), "ws[1] has in_features=8"),
    (lambda w, h, m: search_scale(w, m[:5], h, W4G16), "abs_mean must have 48 entries"),
    (lambda w, h, m: search_scale(w, -m, h, W4G16), "abs_mean must be finite and >= 0"),
    (lambda w, h, m: search_scale(w, m, h[:4], W4G16), "hessian must be a numpy array (48, 48)"),
    (lambda w, h, m: search_scale(w, m, h, W4G16, grid=0), "grid must be a positive int"),
    (lambda w, h, m: search_scale(w, m, h, "w9"), "scheme='w9' is not a preset"),
    (lambda w, h, m: search_scale(w, m, h, W4G16, observer="max"), "observer='max' is not known"),
    (lambda w, h, m: awq_scale(m, 1.5), "alpha must be a float in [0, 1]"),
    (lambda w, h, m: search_scale(w, m, h, W4G16, loss=3.0), "loss must be a callable"),
    (lambda w, h, m: search_scale(w, m, h, W4G16, loss=lambda s: float("nan")), "loss(scale) must return a finite"),
    (lambda w, h, m: search_scale(w, m, h, W4G16, loss=lambda s: -1.0), "got -1.0 at a=0.0"),
    (lambda w, h, m: awq_loss(w, h, np.zeros(48, np.float32), W4G16), "scale must be finite and > 0"),
    (lambda w, h, m: fold_into_rows(w[0], np.ones(3), np.ones(24, np.float32)), "bias must have shape (24,)"),
    (lambda w, h, m: fold_into_norm(np.ones((2, 2)), None, np.ones(2, np.float32)), "norm weight must be 1-D"),
])
def test_bad_inputs_are_one_line(call, message):
    x, ws = layer(6)
    stats = stats_of(x)
    with pytest.raises(NpquantError) as err:
        call(ws, stats.hessian(), stats.abs_mean())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ties_keep_the_smallest_exponent():
    # Every input channel alike: every a gives s = 1, so every loss is the same, and a = 0 (RTN) is kept.
    x, ws = layer(7, loud=0)
    h = stats_of(x).hessian()
    got = search_scale(ws, np.full(48, 0.8), h, W4G16, grid=10)
    assert np.all(got.losses == got.losses[0]) and got.alpha == 0.0


def test_a_given_loss_replaces_round_to_nearest():
    # loss= scores every point of the grid instead of RTN's error, a = 0 first: the search takes its least,
    # ties to the smaller a, and reports its values (here a made-up loss with its least at a = 0.35).
    x, ws = layer(8)
    stats = stats_of(x)
    m = np.abs(x.astype(np.float64)).mean(axis=0)
    seen = []

    def loss(s):
        seen.append(s.copy())
        return (len(seen) - 1 - 7) ** 2 + 0.5

    got = search_scale(ws, stats.abs_mean(), stats.hessian(), W4G16, grid=20, loss=loss)
    assert len(seen) == 20
    for j, s in enumerate(seen):
        np.testing.assert_array_equal(s, ref_scale(m, j / 20))
    assert got.alpha == 0.35 and got.loss == 0.5 and got.rtn_loss == 49.5
    np.testing.assert_array_equal(got.scale, ref_scale(m, 0.35))
