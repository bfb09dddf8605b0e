"""npquant.linear on W8A8 schemes: x quantized per token inside the call, the numpy backend equal to an independent
integer reference, the numba backend's int8 and fp8 GEMMs bit-equal to it at every batch and on every path, and
prepare's layout holding the tensor bit for bit."""

import weakref

import ml_dtypes
import numpy as np
import pytest

import npquant
from npquant import NpquantError, linear, prepare, quantize
from npquant.prepared import PreparedW8A8

BATCHES = [1, 2, 8, 17, 128]


def weight(shape=(130, 203), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-2, 2, (shape[0], 1)))
    return w.astype(np.float32)


def activations(m, k, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, (m, 1)))
    x[0, : min(k, 3)] = 0.0  # a token with zeros in it
    return x.astype(np.float32)


def int8_reference(x, qt):
    """float32 (M, O), written apart from npquant: vLLM's int8 rule per token (scale = absmax / 127, codes =
    rint(x * (127 / absmax)) clipped, all in float32), integer sums in int64 by einsum, then x_scale * (w_scale *
    float32(acc)) in float32, in that order."""
    x = x.astype(np.float32)
    absmax = np.abs(x).max(axis=1)
    x_scale = absmax / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.float32(127) / absmax
        q = np.rint(x * inv[:, None])
    q = np.clip(np.nan_to_num(q, nan=0.0), -128, 127).astype(np.int64)
    acc = np.einsum("mk,nk->mn", q, qt.codes.astype(np.int64))
    w_scale = qt.scale.astype(np.float32).reshape(-1)
    return x_scale[:, None] * (w_scale[None, :] * acc.astype(np.float32))


