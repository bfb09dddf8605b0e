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

import numpy as np

from .._backends import resolve_backend
from .._checks import dtype_name
from ..errors import NpquantError
from ..linear import linear
from ..prepared import PreparedTensor, prepare
from ..tensor import QuantizedTensor
from .causal_lm_config import ARCHITECTURES, CausalLMConfig
from .layers import apply_rope, causal_attention, rms_norm, swiglu

__all__ = ["CausalLM", "CausalLMConfig", "ARCHITECTURES"]

# Logits of one block of positions in the head: at most this many float32 (16 MiB).
_HEAD_ELEMENTS = 1 << 22

_QUANTIZED = (QuantizedTensor, PreparedTensor)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


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
        :meth:`hidden_states`. An array ``observe`` was shown is never
        written afterwards: a caller may keep it (the model objective's
        calibration does).
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
