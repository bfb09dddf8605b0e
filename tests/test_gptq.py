"""GPTQ against a plain float64 reference, its identities, and bad input; the Hessian; the mse observer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npquant
from npquant import NpquantError, QuantizedTensor, Scheme, quantize
from npquant.calibrate import Hessian, calibration_texts, gptq, hessian_loss


def correlated_inputs(n, i, seed=0):
    """float32 (n, i) activations with strongly correlated columns and unequal scales."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((i, i)) * (rng.uniform(0, 1, i) < 0.3)
    x = rng.standard_normal((n, i)) @ (np.eye(i) + mix) * np.exp(rng.uniform(-1, 1, i))
    return x.astype(np.float32)


def weight(o, i, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((o, i)) * np.exp(rng.uniform(-1, 1, (o, 1)))).astype(np.float32)


def reference_gptq(w, h, qt_static, act_order, damp):
    """Column-by-column GPTQ in float64, written from the paper's equations: no blocks, no lazy updates.

    Uses the explicit inverse: after column j is rounded, every later column k
    moves by -(w_j - q_j) * Hinv[j, k] / Hinv[j, j], then Hinv loses row and
    column j (the Schur complement). Scales and zero points are the static
    ones of ``qt_static``. Returns int codes (O, I) and each code's unrounded
    ratio w / scale (to tell ties from disagreements).
    """
    o, i = w.shape
    scheme = qt_static.scheme
    bo, bi = qt_static.block_shape
    scale = qt_static.scale.astype(np.float64)
    zp = None if qt_static.zero_point is None else qt_static.zero_point.astype(np.float64)
    h = h.astype(np.float64).copy()
    d = np.diag(h).copy()
    dead = d == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h += damp * np.mean(np.diag(h)) * np.eye(i)
    order = np.argsort(-d, kind="stable") if act_order else np.arange(i)
    hinv = np.linalg.inv(h[np.ix_(order, order)])
    ww = w.astype(np.float64)[:, order].copy()
    codes = np.zeros((o, i), np.int64)
    ratios = np.zeros((o, i))
    for j in range(i):
        col = order[j]
        for r in range(o):
            s = float(np.float32(scale[r // bo, col // bi]))
            z = 0.0 if zp is None else zp[r // bo, col // bi]
            v = float(np.float32(ww[r, j]))
            ratio = float(np.float32(v / s)) if s else 0.0
            q = min(max(round(ratio) + z, scheme.qmin), scheme.qmax)
            codes[r, col] = int(q)
            ratios[r, col] = ratio
            deq = float(np.float32(np.float32(q - z) * np.float32(s)))
            err = ww[r, j] - deq
            ww[r, j + 1:] -= err * hinv[j, j + 1:] / hinv[j, j]
        # Schur complement: condition the remaining inverse on column j being fixed.
        hinv[j + 1:, j + 1:] -= np.outer(hinv[j + 1:, j], hinv[j, j + 1:]) / hinv[j, j]
    return codes, ratios


REF_SCHEMES = ["w4-g32", "w4-g32-asym-like", "w3-channel", "w8-channel", "w2-g16", "w4-tensor"]


def ref_scheme(name):
    return {
        "w4-g32": Scheme("int", 4, "group", 32),
        "w4-g32-asym-like": Scheme("int", 4, "group", 32, symmetric=False),
        "w3-channel": Scheme("int", 3, "channel"),
        "w8-channel": Scheme("int", 8, "channel"),
        "w2-g16": Scheme("int", 2, "group", 16),
        "w4-tensor": Scheme("int", 4, "tensor"),
    }[name]


@pytest.mark.parametrize("name", REF_SCHEMES)
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("block_size", [128, 7])
def test_blocked_gptq_agrees_with_the_column_by_column_reference(name, act_order, block_size):
    scheme = ref_scheme(name)
    x = correlated_inputs(400, 64)
    h = x.T.astype(np.float64) @ x
    h[:, 5] = h[5, :] = 0  # one dead input
    w = weight(12, 64)
    got = gptq(w, h, scheme, act_order=act_order, block_size=block_size)
    static = quantize(w, scheme, backend="numpy")
    want, ratios = reference_gptq(w, h, static, act_order, 0.01)
    np.testing.assert_array_equal(got.scale, static.scale)
    q = got.int_codes().astype(np.int64)
    differ = q != want
    # The two orders of float64 arithmetic differ by ~1e-13 relative; a code may
    # only differ where the reference's ratio sits that close to a rounding tie,
    # and then by one step, after which the runs diverge: compare up to the first.
    if differ.any():
        first = np.argwhere(differ)[0]
        frac = abs(abs(ratios[tuple(first)] % 1) - 0.5)
        assert frac < 1e-6 and abs(q[tuple(first)] - want[tuple(first)]) == 1, (first, ratios[tuple(first)])
    assert differ.mean() < 0.02


DIAG_SCHEMES = ["w4-g128", "w4-g32", "w4-g128-asym", "w8-channel", "w3-g128", "w2-g64", "w4-tensor", "w8-tensor",
                Scheme("int", 5, "group", 64, symmetric=False), Scheme("int", 4, "group", 32, scale_dtype="bfloat16")]


@pytest.mark.parametrize("scheme", DIAG_SCHEMES, ids=str)
@pytest.mark.parametrize("act_order", [True, False])
def test_a_diagonal_hessian_gives_exactly_the_engines_codes(scheme, act_order):
    # No coupling between inputs: nothing to feed back, so GPTQ is round-to-nearest.
    rng = np.random.default_rng(3)
    w = weight(40, 256)
    w[7] = 0  # an all-zero row: scale 0, codes 0
    d = rng.uniform(0.1, 5, 256)
    d[[3, 100]] = 0  # dead inputs
    got = gptq(w, np.diag(d), scheme, act_order=act_order)
    want = quantize(w, scheme)
    assert got.scheme == want.scheme and got.shape == want.shape
    np.testing.assert_array_equal(got.codes.view(np.uint8), want.codes.view(np.uint8))
    np.testing.assert_array_equal(got.scale.view(np.uint8), want.scale.view(np.uint8))
    if want.zero_point is not None:
        np.testing.assert_array_equal(got.zero_point, want.zero_point)


@pytest.mark.parametrize("scheme", ["w4-g128", "w4-g32", "w4-g128-asym", "w3-g128", "w8-channel", "w2-g64"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(scheme):
    x = correlated_inputs(2048, 256)
    hess = Hessian(256)
    hess.add(x)
    h = hess.matrix()
    w = weight(64, 256)
    rtn = hessian_loss(w, quantize(w, scheme), h)
    for observer in ("minmax", "mse"):
        ours = hessian_loss(w, gptq(w, h, scheme, observer=observer), h)
        assert ours < 0.85 * rtn, (observer, ours / rtn)
    # The loss is the mean squared output error over the calibration tokens.
    # Both sides are float64 sums of ~2048 * 256 terms in different orders;
    # through H they may cancel (|dW| H |dW| exceeds the loss by up to ~100x
    # here), so agreement is to ~1e-16 * 256 * 100 * sqrt(2048), within 1e-7.
    qt = gptq(w, h, scheme)
    direct = np.mean(np.sum((x.astype(np.float64) @ (w - qt.dequantize()).T.astype(np.float64)) ** 2, axis=1))
    assert hessian_loss(w, qt, h) == pytest.approx(direct, rel=1e-7)


def test_act_order_keeps_the_static_group_layout():
    # Columns are rounded out of order, yet every group keeps the scale the engine
    # gives it from the original weight: an ordinary tensor, no g_idx.
    x = correlated_inputs(1024, 256)
    h = x.T.astype(np.float64) @ x
    w = weight(32, 256)
    qt = gptq(w, h, "w4-g128", act_order=True)
    static = quantize(w, "w4-g128")
    assert isinstance(qt, QuantizedTensor) and qt.codes.shape == static.codes.shape
    np.testing.assert_array_equal(qt.scale, static.scale)
    q = qt.int_codes()
    assert q.min() >= -8 and q.max() <= 7  # w4-g128: the full grid
    assert not np.array_equal(qt.codes, static.codes)  # the error feedback moved codes
    # Every existing path takes it: pack round trip, prepare, linear.
    back = QuantizedTensor.from_int_codes(q, qt.scale, None, "w4-g128")
    np.testing.assert_array_equal(back.codes, qt.codes)
    xb = x[:3]
    np.testing.assert_allclose(npquant.linear(xb, npquant.prepare(qt)), npquant.linear(xb, qt, backend="numpy"),
                               rtol=1e-4, atol=1e-4)


def test_deterministic_and_inputs_untouched():
    x = correlated_inputs(512, 128)
    h = x.T.astype(np.float64) @ x
    w = weight(16, 128)
    w0, h0 = w.copy(), h.copy()
    a = gptq(w, h, "w4-g32", observer="mse")
    b = gptq(w, h, "w4-g32", observer="mse")
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)


def test_any_positive_scale_of_the_hessian_gives_the_same_codes():
    x = correlated_inputs(512, 128)
    h = x.T.astype(np.float64) @ x
    w = weight(16, 128)
    a = gptq(w, h, "w4-g32")
    b = gptq(w, h * 2.0**-20, "w4-g32")  # a power of two: the same arithmetic, scaled exactly
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("args, kwargs, match", [
    (("fp8-channel",), {}, r"gptq takes int schemes"),
    (("w4-g32",), {"block_size": 0}, r"block_size must be a positive int"),
    (("w4-g32",), {"damp": -1.0}, r"damp must be a finite float >= 0"),
    (("w4-g32",), {"act_order": "yes"}, r"act_order must be True or False"),
    (("w4-g32",), {"observer": "max"}, r"observer='max' is not known"),
])
def test_bad_arguments(args, kwargs, match):
    w = weight(4, 64)
    with pytest.raises(NpquantError, match=match):
        gptq(w, np.eye(64), *args, **kwargs)


def test_bad_hessians_and_weights():
    w = weight(4, 64)
    with pytest.raises(NpquantError, match=r"hessian must be \(64, 64\) for w with in_features=64, got \(32, 32\)"):
        gptq(w, np.eye(32), "w4-g32")
    with pytest.raises(NpquantError, match=r"hessian must be a numpy array"):
        gptq(w, [[1.0]], "w4-g32")
    bad = np.eye(64)
    bad[3, 3] = np.nan
    with pytest.raises(NpquantError, match=r"hessian holds NaN or Inf"):
        gptq(w, bad, "w4-g32")
    bad = np.eye(64)
    bad[0, 1] = 5
    with pytest.raises(NpquantError, match=r"not symmetric"):
        gptq(w, bad, "w4-g32")
    bad = np.eye(64)
    bad[2, 2] = -1
    with pytest.raises(NpquantError, match=r"hessian\[2, 2\] = -1 is negative"):
        gptq(w, bad, "w4-g32")
    indefinite = np.eye(64)
    indefinite[0, 1] = indefinite[1, 0] = 3  # eigenvalue -2: no damping of 0.01 saves it
    with pytest.raises(NpquantError, match=r"not positive definite even with damp=0.01"):
        gptq(w, indefinite, "w4-g32")
    with pytest.raises(NpquantError, match=r"hessian must be floating"):
        gptq(w, np.eye(64, dtype=np.int64), "w4-g32")
    nan_w = w.copy()
    nan_w[2, 5] = np.nan
    with pytest.raises(NpquantError, match=r"w row 2 holds NaN or Inf"):
        gptq(nan_w, np.eye(64), "w4-g32")
    with pytest.raises(NpquantError, match=r"group_size=32 must divide in_features=48"):
        gptq(weight(4, 48), np.eye(48), "w4-g32")


def test_a_singular_hessian_is_rescued_by_damping():
    x = correlated_inputs(8, 64)  # 8 tokens: rank 8 of 64
    h = x.T.astype(np.float64) @ x
    qt = gptq(weight(4, 64), h, "w4-g32")
    assert qt.int_codes().shape == (4, 64)


# --- the Hessian ------------------------------------------------------------------------------
def test_hessian_streams_batches_and_leaves_padding_out():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    h = Hessian(16)
    h.add(x[:2], mask[:2])
    h.add(x[2:], mask[2:])
    rows = np.concatenate([x[b, : mask[b].sum()] for b in range(3)]).astype(np.float64)
    assert h.tokens == 9
    np.testing.assert_allclose(h.xtx, rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(h.matrix(), rows.T @ rows / 9, rtol=1e-12)
    assert h.xtx.dtype == np.float64


def test_hessian_bad_input():
    h = Hessian(8)
    with pytest.raises(NpquantError, match=r"the Hessian has no tokens yet"):
        h.matrix()
    with pytest.raises(NpquantError, match=r"last dimension in_features=8, got shape \(2, 7\)"):
        h.add(np.ones((2, 7), np.float32))
    with pytest.raises(NpquantError, match=r"mask must have shape \(2, 3\)"):
        h.add(np.ones((2, 3, 8), np.float32), mask=np.ones((2, 4)))
    with pytest.raises(NpquantError, match=r"x holds NaN or Inf"):
        h.add(np.full((2, 8), np.inf, np.float32))
    with pytest.raises(NpquantError, match=r"floating numpy array"):
        h.add(np.ones((2, 8), np.int32))
    with pytest.raises(NpquantError, match=r"in_features must be a positive int"):
        Hessian(0)


# --- the mse observer ----------------------------------------------------------------------
@st.composite
def group_weights(draw):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    gs = draw(st.sampled_from([4, 8, 16]))
    rows = draw(st.integers(1, 4))
    groups = draw(st.integers(1, 3))
    w = draw(st.lists(st.floats(-100, 100, width=32), min_size=rows * gs * groups, max_size=rows * gs * groups))
    return Scheme("int", bits, "group", gs, symmetric), np.array(w, np.float32).reshape(rows, gs * groups)


def block_sse(w, qt):
    o, i = w.shape
    d = (w.astype(np.float64) - qt.dequantize().astype(np.float64)).reshape(o, qt.scale.shape[1], -1)
    return (d**2).sum(axis=2)


@settings(max_examples=150, deadline=None)
@given(group_weights())
def test_mse_observer_never_loses_to_minmax_block_by_block(case):
    scheme, w = case
    mse = quantize(w, scheme, observer="mse")
    mm = quantize(w, scheme, observer="minmax")
    # Each block's candidates include the minmax range (shrink 1.0), and the
    # observer keeps the least error; float32 vs float64 sums: 1e-6 relative slack.
    a, b = block_sse(w, mse), block_sse(w, mm)
    assert np.all(a <= b * (1 + 1e-6) + 1e-30)
    q = mse.int_codes().astype(int)
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax


def test_mse_observer_shrinks_a_range_set_by_one_outlier():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    w[:, 0] = 12.0  # one large value per row sets minmax's range
    mse = quantize(w, "w4-channel", observer="mse")
    mm = quantize(w, "w4-channel")
    assert np.all(mse.scale < mm.scale)
    assert npquant.metrics.weight_error(w, mse)[0] < npquant.metrics.weight_error(w, mm)[0]


def test_mse_observer_refuses_tensor_scales_and_unknown_names():
    w = weight(4, 64)
    with pytest.raises(NpquantError, match=r"observer='mse' chooses channel or group scales"):
        quantize(w, "w8-tensor", observer="mse")
    with pytest.raises(NpquantError, match=r"observer='best' is not known"):
        quantize(w, "w8-channel", observer="best")


def test_from_int_codes_round_trips_and_checks_range():
    w = weight(6, 64)
    for name in ["w4-g32", "w4-g128-asym", "w8-channel", "w3-g128", "w2-g64"]:
        if npquant.get_scheme(name).granularity == "group" and 64 % npquant.get_scheme(name).group_size:
            continue
        qt = quantize(w, name)
        back = QuantizedTensor.from_int_codes(qt.int_codes(), qt.scale, qt.zero_point, name)
        np.testing.assert_array_equal(back.codes.view(np.uint8), qt.codes.view(np.uint8))
    with pytest.raises(NpquantError, match=r"q holds codes in \[-8, 7\]; .* takes \[-7, 7\]"):
        QuantizedTensor.from_int_codes(np.full((6, 64), -8) + np.eye(6, 64, dtype=int) * 15, qt.scale[:, :2],
                                       None, "w4-g32-restricted")
    with pytest.raises(NpquantError, match=r"q holds codes in \[-9, 7\]; .* takes \[-8, 7\]"):
        QuantizedTensor.from_int_codes(np.full((6, 64), -9) + np.eye(6, 64, dtype=int) * 16, qt.scale[:, :2],
                                       None, "w4-g32")
    with pytest.raises(NpquantError, match=r"from_int_codes takes int schemes"):
        QuantizedTensor.from_int_codes(np.zeros((6, 64), int), np.ones((6, 1), np.float32), None, "fp8-channel")


# --- calibration text ------------------------------------------------------------------------
def test_calibration_text_is_disjoint_from_the_evaluation_set():
    from npquant.fidelity import SENTENCES

    def norm(s):
        return "".join(ch for ch in s.lower() if ch.isalnum())

    calib = calibration_texts()
    assert len(calib) >= 512 and len(set(calib)) == len(calib)
    assert not {norm(s) for s in calib} & {norm(s) for s in SENTENCES}


def test_calibration_file_errors(tmp_path):
    with pytest.raises(NpquantError, match=r"--calibration .*missing.txt: No such file"):
        calibration_texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(NpquantError, match=r"holds no text"):
        calibration_texts(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(NpquantError, match=r"is not UTF-8 text"):
        calibration_texts(binary)
    ok = tmp_path / "ok.txt"
    ok.write_text("one\n\n two \nthree\n", encoding="utf-8")
    assert calibration_texts(ok) == ["one", "two", "three"]
    assert calibration_texts(ok, max_samples=2) == ["one", "two"]
    with pytest.raises(NpquantError, match=r"max_samples must be a positive int"):
        calibration_texts(ok, max_samples=0)


def test_mse_ties_keep_the_minmax_range():
    # A group whose inputs are all dead weighs every candidate's error by 0:
    # a tie everywhere, so the observer keeps shrink 1.0, the engine's own scale.
    w = weight(8, 128)
    d = np.ones(128)
    d[:32] = 0
    qt = gptq(w, np.diag(d), "w4-g32", observer="mse")
    np.testing.assert_array_equal(qt.scale[:, 0], quantize(w, "w4-g32").scale[:, 0])
    assert np.any(qt.scale[:, 1:] != quantize(w, "w4-g32").scale[:, 1:])


def test_dead_inputs_need_no_damping_and_keep_round_to_nearest_codes():
    # A dead input (zero row and column of H) is given H[i, i] = 1 and no coupling:
    # without damping H would be singular; its column is rounded to nearest, never zeroed.
    x = correlated_inputs(512, 64)
    x[:, [3, 40]] = 0
    h = x.T.astype(np.float64) @ x
    w = weight(8, 64)
    qt = gptq(w, h, "w4-g32", damp=0.0)
    rtn = quantize(w, "w4-g32").int_codes()
    np.testing.assert_array_equal(qt.int_codes()[:, [3, 40]], rtn[:, [3, 40]])
    assert np.any(qt.int_codes() != rtn)
