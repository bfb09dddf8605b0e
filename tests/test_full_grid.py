"""The full symmetric int grid (codes [-2**(b-1), 2**(b-1) - 1]) through packing, prepare and every kernel route.

Each code of int2 to int8, -2**(b-1) included (int4's -8 is the stored nibble
0, int8's -128 the byte 0x80), is packed, unpacked, prepared and multiplied
by every kernel that reads symmetric int codes, at every batch size and in
both layouts, and compared bit for bit with the independent float64
reference (tests/reference.py). The kernels' sums are made exact by ``x``:
each row of ``x`` is one-hot, so ``y[m] = W_hat[:, c_m]``, one product
``q * scale`` rounded once to float32 and otherwise sums of zeros, whatever
the summation order, the table lookups, the 16-times nibbles or the integer
dot products (``q * 2**29`` in int64 times the scale in float64, rounded
once) do.
"""

import numpy as np
import pytest

from npquant import QuantizedTensor, Scheme, linear, prepare, quantize
from reference import reference_dequantize, reference_pack

pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")
from npquant import kernels  # noqa: E402

O, I = 256, 256  # every column holds every int8 code (O >= 256), every row too


def every_code(bits: int) -> np.ndarray:
    """int64 (O, I) codes: row o, column i holds level (o + 3 i) mod 2**b of [-2**(b-1), 2**(b-1) - 1].

    3 is odd, so each row and each column meets every code (O, I >= 2**b).
    """
    levels = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))
    o, i = np.arange(O)[:, None], np.arange(I)[None, :]
    return levels[(o + 3 * i) % levels.size]


def tensor(bits: int, granularity: str, group_size: int | None, seed: int = 0) -> QuantizedTensor:
    """Codes from :func:`every_code` and positive float32 scales over [2**-8, 4]: products and sums stay normal."""
    scheme = Scheme("int", bits, granularity, group_size)
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.uniform(-8, 2, scheme.scale_shape((O, I)))).astype(np.float32)
    return QuantizedTensor.from_int_codes(every_code(bits), scale, None, scheme)


def reference_weight(qt: QuantizedTensor) -> np.ndarray:
    s = qt.scheme
    return reference_dequantize(every_code(s.bits), qt.scale.astype(np.float64).ravel().tolist(), None, qt.shape,
                                "int", s.granularity, s.group_size)


CASES = [(b, "group", 128) for b in range(2, 9)] + [(b, "channel", None) for b in range(2, 9)] + [
    (4, "group", 32), (4, "group", 64), (4, "group", 16), (4, "group", 8), (8, "group", 64), (8, "group", 32),
    (3, "group", 32), (2, "group", 64)]


@pytest.mark.parametrize("bits, granularity, group_size", CASES)
def test_every_code_packs_unpacks_and_dequantizes_exactly(bits, granularity, group_size):
    qt = tensor(bits, granularity, group_size)
    assert qt.scheme.qmin == -(2 ** (bits - 1))
    q = every_code(bits)
    np.testing.assert_array_equal(qt.int_codes(), q)
    if qt.scheme.packed:  # stored value q + 2**(b-1): int4's -8 is nibble 0
        for r in (0, 1, O - 1):
            assert qt.codes[r].tolist() == reference_pack(q[r] + 2 ** (bits - 1), bits), r
    else:  # int8: two's complement bytes, -128 is 0x80
        assert qt.codes.view(np.uint8)[q == -128].tolist() == [0x80] * int((q == -128).sum())
    ref = reference_weight(qt)
    np.testing.assert_array_equal(qt.dequantize(), ref)
    p = prepare(qt)
    np.testing.assert_array_equal(p.dequantize(), ref)
    # The same codes back through the engine: a weight on the grid's points, but -(2**(b-1) - 1/2) where the code
    # is -2**(b-1) (rounded half to even to it): absmax / (2**(b-1) - 1/2), each row's scale, is exactly 1.
    w = q[:4].astype(np.float32)
    w[w == -(2 ** (bits - 1))] = -(2 ** (bits - 1) - 0.5)
    again = quantize(w, Scheme("int", bits, "channel"))
    assert np.all(again.scale == 1.0)
    np.testing.assert_array_equal(again.int_codes(), q[:4])


def one_hot(batch: int, start: int) -> tuple[np.ndarray, list[int]]:
    """float32 (batch, I) rows that pick columns ``start, start + 37, ...`` (mod I), and those columns."""
    cols = [(start + 37 * m) % I for m in range(batch)]
    x = np.zeros((batch, I), np.float32)
    x[np.arange(batch), cols] = 1.0
    return x, cols


