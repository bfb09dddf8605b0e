"""Codes in blocks of rows (4-bit and one-byte): layout checked independently, exact round trips, kernels against numpy."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npquant
from npquant import NpquantError, PreparedTensor, Scheme, linear, prepare, quantize
from npquant.prepared import ROWS
from test_linear import float16_decode, one_thread, sum_bound, weight

FOUR_BIT = [
    Scheme("int", 4, "group", 128),
    Scheme("int", 4, "group", 32, symmetric=False),
    Scheme("int", 4, "channel"),
    Scheme("int", 4, "channel", symmetric=False),
    Scheme("int", 4, "tensor"),
    Scheme("int", 4, "group", 64, scale_dtype="bfloat16"),
    Scheme("int", 4, "group", 2, scale_dtype="float16"),
]
ONE_BYTE = [
    Scheme("int", 8, "channel"),
    Scheme("int", 8, "group", 128, symmetric=False),
    Scheme("int", 8, "tensor"),
    Scheme("int", 8, "group", 32, scale_dtype="bfloat16"),
    Scheme("fp8_e4m3", 8, "channel"),
    Scheme("fp8_e4m3", 8, "group", 64),
    Scheme("fp8_e5m2", 8, "channel"),
]
FP4 = [npquant.schemes()["nvfp4"], npquant.schemes()["mxfp4"]]
PREPARABLE = FOUR_BIT + ONE_BYTE + FP4


def in_features_for(scheme: Scheme) -> int:
    return 3 * scheme.group_size if scheme.granularity == "group" else 258


def assert_same_tensor(a, b):
    assert a.shape == b.shape and a.scheme == b.scheme
    for name in ("codes", "scale", "zero_point"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)


@pytest.mark.parametrize("scheme", ["w3-g128", "w2-g64", Scheme("int", 5, "channel"), Scheme("int", 4, "group", 5)], ids=str)
def test_other_tensors_come_back_unchanged(scheme):
    w = weight((70, 384 if scheme != Scheme("int", 4, "group", 5) else 325))
    qt = quantize(w, scheme)
    assert prepare(qt) is qt


def test_prepare_refuses_what_is_not_a_quantized_tensor():
    with pytest.raises(NpquantError, match=r"qt must be a QuantizedTensor .* got ndarray"):
        prepare(np.zeros((4, 4), np.float32))


def test_bad_layouts_are_refused():
    p = prepare(quantize(weight((70, 256)), "w4-g128"))
    with pytest.raises(NpquantError, match=r"codes must be C-contiguous uint8 \(2, 128, 64\) .* got uint8 \(2, 128, 32\)"):
        PreparedTensor(p.codes[:, :, :32].copy(), p.scale, None, p.shape, p.scheme)
    with pytest.raises(NpquantError, match=r"scale must be C-contiguous float32 \(2, 2, 64\) .* got float16"):
        PreparedTensor(p.codes, p.scale.astype(np.float16), None, p.shape, p.scheme)
    with pytest.raises(NpquantError, match=r"zero_point must be given exactly when the scheme is asymmetric"):
        PreparedTensor(p.codes, p.scale, p.scale.astype(np.uint8), p.shape, p.scheme)
    with pytest.raises(NpquantError, match=r"PreparedTensor holds one-byte codes or 4-bit int codes"):
        PreparedTensor(p.codes, p.scale, None, p.shape, Scheme("int", 3, "group", 128))
    # 4-bit codes under an 8-bit scheme: half the bytes a row needs.
    with pytest.raises(NpquantError, match=r"codes must be C-contiguous uint8 \(2, 256, 64\) .* got uint8 \(2, 128, 64\)"):
        PreparedTensor(p.codes, p.scale, None, p.shape, Scheme("int", 8, "group", 128))


@pytest.mark.parametrize("scheme", FP4, ids=str)
def test_fp4_scales_stay_their_stored_bytes_and_bad_ones_are_refused(scheme):
    qt = quantize(weight((70, 256)), scheme)
    p = prepare(qt)
    assert p.scale.dtype == np.uint8 and p.scale.shape == (2, 256 // scheme.group_size, ROWS)
    assert p.scale[1, 3, 5] == qt.scale.view(np.uint8)[64 + 5, 3]  # row 64 + 5, block 3: the same byte
    with pytest.raises(NpquantError, match=r"scale must be C-contiguous uint8 \(2, \d+, 64\) .* got float32"):
        PreparedTensor(p.codes, p.scale.astype(np.float32), None, p.shape, p.scheme, p.global_scale)
    bad = p.scale.copy()
    bad[1, 2, 6] = 0xFF  # e8m0's NaN; for e4m3 a NaN too
    with pytest.raises(NpquantError, match=r"scale\[1, 2, 6\] holds .*NaN"):
        PreparedTensor(p.codes, bad, None, p.shape, p.scheme, p.global_scale)


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_nan_and_inf_fp8_codes_are_refused(dtype):
    p = prepare(quantize(weight((70, 256)), Scheme(dtype, 8, "channel")))
    codes = p.codes.copy()
    codes[1, 200, 3] = 0x7F if dtype == "fp8_e4m3" else 0x7C  # NaN / +Inf: row 64 + 3, column 200
    with pytest.raises(NpquantError, match=rf"NaN or Inf {dtype} pattern at row 67, column 200"):
        PreparedTensor(codes, p.scale, None, p.shape, p.scheme)


def test_layout_of_every_byte_value():
    # 256 rows of one byte each: row i holds byte value i, so every pair of
    # nibbles appears once. Stored nibbles are q + 8 (symmetric).
    codes = np.arange(256, dtype=np.uint8)[:, None]  # (256, 1)
    scale = np.linspace(0.5, 2, 256, dtype=np.float32)[:, None]  # (256, 1)
    qt = npquant.QuantizedTensor(codes, scale, None, (256, 2), Scheme("int", 4, "channel"))
    p = prepare(qt)
    assert isinstance(p, PreparedTensor) and p.codes.shape == (4, 1, ROWS) and p.scale.shape == (4, 1, ROWS)
    for i in range(256):
        b, r = divmod(i, ROWS)
        lo, hi = i & 15, i >> 4  # stored values
        got = int(p.codes[b, 0, r])
        assert got & 15 == (lo - 8) & 15 and got >> 4 == (hi - 8) & 15  # q in two's complement
        assert p.scale[b, 0, r] == scale[i, 0]
    expect = np.stack([(codes[:, 0] & 15).astype(np.float64) - 8, (codes[:, 0] >> 4).astype(np.float64) - 8], axis=1)
    np.testing.assert_array_equal(p.dequantize(), (expect * scale).astype(np.float32))


@pytest.mark.parametrize("scheme", [Scheme("int", 8, "channel"), Scheme("int", 8, "channel", symmetric=False),
                                    Scheme("fp8_e4m3", 8, "channel"), Scheme("fp8_e5m2", 8, "channel")], ids=str)
def test_one_byte_layout_of_every_code(scheme):
    # Row i holds the code whose byte is i (every finite pattern for fp8), twice.
    from npquant.quantize import code_numpy_dtype

    bytes_ = np.arange(256, dtype=np.uint8)
    if scheme.is_float:
        values = bytes_.view(code_numpy_dtype(scheme)).astype(np.float32)
        bytes_ = bytes_[np.isfinite(values)]
    n = bytes_.size
    codes = np.repeat(bytes_[:, None], 2, axis=1)  # (n, 2)
    scale = np.linspace(0.5, 2, n, dtype=np.float32)[:, None]
    zero_point = None if scheme.symmetric else (np.arange(n) % 251).astype(np.uint8)[:, None]
    qt = npquant.QuantizedTensor(codes.view(code_numpy_dtype(scheme)), scale, zero_point, (n, 2), scheme)
    p = prepare(qt)
    assert isinstance(p, PreparedTensor) and p.codes.shape == (-(-n // ROWS), 2, ROWS)
    for i in range(n):
        b, r = divmod(i, ROWS)
        assert p.codes[b, 0, r] == p.codes[b, 1, r] == bytes_[i]  # the checkpoint's byte, unchanged
        assert p.scale[b, 0, r] == scale[i, 0]
        if zero_point is not None:
            assert p.zero_point[b, 0, r] == zero_point[i, 0]
    assert_same_tensor(p.quantized(), qt)
    np.testing.assert_array_equal(p.dequantize(), qt.dequantize())


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(PREPARABLE),
    out_features=st.integers(1, 150),
    start=st.integers(0, 149),
    length=st.integers(1, 150),
    seed=st.integers(0, 2**16),
)
def test_round_trip_and_row_ranges_are_exact(scheme, out_features, start, length, seed):
    qt = quantize(weight((out_features, in_features_for(scheme)), seed), scheme)
    codes_before = qt.codes.copy()
    p = prepare(qt)
    np.testing.assert_array_equal(qt.codes, codes_before)  # the input is left alone
    assert_same_tensor(p.quantized(), qt)
    start = min(start, out_features - 1)
    stop = min(out_features, start + length)
    np.testing.assert_array_equal(p.dequantize_rows(start, stop), qt.dequantize_rows(start, stop))


@pytest.mark.parametrize("scheme", PREPARABLE, ids=str)
def test_nbytes_counts_codes_scales_zero_points_and_padding(scheme):
    out_features, in_features = 100, in_features_for(scheme)
    p = prepare(quantize(weight((out_features, in_features)), scheme))
    n_blocks, n_col_blocks = 2, in_features // scheme.block_shape((out_features, in_features))[1]
    # float32 scale (fp4: its one stored byte) (+ uint8 zero point); NVFP4's float32 global scale
    per_row_block = (1 if scheme.dtype == "fp4_e2m1" else 4) + (1 if not scheme.symmetric else 0)
    global_bytes = 4 if scheme.scale_dtype == "fp8_e4m3" and scheme.dtype == "fp4_e2m1" else 0
    assert p.nbytes == n_blocks * ROWS * (in_features * scheme.bits // 8 + n_col_blocks * per_row_block) + global_bytes
    assert p.bits_per_weight == 8 * p.nbytes / (out_features * in_features)


@pytest.mark.parametrize("scheme", PREPARABLE, ids=str)
def test_numpy_backend_gives_the_same_bits_as_the_tensor(scheme):
    qt = quantize(weight((90, in_features_for(scheme))), scheme)
    x = np.random.default_rng(1).standard_normal((5, qt.shape[1])).astype(np.float32)
    np.testing.assert_array_equal(linear(x, prepare(qt), backend="numpy"), linear(x, qt, backend="numpy"))


# --- numba ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the numba backend is optional")
    from npquant import kernels

    return kernels


@pytest.mark.parametrize("scheme", PREPARABLE, ids=str)
def test_numba_dequantize_blocks_is_bit_equal(kernels, scheme):
    from npquant.kernels import _BYTE_KIND, _FP8
    from npquant.kernels._tiles import dequantize_bytes_blocks_t, dequantize_int4_blocks_t

    qt = quantize(weight((150, in_features_for(scheme))), scheme)
    p = prepare(qt)
    has_zp = p.zero_point is not None
    zp = p.zero_point if has_zp else np.zeros((1, 1, 1), np.uint8)
    fp4 = scheme.dtype == "fp4_e2m1"
    if fp4:  # one-byte scale codes and their values (NVFP4's over its global scale), independently of the kernels
        every = np.arange(256, dtype=np.uint8).view(qt.scale.dtype).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # the NaN codes (e8m0 0xFF: 2**128), never read
            table = (every / qt.global_scale[0] if qt.global_scale is not None else
                     np.ldexp(np.float32(1), np.arange(256) - 127).astype(np.float32))
        scales = (np.zeros((1, 1, ROWS), np.float32), p.scale, np.ascontiguousarray(table, np.float32))
    else:
        scales = (p.scale, np.zeros((1, 1, ROWS), np.uint8), np.zeros(1, np.float32))
    i = qt.shape[1]
    # whole rows, and tiles' columns starting and ending inside column blocks
    half = 2 * (i // 4)  # even: 4-bit codes (and fp4) come two a byte
    for blk0, n, k0, k in ((0, 150, 0, i), (1, 86, 0, i), (2, 22, 0, i), (0, 5, 0, i), (0, 150, 2, half),
                           (1, 86, half, i - half - 2), (2, 22, i - 2, 2), (0, 150, 2, i - 2)):
        out_t = np.empty((k, n), np.float32)
        if scheme.bits == 4:
            dequantize_int4_blocks_t(p.codes, *scales, zp, has_zp, fp4, p.block_shape[1] // 2, blk0, k0, out_t,
                                     *one_thread())
        else:
            kind = _BYTE_KIND.get(scheme.dtype, 3 if has_zp else 0)
            fp8_mult = np.float32(_FP8.get(scheme.dtype, (0, 1.0))[1])
            dequantize_bytes_blocks_t(p.codes, p.scale, zp, kind, fp8_mult, p.block_shape[1], blk0, k0, out_t,
                                      *one_thread())
        o0 = blk0 * ROWS
        np.testing.assert_array_equal(out_t.T, qt.dequantize_rows(o0, o0 + n)[:, k0 : k0 + k],
                                      err_msg=f"blocks from {blk0}, {n} rows, columns {k0}+{k}")


@pytest.mark.parametrize("scheme", PREPARABLE, ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 17, 40, 129])  # 40: small-batch kernels or tiles (small_m 32); 129: tiles
@pytest.mark.parametrize("out_features", [37, 64, 150])
def test_numba_matches_numpy(kernels, scheme, m, out_features):
    qt = quantize(weight((out_features, in_features_for(scheme)), seed=m), scheme)
    x = np.random.default_rng(m).standard_normal((m, qt.shape[1])).astype(np.float32)
    fast = linear(x, prepare(qt), backend="numba")
    ref = linear(x, qt, backend="numpy")
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    # As for the checkpoint layout (test_linear.test_numba_matches_numpy): both
    # sum the I products of x with (q - z) exactly converted, times the scale,
    # in different orders: each within gamma_(I+2) |x| @ |W_hat|^T of the exact sum.
    assert np.all(np.abs(fast - ref) <= 2 * sum_bound(x, qt.dequantize(), qt.shape[1] + 2) + 1e-30)


def test_numba_e4m3_tiles_with_scales_past_the_folded_multiplier(kernels):
    # The tiles fold e4m3's 2**8 into each block's scales; a scale past float32's largest / 2**8 (a tensor made
    # by hand: quantize never makes one) must not turn its row to Inf or NaN: it takes the multiplier per lane.
    from npquant.kernels._tiles import dequantize_bytes_blocks_t

    qt = quantize(weight((130, 256)), "fp8-channel")
    scale = qt.scale.copy()
    scale[3] = 1e37  # 256 * 1e37 overflows float32; codes up to 4 (byte 0x44) keep 4e37 finite
    scale[70] = 3e36
    codes = qt.codes.view(np.uint8).copy()
    codes[3] = np.arange(256, dtype=np.uint8) % 0x45
    codes[70] = np.where(np.arange(256) % 2, 0x00, 0xC0).astype(np.uint8)  # 0 and -2
    big = npquant.QuantizedTensor(codes.view(qt.codes.dtype), scale, None, qt.shape, qt.scheme)
    want = big.dequantize()
    assert np.isfinite(want).all()
    p = prepare(big)
    out_t = np.empty((256, 130), np.float32)
    dequantize_bytes_blocks_t(p.codes, p.scale, np.zeros((1, 1, 1), np.uint8), 1, np.float32(256), 256, 0, 0,
                              out_t, *one_thread())
    np.testing.assert_array_equal(out_t.T, want)
    x = np.random.default_rng(1).standard_normal((130, 256)).astype(np.float32) * np.float32(1e-30)
    assert np.isfinite(linear(x, p, backend="numba")).all()


@pytest.mark.parametrize("scheme", ["w4-g128", "w8-channel", "fp8-channel"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tile_k", [256, 64])
def test_numba_tiles_and_threads(kernels, scheme, threads, tile_k):
    qt = quantize(weight((300, 256)), scheme)
    x = np.random.default_rng(0).standard_normal((130, 256)).astype(np.float32)  # past every small_m: tiles
    # One block of 64 rows a tile: five blocks, the last one short; whole rows or 64 columns a tile.
    fast = kernels.numba_linear(x, prepare(qt), tile_elements=ROWS * tile_k, threads=threads, tile_k=tile_k)
    ref = linear(x, qt, backend="numpy")
    assert np.all(np.abs(fast - ref) <= 2 * sum_bound(x, qt.dequantize(), 258))


def test_numba_bias_and_1d_x(kernels):
    qt = quantize(weight((70, 256)), "w4-g128")
    bias = np.linspace(-1, 1, 70).astype(ml_dtypes.bfloat16)
    x = np.random.default_rng(2).standard_normal(256).astype(np.float16)
    fast = linear(x, prepare(qt), bias=bias, backend="numba")
    ref = linear(x, qt, bias=bias, backend="numpy")
    assert fast.shape == (70,) and fast.dtype == np.float32
    assert np.all(np.abs(fast - ref) <= 2 * sum_bound(x[None, :], qt.dequantize(), 258)[0] + 1e-30)


@pytest.mark.parametrize("amax", [3.0, 1e6])
def test_numba_e4m3_blocks_batch1_decodes_agree_bit_for_bit(kernels, amax):
    # As for the checkpoint layout (test_linear): the float32-bits decode and
    # the float16 one (taken by a thread that flushes subnormals, forced
    # here) make the same products and sums up to one power of two.
    p = prepare(quantize(weight((150, 384)), "fp8-channel"))
    x = np.random.default_rng(3).standard_normal((1, 384)).astype(np.float32)
    x *= np.float32(amax / np.abs(x).max())
    mults = kernels._e4m3_multipliers(x)
    ys = []
    for m in (mults, float16_decode(mults)):
        y = np.empty((1, 150), np.float32)
        kernels.gemv_bytes_blocks(x, p.codes, p.scale, np.zeros((1, 1, 1), np.uint8), 1, 384, m, y, *one_thread())
        ys.append(y)
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_array_equal(ys[0], linear(x, p, backend="numba"))


@pytest.mark.parametrize("amax", [3.0, 2.0**110])
def test_numba_e4m3_small_batches_carry_the_2_8_in_x_bit_for_bit(kernels, monkeypatch, amax):
    # The small-batch kernel decodes e4m3 through float16 (the value / 2**8): in large calls with x below 2**100,
    # x carries the 2**8 (code kind 4, one multiply fewer a code), else the decode does (kind 1). The same
    # products and sums either way: the kernel run with each gives the same bits, and so does linear's small
    # batch, with the size from which x takes the 2**8 as it is (this call is below it) and at 0.
    p = prepare(quantize(weight((150, 384)), "fp8-channel"))
    x = np.random.default_rng(4).standard_normal((5, 384)).astype(np.float32)
    x *= np.float32(amax / np.abs(x).max())
    ys = []
    for kind, xk, mult in ((1, x, 2.0**8), (4, x * np.float32(2.0**8), 1.0)):
        y = np.empty((5, 150), np.float32)
        kernels.gemm_small_m_bytes_blocks(xk, p.codes, p.scale, np.zeros((1, 1, 1), np.uint8), kind,
                                          np.float32(mult), 384, y, *one_thread())
        ys.append(y)
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_array_equal(linear(x, p, backend="numba"), ys[0])
    monkeypatch.setattr(kernels, "_X_TAKES_E4M3_FROM", 0)
    np.testing.assert_array_equal(linear(x, p, backend="numba"), ys[0])


@pytest.mark.parametrize("x_takes_from", [0, None], ids=["x takes 2**8", "as set"])
def test_numba_e4m3_small_batches_decode_every_finite_code_exactly(kernels, monkeypatch, x_takes_from):
    if x_takes_from is not None:
        monkeypatch.setattr(kernels, "_X_TAKES_E4M3_FROM", x_takes_from)
    from reference import fp8_finite_table

    table = fp8_finite_table("fp8_e4m3")
    values = np.array([v for v, _ in table])  # float64, each exact in float32
    codes = np.array([c for _, c in table], np.uint8)[:, None].repeat(64, axis=1)  # row i: code i
    scheme = Scheme("fp8_e4m3", 8, "tensor")
    qt = npquant.QuantizedTensor(codes.view(ml_dtypes.float8_e4m3fn), np.ones((1, 1), np.float32), None,
                                 codes.shape, scheme)
    p = prepare(qt)
    for big in (1.0, 2.0**-20, 2.0**110):  # x carries the 2**8 below 2**100, the decode above
        x = np.zeros((3, 64), np.float32)
        x[:, 7] = big
        with np.errstate(over="ignore"):
            want = (values * np.float64(big)).astype(np.float32)
        np.testing.assert_array_equal(linear(x, p, backend="numba"), np.tile(want, (3, 1)))


# --- stacked layers (parts) ---------------------------------------------------------------------------------
def test_row_tiles_cut_each_part_as_it_would_be_alone():
    from npquant.kernels._tiling import row_tiles

    # Reference written out: a part alone is cut in tiles of min(cap, rows); parts of one tile share a tile
    # while their rows fit in the cap.
    assert row_tiles(1152, 2048, (384, 384, 384)) == [(0, 1152, [(0, 384), (384, 384), (768, 384)])]
    assert row_tiles(1152, 512, (384, 384, 384)) == [(0, 384, [(0, 384)]), (384, 384, [(384, 384)]),
                                                      (768, 384, [(768, 384)])]
    assert row_tiles(6144, 2048, (4096, 1024, 1024)) == [(0, 2048, [(0, 2048)]), (2048, 2048, [(2048, 2048)]),
                                                          (4096, 2048, [(4096, 1024), (5120, 1024)])]
    assert row_tiles(640, 256, (64, 576)) == [(0, 64, [(0, 64)]), (64, 256, [(64, 256)]), (320, 256, [(320, 256)]),
                                              (576, 64, [(576, 64)])]
    assert row_tiles(300, 128) == [(0, 128, [(0, 128)]), (128, 128, [(128, 128)]), (256, 44, [(256, 44)])]
    assert row_tiles(300, 128, (300,)) == row_tiles(300, 128)


@pytest.mark.parametrize("parts", [(64, 64, 64), (128, 64), (192,)])
def test_parts_are_kept_and_checked(parts):
    qt = quantize(weight((192, 256)), "w4-g128")
    p = prepare(qt, parts=list(parts))
    assert p.parts == parts
    assert_same_tensor(p.quantized(), qt)
    assert prepare(qt).parts is None
    for bad in ([64, 64], [64, 100, 28], [0, 192], [-64, 256], "abc", [64.0, 128]):
        with pytest.raises(NpquantError, match=r"parts must be"):
            prepare(qt, parts=bad)


@pytest.mark.parametrize("scheme", ["w4-g128", "w8-channel", "fp8-channel"])
@pytest.mark.parametrize("m, tile_elements", [(130, None), (300, None), (130, 128 * 128)])
def test_stacked_layers_give_each_layers_own_bits(kernels, monkeypatch, scheme, m, tile_elements):
    # A stacked tensor with parts runs in one call, and each part's outputs are its own layer's bit for bit:
    # BLAS gets, per part, the very products that layer alone gives it (recorded here, so the test can fail on
    # any machine, whether or not its BLAS's summation order depends on the product's width), and the outputs
    # are compared exactly. tile_elements 128 x 128: parts of several tiles.
    from npquant.kernels import _sgemm

    layers = [quantize(weight((rows, 384), seed=i), scheme) for i, rows in enumerate((384, 128, 256))]
    stacked = npquant.QuantizedTensor(np.concatenate([q.codes for q in layers]),
                                      np.concatenate([q.scale for q in layers]), None, (768, 384), layers[0].scheme)
    fused = prepare(stacked, parts=(384, 128, 256))
    x = np.random.default_rng(m).standard_normal((m, 384)).astype(np.float32)  # past every small_m: tiles
    calls = []
    real = _sgemm.sgemm

    def recording(x_at, lda, m_rows, tile_at, tile_shape, ldb, transposed, beta, y_at, ldc):
        calls.append((m_rows, tile_shape, transposed, beta))
        real(x_at, lda, m_rows, tile_at, tile_shape, ldb, transposed, beta, y_at, ldc)

    monkeypatch.setattr(_sgemm, "sgemm", recording)
    y = kernels.numba_linear(x, fused, tile_elements=tile_elements)
    fused_calls, calls[:] = list(calls), []
    own = [kernels.numba_linear(x, prepare(q), tile_elements=tile_elements) for q in layers]
    if _sgemm.usable():
        assert sorted(fused_calls) == sorted(calls) and len(calls) >= 3
    np.testing.assert_array_equal(y, np.concatenate(own, axis=1))


def test_l2_size_is_read_from_sysfs_and_sets_the_tiles(tmp_path, monkeypatch):
    from npquant import kernels
    from npquant.kernels import _tiling

    def cache_dir(entries):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for i, (level, size) in enumerate(entries):
            (root / f"index{i}").mkdir(parents=True)
            (root / f"index{i}" / "level").write_text(f"{level}\n")
            (root / f"index{i}" / "size").write_text(f"{size}\n")
        return str(root)

    assert _tiling.l2_bytes(cache_dir([(1, "32K"), (1, "32K"), (2, "512K"), (3, "32768K")])) == 512 << 10
    assert _tiling.l2_bytes(cache_dir([(1, "48K"), (2, "2048K"), (3, "491520K")])) == 2 << 20
    assert _tiling.l2_bytes(cache_dir([(2, "2M")])) == 2 << 20
    assert _tiling.l2_bytes(cache_dir([(1, "32K"), (3, "8M")])) is None
    assert _tiling.l2_bytes(cache_dir([(2, "garbage")])) is None
    assert _tiling.l2_bytes(str(tmp_path / "none")) is None
    # The narrow tiles (1 MiB) where the L2 holds two of them, or cannot be read.
    for l2, narrow in ((512 << 10, False), (1 << 20, False), (2 << 20, True), (None, True)):
        monkeypatch.setattr(_tiling, "l2_bytes", lambda l2=l2: l2)
        assert kernels._narrow_tiles_fit() is narrow, l2
