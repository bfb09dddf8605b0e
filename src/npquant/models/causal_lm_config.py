"""The architecture of a Llama-family decoder, read from its ``config.json``: :class:`CausalLMConfig`.

Below :mod:`npquant.models.causal_lm`, whose forward it describes; transformers' defaults fill the keys a
``config.json`` leaves out, and anything the forward cannot run is refused in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import NpquantError
from .layers import Rope

__all__ = ["CausalLMConfig", "ARCHITECTURES"]

#: The architectures (``config.json`` ``architectures[0]``) the forward runs.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class CausalLMConfig:
    """The architecture, read from ``config.json`` by :meth:`from_json` (transformers' defaults where a key is absent)."""

    architecture: str  # one of ARCHITECTURES
    vocab_size: int  # V, rows of the embedding and of the head
    hidden_size: int  # C, model width
    intermediate_size: int  # F, SwiGLU width
    num_layers: int  # L, decoder layers
    num_heads: int  # H, query heads
    num_kv_heads: int  # K, key/value heads; H // K query heads share each (grouped-query attention)
    head_dim: int  # D, width of a head: config's head_dim, else C // H
    rms_norm_eps: float  # added to the mean square in every RMSNorm
    rope: Rope  # rope_theta and rope_scaling
    tie_word_embeddings: bool  # the head is embed_tokens itself (no lm_head.weight read)
    qkv_bias: bool  # q/k/v projections have biases (Qwen2; attention_bias of Llama, Qwen3)
    o_bias: bool  # o_proj has a bias (attention_bias of Llama, Qwen3)
    mlp_bias: bool  # gate/up/down have biases (Llama's mlp_bias)
    qk_norm: bool  # RMSNorm over D of each query and key head before RoPE (Qwen3)
    sliding_windows: tuple  # per layer: keys a query sees at most (int), or None for all before it

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise NpquantError(f"architecture {self.architecture!r} is not supported; "
                               f"the causal-LM forward runs {', '.join(ARCHITECTURES)}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NpquantError(f"{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise NpquantError(f"num_attention_heads={self.num_heads} must be a multiple of "
                               f"num_key_value_heads={self.num_kv_heads}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise NpquantError(f"rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps!r}")
        if self.head_dim % 2:
            raise NpquantError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.sliding_windows) != self.num_layers or not all(
            w is None or (isinstance(w, int) and w >= 1) for w in self.sliding_windows
        ):
            raise NpquantError(f"sliding_windows must hold a positive int or None per layer ({self.num_layers}), "
                               f"got {self.sliding_windows!r}")

    @classmethod
    def from_json(cls, config: dict) -> "CausalLMConfig":
        """The config of a ``config.json`` dict; an unsupported architecture or feature raises NpquantError."""
        if not isinstance(config, Mapping):
            raise NpquantError(f"config must be a dict read from config.json, got {type(config).__name__}")
        arch = _architecture(config)
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise NpquantError(f"config.json hidden_act={act!r}: the causal-LM forward runs 'silu' (SwiGLU) only")
        defaults = _DEFAULTS[arch]
        hidden = _int(config, "hidden_size")
        heads = _int(config, "num_attention_heads")
        head_dim = config.get("head_dim", defaults["head_dim"])
        if head_dim is None:
            if hidden % heads:
                raise NpquantError(f"config.json hidden_size={hidden} is not a multiple of "
                                   f"num_attention_heads={heads}, and there is no head_dim")
            head_dim = hidden // heads
        kv_heads = config.get("num_key_value_heads", defaults["num_key_value_heads"])
        layers = _int(config, "num_hidden_layers")
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else _int({"num_key_value_heads": kv_heads}, "num_key_value_heads"),
            head_dim=_int({"head_dim": head_dim}, "head_dim"),
            rms_norm_eps=_float(config, "rms_norm_eps", 1e-6),
            rope=_rope(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or (arch != "MistralForCausalLM" and attention_bias),
            o_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and attention_bias,
            mlp_bias=arch == "LlamaForCausalLM" and bool(config.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_windows=_sliding_windows(config, arch, layers),
        )

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward reads, Hugging Face name -> shape, in the order it reads them."""
        C, F, V, D = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        HD, KD = self.num_heads * D, self.num_kv_heads * D
        shapes = {"model.embed_tokens.weight": (V, C)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (C,)
            for module, out_features in (("q_proj", HD), ("k_proj", KD), ("v_proj", KD)):
                shapes[p + f"self_attn.{module}.weight"] = (out_features, C)
                if self.qkv_bias:
                    shapes[p + f"self_attn.{module}.bias"] = (out_features,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (D,)
                shapes[p + "self_attn.k_norm.weight"] = (D,)
            shapes[p + "self_attn.o_proj.weight"] = (C, HD)
            if self.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (C,)
            shapes[p + "post_attention_layernorm.weight"] = (C,)
            for module, shape in (("gate_proj", (F, C)), ("up_proj", (F, C)), ("down_proj", (C, F))):
                shapes[p + f"mlp.{module}.weight"] = shape
                if self.mlp_bias:
                    shapes[p + f"mlp.{module}.bias"] = shape[:1]
        shapes["model.norm.weight"] = (C,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, C)
        return shapes

    def linear_names(self) -> list[str]:
        """The decoder layers' linear weights (what ``quantized`` and ``quantizer`` replace), in reading order."""
        return [n for n in self.tensor_shapes() if n.startswith("model.layers.") and n.endswith("_proj.weight")]


# --- config.json -------------------------------------------------------------------------------------
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}

# transformers' defaults for keys a config.json may leave out (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config).
_DEFAULTS = {
    "LlamaForCausalLM": {"num_key_value_heads": None, "head_dim": None, "sliding_window": None},
    "MistralForCausalLM": {"num_key_value_heads": 8, "head_dim": None, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"num_key_value_heads": 32, "head_dim": None, "sliding_window": 4096},
    "Qwen3ForCausalLM": {"num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096},
}


def _architecture(config: Mapping) -> str:
    archs = config.get("architectures")
    if archs is not None:
        if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
            raise NpquantError(f"config.json architectures must be a list of names, got {archs!r}")
        if archs[0] not in ARCHITECTURES:
            raise NpquantError(f"config.json architectures={archs!r} is not supported; "
                               f"the causal-LM forward runs {', '.join(ARCHITECTURES)}")
        return archs[0]
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise NpquantError(f"config.json has no architectures and model_type={model_type!r} is not supported; "
                           f"the causal-LM forward runs {', '.join(ARCHITECTURES)}")
    return _MODEL_TYPES[model_type]


def _int(config: Mapping, key: str, default=None) -> int:
    value = config.get(key, default)
    if value is None:
        raise NpquantError(f"config.json lacks {key!r}, which a causal LM's config needs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise NpquantError(f"config.json {key}={value!r} must be a positive integer")
    return int(value)


def _float(config: Mapping, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NpquantError(f"config.json {key}={value!r} must be a number")
    return float(value)


def _rope(config: Mapping) -> Rope:
    """rope_theta and rope_scaling (or transformers 5's rope_parameters, holding both)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise NpquantError(f"config.json rope_scaling must be an object or null, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if any(isinstance(v, Mapping) for v in params.values()):
        raise NpquantError("config.json gives RoPE parameters per layer type; the causal-LM forward runs one RoPE "
                           "for every layer")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise NpquantError(f"config.json partial_rotary_factor={partial!r}: the causal-LM forward rotates whole "
                           f"heads only (1.0)")
    theta = _float({"rope_theta": params.get("rope_theta", config.get("rope_theta", 10000.0))}, "rope_theta", 0.0)
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, "linear", factor=_rope_number(params, "factor"))
    if kind == "llama3":
        original = config.get("original_max_position_embeddings",
                              params.get("original_max_position_embeddings", config.get("max_position_embeddings")))
        return Rope(theta, "llama3", factor=_rope_number(params, "factor"),
                    low_freq_factor=_rope_number(params, "low_freq_factor"),
                    high_freq_factor=_rope_number(params, "high_freq_factor"),
                    original_max_position_embeddings=_int({"original_max_position_embeddings": original},
                                                          "original_max_position_embeddings"))
    return Rope(theta, kind)  # raises, naming the kinds the forward runs


def _rope_number(params: Mapping, key: str) -> float:
    kind = params.get("rope_type", params.get("type"))
    if key not in params:
        raise NpquantError(f"config.json rope_scaling of rope_type {kind!r} lacks {key!r}")
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NpquantError(f"config.json rope_scaling {key}={value!r} must be a number")
    return float(value)


def _sliding_windows(config: Mapping, arch: str, layers: int) -> tuple:
    """Each layer's sliding window (int) or None, as transformers reads them."""
    window = config.get("sliding_window", _DEFAULTS[arch]["sliding_window"])
    if arch == "LlamaForCausalLM":
        return (None,) * layers
    if arch == "MistralForCausalLM":
        if window is None:
            return (None,) * layers
        return (_int({"sliding_window": window}, "sliding_window"),) * layers
    # Qwen2, Qwen3: a window only where use_sliding_window, on the layers layer_types marks (by default
    # those from max_window_layers on).
    if not config.get("use_sliding_window", False) or window is None:
        return (None,) * layers
    window = _int({"sliding_window": window}, "sliding_window")
    types = config.get("layer_types")
    if types is None:
        first = config.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"full_attention",
                                                                                    "sliding_attention"}:
        raise NpquantError(f"config.json layer_types must list 'full_attention' or 'sliding_attention' for each of "
                           f"the {layers} layers, got {types!r}")
    return tuple(window if t == "sliding_attention" else None for t in types)