def fp8_reference(x, qt):
    """float32 (M, O): vLLM's fp8 rule per token (scale = max(absmax / 448, 1 / 229376), codes = e4m3(x / scale)),
    products summed exactly in float64 (module docstring of npquant.linear_w8a8: exact below 2**17 columns), rounded
    once to float32, then the scales as for int8."""
    x = x.astype(np.float32)
    x_scale = np.maximum(np.abs(x).max(axis=1) / np.float32(448), np.float32(1) / np.float32(448 * 512))
    q = np.clip(x / x_scale[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    acc = (q @ qt.codes.astype(np.float64).T).astype(np.float32)
    w_scale = qt.scale.astype(np.float32).reshape(-1)
    return x_scale[:, None] * (w_scale[None, :] * acc)


@pytest.mark.parametrize("batch", BATCHES)
def test_numpy_backend_is_the_independent_reference(batch):
    w = weight()
    x = activations(batch, w.shape[1])
    qt, qf = quantize(w, "w8a8-int8"), quantize(w, "w8a8-fp8")
    assert np.array_equal(linear(x, qt, backend="numpy"), int8_reference(x, qt))
    assert np.array_equal(linear(x, qf, backend="numpy"), fp8_reference(x, qf))
    # Not the weight-only product: x is quantized. Bound: each token's codes are within half a step
    # (absmax / 254) of x, so |y - x @ W_hat.T| <= (absmax / 254) * sum |W_hat| plus float32 roundings.
    w_hat = qt.dequantize().astype(np.float64)
    exact = x.astype(np.float64) @ w_hat.T
    step = np.abs(x).max(axis=1, keepdims=True) / 254 * np.abs(w_hat).sum(axis=1)[None, :]
    assert np.all(np.abs(linear(x, qt, backend="numpy") - exact) <= step * 1.001 + 1e-5 * np.abs(exact) + 1e-30)


def test_bias_and_leading_axes_and_input_dtypes():
    w = weight((70, 96))
    qt = quantize(w, "w8a8-int8")
    bias = np.random.default_rng(3).standard_normal(70).astype(np.float32)
    x = activations(6, 96).reshape(2, 3, 96)
    for backend in ("numpy", "numba"):
        y = linear(x, qt, bias=bias, backend=backend)
        assert y.shape == (2, 3, 70)
        assert np.array_equal(y, (int8_reference(x.reshape(6, 96), qt) + bias).reshape(2, 3, 70))  # bias last
        for dtype in (np.float16, ml_dtypes.bfloat16, np.float64):  # converted to float32 first
            xd = x.astype(dtype)
            assert np.array_equal(linear(xd, qt, backend=backend),
                                  int8_reference(xd.astype(np.float32).reshape(6, 96), qt).reshape(2, 3, 70))


pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")
from npquant import kernels  # noqa: E402
from npquant.kernels import _w8a8, _w8a8_core  # noqa: E402

PATHS = [p for p in _w8a8.PATHS if _w8a8.int8_path(p) == p]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Every int8 GEMM path numba's target runs, forced under npquant.linear."""
    real = _w8a8.int8_path
    monkeypatch.setattr(_w8a8, "int8_path", lambda p=None: real(request.param))
    return request.param


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", [(130, 203), (64, 256), (3, 4)])
def test_numba_is_bit_equal_to_numpy_on_every_path(batch, shape, path):
    w = weight(shape, seed=batch)
    qt = quantize(w, "w8a8-int8")
    p = prepare(qt)
    assert isinstance(p, PreparedW8A8)
    x = activations(batch, shape[1], seed=batch + 7)
    ref = linear(x, qt, backend="numpy")
    for t in (qt, p):
        got = linear(x, t, backend="numba")
        assert got.dtype == np.float32 and np.array_equal(got, ref), (type(t).__name__, path)
        assert np.array_equal(linear(x, t, backend="numpy"), ref)


def test_large_layer_threads_bit_equal():
    """A layer past the one-thread threshold (4M multiply-adds): the GEMM on several threads, still bit-equal."""
    w = weight((1100, 512), seed=5)
    qt = quantize(w, "w8a8-int8")
    x = activations(17, 512, seed=6)
    assert np.array_equal(linear(x, prepare(qt), backend="numba"), linear(x, qt, backend="numpy"))


@pytest.mark.parametrize("batch", BATCHES)
def test_fp8_kernel_is_the_independent_reference(batch):
    """numba's fp8 GEMM (exact float64 sums, a pass over the codes up to 16 tokens, tiles and BLAS beyond) gives the
    reference's bits; fp8 has no prepared layout."""
    qf = quantize(weight(), "w8a8-fp8")
    assert prepare(qf) is qf
    x = activations(batch, 203)
    assert np.array_equal(linear(x, qf, backend="numba"), fp8_reference(x, qf))
    line = kernels.explain(qf, batch)
    assert "_w8a8_fp8" in line and "w8a8_reference" not in line


def test_prepare_keeps_the_tensor_and_is_the_kernels_layout():
    qt = quantize(weight((130, 203)), "w8a8-int8")
    p = prepare(qt)
    packed, corr = _w8a8_core.pack_weight(qt.codes)
    assert np.array_equal(p.packed, packed) and np.array_equal(p.corr, corr)
    back = p.quantized()
    assert back.scheme == qt.scheme and back.codes.tobytes() == qt.codes.tobytes()
    assert back.scale.dtype == qt.scale.dtype and back.scale.tobytes() == qt.scale.tobytes()
    assert np.array_equal(p.dequantize(), qt.dequantize())
    assert p.nbytes == packed.nbytes + corr.nbytes + 4 * 192
    with pytest.raises(NpquantError, match="PreparedW8A8 holds w8a8-int8 weights"):
        PreparedW8A8(p.packed, p.corr, p.w_scale, p.shape, npquant.get_scheme("w8-channel"))
    with pytest.raises(NpquantError, match=r"corr must be C-contiguous int32 \(192,\)"):
        PreparedW8A8(p.packed, p.corr[:64], p.w_scale, p.shape, qt.scheme)


def test_explain_names_the_instruction_path():
    qt = quantize(weight((64, 128)), "w8a8-int8")
    for t in (qt, prepare(qt)):
        line = kernels.explain(t, 5)
        assert f"_w8a8.w8a8_int8_linear on the {_w8a8.int8_path()} path" in line and "batch 1+" in line


def test_a_tensor_not_prepared_gets_the_layout_once_and_drops_it_with_itself():
    qt = quantize(weight((64, 128)), "w8a8-int8")
    x = activations(4, 128)
    linear(x, qt, backend="numba")
    first = kernels._w8a8_layout(qt)
    linear(x, qt, backend="numba")
    assert kernels._w8a8_layout(qt) is first and isinstance(first, PreparedW8A8)
    key, ref = id(qt), weakref.ref(qt)
    del qt
    assert ref() is None and key not in kernels._W8A8_LAYOUTS


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("preset", ["w8a8-int8", "w8a8-fp8"])
def test_nonfinite_x_is_refused(backend, preset):
    qt = quantize(weight((64, 128)), preset)
    x = activations(3, 128)
    x[1, 5] = np.nan
    with pytest.raises(NpquantError, match="x"):
        linear(x, qt, backend=backend)


@pytest.mark.parametrize("preset", ["w8a8-int8", "w8a8-fp8"])
def test_a_decoder_runs_w8a8_alike_on_both_backends(preset):
    """A Qwen3 test model with every linear W8A8: the numba forward's logits are the numpy forward's, bit for bit
    (the linears are bit-equal; the rest of this forward is the same numpy code on both), and differ from the
    float model's by the quantization (more than weight-only int8's)."""
    from test_causal_lm import load

    from npquant.models.causal_lm import CausalLM
    from npquant.models.causal_lm_config import CausalLMConfig

    config, weights, ref = load("qwen3")
    names = CausalLMConfig.from_json(config).linear_names()
    qts = {n: quantize(weights[n], preset) for n in names}
    got = CausalLM(config, weights, quantized=qts, backend="numba").logits(ref["token_ids"])
    want = CausalLM(config, weights, quantized=qts, backend="numpy").logits(ref["token_ids"])
    assert np.array_equal(got, want)
    f32 = CausalLM(config, weights).logits(ref["token_ids"])
    w8 = CausalLM(config, weights, quantized={n: quantize(weights[n], "w8-channel") for n in names},
                  backend="numpy").logits(ref["token_ids"])
    assert np.abs(want - f32).max() > np.abs(w8 - f32).max()
