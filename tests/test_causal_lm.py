"""The numpy causal-LM forward against transformers' logits, and its streaming, quantized layers and bad inputs.

The references in tests/data/causal_lm/ were made once by
tests/data/make_causal_lm_reference.py (torch and transformers in a separate
environment); these tests read only those files.
"""

import json
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import npquant
from npquant import NpquantError
from npquant.models import CausalLM
from npquant.models import causal_lm as causal_lm_module
from npquant.models import layers
from npquant.models.causal_lm import ARCHITECTURES, CausalLMConfig
from npquant.models.layers import Rope, apply_rope, causal_attention, rms_norm, swiglu
from npquant.safetensors_io import Checkpoint

DATA = Path(__file__).parent / "data" / "causal_lm"
MODELS = ("llama", "llama_tied", "mistral", "qwen2", "qwen3")
U = 2.0**-24  # float32's unit roundoff

# Tolerance of a float32 forward against exact arithmetic, relative to the largest |logit|.
# A forward of these models rounds at 26 stages in a row: per layer input norm, q/k/v, (q/k norm,)
# RoPE, scores, softmax, context, o_proj, post-attention norm, gate/up, SwiGLU, down; then the
# final norm and the head. Each stage passes on its input's relative error and adds its own: at most
# log2(n) u for a dot product of n <= 128 terms summed pairwise (7 u), a few u for an elementwise step.
# To first order the logits are then within 26 * 7 u = 182 u of exact, as a fraction of the
# largest |logit|. Two float32 forwards (ours, transformers') differ by at most twice that.
# Seen: 8 u between ours and transformers', 9 u between transformers' float32 and float64.
ONE_FORWARD = 26 * 7 * U
TWO_FORWARDS = 2 * ONE_FORWARD


def load(name):
    root = DATA / name
    config = json.loads((root / "config.json").read_text())
    return config, load_file(str(root / "model.safetensors")), load_file(str(root / "reference.safetensors"))


@pytest.fixture(scope="module", params=MODELS)
def reference(request):
    return (request.param, *load(request.param))


def counted(weights):
    """A source giving a fresh copy of each tensor (as a file read does), and a log of the names read."""
    reads = []

    def read(name):
        reads.append(name)
        return weights[name].copy()

    return read, reads


# --- against transformers -------------------------------------------------------------------------
def test_logits_match_transformers(reference):
    name, config, weights, ref = reference
    model = CausalLM(config, weights)
    got = model.logits(ref["token_ids"])
    assert got.dtype == np.float32 and got.shape == ref["logits"].shape == (3, 16, 128)
    scale = float(np.abs(ref["logits_float64"]).max())
    assert np.abs(got - ref["logits"]).max() <= TWO_FORWARDS * scale
    assert np.abs(got - ref["logits_float64"]).max() <= ONE_FORWARD * scale
    # The bar on real models, met by far on these.
    assert np.abs(got - ref["logits"]).max() <= 1e-3


def test_each_model_exercises_its_feature():
    # What each reference model is there for (so a config edit cannot quietly drop a feature).
    cfg = {name: CausalLMConfig.from_json(load(name)[0]) for name in MODELS}
    assert cfg["llama"].rope.kind == "llama3" and cfg["llama"].qkv_bias and cfg["llama"].o_bias
    assert cfg["llama"].mlp_bias and not cfg["llama"].tie_word_embeddings
    assert cfg["llama"].num_heads == 2 * cfg["llama"].num_kv_heads
    assert cfg["llama_tied"].rope.kind == "linear" and cfg["llama_tied"].tie_word_embeddings
    assert cfg["llama_tied"].num_kv_heads == 1
    assert cfg["mistral"].sliding_windows == (5, 5) and cfg["mistral"].head_dim * 4 != cfg["mistral"].hidden_size
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].o_bias and cfg["qwen2"].tie_word_embeddings
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].o_bias and cfg["qwen3"].sliding_windows == (None, 6)
    assert cfg["qwen3"].head_dim == 32
    # The llama3 scaling uses all three bands on these head widths (kept, interpolated, divided).
    rope = cfg["llama"].rope
    wavelen = 2 * math.pi / Rope(rope.theta).inverse_frequencies(cfg["llama"].head_dim).astype(np.float64)
    old = rope.original_max_position_embeddings
    assert (wavelen < old / rope.high_freq_factor).any() and (wavelen > old / rope.low_freq_factor).any()
    assert ((wavelen >= old / rope.high_freq_factor) & (wavelen <= old / rope.low_freq_factor)).any()


