"""The engine against the independent reference, every code enumerated, and its invariants."""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npquant
from npquant import NpquantError, QuantizedTensor, Scheme, quantize
from npquant.schemes import FLOAT_MAX as ENGINE_FLOAT_MAX
from reference import (
    FLOAT_MAX,
    fp8_decode,
    fp8_finite_table,
    fp8_round,
    reference_dequantize,
    reference_quantize,
)

EPS32 = 2.0**-24  # unit roundoff of float32 (half an ulp at 1)


def engine_codes(qt: QuantizedTensor) -> np.ndarray:
    """The codes in the reference's convention: signed/unsigned ints, or fp8 bit patterns."""
    if qt.scheme.is_float:
        return qt.codes.view(np.uint8).astype(np.int64)
    return qt.int_codes().astype(np.int64)


def scheme_kwargs(s: Scheme) -> dict:
    return dict(dtype=s.dtype, bits=s.bits, granularity=s.granularity, group_size=s.group_size,
                symmetric=s.symmetric, scale_dtype=s.scale_dtype, grid=s.grid)


def awkward_matrix(rng, shape):
    """Gaussian rows of varied magnitude, one outlier row, one zero row, one all-positive row."""
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, size=(shape[0], 1)))
    w[0] *= 100
    if shape[0] > 2:
        w[1] = 0
        w[2] = np.abs(w[2])
    return w.astype(np.float32)


