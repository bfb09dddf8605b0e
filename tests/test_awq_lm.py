"""AWQ's folds in a Llama-family decoder (npquant.models.awq_lm) on tiny random CausalLMs: the float model with
every group's scale folded in gives the same logits; o_proj's scale is tied across grouped-query heads."""

import numpy as np
import pytest

from npquant import NpquantError, Scheme
from npquant.models.awq_lm import DECODER_GROUPS, fold_scale, tie_heads
from npquant.models.causal_lm import CausalLM, CausalLMConfig

O_PROJ = ("self_attn.o_proj",)
W4G16 = Scheme("int", 4, "group", 16)


def tiny(arch="LlamaForCausalLM", seed=0, **extra):
    config = {"architectures": [arch], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
              "tie_word_embeddings": False, **extra}
    rng = np.random.default_rng(seed)
    shapes = CausalLMConfig.from_json(config).tensor_shapes()
    weights = {n: (0.3 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    for n, shape in shapes.items():
        if n.endswith("norm.weight"):
            weights[n] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return config, weights


def random_scales(config, rng):
    cfg = CausalLMConfig.from_json(config)
    width = {"self_attn.q_proj": cfg.hidden_size, "self_attn.o_proj": cfg.num_heads * cfg.head_dim,
             "mlp.gate_proj": cfg.hidden_size, "mlp.down_proj": cfg.intermediate_size}
    out = {}
    for group in DECODER_GROUPS:
        s = rng.lognormal(0, 1.0, width[group[0]])
        if group == O_PROJ:
            s = tie_heads(s, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        out[group] = s.astype(np.float32)
    return out


@pytest.mark.parametrize("arch, extra", [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),  # value's and up's biases fold too
    ("Qwen2ForCausalLM", {}),  # q/k/v biases
    ("Qwen3ForCausalLM", {}),  # per-head q/k RMSNorm
    ("MistralForCausalLM", {"num_key_value_heads": 1}),  # every query head shares one value head
])
def test_folding_every_group_keeps_the_float_model(arch, extra):
    config, weights = tiny(arch, **extra)
    rng = np.random.default_rng(1)
    before = {k: v.copy() for k, v in weights.items()}
    folded = dict(weights)
    for i in range(config["num_hidden_layers"]):
        for group, s in random_scales(config, rng).items():
            folded.update(fold_scale(folded, config, i, group, s))
    ids = rng.integers(0, 32, (2, 9))
    base = CausalLM(config, weights).logits(ids)
    got = CausalLM(config, folded).logits(ids)
    # Each fold rounds the folded tensors once more in float32 (2**-24 relative); through two layers of
    # dot products of 16-24 terms, RMSNorms and softmax, that moves logits of size ~4 by a few 1e-6
    # (measured 1.4e-6 to 3.7e-6 over these five models); 1e-4 of the largest logit is ~100x that and far
    # below what a wrong fold does (1e-2 of it and more: the last assertion).
    assert np.abs(got - base).max() <= 1e-4 * np.abs(base).max()
    for k, v in before.items():
        np.testing.assert_array_equal(weights[k], v)  # the input mapping is left alone
    # A fold that forgot the producer changes the logits by order 1.
    broken = dict(weights)
    broken.update({k: v for k, v in fold_scale(weights, config, 0, ("mlp.down_proj",),
                                                random_scales(config, rng)[("mlp.down_proj",)]).items()
                   if k.endswith("down_proj.weight")})
    assert np.abs(CausalLM(config, broken).logits(ids) - base).max() > 1e-2 * np.abs(base).max()


def test_o_proj_scale_must_be_tied_across_the_heads_sharing_a_value_head():
    config, weights = tiny()
    s = np.random.default_rng(2).lognormal(0, 1, 16).astype(np.float32)  # H * D = 16, not tied
    with pytest.raises(NpquantError, match=r"equal across the 2 query heads") as err:
        fold_scale(weights, config, 0, O_PROJ, s)
    assert "\n" not in str(err.value)
    tied = tie_heads(s, 4, 2, 4)
    assert np.array_equal(tied.reshape(2, 2, 4)[:, 0], tied.reshape(2, 2, 4)[:, 1])
    np.testing.assert_allclose(tied.reshape(2, 2, 4)[:, 0], s.astype(np.float64).reshape(2, 2, 4).mean(axis=1), rtol=1e-15)
    out = fold_scale(weights, config, 0, O_PROJ, tied.astype(np.float32))
    assert out["model.layers.0.self_attn.v_proj.weight"].shape == (8, 16)  # K * D rows


@pytest.mark.parametrize("call, message", [
    (lambda w, c: fold_scale(w, c, 0, ("mlp.up_proj",), np.ones(16, np.float32)), "is not a group of a decoder"),
    (lambda w, c: fold_scale(w, c, 5, ("mlp.down_proj",), np.ones(24, np.float32)), "layer must be an int in [0, 2)"),
    (lambda w, c: fold_scale(w, c, 0, ("mlp.down_proj",), np.ones(16, np.float32)), "scale must be a float array (24,)"),
    (lambda w, c: fold_scale({}, c, 0, ("mlp.down_proj",), np.ones(24, np.float32)), "tensors lack"),
    (lambda w, c: tie_heads(np.ones(10), 4, 2, 4), "abs_mean must have num_heads * head_dim = 16"),
])
def test_bad_inputs_are_one_line(call, message):
    config, weights = tiny()
    with pytest.raises(NpquantError) as err:
        call(weights, config)
    assert message in str(err.value) and "\n" not in str(err.value)


# --- the sequential loop (models/awq_calibrated_lm.py) ---------------------------------------------
def loud(config, weights):
    """Loud input channels where AWQ's scales pay (large norm weights, a few large v/up rows), and linear
    weights 0.3 times smaller so that the random model is calm enough for int8 to be nearly lossless."""
    w = dict(weights)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("input_layernorm.weight", 3), ("post_attention_layernorm.weight", 3),
                           ("self_attn.v_proj.weight", 4), ("mlp.up_proj.weight", 5)):
            w[p + name] = w[p + name].copy()
            w[p + name][:rows] *= 10
    return {k: (v * np.float32(0.3) if k.endswith("proj.weight") else v) for k, v in w.items()}


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
@pytest.mark.parametrize("arch, extra", [("LlamaForCausalLM", {}), ("Qwen2ForCausalLM", {"num_key_value_heads": 1})])
def test_awq_decoder_folds_what_it_scales_and_never_loses_to_rtn(method, arch, extra):
    from npquant import QuantizedTensor, Scheme, quantize
    from npquant.models.awq_calibrated_lm import awq_decoder

    config, weights = tiny(arch, hidden_size=32, intermediate_size=48, head_dim=8, **extra)
    weights = loud(config, weights)
    rng = np.random.default_rng(3)
    windows = [rng.integers(0, 32, (4, 12)), rng.integers(0, 32, (1, 5))]
    names = CausalLMConfig.from_json(config).linear_names()
    # Near-lossless codes (8 bits, groups of 8): the checkpoint (folded float tensors + quantized weights) must
    # give the float model's logits up to int8 rounding, as RTN does (measured on logits of ~5: RTN 0.03-0.08,
    # AWQ 0.04-0.10 on either int8 grid; its scales are fit to the calibration windows, not these ids). A
    # scale applied to W but not folded moves them by 2.5-5. The bound, 5% of the largest logit (~0.25), is
    # 2.5x the largest measured and 10x below the smallest broken figure.
    fine = Scheme("int", 8, "group", 8)
    quantized, replaced, rows, left = awq_decoder(config, weights, fine, windows, method=method, objective="layer")
    assert not left and sorted(quantized) == sorted(names)
    assert all(isinstance(q, QuantizedTensor) for q in quantized.values())
    assert any(r["alpha"] for r in rows)
    ids = rng.integers(0, 32, (2, 10))
    base = CausalLM(config, weights).logits(ids)
    got = CausalLM(config, {**weights, **replaced}, quantized=quantized).logits(ids)
    rtn = CausalLM(config, weights, quantized={n: quantize(weights[n], fine) for n in names}).logits(ids)
    rtn_err = np.abs(rtn - base).max()
    assert 0 < np.abs(got - base).max() <= 0.05 * np.abs(base).max()
    assert rtn_err <= 0.05 * np.abs(base).max()  # RTN's int8 error meets the same bound
    norms = [n for n in replaced if n.endswith("layernorm.weight")]
    assert len(norms) == 2 * config["num_hidden_layers"]
    if arch == "Qwen2ForCausalLM":  # value's bias carries o_proj's fold
        assert any(n.endswith("v_proj.bias") for n in replaced)
    # 4 bits: each group's loss is at most RTN's (AWQ's a = 0 is RTN; GPTQ lowers it further). The search
    # minimises the group's sum, so one weight of q/k/v or gate/up may lose a little on its own.
    _, _, rows4, _ = awq_decoder(config, weights, W4G16, windows, method=method, objective="layer")
    assert len(rows4) == len(names)
    group_of = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "mlp",
                "up_proj": "mlp", "down_proj": "down"}
    groups: dict = {}
    for r in rows4:
        parts = r["name"].split(".")  # model.layers.<i>.<self_attn|mlp>.<module>.weight
        key = (parts[2], group_of[parts[4]])
        loss, rtn = groups.get(key, (0.0, 0.0))
        groups[key] = (loss + r["loss"] * r["ref"], rtn + r["rtn_loss"] * r["ref"])
    assert len(groups) == 4 * config["num_hidden_layers"]
    # Two float64 traces of the same matrices in two forms: equal to ~1e-12 relative where AWQ picks a = 0.
    assert all(loss <= rtn * (1 + 1e-9) for loss, rtn in groups.values())