def test_log_probs_and_perplexity_match_the_reference(reference, monkeypatch):
    name, config, weights, ref = reference
    ids = ref["token_ids"]
    logits = ref["logits_float64"].astype(np.float64)
    # log-softmax in float64 of transformers' float64 logits, at the next token of each position.
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)  # (B, T)
    expected = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], axis=-1)[..., 0] - lse[:, :-1]  # (B, T - 1)
    model = CausalLM(config, weights)
    got = model.next_token_log_probs(ids)
    assert got.dtype == np.float32 and got.shape == (3, 15)
    # A log-prob is a difference of two logit-sized numbers: the logits' tolerance twice.
    scale = float(np.abs(logits).max())
    assert np.abs(got - expected).max() <= 2 * ONE_FORWARD * scale
    ppl = math.exp(-expected.mean())
    assert abs(model.perplexity(ids) - ppl) <= 2 * ONE_FORWARD * scale * ppl
    # The head in blocks of 7 positions (crossing rows): only the head's dot products of C = 64 terms may
    # sum in another order for another number of rows (BLAS), at most 2 log2(64) u = 12 u of the largest
    # |logit| apart, once in the target's logit and once in the log-sum-exp.
    monkeypatch.setattr(causal_lm_module, "_HEAD_ELEMENTS", 7 * 128)
    blocked = CausalLM(config, weights).next_token_log_probs(ids)
    assert np.abs(blocked - got).max() <= 24 * U * scale


def test_a_checkpoint_directory_is_a_source():
    config, _, ref = load("qwen2")
    with Checkpoint(DATA / "qwen2") as ckpt:
        model = CausalLM(ckpt.config, ckpt.tensors)
        got = model.logits(ref["token_ids"])
    expected = CausalLM(config, load("qwen2")[1]).logits(ref["token_ids"])
    np.testing.assert_array_equal(got, expected)


def test_bfloat16_weights_compute_in_float32():
    import ml_dtypes

    config, weights, ref = load("llama")
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    rounded = {k: v.astype(np.float32) for k, v in bf16.items()}  # exact: every bfloat16 is a float32
    got = CausalLM(config, bf16).logits(ref["token_ids"])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, CausalLM(config, rounded).logits(ref["token_ids"]))


# --- batches ----------------------------------------------------------------------------------------
def test_each_row_of_a_batch_is_its_own_sequence():
    config, weights, ref = load("qwen3")
    model = CausalLM(config, weights)
    ids = ref["token_ids"]
    batch = model.logits(ids)
    scale = float(np.abs(batch).max())
    for b in range(len(ids)):
        alone = model.logits(ids[b:b + 1])[0]
        # BLAS may sum in another order for another number of rows: two forwards' tolerance.
        assert np.abs(alone - batch[b]).max() <= TWO_FORWARDS * scale
    # The rows differ, so a mix-up of rows would show.
    assert np.abs(batch[0] - batch[1]).max() > 0.1


def test_right_padding_leaves_the_earlier_positions_alone():
    config, weights, ref = load("mistral")
    model = CausalLM(config, weights)
    ids = ref["token_ids"][:2].copy()
    short = model.logits(ids[1:2, :9])[0]
    ids[1, 9:] = 0  # the second row is 9 tokens, right-padded
    padded = model.logits(ids)
    scale = float(np.abs(short).max())
    assert np.abs(padded[1, :9] - short).max() <= TWO_FORWARDS * scale


# --- streaming ---------------------------------------------------------------------------------------
def test_streaming_holds_one_layer_tensor_at_a_time():
    config, weights, ref = load("llama")
    alive = {}  # name -> count of live copies
    peak = {"tensors": 0, "layers": 0}

    def read(name):
        arr = weights[name].copy()
        alive[name] = alive.get(name, 0) + 1
        weakref.finalize(arr, lambda: alive.__setitem__(name, alive[name] - 1))
        live = [n for n, c in alive.items() if c and n.startswith("model.layers.")]
        peak["tensors"] = max(peak["tensors"], len(live))
        peak["layers"] = max(peak["layers"], len({n.split(".")[2] for n in live}))
        return arr

    model = CausalLM(config, read)
    model.logits(ref["token_ids"])
    # One layer at a time, and in it one weight with its bias at most.
    assert peak == {"tensors": 2, "layers": 1}
    assert not [n for n, c in alive.items() if c and n.startswith("model.layers.")]
    # The embedding and the (untied) head are kept; nothing else is.
    assert {n for n, c in alive.items() if c} == {"model.embed_tokens.weight", "lm_head.weight"}


