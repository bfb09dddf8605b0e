"""Sequential GPTQ on a sentence encoder: a tiny BERT made here (no optional model needed), then the CLI."""

import json

import numpy as np
import pytest

import npquant
from npquant import NpquantError, QuantizedTensor
from npquant.calibrate import Hessian, gptq
from npquant.cli import main

tokenizers = pytest.importorskip("tokenizers", reason="the sentence encoder needs tokenizers (npquant[models])")

WORDS = ("the a cat dog sat ran on under mat table red blue big small quickly slowly it is was "
         "and or but not very what why how where when who model weight bit scale group").split()
HIDDEN, HEADS, FFN, LAYERS = 64, 4, 128, 2


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tiny_tensors(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, std=0.2: (std * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    t = {
        "embeddings.word_embeddings.weight": f(len(WORDS) + 4, HIDDEN, std=1.0),
        "embeddings.position_embeddings.weight": f(64, HIDDEN, std=0.3),
        "embeddings.token_type_embeddings.weight": f(2, HIDDEN, std=0.1),
        "embeddings.LayerNorm.weight": np.ones(HIDDEN, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(HIDDEN, np.float32),
        "pooler.dense.weight": f(HIDDEN, HIDDEN),
        "pooler.dense.bias": f(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
                             "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
                             "intermediate.dense": (FFN, HIDDEN), "output.dense": (HIDDEN, FFN)}.items():
            t[p + name + ".weight"] = f(o, n)
            t[p + name + ".bias"] = f(o, std=0.05)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = np.ones(HIDDEN, np.float32) + f(HIDDEN, std=0.05)
            t[p + ln + ".bias"] = f(HIDDEN, std=0.05)
    return t


W3G32 = npquant.Scheme("int", 3, "group", 32)

CONFIG = {"model_type": "bert", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
          "intermediate_size": FFN, "max_position_embeddings": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12}


def texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(2, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("tiny-bert")
    save_file({f"bert.{k}" if k.startswith("encoder") else k: v for k, v in tiny_tensors().items()},
              str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(CONFIG))
    tiny_tokenizer().save(str(root / "tokenizer.json"))
    return root


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    from npquant.models import SentenceEncoder

    return SentenceEncoder.from_pretrained(tiny_dir, backend="numpy")


def test_each_layer_is_calibrated_on_inputs_from_the_quantized_layers_before_it(encoder):
    calib = texts(40, seed=1)
    q = encoder.quantized("w4-g32", method="gptq", calibration=calib, objective="layer")
    # Rebuild two Hessians by hand: block 0's query sees the embeddings; block 1's
    # attention output sees the context from quantized block 0 and quantized q/k/v of block 1.
    from npquant.models import SentenceEncoder

    half = dict(encoder.tensors)
    for name in encoder.linear_names():
        if name.startswith("encoder.layer.0.") or "layer.1.attention.self" in name:
            half[name] = q.tensors[name]
    partial = SentenceEncoder(encoder.config, half, encoder.tokenizer, backend="numpy")
    h0, h1 = Hessian(HIDDEN), Hessian(HIDDEN)
    for idx in partial.batches(calib, 32):
        ids, mask = partial.tokenize([calib[j] for j in idx])
        x, bias = partial._embed(ids, mask)
        h0.add(x, mask)
        x = partial._block(0, x, bias)

        def grab(module, inp, mask=mask):
            if module == "encoder.layer.1.attention.output.dense":
                h1.add(inp, mask)

        partial._block(1, x, bias, grab)
    for name, h in (("encoder.layer.0.attention.self.query.weight", h0),
                    ("encoder.layer.1.attention.output.dense.weight", h1)):
        want = gptq(encoder.tensors[name], h.matrix(), "w4-g32")
        np.testing.assert_array_equal(q.tensors[name].codes, want.codes)
        np.testing.assert_array_equal(q.tensors[name].scale, want.scale)
    assert [r["name"] for r in q.layer_report] == encoder.linear_names()
    assert all(r["gptq_loss"] < r["rtn_loss"] for r in q.layer_report)
    assert all(r["tokens"] == h0.tokens for r in q.layer_report)


def test_the_block_never_writes_an_array_it_showed_observe(encoder):
    # The model objective keeps the float block's linear inputs by reference while the block runs on.
    for backend in ("numpy", "numba"):
        if backend not in npquant.available_backends():
            continue
        model = encoder.with_backend(backend)
        ids, mask = model.tokenize(texts(4, seed=9))
        x, bias = model._embed(ids, mask)
        kept = []
        model._block(0, x, bias, lambda name, inp: kept.append((name, inp, inp.copy())))
        assert len(kept) == 6
        for name, inp, copy in kept:
            np.testing.assert_array_equal(inp, copy, err_msg=f"{name} ({backend})")


def test_model_objective_rounds_the_float_target_on_the_quantized_inputs(encoder):
    """objective="model", block 1's attention output rebuilt by hand: the moments of the float model's context
    with the partly quantized model's at the same tokens, model_target, GPTQ on it, the scales refitted."""
    from npquant.calibrate.refit import refit_scales
    from npquant.calibrate.target import CrossMoment, model_target
    from npquant.models import SentenceEncoder

    calib = texts(40, seed=1)
    q = encoder.quantized("w4-g32", method="gptq", calibration=calib)
    half = dict(encoder.tensors)
    for name in encoder.linear_names():
        if name.startswith("encoder.layer.0.") or "layer.1.attention.self" in name:
            half[name] = q.tensors[name]
    partial = SentenceEncoder(encoder.config, half, encoder.tokenizer, backend="numpy")
    moments = CrossMoment(HIDDEN)
    wanted = "encoder.layer.1.attention.output.dense"
    for idx in partial.batches(calib, 32):
        ids, mask = partial.tokenize([calib[j] for j in idx])
        xq, bias = partial._embed(ids, mask)
        xf = xq
        xq, xf = partial._block(0, xq, bias), encoder._block(0, xf, bias)
        seen = {}
        partial._block(1, xq, bias, lambda m, inp: m == wanted and seen.setdefault("q", inp))
        encoder._block(1, xf, bias, lambda m, inp: m == wanted and seen.setdefault("f", inp))
        moments.add(seen["f"], seen["q"], mask)
    cross, h_q, _ = moments.matrices()
    w = encoder.tensors[wanted + ".weight"]
    target = model_target(w, cross, h_q)
    want = refit_scales(gptq(target, h_q, "w4-g32"), target, h_q)
    np.testing.assert_array_equal(q.tensors[wanted + ".weight"].codes, want.codes)
    np.testing.assert_array_equal(q.tensors[wanted + ".weight"].scale, want.scale)
    rows = {r["name"]: r for r in q.layer_report}
    assert all(r["objective"] == "model" for r in rows.values())
    # Block 1 sees inputs the quantized block 0 made, so the float target there differs from the weight.
    assert not np.array_equal(target, w)
    # The reported loss is the float-target error relative to the float output, and beats rounding to nearest
    # on the same inputs at every layer of this model (a fact of these calibration texts, checked here).
    assert all(0 < r["loss"] < r["rtn_loss"] for r in rows.values())


def test_fp8_with_the_model_objective_rounds_the_float_target(encoder):
    from npquant.calibrate.target import CrossMoment, model_target

    calib, held = texts(60, seed=2), texts(40, seed=3)
    q = encoder.quantized("w8a8-fp8", method="gptq", calibration=calib)
    assert [r["name"] for r in q.layer_report] == encoder.linear_names()  # fp8 layers get rows here
    # Block 0's query: its inputs are the embeddings in both models, so its target is its weight (to float32
    # rounding of the solve) and its codes are round to nearest's but for rare ties.
    name = "encoder.layer.0.attention.self.query.weight"
    moments = CrossMoment(HIDDEN)
    for idx in encoder.batches(calib, 32):
        ids, mask = encoder.tokenize([calib[j] for j in idx])
        x, _ = encoder._embed(ids, mask)
        moments.add(x, x, mask)
    cross, h_q, _ = moments.matrices()
    want = npquant.quantize(model_target(encoder.tensors[name], cross, h_q), "w8a8-fp8")
    np.testing.assert_array_equal(q.tensors[name].codes.view(np.uint8), want.codes.view(np.uint8))
    base = encoder.encode(held)
    cos = lambda e: float(np.mean(np.sum(e * base, axis=1)))  # noqa: E731
    assert cos(q.encode(held)) > cos(encoder.quantized("w8a8-fp8").encode(held))


def test_model_objective_keeps_more_than_the_layer_objective_on_unseen_text(encoder):
    calib, held = texts(60, seed=2), texts(40, seed=3)
    base = encoder.encode(held)
    cos = lambda e: float(np.mean(np.sum(e * base, axis=1)))  # noqa: E731
    model = encoder.quantized(W3G32, method="gptq", calibration=calib)
    layer = encoder.quantized(W3G32, method="gptq", calibration=calib, objective="layer")
    assert cos(model.encode(held)) > cos(layer.encode(held))


def test_gptq_is_deterministic_and_beats_rtn_on_unseen_text(encoder):
    calib, held = texts(60, seed=2), texts(40, seed=3)
    a = encoder.quantized(W3G32, method="gptq", calibration=calib)
    b = encoder.quantized(W3G32, method="gptq", calibration=calib)
    for name in encoder.linear_names():
        np.testing.assert_array_equal(a.tensors[name].codes, b.tensors[name].codes)
    base = encoder.encode(held)
    rtn = encoder.quantized(W3G32)
    cos = lambda e: float(np.mean(np.sum(e * base, axis=1)))  # noqa: E731
    assert cos(a.encode(held)) > cos(rtn.encode(held))


def test_bad_method_and_calibration(encoder):
    with pytest.raises(NpquantError, match=r"method='smooth' is not known"):
        encoder.quantized("w4-g32", method="smooth")
    with pytest.raises(NpquantError, match=r"GPTQ takes int schemes"):
        encoder.quantized("fp8-channel", method="gptq", calibration=["a cat"], objective="layer")
    with pytest.raises(NpquantError, match=r"calibration texts must be a non-empty list"):
        encoder.quantized("w4-g32", method="gptq", calibration=[])
    with pytest.raises(NpquantError, match=r"objective='float' is not known; expected one of \('model', 'layer'\)"):
        encoder.quantized("w4-g32", method="gptq", calibration=["a cat"], objective="float")


# --- the CLI ------------------------------------------------------------------------------------
def test_quantize_gptq_writes_what_load_reads(tiny_dir, encoder, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts(50, seed=4)) + "\n\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_dir), "-o", str(out), "--scheme", "w4-g32", "--method", "gptq",
                 "--calibration", str(calib), "--max-samples", "30", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    by = {r["name"]: r for r in rows}
    assert by["pooler.dense.weight"]["method"] == "rtn"  # not on the embedding path
    gptq_rows = [r for r in rows if r["method"] == "gptq"]
    assert len(gptq_rows) == 6 * LAYERS and all(r["gptq_loss"] < r["rtn_loss"] for r in gptq_rows)
    loaded = npquant.load(out)
    want = encoder.quantized("w4-g32", method="gptq", calibration=texts(50, seed=4)[:30])
    for name in encoder.linear_names():
        got = loaded[f"bert.{name}"]
        assert isinstance(got, QuantizedTensor)
        np.testing.assert_array_equal(got.codes, want.tensors[name].codes)
        np.testing.assert_array_equal(got.scale, want.tensors[name].scale)
    code = main(["quantize", str(tiny_dir), "-o", str(tmp_path / "out2"), "--scheme", "w4-g32", "--method", "gptq",
                 "--max-samples", "20", "--observer", "mse"])
    printed = capsys.readouterr().out
    assert code == 0 and "GPTQ per layer" in printed and "GPTQ / RTN" in printed


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_quantize_awq_writes_the_folded_value_that_load_reads(method, tiny_dir, encoder, tmp_path, capsys):
    # The codes and scales of encoder.quantized(method), and the value projections' folded biases (and no
    # other float tensor changed) in place of the model's.
    from safetensors.numpy import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts(50, seed=4)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_dir), "-o", str(out), "--scheme", "w4-g32", "--method", method,
                 "--calibration", str(calib), "--max-samples", "30", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    scaled = [r["name"] for r in rows if r.get("awq_alpha")]
    assert scaled and all("attention.output.dense" in n for n in scaled)
    want = encoder.quantized("w4-g32", method=method, calibration=texts(50, seed=4)[:30])
    loaded = npquant.load(out)
    for name in encoder.linear_names():
        np.testing.assert_array_equal(loaded[f"bert.{name}"].codes, want.tensors[name].codes)
        np.testing.assert_array_equal(loaded[f"bert.{name}"].scale, want.tensors[name].scale)
    before = load_file(str(tiny_dir / "model.safetensors"))
    stored = load_file(str(out / "model.safetensors"))
    changed = {n for n, t in stored.items() if n in before and not np.array_equal(t, before[n])}
    value_biases = {n.replace("attention.output.dense.weight", "attention.self.value.bias") for n in scaled}
    assert changed == value_biases
    for n in value_biases:
        np.testing.assert_array_equal(stored[n], want.tensors[n.removeprefix("bert.")])


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "fp8-channel", "--method", "gptq", "--objective", "layer"], "--method gptq takes int schemes"),
    (["--scheme", "w4-g32", "--method", "gptq", "--calibration", "MISSING"], "No such file"),
    (["--scheme", "w4-g32", "--method", "gptq", "--calibration", "EMPTY"], "holds no text"),
    (["--scheme", "w4-g32", "--method", "gptq", "--max-samples", "0"], "--max-samples must be at least 1"),
    (["--scheme", "w4-g32", "--calibration", "EMPTY"], "--calibration and --max-samples are for --method gptq"),
    (["--scheme", "w4-g32", "--method", "awq", "--objective", "layer"], "--objective is for --method gptq or awq+gptq"),
    (["--scheme", "fp8-channel", "--method", "awq+gptq", "--objective", "layer"], "--method awq+gptq takes int"),
    (["--scheme", "w4-g32", "--method", "gptq", "--observer", "mse", "--scheme", "w8-tensor"], "per-tensor int"),
])
def test_quantize_gptq_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [str(tmp_path / "missing.txt") if a == "MISSING" else str(empty) if a == "EMPTY" else a for a in argv]
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_dir), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_gptq_on_a_model_npquant_cannot_run(tmp_path, capsys):
    from safetensors.numpy import save_file

    root = tmp_path / "llama"
    root.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": np.ones((64, 64), np.float32)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert main(["quantize", str(root), "-o", str(tmp_path / "out"), "--method", "gptq", "--scheme", "w4-g32"]) == 2
    err = capsys.readouterr().err
    assert "npquant runs BERT sentence encoders" in err and "'gpt_neox'" in err and "--method rtn" in err
    assert "LlamaForCausalLM" in err
    assert main(["quantize", str(root), "-o", str(tmp_path / "out"), "--scheme", "w4-g32"]) == 0  # RTN works


