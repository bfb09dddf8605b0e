"""The apply path: numpy reference tiles, numba kernels, and their agreement."""

import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import npquant
from npquant import NpquantError, Scheme, linear, prepare, quantize
from npquant.linear_numpy import numpy_linear



def one_thread() -> tuple:
    """The last two arguments of a kernel called directly: a fresh work counter and one chunk of every unit (this thread does all)."""
    return np.zeros(1, np.int64), 1 << 40

U32 = 2.0**-24  # float32 unit roundoff


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 sum."""
    return n * U32 / (1 - n * U32)


def sum_bound(x, w_hat, terms):
    """gamma_terms * |x| @ |W_hat|^T: how far a float32 dot product may stray from the exact one."""
    return gamma(terms) * (np.abs(x.astype(np.float64)) @ np.abs(w_hat.astype(np.float64)).T)


SCHEMES = [s for s in npquant.schemes().values() if s.activations is None] + [  # W8A8: test_w8a8_linear.py
    Scheme("int", 8, "channel", symmetric=False),
    Scheme("int", 8, "group", 64, symmetric=False),
    Scheme("int", 5, "group", 32),
    Scheme("int", 3, "channel", symmetric=False),
    Scheme("int", 4, "group", 5),  # odd groups: 4-bit codes that straddle bytes
    Scheme("int", 4, "channel"),
    Scheme("fp8_e5m2", 8, "channel"),
    Scheme("fp8_e4m3", 8, "group", 32),
    Scheme("int", 4, "group", 32, scale_dtype="bfloat16"),
    Scheme("int", 6, "group", 64),  # every width of the bit-stream decodes: 2, 3, 5, 6, 7
    Scheme("int", 7, "channel"),
    Scheme("int", 2, "group", 16, symmetric=False),
]


def shape_for(scheme: Scheme):
    """Awkward shapes: out not a multiple of 4 or 16, in not a multiple of any vector width."""
    if scheme.granularity != "group":
        return (37, 203)
    return (67, scheme.group_size * (3 if scheme.group_size >= 32 else 41))


def weight(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-2, 2, (shape[0], 1)))
    w[0] *= 50
    return w.astype(np.float32)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_numpy_backend_is_x_times_the_dequantized_weight(scheme, m):
    w = weight(shape_for(scheme))
    qt = quantize(w, scheme)
    x = np.random.default_rng(m).standard_normal((m, w.shape[1])).astype(np.float32)
    y = linear(x, qt, backend="numpy")
    assert y.dtype == np.float32 and y.shape == (m, w.shape[0])
    w_hat = qt.dequantize()
    exact = x.astype(np.float64) @ w_hat.astype(np.float64).T
    # One float32 dot product of I terms against the exact sum.
    assert np.all(np.abs(y - exact) <= sum_bound(x, w_hat, w.shape[1]) + 1e-30)


def test_numpy_tiles_cover_every_row():
    w = weight((50, 40))
    qt = quantize(w, "w8-channel")
    x = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    whole = numpy_linear(x, qt, tile_elements=10**9)
    tiled = numpy_linear(x, qt, tile_elements=40 * 7)  # 7 rows a tile, last tile short
    exact = x.astype(np.float64) @ qt.dequantize().astype(np.float64).T
    bound = sum_bound(x, qt.dequantize(), 40)
    assert np.all(np.abs(tiled - exact) <= bound) and np.all(np.abs(whole - exact) <= bound)


def test_numpy_backend_never_holds_the_float32_weight():
    out_features, in_features = 4096, 512
    w = weight((out_features, in_features))
    qt = quantize(w, "w4-g128")
    x = np.ones((4, in_features), np.float32)
    tile_elements = 1 << 16
    tracemalloc.start()
    numpy_linear(x, qt, tile_elements=tile_elements)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full = out_features * in_features * 4
    tile = tile_elements * 4
    out = 4 * out_features * 4
    # One float32 tile and the unpacked codes it came from (1 byte per
    # weight, a quarter tile), plus the output; small index arrays aside.
    assert peak <= 1.5 * tile + out
    assert peak < full / 10


def test_bias_and_1d_x():
    w = weight((9, 16))
    qt = quantize(w, "w8-channel")
    bias = np.arange(9, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    y = linear(x, qt, bias=bias, backend="numpy")
    assert y.shape == (9,)
    np.testing.assert_allclose(y - bias, linear(x, qt, backend="numpy"), rtol=0, atol=1e-5)
    x3 = np.broadcast_to(x, (2, 3, 16)).astype(np.float16)
    assert linear(x3, qt, backend="numpy").shape == (2, 3, 9)


def test_inputs_are_not_modified():
    w = weight((9, 16))
    qt = quantize(w, "w4-channel")
    codes = qt.codes.copy()
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    x0 = x.copy()
    for backend in npquant.available_backends():
        linear(x, qt, backend=backend)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(qt.codes, codes)


def test_bad_arguments():
    qt = quantize(weight((9, 16)), "w8-channel")
    x = np.ones((2, 16), np.float32)
    with pytest.raises(NpquantError, match=r"backend='cuda' is not known; expected one of \('auto', 'numpy', 'numba'\)"):
        linear(x, qt, backend="cuda")
    with pytest.raises(NpquantError, match=r"bias must have shape \(9,\) for weight \(9, 16\), got \(8,\)"):
        linear(x, qt, bias=np.ones(8, np.float32))
    with pytest.raises(NpquantError, match=r"qt must be a QuantizedTensor"):
        linear(x, np.ones((9, 16), np.float32))
    with pytest.raises(NpquantError, match=r"x shape \(\) does not fit"):
        linear(np.ones((), np.float32), qt)


def test_numba_missing_is_a_clear_error(monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("npquant._backends"), "_numba_installed", lambda: False)
    qt = quantize(weight((9, 16)), "w8-channel")
    with pytest.raises(NpquantError, match=r"backend='numba' needs numba: pip install 'npquant\[fast\]'"):
        linear(np.ones(16, np.float32), qt, backend="numba")
    # "auto" falls back to numpy.
    assert linear(np.ones(16, np.float32), qt, backend="auto").shape == (9,)
    with pytest.raises(NpquantError, match=r"backend='numba' needs numba"):
        quantize(weight((9, 16)), "w8-channel", backend="numba")
    assert quantize(weight((9, 16)), "w8-channel", backend="auto").codes.shape == (9, 16)


# --- numba ---------------------------------------------------------------------------
numba_reason = "numba is not installed (pip install 'npquant[fast]'); the numba backend is optional"


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("numba", reason=numba_reason)
    from npquant import kernels

    return kernels


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_numba_dequantize_is_bit_equal(kernels, scheme):
    qt = quantize(weight(shape_for(scheme)), scheme)
    np.testing.assert_array_equal(kernels.numba_dequantize(qt), qt.dequantize())
    np.testing.assert_array_equal(kernels.numba_dequantize(qt, 5, 9), qt.dequantize_rows(5, 9))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_numba_dequantize_columns_is_bit_equal(kernels, scheme):
    """Tiles narrower than the weight (the large-batch path's): rows and columns starting and ending inside
    column blocks, one column, all of them."""
    from npquant.kernels._tiles import dequantize_rows

    qt = quantize(weight(shape_for(scheme)), scheme)
    if not kernels._dequantizes(qt):
        pytest.skip(f"{scheme}: no kernel reads it (numpy's tiles do)")
    args = kernels._kernel_args(qt)
    ref = qt.dequantize()
    o, i = qt.shape
    even, half = i - i % 2, 2 * (i // 4)  # 4-bit codes in bytes (and fp4): tiles start on a byte
    for o0, n, k0, k in ((0, o, 0, min(64, i)), (5, 9, 2, half), (3, 20, half, even - half - 2), (30, 7, 2, even - 2),
                         (2, 10, 8, i - 16), (1, 1, 0, i), (8, 3, even - 2, 2)):
        out = np.empty((n, k), np.float32)
        dequantize_rows(*args, o0, k0, out, *one_thread())
        np.testing.assert_array_equal(out, ref[o0 : o0 + n, k0 : k0 + k], err_msg=f"rows {o0}+{n}, columns {k0}+{k}")


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_numba_dequantize_16_is_bit_equal(kernels, scheme):
    """The 16-lane row kernel on every scheme it reads (channel and tensor ones at 208 columns, whole 16s; blocks of
    128 x 128 on 256 x 256): tiles whose rows and columns start and end inside column blocks, a block of 16, whole
    rows."""
    from npquant.kernels._tiles import dequantize_rows_16

    shape = {"group": shape_for(scheme), "block": (256, 256)}.get(scheme.granularity, (37, 208))
    qt = quantize(weight(shape), scheme)
    if not kernels._dequantizes(qt):
        pytest.skip(f"{scheme}: no kernel reads it (numpy's tiles do)")
    args = kernels._kernel_args(qt)
    kernel, kernel_args = kernels._dequantize_rows_args(qt, None)  # as numba_linear asks where the plan keeps none
    if kernels._vector_kind(args) is None:
        assert args[5] % 16, f"{scheme} should have the 16-lane kernel"
        pytest.skip(f"{scheme}: blocks not whole 16 columns go through other kernels")
    assert kernel is dequantize_rows_16
    # one-byte scales (NVFP4's e4m3 over its global scale, the MX formats' e8m0) read as stored, through their table
    assert (kernel_args[2].shape[0] > 0) == (qt.scale.dtype.itemsize == 1)
    ref = qt.dequantize()
    o, i = qt.shape
    assert kernel_args[-1] is False  # rows as they are; transposed for the large-batch tiles (below)
    tile_kernel, tile_args = kernels._tile_kernel(qt, None)
    assert tile_kernel is dequantize_rows_16 and tile_args[-1] is True
    for o0, n, k0, k in ((0, o, 0, i), (5, 9, 16, i - 32), (3, 20, 32, 16), (1, 1, i - 16, 16), (30, 7, 48, i - 64),
                         (0, 32, 0, i), (4, 17, 16, 16)):
        if o0 + n > o:
            continue
        out = np.full((n, k), np.nan, np.float32)
        dequantize_rows_16(*kernel_args, o0, k0, out, *one_thread())
        np.testing.assert_array_equal(out, ref[o0 : o0 + n, k0 : k0 + k], err_msg=f"rows {o0}+{n}, columns {k0}+{k}")
        # transposed, (K, T): whole groups of 16 rows and a last one cut short, 16 x 16 blocks moved in registers
        out_t = np.full((k, n), np.nan, np.float32)
        dequantize_rows_16(*tile_args, o0, k0, out_t, *one_thread())
        np.testing.assert_array_equal(out_t, ref[o0 : o0 + n, k0 : k0 + k].T,
                                      err_msg=f"transposed: rows {o0}+{n}, columns {k0}+{k}")
    # the weight's last rows in a transposed tile wider than them (kernels._tiling.tiled pads the last tile to an odd
    # number of 64-byte lines): its first columns written, the rest left as they were
    for n, width in ((7, 16), (16, 48), (21, 48), (5, 26)):
        out_t = np.full((i - 16, width), np.nan, np.float32)
        dequantize_rows_16(*tile_args, o - n, 16, out_t, *one_thread())
        np.testing.assert_array_equal(out_t[:, :n], ref[o - n :, 16:].T, err_msg=f"last {n} rows in {width} columns")
        assert np.isnan(out_t[:, n:]).all(), f"last {n} rows in {width} columns: a column past them written"


@pytest.mark.parametrize("vk", ["int8", "uint8", "e4m3", "e5m2", "fp4", "int4", "fp6", "int2", "int3", "int5",
                                "int6", "int7"])
@pytest.mark.parametrize("s", [1.0, 0.1, 3e-41])
def test_numba_dequantize_16_decodes_every_code_exactly(kernels, vk, s):
    """Every code of each of the 16-lane kernel's formats (all 256 bytes, fp8's finite ones, every code of a bit
    stream at each of its 16 lane positions), against values written from the formats' definitions, times a
    scale (1, one that rounds, a subnormal one): each weight is the float64 product rounded once to float32, as
    the reference dequantizes."""
    from reference import fp4_decode, fp6_decode, fp8_decode, reference_pack

    from npquant.kernels import _vector
    from npquant.kernels._tiles import dequantize_rows_16

    z = {"uint8": 100, "int4": 8, "int2": 1, "int3": 3, "int5": 20, "int6": 5, "int7": 64}.get(vk, 0)
    if vk in ("fp4", "int4"):
        byte = np.arange(256)
        pairs = np.stack([byte & 15, byte >> 4], axis=1).ravel()  # column 2j: byte j's low nibble, 2j + 1 its high
        values = np.array([fp4_decode(c) for c in pairs]) if vk == "fp4" else (pairs - z).astype(np.float64)
        codes = byte.astype(np.uint8).reshape(32, 8)  # 32 rows of 16 columns
    elif vk in ("fp6", "int2", "int3", "int5", "int6", "int7"):
        bits = 6 if vk == "fp6" else int(vk[3:])
        u = np.arange(1 << bits)
        # row r: codes u + r, so that every code sits at every lane position once
        rows_u = np.array([np.roll(np.resize(u, 16 * -(-len(u) // 16)), -r)[:16] for r in range(len(u))])
        values = np.array([fp6_decode(int(c)) for c in rows_u.ravel()]) if vk == "fp6" else (rows_u - z).ravel()
        codes = np.array([reference_pack(r, bits) for r in rows_u], np.uint8)
    else:
        byte = np.arange(256)
        if vk in ("e4m3", "e5m2"):
            fmt = "fp8_" + vk
            byte = np.array([c for c in range(256) if np.isfinite(fp8_decode(c, fmt))])
            values = np.array([fp8_decode(c, fmt) for c in byte])
        else:
            values = (byte.astype(np.int8) if vk == "int8" else byte - z).astype(np.float64)
        byte, values = np.resize(byte, 256), np.resize(values, 256)  # whole rows of 16
        codes = byte.astype(np.uint8).reshape(16, 16)
    rows = codes.shape[0]
    scale = np.full((rows, 1), s, np.float32)
    zp = np.full((rows, 1), z, np.uint8)
    has_zp = vk in ("uint8", "int5", "int7")  # the zero point from zp; else from base_off
    base_off = 0 if has_zp else z
    kind = getattr(_vector, "VK_" + vk.upper())
    out = np.full((rows, 16), np.nan, np.float32)
    dequantize_rows_16(codes, scale, kernels._NO_SCALE_CODES_2D, kernels._NO_SCALE_TABLE, zp, has_zp, 1, 16, kind,
                       base_off, np.float32(2.0**8), False, 0, 0, out, *one_thread())
    want = (np.asarray(values, np.float64) * np.float64(np.float32(s))).astype(np.float32).reshape(rows, 16)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_numba_matches_numpy(kernels, scheme, m):
    w = weight(shape_for(scheme), seed=m)
    qt = quantize(w, scheme)
    x = np.random.default_rng(m).standard_normal((m, w.shape[1])).astype(np.float32)
    fast = linear(x, qt, backend="numba")
    ref = linear(x, qt, backend="numpy")
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    # Both are float32 sums of the I products of x with the same dequantized
    # weights (the kernels dequantize bit for bit as numpy does) in different
    # orders; the kernels add partial sums per chunk, a few more additions.
    # Each is within gamma_(I+2) |x| @ |W_hat|^T of the exact sum, so they
    # are within twice that of each other.
    bound = 2 * sum_bound(x, qt.dequantize(), w.shape[1] + 2)
    assert np.all(np.abs(fast - ref) <= bound + 1e-30)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_numba_large_m_tiles_of_columns(kernels, scheme):
    """Tiles of 64 columns (the last one short where ``I`` is not a multiple of 64), each product added into y."""
    w = weight(shape_for(scheme), seed=5)
    qt = quantize(w, scheme)
    x = np.random.default_rng(5).standard_normal((20, w.shape[1])).astype(np.float32)
    fast = kernels.numba_linear(x, qt, tile_elements=64 * 16, threads=2, tile_k=64)
    ref = linear(x, qt, backend="numpy")
    # As in test_numba_matches_numpy: float32 sums of the same products in different orders.
    assert np.all(np.abs(fast - ref) <= 2 * sum_bound(x, qt.dequantize(), w.shape[1] + 2) + 1e-30)


@pytest.mark.parametrize("scheme", ["w4-g128", "w8-channel", "fp8-channel"])
def test_numba_large_m_where_blas_cannot_add_into_y(kernels, scheme, monkeypatch):
    """A BLAS other than OpenBLAS (no cblas_sgemm of ours): tiles of whole rows through numpy's matmul,
    asked for narrow ones or not, in both layouts."""
    from npquant import prepare

    from npquant.kernels import _sgemm

    monkeypatch.setattr(_sgemm, "usable", lambda: False)
    monkeypatch.setattr(_sgemm, "sgemm", None)  # called, it would fail the test
    qt = quantize(weight((150, 256), seed=3), scheme)
    x = np.random.default_rng(3).standard_normal((130, 256)).astype(np.float32)
    ref = linear(x, qt, backend="numpy")
    for t in (qt, prepare(qt)):
        fast = kernels.numba_linear(x, t, tile_elements=64 * 256, threads=2, tile_k=64)
        assert np.all(np.abs(fast - ref) <= 2 * sum_bound(x, qt.dequantize(), 258) + 1e-30)


def test_transposed_tiles_are_an_odd_number_of_lines_wide(kernels):
    """The 16-lane kernel's transposed tiles (K, L): every L 16 times an odd number (rows an odd number of
    64-byte lines apart), the tiles about equal and covering the weight, each tile's L holding its rows and
    fitting the buffer; written from the definitions, not from the code's formulas."""
    from npquant.kernels import _tiling

    for n in range(1, 400):
        want = next(m for m in range(16, 10**6, 16) if m >= n and (m // 16) % 2 == 1)
        assert _tiling.odd_lines(n) == want, n
    for out_features in (1, 15, 16, 17, 33, 100, 384, 1536, 2048, 4096, 11008, 14336, 32000):
        for tile_elements, tile_k in ((1 << 19, 256), (1 << 16, 64), (256 * 10, 256), (256 * 32, 256)):
            t, cols = _tiling.tile_shape(out_features, 4096, tile_elements, tile_k, 16, padded=True)
            bound = max(16, tile_elements // cols // 16 * 16)  # rows the tile elements hold
            assert t % 16 == 0 and (t // 16) % 2 == 1 and t <= bound + 16, (out_features, tile_elements, t)
            starts = range(0, out_features, t)
            assert len(starts) <= -(-out_features // bound), (out_features, tile_elements, t)
            assert t <= -(-out_features // (16 * len(starts))) * 16 + 16  # about equal: none far longer
            for o0 in starts:
                n = min(t, out_features - o0)
                width = _tiling.odd_lines(n)
                assert n <= width <= t and (width == t or o0 + t >= out_features)  # only the last one padded


@pytest.mark.parametrize("scheme", ["w4-g128", "w8-channel", Scheme("int", 4, "group", 64, symmetric=False)], ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_numba_large_m_tiles_and_threads(kernels, scheme, threads):
    w = weight((67, 256))
    qt = quantize(w, scheme)
    x = np.random.default_rng(0).standard_normal((40, 256)).astype(np.float32)
    # 10 rows a tile at most: each thread's share (22 or 23 rows) in three tiles.
    tiled = kernels.numba_linear(x, qt, tile_elements=256 * 10, threads=threads)
    ref = linear(x, qt, backend="numpy")
    assert np.all(np.abs(tiled - ref) <= 2 * sum_bound(x, qt.dequantize(), 258))


def test_numba_large_m_restores_blas_threads(kernels):
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl (part of npquant[fast]) is not installed")
    before = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    qt = quantize(weight((64, 256)), "w8-channel")
    kernels.numba_linear(np.ones((32, 256), np.float32), qt, tile_elements=256 * 8, threads=2)
    with pytest.raises(ValueError):  # an error inside a worker thread reaches the caller
        kernels.numba_linear(np.ones((32, 255), np.float32), qt, tile_elements=256 * 8, threads=2)
    after = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
    assert after == before


@pytest.mark.parametrize("scheme", ["w4-g128", Scheme("int", 4, "channel"),
                                    Scheme("int", 4, "group", 32, symmetric=False)], ids=str)
def test_numba_int4_split_dequantize_is_bit_equal_reordered(kernels, scheme):
    from npquant.kernels._tiles import dequantize_rows_int4_split

    qt = quantize(weight((19, 256)), scheme)
    codes, scale, zp, has_zp, bo, bi, kind, bits, base_off = kernels._kernel_args(qt)[:9]
    assert kind == 2
    ref = qt.dequantize_rows(5, 12)
    for k0, k in ((0, 256), (0, 64), (96, 64), (30, 200), (254, 2)):  # whole rows, and tiles' columns
        out = np.empty((7, k), np.float32)
        dequantize_rows_int4_split(codes, scale, zp, has_zp, bo, bi, base_off, 5, k0, out, *one_thread())
        piece = ref[:, k0 : k0 + k]
        np.testing.assert_array_equal(out, np.concatenate([piece[:, 0::2], piece[:, 1::2]], axis=1),
                                      err_msg=f"columns {k0}+{k}")


def test_numba_fp6_decodes_every_code_exactly(kernels):
    """All 64 fp6 e2m3 codes, against the reference's formula: dequantized, and as one-hot products at batch 1 (the
    small-batch kernel) and 20 (the tiles), each output one product, exact."""
    from reference import fp6_decode

    from npquant.packing import pack_codes

    values = np.array([fp6_decode(c) for c in range(64)], np.float32)
    # row r: code r at column 3 (a bit offset of 2 inside a byte), code r + 1 elsewhere; 64 columns, scales 1
    u = np.tile(((np.arange(64) + 1) % 64)[:, None], (1, 64)).astype(np.uint8)
    u[:, 3] = np.arange(64)
    qt = npquant.QuantizedTensor(pack_codes(u, 6), np.full((64, 2), 127, np.uint8), None, (64, 64),
                                 npquant.get_scheme("mxfp6"))
    assert kernels.has_kernels(qt)
    np.testing.assert_array_equal(kernels.numba_dequantize(qt)[:, 3], values)
    np.testing.assert_array_equal(kernels.numba_dequantize(qt)[:, 0], np.roll(values, -1))
    for m in (1, 20):
        x = np.zeros((m, 64), np.float32)
        x[:, 3] = 1.0
        np.testing.assert_array_equal(kernels.numba_linear(x, qt, threads=2), np.tile(values, (m, 1)))


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_numba_fp8_decodes_every_finite_code_exactly(kernels, dtype):
    from reference import fp8_finite_table

    table = fp8_finite_table(dtype)
    values = np.array([v for v, _ in table])  # float64, each exact in float32
    codes = np.repeat(np.array([c for _, c in table], np.uint8)[:, None], 8, axis=1)  # row i: code i, 8 times
    ml_type = np.dtype(npquant.quantize(np.ones((1, 1), np.float32), Scheme(dtype, 8, "tensor")).codes.dtype)
    scale = np.ones((1, 1), np.float32)
    qt = npquant.QuantizedTensor(codes.view(ml_type), scale, None, codes.shape, Scheme(dtype, 8, "tensor"))
    np.testing.assert_array_equal(kernels.numba_dequantize(qt)[:, 0], values.astype(np.float32))
    # One-hot x: each output is one product, exact. 2**110 takes the path where
    # x is too large to carry e4m3's 2**8 and the output carries it instead.
    for big in (1.0, 2.0**110):
        x = np.zeros(8, np.float32)
        x[3] = big
        y = linear(x, qt, backend="numba")
        np.testing.assert_array_equal(y, (values * big).astype(np.float32))
    if dtype == "fp8_e4m3":
        # Batch 1 decodes e4m3 through float32 bits unless the thread flushes
        # subnormal inputs (a 0 for the subnormal in e4m3_mults makes it take
        # the float16 decode, as such a thread does). Both, one-hot x from
        # 2**-20 to past 2**127 (where x is too large to take 2**120 and the
        # output takes part of it).
        for big in (2.0**-20, 1.0, 100.0, 2.0**110, np.float32(2.0**127 * 1.5)):
            x = np.zeros((1, 8), np.float32)
            x[0, 5] = big
            mults = kernels._e4m3_multipliers(x)
            assert (mults[4] == 0) == (big > 2.0**127)
            with np.errstate(over="ignore"):  # inf past float32's range, as the products give
                want = (values * np.float64(big)).astype(np.float32)
            for m in (mults, float16_decode(mults)):
                y = np.empty((1, codes.shape[0]), np.float32)
                kernels.gemv_bytes(x, codes, scale, codes.shape[0], 8, 1, m, y, *one_thread())
                np.testing.assert_array_equal(y[0], want)


def mxcsr_access():
    """A numba function ``f(new, write) -> old`` reading (and, if ``write``, setting) this thread's MXCSR (x86)."""
    from llvmlite import ir
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _mxcsr(typingctx, new, write):
        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            slot = cgutils.alloca_once(builder, i32)
            ptr = builder.bitcast(slot, ir.IntType(8).as_pointer())
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr"), [ptr])
            old = builder.load(slot)
            with builder.if_then(builder.icmp_unsigned("!=", args[1], ir.Constant(args[1].type, 0))):
                builder.store(builder.trunc(args[0], i32), slot)
                builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr"), [ptr])
            return builder.zext(old, ir.IntType(64))

        return types.int64(types.int64, types.boolean), codegen

    @njit
    def mxcsr(new, write):
        return _mxcsr(new, write)

    return mxcsr


def test_numba_e4m3_batch1_exact_where_subnormal_inputs_are_flushed(kernels, monkeypatch):
    # Some libraries switch on DAZ (x86: subnormal inputs read as zero) for
    # their thread. e4m3's float32-bits decode makes its subnormal codes
    # float32 subnormals, so the kernels must notice and decode through
    # float16. With one kernel thread, the kernels run in this one.
    import platform

    from reference import fp8_finite_table

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("DAZ is a bit of x86's MXCSR; this machine has no such mode to set")
    table = fp8_finite_table("fp8_e4m3")
    want = np.array([v for v, _ in table]).astype(np.float32)
    codes = np.repeat(np.array([c for _, c in table], np.uint8)[:, None], 8, axis=1)  # row i: code i, 8 times
    qt = npquant.QuantizedTensor(codes.view(ml_dtypes.float8_e4m3fn), np.ones((1, 1), np.float32), None,
                                 codes.shape, Scheme("fp8_e4m3", 8, "tensor"))
    x = np.zeros((1, 8), np.float32)
    x[0, 5] = 1.0
    claims_kept = kernels._e4m3_multipliers(x)
    claims_kept[4] = 1.0  # a normal number: the check then says this thread keeps subnormals
    mxcsr = mxcsr_access()
    old = mxcsr(0, False)
    monkeypatch.setenv("NPQUANT_NUM_THREADS", "1")  # every kernel in this thread, where DAZ is set
    try:
        mxcsr(old | 0x40, True)  # DAZ
        assert np.float32(2.0**-140) * np.float32(2.0**100) == 0  # it is on in this thread
        wrong = np.empty((1, codes.shape[0]), np.float32)
        kernels.gemv_bytes(x, codes, np.ones((1, 1), np.float32), codes.shape[0], 8, 1, claims_kept, wrong, *one_thread())
        assert np.any(wrong[0] != want)  # the float32-bits decode loses the subnormal codes here
        np.testing.assert_array_equal(linear(x[0], qt, backend="numba"), want)
        np.testing.assert_array_equal(linear(x[0], prepare(qt), backend="numba"), want)
    finally:
        mxcsr(old, True)


def e4m3_multipliers_reference(x) -> list[float]:
    """The six e4m3_mults, worked out in float64 Python from x's largest magnitude (NaN wins, as in np.max)."""
    values = [abs(float(v)) for v in np.asarray(x, np.float64).ravel()]
    amax = math.nan if any(v != v for v in values) else max(values, default=0.0)
    # the float32-bits decode leaves out 2**120: x takes it unless x * 2**120 would pass 2**127
    e = math.frexp(amax)[1] if math.isfinite(amax) else 0
    y_shift = max(0, e - 7)
    x_f16, y_f16 = (256.0, 1.0) if amax < 2.0**100 else (1.0, 256.0)  # the float16 decode leaves out 2**8
    return [2.0 ** (120 - y_shift), 2.0**y_shift, x_f16, y_f16, 2.0**-140 if y_shift <= 120 else 0.0, 2.0**100]


@pytest.mark.parametrize("case", ["zeros", "ones", "tiny", "huge", "max", "inf", "-inf", "nan", "nan+inf",
                                  "random"])
def test_e4m3_multipliers_match_reference(kernels, case):
    rng = np.random.default_rng(len(case))
    x = rng.standard_normal((1, 4099)).astype(np.float32)
    special = {"zeros": 0.0, "ones": 1.0, "tiny": 1e-44, "huge": 2.0**110, "max": np.finfo(np.float32).max,
               "inf": np.inf, "-inf": -np.inf, "nan": np.nan}
    if case in ("zeros", "ones", "tiny"):
        x[:] = special[case]
    elif case == "nan+inf":
        x[0, 17], x[0, 4000] = np.inf, np.nan
    elif case != "random":
        x[0, 4098] = special[case]  # the last element: the scan must reach it
    got = kernels._e4m3_multipliers(x)
    assert got.dtype == np.float32 and got.shape == (6,)
    np.testing.assert_array_equal(got, np.array(e4m3_multipliers_reference(x), np.float32))


def float16_decode(mults: np.ndarray) -> np.ndarray:
    """``e4m3_mults`` that make the batch-1 kernels take the float16 decode, as a thread flushing subnormals does."""
    forced = mults.copy()
    forced[4] = 0
    return forced


@pytest.mark.parametrize("amax", [3.0, 1e6])
def test_numba_e4m3_batch1_decodes_agree_bit_for_bit(kernels, amax):
    # Every product and partial sum of the float32-bits decode is the float16
    # decode's times one power of two, so equal loops give equal bits.
    rng = np.random.default_rng(7)
    qt = quantize(weight((37, 512)), "fp8-channel")
    x = rng.standard_normal((1, 512)).astype(np.float32)
    x *= np.float32(amax / np.abs(x).max())
    args = kernels._kernel_args(qt)
    mults = kernels._e4m3_multipliers(x)
    assert mults[4] != 0
    ys = []
    for m in (mults, float16_decode(mults)):
        y = np.empty((1, 37), np.float32)
        kernels.gemv_bytes(x, args[0], args[1], args[4], args[5], 1, m, y, *one_thread())
        ys.append(y)
    np.testing.assert_array_equal(ys[0], ys[1])
    np.testing.assert_array_equal(ys[0], linear(x, qt, backend="numba"))


@pytest.mark.parametrize("m", [1, 8])  # batches up to SMALL_M: x copied to a cache line
def test_numba_x_at_any_address(kernels, m):
    qt = quantize(weight((40, 1024)), "w8-channel")
    buf = np.random.default_rng(m).standard_normal(m * 1024 + 1).astype(np.float32)
    x = buf[1:].reshape(m, 1024)  # 4 bytes past malloc's alignment: never on a cache line
    assert x.ctypes.data % 64
    ref = linear(x, qt, backend="numpy")
    assert np.all(np.abs(linear(x, qt, backend="numba") - ref) <= 2 * sum_bound(x, qt.dequantize(), 1026))
    big = kernels._aligned_empty((m, 4096))
    assert big.shape == (m, 4096) and big.dtype == np.float32 and big.flags.c_contiguous
    assert big.ctypes.data % 64 == 0


WIDE_W8 = weight((1024, 4096))


@pytest.mark.parametrize("m", [1, 8, 40])  # batch 1, small batch, tiles
@pytest.mark.parametrize("layout", ["strided", "fortran", "float64", "float16", "big-endian", "3-d"])
def test_numba_x_of_any_layout_and_dtype(kernels, m, layout):
    # x is made C-contiguous float32 inside the call (numba_linear's compiled buffers): every
    # layout and floating dtype gives the float32 C-contiguous result of numpy's backend.
    # 1024 x 4096: large enough to run on several threads, whose job blocks take C-contiguous arrays only.
    qt = quantize(WIDE_W8, "w8-channel")
    base = np.random.default_rng(m).standard_normal((m, 8192)).astype(np.float32)
    x = {"strided": base[:, ::2], "fortran": np.asfortranarray(base[:, :4096]), "float64": base[:, :4096].astype(np.float64),
         "float16": base[:, :4096].astype(np.float16), "big-endian": base[:, :4096].astype(">f4"), "3-d": base[:, :4096].reshape(m, 1, 4096)}[layout]
    ref = linear(x, qt, backend="numpy")
    got = linear(x, qt, backend="numba")
    assert got.shape == ref.shape == (*x.shape[:-1], 1024) and got.dtype == np.float32
    x32 = x.reshape(-1, 4096).astype(np.float32)
    assert np.all(np.abs(got - ref).reshape(-1, 1024) <= 2 * sum_bound(x32, qt.dequantize(), 4098))


def test_numba_linear_reads_tensors_without_kernels_through_numpy(kernels):
    # Blocks cut at the weight's edge have no kernel (has_kernels False): numba_linear gives numpy's tiles, bit for bit.
    qt = quantize(weight((100, 200)), "fp8-block")  # blocks of 128 x 128
    assert not kernels.has_kernels(qt)
    x = np.random.default_rng(4).standard_normal((3, 200)).astype(np.float32)
    np.testing.assert_array_equal(kernels.numba_linear(x, qt), linear(x, qt, backend="numpy"))
    np.testing.assert_array_equal(linear(x, qt, backend="numba"), linear(x, qt, backend="numpy"))


def test_numba_bias_1d_and_auto(kernels):
    w = weight((13, 64))
    qt = quantize(w, "fp8-channel")
    bias = np.linspace(-1, 1, 13).astype(np.float32)
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    assert "numba" in npquant.available_backends()
    fast = linear(x, qt, bias=bias, backend="auto")
    ref = linear(x, qt, bias=bias, backend="numpy")
    assert fast.shape == (13,)
    assert np.all(np.abs(fast - ref) <= 2 * sum_bound(x[None], qt.dequantize(), 66)[0] + 4 * U32 * np.abs(ref))


# --- the exact int8 batch-1 kernel (AVX-512 VNNI) -----------------------------------------
vnni_reason = "numba's target lacks AVX-512 VNNI: batch-1 int8 calls take the float32 kernel (tested above)"


@pytest.fixture(scope="module")
def vnni(kernels):
    if not kernels.has_vnni():
        pytest.skip(vnni_reason)
    from npquant.kernels import _vnni

    return _vnni


def int8_exact_bound(x, codes, scale_rows):
    """How far the exact int8 kernel may be from ``x . (c * scale)`` in float64, per output.

    ``x`` moves to the integer grid ``unit = 2**(e - 30)`` (``2**(e - 1) <=
    max|x| < 2**e``) by at most ``unit / 2`` each; the integer sums are
    exact; float64 adds one rounding per block of columns (2**-52 of the
    running sum: far below the rest, bounded by 2**-40 of |x| @ |W|); the
    float32 output is rounded once (2**-24 of itself).
    """
    x64 = x.astype(np.float64)
    e = math.frexp(float(np.abs(x64).max()))[1]
    w_abs = np.abs(codes.astype(np.float64) * scale_rows)
    exact = x64 @ (codes.astype(np.float64) * scale_rows).T
    return exact, 2.0 ** (e - 31) * w_abs.sum(axis=1) + 2.0**-24 * np.abs(exact) + 2.0**-40 * (np.abs(x64) @ w_abs.T)


@pytest.mark.parametrize("shape, scheme", [
    ((37, 256), "w8-channel"),  # 37 rows: the last block of eight repeats row 36 and stores five
    ((16, 8256), "w8-channel"),  # 129 chunks of 64 columns: the lane sums taken in two parts
    ((67, 640), Scheme("int", 8, "group", 64)),
    ((40, 512), Scheme("int", 8, "group", 128, scale_dtype="bfloat16")),
    ((9, 384), Scheme("int", 8, "tensor")),
], ids=str)
def test_numba_int8_exact_kernel_is_within_its_derived_bound(kernels, vnni, shape, scheme):
    qt = quantize(weight(shape), scheme)
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal((1, shape[1])) * 2.0 ** rng.integers(-20, 4, shape[1])).astype(np.float32)  # 2**24 range
    bo, bi = qt.block_shape
    scale_rows = np.repeat(np.repeat(kernels._scale_values(qt).astype(np.float64), bo, 0), bi, 1)  # (O, I)
    exact, bound = int8_exact_bound(x, qt.codes, scale_rows)
    got = linear(x, qt, backend="numba")
    assert got.dtype == np.float32 and got.shape == (1, shape[0])
    assert np.all(np.abs(got - exact) <= bound)
    direct = np.empty_like(got)
    vnni.gemv_int8_exact(x, qt.codes.view(np.uint8), kernels._scale_values(qt), bo, bi, direct, *one_thread())
    np.testing.assert_array_equal(got, direct)  # the call took this kernel
    # ... and on any thread count the same bits: each output is one exact sum
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(kernels.numba_linear(x, qt, threads=threads), got)


def test_numba_int8_exact_kernel_at_the_lanes_limit(kernels, vnni):
    # Every product at its largest: code -128 against L = -2**15 (x = -(1 + 2**-14): X = -(2**29 + 2**15)).
    # A lane then gains 2**24 per chunk of 64 columns: 127 chunks reach 2**31 - 2**24, one more would wrap.
    out_features, in_features = 3, 64 * (2 * vnni._MAX_CHUNKS + 3)
    codes = np.full((out_features, in_features), -128, np.int8)
    codes[1, ::3] = 127
    x = np.full((1, in_features), -(1 + 2.0**-14), np.float32)
    scale = np.array([[2.0**-7], [2.0**-3], [1.0]], np.float32)
    y = np.empty((1, out_features), np.float32)
    vnni.gemv_int8_exact(x, codes.view(np.uint8), scale, 1, in_features, y, *one_thread())
    exact = x.astype(np.float64) @ (codes.astype(np.float64) * scale).T  # exact: few bits in each term
    np.testing.assert_array_equal(y, exact.astype(np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_numba_int8_exact_kernel_leaves_nan_and_inf_to_the_float32_one(kernels, vnni, monkeypatch, bad):
    qt = quantize(weight((21, 128)), "w8-channel")
    x = np.random.default_rng(0).standard_normal((1, 128)).astype(np.float32)
    x[0, 70] = bad
    y = np.empty((1, 21), np.float32)
    vnni.gemv_int8_exact(x, qt.codes.view(np.uint8), qt.scale, 1, 128, y, *one_thread())
    assert np.isnan(y).all()  # the kernel's signal: no integers for x
    got = linear(x, qt, backend="numba")
    monkeypatch.setattr(kernels, "USE_VNNI", False)
    want = linear(x, qt, backend="numba")
    np.testing.assert_array_equal(got, want)  # the float32 kernel's NaN and Inf, bit for bit
    assert np.isnan(want).all() if np.isnan(bad) else np.isinf(want).any()


def test_numba_int8_float32_kernel_where_vnni_is_switched_off(kernels, monkeypatch):
    # USE_VNNI off (and every machine without VNNI): the float32 batch-1 kernel, within float32's bound.
    monkeypatch.setattr(kernels, "USE_VNNI", False)
    qt = quantize(weight((37, 256)), "w8-channel")
    x = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
    y = np.empty((1, 37), np.float32)
    kernels.gemv_bytes(x, qt.codes.view(np.uint8), qt.scale, 1, 256, 0, kernels._NO_E4M3, y, *one_thread())
    np.testing.assert_array_equal(linear(x, qt, backend="numba"), y)
    ref = linear(x, qt, backend="numpy")
    assert np.all(np.abs(y - ref) <= 2 * sum_bound(x, qt.dequantize(), 258))


FAR_SHAPE = (2017, 4160)  # 8.4 MB of one-byte codes: past PREFETCH_FROM; 4160 = 8 steps of 512 columns and 64 more


@pytest.mark.parametrize("scheme", ["fp8-channel", Scheme("fp8_e5m2", 8, "channel"), Scheme("fp8_e4m3", 8, "group", 32),
                                    "w8-channel", Scheme("int", 8, "group", 64)], ids=str)
def test_numba_batch1_bytes_kernel_on_codes_from_memory(kernels, monkeypatch, scheme):
    # Codes of PREFETCH_FROM bytes and more take gemv_bytes's steps of _SUB_BLOCK columns, each asking for the
    # lines a pass ahead: the same bound as every float32 kernel (the steps only regroup the sum), on every row
    # (the last block of eight repeats the last row) and both e4m3 decodes. int8 with USE_VNNI off: the float32 kernel.
    from npquant.kernels import _gemv

    assert FAR_SHAPE[0] * FAR_SHAPE[1] >= _gemv.PREFETCH_FROM and FAR_SHAPE[1] % _gemv._SUB_BLOCK
    monkeypatch.setattr(kernels, "USE_VNNI", False)
    qt = quantize(weight(FAR_SHAPE), scheme)
    x = np.random.default_rng(3).standard_normal((1, FAR_SHAPE[1])).astype(np.float32)
    y = linear(x, qt, backend="numba")
    bound = 2 * sum_bound(x, qt.dequantize(), FAR_SHAPE[1] + 2)
    assert np.all(np.abs(y - linear(x, qt, backend="numpy")) <= bound + 1e-30)
    args = kernels._kernel_args(qt)
    if args[6] != 4 or not args[9]:
        return
    mults = kernels._e4m3_multipliers(x)
    y16 = np.empty_like(y)
    kernels.gemv_bytes(x, args[0], args[1], args[4], args[5], 1, float16_decode(mults), y16, *one_thread())
    np.testing.assert_array_equal(y16, y)
