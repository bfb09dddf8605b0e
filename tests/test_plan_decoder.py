"""``npquant plan`` on decoders: each unit's KL cost (npquant.models.sensitivity_lm), fusion, the budget, the CLI.

The fast tests run the tiny random Llama of test_lm_eval.py (2 layers, hidden
128, MLP 96, vocabulary 48) with a character-level tokenizer, so that the
built-in calibration text gives varied token ids. The references are written
here: each unit's weights quantized by hand, the whole float32 forward run
without cached inputs, and the KL divergence in float64 by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import string

import numpy as np
import pytest
from safetensors.numpy import save_file

import npquant
from npquant import NpquantError
from npquant.calibrate import calibration_texts
from npquant.cli import main
from npquant.models import CausalLM
from npquant.models.sensitivity_lm import calibration_batches, plan_units, plan_quantizer, unit_costs
from npquant.plan import check_budget, fused_units, read_plan
from test_lm_eval import CONFIG, tiny_weights

tokenizers = pytest.importorskip("tokenizers")

LAYERS = CONFIG["num_hidden_layers"]
SCHEMES = {"w4-g32": "w4-g32", "w4-g128": "w4-g128", "mxfp4": "mxfp4", "w8-channel": "w8-channel"}


def char_tokenizer():
    """One token per lowercase letter and three marks, [UNK] (0) for anything else: ids spread over 30 of 48."""
    chars = list(string.ascii_lowercase) + list(".,'")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}},
                                                           unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"\S"), behavior="isolated")
    return tok


def batches(tokens=40, context=16, texts=None):
    return calibration_batches(char_tokenizer(), texts or calibration_texts(max_samples=8), tokens, context)


def log_softmax64(z):
    """float64 log-softmax of each row, written out: z - max - log(sum(exp(z - max)))."""
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def kl_by_hand(ref_logits, logits):
    """Mean over positions of sum_v p_v (log p_v - log q_v), float64."""
    lp, lq = log_softmax64(ref_logits), log_softmax64(logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def scored_logits(weights, ids_batches):
    """float32 logits (N, V) of the positions that predict a token, from whole forwards (no cache)."""
    model = CausalLM(CONFIG, weights, backend="numpy")
    return np.concatenate([model.logits(ids)[:, :-1].reshape(-1, CONFIG["vocab_size"]) for ids in ids_batches])


# --- the cost of a unit -------------------------------------------------------------------------------------
@pytest.mark.parametrize("unit, label", [("model.layers.0.self_attn.qkv_proj", "w4-g32"),
                                         ("model.layers.1.mlp.gate_up_proj", "mxfp4"),
                                         ("model.layers.1.mlp.down_proj", "w8-channel")])
def test_a_unit_cost_is_the_kl_of_the_model_with_that_unit_alone_quantized(unit, label):
    weights = tiny_weights(seed=3)
    b = batches()
    costs, nbytes = unit_costs(CONFIG, weights, b, {label: label}, units={unit: plan_units(CONFIG)[unit]})
    # By hand: every weight of the unit quantized and dequantized, the rest float32, the whole forward again.
    members = plan_units(CONFIG)[unit]
    quantized = dict(weights)
    for name in members:
        quantized[name] = npquant.quantize(weights[name], label).dequantize()
    want = kl_by_hand(scored_logits(weights, b), scored_logits(quantized, b))
    assert want > 1e-6  # the scheme does change this model
    # Same float32 operations on the same arrays (the cache holds the whole forward's own layer inputs), but
    # products of other shapes: BLAS's summation order may depend on the shape (OpenBLAS's AVX2 kernels on an
    # AMD EPYC do), so each logit may move by d <= C u max|h| max|E| ~ 128 * 6e-8 * 4 = 3e-5. To first order
    # KL(p || q) moves by sum_v (q_v - p_v) dq_v + sum_v p_v (log(p_v / q_v) - KL) dp_v, at most
    # d (||p - q||_1 + E_p|log(p / q) - KL|) <= 2 d sqrt(2 KL) (Pinsker; Cauchy-Schwarz with
    # Var_p log(p / q) ~ 2 KL for nearby p and q), per position and so in the mean.
    assert costs[unit][label] == pytest.approx(want, rel=1e-12, abs=2 * 3e-5 * math.sqrt(2 * want))
    assert nbytes[unit][label] == sum(npquant.quantize(weights[n], label).nbytes for n in members)


def test_cached_layer_inputs_give_the_costs_of_whole_forwards():
    weights = tiny_weights(seed=4)
    b = batches(tokens=48, context=24)
    costs, _ = unit_costs(CONFIG, weights, b, SCHEMES)
    reference = scored_logits(weights, b)
    units = plan_units(CONFIG)
    assert list(costs) == list(units) and len(units) == 4 * LAYERS
    for unit, members in units.items():
        # w4-g128 fits in_features 128 (q/k/v, o, gate/up) but not down_proj's 96.
        fits = [label for label in SCHEMES if not (label == "w4-g128" and unit.endswith("down_proj"))]
        assert list(costs[unit]) == fits
        for label in fits:
            model = CausalLM(CONFIG, weights, quantizer=plan_quantizer({n: label for n in members}), backend="numpy")
            logits = np.concatenate([model.logits(ids)[:, :-1].reshape(-1, CONFIG["vocab_size"]) for ids in b])
            # The whole forward runs the quantized weights through npquant.linear (its own float32 kernels), the
            # costs through BLAS on dequantized weights: logits differ by float32 rounding, ~1e-6 relative, and
            # so does KL (a smooth function of them) at KL >= 1e-5.
            assert costs[unit][label] == pytest.approx(kl_by_hand(reference, logits), rel=1e-3)


def test_weights_on_the_grid_cost_nothing():
    weights = tiny_weights(seed=8, grid=True)  # every linear weight exactly on w8-channel-restricted's grid
    costs, _ = unit_costs(CONFIG, weights, batches(), {"w8-channel-restricted": "w8-channel-restricted"})
    assert all(c["w8-channel-restricted"] == 0.0 for c in costs.values())


def test_costs_rank_by_bits_and_leave_the_inputs_alone():
    weights = tiny_weights(seed=5)
    before = {n: w.copy() for n, w in weights.items()}
    b = batches()
    ids_before = [x.copy() for x in b]
    costs, _ = unit_costs(CONFIG, weights, b, {"w4-g32": "w4-g32", "w8-channel": "w8-channel"})
    assert all(c["w8-channel"] < c["w4-g32"] for c in costs.values())
    assert all(np.array_equal(weights[n], before[n]) for n in weights)
    assert all(np.array_equal(x, y) for x, y in zip(b, ids_before))


# --- units and fusion ---------------------------------------------------------------------------------------
def test_fused_units_follow_vllm():
    names = [f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                    "mlp.down_proj")]
    assert fused_units(names) == {
        "model.layers.0.self_attn.qkv_proj": names[:3], "model.layers.0.self_attn.o_proj": [names[3]],
        "model.layers.0.mlp.gate_up_proj": names[4:6], "model.layers.0.mlp.down_proj": [names[6]]}
    bert = [f"bert.encoder.layer.1.attention.self.{m}.weight" for m in ("query", "key", "value")]
    assert fused_units(bert + ["bert.pooler.dense.weight"]) == {
        "bert.encoder.layer.1.attention.self.qkv_proj": bert, "bert.pooler.dense": ["bert.pooler.dense.weight"]}
    assert plan_units(CONFIG) == {u: tuple(m) for u, m in fused_units(
        [n for n in tiny_weights() if n.endswith("_proj.weight")]).items()}


def test_check_budget_with_units():
    layers = {"a.q_proj.weight": (64, 128), "a.k_proj.weight": (64, 96)}
    units = fused_units(layers)
    # w4-g128 fits q (128 inputs) but not k (96): the unit takes only what fits both.
    sizes = check_budget(layers, {"w4-g128": "w4-g128", "w4-g32": "w4-g32"}, 10**6, units)
    assert set(sizes["a.q_proj.weight"]) == set(sizes["a.k_proj.weight"]) == {"w4-g32"}
    # Groups of 48 fit q's 96 inputs only, groups of 64 k's 64 only: each layer fits a candidate, the unit none.
    from npquant.schemes import Scheme

    with pytest.raises(NpquantError, match=r"no candidate scheme fits every layer of 'a.qkv_proj'"):
        check_budget({"a.q_proj.weight": (64, 96), "a.k_proj.weight": (64, 64)},
                     {"g48": Scheme("int", 4, "group", 48), "w4-g64": "w4-g64"}, 10**6,
                     fused_units(["a.q_proj.weight", "a.k_proj.weight"]))
    with pytest.raises(NpquantError, match=r"units names 'x', not a layer to plan"):
        check_budget(layers, {"w4-g32": "w4-g32"}, 10**6, {"u": ["x"]})


# --- the command line ---------------------------------------------------------------------------------------
@pytest.fixture
def decoder_dir(tmp_path):
    root = tmp_path / "tiny-llama"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    save_file(tiny_weights(seed=12), str(root / "model.safetensors"))
    char_tokenizer().save(str(root / "tokenizer.json"))
    return root


def plan_cli(decoder_dir, tmp_path, capsys, *extra, bits="6", schemes="w4-g32,w4-g128,w8-channel"):
    out = tmp_path / "plan.json"
    code = main(["plan", str(decoder_dir), "--bits", bits, "--schemes", schemes, "--tokens", "40", "-o", str(out),
                 *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return read_plan(out), json.loads(out.read_text()), captured


def test_cli_plan_obeys_fusion_fits_the_budget_and_is_optimal(decoder_dir, tmp_path, capsys):
    plan, raw, captured = plan_cli(decoder_dir, tmp_path, capsys)
    assert "mean KL(float32 || quantized)" in captured.out and "RTN costs" in captured.out
    units = raw["units"]
    assert len(units) == 4 * LAYERS
    for unit, entry in units.items():  # every layer of a unit carries the unit's scheme
        assert {plan["layers"][n]["scheme"] for n in entry["layers"]} == {entry["scheme"]}
        assert all(plan["layers"][n]["unit"] == unit for n in entry["layers"])
    assert {n for e in units.values() for n in e["layers"]} == set(plan["layers"])
    # Within the budget, counted from what quantize writes.
    weights = tiny_weights(seed=12)
    real = sum(npquant.quantize(weights[n], e["scheme"]).nbytes for n, e in plan["layers"].items())
    assert real == raw["total_bytes"] <= raw["budget"]["bytes"]
    assert raw["bits_per_weight"] <= 6
    # The least summed cost over every choice per unit (brute force over the recorded costs).
    names = list(units)
    best = min((sum(units[u]["costs"][c] for u, c in zip(names, choice)), choice)
               for choice in itertools.product(*[list(units[u]["costs"]) for u in names])
               if sum(_unit_bytes(weights, units[u]["layers"], c) for u, c in zip(names, choice))
               <= raw["budget"]["bytes"])
    assert raw["predicted_cost"] == pytest.approx(best[0], abs=1e-15)
    assert 1 < len({e["scheme"] for e in units.values()})  # the budget forces a real mix
    # The costs are those of unit_costs on the calibration text (the built-in one, its first 128 texts).
    costs, _ = unit_costs(CONFIG, weights, batches(tokens=40, context=256, texts=calibration_texts(max_samples=128)),
                          {s: s for s in ("w4-g32", "w4-g128", "w8-channel")})
    assert {u: e["costs"] for u, e in units.items()} == costs
    assert raw["calibration"]["tokens"] == 40 and raw["method"] == "rtn"


def _unit_bytes(weights, members, label):
    return sum(npquant.quantize(weights[n], label).nbytes for n in members)


def test_cli_plan_measures_on_calibration_text_never_the_eval_text(decoder_dir, tmp_path, capsys, monkeypatch):
    from npquant import fidelity_lm

    def refuse():
        raise AssertionError("the evaluation text was read by plan")

    monkeypatch.setattr(fidelity_lm, "eval_text", refuse)
    calib = tmp_path / "calib.txt"
    calib.write_text("a cat sat on the mat.\nthe dog ran far, far away.\n")
    _, raw, _ = plan_cli(decoder_dir, tmp_path, capsys, "--calibration", str(calib))
    costs, _ = unit_costs(CONFIG, tiny_weights(seed=12), batches(tokens=40, context=256,
                                                                 texts=calibration_texts(calib)),
                          {s: s for s in ("w4-g32", "w4-g128", "w8-channel")})
    assert {u: e["costs"] for u, e in raw["units"].items()} == costs
    assert raw["calibration"]["file"] == str(calib)


def test_cli_plan_gptq_on_a_decoder_says_rtn(decoder_dir, tmp_path, capsys):
    _, raw, captured = plan_cli(decoder_dir, tmp_path, capsys, "--method", "gptq")
    assert "GPTQ costs are not measured for decoders" in captured.err and raw["method"] == "rtn"
    assert raw["cost_method"] == "rtn"


def test_cli_plan_awq_gptq_on_a_decoder_records_the_method_quantize_runs(decoder_dir, tmp_path, capsys):
    _, raw, captured = plan_cli(decoder_dir, tmp_path, capsys, "--method", "awq+gptq")
    assert "quantize --plan runs awq+gptq" in captured.err
    assert (raw["method"], raw["cost_method"]) == ("awq+gptq", "rtn")


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "1"], "--tokens must be at least 2"),
    (["--bits", "1"], "below the smallest plan"),
    (["--schemes", "w4-g128"], "no candidate scheme fits layer 'model.layers.0.mlp.down_proj.weight'"),
    (["--observer", "nope"], None),  # argparse refuses it (exit 2, its own usage line)
])
def test_cli_plan_bad_input(decoder_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "plan.json"
    base = {"--bits": "5", "--schemes": "w4-g32,w8-channel"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    args = [x for kv in base.items() for x in kv if kv[0] not in ("--observer",)] + \
        (["--observer", base["--observer"]] if "--observer" in base else [])
    try:
        code = main(["plan", str(decoder_dir), "-o", str(out), *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    if message:
        assert message in err and err.count("\n") == 1, err


def test_cli_plan_refusals_of_decoder_options(decoder_dir, tmp_path, capsys):
    (decoder_dir / "tokenizer.json").unlink()
    out = tmp_path / "plan.json"
    assert main(["plan", str(decoder_dir), "--bits", "5", "--schemes", "w4-g32", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and err.count("\n") == 1
    from test_plan import write_model

    proxy = tmp_path / "m"
    write_model(proxy)
    assert main(["plan", str(proxy), "--bits", "6", "--schemes", "w4-g128", "--tokens", "64", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--tokens is for decoders" in err and err.count("\n") == 1 and not out.exists()


def test_unit_costs_bad_input():
    weights = tiny_weights()
    b = batches()
    units = plan_units(CONFIG)
    cases = [
        (dict(schemes={}), "at least one candidate"),
        (dict(observer="nope"), "observer='nope' is not known"),
        (dict(batches=[np.zeros((1, 1), np.int64)]), r"batches\[0\] must be token ids of shape \(B, T\) with T >= 2"),
        (dict(batches=[np.full((1, 4), 99)]), r"outside \[0, vocab_size=48\)"),
        (dict(batches=[]), "batches is empty"),
        (dict(units={"u": ["model.norm.weight"]}), "must list linear weights of the decoder layers"),
        (dict(units={"u": [units["model.layers.0.mlp.down_proj"][0], units["model.layers.1.mlp.down_proj"][0]]}),
         r"spans decoder layers \[0, 1\]"),
        (dict(schemes={"w4-g128": "w4-g128"}, units={"d": units["model.layers.0.mlp.down_proj"]}),
         "no candidate scheme fits unit 'd'"),
    ]
    for kwargs, message in cases:
        args = {"batches": b, "schemes": {"w4-g32": "w4-g32"}, **kwargs}
        with pytest.raises(NpquantError, match=message):
            unit_costs(CONFIG, weights, args.pop("batches"), args.pop("schemes"), **args)
    with pytest.raises(NpquantError, match="tokens must be an int >= 2"):
        calibration_batches(char_tokenizer(), ["a b"], tokens=1)
    with pytest.raises(NpquantError, match="non-empty list of non-empty calibration texts"):
        calibration_batches(char_tokenizer(), [], tokens=8)
    assert math.isfinite(unit_costs(CONFIG, weights, b, {"w4-g32": "w4-g32"},
                                    units={"d": units["model.layers.1.mlp.down_proj"]})[0]["d"]["w4-g32"])


def test_cli_plan_on_a_gguf_file_measures_its_float32_copy(tmp_path, capsys, monkeypatch):
    import os
    import tempfile

    pytest.importorskip("gguf")
    from test_gguf import tiny_weights as gguf_weights
    from test_gguf import write_gguf

    from npquant.checkpoints.gguf import read_gguf

    where = tmp_path / "TMPDIR"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, gguf_weights(), types={"blk.0.attn_q.weight": "Q4_1"})
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--bits", "6", "--schemes", "w4-g32,w8-channel", "--tokens", "24",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "already quantized by llama.cpp: Q4_1 (1 tensor)" in captured.err
    raw = json.loads(out.read_text())
    assert raw["model"] == str(path) and raw["calibration"]["tokens"] == 24
    assert os.listdir(where) == []  # the float32 copy is removed
    # The costs are those of the GGUF's own weights and tokenizer.
    model = read_gguf(path)
    weights = {n: model[n] for n in model}
    b = calibration_batches(model.tokenizer(), calibration_texts(max_samples=128), 24)
    costs, _ = unit_costs(model.config, weights, b, {"w4-g32": "w4-g32", "w8-channel": "w8-channel"})
    model.close()
    assert {u: e["costs"] for u, e in raw["units"].items()} == costs


@pytest.mark.slow
def test_bench_plan_decoder_quick():
    """The benchmark script runs (its quick mode: SmolLM2's first 2 layers, 32 tokens); no figure is asserted."""
    import subprocess
    import sys
    from pathlib import Path

    from npquant.checkpoints.gguf import default_decoder_path

    try:
        default_decoder_path()
    except NpquantError as exc:
        pytest.skip(str(exc))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_plan_decoder.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("\nnext-token predictions")[1]
    assert [line.split()[0] for line in table.splitlines()[2:7]] == ["plan", "w4-channel", "mxfp4", "w4-g64", "nvfp4"]
    assert "the plan's mean KL is lower than every uniform preset within 4.5 bits" in done.stdout


# --- fusion on the other paths: the BERT encoder (measured) and any other checkpoint (proxy) -----------------
def test_encoder_plan_gives_query_key_value_one_scheme(tmp_path, capsys):
    from test_calibrated import CONFIG as BERT_CONFIG
    from test_calibrated import texts, tiny_tensors, tiny_tokenizer

    root = tmp_path / "tiny-bert"
    root.mkdir()
    save_file({f"bert.{k}" if k.startswith("encoder") else k: v for k, v in tiny_tensors().items()},
              str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(BERT_CONFIG))
    tiny_tokenizer().save(str(root / "tokenizer.json"))
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts(20, seed=3)))
    out = tmp_path / "plan.json"
    assert main(["plan", str(root), "--bits", "5.5", "--schemes", "w4-g32,w8-channel", "--calibration", str(calib),
                 "-o", str(out)]) == 0
    capsys.readouterr()
    raw = json.loads(out.read_text())
    qkv = [u for u in raw["units"] if u.endswith("attention.self.qkv_proj")]
    assert len(qkv) == 2 and all(len(raw["units"][u]["layers"]) == 3 for u in qkv)
    for unit, entry in raw["units"].items():
        assert {raw["layers"][n]["scheme"] for n in entry["layers"]} == {entry["scheme"]}
        # A fused unit's cost is its layers' costs (each measured alone) summed.
        for label, cost in entry["costs"].items():
            assert cost == pytest.approx(sum(raw["layers"][n]["costs"][label] for n in entry["layers"]), rel=1e-12)


def test_proxy_plan_gives_fused_shards_one_scheme(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = tmp_path / "m"
    root.mkdir()
    tensors = {f"model.layers.0.self_attn.{m}.weight": (0.02 * rng.standard_normal((64, 256))).astype(np.float32)
               for m in ("q_proj", "k_proj", "v_proj")}
    tensors["model.layers.0.self_attn.k_proj.weight"][:, ::16] *= 40  # k alone hurts at 4 bits
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no architectures: the proxy
    out = tmp_path / "plan.json"
    assert main(["plan", str(root), "--bits", "6.2", "--schemes", "w4-g128,w8-channel", "-o", str(out)]) == 0
    assert "weight-only proxy" in capsys.readouterr().out
    raw = json.loads(out.read_text())
    # Unfused, the budget would give k alone 8 bits; fused, q/k/v take one scheme, and only 4 bits fit all three.
    assert list(raw["units"]) == ["model.layers.0.self_attn.qkv_proj"]
    assert {e["scheme"] for e in raw["layers"].values()} == {"w4-g128"}
