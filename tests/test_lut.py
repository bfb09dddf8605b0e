"""The table-lookup kernels (npquant.kernels._lut, AVX-512): every code decoded exactly, results
within the float32 sum bound of numpy's, the portable kernels still reached and still right."""

import numpy as np
import pytest

from npquant import QuantizedTensor, Scheme, linear, prepare, quantize

numba = pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")
from npquant import kernels  # noqa: E402

from test_linear import gamma, sum_bound  # noqa: E402

needs_lut = pytest.mark.skipif(
    not kernels.has_avx512(),
    reason="numba's target CPU has no AVX-512: the table-lookup kernels are not compiled here (the portable ones serve)",
)

# 4-bit schemes the batch-1 table-lookup kernels take, in the checkpoint layout
# (blocks of a multiple of 32 columns) or prepared (no zero point).
FOUR_BIT = ["w4-g128", "w4-g32", "w4-channel", "w4-g128-asym", "mxfp4", "nvfp4",
            Scheme("int", 4, "group", 64, scale_dtype="bfloat16")]


def weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-2, 2, (shape[0], 1)))
    return w.astype(np.float32)


@pytest.fixture(params=["table lookup", "portable"])
def lut(request, monkeypatch):
    """Both batch-1 paths for 4-bit codes: the table-lookup kernels (where AVX-512 is) and the portable ones."""
    if request.param == "table lookup":
        if not kernels.has_avx512():
            pytest.skip("numba's target CPU has no AVX-512: the table-lookup kernels are not compiled here")
    else:
        monkeypatch.setattr(kernels, "USE_LUT", False)
    return request.param


@pytest.mark.parametrize("prepared", [False, True], ids=["checkpoint", "prepared"])
@pytest.mark.parametrize("shape", [(7, 256), (300, 512), (64, 4096)])
@pytest.mark.parametrize("scheme", FOUR_BIT, ids=str)
def test_batch1_within_the_sum_bound_of_numpy(lut, scheme, shape, prepared):
    qt = quantize(weight(shape), scheme)
    obj = prepare(qt) if prepared else qt
    if not kernels.has_kernels(obj, 1):
        pytest.skip(f"{scheme} {'prepared' if prepared else 'checkpoint layout'} at batch 1 takes the numpy path")
    x = np.random.default_rng(1).standard_normal((1, shape[1])).astype(np.float32)
    fast = kernels.numba_linear(x, obj)
    ref = linear(x, qt, backend="numpy")
    # Both are float32 sums of the I products of x with the dequantized
    # weights. The checkpoint-layout tables hold those weights exactly; the
    # prepared kernels sum x . v per block of columns, multiply by the scale
    # and add the G block sums (NVFP4: times one over the global scale):
    # I + G + 2 roundings at most along any path, so each result is within
    # gamma_(I+G+2) |x| @ |W_hat|^T of the exact sum, and within twice that
    # of each other.
    n_blocks = shape[1] // qt.block_shape[1]
    bound = 2 * sum_bound(x, qt.dequantize(), shape[1] + n_blocks + 2)
    assert np.all(np.abs(fast - ref) <= bound + 1e-30)