def test_eval_refuses_calibration_text_that_is_also_evaluated(tiny_dir, tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(texts(10, seed=5)))
    assert main(["eval", str(tiny_dir), "--sentences", str(sentences), "--method", "gptq",
                 "--calibration", str(sentences)]) == 2
    assert "also calibration texts" in capsys.readouterr().err


def test_eval_shows_rtn_and_gptq_side_by_side(tiny_dir, tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(texts(12, seed=6)))
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(texts(40, seed=7)))
    code = main(["eval", str(tiny_dir), "--sentences", str(sentences), "--method", "gptq", "--calibration", str(calib),
                 "--scheme", "w4-g32", "--scheme", "fp8-channel", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    # fp8 gets a row too: with the model objective its float target is rounded to nearest
    assert [r["scheme"] for r in rows] == ["float32", "w4-g32", "w4-g32 gptq", "fp8-channel", "fp8-channel gptq"]


# --- size plans on the encoder -------------------------------------------------------------------
def test_plan_measures_output_costs_and_its_checkpoint_matches_eval(tiny_dir, encoder, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts(40, seed=8)))
    plan_path = tmp_path / "plan.json"
    code = main(["plan", str(tiny_dir), "--bits", "5.5", "--method", "gptq", "--calibration", str(calib),
                 "--schemes", "w4-g32,w8-channel", "-o", str(plan_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "output: mean(1 - cosine)" in printed
    plan = json.loads(plan_path.read_text())
    assert plan["method"] == "gptq" and plan["bits_per_weight"] <= 5.5
    assert plan["layers"]["pooler.dense.weight"]["costs"] == {"w4-g32": 0.0, "w8-channel": 0.0}
    on_path = [e for n, e in plan["layers"].items() if n.startswith("bert.encoder")]
    assert len(on_path) == 6 * LAYERS and all(e["costs"]["w8-channel"] < e["costs"]["w4-g32"] for e in on_path)
    schemes = {e["scheme"] for e in on_path}
    assert schemes == {"w4-g32", "w8-channel"}  # the budget forces a real mix
    # The cost of one layer is what the model loses with that layer alone quantized.
    from npquant.calibrate import calibration_texts
    from npquant.models.sensitivity import layer_costs

    costs, _ = layer_costs(encoder, {"w4-g32": npquant.get_scheme("w4-g32")}, calibration_texts(calib), method="rtn")
    name = "encoder.layer.1.output.dense.weight"
    alone = encoder.quantized({name: "w4-g32"})
    cal = calibration_texts(calib)
    direct = float(np.mean(1 - np.sum(alone.encode(cal) * encoder.encode(cal), axis=1)))
    assert costs[name]["w4-g32"] == pytest.approx(direct, rel=1e-4, abs=1e-7)

    out = tmp_path / "out"
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--plan", str(plan_path), "--calibration", str(calib)]) == 0
    capsys.readouterr()
    loaded = npquant.load(out)
    mapping = {n[len("bert."):]: e["scheme"] for n, e in plan["layers"].items() if n.startswith("bert.")}
    want = encoder.quantized(mapping, method="gptq", calibration=calibration_texts(calib))
    for name, sch in mapping.items():
        assert loaded[f"bert.{name}"].scheme == npquant.get_scheme(sch)
        np.testing.assert_array_equal(loaded[f"bert.{name}"].codes, want.tensors[name].codes)
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(texts(10, seed=9)))
    assert main(["eval", str(tiny_dir), "--sentences", str(sentences), "--calibration", str(calib),
                 "--plan", str(plan_path), "--scheme", "w4-g32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in rows] == ["float32", "w4-g32", "plan.json gptq"]


def test_plan_with_awq_gptq_measures_gptq_costs_and_quantize_runs_awq_gptq(tiny_dir, encoder, tmp_path, capsys):
    # AWQ's scales depend on a group's schemes, which the plan chooses: its costs are GPTQ's (the same plan as
    # --method gptq) and quantize --plan runs AWQ+GPTQ with the plan's schemes.
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts(40, seed=8)))
    argv = ["--bits", "5.5", "--calibration", str(calib), "--schemes", "w4-g32,w8-channel"]
    assert main(["plan", str(tiny_dir), *argv, "--method", "awq+gptq", "-o", str(tmp_path / "awq.json")]) == 0
    assert main(["plan", str(tiny_dir), *argv, "--method", "gptq", "-o", str(tmp_path / "gptq.json")]) == 0
    capsys.readouterr()
    awq, plain = (json.loads((tmp_path / f).read_text()) for f in ("awq.json", "gptq.json"))
    assert (awq["method"], awq["cost_method"], plain["method"], plain["cost_method"]) == ("awq+gptq", "gptq",
                                                                                          "gptq", "gptq")
    assert awq["layers"] == plain["layers"]
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--plan", str(tmp_path / "awq.json"), "--calibration",
                 str(calib), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows if r["name"].startswith("bert.encoder")} == {"awq+gptq"}
    mapping = {n[len("bert."):]: e["scheme"] for n, e in awq["layers"].items() if n.startswith("bert.")}
    from npquant.calibrate import calibration_texts

    want = encoder.quantized(mapping, method="awq+gptq", calibration=calibration_texts(calib))
    loaded = npquant.load(out)
    for name in mapping:
        np.testing.assert_array_equal(loaded[f"bert.{name}"].codes, want.tensors[name].codes)


def test_plan_defaults_to_gptq_where_npquant_runs_the_model(tiny_dir, tmp_path, capsys):
    # Issue: 'plan' without --method measured round-to-nearest costs, whose checkpoint keeps less than GPTQ's.
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(texts(40, seed=8)))
    plan_path = tmp_path / "plan.json"
    code = main(["plan", str(tiny_dir), "--bits", "5.5", "--calibration", str(calib),
                 "--schemes", "w4-g32,w8-channel", "-o", str(plan_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "method: gptq (the default" in printed
    assert json.loads(plan_path.read_text())["method"] == "gptq"
    code = main(["plan", str(tiny_dir), "--bits", "5.5", "--method", "rtn", "--calibration", str(calib),
                 "--schemes", "w4-g32,w8-channel", "-o", str(tmp_path / "rtn.json")])
    assert code == 0 and "method: gptq" not in capsys.readouterr().out
    assert json.loads((tmp_path / "rtn.json").read_text())["method"] == "rtn"


def test_eval_and_quantize_take_the_objective(tiny_dir, tmp_path, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(texts(12, seed=5)))
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(texts(30, seed=6)))
    rows = {}
    for objective in ("model", "layer"):
        assert main(["eval", str(tiny_dir), "--sentences", str(sentences), "--scheme", "w4-g32", "--method", "gptq",
                     "--calibration", str(calib), "--objective", objective, "--json"]) == 0
        rows[objective] = {r["scheme"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model"]["w4-g32"] == rows["layer"]["w4-g32"]  # RTN rows do not depend on it
    assert rows["model"]["w4-g32 gptq"]["mean_cosine"] != rows["layer"]["w4-g32 gptq"]["mean_cosine"]
    assert main(["eval", str(tiny_dir), "--sentences", str(sentences), "--scheme", "w4-g32", "--method", "gptq",
                 "--calibration", str(calib)]) == 0
    assert "GPTQ objective: model" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--scheme", "w4-g32", "--method", "gptq",
                 "--calibration", str(calib), "--objective", "layer"]) == 0
    assert "tr(dW H dW^T)" in " ".join(capsys.readouterr().out.split())
    assert main(["quantize", str(tiny_dir), "-o", str(out), "--force", "--scheme", "w4-g32", "--method", "gptq",
                 "--calibration", str(calib)]) == 0
    assert "the float model's output at the layer" in " ".join(capsys.readouterr().out.split())
    assert isinstance(npquant.load(out)["bert.encoder.layer.1.output.dense.weight"], QuantizedTensor)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--method", "rtn", "--objective", "layer"], "--objective is for the GPTQ methods"),
    (["eval", "--method", "awq", "--objective", "model"], "--objective is for the GPTQ methods"),
    (["quantize", "-o", "OUT", "--scheme", "w4-g32", "--objective", "model"], "--objective is for --method gptq"),
])
def test_objective_without_gptq_is_one_line(tiny_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv[:1] + [str(tiny_dir)] + argv[1:]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