@pytest.mark.parametrize("arch, extra", [("LlamaForCausalLM", {}), ("Qwen2ForCausalLM", {"num_key_value_heads": 1})])
def test_awq_gptq_with_the_model_objective_keeps_the_model(arch, extra):
    """objective="model": GPTQ rounds each scaled weight's float target; the folds (norms, value/up rows and
    biases, the producers quantized again) must still give the float model, up to int8 rounding, with the
    bound of the test above; and at 4 bits it keeps the calibration windows closer than the layer objective."""
    from npquant import Scheme
    from npquant.models.awq_calibrated_lm import awq_decoder

    config, weights = tiny(arch, hidden_size=32, intermediate_size=48, head_dim=8, **extra)
    weights = loud(config, weights)
    rng = np.random.default_rng(3)
    windows = [rng.integers(0, 32, (4, 12)), rng.integers(0, 32, (1, 5))]
    fine = Scheme("int", 8, "group", 8)
    quantized, replaced, rows, left = awq_decoder(config, weights, fine, windows, method="awq+gptq",
                                                  objective="model")
    assert not left and any(r["alpha"] for r in rows)
    ids = rng.integers(0, 32, (2, 10))
    base = CausalLM(config, weights).logits(ids)
    got = CausalLM(config, {**weights, **replaced}, quantized=quantized).logits(ids)
    assert 0 < np.abs(got - base).max() <= 0.05 * np.abs(base).max()

    def error(objective):
        q, r, _, _ = awq_decoder(config, weights, W4G16, windows, method="awq+gptq", objective=objective)
        model = CausalLM(config, {**weights, **r}, quantized=q)
        return sum(float(np.sum((model.logits(w) - CausalLM(config, weights).logits(w)) ** 2)) for w in windows)

    assert error("model") < error("layer")  # a fact of this model, on its calibration windows