def enumerating(scheme, out_features=48, in_features=64) -> QuantizedTensor:
    """A tensor whose rows hold every byte (both nibbles in every combination), with varied scales and zero points."""
    template = quantize(weight((out_features, in_features)), scheme)
    codes = ((np.arange(out_features)[:, None] * 37 + np.arange(in_features // 2)[None, :] * 11) % 256).astype(np.uint8)
    assert len(np.unique(codes)) == 256
    zp = template.zero_point
    if zp is not None:
        zp = (np.arange(zp.size).reshape(zp.shape) % 16).astype(np.uint8)
    return QuantizedTensor(codes, template.scale, zp, template.shape, template.scheme, template.global_scale)


@needs_lut
@pytest.mark.parametrize("scheme", ["w4-g32", "w4-channel", "w4-g128-asym", "mxfp4", "nvfp4",
                                    Scheme("int", 4, "group", 32, symmetric=False),
                                    Scheme("int", 4, "group", 16, symmetric=False)], ids=str)
def test_checkpoint_layout_decodes_every_code_exactly(scheme):
    # x = e_k picks column k: each output is 0 + ... + w[o, k] * 1 + ... + 0,
    # exact, so the kernel's table entries are compared with
    # QuantizedTensor.dequantize bit for bit, for every byte, nibble,
    # scale and zero point.
    qt = enumerating(scheme, in_features=128)
    assert kernels._lut_rows_fit(qt)
    eye = np.eye(qt.shape[1], dtype=np.float32)
    got = np.stack([kernels.numba_linear(eye[k : k + 1], qt)[0] for k in range(qt.shape[1])], axis=1)
    np.testing.assert_array_equal(got, qt.dequantize())


@needs_lut
@pytest.mark.parametrize("scheme", ["w4-g32", "w4-channel", "mxfp4", "nvfp4"], ids=str)
def test_prepared_decodes_every_code_exactly(scheme):
    # One-hot x: each output is scale * value (NVFP4: then times one over
    # the global scale). int4 and MX scales round that product once, as
    # dequantize does; NVFP4's (s * v) / g and dequantize's v * (s / g)
    # are each two roundings of the same exact product: within 2 ulp.
    qt = enumerating(scheme, out_features=70)
    p = prepare(qt)
    eye = np.eye(qt.shape[1], dtype=np.float32)
    got = np.stack([kernels.numba_linear(eye[k : k + 1], p)[0] for k in range(qt.shape[1])], axis=1)
    want = qt.dequantize()
    if scheme == "nvfp4":
        np.testing.assert_allclose(got, want, rtol=2 * 2.0**-23, atol=0)
    else:
        np.testing.assert_array_equal(got, want)


@needs_lut
def test_which_checkpoint_tensors_take_the_lookup_kernel(monkeypatch):
    w = weight((64, 256))
    assert kernels._lut_rows_fit(quantize(w, "mxfp4")) and kernels._lut_rows_fit(quantize(w, "w4-g128-asym"))
    assert kernels._lut_rows_fit(quantize(w, "nvfp4"))  # blocks of 16 columns, in pairs
    assert kernels._lut_rows_fit(quantize(weight((64, 96)), "mxfp4"))  # three whole blocks of 32
    assert not kernels._lut_rows_fit(quantize(weight((64, 48)), "nvfp4"))  # three blocks of 16: one unpaired
    assert not kernels._lut_rows_fit(quantize(weight((64, 48)), Scheme("int", 4, "group", 8)))
    assert not kernels._lut_rows_fit(quantize(w, "w8-channel"))
    monkeypatch.setattr(kernels, "USE_LUT", False)
    assert not kernels._lut_rows_fit(quantize(w, "mxfp4"))


def test_avx512_follows_numbas_cpu_settings(monkeypatch):
    # A portable cache (NUMBA_CPU_NAME=generic) compiles without AVX-512:
    # the table-lookup kernels must not be compiled then.
    from numba.core import config

    kernels.has_avx512.cache_clear()
    try:
        monkeypatch.setattr(config, "CPU_NAME", "generic")
        monkeypatch.setattr(config, "CPU_FEATURES", "")
        assert not kernels.has_avx512()
        kernels.has_avx512.cache_clear()
        monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw")
        assert kernels.has_avx512()
    finally:
        monkeypatch.undo()
        kernels.has_avx512.cache_clear()


@needs_lut
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9])
def test_rows_past_the_end_are_not_stored(rows):
    # Four rows per pass: the last pass repeats the last row and must not write past y.
    qt = quantize(weight((rows, 64)), "w4-g32")
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    y = np.full((1, rows + 4), 7.0, np.float32)
    from npquant.kernels import _lut

    codes = qt.codes.view(np.uint8)
    scale = qt.scale.astype(np.float32)
    x_even, x_odd = np.ascontiguousarray(x[0, 0::2]), np.ascontiguousarray(x[0, 1::2])
    _lut.gemv_lut_rows(x_even, x_odd, codes, scale, kernels._NO_SCALE_TABLE, np.zeros((1, 2), np.uint8), False,
                       kernels._INT4_OFFSET, 1, y[:, :rows], np.zeros(1, np.int64), 1 << 40)
    assert np.all(y[:, rows:] == 7.0)
    ref = x.astype(np.float64) @ qt.dequantize().astype(np.float64).T
    assert np.all(np.abs(y[:, :rows] - ref) <= gamma(66) * np.abs(x) @ np.abs(qt.dequantize()).T + 1e-30)


@needs_lut
@pytest.mark.parametrize("prepared", [False, True], ids=["checkpoint", "prepared"])
def test_e8m0_scales_decode_exactly_at_every_exponent(prepared):
    # MXFP4's scale 2**(E - 127) for E = 0 .. 199: E = 0 is 2**-127, a
    # float32 subnormal that the kernels must not read as 0 (a one-byte
    # scale's exponent field alone would be). Exponents stay below 200 so
    # that no weight overflows to inf (0 * inf would make the one-hot sums NaN).
    template = enumerating("mxfp4", out_features=100)
    scale = (np.arange(template.scale.size) % 200).reshape(template.scale.shape).astype(np.uint8)
    qt = QuantizedTensor(template.codes, scale, None, template.shape, template.scheme)
    obj = prepare(qt) if prepared else qt
    eye = np.eye(qt.shape[1], dtype=np.float32)
    got = np.stack([kernels.numba_linear(eye[k : k + 1], obj)[0] for k in range(qt.shape[1])], axis=1)
    want = qt.dequantize()
    assert np.count_nonzero(want[scale.repeat(32, axis=1) == 0]) > 0  # subnormal weights are there to check
    np.testing.assert_array_equal(got, want)
