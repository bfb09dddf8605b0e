"""The fp8 W8A8 GEMM (npquant.kernels._w8a8_fp8): every e4m3 code decoded exactly, sums exact where float32 would
round, and outputs bit-equal to an fp8 reference written apart (float64 products of ml_dtypes' values, summed by
numpy), over shapes, batches on both sides of the one-pass limit, tiles with a remainder, and threads."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the fp8 GEMM is a numba kernel; without numba npquant runs the numpy reference")

import npquant  # noqa: E402
from npquant import kernels  # noqa: E402
from npquant.kernels import _w8a8_fp8  # noqa: E402

E4M3 = ml_dtypes.float8_e4m3fn
FINITE = np.array([b for b in range(256) if b not in (0x7F, 0xFF)], np.uint8)  # every code but the two NaNs


def reference(x, qt, bias=None):
    """float32 (M, O), apart from npquant: vLLM's per-token fp8 rule, float64 products and sums (exact for these
    values: each a multiple of 2**-18 below 2**35), one rounding to float32, then x_scale * (w_scale * acc), + bias."""
    x = x.astype(np.float32)
    x_scale = np.maximum(np.abs(x).max(axis=1) / np.float32(448), np.float32(1) / np.float32(448 * 512))
    q = np.clip(x / x_scale[:, None], -448, 448).astype(E4M3).astype(np.float64)
    acc = np.einsum("mk,nk->mn", q, qt.codes.astype(np.float64)).astype(np.float32)
    y = x_scale[:, None] * (qt.scale.astype(np.float32).reshape(-1)[None, :] * acc)
    return y if bias is None else y + bias


def test_every_code_decodes_exactly():
    """decode_x gives each code's value over 2**8 (ml_dtypes' value, the reference), signed zeros and subnormals
    included."""
    got = _w8a8_fp8.decode_x(FINITE[None, :])[0]
    want = FINITE.view(E4M3).astype(np.float64) / 256.0
    assert np.array_equal(got.view(np.uint64), want.view(np.uint64))


def test_sums_are_exact_where_float32_would_round():
    """448 * 448 beside the smallest subnormal products: a float32 (or pairwise float32) sum loses the small ones;
    the kernels' float64 sums keep every one, at one token and at several, on one pass and in tiles."""
    k = 3001
    w = np.full((3, k), 2.0**-9, np.float32)  # the smallest subnormal code: 2**-9
    w[:, ::1000] = 448.0
    qt = npquant.quantize(w, "w8a8-fp8")
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    x = np.tile(qt.codes.astype(np.float32)[0], (20, 1))  # each token equal to the weight's codes
    xd = _w8a8_fp8.decode_x(np.ascontiguousarray(x.astype(E4M3)).view(np.uint8))
    exact = (x.astype(np.float64) @ qt.codes.astype(np.float64).T)  # integers times 2**-18: exact here
    for m in (1, 2, 20):
        acc = np.empty((m, 3), np.float64)
        _w8a8_fp8.fp8_sums(xd[:m], codes, acc, np.zeros(1, np.int64), 3)
        assert np.array_equal(acc * _w8a8_fp8.UNSCALE, exact[:m])
    assert float(np.float32(448.0 * 448.0) * 4 + np.float32(2.0**-18)) == 448.0 * 448.0 * 4  # float32 would drop it


@pytest.mark.parametrize("tile_elements", [None, 5 * 203])  # the default, and tiles of 5 rows (a remainder of 1)
@pytest.mark.parametrize("batch", [1, 2, 3, 16, 17, 40])
def test_linear_bit_equal_to_the_reference(batch, tile_elements, monkeypatch):
    if tile_elements:
        monkeypatch.setattr(_w8a8_fp8, "TILE_ELEMENTS", tile_elements)
    rng = np.random.default_rng(batch)
    w = (rng.standard_normal((131, 203)) * np.exp(rng.uniform(-3, 3, (131, 1)))).astype(np.float32)
    w[5] = 0.0  # a zero row: scale floor, every code zero
    qt = npquant.quantize(w, "w8a8-fp8")
    x = (rng.standard_normal((batch, 203)) * np.exp(rng.uniform(-4, 4, (batch, 1)))).astype(np.float32)
    x[0, :7] = 0.0
    bias = rng.standard_normal(131).astype(np.float32)
    y = npquant.linear(x, qt, bias=bias, backend="numba")
    assert y.flags.c_contiguous  # as every path's: a model's next matmul reads it in BLAS's order for C arrays
    assert np.array_equal(y.view(np.uint32), reference(x, qt, bias).view(np.uint32))
    assert np.array_equal(y, npquant.linear(x, qt, bias=bias, backend="numpy"))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 5, 33])
def test_threads(batch, threads):
    """Rows of the weight (or of a tile) shared out over threads: every output once, the same bits."""
    rng = np.random.default_rng(threads)
    w = rng.standard_normal((1100, 256)).astype(np.float32)  # 1100 x 256 x 5: past the one-thread threshold
    qt = npquant.quantize(w, "w8a8-fp8")
    x = rng.standard_normal((batch, 256)).astype(np.float32)
    y = kernels.numba_linear(x, qt, threads=threads)
    assert np.array_equal(y, reference(x, qt))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 24), st.integers(1, 70), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_random_codes_and_shapes(m, n, k, seed):
    """Any e4m3 codes (NaN excepted) and any shape: fp8_sums' float64 sums equal the exact ones."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(FINITE, (n, k))
    xc = rng.choice(FINITE, (m, k))
    xd = _w8a8_fp8.decode_x(xc)
    acc = np.empty((m, n), np.float64)
    _w8a8_fp8.fp8_sums(xd, codes, acc, np.zeros(1, np.int64), max(1, n // 3))
    exact = xc.view(E4M3).astype(np.float64) @ codes.view(E4M3).astype(np.float64).T
    assert np.array_equal(acc * _w8a8_fp8.UNSCALE, exact)


def test_rows_past_exact_float64_sums_are_refused():
    """Up to 2**17 columns every float64 sum is exact and the GEMM takes the tensor; past it neither the GEMM nor the
    reference can promise the exact sum, and the call says so on both backends."""
    k = npquant.linear_w8a8.MAX_FP8_K
    fits = npquant.quantize(np.ones((2, k), np.float32), "w8a8-fp8")
    assert "_w8a8_fp8" in kernels.explain(fits, 1)
    assert np.array_equal(npquant.linear(np.ones((1, k), np.float32), fits, backend="numba"),
                          npquant.linear(np.ones((1, k), np.float32), fits, backend="numpy"))
    past = npquant.quantize(np.ones((2, k + 1), np.float32), "w8a8-fp8")
    assert "_w8a8_fp8" not in kernels.explain(past, 1)
    for backend in ("numba", "numpy"):
        with pytest.raises(npquant.NpquantError,
                           match=r"in_features=131073: fp8 sums are exact in float64 up to 2\*\*17"):
            npquant.linear(np.ones((1, k + 1), np.float32), past, backend=backend)
