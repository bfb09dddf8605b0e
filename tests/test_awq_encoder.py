"""AWQ on the sentence encoder: where its scales fold, that folding keeps the float model, and the sequential
methods ("awq", "awq+gptq") on a tiny BERT made here (tests/test_calibrated.py's), then on all-MiniLM-L6-v2."""

import json

import numpy as np
import pytest

import npquant
from npquant import NpquantError, QuantizedTensor
from npquant.calibrate.awq import (
    InputStats,
    fold_into_norm,
    scale_columns,
    search_scale,
)
from npquant.models.awq_bert import fold_scale

pytest.importorskip("tokenizers", reason="the sentence encoder needs tokenizers (npquant[models])")

from test_calibrated import CONFIG, LAYERS, texts, tiny_tensors, tiny_tokenizer

O_PROJ = "attention.output.dense"

# Folding is exact in real numbers; in float32 each folded tensor is rounded once more (w / s, b / s, w * s:
# 2**-24 relative each), so every context channel and attention-output term moves by a few 2**-24 relative.
# Dot products of 64-384 terms and the LayerNorms (dividing by a standard deviation that can be a tenth of
# the terms) amplify that by at most ~10**2: 2**-24 * 4 * 100 = 2.4e-5 bounds the change of a unit-norm
# embedding's entries; 3e-5 is that bound. Folding into a LayerNorm that is also a residual moves them by
# more than 1e-3 (measured below), 30x above it.
FOLD_ATOL = 3e-5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("tiny-bert-awq")
    tensors = tiny_tensors()
    for i in range(LAYERS):  # a few loud value channels, as real attention contexts have: AWQ has work to do
        p = f"encoder.layer.{i}.attention.self.value."
        tensors[p + "weight"][:4] *= 8
        tensors[p + "bias"][:4] *= 8
    save_file({f"bert.{k}" if k.startswith("encoder") else k: v for k, v in tensors.items()},
              str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(CONFIG))
    tiny_tokenizer().save(str(root / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    from npquant.models import SentenceEncoder

    return SentenceEncoder.from_pretrained(tiny_dir, backend="numpy")


def folded_copy(enc, scales):
    """A float copy of ``enc`` with ``scales[i]`` folded into block i's attention output (value rows)."""
    tensors = dict(enc.tensors)
    for i, s in scales.items():
        tensors.update(fold_scale(tensors, i, O_PROJ, s))
    return type(enc)(enc.config, tensors, enc.tokenizer, enc.max_seq_length, enc.backend)


def test_folding_the_attention_output_scale_keeps_the_float_model(encoder):
    rng = np.random.default_rng(0)
    sentences = texts(30, seed=9)
    scales = {i: rng.lognormal(0, 1.0, CONFIG["hidden_size"]).astype(np.float32) for i in range(LAYERS)}
    before = {k: v.copy() for k, v in encoder.tensors.items()}
    base = encoder.encode(sentences)
    folded = folded_copy(encoder, scales)
    assert np.abs(folded.encode(sentences) - base).max() <= FOLD_ATOL
    p = "encoder.layer.0."
    assert not np.array_equal(folded.tensors[p + "attention.self.value.bias"], base)  # something did change
    for k, v in before.items():
        np.testing.assert_array_equal(encoder.tensors[k], v)  # the input mapping is left alone

    # Folding into a LayerNorm whose output is also the residual (post-LN BERT) is not the same model.
    s = scales[0]
    t = dict(encoder.tensors)
    t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"] = fold_into_norm(
        t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], s)
    for m in ("query", "key", "value"):
        t[p + f"attention.self.{m}.weight"] = scale_columns(t[p + f"attention.self.{m}.weight"], s)
    wrong = type(encoder)(encoder.config, t, encoder.tokenizer, encoder.max_seq_length, "numpy")
    assert np.abs(wrong.encode(sentences) - base).max() > 1e-3
    with pytest.raises(NpquantError, match=r"also the block's residual") as err:
        fold_scale(encoder.tensors, 0, "attention.self.query", s)
    assert "\n" not in str(err.value)