def test_layers_are_read_again_at_each_forward():
    config, weights, ref = load("llama_tied")
    read, reads = counted(weights)
    model = CausalLM(config, read)
    model.logits(ref["token_ids"])
    first = list(reads)
    reads.clear()
    model.logits(ref["token_ids"])
    assert sorted(first) == sorted(CausalLMConfig.from_json(config).tensor_shapes())  # every tensor, once
    assert "lm_head.weight" not in first  # tied: the embedding is the head
    assert sorted(reads) == sorted(n for n in first if n != "model.embed_tokens.weight")


def test_the_forward_changes_none_of_its_inputs():
    config, weights, ref = load("qwen3")
    before = {k: v.copy() for k, v in weights.items()}
    ids = ref["token_ids"].copy()
    model = CausalLM(config, weights)
    x = model.embed(ids)
    x0 = x.copy()
    model.layer(0, x)
    model.next_token_log_probs(ids)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(ids, ref["token_ids"])
    for k in weights:
        np.testing.assert_array_equal(weights[k], before[k])


def test_observe_sees_every_linear_input():
    config, weights, ref = load("qwen2")
    model = CausalLM(config, weights)
    seen = []
    model.hidden_states(ref["token_ids"], observe=lambda module, x: seen.append((module, x.shape)))
    cfg = model.config
    assert [m + ".weight" for m, _ in seen] == cfg.linear_names()
    widths = {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 64, "up_proj": 64,
              "down_proj": cfg.intermediate_size}
    assert all(shape == (3, 16, widths[m.split(".")[-1]]) for m, shape in seen)


# --- quantized layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_quantized_layers_run_as_their_dequantized_weights(backend):
    if backend not in npquant.available_backends():
        pytest.skip("numba is not installed (npquant[fast])")
    config, weights, ref = load("qwen3")
    cfg = CausalLMConfig.from_json(config)
    qts = {n: npquant.quantize(weights[n], "w8-channel") for n in cfg.linear_names()}
    dequantized = {**weights, **{n: qt.dequantize() for n, qt in qts.items()}}
    expected = CausalLM(config, dequantized).logits(ref["token_ids"])
    model = CausalLM(config, weights, quantized=qts, backend=backend)
    got = model.logits(ref["token_ids"])
    # The kernels sum x * code * scale in another order than x @ dequantized.T: two forwards.
    assert np.abs(got - expected).max() <= TWO_FORWARDS * float(np.abs(expected).max())
    # ... and the quantization itself shows: the float model's logits differ by far more.
    assert np.abs(got - CausalLM(config, weights).logits(ref["token_ids"])).max() > 1e-3
    if backend == "numba":  # prepared once per weight, kept with the tensor it came from
        name = cfg.linear_names()[0]
        assert isinstance(model._runnable[name][1], npquant.PreparedTensor) and model._runnable[name][0] is qts[name]


def test_quantizer_is_called_once_per_linear_and_its_tensors_kept():
    config, weights, ref = load("llama")
    cfg = CausalLMConfig.from_json(config)
    calls = []

    def quantizer(name, w):
        assert w.dtype == np.float32 and w.shape == cfg.tensor_shapes()[name]
        calls.append(name)
        return npquant.quantize(w, "w4-g32") if "mlp" in name else None  # attention stays float

    read, reads = counted(weights)
    model = CausalLM(config, read, quantizer=quantizer)
    first = model.logits(ref["token_ids"])
    reads.clear()
    second = model.logits(ref["token_ids"])
    np.testing.assert_array_equal(first, second)
    mlp = [n for n in cfg.linear_names() if "mlp" in n]
    attention = [n for n in cfg.linear_names() if "self_attn" in n]
    # The MLP weights were quantized once and not read again; the float ones were offered again.
    assert sorted(calls) == sorted(mlp + attention * 2)
    assert not set(mlp) & set(reads) and set(attention) <= set(reads)
    qts = {n: npquant.quantize(weights[n], "w4-g32") for n in mlp}
    np.testing.assert_array_equal(first, CausalLM(config, weights, quantized=qts).logits(ref["token_ids"]))


