"""The kernel choice: one table (npquant.kernels.ROUTES), every row reached, every tensor and batch covered, and
explain() saying what a call runs."""

import numpy as np
import pytest

from npquant import NpquantError, Scheme, linear, prepare, quantize

pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")
from npquant import kernels  # noqa: E402
from npquant.kernels import _target  # noqa: E402

PRESETS = ["w8-tensor", "w8-channel", "w8-g128", "w4-tensor", "w4-channel", "w4-g128", "w4-g64", "w4-g32",
           "w4-g128-asym", "w3-g128", "w2-g64", "fp8-tensor", "fp8-channel", "fp8-block", "nvfp4", "mxfp4", "mxfp6",
           "mxfp8", "w8a8-int8", "w8a8-fp8"]


def weight(shape=(128, 256)):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def tensors():
    """Every preset in the checkpoint layout and, where prepare takes it, the prepared one; int4 in blocks the
    table lookup does not take; a weight whose blocks are cut at its edge; and W8A8 rows too long for the int8
    GEMM's int32 sums."""
    out = []
    for name in PRESETS:
        qt = quantize(weight(), name)
        out.append((name, qt))
        p = prepare(qt)
        if p is not qt:
            out.append((f"{name} prepared", p))
    out.append(("int4 in groups of 8", quantize(weight(), Scheme("int", 4, "group", 8))))  # no table lookup
    out.append(("cut blocks", quantize(weight((200, 256)), "fp8-block")))
    out.append(("w8a8 rows past int32 sums", quantize(weight((4, 131080)), "w8a8-int8")))  # the W8A8 reference
    return out


@pytest.fixture
def avx2(monkeypatch):
    """numba's target as Zen 2 (no AVX-512) for the choice; nothing is compiled for it here."""
    monkeypatch.setattr(kernels._target, "target_features", lambda: _target.features_of("znver2"))
    _target.has_avx512.cache_clear()
    _target.has_vnni.cache_clear()
    yield
    monkeypatch.undo()
    _target.has_avx512.cache_clear()
    _target.has_vnni.cache_clear()


# 1/2, 4/5, 24/25, 32/33, 48/49, 96/97, 128/129: the small-batch kernels' last batches (checkpoint: batch 1 alone,
# MXFP4, 4-bit and one-byte codes; prepared: fp4 and the rest with AVX-512, one-byte and 4-bit codes without) and
# the tiles' first, with 16, 64, 80 and 81 between; 128 and 129 also the prepared tiles' two sizes
@pytest.mark.parametrize("batch", [1, 2, 4, 5, 16, 24, 25, 32, 33, 48, 49, 64, 80, 81, 96, 97, 128, 129])
def test_every_tensor_and_batch_has_one_route_and_runs_it(batch):
    for name, t in tensors():
        route = kernels._choose(t, batch)
        lo, hi = kernels.batch_rows(route, t)
        assert lo <= batch <= hi and route.layout == ("prepared" if "prepared" in name else "checkpoint")
        assert route.available is None or route.available()
        assert kernels._route(t, batch) is route  # the cached choice is the table's
        x = np.random.default_rng(batch).standard_normal((batch, t.shape[1])).astype(np.float32)
        ref = linear(x, t.quantized() if hasattr(t, "quantized") else t, backend="numpy")
        got = kernels.numba_linear(x, t)
        # Float32 sums of 256 products along either path (the kernels' block sums and scalings add fewer than 40
        # roundings), so within 2 * 300 * 2**-24 of |x| @ |W_hat|.T of each other.
        w_abs = np.abs((t.quantized() if hasattr(t, "quantized") else t).dequantize())
        assert np.all(np.abs(got - ref) <= 2 * 300 * 2.0**-24 * (np.abs(x) @ w_abs.T)), (name, batch, route.kernel)


def test_every_row_of_the_table_is_reached():
    reached = {kernels._choose(t, b) for _, t in tensors() for b in (1, 8, 200)}
    missing = [r.kernel for r in kernels.ROUTES if r not in reached and (r.available is None or r.available())]
    assert not missing, f"rows no tensor reaches: {missing}"


