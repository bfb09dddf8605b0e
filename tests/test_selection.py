"""Which tensors are quantized: layers npquant does not understand are left alone, loudly, and inputs
that are already quantized are refused, so that ``quantize`` never exits 0 with an output ``load`` refuses.

The named tests follow the fuzz findings of issue 34: GPT-2's Conv1D weights, MoE routers and fused
3-D experts quantized or skipped without a word, and I8/U8/F8 weights or compressed-tensors input
written into a checkpoint ``load`` refuses.
"""

import json
import re

import ml_dtypes
import numpy as np
import pytest

from npquant import NpquantError
from npquant.schemes import get_scheme
from npquant.checkpoints import load, quantize_checkpoint, select_layers
from npquant.checkpoints.selection import CONV1D, FUSED_EXPERTS, ROUTER
from npquant.cli import main
from npquant.safetensors_io import Checkpoint

# safetensors dtype codes of the numpy dtypes the tests write (the file format, written by hand below).
_CODES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
          np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2"}


def save(path, tensors):
    """A safetensors file written by hand: 8-byte header length, JSON header, raw little-endian data."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def make_model(root, tensors, config=None):
    root.mkdir(parents=True, exist_ok=True)
    save(root / "model.safetensors", tensors)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def w(*shape, dtype=np.float32, seed=0):
    return (0.02 * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def choices_of(root, **kw):
    with Checkpoint(root) as ckpt:
        return {c.name: c for c in select_layers(ckpt, **kw)}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip()


def assert_one_line_error(code, err, pattern):
    assert code == 2
    assert "\n" not in err and "Traceback" not in err
    assert re.search(pattern, err), err


# --- GPT-2's Conv1D weights, stored (in, out) ----------------------------------------------
H = 128  # GPT-2's hidden size, made small (a multiple of the group sizes)


def gpt2_tensors():
    """A one-block GPT-2 as transformers stores it: Conv1D weights (in, out), and a Linear score head (out, in)."""
    return {
        "transformer.wte.weight": w(100, H),
        "transformer.wpe.weight": w(32, H),
        "transformer.h.0.ln_1.weight": np.ones(H, np.float32),
        "transformer.h.0.attn.c_attn.weight": w(H, 3 * H, seed=1),
        "transformer.h.0.attn.c_attn.bias": np.zeros(3 * H, np.float32),
        "transformer.h.0.attn.c_proj.weight": w(H, H, seed=2),
        "transformer.h.0.mlp.c_fc.weight": w(H, 4 * H, seed=3),
        "transformer.h.0.mlp.c_proj.weight": w(4 * H, H, seed=4),
        "transformer.ln_f.weight": np.ones(H, np.float32),
        "score.weight": w(2, H, seed=5),
    }


CONV1D_NAMES = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


def test_gpt2_conv1d_weights_are_left_alone_not_quantized_as_out_in(tmp_path):
    # Fuzz finding: GPT-2's Conv1D weights, stored (in, out), were quantized as if (out, in).
    root = make_model(tmp_path / "gpt2", gpt2_tensors(), {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    choices = choices_of(root)
    for name in CONV1D_NAMES:
        assert not choices[name].quantize and choices[name].reason == CONV1D and not choices[name].quantizable
    assert choices["score.weight"].quantize  # a Linear head of a GPT-2 model is (out, in) as usual
    summary = quantize_checkpoint(root, tmp_path / "out", "w8-channel")
    assert [r.name for r in summary["layers"]] == ["score.weight"]
    assert {c.name for c in summary["skipped"] if c.reason == CONV1D} == set(CONV1D_NAMES)
    assert any("Conv1D weight stored (in, out)" in n and "transformer.h.0.attn.c_attn" in n for n in summary["warnings"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {n[: -len(".weight")] for n in CONV1D_NAMES} <= set(config["quantization_config"]["ignore"])
    assert list(load(tmp_path / "out")) == ["score.weight"]
    with Checkpoint(tmp_path / "out") as out:  # copied bit for bit, in their own layout
        np.testing.assert_array_equal(out.tensors["transformer.h.0.attn.c_attn.weight"].read(),
                                      gpt2_tensors()["transformer.h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("config, conv1d", [
    ({"architectures": ["GPT2LMHeadModel"]}, True),           # the architecture says so
    ({"model_type": "imagegpt"}, True),                        # another model built of Conv1D
    (None, True),                                              # no config: c_attn (H, 3H) is wider than tall
    ({"model_type": "gpt_bigcode"}, False),                    # the same names on Linear modules, (out, in)
])
def test_conv1d_recognised_by_model_type_architectures_or_shape(tmp_path, config, conv1d):
    tensors = gpt2_tensors()
    if not conv1d:  # GPTBigCode stores the same names as Linear weights, (out, in)
        tensors = {n: (np.ascontiguousarray(a.T) if n in CONV1D_NAMES else a) for n, a in tensors.items()}
    choices = choices_of(make_model(tmp_path / "m", tensors, config))
    assert {n for n in CONV1D_NAMES if choices[n].reason == CONV1D} == (set(CONV1D_NAMES) if conv1d else set())
    assert all(choices[n].quantize for n in CONV1D_NAMES) == (not conv1d)


def test_conv1d_without_config_stored_out_in_is_quantized(tmp_path):
    tensors = {n: (np.ascontiguousarray(a.T) if n in CONV1D_NAMES else a) for n, a in gpt2_tensors().items()}
    choices = choices_of(make_model(tmp_path / "m", tensors))
    assert all(choices[n].quantize for n in CONV1D_NAMES)


def test_include_and_plans_refuse_a_conv1d_weight(tmp_path, capsys):
    root = make_model(tmp_path / "gpt2", gpt2_tensors(), {"model_type": "gpt2"})
    with pytest.raises(NpquantError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight' \(F32 \(128, 384\)\) was picked "
                                           r"by --include but cannot be quantized: Conv1D weight stored \(in, out\)"):
        choices_of(root, include=[r"c_attn\.weight"])
    with pytest.raises(NpquantError, match=r"the plan names 'transformer\.h\.0\.mlp\.c_fc\.weight', which npquant "
                                           r"cannot quantize: Conv1D"):
        quantize_checkpoint(root, tmp_path / "out", {"transformer.h.0.mlp.c_fc.weight": "w8-channel"})
    code, _, err = run(capsys, "quantize", root, "-o", tmp_path / "out", "--include", r"c_fc\.weight")
    assert_one_line_error(code, err, r"cannot be quantized: Conv1D weight stored \(in, out\)")
    assert not (tmp_path / "out").exists()


def test_gpt2_with_nothing_else_to_quantize_says_why(tmp_path):
    tensors = {n: a for n, a in gpt2_tensors().items() if n != "score.weight"}
    root = make_model(tmp_path / "gpt2", tensors, {"model_type": "gpt2"})
    with pytest.raises(NpquantError, match=r"no tensor .* was selected for quantization; see --include; left alone, "
                                           r"Conv1D weight stored \(in, out\)"):
        quantize_checkpoint(root, tmp_path / "out", "w8-channel")


# --- MoE routers and fused experts ---------------------------------------------------------
@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.mlp.gate.weight", (4, 256)),                   # Qwen-MoE, DeepSeek, OLMoE: the fuzz case
    ("model.layers.0.block_sparse_moe.gate.weight", (8, 256)),      # Mixtral
    ("model.layers.0.mlp.router.weight", (32, 256)),                # gpt-oss
    ("model.layers.0.feed_forward.router.weight", (16, 256)),       # Llama 4, Jamba
    ("transformer.blocks.0.ffn.router.layer.weight", (16, 256)),    # DBRX
    ("model.layers.0.mlp.shared_expert_gate.weight", (1, 256)),     # Qwen2-MoE's shared expert
])
def test_moe_routers_are_kept_in_float(tmp_path, name, shape):
    # Fuzz finding: MoE routers (mlp.gate, 4 x 256) were quantized to int4 where every tool keeps them in float.
    tensors = {name: w(*shape), "model.layers.0.mlp.experts.0.up_proj.weight": w(128, 256, seed=1),
               "model.layers.0.mlp.gate_proj.weight": w(128, 256, seed=2)}
    root = make_model(tmp_path / "moe", tensors, {"model_type": "mixtral"})
    choices = choices_of(root)
    assert not choices[name].quantize and choices[name].reason == ROUTER and choices[name].quantizable
    assert choices["model.layers.0.mlp.experts.0.up_proj.weight"].quantize  # one expert's (out, in) weight
    assert choices["model.layers.0.mlp.gate_proj.weight"].quantize          # a gated MLP's projection
    assert choices_of(root, include=[re.escape(name)])[name].quantize       # --include may still quantize it
    summary = quantize_checkpoint(root, tmp_path / "out", "w4-g128")
    assert any(n.startswith(f"left alone, {ROUTER}") for n in summary["warnings"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert name[: -len(".weight")] in config["quantization_config"]["ignore"]
    assert name not in load(tmp_path / "out")


def test_a_gate_taller_than_wide_is_a_projection_not_a_router(tmp_path):
    choices = choices_of(make_model(tmp_path / "m", {"model.layers.0.mlp.gate.weight": w(512, 256)}))
    assert choices["model.layers.0.mlp.gate.weight"].quantize


def moe_tensors():
    """gpt-oss / Llama 4 style experts: every expert in one 3-D tensor, with a router and 2-D biases."""
    return {
        "model.layers.0.self_attn.q_proj.weight": w(256, 256),
        "model.layers.0.mlp.router.weight": w(4, 256, seed=1),
        "model.layers.0.mlp.experts.gate_up_proj": w(4, 256, 512, seed=2),       # (E, H, 2I)
        "model.layers.0.mlp.experts.gate_up_proj_bias": w(4, 512, seed=3),
        "model.layers.0.mlp.experts.down_proj": w(4, 256, 256, seed=4),          # (E, I, H)
        "model.layers.1.mlp.experts.weight": w(4, 512, 256, seed=5),             # (E, 2I, H) named .weight
        "transformer.blocks.0.ffn.experts.mlp.w1": w(4 * 128, 256, seed=6),      # DBRX: (E * I, H), 2-D
    }


FUSED = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
         "model.layers.1.mlp.experts.weight", "transformer.blocks.0.ffn.experts.mlp.w1"]


def test_fused_3d_expert_tensors_are_listed_under_left_alone(tmp_path):
    # Fuzz finding: fused 3-D expert tensors were skipped without appearing under "left alone".
    root = make_model(tmp_path / "moe", moe_tensors(), {"model_type": "gpt_oss"})
    choices = choices_of(root)
    assert {n for n, c in choices.items() if c.reason == FUSED_EXPERTS} == set(FUSED)
    assert choices["model.layers.0.mlp.experts.gate_up_proj_bias"].reason == "not a .weight tensor"  # a bias
    with pytest.raises(NpquantError, match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' .* was picked by "
                                           r"--include but cannot be quantized: fused MoE experts"):
        choices_of(root, include=["gate_up_proj$"])
    summary = quantize_checkpoint(root, tmp_path / "out", "w8-channel")
    assert set(FUSED) <= {c.name for c in summary["skipped"]}
    assert any(n.startswith(f"left alone, {FUSED_EXPERTS}") for n in summary["warnings"])
    assert list(load(tmp_path / "out")) == ["model.layers.0.self_attn.q_proj.weight"]
    from npquant.report import layer_report

    _, skipped = layer_report(root, ["w8-channel"])
    assert {n for n, why in skipped if why == FUSED_EXPERTS} == set(FUSED)
    assert ("model.layers.0.mlp.router.weight", ROUTER) in skipped


def test_report_shows_the_reason_of_every_layer_left_alone(tmp_path, capsys):
    tensors = {**gpt2_tensors(), **moe_tensors()}
    root = make_model(tmp_path / "m", tensors, {"model_type": "gpt2"})
    code, out, _ = run(capsys, "report", root, "--scheme", "w8-channel")
    assert code == 0
    listing = out[out.index("left alone:"):]
    assert "Conv1D weight stored (in, out)" in listing and "transformer.h.0.attn.c_attn.weight" in listing
    assert f"{ROUTER}: model.layers.0.mlp.router.weight" in listing
    assert FUSED_EXPERTS in listing and "model.layers.0.mlp.experts.gate_up_proj" in listing


def test_quantize_prints_why_unusual_layers_were_left_alone(tmp_path, capsys):
    root = make_model(tmp_path / "m", {**gpt2_tensors(), **moe_tensors()}, {"model_type": "gpt2"})
    code, _, err = run(capsys, "quantize", root, "-o", tmp_path / "out", "--scheme", "w8-channel")
    assert code == 0
    lines = err.splitlines()
    for why in (CONV1D, ROUTER, FUSED_EXPERTS):
        assert any(line.startswith(f"npquant quantize: warning: left alone, {why}") for line in lines), err


def test_a_tensor_whose_name_extends_a_weight_leaves_it_alone(tmp_path):
    # <m>.weight_orig beside <m>.weight would sit among <m>'s quantized tensors, and load would refuse the module.
    tensors = {"a.weight": w(128, 256), "a.weight_orig": w(128, 256, seed=1), "b.weight": w(128, 256, seed=2)}
    root = make_model(tmp_path / "m", tensors)
    choices = choices_of(root)
    assert not choices["a.weight"].quantize and "'a.weight_orig' beside it would clash" in choices["a.weight"].reason
    quantize_checkpoint(root, tmp_path / "out", "w8-channel")
    assert list(load(tmp_path / "out")) == ["b.weight"]


# --- inputs that are already quantized -------------------------------------------------------
def linear_model():
    """Two linear layers every preset can quantize (fp8 blocks take 128 x 128), a norm and an embedding."""
    return {
        "model.embed_tokens.weight": w(100, 256, dtype=ml_dtypes.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": w(128, 256, dtype=ml_dtypes.bfloat16, seed=1),
        "model.layers.0.mlp.down_proj.weight": w(256, 256, seed=2),
        "model.norm.weight": np.ones(256, np.float32),
    }


def with_weight(code_dtype):
    def make(root):
        tensors = linear_model()
        tensors["model.layers.0.mlp.down_proj.weight"] = np.ones((256, 256), code_dtype)
        return make_model(root, tensors, {"model_type": "llama"})
    return make


def compressed(preset, strip_config=False):
    """An npquant output directory as input: its config says so, or (stripped) its tensors do."""
    def make(root):
        src = make_model(root.parent / f"{root.name}-float", linear_model(), {"model_type": "llama"})
        quantize_checkpoint(src, root, preset)
        if strip_config:
            (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return root
    return make


def with_config(qc):
    def make(root):
        return make_model(root, linear_model(), {"model_type": "llama", "quantization_config": qc})
    return make


def gptq_names(root):
    tensors = {k: v for k, v in linear_model().items() if "down_proj" not in k}
    tensors["model.layers.0.mlp.down_proj.qweight"] = np.zeros((32, 256), np.int32)
    tensors["model.layers.0.mlp.down_proj.scales"] = np.ones((2, 256), np.float16)
    return make_model(root, tensors)


def gguf_file(root):
    root.mkdir(parents=True)
    (root / "model.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    return root / "model.gguf"


def gguf_dir(root):
    gguf_file(root)
    return root


ALREADY_QUANTIZED = {
    "int8-weight": (with_weight(np.int8), r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' in model\.safetensors "
                                          r"is int8 \(I8 \(256, 256\)\), not float; npquant quantizes float"),
    "uint8-weight": (with_weight(np.uint8), r"is uint8 \(U8 \(256, 256\)\), not float"),
    "fp8-e4m3-weight": (with_weight(ml_dtypes.float8_e4m3fn), r"is fp8 e4m3 \(F8_E4M3 \(256, 256\)\), not float"),
    "fp8-e5m2-weight": (with_weight(ml_dtypes.float8_e5m2), r"is fp8 e5m2 \(F8_E5M2 \(256, 256\)\), not float"),
    "gptq-config": (with_config({"quant_method": "gptq", "bits": 4}),
                    r"already quantized: its config\.json has a quantization_config \(quant_method 'gptq'\); "
                    r"npquant quantizes float checkpoints: give the original"),
    "compression-config": (with_config({"format": "pack-quantized"}), r"has a quantization_config \(format "),
    "gptq-names": (gptq_names, r"'model\.layers\.0\.mlp\.down_proj\.qweight' .* is a GPTQ/AWQ packed tensor"),
    # quantize and report convert a .gguf file (this one has no metadata); plan points at npquant convert
    "gguf-file": (gguf_file, r"model\.gguf(: the GGUF metadata has no general\.architecture| is a GGUF file "
                             r"\(llama\.cpp's format\), not a safetensors checkpoint: convert it first with "
                             r"'npquant convert )"),
    "gguf-dir": (gguf_dir, r"model\.gguf is a GGUF file \(llama\.cpp's format\), not a safetensors checkpoint: "
                           r"convert it first with 'npquant convert "),
}
PRESETS = ["w8-channel", "w4-g128", "w4-g128-asym", "w3-g128", "fp8-tensor", "fp8-channel", "fp8-block",
           "nvfp4", "mxfp4", "mxfp6", "mxfp8"]
for _p in PRESETS:
    ALREADY_QUANTIZED[f"compressed-tensors-{_p}"] = (
        compressed(_p), r"already quantized: its config\.json has a quantization_config \(quant_method "
                        r"'compressed-tensors', format '[a-z0-9-]+'\) \(npquant\.load reads it as it is\)")
    ALREADY_QUANTIZED[f"compressed-tensors-{_p}-no-config"] = (
        compressed(_p, strip_config=True), r"already quantized: tensor '.*' in model\.safetensors is "
                                           r"(a compressed-tensors tensor|fp8 e4m3 )")


@pytest.mark.parametrize("kind", list(ALREADY_QUANTIZED))
def test_already_quantized_input_is_refused_in_one_line(tmp_path, capsys, kind):
    # Fuzz finding: I8/U8/F8 weights were skipped and listed in ignore, and quantizing a compressed-tensors
    # directory again wrote something load refuses; both exited 0.
    make, pattern = ALREADY_QUANTIZED[kind]
    root = make(tmp_path / "in")
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in (["quantize", root, "-o", tmp_path / "out"], ["report", root], ["plan", root, "--bits", "6", "-o", tmp_path / "plan.json"]):
        code, _, err = run(capsys, *command)
        assert_one_line_error(code, err, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_refuse_quantized_is_callable_before_other_work(tmp_path):
    # The GPTQ path calibrates before it writes: it can refuse the input first with this.
    from npquant.checkpoints.selection import refuse_quantized

    with Checkpoint(compressed("w8-channel")(tmp_path / "ct")) as ckpt:
        with pytest.raises(NpquantError, match=r"ct is already quantized: its config\.json has a quantization_config"):
            refuse_quantized(ckpt)
    with Checkpoint(float_model(tmp_path / "float")) as ckpt:
        refuse_quantized(ckpt)


# --- the round trip: every input kind is refused, or written so that load reads it ------------
def float_model(root):
    return make_model(root, linear_model(), {"model_type": "llama"})


def f64_and_int_weights(root):
    tensors = {**linear_model(), "extra.weight": np.ones((8, 8), np.float64), "ids.weight": np.ones((8, 8), np.int32)}
    return make_model(root, tensors)


def gpt2(root):
    return make_model(root, gpt2_tensors(), {"model_type": "gpt2"})


def gpt2_conv1d_only(root):
    return make_model(root, {n: a for n, a in gpt2_tensors().items() if n != "score.weight"}, {"model_type": "gpt2"})


def moe(root):
    return make_model(root, moe_tensors(), {"model_type": "gpt_oss"})


def name_clash(root):
    return make_model(root, {**linear_model(), "model.layers.0.mlp.down_proj.weight_orig": w(256, 256)})


LOADS = {  # input kind -> the tensors load returns
    "float": (float_model, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]),
    "f64-and-int-weights": (f64_and_int_weights, ["model.layers.0.self_attn.q_proj.weight",
                                                  "model.layers.0.mlp.down_proj.weight"]),
    "gpt2": (gpt2, ["score.weight"]),
    "moe": (moe, ["model.layers.0.self_attn.q_proj.weight"]),
    "name-clash": (name_clash, ["model.layers.0.self_attn.q_proj.weight"]),
}
ROUND_TRIP = {**{k: (make, None) for k, (make, _) in ALREADY_QUANTIZED.items()}, **LOADS,
              "gpt2-conv1d-only": (gpt2_conv1d_only, None)}


@pytest.mark.parametrize("kind", list(ROUND_TRIP))
@pytest.mark.parametrize("preset", ["w4-g128", "fp8-channel"])
def test_quantize_output_loads_or_quantize_refuses(tmp_path, kind, preset):
    make, loaded = ROUND_TRIP[kind]
    root = make(tmp_path / "in")
    try:
        summary = quantize_checkpoint(root, tmp_path / "out", preset)
    except NpquantError:
        assert loaded is None, f"{kind} should have been quantized"
        assert not (tmp_path / "out").exists()
        return
    got = load(tmp_path / "out")  # the property: what quantize writes, load reads
    assert loaded is not None, f"{kind} should have been refused"
    assert sorted(got) == sorted(loaded) == sorted(r.name for r in summary["layers"])
    assert all(qt.scheme == get_scheme(preset) for qt in got.values())