def test_quantized_mapping_is_read_at_each_use():
    config, weights, ref = load("mistral")
    qts = {}
    model = CausalLM(config, weights, quantized=qts)
    float_logits = model.logits(ref["token_ids"])
    name = "model.layers.1.mlp.down_proj.weight"
    qts[name] = npquant.quantize(weights[name], "w2-g64")
    assert np.abs(model.logits(ref["token_ids"]) - float_logits).max() > 1e-3


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, message", [
    (np.array([[1.0, 2.0]]), "token_ids must hold integers"),
    (np.array([[True, False]]), "token_ids must hold integers"),
    (np.array([1, 2, 3]), r"token_ids must have shape \(B, T\)"),
    (np.zeros((1, 2, 3), np.int64), r"token_ids must have shape \(B, T\)"),
    (np.zeros((1, 0), np.int64), r"token_ids must have shape \(B, T\)"),
    (np.array([[1, -1]]), r"token_ids must lie in \[0, vocab_size=128\), got -1"),
    (np.array([[1, 128]]), r"token_ids must lie in \[0, vocab_size=128\), got 128"),
    ([[1, 2], [3]], "right-padded"),
])
def test_bad_token_ids(ids, message):
    config, weights, _ = load("llama_tied")
    model = CausalLM(config, weights)
    with pytest.raises(NpquantError, match=message):
        model.logits(ids)


def test_token_ids_as_lists_and_unsigned_ints():
    config, weights, ref = load("llama_tied")
    model = CausalLM(config, weights)
    ids = ref["token_ids"][:1, :5]
    expected = model.logits(ids)
    np.testing.assert_array_equal(model.logits(ids.tolist()), expected)
    np.testing.assert_array_equal(model.logits(ids.astype(np.uint16)), expected)


def test_log_probs_need_two_tokens():
    config, weights, _ = load("llama_tied")
    with pytest.raises(NpquantError, match="at least 2 tokens"):
        CausalLM(config, weights).perplexity(np.array([[5]]))


def test_missing_tensor_in_a_mapping_is_named_before_running():
    config, weights, _ = load("qwen2")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(NpquantError, match=r"weights lack tensor 'model.layers.1.self_attn.k_proj.bias', "
                                           r"which a Qwen2ForCausalLM"):
        CausalLM(config, weights)


def test_missing_tensor_from_a_callable_is_named_when_read():
    config, weights, ref = load("llama")
    del weights["lm_head.weight"]
    model = CausalLM(config, lambda name: weights[name])
    with pytest.raises(NpquantError, match="weights lack tensor 'lm_head.weight'"):
        model.logits(ref["token_ids"])


@pytest.mark.parametrize("change, message", [
    (lambda w: w["model.layers.0.mlp.up_proj.weight"][:-1], r"'model.layers.0.mlp.up_proj.weight' has shape "
                                                              r"\(63, 64\), expected \(64, 64\)"),
    (lambda w: w["model.norm.weight"].astype(np.int32), "'model.norm.weight' must be float16, bfloat16"),
    (lambda w: [1.0, 2.0], "'model.norm.weight' must be a numpy array, got list"),
])
def test_bad_tensor(change, message):
    config, weights, ref = load("llama")
    name = message.split("'")[1]
    weights[name] = change(weights)
    with pytest.raises(NpquantError, match=message):
        CausalLM(config, weights).logits(ref["token_ids"])


def test_only_linear_weights_may_be_quantized():
    config, weights, ref = load("llama")
    weights["model.layers.0.input_layernorm.weight"] = npquant.quantize(np.ones((64, 64), np.float32), "w8-channel")
    with pytest.raises(NpquantError, match="'model.layers.0.input_layernorm.weight' must be a float array"):
        CausalLM(config, weights).logits(ref["token_ids"])