def test_rows_that_need_avx512_are_passed_over_without_it(avx2):
    assert not kernels.has_avx512()
    for _, t in tensors():
        route = kernels._choose(t, 1)
        assert not route.needs and "_lut" not in route.kernel and "_vnni" not in route.kernel
        assert "needs" not in kernels.explain(t, 1)


def test_the_choice_follows_the_switches(monkeypatch):
    qt = quantize(weight(), "w4-g128")
    if not kernels.has_avx512():
        pytest.skip("numba's target has no AVX-512: the table-lookup row is never taken here")
    assert kernels._route(qt, 1).kernel == "_lut.gemv_lut_rows"
    monkeypatch.setattr(kernels, "USE_LUT", False)
    assert kernels._route(qt, 1).kernel == "_gemv.gemv_int4"  # the same tensor, chosen again


def test_small_batches_end_where_measured():
    # kernels.small_m's measured crossovers: the checkpoint layout's small-batch kernel to 32 rows for one-byte
    # codes, 24 for byte-aligned 4-bit ones, 4 for MXFP4, batch 1 alone for the rest; the prepared layout's to 32
    # where scales come every 16 or 32 columns (fp4), else to 48 with AVX-512 and, without, 96 for one-byte codes
    # and 128 for 4-bit ones.
    avx512 = kernels.has_avx512()
    for name, expect in [("w8-channel", 32), ("w8-g128", 32), ("fp8-block", 32), ("w4-g128", 24),
                         ("w4-g128-asym", 24), ("mxfp4", 4), ("nvfp4", 1), ("mxfp6", 1), ("w3-g128", 1),
                         ("w2-g64", 1), ("w8-channel prepared", 48 if avx512 else 96),
                         ("w4-g128 prepared", 48 if avx512 else 128), ("fp8-channel prepared", 48 if avx512 else 96),
                         ("w4-g32 prepared", 32),
                         ("nvfp4 prepared", 32), ("mxfp4 prepared", 32)]:
        t = dict(tensors())[name]
        assert kernels.small_m(t) == expect, name
        large = kernels._choose(t, expect + 1)
        assert "_tiles" in large.kernel and kernels.batch_rows(large, t)[0] == expect + 1, (name, large.kernel)
        if expect > 1:  # batch 1 has kernels of its own
            small = kernels._choose(t, expect)
            assert "_small_m" in small.kernel and kernels.batch_rows(small, t) == (1, expect), (name, small.kernel)


def test_small_batches_without_avx512(avx2):
    p = prepare(quantize(weight(), "w8-channel"))
    assert kernels.small_m(p) == 96 and "_small_m" in kernels._choose(p, 96).kernel
    assert "_tiles" in kernels._choose(p, 97).kernel
    p = prepare(quantize(weight(), "w4-g128"))
    assert kernels.small_m(p) == 128 and "_small_m" in kernels._choose(p, 128).kernel
    assert "_tiles" in kernels._choose(p, 129).kernel
    assert kernels.small_m(prepare(quantize(weight(), "nvfp4"))) == 32


def test_explain_names_the_kernel_and_why():
    qt = quantize(weight(), "w8-channel")
    line = kernels.explain(qt, 128)
    assert line.startswith("checkpoint layout, batch 33+, any codes: _tiles.dequantize_rows_16 + OpenBLAS")
    assert f"prepared layout, batch 1-{kernels.small_m(prepare(qt))}" in kernels.explain(prepare(qt), 3)
    assert "_small_m.gemm_small_m_bytes_blocks" in kernels.explain(prepare(qt), 3)
    cut = quantize(weight((200, 256)), "fp8-block")
    assert "numpy_linear" in kernels.explain(cut, 1)
    for bad in (0, -1, 1.5, True, "8"):
        with pytest.raises(NpquantError, match="batch must be a positive integer"):
            kernels.explain(qt, bad)