# npquant's own rules; the microscaled presets (compressed-tensors' rules) are tested in test_microscaling.py
ALL_SCHEMES = [s for s in npquant.schemes().values() if not s.microscaled] + [
    Scheme("int", 8, "channel", symmetric=False),
    Scheme("int", 5, "group", 16),
    Scheme("int", 6, "tensor", symmetric=False),
    Scheme("int", 7, "channel"),
    Scheme("int", 3, "group", 16, symmetric=False),
    Scheme("int", 2, "channel", symmetric=False),
    Scheme("fp8_e5m2", 8, "channel"),
    Scheme("fp8_e5m2", 8, "group", 32),
    Scheme("int", 4, "group", 32, scale_dtype="float16"),
    Scheme("int", 8, "channel", scale_dtype="bfloat16"),
    Scheme("fp8_e4m3", 8, "channel", scale_dtype="bfloat16"),
    Scheme("int", 4, "group", 32, symmetric=False, scale_dtype="bfloat16"),
]


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=str)
def test_engine_matches_reference_exactly(scheme):
    rng = np.random.default_rng(7)
    w = awkward_matrix(rng, (6, 256))
    qt = quantize(w, scheme)
    codes, scales, zps = reference_quantize(w, **scheme_kwargs(scheme))
    np.testing.assert_array_equal(engine_codes(qt), codes)
    np.testing.assert_array_equal(qt.scale.astype(np.float64).ravel(), scales)
    if zps is None:
        assert qt.zero_point is None
    else:
        np.testing.assert_array_equal(qt.zero_point.ravel(), zps)
    # Dequantization is float32(q) * scale: bit-equal to the reference.
    w_hat = qt.dequantize()
    assert w_hat.dtype == np.float32 and w_hat.shape == w.shape
    ref = reference_dequantize(codes, scales, zps, w.shape, scheme.dtype, scheme.granularity, scheme.group_size)
    np.testing.assert_array_equal(w_hat, ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric, grid", [(True, "full"), (True, "restricted"), (False, "full")])
def test_every_int_code_round_trips(bits, symmetric, grid):
    scheme = Scheme("int", bits, "channel", symmetric=symmetric, grid=grid)
    levels = np.arange(scheme.qmin, scheme.qmax + 1)  # every code
    scale = np.float32(0.375)  # a power-of-two fraction: q * scale is exact
    if not symmetric:
        zp = 2 ** (bits - 1)
        w = ((levels - zp) * scale).astype(np.float32)[None, :]
        expect = levels
    elif grid == "restricted":
        w = (levels * scale).astype(np.float32)[None, :]
        expect = levels
    else:
        # The full grid's scale is absmax / (2**(b-1) - 0.5): the ends of the block are -+(2**(b-1) - 0.5) * scale
        # (exact: 0.375 * 7.5 = 2.8125), which round half to even to -2**(b-1) and, clamped, 2**(b-1) - 1; the
        # codes between are the weights levels * scale themselves.
        half = 2 ** (bits - 1) - 0.5
        inner = levels[1:]  # -2**(b-1) + 1 .. 2**(b-1) - 1
        w = np.concatenate([inner * scale, [-half * scale, half * scale]]).astype(np.float32)[None, :]
        expect = np.concatenate([inner, [scheme.qmin, scheme.qmax]])
    qt = quantize(w, scheme)
    assert qt.scale[0, 0] == scale
    if not symmetric:
        assert qt.zero_point[0, 0] == 2 ** (bits - 1)
    np.testing.assert_array_equal(qt.int_codes()[0], expect)
    np.testing.assert_array_equal(qt.dequantize()[0], (expect - (0 if symmetric else zp)) * scale)
    assert set(expect) == set(levels)  # every code met, -2**(b-1) included on the full grid
    # Each code also survives a shuffle of positions (packing is positional).
    perm = np.random.default_rng(bits).permutation(w.shape[1])
    np.testing.assert_array_equal(quantize(w[:, perm], scheme).int_codes()[0], expect[perm])


def test_the_full_grid_rounds_the_negative_end_to_its_extra_code():
    # compressed-tensors' rule (spec e.1 and g): w / s = -7.5 rounds half to even to -8, +7.5 is clamped to 7;
    # int8's -127.5 to -128. The restricted grid keeps [-7, 7] and absmax / 7.
    w = np.array([[-3.0, 3.0, 1.0, -1.0]], np.float32)
    for bits, end in ((4, 8), (8, 128)):
        full = quantize(w, Scheme("int", bits, "channel"))
        assert full.scale[0, 0] == np.float32(3.0) / np.float32(end - 0.5)
        assert full.int_codes()[0, :2].tolist() == [-end, end - 1]
        restricted = quantize(w, Scheme("int", bits, "channel", grid="restricted"))
        assert restricted.int_codes()[0, :2].tolist() == [-(end - 1), end - 1]
        assert restricted.scale[0, 0] == np.float32(3.0) / np.float32(end - 1)


@pytest.mark.parametrize("weight_dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_16_bit_models_divide_in_their_dtype_as_the_reference(weight_dtype, bits):
    # A bfloat16/float16 weight with scales of its own dtype (compressed-tensors' scales for such a model): w / s is
    # rounded to that dtype before it is rounded to an integer. Ties after that rounding must occur in the data,
    # or the test could not tell the two rules apart: it checks that some code differs from the float32 quotient's.
    name = "bfloat16" if weight_dtype == ml_dtypes.bfloat16 else "float16"
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((16, 256)) * 0.05).astype(weight_dtype)
    w[3, :32] = 0  # an all-zero group: its scale is the dtype's epsilon
    scheme = Scheme("int", bits, "group", 32, scale_dtype=name)
    qt = quantize(w, scheme)
    codes, scales, _ = reference_quantize(w.astype(np.float32), bits=bits, granularity="group", group_size=32,
                                          scale_dtype=name, ratio_dtype=name)
    np.testing.assert_array_equal(engine_codes(qt), codes)
    np.testing.assert_array_equal(qt.scale.astype(np.float64).ravel(), scales)
    assert qt.scale[3, 0] == {"bfloat16": 2.0**-7, "float16": 2.0**-10}[name]
    plain, _, _ = reference_quantize(w.astype(np.float32), bits=bits, granularity="group", group_size=32,
                                     scale_dtype=name)
    assert (plain != codes).any() or bits == 2
    # A float32 weight with the same scales divides in float32: the plain rule.
    np.testing.assert_array_equal(engine_codes(quantize(w.astype(np.float32), scheme)), plain)


@pytest.mark.parametrize("fmt, ml_type", [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_all_256_fp8_patterns_decode_by_formula(fmt, ml_type):
    patterns = np.arange(256, dtype=np.uint8)
    decoded = patterns.view(ml_type).astype(np.float64)
    for code in range(256):
        ref = fp8_decode(code, fmt)
        if math.isnan(ref):
            assert math.isnan(decoded[code]), code
        else:
            assert decoded[code] == ref, (code, decoded[code], ref)
    assert max(v for v, _ in fp8_finite_table(fmt)) == FLOAT_MAX[fmt] == ENGINE_FLOAT_MAX[fmt]


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_every_finite_fp8_value_quantizes_to_itself(dtype):
    table = fp8_finite_table(dtype)
    values = np.array([v for v, _ in table], np.float32)[None, :]  # absmax = fmax, so scale = 1
    qt = quantize(values, Scheme(dtype, 8, "tensor"))
    assert qt.scale[0, 0] == 1.0
    np.testing.assert_array_equal(qt.dequantize(), values)
    np.testing.assert_array_equal(qt.codes.view(np.uint8)[0], [c for _, c in table])


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_rounding_of_midpoints_and_random_values(dtype):
    finite = sorted({v for v, _ in fp8_finite_table(dtype)})
    mids = [(a + b) / 2 for a, b in zip(finite, finite[1:])]  # exact ties: round to even
    rng = np.random.default_rng(0)
    fmax = FLOAT_MAX[dtype]
    rand = list(rng.uniform(-fmax, fmax, 200)) + list(rng.standard_normal(200) * 0.01)
    values = np.array([fmax] + mids + rand, np.float32)[None, :]  # fmax first: scale is exactly 1
    qt = quantize(values, Scheme(dtype, 8, "tensor"))
    assert qt.scale[0, 0] == 1.0
    expect = [fp8_round(float(v), dtype) for v in values[0]]
    np.testing.assert_array_equal(qt.codes.view(np.uint8)[0], expect)


# --- invariants (hypothesis) ------------------------------------------------
@st.composite
def scheme_and_weight(draw):
    dtype = draw(st.sampled_from(["int", "int", "int", "fp8_e4m3", "fp8_e5m2"]))
    bits = draw(st.integers(2, 8)) if dtype == "int" else 8
    symmetric = draw(st.booleans()) if dtype == "int" else True
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    out_features = draw(st.integers(1, 6))
    if granularity == "group":
        group_size = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
        in_features = group_size * draw(st.integers(1, 5))
    else:
        group_size = None
        in_features = draw(st.integers(1, 40))
    scale_dtype = draw(st.sampled_from(["float32", "float32", "float16", "bfloat16"]))
    grid = draw(st.sampled_from(["full", "restricted"])) if dtype == "int" and symmetric else "full"
    scheme = Scheme(dtype, bits, granularity, group_size, symmetric, scale_dtype, grid=grid)
    # Zero or normal magnitudes in [1e-3, 1e3]: scales stay normal in every scale dtype.
    w = draw(hnp.arrays(np.float32, (out_features, in_features),
                        elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)))
    w[np.abs(w) < 1e-3] = 0
    return scheme, w


@settings(max_examples=300, deadline=None)
@given(scheme_and_weight())
# A zero point rounded half to even puts 998 exactly half a step past the top code.
@example((Scheme("int", 2, "tensor", symmetric=False), np.array([[998.0, -998.0]], np.float32)))
def test_codes_in_range_and_error_within_half_a_step(case):
    scheme, w = case
    before = w.copy()
    qt = quantize(w, scheme)
    np.testing.assert_array_equal(w, before)  # never mutates its input
    w_hat = qt.dequantize()
    bo, bi = qt.block_shape
    scale = np.repeat(np.repeat(qt.scale.astype(np.float64), bo, 0), bi, 1)  # (O, I)
    if scheme.is_float:
        codes = qt.codes.astype(np.float64)
        assert np.all(np.abs(codes) <= scheme.qmax) and np.all(np.isfinite(codes))
        # fp8 steps are relative: around a normal code c with m mantissa bits,
        # half a step is at most |c| 2**-(m+1); among subnormals it is half the
        # smallest subnormal. Inside the range [-fmax s, fmax s] the error is
        # at most the larger of the two (times s), plus float32 rounding.
        m = 3 if scheme.dtype == "fp8_e4m3" else 2
        min_sub = {"fp8_e4m3": 2.0**-9, "fp8_e5m2": 2.0**-16}[scheme.dtype]
        half_step = np.maximum(np.abs(codes) * 2.0 ** -(m + 1), min_sub / 2) * scale
        bound = half_step + 2 * EPS32 * (np.abs(w) + np.abs(w_hat))
        inside = np.abs(w) <= scheme.qmax * scale
        err = np.abs(w.astype(np.float64) - w_hat)
        assert np.all(err[inside] <= bound[inside])
        return
    q = qt.int_codes().astype(np.int64)
    assert q.min() >= scheme.qmin and q.max() <= scheme.qmax
    zp = 0
    if not scheme.symmetric:
        zp = np.repeat(np.repeat(qt.zero_point.astype(np.float64), bo, 0), bi, 1)
    # |w - q s| <= s/2 from rounding, plus float32 rounding of w/s and of q*s:
    # |w| eps + |w_hat| eps (see the derivation in the module of the lab tests).
    slack = 2 * EPS32 * (np.abs(w) + np.abs(w_hat))
    bound = scale / 2 + slack
    # The grid's reach: values within half a step beyond the end codes still
    # round to them with error <= s/2 (give or take the same float32 slack:
    # a rounded zero point can put the block's end exactly half a step out).
    lo = (scheme.qmin - zp - 0.5) * scale - slack
    hi = (scheme.qmax - zp + 0.5) * scale + slack
    inside = (w >= lo) & (w <= hi)
    err = np.abs(w.astype(np.float64) - w_hat)
    assert np.all(err[inside] <= bound[inside])
    if scheme.scale_dtype == "float32":
        # With an unrounded scale the block's range is inside the grid.
        assert inside.all()


@settings(max_examples=200, deadline=None)
@given(scheme_and_weight())
def test_requantizing_the_dequantized_weight_gives_the_same_codes(case):
    scheme, w = case
    if not scheme.symmetric or not scheme.is_float:
        # Asymmetric blocks are not a fixed point: rounding the zero point can
        # leave the top code unused, so the second pass sees a narrower range
        # and picks a smaller scale. Nor is the full int grid (see
        # test_the_full_grid_is_not_a_fixed_point). Restricted symmetric scales
        # are pinned by the +-qmax code that the block's absmax always maps to.
        scheme = Scheme(scheme.dtype, scheme.bits, scheme.granularity, scheme.group_size, True, scheme.scale_dtype,
                        grid="restricted" if not scheme.is_float else "full")
    qt = quantize(w, scheme)
    again = quantize(qt.dequantize(), scheme)
    if scheme.is_float:
        # Compare values: -0 and +0 are one code for our purpose.
        np.testing.assert_array_equal(again.codes.astype(np.float32), qt.codes.astype(np.float32))
    else:
        np.testing.assert_array_equal(again.codes, qt.codes)


def test_the_full_grid_is_not_a_fixed_point():
    # absmax 1.0 maps to 7.5, clamped to 7; -0.95 to -7.125, rounded to -7. Dequantized, both ends are 7 s, so the
    # second pass maps -7 s to -7.5, which rounds half to even to -8. compressed-tensors' rule does the same.
    w = np.array([[1.0, -0.95]], np.float32)
    qt = quantize(w, Scheme("int", 4, "channel"))
    assert qt.int_codes()[0].tolist() == [7, -7]
    assert quantize(qt.dequantize(), qt.scheme).int_codes()[0].tolist() == [7, -8]


@settings(max_examples=200, deadline=None)
@given(scheme_and_weight())
def test_nbytes_is_the_documented_formula(case):
    scheme, w = case
    qt = quantize(w, scheme)
    out_features, in_features = w.shape
    bo, bi = qt.block_shape
    n_blocks = (out_features // bo) * (in_features // bi)
    scale_bytes = 4 if scheme.scale_dtype == "float32" else 2
    expect = out_features * math.ceil(in_features * scheme.bits / 8) + n_blocks * scale_bytes
    if not scheme.symmetric:
        expect += n_blocks
    assert qt.nbytes == expect
    assert qt.bits_per_weight == 8 * expect / w.size


# --- orderings ---------------------------------------------------------------
def test_finer_granularity_wins_on_outlier_rows():
    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((128, 1024))).astype(np.float32)
    w[5] *= 100
    w[:, 7] *= 30  # one outlier input column inside every row too
    err = {name: npquant.metrics.relative_error(w, quantize(w, name).dequantize())
           for name in ["w4-tensor", "w4-channel", "w4-g128", "w4-g32", "w8-tensor", "w8-channel", "w8-g128"]}
    assert err["w4-channel"] < err["w4-tensor"]
    assert err["w4-g128"] < err["w4-channel"]
    assert err["w4-g32"] < err["w4-g128"]
    assert err["w8-channel"] < err["w8-tensor"]
    assert err["w8-g128"] < err["w8-channel"]


def test_asymmetric_wins_on_one_sided_weights():
    w = np.random.default_rng(1).uniform(0, 1, (64, 256)).astype(np.float32)
    sym = npquant.metrics.relative_error(w, quantize(w, "w4-g128").dequantize())
    asym = npquant.metrics.relative_error(w, quantize(w, "w4-g128-asym").dequantize())
    # Symmetric wastes the negative half: 7 steps over [0, max] against 15.
    assert asym < 0.6 * sym


# --- edge cases and dtypes ---------------------------------------------------
@pytest.mark.parametrize("name", list(npquant.schemes()))
def test_zero_weight_gives_zero_everything_without_warnings(name, recwarn):
    w = np.zeros((4, 256), np.float32)
    qt = quantize(w, name)
    if qt.scheme.dtype == "int" and qt.scheme.symmetric and qt.scheme.grid == "full":
        # compressed-tensors' rule: a zero scale is stored as the scale dtype's epsilon (float32: 2**-23)
        assert np.all(qt.scale == np.float32(2.0**-23))
    elif not qt.scheme.microscaled:  # compressed-tensors' rules give zero blocks a positive scale (test_microscaling)
        assert not np.any(qt.scale.astype(np.float32))
    assert not np.any(qt.dequantize())
    assert not np.isnan(qt.dequantize()).any()
    assert len(recwarn) == 0


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_input_dtypes_are_computed_in_float32(dtype):
    w64 = np.random.default_rng(2).standard_normal((8, 64))
    w = w64.astype(dtype)
    qt = quantize(w, "w4-g32")
    same = quantize(w.astype(np.float32), "w4-g32")
    np.testing.assert_array_equal(qt.codes, same.codes)
    np.testing.assert_array_equal(qt.scale, same.scale)
    assert qt.dequantize().dtype == np.float32
    assert qt.scale.dtype == np.float32


def test_scale_dtypes_are_stored_as_asked():
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    assert quantize(w, Scheme(scale_dtype="float16")).scale.dtype == np.float16
    assert quantize(w, Scheme(scale_dtype="bfloat16")).scale.dtype == ml_dtypes.bfloat16


def test_memory_mapped_input_is_read_in_chunks(tmp_path):
    w = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    path = tmp_path / "w.npy"
    np.save(path, w)
    mm = np.load(path, mmap_mode="r")
    np.testing.assert_array_equal(quantize(mm, "w4-g32").codes, quantize(w, "w4-g32").codes)


# --- bad input -----------------------------------------------------------------
@pytest.mark.parametrize(
    "w, match",
    [
        (np.zeros((2, 3, 4), np.float32), r"w must be 2-D \(out_features, in_features\), got shape \(2, 3, 4\)"),
        (np.zeros(5, np.float32), r"must be 2-D .* got shape \(5,\)"),
        (np.zeros((0, 4), np.float32), r"w must not be empty, got shape \(0, 4\)"),
        (np.zeros((3, 4), np.int32), r"w must be floating .* got dtype int32"),
        ([[1.0, 2.0]], r"w must be a numpy array .* got list"),
    ],
)
def test_bad_weights_are_refused(w, match):
    with pytest.raises(NpquantError, match=match):
        quantize(w, "w8-channel")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_first_bad_row(bad):
    w = np.ones((5, 8), np.float32)
    w[3, 2] = bad
    w[4, 0] = bad
    with pytest.raises(NpquantError, match=r"w row 3 holds NaN or Inf"):
        quantize(w, "w4-channel")


def test_group_size_must_divide_in_features():
    with pytest.raises(NpquantError, match=r"group_size=128 must divide in_features=200"):
        quantize(np.ones((2, 200), np.float32), "w4-g128")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(NpquantError, match=r"scheme='w5' is not a preset; valid presets: w8-tensor, w8-channel"):
        quantize(np.ones((2, 8), np.float32), "w5")


def test_float16_scale_overflow_is_an_error():
    w = np.full((1, 4), 1e7, np.float32)
    with pytest.raises(NpquantError, match=r"a scale overflows float16"):
        quantize(w, Scheme(bits=4, scale_dtype="float16"))


def test_quantized_tensor_checks_its_arrays():
    qt = quantize(np.ones((4, 64), np.float32), "w4-g32")
    with pytest.raises(NpquantError, match=r"codes must be uint8 \(4, 32\)"):
        QuantizedTensor(qt.codes[:, :10], qt.scale, None, (4, 64), qt.scheme)
    with pytest.raises(NpquantError, match=r"scale must be float32 \(4, 2\)"):
        QuantizedTensor(qt.codes, qt.scale[:, :1], None, (4, 64), qt.scheme)
    with pytest.raises(NpquantError, match=r"zero_point must be given exactly when"):
        QuantizedTensor(qt.codes, qt.scale, np.zeros((4, 2), np.uint8), (4, 64), qt.scheme)


@settings(max_examples=200, deadline=None)
@given(scheme_and_weight())
def test_numba_quantizer_is_bit_equal_to_numpy(case):
    pytest.importorskip("numba", reason="numba is not installed (npquant[fast]); the numpy engine is the reference")
    from npquant.quantize import quantize_measured

    scheme, w = case
    a, rel_a, _ = quantize_measured(w, scheme, backend="numpy")
    b, rel_b, _ = quantize_measured(w, scheme, backend="numba")
    np.testing.assert_array_equal(a.codes.view(np.uint8), b.codes.view(np.uint8))
    np.testing.assert_array_equal(a.scale.view(np.uint8), b.scale.view(np.uint8))
    # Both square in float32 and sum in float64, in different orders.
    assert rel_a == pytest.approx(rel_b, rel=1e-6, abs=1e-12)


def test_unknown_quantize_backend():
    with pytest.raises(NpquantError, match=r"backend='gpu' is not known"):
        quantize(np.ones((2, 4), np.float32), "w8-channel", backend="gpu")


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_non_finite_fp8_codes_are_refused(dtype):
    finite = np.array([c for _, c in fp8_finite_table(dtype)], np.uint8)
    ml_type = ml_dtypes.float8_e4m3fn if dtype == "fp8_e4m3" else ml_dtypes.float8_e5m2
    scheme = Scheme(dtype, 8, "tensor")
    scale = np.ones((1, 1), np.float32)
    QuantizedTensor(finite[None, :].view(ml_type), scale, None, (1, finite.size), scheme)  # every finite code is fine
    non_finite = sorted(set(range(256)) - set(finite.tolist()))
    assert len(non_finite) == (2 if dtype == "fp8_e4m3" else 8)  # e4m3fn: +-NaN; e5m2: +-Inf and 6 NaNs
    for code in non_finite:
        codes = np.zeros((3, 5), np.uint8)
        codes[2, 4] = code
        with pytest.raises(NpquantError, match=rf"NaN or Inf {dtype} pattern at row 2, column 4 \(byte 0x{code:02X}\)"):
            QuantizedTensor(codes.view(ml_type), scale, None, (3, 5), scheme)