def test_bad_quantized_tensors():
    config, weights, ref = load("llama")
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong = npquant.quantize(np.ones((32, 64), np.float32), "w8-channel")
    with pytest.raises(NpquantError, match=rf"quantized\['{name}'\] has shape \(32, 64\), expected \(64, 64\)"):
        CausalLM(config, weights, quantized={name: wrong}).logits(ref["token_ids"])
    with pytest.raises(NpquantError, match=rf"quantizer\['{name}'\] must be a QuantizedTensor"):
        CausalLM(config, weights, quantizer=lambda n, w: w * 2).logits(ref["token_ids"])
    with pytest.raises(NpquantError, match="quantized must be a mapping"):
        CausalLM(config, weights, quantized=[wrong])
    with pytest.raises(NpquantError, match="quantizer must be a callable"):
        CausalLM(config, weights, quantizer="w4-g32")
    with pytest.raises(NpquantError, match="backend='cuda' is not known"):
        CausalLM(config, weights, backend="cuda")


def test_weights_must_be_a_mapping_or_callable():
    config, _, _ = load("llama")
    with pytest.raises(NpquantError, match="weights must be a mapping of tensor names to arrays or a callable"):
        CausalLM(config, [1, 2])


def test_layer_index_is_checked():
    config, weights, ref = load("llama")
    model = CausalLM(config, weights)
    with pytest.raises(NpquantError, match=r"layer index must be an int in \[0, 2\), got 2"):
        model.layer(2, model.embed(ref["token_ids"]))


def test_layer_and_head_check_their_inputs():
    config, weights, ref = load("llama")
    model = CausalLM(config, weights)
    x = model.embed(ref["token_ids"])  # (3, 16, 64)
    with pytest.raises(NpquantError, match=r"x must have shape \(B, T, C\) with C = hidden_size = 64, got \(3, 16\)"):
        model.layer(0, x[..., 0])
    with pytest.raises(NpquantError, match=r"x must have shape \(B, T, C\) with C = hidden_size = 64, got \(3, 16, 63\)"):
        model.layer(0, x[..., 1:])
    with pytest.raises(NpquantError, match="x must be a float numpy array .* got int64"):
        model.layer(0, ref["token_ids"][..., None].repeat(64, axis=2))
    with pytest.raises(NpquantError, match=r"h must have shape \(..., C\) with C = hidden_size = 64, got \(5, 32\)"):
        model.head(np.zeros((5, 32), np.float32))
    with pytest.raises(NpquantError, match="h must be a float numpy array .* got list"):
        model.head([0.0] * 64)
    # Other float dtypes are computed in float32.
    out = model.layer(0, x.astype(np.float64))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, model.layer(0, x))
    assert model.head(x[0, 0].astype(np.float16)).shape == (128,)


# --- config.json ----------------------------------------------------------------------------------------
def test_unknown_architecture_is_one_line_naming_the_supported_ones():
    config, weights, _ = load("llama")
    config["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(NpquantError) as exc:
        CausalLM(config, weights)
    message = str(exc.value)
    assert "\n" not in message and "'GPT2LMHeadModel'" in message
    assert all(arch in message for arch in ARCHITECTURES)
    del config["architectures"]
    config["model_type"] = "gemma"
    with pytest.raises(NpquantError, match="model_type='gemma' is not supported; the causal-LM forward runs Llama"):
        CausalLMConfig.from_json(config)
    config["model_type"] = "qwen2"  # model_type alone names the architecture
    assert CausalLMConfig.from_json(config).architecture == "Qwen2ForCausalLM"


@pytest.mark.parametrize("edit, message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu': the causal-LM forward runs 'silu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported; the forward runs "
                                                             "default, linear, llama3"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling of rope_type 'linear' lacks 'factor'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "high_freq_factor > low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    ({"num_hidden_layers": None}, "config.json lacks 'num_hidden_layers'"),
    ({"hidden_size": "64"}, "config.json hidden_size='64' must be a positive integer"),
    ({"vocab_size": 0}, "config.json vocab_size=0 must be a positive integer"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny' must be a number"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of names"),
    ({"head_dim": 15}, "head_dim must be even for RoPE, got 15"),
])
def test_bad_config(edit, message):
    config, _, _ = load("llama")
    config = {k: v for k, v in {**config, **edit}.items() if v is not None}
    with pytest.raises(NpquantError, match=message):
        CausalLMConfig.from_json(config)


def test_config_must_be_a_dict():
    with pytest.raises(NpquantError, match="config must be a dict read from config.json, got str"):
        CausalLMConfig.from_json("config.json")


def test_rope_scaling_in_both_config_forms():
    config, _, _ = load("llama")
    legacy = CausalLMConfig.from_json(config).rope
    modern = dict(config, rope_parameters={**config.pop("rope_scaling"), "rope_theta": config.pop("rope_theta")})
    assert CausalLMConfig.from_json(modern).rope == legacy
    older = dict(config, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})  # "type", not "rope_type"
    assert CausalLMConfig.from_json(older).rope == Rope(10000.0, "linear", factor=2.0)
    # llama3's original context: a top-level original_max_position_embeddings wins, as in transformers.
    top = dict(modern, original_max_position_embeddings=32)
    assert CausalLMConfig.from_json(top).rope.original_max_position_embeddings == 32


