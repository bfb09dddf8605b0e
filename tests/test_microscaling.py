"""NVFP4, MXFP4/6/8 and fp8 blocks: every code enumerated, the rules against an independent reference, the spec's examples.

The reference (tests/reference.py) is written from the rules in
``shared/spec/compressed-tensors-modern-formats.md`` with Python floats and
table lookups; checkpoints compressed-tensors itself wrote are in
test_ct_fixtures.py. Codes and scales compare exactly.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import npquant
from npquant import NpquantError, QuantizedTensor, quantize
from npquant.microscaling import e8m0_exponents, fp4_codes, nvfp4_global_scale
from npquant.packing import pack_codes
from reference import (
    FP4_MAGNITUDES,
    fp4_decode,
    fp4_round,
    fp6_decode,
    fp6_round,
    fp8_decode,
    mx_exponent,
    reference_microscaled,
)

MICRO = ["nvfp4", "mxfp4", "mxfp6", "mxfp8", "fp8-block"]


def unpacked_codes(qt: QuantizedTensor) -> np.ndarray:
    """One bit pattern per weight, int64 (O, I)."""
    return qt.int_codes().view(np.uint8).astype(np.int64)


def stored_scales(qt: QuantizedTensor) -> list:
    """Scales as the reference lists them: e8m0 exponents, fp8 codes, or float values."""
    if qt.scheme.scale_dtype == "e8m0":
        return qt.scale.ravel().tolist()
    if qt.scheme.scale_dtype == "fp8_e4m3":
        return qt.scale.view(np.uint8).ravel().tolist()
    return qt.scale.astype(np.float64).ravel().tolist()


def mx_row(values, group=32):
    """One float32 row of a group whose maximum 6 (fp4) or 7.5 (fp6) gives E = 127, the scale 1: x = w exactly."""
    row = np.zeros(group, np.float32)
    row[: len(values)] = values
    return row[None, :]


# --- every code -------------------------------------------------------------
def test_every_fp4_code_decodes_by_formula():
    patterns = np.arange(16, dtype=np.uint8)
    assert patterns.view(ml_dtypes.float4_e2m1fn).astype(np.float64).tolist() == [fp4_decode(c) for c in range(16)]
    # through a tensor: all 16 codes in one MX group of scale 1 (E = 127), twice
    codes = pack_codes(np.tile(patterns, 2)[None, :], 4)
    qt = QuantizedTensor(codes, np.array([[127]], np.uint8), None, (1, 32), npquant.get_scheme("mxfp4"))
    assert qt.dequantize()[0].tolist() == [fp4_decode(c) for c in range(16)] * 2


def test_every_fp6_code_decodes_by_formula():
    patterns = np.arange(64, dtype=np.uint8)
    want = [fp6_decode(c) for c in range(64)]
    assert patterns.view(ml_dtypes.float6_e2m3fn).astype(np.float64).tolist() == want
    assert max(want) == 7.5 and min(v for v in want if v > 0) == 2.0**-3
    codes = pack_codes(patterns.reshape(2, 32), 6)
    qt = QuantizedTensor(codes, np.array([[127], [127]], np.uint8), None, (2, 32), npquant.get_scheme("mxfp6"))
    assert qt.dequantize().ravel().tolist() == want


def test_every_e8m0_exponent_is_a_power_of_two_and_0xff_is_refused():
    e = np.arange(255, dtype=np.uint8).reshape(255, 1)
    codes = np.zeros((255, 16), np.uint8)
    qt = QuantizedTensor(codes, e, None, (255, 32), npquant.get_scheme("mxfp4"))
    assert qt.row_scales().ravel().tolist() == [math.ldexp(1.0, k - 127) for k in range(255)]
    with pytest.raises(NpquantError, match=r"scale\[3, 0\] holds the e8m0 NaN byte 0xFF"):
        QuantizedTensor(codes[:4], np.array([[1], [2], [3], [255]], np.uint8), None, (4, 32), npquant.get_scheme("mxfp4"))


def test_nvfp4_scale_divides_by_the_global_scale_in_float32():
    scheme = npquant.get_scheme("nvfp4")
    s = np.arange(0, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).reshape(127, 1)  # every positive fp8
    gs = np.array([3479.5388], np.float32)
    qt = QuantizedTensor(np.zeros((127, 8), np.uint8), s, None, (127, 16), scheme, gs)
    want = [float(np.float32(fp8_decode(c, "fp8_e4m3")) / np.float32(gs[0])) for c in range(127)]
    assert qt.row_scales().ravel().tolist() == want
    for bad in (np.array([0.0], np.float32), np.array([np.inf], np.float32), np.array([1.0])):
        with pytest.raises(NpquantError, match=r"global_scale must be a positive finite float32 \(1,\)"):
            QuantizedTensor(np.zeros((127, 8), np.uint8), s, None, (127, 16), scheme, bad)
    with pytest.raises(NpquantError, match=r"global_scale must be given exactly when scale_dtype='fp8_e4m3'"):
        QuantizedTensor(np.zeros((127, 8), np.uint8), s, None, (127, 16), scheme)


# --- rounding rules -----------------------------------------------------------
def grid_probes(magnitudes, top):
    """Every grid point, every midpoint and the float32 neighbours of each, both signs, past the top too."""
    points = sorted(set(magnitudes) | {(a + b) / 2 for a, b in zip(magnitudes, magnitudes[1:])} | {top + 0.5, 1e9})
    out = []
    for p in points:
        for v in (np.nextafter(np.float32(p), np.float32(-1)), np.float32(p), np.nextafter(np.float32(p), np.float32(1e10))):
            out += [v, -v]
    return np.array(out + [0.0, -0.0, 1e-30, -1e-30], np.float32)


def test_fp4_rounding_is_ties_to_even_with_the_sign_of_x_below_zero():
    x = grid_probes(FP4_MAGNITUDES, 6.0)
    got = fp4_codes(x)
    assert got.tolist() == [fp4_round(float(v)) for v in x]
    # the spec's ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    assert [fp4_decode(c) for c in fp4_codes(ties)] == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_fp6_rounding_through_the_engine_matches_the_reference():
    magnitudes = [fp6_decode(c) for c in range(32)]
    x = grid_probes(magnitudes, 7.5)
    x = x[np.abs(x) <= 7.5]  # a group whose maximum is 7.5 keeps E = 127 (x = w)
    for start in range(0, x.size, 31):
        row = mx_row(np.r_[7.5, x[start : start + 31]])
        qt = quantize(row, "mxfp6")
        assert qt.scale.tolist() == [[127]]
        assert unpacked_codes(qt)[0].tolist() == [fp6_round(float(v)) for v in row[0]]


@pytest.mark.parametrize("dtype", ["fp4_e2m1", "fp6_e2m3", "fp8_e4m3"])
def test_mx_exponent_rule_at_every_threshold(dtype):
    amax = []
    for k in (-130, -127, -126, -20, -3, 0, 5, 100, 127):
        for mant in (1.0, 1.5, 1.75, 1.875, 1.9375, 1.99):
            v = np.float32(mant * 2.0**k)
            amax += [np.nextafter(v, np.float32(0)), v, np.nextafter(v, np.float32(np.inf))]
    tiny = np.float32(2.0**-126)
    amax += [np.float32(0), np.float32(1e-45), tiny * np.float32(0.75), tiny * np.float32(0.9375),
             np.nextafter(tiny * np.float32(0.75), np.float32(0)), np.finfo(np.float32).max]
    amax = np.array(amax, np.float32)
    got = e8m0_exponents(amax, np.dtype(np.float32), dtype)
    assert got.tolist() == [mx_exponent(float(v), dtype) for v in amax]


def test_nvfp4_global_scale_is_a_reciprocal_times_2688_not_a_division():
    # the spec's example: absmax 1.0382726 gives 0x4521cea5, where 2688 / absmax gives 0x4521cea6
    gs = nvfp4_global_scale(np.float32(1.0382726), np.dtype(np.float32))
    assert hex(int(gs.view(np.uint32)[0])) == "0x4521cea5"
    assert hex(int((np.float32(2688) / np.float32(1.0382726)).view(np.uint32))) == "0x4521cea6"
    assert nvfp4_global_scale(0.0, np.dtype(np.float32)).tolist() == [1.0]  # 2688 / tiny overflows: 1


# --- whole tensors against the reference -------------------------------------
def awkward(rng, shape):
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, size=(shape[0], 1)))
    w[0] *= 50
    w[1] = 0
    w[2, :40] = 0  # all-zero groups
    w[3, 5] = -0.0
    w[3, 6] = -1e-12
    w[4, :32] *= 1e-39  # subnormal group maxima
    w[5, :32] = np.tile([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], 4) * 2.0**-5  # exact ties
    return w.astype(np.float32)


@pytest.mark.parametrize("preset", MICRO)
def test_engine_matches_the_reference_exactly(preset):
    shape = (136, 140) if preset == "fp8-block" else (8, 256)  # blocks cut at both edges
    w = awkward(np.random.default_rng(11), shape)
    qt = quantize(w, preset)
    codes, scales, gs = reference_microscaled(w, preset)
    np.testing.assert_array_equal(unpacked_codes(qt), codes)
    assert stored_scales(qt) == scales
    assert (qt.global_scale is None) == (gs is None) and (gs is None or float(qt.global_scale[0]) == gs)


@pytest.mark.parametrize("preset", MICRO)
def test_sign_of_zero_follows_each_format(preset):
    # the spec's bytes for inputs [-0.0, -1e-9, +0.0, +1e-9] in a group whose maximum is 1
    row = np.zeros((1, 128), np.float32)
    row[0, :4] = [-0.0, -1e-9, 0.0, 1e-9]
    row[0, 8] = 1.0
    qt = quantize(row, preset)
    first = {"nvfp4": qt.codes[0, :2], "mxfp4": qt.codes[0, :2], "mxfp6": qt.codes[0, :3]}.get(preset)
    if first is None:
        first = qt.codes.view(np.uint8)[0, :4]
    want = {"nvfp4": "80 00", "mxfp4": "80 00", "mxfp6": "20 08 00", "mxfp8": "00 80 00 00", "fp8-block": "00 80 00 00"}
    assert first.tobytes().hex(" ") == want[preset]


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("preset", MICRO)
def test_all_zero_groups(preset, dtype):
    w = np.zeros((4, 256), dtype)
    qt = quantize(w, preset)
    assert not qt.codes.view(np.uint8).any() and not qt.dequantize().any()
    want = {"nvfp4": [0x20],  # fp8 0.125
            "mxfp4": [127 if dtype == np.float16 else 0], "mxfp6": [127 if dtype == np.float16 else 0],
            "mxfp8": [127 if dtype == np.float16 else 0],
            "fp8-block": [float(np.finfo(dtype).eps)]}[preset]  # eps of the model's dtype
    assert sorted(set(stored_scales(qt))) == want


def test_bfloat16_weights_are_computed_in_bfloat16():
    # w / scale is rounded to bfloat16 before the fp4 grid: 0.2500001-ish ratios become ties
    scale_row = np.float32(6.0) * np.float32(2.0**-3)  # MX: amax 0.75 -> E = 124, scale 2**-3
    w = np.array([[0.75] + [0.25 * 2.0**-3 * (1 + 2.0**-10)] * 31], np.float32)
    qt32 = quantize(w, "mxfp4")
    qt16 = quantize(w.astype(ml_dtypes.bfloat16), "mxfp4")
    assert scale_row and qt32.scale.tolist() == qt16.scale.tolist() == [[124]]
    # float32: 0.25 * (1 + 2**-10) rounds up to 0.5; bfloat16 first rounds the weight to 0.25 * 2**-3: a tie, to 0
    assert fp4_decode(int(unpacked_codes(qt32)[0, 1])) == 0.5
    assert fp4_decode(int(unpacked_codes(qt16)[0, 1])) == 0.0


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, (3, 64), elements=st.floats(-1e4, 1e4, width=32)),
       st.sampled_from(["mxfp4", "mxfp6", "mxfp8", "fp8-block"]))
def test_round_trip_error_is_at_most_half_a_grid_step(w, preset):
    qt = quantize(w, preset)
    scale = np.repeat(qt.row_scales().astype(np.float64), qt.block_shape[1], axis=1)[:, :64]  # of each weight
    a = np.abs(w.astype(np.float64)) / scale
    if preset == "mxfp4":
        half = np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))
        top = 6.0
    elif preset == "mxfp6":
        half = np.where(a < 2, 1 / 16, np.where(a < 4, 1 / 8, 1 / 4))
        top = 7.5
    else:  # e4m3: 3 mantissa bits, subnormal step 2**-9
        half = np.maximum(2.0 ** (np.floor(np.log2(np.maximum(a, 2.0**-6))) - 4), 2.0**-10)
        top = 448.0
    err = np.abs(w.astype(np.float64) - qt.dequantize().astype(np.float64))
    # within the grid: half a step of the scaled value (+ the float32 rounding of w / scale and of the product)
    bound = (half + np.maximum(a - top, 0)) * scale * (1 + 2.0**-20) + 2.0**-149
    assert np.all(err <= bound)


# --- the spec's worked examples (all-MiniLM-L6-v2, encoder.layer.0.attention.self.query) ----------
@pytest.fixture(scope="module")
def query():
    try:
        from npquant.checkpoints import default_model_path

        path = default_model_path()
    except NpquantError as exc:
        pytest.skip(f"the default model is not installed: {exc}")
    from npquant.safetensors_io import Checkpoint

    with Checkpoint(path) as ckpt:
        return ckpt.tensors["encoder.layer.0.attention.self.query.weight"].read()


def test_spec_nvfp4_example(query):
    qt = quantize(query, "nvfp4")
    assert hex(int(qt.global_scale.view(np.uint32)[0])) == "0x4559789f"
    assert qt.scale.view(np.uint8)[0, 0] == 0x6B and float(qt.scale[0, 0]) == 88.0
    assert unpacked_codes(qt)[0, :8].tolist() == [15, 3, 5, 2, 11, 13, 9, 4]
    assert qt.codes[0, :4].tobytes().hex(" ") == "3f 25 db 49"
    # the spec prints bfloat16 values to 8 digits: each names one bfloat16 exactly
    want = np.array([-0.15136719, 0.0378418, 0.07568359, 0.02526855, -0.0378418, -0.07568359, -0.01263428,
                     0.05053711], np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(qt.dequantize()[0, :8].astype(ml_dtypes.bfloat16), want)


def test_spec_mx_examples(query):
    mx4, mx6, mx8 = quantize(query, "mxfp4"), quantize(query, "mxfp6"), quantize(query, "mxfp8")
    assert (mx4.scale[0, 0], mx6.scale[0, 0], mx8.scale[0, 0]) == (123, 122, 117)
    assert unpacked_codes(mx4)[0, :8].tolist() == [12, 1, 3, 1, 9, 11, 9, 2]
    assert mx4.codes[0, :4].tobytes().hex(" ") == "1c 13 b9 29"
    assert mx4.dequantize()[0, :8].tolist() == [-0.125, 0.03125, 0.09375, 0.03125, -0.03125, -0.09375, -0.03125, 0.0625]
    assert unpacked_codes(mx6)[0, :4].tolist() == [58, 11, 19, 6]
    assert mx6.codes[0, :3].tobytes().hex(" ") == "fa 32 19"
    assert mx8.codes.view(np.uint8)[0, :4].tobytes().hex(" ") == "f2 63 6b 5c"
    want = [-0.15625, 0.04296875, 0.0859375, 0.0234375]
    assert mx6.dequantize()[0, :4].tolist() == want and mx8.dequantize()[0, :4].tolist() == want


def test_spec_fp8_block_example(query):
    qt = quantize(query, "fp8-block")
    assert np.float32(qt.scale[0, 0]) == np.float32(0.0013184722)
    assert qt.codes.view(np.uint8)[0, :4].tobytes().hex(" ") == "ee 60 68 59"
    np.testing.assert_array_equal(qt.dequantize()[0, :4],
                                  np.array([-0.14766888, 0.04219111, 0.08438222, 0.0237325], np.float32))


# --- the rest of the library takes the new presets ---------------------------------
@pytest.mark.parametrize("preset", MICRO)
def test_linear_and_prepare_take_the_new_presets(preset):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((200, 320)).astype(np.float32)
    qt = quantize(w, preset)
    x = rng.standard_normal((3, 320)).astype(np.float32)
    want = x.astype(np.float64) @ qt.dequantize().astype(np.float64).T
    for backend in npquant.available_backends():
        for weights in (qt, npquant.prepare(qt)):
            for xi in (x, x[:1]):
                y = npquant.linear(xi, weights, backend=backend)
                np.testing.assert_allclose(y, want[: xi.shape[0]], rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("preset", MICRO)
def test_checkpoint_round_trip(preset, tmp_path):
    from test_checkpoint import write_model

    model = tmp_path / "model"
    tensors = write_model(model)
    npquant.quantize_checkpoint(model, tmp_path / "out", preset)
    loaded = npquant.load(tmp_path / "out")
    assert loaded
    for name, qt in loaded.items():
        direct = quantize(tensors[name], preset)
        assert qt.codes.tobytes() == direct.codes.tobytes(), name
        np.testing.assert_array_equal(qt.dequantize(), direct.dequantize())


def test_mse_observer_and_gptq_refuse_the_new_formats():
    w = np.ones((4, 64), np.float32)
    with pytest.raises(NpquantError, match=r"observer='mse' is not for fp4_e2m1 with e8m0 scales"):
        quantize(w, "mxfp4", observer="mse")
    with pytest.raises(NpquantError):
        npquant.gptq(w, np.eye(64), "nvfp4")