def test_awq_scales_the_attention_output_on_inputs_from_the_quantized_layers_before_it(encoder):
    calib = texts(40, seed=1)
    q = encoder.quantized("w4-g32", method="awq", calibration=calib)
    names = encoder.linear_names()
    assert all(isinstance(q.tensors[n], QuantizedTensor) for n in names)
    assert [r["name"] for r in q.layer_report] == names
    for r in q.layer_report:
        assert (r["alpha"] is not None) == (O_PROJ in r["name"])
        # With a = 0 in the grid the chosen scale is never worse than RTN on the calibration inputs. The two
        # losses are float64 traces of the same matrices in two forms: equal to ~1e-12 relative.
        assert r["loss"] <= r["rtn_loss"] * (1 + 1e-9)
    # Block 0 by hand: query/key/value rounded to nearest, the context gathered, AWQ's search run again.
    p = "encoder.layer.0."
    half = dict(encoder.tensors)
    for m in ("query", "key", "value"):
        half[p + f"attention.self.{m}.weight"] = npquant.quantize(half[p + f"attention.self.{m}.weight"], "w4-g32")
    part = type(encoder)(encoder.config, half, encoder.tokenizer, backend="numpy")
    stats = InputStats(CONFIG["hidden_size"])
    for idx in part.batches(calib, 32):
        ids, mask = part.tokenize([calib[j] for j in idx])
        x, bias = part._embed(ids, mask)
        part._block(0, x, bias, lambda module, inp, mask=mask: module == p + O_PROJ and stats.add(inp, mask))
    w_o = encoder.tensors[p + O_PROJ + ".weight"]
    want = search_scale([w_o], stats.abs_mean(), stats.hessian(), "w4-g32")
    row = next(r for r in q.layer_report if r["name"] == p + O_PROJ + ".weight")
    assert row["alpha"] == want.alpha and want.alpha > 0
    np.testing.assert_array_equal(q.tensors[p + "attention.self.value.bias"],
                                  encoder.tensors[p + "attention.self.value.bias"] / want.scale)
    expect = npquant.quantize(w_o * want.scale, "w4-g32")
    np.testing.assert_array_equal(q.tensors[p + O_PROJ + ".weight"].codes, expect.codes)
    np.testing.assert_array_equal(q.tensors[p + O_PROJ + ".weight"].scale, expect.scale)
    expect_v = npquant.quantize(encoder.tensors[p + "attention.self.value.weight"] / want.scale[:, None], "w4-g32")
    np.testing.assert_array_equal(q.tensors[p + "attention.self.value.weight"].codes, expect_v.codes)


def test_awq_gptq_model_objective_targets_the_value_quantized_again(encoder, model_target_calls):
    # Value is quantized before the attention output's scale folds into its rows; quantized again, it too must
    # round its float target (one model_target call), not its folded weight.
    from npquant.models import calibrated

    calls = model_target_calls(calibrated)
    q = encoder.quantized("w4-g32", method="awq+gptq", calibration=texts(40, seed=1), objective="model")
    scaled = [r for r in q.layer_report if r["alpha"]]
    assert scaled  # the test needs a value quantized again
    assert len(calls) == len(q.layer_report) + len(scaled)


def test_awq_gptq_is_deterministic_and_beats_rtn_on_unseen_text(encoder):
    calib, held = texts(60, seed=2), texts(40, seed=3)
    w3g32 = npquant.Scheme("int", 3, "group", 32)
    a = encoder.quantized(w3g32, method="awq+gptq", calibration=calib)
    b = encoder.quantized(w3g32, method="awq+gptq", calibration=calib)
    for name in encoder.linear_names():
        np.testing.assert_array_equal(a.tensors[name].codes, b.tensors[name].codes)
    assert all(r["gptq_loss"] == r["loss"] < r["rtn_loss"] for r in a.layer_report)
    base = encoder.encode(held)
    cos = lambda e: float(np.mean(np.sum(e * base, axis=1)))
    assert cos(a.encode(held)) > cos(encoder.quantized(w3g32).encode(held))
    # What a checkpoint writer takes: the quantized weights, and the float tensors the folds replaced.
    from npquant.models.calibrated import changed_tensors

    quantized, replaced = changed_tensors(encoder.tensors, a.tensors)
    assert sorted(quantized) == sorted(encoder.linear_names())
    scaled = [r["name"].replace(O_PROJ, "attention.self.value").replace(".weight", ".bias")
              for r in a.layer_report if r["alpha"]]
    assert scaled and sorted(replaced) == sorted(scaled)
    assert all(v.dtype == np.float32 for v in replaced.values())