def test_transformers_defaults_for_absent_keys():
    base = {"vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 3,
            "num_attention_heads": 8}
    llama = CausalLMConfig.from_json({**base, "architectures": ["LlamaForCausalLM"]})
    assert (llama.num_kv_heads, llama.head_dim, llama.rope, llama.rms_norm_eps) == (8, 8, Rope(10000.0), 1e-6)
    assert llama.sliding_windows == (None,) * 3 and not llama.tie_word_embeddings
    mistral = CausalLMConfig.from_json({**base, "architectures": ["MistralForCausalLM"]})
    assert mistral.num_kv_heads == 8 and mistral.sliding_windows == (4096,) * 3
    qwen3 = CausalLMConfig.from_json({**base, "architectures": ["Qwen3ForCausalLM"], "num_key_value_heads": 4})
    assert qwen3.head_dim == 128 and qwen3.sliding_windows == (None,) * 3
    qwen2 = CausalLMConfig.from_json({**base, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 4,
                                      "use_sliding_window": True, "sliding_window": 7, "max_window_layers": 2})
    assert qwen2.sliding_windows == (None, None, 7)
    # attention_bias: all four projections of Llama and Qwen3; Qwen2 has q/k/v biases whatever it says and
    # no o_proj bias; Mistral none.
    biased = {**base, "num_key_value_heads": 4, "attention_bias": True}
    flags = {arch: (c.qkv_bias, c.o_bias) for arch in ARCHITECTURES
             for c in [CausalLMConfig.from_json({**biased, "architectures": [arch]})]}
    assert flags == {"LlamaForCausalLM": (True, True), "MistralForCausalLM": (False, False),
                     "Qwen2ForCausalLM": (True, False), "Qwen3ForCausalLM": (True, True)}
    typed = CausalLMConfig.from_json({**base, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2,
                                      "use_sliding_window": True,
                                      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]})
    assert typed.sliding_windows == (4096, None, 4096)


# --- the layers against float64 references written here ----------------------------------------------------
def test_rms_norm_against_float64():
    rng = np.random.default_rng(0)
    # Inputs near sqrt(eps), where eps decides the answer.
    x = (rng.standard_normal((3, 5, 16)) * 3e-3).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5) * w
    got = rms_norm(x, w, 1e-5)
    assert got.dtype == np.float32
    # A mean of 16 squares, a square root, a division and two products: within 8 u relative of each value.
    assert np.all(np.abs(got - expected) <= 8 * U * np.abs(expected) + 1e-30)