def test_awq_gptq_model_objective_targets_the_producers_quantized_again(model_target_calls):
    # v_proj and up_proj are quantized before o_proj's and down_proj's scales fold into their rows; quantized
    # again, they too must round their float target (one model_target call each), not their folded weight.
    from npquant import Scheme
    from npquant.models import awq_calibrated_lm

    config, weights = tiny(hidden_size=32, intermediate_size=48, head_dim=8)
    weights = loud(config, weights)
    windows = [np.random.default_rng(3).integers(0, 32, (4, 12))]
    calls = model_target_calls(awq_calibrated_lm)
    _, _, rows, _ = awq_calibrated_lm.awq_decoder(config, weights, Scheme("int", 4, "group", 16), windows,
                                                   method="awq+gptq", objective="model")
    refolded = [r for r in rows if r["alpha"] and r["name"].endswith(("o_proj.weight", "down_proj.weight"))]
    assert refolded  # the test needs producers quantized again
    assert len(calls) == len(rows) + len(refolded)


def test_awq_decoder_leaves_float_what_its_group_size_does_not_fit():
    from npquant.models.awq_calibrated_lm import awq_decoder

    config, weights = tiny(hidden_size=32, intermediate_size=48, head_dim=8)
    windows = [np.random.default_rng(4).integers(0, 32, (2, 8))]
    quantized, _, rows, left = awq_decoder(config, loud(config, weights), Scheme("int", 4, "group", 32), windows)
    downs = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]  # in_features 48
    assert sorted(left) == downs and "group_size=32 does not divide in_features=48" in left[downs[0]]
    assert not any(n in quantized for n in downs) and len(quantized) == 12
    assert all(r["alpha"] is not None for r in rows)  # the other groups are whole: all scaled