def test_bad_calls_are_one_line(encoder):
    from npquant.models.calibrated import calibrated_tensors

    for call, message in [
        (lambda: encoder.quantized("w4-g32", method="AWQ"), "method='AWQ' is not known"),
        (lambda: calibrated_tensors(encoder, npquant.get_scheme("w4-g32"), ["a cat"], method="rtn"),
         "method='rtn' is not a calibrated method"),
        (lambda: encoder.quantized("w4-g32", method="awq", calibration=[""]), "calibration texts must be"),
        (lambda: fold_scale(encoder.quantized("w4-g32").tensors, 0, O_PROJ, np.ones(64, np.float32)),
         "must be a float array to fold a scale into"),
        (lambda: fold_scale(encoder.tensors, 7, O_PROJ, np.ones(64, np.float32)), "is layer=7 a block"),
        (lambda: fold_scale(encoder.tensors, 0, O_PROJ, np.ones(3, np.float32)), "scale must be a float array (64,)"),
    ]:
        with pytest.raises(NpquantError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # MiniLM, four methods on 32 calibration texts: minutes on 2 cores
def test_bench_awq_quick():
    import subprocess
    import sys
    from pathlib import Path

    from npquant.checkpoints import default_model_path

    try:
        default_model_path()
    except NpquantError as exc:
        pytest.skip(f"the default model is not installed ({exc})")
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_awq.py"
    # A guard against a hang, never a timing: the quick run took 6.5 minutes on a loaded 2-core machine.
    done = subprocess.run([sys.executable, str(bench), "--quick"], check=False, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr
    rows = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("w4-g128 ")]
    assert rows == ["rtn", "gptq/layer", "gptq", "awq", "awq+gptq"]
    assert "scale = absmax /" in done.stdout and "target 0.990" in done.stdout


def test_minilm_folded_float_model_gives_the_same_embeddings():
    from npquant.checkpoints import default_model_path
    from npquant.fidelity import SENTENCES
    from npquant.models import SentenceEncoder

    try:
        default_model_path()
    except NpquantError as exc:
        pytest.skip(f"the default model is not installed ({exc})")
    enc = SentenceEncoder.from_pretrained(backend="numpy")
    rng = np.random.default_rng(1)
    scales = {i: rng.lognormal(0, 1.0, enc.config.hidden_size).astype(np.float32)
              for i in range(enc.config.num_layers)}
    sentences = list(SENTENCES[:20])
    diff = np.abs(folded_copy(enc, scales).encode(sentences) - enc.encode(sentences)).max()
    assert diff <= FOLD_ATOL  # see FOLD_ATOL: a few float32 roundings per fold, amplified at most ~100x


# --- npquant eval ---------------------------------------------------------------------------------
def test_eval_shows_rtn_and_awq_side_by_side(tiny_dir, encoder, tmp_path, capsys):
    from npquant.cli import main

    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(texts(12, seed=6)))
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(texts(40, seed=7)))
    for method in ("awq", "awq+gptq"):
        code = main(["eval", str(tiny_dir), "--sentences", str(sentences), "--method", method, "--calibration",
                     str(calib), "--scheme", "w4-g32", "--scheme", "fp8-channel", "--json"])
        rows = json.loads(capsys.readouterr().out)
        assert code == 0
        fp8 = ["fp8-channel"] + (["fp8-channel awq+gptq"] if method == "awq+gptq" else [])  # its float target
        assert [r["scheme"] for r in rows] == ["float32", "w4-g32", f"w4-g32 {method}", *fp8]
    q = encoder.quantized("w4-g32", method="awq+gptq", calibration=texts(40, seed=7))
    base = encoder.encode(texts(12, seed=6))
    cos = np.sum(q.encode(texts(12, seed=6)) * base, axis=1)
    # The same numpy computation in both: only the order of float32 sums can differ.
    assert rows[2]["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--method", "awq", "--calibration", "SENTENCES"], "also calibration texts"),
    (["--calibration", "SENTENCES"], "--calibration and --max-samples are for a calibrated --method"),
    (["--method", "AWQ"], "invalid choice: 'AWQ'"),
])
def test_eval_awq_bad_input_is_one_line(tiny_dir, tmp_path, capsys, argv, message):
    from npquant.cli import main

    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(texts(10, seed=5)))
    argv = [str(sentences) if a == "SENTENCES" else a for a in argv]
    try:
        code = main(["eval", str(tiny_dir), "--sentences", str(sentences), *argv])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err
