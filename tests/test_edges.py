"""What users hit and random weights miss: exact ties, many row chunks, batched bias.

Each test here was written against a planted bug that the rest of the suite
let through (rounding half away from zero, a NaN check on the first chunk
only, an fp8 scan that stops early, a bias dropped for batched ``x``); see
the comments for the bug each one catches.
"""

import importlib

import numpy as np
import pytest

import npquant
from npquant import NpquantError, QuantizedTensor, Scheme, linear, prepare, quantize
from npquant.prepared import PreparedTensor, preparable
from reference import FLOAT_MAX, fp8_finite_table, fp8_round
from test_linear import gamma

ENGINE = importlib.import_module("npquant.quantize")  # the module (npquant.quantize is the function)
TENSOR = importlib.import_module("npquant.tensor")  # QuantizedTensor and its checks
BACKENDS = npquant.available_backends()


def half_even(v: float) -> int:
    """Python's own round: half to even, written nowhere in npquant."""
    return round(v)


# --- ties ------------------------------------------------------------------------------------
def symmetric_tie_block(qmax: int, s: float, negative_max: bool, full: bool = False) -> list[float]:
    """A block whose scale is exactly ``s`` and whose other values sit exactly on ``k + 1/2`` steps.

    ``s`` is a power of two, so ``qmax * s`` and every ``(j + 1/2) * s`` are
    exact float32 values, ``absmax / qmax`` is exactly ``s`` and ``w / s`` is
    exactly ``j + 1/2``: every code but the first is a tie, from the clip
    edges ``+-(qmax - 1/2)`` to ``+-1/2``. On the full grid (``full``) the
    block's end is ``+-(qmax + 1/2) s`` (``absmax / (qmax + 1/2)`` is exactly
    ``s``): a tie itself, which rounds to ``-(qmax + 1)`` or, clamped, ``qmax``.
    """
    ties = [(j + 0.5) * s for j in range(-qmax, qmax)]
    end = qmax + 0.5 if full else qmax
    return [(-end if negative_max else end) * s] + ties


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("grid", ["full", "restricted"])
def test_symmetric_ties_round_half_to_even(backend, bits, granularity, grid):
    # Catches round-half-up or half-away-from-zero in the numpy engine and in
    # the numba quantizer (the default path for these schemes), and on the full
    # grid a clip to -qmax where -(qmax + 1) belongs.
    qmax = 2 ** (bits - 1) - 1
    full = grid == "full"
    qmin = -(qmax + 1) if full else -qmax
    width = 2 * qmax + 1
    rows = []
    for r in range(6):
        blocks = [symmetric_tie_block(qmax, 2.0 ** -(r + g + 2), (r + g) % 2 == 1, full) for g in range(3)]
        rows.append([v for b in blocks for v in b])
    w = np.array(rows, np.float32)  # (6, 3 * width)
    scheme = Scheme("int", bits, granularity, width if granularity == "group" else None, grid=grid)
    if granularity == "channel":
        # One scale per row: the largest block's; its ties stay ties, the other blocks' values
        # are (j + 1/2) * s / 2**g of that step, ties only for the first block: keep that block alone.
        w = w[:, :width]
    qt = quantize(w, scheme, backend=backend)
    q = qt.int_codes().astype(np.int64)
    seen = set()
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // width):
            block = w[r, g * width:(g + 1) * width].astype(np.float64)
            s = abs(block[0]) / (qmax + 0.5 if full else qmax)
            assert float(qt.scale[r, g]) == s
            expect = [min(max(half_even(v / s), qmin), qmax) for v in block]
            assert q[r, g * width:(g + 1) * width].tolist() == expect, (r, g)
            seen.update(expect)
    assert min(seen) == qmin  # the full grid's extra code is met


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_asymmetric_codes_and_zero_points_on_ties(backend, bits):
    # Zero point z + 1/2 rounds to the even neighbour; codes (j + 1/2) too.
    # lo = -(z + 1/2) s and hi = (qmax - z - 1/2) s are exact, so
    # (hi - lo) / qmax = s exactly and -lo / s = z + 1/2 exactly.
    qmax = 2**bits - 1
    zs = sorted({0, 1, qmax // 2, qmax - 2, qmax - 1})
    width = qmax + 2
    rows = []
    for r, z in enumerate(zs):
        s = 2.0 ** -(r + 3)
        lo, hi = -(z + 0.5) * s, (qmax - z - 0.5) * s
        ties = [(j + 0.5) * s for j in range(-z - 1, qmax - z)]  # from lo to hi
        rows.append(ties + [lo, hi][: width - len(ties)])
    w = np.array(rows, np.float32)
    qt = quantize(w, Scheme("int", bits, "channel", symmetric=False), backend=backend)
    q = qt.int_codes().astype(np.int64)
    for r, z in enumerate(zs):
        s = 2.0 ** -(r + 3)
        assert float(qt.scale[r, 0]) == s
        zp = half_even(z + 0.5)
        assert int(qt.zero_point[r, 0]) == zp
        expect = [min(max(half_even(v / s) + zp, 0), qmax) for v in w[r].astype(np.float64)]
        assert q[r].tolist() == expect, r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_ties_on_every_row_and_scale(backend, dtype):
    # Every midpoint between two neighbouring fp8 values, on rows whose scale
    # is a power of two (so w / scale is the midpoint exactly): nearest even.
    finite = sorted({v for v, _ in fp8_finite_table(dtype)})
    mids = [(a + b) / 2 for a, b in zip(finite, finite[1:])]
    fmax = FLOAT_MAX[dtype]
    rows = [[fmax * 2.0**k] + [m * 2.0**k for m in mids] for k in (-6, 0, 3)]
    w = np.array(rows, np.float32)
    qt = quantize(w, Scheme(dtype, 8, "channel"), backend=backend)
    for r, k in enumerate((-6, 0, 3)):
        assert float(qt.scale[r, 0]) == 2.0**k
        expect = [fp8_round(float(v) / 2.0**k, dtype) for v in w[r]]
        np.testing.assert_array_equal(qt.codes.view(np.uint8)[r], expect)


# --- many chunks -------------------------------------------------------------------------
CHUNK_SCHEMES = ["w8-channel", "w4-g128", "w4-g128-asym", "w3-g128", "w8-tensor", "w4-tensor",
                 "fp8-channel", "fp8-tensor", Scheme("int", 4, "group", 32, scale_dtype="bfloat16")]


def chunky_weight() -> np.ndarray:
    """(2600, 256): three default chunks of 1024 rows; an outlier row and an all-zero row past the first."""
    rng = np.random.default_rng(7)
    w = (0.02 * rng.standard_normal((2600, 256))).astype(np.float32)
    w[2500] *= 100  # sets the per-tensor scale from the last chunk
    w[2200] = 0
    return w


def assert_same_quantized(a: QuantizedTensor, b: QuantizedTensor) -> None:
    np.testing.assert_array_equal(a.codes.view(np.uint8), b.codes.view(np.uint8))
    np.testing.assert_array_equal(a.scale.view(np.uint8), b.scale.view(np.uint8))
    if a.zero_point is None or b.zero_point is None:
        assert a.zero_point is None and b.zero_point is None
    else:
        np.testing.assert_array_equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", CHUNK_SCHEMES, ids=str)
def test_chunked_codes_equal_the_one_chunk_result(monkeypatch, backend, scheme):
    w = chunky_weight()
    monkeypatch.setattr(ENGINE, "_CHUNK_ELEMENTS", 1 << 30)
    whole, rel_whole, _ = npquant.quantize_measured(w, scheme, backend=backend)
    monkeypatch.undo()
    default = quantize(w, scheme, backend=backend)  # three chunks
    monkeypatch.setattr(ENGINE, "_CHUNK_ELEMENTS", 256 * 7)  # 7 rows a chunk, the last one short
    tiny, rel_tiny, _ = npquant.quantize_measured(w, scheme, backend=backend)
    assert_same_quantized(default, whole)
    assert_same_quantized(tiny, whole)
    # The same float32 squares summed in float64 in other groupings: ~1e-16 relative.
    assert rel_tiny == pytest.approx(rel_whole, rel=1e-12)
    assert not tiny.dequantize()[2200].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", ["w8-channel", "w4-g128", "w4-g128-asym", "w8-tensor", "fp8-channel"])
@pytest.mark.parametrize("row, bad", [(1500, np.inf), (2100, np.nan), (2599, -np.inf)])
@pytest.mark.parametrize("chunk", [None, 256 * 7])
def test_non_finite_rows_past_the_first_chunk_are_named(monkeypatch, backend, scheme, row, bad, chunk):
    # Catches a NaN/Inf check that only looks at the first chunk.
    if chunk is not None:
        monkeypatch.setattr(ENGINE, "_CHUNK_ELEMENTS", chunk)
    w = chunky_weight()
    w[row, 17] = bad
    with pytest.raises(NpquantError, match=rf"^layer row {row} holds NaN or Inf"):
        quantize(w, scheme, name="layer", backend=backend)
    with pytest.raises(NpquantError, match=rf"^layer row {row} holds NaN or Inf"):
        npquant.quantize_measured(w, scheme, name="layer", backend=backend)


def test_nan_row_message_on_a_big_weight():
    w = np.ones((4096, 512), np.float32)
    w[1000, 3] = np.nan
    for backend in BACKENDS:
        with pytest.raises(NpquantError, match=r"^w row 1000 holds NaN or Inf"):
            quantize(w, "w8-channel", backend=backend)


@pytest.mark.parametrize("dtype, bad", [("fp8_e4m3", 0x7F), ("fp8_e4m3", 0xFF), ("fp8_e5m2", 0x7C), ("fp8_e5m2", 0xFE)])
def test_fp8_scan_reaches_past_its_first_step(dtype, bad):
    # 4200 x 4096 codes are 16.4 MiB: one byte past the first 16 MiB step.
    # Catches a scan that stops after its first step.
    scheme = Scheme(dtype, 8, "channel")
    codes = np.zeros((4200, 4096), np.uint8)
    scale = np.ones((4200, 1), np.float32)
    good = QuantizedTensor(codes.view(TENSOR.code_numpy_dtype(scheme)), scale, None, (4200, 4096), scheme)
    prepared = prepare(good)
    codes[4199, 4095] = bad
    with pytest.raises(NpquantError, match=r"row 4199, column 4095"):
        QuantizedTensor(codes.view(TENSOR.code_numpy_dtype(scheme)), scale, None, (4200, 4096), scheme)
    p_codes = prepared.codes.copy()
    p_codes[-1, -1, 4199 % 64] = bad
    with pytest.raises(NpquantError, match=r"NaN or Inf"):
        PreparedTensor(p_codes, prepared.scale, None, prepared.shape, scheme)


@pytest.mark.parametrize("position", [0, 1000, 4095, 4096 * 3 + 5, 4096 * 10 - 1])
def test_fp8_scan_in_small_steps_finds_the_first_bad_byte(monkeypatch, position):
    monkeypatch.setattr(TENSOR, "_FP8_SCAN_BYTES", 4096)
    raw = np.zeros((10, 4096), np.uint8)
    raw.reshape(-1)[position] = 0x7F
    raw.reshape(-1)[-1] = 0xFF  # a later one
    assert TENSOR.first_nonfinite_fp8(raw, "fp8_e4m3") == position
    raw[:] = 0x7E  # 448: finite
    assert TENSOR.first_nonfinite_fp8(raw, "fp8_e4m3") is None


def test_weight_error_in_row_chunks_equals_one_chunk():
    w = chunky_weight()
    qt = quantize(w, "w4-g128")
    one = npquant.metrics.weight_error(w, qt, rows_per_chunk=w.shape[0])
    many = npquant.metrics.weight_error(w, qt, rows_per_chunk=7)
    assert many[0] == pytest.approx(one[0], rel=1e-12)


# --- linear with bias, batched ------------------------------------------------------------------
LINEAR_SCHEMES = ["w8-channel", "w8-tensor", "w4-g128", "w4-g128-asym", "w4-channel", "w3-g128", "w2-g64",
                  "fp8-channel", Scheme("fp8_e5m2", 8, "channel"), Scheme("int", 8, "group", 64, symmetric=False)]


# Each scheme plain, and prepared where prepare() has a layout for it (4-bit and one-byte codes).
LINEAR_CASES = [(s, False) for s in LINEAR_SCHEMES] + [
    (s, True) for s in LINEAR_SCHEMES if preparable(npquant.get_scheme(s), (70, 256))
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme, prepared", LINEAR_CASES, ids=lambda v: str(v) if not isinstance(v, bool) else
                         ("prepared" if v else "plain"))
@pytest.mark.parametrize("x_shape", [(1, 256), (3, 256), (17, 256), (2, 3, 256), (256,)], ids=str)
def test_linear_with_bias_against_float64(backend, scheme, prepared, x_shape):
    # Catches a bias dropped (or added twice, or broadcast wrongly) for x with more than one row.
    rng = np.random.default_rng(len(x_shape) * 100 + x_shape[0])
    w = (rng.standard_normal((70, 256)) * np.exp(rng.uniform(-2, 2, (70, 1)))).astype(np.float32)
    qt = quantize(w, scheme)
    weights = prepare(qt) if prepared else qt
    assert isinstance(weights, PreparedTensor) == prepared
    x = rng.standard_normal(x_shape).astype(np.float32)
    bias = (10 * rng.standard_normal(70)).astype(np.float32)
    y = linear(x, weights, bias=bias, backend=backend)
    assert y.dtype == np.float32 and y.shape == x_shape[:-1] + (70,)
    w64 = qt.dequantize().astype(np.float64)  # the exact weights (checked against the reference elsewhere)
    x64 = x.reshape(-1, 256).astype(np.float64)
    exact = x64 @ w64.T + bias.astype(np.float64)
    # Every path sums the 256 float32 products (one rounding each), may scale
    # a group's sum (one more), adds the partial sums, then adds the bias (one
    # more): within gamma_(I+3) (|x| @ |W|^T + |b|) of the exact value.
    bound = gamma(256 + 3) * (np.abs(x64) @ np.abs(w64).T + np.abs(bias))
    err = np.abs(y.reshape(-1, 70).astype(np.float64) - exact)
    assert np.all(err <= bound), float((err / bound).max())