def test_awq_decoder_bad_inputs_are_one_line():
    from npquant.models.awq_calibrated_lm import awq_decoder

    config, weights = tiny()
    ids = [np.zeros((1, 4), np.int64)]
    for call, message in [
        (lambda: awq_decoder(config, weights, W4G16, ids, method="gptq"), "method='gptq' is not known"),
        (lambda: awq_decoder(config, weights, {"lm_head.weight": W4G16}, ids), "not a decoder-layer linear"),
        (lambda: awq_decoder(config, weights, W4G16, [np.zeros((1, 4))]), "windows must be a non-empty list"),
        (lambda: awq_decoder(config, weights, {}, ids), "schemes is empty"),
    ]:
        with pytest.raises(NpquantError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("objective", ["layer", "model"])
def test_awq_gptq_scores_each_scale_by_the_output_error_after_gptq(objective):
    # The loss awq+gptq's search minimises, against the output error measured on explicit activations in
    # float64: ||X W.T - (X~ / s) Q.T||**2 / N, X~ = X (layer objective) or X plus noise (the inputs the
    # quantized layers before give; model objective), Q found by GPTQ from the scaled activations' own moments.
    from functools import partial

    from npquant.calibrate import gptq
    from npquant.calibrate.awq import loss_after_gptq
    from npquant.calibrate.refit import refit_scales
    from npquant.calibrate.target import model_target
    from npquant.models.awq_calibrated_lm import _quantize_layer

    rng = np.random.default_rng(11)
    n, features = 400, 32
    gain = np.where(np.arange(features) % 7 == 0, 12.0, 1.0)
    x = rng.standard_normal((n, features)) * gain
    xq = x + 0.2 * rng.standard_normal(x.shape) * gain if objective == "model" else x
    ws = [rng.standard_normal((o, features)).astype(np.float32) for o in (16, 8)]
    moments = (x.T @ xq / n, xq.T @ xq / n, x.T @ x / n) if objective == "model" else None
    quantize_layer = partial(_quantize_layer, use_gptq=True, observer="minmax", damp=0.01)
    loss = loss_after_gptq(quantize_layer, ws, xq.T @ xq / n, moments, W4G16)
    for s in (np.ones(features, np.float32), rng.lognormal(0, 0.5, features).astype(np.float32)):
        s64 = s.astype(np.float64)
        xs = xq / s64  # the scaled inputs the folded model gives
        want = 0.0
        for w in ws:
            w_s = w * s[None, :]
            h_s = xs.T @ xs / n
            if objective == "layer":
                q = gptq(w_s, h_s, W4G16).dequantize()
            else:
                target = model_target(w, x.T @ xs / n, h_s, anchor=w_s)
                q = refit_scales(gptq(target, h_s, W4G16), target, h_s).dequantize()
            want += float(((x @ w.astype(np.float64).T - xs @ q.astype(np.float64).T) ** 2).sum()) / n
        # Two float64 forms of one sum of ~10^4 squares: ~1e-12 apart unless a code flips between the two
        # Hessians' float rounding (it does not at this seed); 1e-8 relative.
        np.testing.assert_allclose(loss(s), want, rtol=1e-8)