@pytest.fixture(params=[True, False], ids=["lut+vnni", "portable"])
def switches(request, monkeypatch):
    """The table-lookup and VNNI kernels on (where the CPU has them) or off: both batch-1 paths run."""
    monkeypatch.setattr(kernels, "USE_LUT", request.param)
    monkeypatch.setattr(kernels, "USE_VNNI", request.param)
    return request.param


@pytest.mark.parametrize("bits, granularity, group_size", CASES)
def test_every_route_multiplies_every_code_exactly(bits, granularity, group_size, switches):
    qt = tensor(bits, granularity, group_size, seed=bits)
    ref = reference_weight(qt)
    p = prepare(qt)
    layouts = [qt] + ([p] if p is not qt else [])
    reached = set()
    for t in layouts:
        for batch in (1, 2, 16, 17, 128, 129):
            route = kernels._route(t, batch)
            reached.add(route.kernel)
            # batch 1 calls cover 8 columns; the larger batches cover hundreds: every code in every row is met
            for start in range(8 if batch == 1 else 1):
                x, cols = one_hot(batch, start)
                y = kernels.numba_linear(x, t)
                np.testing.assert_array_equal(y, ref[:, cols].T, err_msg=f"{route.kernel} batch {batch}")
                assert y.dtype == np.float32
    if switches and kernels.has_avx512() and bits == 4 and granularity == "group" and group_size >= 16:
        assert {"_lut.gemv_lut_rows", "_lut.gemv_lut_blocks"} <= reached
    if switches and kernels.has_vnni() and bits == 8 and (granularity == "channel" or group_size % 64 == 0):
        assert "_vnni.gemv_int8_exact" in reached
    if not switches and bits == 4 and granularity == "group" and group_size % 2 == 0:
        assert {"_gemv.gemv_int4", "_gemv.gemv_int4_blocks"} <= reached


def test_every_int_route_of_the_table_is_reached(monkeypatch):
    # Each row of ROUTES that a tensor without cut blocks can take, met by some full-grid int tensor above, with the
    # table-lookup and VNNI kernels on and off (as test_every_route_multiplies_every_code_exactly runs them).
    reached = set()
    for on in (True, False):
        monkeypatch.setattr(kernels, "USE_LUT", on)
        monkeypatch.setattr(kernels, "USE_VNNI", on)
        for bits, granularity, group_size in CASES:
            qt = tensor(bits, granularity, group_size)
            p = prepare(qt)
            for t in [qt] + ([p] if p is not qt else []):
                for batch in (1, 2, 17, 129):
                    reached.add(kernels._choose(t, batch).kernel)
    monkeypatch.undo()
    rows = [r.kernel for r in kernels.ROUTES
            if r.kernel != "npquant.linear_numpy.numpy_linear" and (r.available is None or r.available())
            and "w8a8" not in r.kernel]  # the W8A8 rows take schemes with activations: test_w8a8_linear.py
    assert [k for k in rows if k not in reached] == []


def test_numpy_linear_takes_every_code():
    # The numpy backend (the reference linear) on the same tensors: float32 sums of one-hot rows are exact too.
    for bits in (2, 4, 8):
        qt = tensor(bits, "group", 32)
        x, cols = one_hot(64, 5)
        np.testing.assert_array_equal(linear(x, qt, backend="numpy"), reference_weight(qt)[:, cols].T)


def test_the_specs_packing_check_values():
    # shared/spec/compressed-tensors-modern-formats.md e.1: int4 codes -8..7 pack to 0x76543210, 0xfedcba98;
    # int8 [-128, -1, 0, 127] to 0xff807f00 (W8A16's pack-quantized words, offset 128).
    from npquant.checkpoints.writer import _layer_arrays

    scale = np.ones((1, 1), np.float32)
    qt4 = QuantizedTensor.from_int_codes(np.arange(-8, 8)[None, :], scale, None, Scheme("int", 4, "channel"))
    words = _layer_arrays("m", qt4)["m.weight_packed"].view(np.uint32)[0].tolist()
    assert words == [0x76543210, 0xFEDCBA98]
    qt8 = QuantizedTensor.from_int_codes(np.array([[-128, -1, 0, 127]]), scale, None, Scheme("int", 8, "channel"))
    assert _layer_arrays("m", qt8)["m.weight_packed"].view(np.uint32)[0].tolist() == [0xFF807F00]
