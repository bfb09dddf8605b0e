"""A Llama-family causal language model in numpy: logits, next-token log-probs and perplexity.

Runs ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM`` from a ``config.json`` dict and a source of tensors
under their Hugging Face names, as transformers runs them:

1. ``x = embed_tokens[ids]`` ``(B, T, C)``.
2. Each decoder layer: ``x += o_proj(attention(RoPE(q), RoPE(k), v))`` of
   ``RMSNorm(x)``, grouped-query with the causal mask (a sliding window where
   the config has one), q/k/v biases where the architecture has them
   (Qwen2; Llama's and Qwen3's ``attention_bias``), Qwen3's RMSNorm of each
   q and k head before RoPE; then ``x += down(silu(gate(h)) * up(h))`` of
   ``h = RMSNorm(x)``.
3. ``logits = RMSNorm(x) @ lm_head.T`` (``embed_tokens`` itself where the
   embeddings are tied).

**Streamed.** The decoder layers' tensors are read from the source as each
is needed and dropped after use: at most one weight of one layer is held in
float32 at a time (the largest, ``F x C``, with its bias), beside the embedding (and the
untied head), kept as float32 from their first use, and the activations of
the tokens being run (``x`` ``(B, T, C)``, the MLP's ``(B, T, F)`` twice,
attention scores in blocks of at most 64 MiB). So peak memory is about
``4 (V C (1 or 2) + F C + B T (C + 2 F)) + 64 MiB`` bytes, whatever the
number of layers.

**The source** is a mapping from tensor name to array, or a callable
``name -> array`` (raising ``KeyError`` for a name it lacks). An array is a
numpy float16, bfloat16, float32 or float64 array, or an object with
``read()`` giving one (a :class:`npquant.safetensors_io.TensorSource`, so
``Checkpoint(path).tensors`` is a source). A linear weight may also be a
:class:`~npquant.QuantizedTensor` or :class:`~npquant.PreparedTensor`.

**Quantized layers.** ``quantized`` maps linear weight names to
:class:`~npquant.QuantizedTensor` s that replace the source's; it is read at
each use, not copied, so a sequential calibration can add each layer's
tensors as it quantizes them. ``quantizer(name, w)`` is called on each
decoder-layer linear weight ``w`` (float32 ``(O, I)``) the first time it is
read and returns a QuantizedTensor (kept, the float weight dropped) or None
(the weight stays float, read again each time). Quantized weights run through
:func:`npquant.linear`, in :func:`npquant.prepare`'s layout on the numba
backend: measured on 2 cores (``1536 x 576`` and ``576 x 1536``, SmolLM2's
MLP, six formats), prepared tensors take 0.85-0.99 of the time at 128
tokens and 0.92-1.07 at 512, and less at one token.

**Precision.** Computation is float32. float64 is used in two places: RoPE's
inverse frequencies (a table of ``D / 2`` numbers, rounded to float32 once),
and the sum of log-probs over positions in :meth:`CausalLM.perplexity`.

Token ids are ``(B, T)``, every row starting at position 0. Rows of different
lengths are right-padded: with the causal mask, padding never reaches the
positions before it.

>>> import numpy as np
>>> config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8,
...           "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2,
...           "num_key_value_heads": 1, "tie_word_embeddings": True}
>>> rng = np.random.default_rng(0)
>>> model = CausalLM(config, {name: rng.standard_normal(shape).astype(np.float32)
...                           for name, shape in CausalLMConfig.from_json(config).tensor_shapes().items()})
>>> model.logits(np.array([[1, 2, 3]])).shape
(1, 3, 16)
>>> model.next_token_log_probs(np.array([[1, 2, 3]])).shape
(1, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .._backends import resolve_backend
from .._checks import dtype_name
from ..errors import NpquantError
from ..linear import linear
from ..prepared import PreparedTensor, prepare
from ..tensor import QuantizedTensor
from .layers import Rope, apply_rope, causal_attention, rms_norm, swiglu

__all__ = ["CausalLM", "CausalLMConfig", "ARCHITECTURES"]

#: The architectures (``config.json`` ``architectures[0]``) the forward runs.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# Logits of one block of positions in the head: at most this many float32 (16 MiB).
_HEAD_ELEMENTS = 1 << 22

_QUANTIZED = (QuantizedTensor, PreparedTensor)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


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


class CausalLM:
    """A Llama-family causal LM in numpy, streamed layer by layer from a source of tensors.

    Parameters
    ----------
    config : dict (a ``config.json``) or CausalLMConfig
    weights : mapping or callable
        Hugging Face tensor name -> array (see the module docstring). A
        mapping is checked for every tensor :meth:`CausalLMConfig.tensor_shapes`
        lists at once; a callable as each is read. Shapes are checked as
        tensors are read.
    quantized : mapping or None
        Linear weight name -> QuantizedTensor or PreparedTensor, used instead of
        the source's; read at each use (the caller may add to it).
    quantizer : callable or None
        ``quantizer(name, w)`` with ``w`` float32 ``(O, I)``: a QuantizedTensor
        (kept) or None (the float weight is used). Called once per
        decoder-layer linear weight, at its first use.
    backend : {"auto", "numpy", "numba"}
        For :func:`npquant.linear` on quantized weights.

    Example with a safetensors model directory (not run here)::

        with Checkpoint(path) as ckpt:
            model = CausalLM(ckpt.config, ckpt.tensors)
            model.perplexity(ids)              # ids int (B, T)
    """

    def __init__(self, config, weights, *, quantized: Mapping | None = None, quantizer=None, backend: str = "auto"):
        self.config = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
        self.backend = backend
        resolve_backend(backend)  # checks the name
        if quantized is not None and not isinstance(quantized, Mapping):
            raise NpquantError(f"quantized must be a mapping of weight names to QuantizedTensor, "
                               f"got {type(quantized).__name__}")
        if quantizer is not None and not callable(quantizer):
            raise NpquantError(f"quantizer must be a callable (name, w) -> QuantizedTensor or None, "
                               f"got {type(quantizer).__name__}")
        self.quantized = quantized
        self.quantizer = quantizer
        self._shapes = self.config.tensor_shapes()
        if isinstance(weights, Mapping):
            have = weights.keys()
            missing = [n for n in self._shapes if n not in have and not (quantized is not None and n in quantized)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise NpquantError(f"weights lack tensor {missing[0]!r}{more}, which a "
                                   f"{self.config.architecture} of this config.json needs")
            self._read = weights.__getitem__
        elif callable(weights):
            self._read = weights
        else:
            raise NpquantError(f"weights must be a mapping of tensor names to arrays or a callable name -> array, "
                               f"got {type(weights).__name__}")
        self._runnable: dict = {}  # weight name -> (the tensor it was made from, what npquant.linear runs)
        self._embedding = None  # float32 (V, C), read at first use
        self._head = None  # float32 (V, C) (the embedding itself when tied) or a quantized runnable
        self._rope_tables = None  # (T, cos, sin) of the last length run

    # --- the forward ------------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """float32 ``(B, T, V)``: next-token logits at every position of ``token_ids`` int ``(B, T)``."""
        return self.head(self.hidden_states(token_ids))

    def hidden_states(self, token_ids, observe=None) -> np.ndarray:
        """float32 ``(B, T, C)``: the last layer's output after the final RMSNorm (what the head reads).

        ``observe(module, x)``, if given, sees each linear's input ``x``
        ``(B, T, I)`` before it runs, ``module`` its name without ``.weight``.
        """
        x = self.embed(token_ids)  # (B, T, C)
        for i in range(self.config.num_layers):
            x = self.layer(i, x, observe=observe)
        return rms_norm(x, self._tensor("model.norm.weight"), self.config.rms_norm_eps)

    def embed(self, token_ids) -> np.ndarray:
        """float32 ``(B, T, C)``: the embedding rows of ``token_ids`` int ``(B, T)`` (checked here)."""
        ids = self._check_ids(token_ids)
        return self._embeddings()[ids]  # (B, T, C), a new array

    def layer(self, i: int, x: np.ndarray, observe=None) -> np.ndarray:
        """Decoder layer ``i`` on ``x`` ``(B, T, C)`` (positions ``0 .. T - 1``): a new float32 ``(B, T, C)``.

        ``x`` may be float16, bfloat16, float32 or float64; it is computed in
        float32 and never changed.


        Reads the layer's tensors from the source one at a time and keeps
        none of them (quantized weights excepted); ``observe`` as in
        :meth:`hidden_states`.
        """
        cfg = self.config
        if not (isinstance(i, (int, np.integer)) and 0 <= i < cfg.num_layers):
            raise NpquantError(f"layer index must be an int in [0, {cfg.num_layers}), got {i!r}")
        x = self._check_hidden(x, "x", ndim=3)
        B, T, C = x.shape
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        p = f"model.layers.{i}."
        cos, sin = self._rope(T)  # (T, D) each

        h = rms_norm(x, self._tensor(p + "input_layernorm.weight"), cfg.rms_norm_eps)  # (B, T, C)
        q = self._linear(h, p + "self_attn.q_proj", cfg.qkv_bias, observe).reshape(B, T, H, D)  # (B, T, H, D)
        k = self._linear(h, p + "self_attn.k_proj", cfg.qkv_bias, observe).reshape(B, T, K, D)  # (B, T, K, D)
        v = self._linear(h, p + "self_attn.v_proj", cfg.qkv_bias, observe).reshape(B, T, K, D)  # (B, T, K, D)
        if cfg.qk_norm:
            q = rms_norm(q, self._tensor(p + "self_attn.q_norm.weight"), cfg.rms_norm_eps)
            k = rms_norm(k, self._tensor(p + "self_attn.k_norm.weight"), cfg.rms_norm_eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        ctx = causal_attention(q, k, v, cfg.sliding_windows[i]).reshape(B, T, H * D)  # (B, T, H * D)
        del q, k, v
        x = x + self._linear(ctx, p + "self_attn.o_proj", cfg.o_bias, observe)  # (B, T, C)
        del ctx

        h = rms_norm(x, self._tensor(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)  # (B, T, C)
        gate = self._linear(h, p + "mlp.gate_proj", cfg.mlp_bias, observe)  # (B, T, F)
        up = self._linear(h, p + "mlp.up_proj", cfg.mlp_bias, observe)  # (B, T, F)
        act = swiglu(gate, up)  # (B, T, F), in gate's memory
        del up
        x += self._linear(act, p + "mlp.down_proj", cfg.mlp_bias, observe)  # (B, T, C)
        return x

    def head(self, h: np.ndarray) -> np.ndarray:
        """float32 ``(..., V)``: logits of final hidden states ``h`` ``(..., C)`` (any float dtype, computed in float32)."""
        C = self.config.hidden_size
        h = self._check_hidden(h, "h")
        head = self._lm_head()
        if isinstance(head, np.ndarray):
            return (h.reshape(-1, C) @ head.T).reshape(*h.shape[:-1], -1)  # (N, V) -> (..., V)
        return linear(h, head, backend=self.backend)

    # --- log-probs and perplexity ------------------------------------------------------------------------
    def next_token_log_probs(self, token_ids) -> np.ndarray:
        """float32 ``(B, T - 1)``: ``log p(token_ids[b, t + 1] | token_ids[b, :t + 1])``.

        The head runs on blocks of positions whose logits stay under 16 MiB,
        each reduced to the targets' log-probs (log-softmax in float32) before
        the next, so ``(B, T, V)`` is never held.
        """
        ids = self._check_ids(token_ids)
        B, T = ids.shape
        if T < 2:
            raise NpquantError(f"token_ids must hold at least 2 tokens per row to score a next token, got shape "
                               f"{ids.shape}")
        h = self.hidden_states(ids)[:, :-1].reshape(B * (T - 1), -1)  # (N, C): positions that predict a token
        targets = ids[:, 1:].reshape(-1)  # (N,)
        out = np.empty(B * (T - 1), np.float32)
        step = max(1, _HEAD_ELEMENTS // self.config.vocab_size)
        for n0 in range(0, len(out), step):
            logits = self.head(h[n0:n0 + step])  # (n, V)
            logits -= logits.max(axis=1, keepdims=True)
            picked = logits[np.arange(len(logits)), targets[n0:n0 + step]]  # (n,)
            np.exp(logits, out=logits)
            out[n0:n0 + step] = picked - np.log(logits.sum(axis=1))
        return out.reshape(B, T - 1)  # (B, T - 1)

    def perplexity(self, token_ids) -> float:
        """``exp(-mean log p)`` over every predicted token of ``token_ids`` int ``(B, T)`` (``B (T - 1)`` of them).

        Each row is a separate text starting at position 0. The sum of
        log-probs is taken in float64.
        """
        log_probs = self.next_token_log_probs(token_ids)  # (B, T - 1)
        return float(math.exp(-np.sum(log_probs, dtype=np.float64) / log_probs.size))

    # --- tensors ---------------------------------------------------------------------------------------
    def _check_ids(self, token_ids) -> np.ndarray:
        """``token_ids`` as an integer array ``(B, T)`` with every id in ``[0, V)``, or NpquantError."""
        V = self.config.vocab_size
        if not isinstance(token_ids, np.ndarray):
            try:
                token_ids = np.asarray(token_ids)
            except ValueError:  # ragged lists
                raise NpquantError("token_ids must be an integer array (B, T); rows of different lengths must be "
                                   "right-padded to one length") from None
        if token_ids.dtype.kind not in "iu":
            raise NpquantError(f"token_ids must hold integers (int32, int64, ...), got {dtype_name(token_ids)}")
        if token_ids.ndim != 2 or token_ids.shape[0] < 1 or token_ids.shape[1] < 1:
            raise NpquantError(f"token_ids must have shape (B, T) with B, T >= 1 (one row per sequence), "
                               f"got {token_ids.shape}")
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= V:
            bad = low if low < 0 else high
            raise NpquantError(f"token_ids must lie in [0, vocab_size={V}), got {bad}")
        return token_ids

    def _check_hidden(self, x, what: str, ndim: int | None = None) -> np.ndarray:
        """Hidden states ``x`` ``(..., C)`` (``(B, T, C)`` where ``ndim`` is 3) as float32, or NpquantError."""
        C = self.config.hidden_size
        if not isinstance(x, np.ndarray) or dtype_name(x) not in _FLOAT_DTYPES:
            got = dtype_name(x) if isinstance(x, np.ndarray) else type(x).__name__
            raise NpquantError(f"{what} must be a float numpy array ({', '.join(_FLOAT_DTYPES)}), got {got}")
        if x.ndim < 1 or x.shape[-1] != C or (ndim is not None and x.ndim != ndim):
            want = "(B, T, C)" if ndim == 3 else "(..., C)"
            raise NpquantError(f"{what} must have shape {want} with C = hidden_size = {C}, got {x.shape}")
        return x.astype(np.float32, copy=False)

    def _rope(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        """RoPE's cos and sin ``(T, D)``, kept for the last length run (every layer reads them)."""
        if self._rope_tables is None or self._rope_tables[0] != T:
            self._rope_tables = (T, *self.config.rope.tables(T, self.config.head_dim))
        return self._rope_tables[1], self._rope_tables[2]

    def _embeddings(self) -> np.ndarray:
        if self._embedding is None:
            self._embedding = self._tensor("model.embed_tokens.weight")
        return self._embedding

    def _lm_head(self):
        if self._head is None:
            if self.config.tie_word_embeddings:
                self._head = self._embeddings()
            else:
                self._head = self._weight("lm_head.weight")
        return self._head

    def _linear(self, x: np.ndarray, module: str, has_bias: bool, observe) -> np.ndarray:
        """float32 ``(B, T, O)``: ``module``'s linear of ``x`` ``(B, T, I)``, its weight read now and dropped after."""
        if observe is not None:
            observe(module, x)
        w = self._weight(module + ".weight")
        bias = self._tensor(module + ".bias") if has_bias else None
        if not isinstance(w, np.ndarray):
            return linear(x, w, bias=bias, backend=self.backend)
        B, T, I = x.shape
        y = x.reshape(B * T, I) @ w.T  # (B * T, O): one BLAS call
        if bias is not None:
            y += bias
        return y.reshape(B, T, -1)  # (B, T, O)

    def _weight(self, name: str):
        """A linear weight: float32 ``(O, I)`` ndarray, or what :func:`npquant.linear` runs for its quantized form."""
        if self.quantized is not None and name in self.quantized:
            return self._run_form(name, self.quantized[name], "quantized")
        cached = self._runnable.get(name)
        if cached is not None and cached[0] is None:  # the quantizer's, kept
            return cached[1]
        w = self._tensor(name, allow_quantized=True)
        if not isinstance(w, np.ndarray):
            return self._run_form(name, w, "weights")
        if self.quantizer is not None and name.startswith("model.layers."):
            qt = self.quantizer(name, w)
            if qt is not None:
                run = self._run_form(name, qt, "quantizer")
                self._runnable[name] = (None, run)  # the quantized weight stays; the float one goes
                return run
        return w

    def _run_form(self, name: str, qt, where: str):
        """What :func:`npquant.linear` runs for quantized weight ``qt``: its prepared form on numba (made once)."""
        if not isinstance(qt, _QUANTIZED):
            raise NpquantError(f"{where}[{name!r}] must be a QuantizedTensor or PreparedTensor, "
                               f"got {type(qt).__name__}")
        if tuple(qt.shape) != self._shapes[name]:
            raise NpquantError(f"{where}[{name!r}] has shape {tuple(qt.shape)}, expected {self._shapes[name]}")
        cached = self._runnable.get(name)
        if cached is not None and cached[0] is qt:
            return cached[1]
        run = prepare(qt) if isinstance(qt, QuantizedTensor) and resolve_backend(self.backend) == "numba" else qt
        if where != "quantizer":
            self._runnable[name] = (qt, run)
        return run

    def _tensor(self, name: str, allow_quantized: bool = False):
        """Tensor ``name`` from the source as float32, its shape checked (quantized ones as they are, if allowed)."""
        try:
            value = self._read(name)
        except KeyError:
            raise NpquantError(f"weights lack tensor {name!r}, which a {self.config.architecture} of this "
                               f"config.json needs") from None
        if isinstance(value, _QUANTIZED):
            if allow_quantized:
                if tuple(value.shape) != self._shapes[name]:
                    raise NpquantError(f"tensor {name!r} has shape {tuple(value.shape)}, "
                                       f"expected {self._shapes[name]}")
                return value
            if name == "model.embed_tokens.weight":
                value = value.dequantize() if isinstance(value, QuantizedTensor) else value.quantized().dequantize()
            else:
                raise NpquantError(f"tensor {name!r} must be a float array, got a {type(value).__name__} "
                                   f"(only linear weights may be quantized)")
        if not isinstance(value, np.ndarray) and hasattr(value, "read"):
            value = value.read()  # a TensorSource of a checkpoint
        if not isinstance(value, np.ndarray):
            raise NpquantError(f"tensor {name!r} must be a numpy array, got {type(value).__name__}")
        if dtype_name(value) not in _FLOAT_DTYPES:
            raise NpquantError(f"tensor {name!r} must be {', '.join(_FLOAT_DTYPES)}, got {dtype_name(value)}")
        if value.shape != self._shapes[name]:
            raise NpquantError(f"tensor {name!r} has shape {value.shape}, expected {self._shapes[name]} "
                               f"from config.json")
        return value.astype(np.float32, copy=False)


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