def test_rope_is_a_rotation_by_position_times_frequency():
    rng = np.random.default_rng(1)
    T, D = 9, 8
    x = rng.standard_normal((2, T, 3, D)).astype(np.float32)
    rope = Rope(500.0)
    cos, sin = rope.tables(T, D)
    got = apply_rope(x, cos, sin)
    inv = 500.0 ** -(np.arange(0, D, 2) / D)  # float64 frequencies
    # Dimension j pairs with j + D/2 as a complex number, turned by position * frequency.
    z = x[..., : D // 2].astype(np.float64) + 1j * x[..., D // 2:]
    turned = z * np.exp(1j * np.arange(T)[None, :, None, None] * inv)
    expected = np.concatenate([turned.real, turned.imag], axis=-1)
    # Angles are float32 products (error <= T u per frequency <= 1), then cos/sin, two products and a sum.
    assert np.abs(got - expected).max() <= (T + 8) * U * np.abs(x).max() * 2


def test_llama3_frequencies_against_the_published_rule():
    rope = Rope(500000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    D = 128
    got = rope.inverse_frequencies(D)
    # Llama 3.1's apply_scaling, per frequency, in float64.
    expected = []
    for f in 500000.0 ** -(np.arange(0, D, 2) / D):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    np.testing.assert_array_equal(got, np.array(expected, np.float32))
    linear = Rope(10000.0, "linear", factor=4.0).inverse_frequencies(16)
    np.testing.assert_array_equal(linear, (10000.0 ** -(np.arange(0, 16, 2) / 16) / 4.0).astype(np.float32))


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_against_a_float64_loop(window, monkeypatch):
    rng = np.random.default_rng(2)
    B, T, H, K, D = 2, 11, 6, 2, 4
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, K, D)).astype(np.float32)
    v = rng.standard_normal((B, T, K, D)).astype(np.float32)
    expected = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)  # transformers' repeat_kv: query head h reads key/value head h // G
            for i in range(T):
                js = [j for j in range(i + 1) if window is None or j > i - window]
                s = np.array([q[b, i, h].astype(np.float64) @ k[b, j, kv] / math.sqrt(D) for j in js])
                p = np.exp(s - s.max())
                expected[b, i, h] = (p / p.sum()) @ v[b, js, kv].astype(np.float64)
    got = causal_attention(q, k, v, window)
    assert got.dtype == np.float32 and got.shape == (B, T, H, D)
    # Scores of 4 terms, softmax over <= 11 and a weighted sum: a few tens of u of the largest |v|.
    tol = 64 * U * np.abs(v).max()
    assert np.abs(got - expected).max() <= tol
    # Query rows in blocks of 2, as long sequences run them: within the same tolerance.
    monkeypatch.setattr(layers, "_SCORE_ELEMENTS", 2 * B * H * T)
    assert np.abs(causal_attention(q, k, v, window) - expected).max() <= tol


def test_swiglu_at_the_extremes():
    gate = np.array([-1000.0, -100.0, -1.0, 0.0, 1.0, 100.0, 1000.0], np.float32)
    up = np.full_like(gate, 2.0)
    g64 = gate.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(1000) is inf in float64 too: the quotient is -0
        expected = g64 / (1 + np.exp(-g64)) * 2.0
    with np.errstate(all="raise"):  # no overflow warning escapes
        got = swiglu(gate.copy(), up)
    assert np.all(np.isfinite(got))
    # Relative 4 u (an exp, a sum, a division, a product); below float32's smallest normal number, where
    # exp(-g) overflows for g < -88, the answer is -0 (silu(-100) is -7e-42).
    assert np.all(np.abs(got - expected) <= 4 * U * np.abs(expected) + 2.0**-126)
    assert got[0] == 0 and np.signbit(got[0]) and got[-1] == 2000.0


# --- the real decoder: SmolLM2-135M-Instruct from its GGUF file ----------------------------------------------
@pytest.mark.slow
def test_smollm2_matches_transformers():
    # transformers' logits of the GGUF file (its weights dequantized by the gguf package, as npquant's reader
    # does) on three sentences, from tests/data/causal_lm/smollm2_reference.safetensors.
    gguf = pytest.importorskip("npquant.checkpoints.gguf", reason="the GGUF reader is not there")
    try:
        path = gguf.default_decoder_path()
    except NpquantError as exc:
        pytest.skip(f"the decoder model is not installed ({exc})")
    ref = load_file(str(DATA / "smollm2_reference.safetensors"))
    with gguf.read_gguf(path) as weights:
        model = CausalLM(weights.config, weights)
        ids = ref["token_ids"]  # (3, T), right-padded
        logits = model.logits(ids)  # (3, T, V)
        log_probs = model.next_token_log_probs(ids)  # (3, T - 1)
    for b, n in enumerate(ref["lengths"]):
        got = logits[b, :n].astype(np.float64)  # (n, V)
        # The bar: 1e-3 absolute, at the 32 largest logits and 32 others of every position
        # (transformers' own float32 run is within 1e-4 of its float64 run on these sentences).
        for which in ("top", "sample"):
            picked = np.take_along_axis(got, ref[f"{which}_ids"][b, :n], axis=1)
            assert np.abs(picked - ref[f"{which}_logits"][b, :n]).max() <= 1e-3
        m = got.max(axis=1)
        lse = m + np.log(np.exp(got - m[:, None]).sum(axis=1))
        assert np.abs(lse - ref["logsumexp"][b, :n]).max() <= 1e-3
        # Perplexity within 0.1%.
        expected = math.exp(-ref["next_log_probs"][b, :n - 1].mean())
        assert abs(math.exp(-np.mean(log_probs[b, :n - 1], dtype=np.float64)) / expected - 1) <= 1e-3
