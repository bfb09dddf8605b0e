"""Scale refit (calibrate/refit.py) and the float model's target (calibrate/target.py), against float64
references built here from the definitions (explicit design matrices, lstsq on the token matrices)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npquant
from npquant import NpquantError
from npquant.calibrate import gptq, hessian_loss
from npquant.calibrate.refit import refit_scales
from npquant.calibrate.target import CrossMoment, model_loss, model_target


def correlated(rng, n, width):
    """float64 ``(n, width)`` inputs with correlated channels and a few large ones, as layer inputs have."""
    x = rng.standard_normal((n, width)) @ rng.standard_normal((width, width)) / np.sqrt(width)
    x[:, :3] *= 8.0
    return x


def reference_scales(q, w, x, scheme, shape):
    """Per block of rows: least squares of ``x w_r`` on ``x A_r s`` over the block's rows, ``A_r`` built column by
    column (one column per block of inputs), in float64 with lstsq (no normal equations)."""
    out_features, in_features = shape
    bo, bi = scheme.block_shape(shape)
    n_groups = -(-in_features // bi)
    result = []
    for r0 in range(0, out_features, bo):
        design, rhs = [], []
        for r in range(r0, min(r0 + bo, out_features)):
            a = np.zeros((in_features, n_groups))
            for g in range(n_groups):
                a[g * bi:(g + 1) * bi, g] = q[r, g * bi:(g + 1) * bi]
            design.append(x @ a)
            rhs.append(x @ w[r])
        s, *_ = np.linalg.lstsq(np.vstack(design), np.concatenate(rhs), rcond=None)
        result.append(s)
    return np.array(result)


@pytest.mark.parametrize("scheme", ["w4-g32", "w4-channel", "w8-tensor", "w3-g128", "w2-g64"])
def test_refit_solves_the_least_squares_of_the_codes(scheme):
    rng = np.random.default_rng(0)
    shape = (8, 128)
    x = correlated(rng, 600, shape[1])
    w = rng.standard_normal(shape).astype(np.float32)
    h = x.T @ x
    qt = gptq(w, h, scheme)
    new = refit_scales(qt, w, h)
    assert new.codes is qt.codes and new.scale.dtype == qt.scale.dtype and new.scale.shape == qt.scale.shape
    want = reference_scales(qt.int_codes().astype(np.float64), w.astype(np.float64), x, qt.scheme, shape)
    # Two float64 solutions of one well-conditioned least squares (normal equations against lstsq), then rounded
    # to float32: agreement to a few float32 ulps; 1e-5 relative leaves room for the conditioning.
    np.testing.assert_allclose(new.scale.astype(np.float64), want, rtol=1e-5)
    assert hessian_loss(w, new, h) <= hessian_loss(w, qt, h)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([16, 32, 64]))
def test_refit_never_increases_the_output_error(seed, bits, group):
    rng = np.random.default_rng(seed)
    x = correlated(rng, 200, 64)
    w = (rng.standard_normal((6, 64)) * rng.uniform(0.01, 10)).astype(np.float32)
    h = x.T @ x
    scheme = npquant.Scheme("int", bits, "group", group)
    for qt in (npquant.quantize(w, scheme), gptq(w, h, scheme)):
        new = refit_scales(qt, w, h)
        np.testing.assert_array_equal(new.int_codes(), qt.int_codes())
        # The old scales are one point of the quadratic the refit minimises; rounding the optimum to float32
        # moves the loss by a second-order amount, far below 1e-6 of it.
        assert hessian_loss(w, new, h) <= hessian_loss(w, qt, h) * (1 + 1e-6)
        assert np.isfinite(new.scale).all() and (new.scale > 0).all()


def test_refit_keeps_the_scale_of_a_block_whose_codes_are_all_zero():
    rng = np.random.default_rng(1)
    x = correlated(rng, 300, 64)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[:, 32:] = 0.0  # the second group of every row rounds to code 0
    qt = npquant.quantize(w, "w4-g32")
    new = refit_scales(qt, w, x.T @ x)
    np.testing.assert_array_equal(new.scale[:, 1], qt.scale[:, 1])
    assert not np.array_equal(new.scale[:, 0], qt.scale[:, 0])


def test_refit_bad_input():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    h = np.eye(64)
    for scheme in ("w4-g128-asym", "fp8-channel", "nvfp4", "mxfp4"):
        qt = npquant.quantize(rng.standard_normal((4, 128)).astype(np.float32), scheme)
        with pytest.raises(NpquantError, match="refit_scales takes symmetric int schemes"):
            refit_scales(qt, w, h)
    qt = npquant.quantize(w, "w4-g32")
    with pytest.raises(NpquantError, match=r"w must be \(4, 64\) like qt, got \(4, 32\)"):
        refit_scales(qt, w[:, :32], h)
    with pytest.raises(NpquantError, match=r"hessian must be a numpy array \(64, 64\), got \(32, 32\)"):
        refit_scales(qt, w, np.eye(32))
    with pytest.raises(NpquantError, match="hessian holds NaN or Inf"):
        refit_scales(qt, w, np.full((64, 64), np.nan))
    with pytest.raises(NpquantError, match="qt must be a QuantizedTensor, got ndarray"):
        refit_scales(w, w, h)


def test_target_is_the_weight_when_nothing_before_is_quantized():
    rng = np.random.default_rng(3)
    x = correlated(rng, 500, 32)
    w = rng.standard_normal((5, 32)).astype(np.float32)
    h = x.T @ x / 500
    for ridge in (0.0, 0.1, 1.0, 10.0):
        # W* = (W H + lam W) (H + lam I)^-1 = W: float64 solves of a matrix with condition number below 1e4.
        np.testing.assert_allclose(model_target(w, h, h, ridge=ridge), w, rtol=0, atol=1e-5)


def test_target_without_ridge_is_the_regression_of_float_outputs_on_quantized_inputs():
    rng = np.random.default_rng(4)
    n, width = 800, 24
    xf = correlated(rng, n, width)
    xq = xf + 0.05 * rng.standard_normal((n, width))  # the inputs the quantized model gives
    w = rng.standard_normal((6, width)).astype(np.float32)
    moments = CrossMoment(width)
    moments.add(xf[:500], xq[:500])
    moments.add(xf[500:], xq[500:])
    cross, h_q, h_f = moments.matrices()
    got = model_target(w, cross, h_q, ridge=0.0)
    want = np.linalg.lstsq(xq, xf @ w.astype(np.float64).T, rcond=None)[0].T  # (O, I)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # float32 output of a well-conditioned solve
    # A large ridge pulls the target to the anchor.
    anchor = rng.standard_normal(w.shape).astype(np.float32)
    far = model_target(w, cross, h_q, anchor=anchor, ridge=1e8)
    np.testing.assert_allclose(far, anchor, atol=1e-5)
    # The objective in moments equals the error on the tokens themselves.
    qd = npquant.quantize(got, npquant.Scheme("int", 4, "group", 8)).dequantize()
    direct = np.sum((xf @ w.astype(np.float64).T - xq @ qd.astype(np.float64).T) ** 2) / n
    assert model_loss(w, qd, cross, h_q, h_f) == pytest.approx(direct, rel=1e-9)
    # The split GPTQ relies on: error = the regression's own (no Q changes it) + tr((W* - Q) H~ (W* - Q).T),
    # with W* the unregularised target computed in float64 here (model_target returns float32).
    exact = np.linalg.solve(h_q, (w.astype(np.float64) @ cross).T).T  # (O, I)
    d = exact - qd.astype(np.float64)
    split = model_loss(w, exact, cross, h_q, h_f) + np.einsum("oi,oi->", d @ h_q, d)
    assert model_loss(w, qd, cross, h_q, h_f) == pytest.approx(split, rel=1e-9)


def test_cross_moment_masks_and_bad_input():
    rng = np.random.default_rng(5)
    xf, xq = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 3, 8))
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    m = CrossMoment(8)
    m.add(xf, xq, mask)
    keep = mask.reshape(-1) != 0
    f, q = xf.reshape(-1, 8)[keep], xq.reshape(-1, 8)[keep]
    cross, h_q, h_f = m.matrices()
    np.testing.assert_allclose(cross, f.T @ q / 3, rtol=1e-12)
    np.testing.assert_allclose(h_q, q.T @ q / 3, rtol=1e-12)
    np.testing.assert_allclose(h_f, f.T @ f / 3, rtol=1e-12)
    with pytest.raises(NpquantError, match=r"x_float and x_quant must both be \(\.\.\., 8\)"):
        m.add(xf, xq[..., :4])
    with pytest.raises(NpquantError, match="hold NaN or Inf"):
        m.add(np.full((1, 8), np.inf), np.ones((1, 8)))
    with pytest.raises(NpquantError, match="no tokens were added"):
        CrossMoment(4).matrices()
    with pytest.raises(NpquantError, match=r"ridge must be a finite float >= 0, got -1"):
        model_target(np.ones((2, 8), np.float32), cross, h_q, ridge=-1)
    with pytest.raises(NpquantError, match=r"cross must be a numpy array \(8, 8\), got \(4, 4\)"):
        model_target(np.ones((2, 8), np.float32), np.eye(4), h_q)
