"""A BERT sentence encoder in numpy: all-MiniLM-L6-v2, as sentence-transformers runs it.

Pipeline (sentence-transformers' Transformer -> Pooling(mean) -> Normalize):

1. ``tokenizers`` with the model's ``tokenizer.json`` (lowercasing WordPiece),
   ``[CLS] ... [SEP]``, truncated to ``max_seq_length`` (256) tokens
   including the special tokens, padded to the longest in the batch, with an
   attention mask.
2. Embeddings: word + position + token type 0, then LayerNorm.
3. Post-layer-norm blocks: ``x = LN(x + Attn(x))``; ``x = LN(x + W2 GELU(W1 x))``
   with exact (erf) GELU; padded keys get ``float32.min`` added to their
   attention scores, as in transformers.
4. Mean over the tokens the mask keeps, then L2 normalisation.

Every linear layer goes through :func:`npquant.linear` when its weight is a
:class:`~npquant.QuantizedTensor`, else ``x @ W.T + b`` in float32. This
module is the forward alone: quantizing the encoder (round to nearest, or
GPTQ run on calibration text) is :class:`~npquant.models.SentenceEncoder`'s,
in :mod:`npquant.models.sentence_encoder`, above the calibration drivers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NpquantError
from .._backends import resolve_backend
from ..linear import linear
from ..prepared import ROWS, PreparedTensor, prepare
from ..schemes import Scheme
from ..tensor import QuantizedTensor

__all__ = ["BertEncoder", "BertConfig"]


@dataclass(frozen=True)
class BertConfig:
    """The architecture, read from ``config.json``."""

    hidden_size: int  # C, model width
    num_layers: int  # transformer blocks
    num_heads: int  # H; head width D = C // H
    intermediate_size: int  # feed-forward width
    layer_norm_eps: float
    max_position: int  # rows of the position table

    @classmethod
    def from_json(cls, config: dict) -> "BertConfig":
        try:
            act = config.get("hidden_act", "gelu")
            if act != "gelu":
                raise NpquantError(f"config.json hidden_act={act!r}: only exact 'gelu' BERT models are supported")
            return cls(
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                max_position=int(config["max_position_embeddings"]),
            )
        except KeyError as exc:
            raise NpquantError(f"config.json lacks {exc.args[0]!r}: is this a BERT model?") from None


class BertEncoder:
    """Sentence embeddings from a BERT checkpoint, in numpy: the forward.

    Linear weights may be float32 arrays or :class:`~npquant.QuantizedTensor` s;
    :class:`~npquant.models.SentenceEncoder` adds ``quantized()``. Example
    (needs the bundled model, so not run as a doctest)::

        enc = BertEncoder.from_pretrained()             # all-MiniLM-L6-v2
        enc.encode(["a sentence", "another"]).shape    # (2, 384), float32
    """

    def __init__(self, config: BertConfig, tensors: dict, tokenizer, max_seq_length: int = 256,
                 backend: str = "auto", scheme: Scheme | None = None):
        self.config = config
        self.tensors = tensors  # name -> float32 array or QuantizedTensor (linear weights)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.backend = backend
        self.scheme = scheme
        self.layer_report = None  # per-layer rows of the method that quantized it, if it reports any
        self._prepared: dict = {}  # weight name -> (QuantizedTensor, what linear runs for it)
        self._nonlinear = None  # GELU, LayerNorm and softmax for the backend (see _ops)

    # --- loading -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, backend: str = "auto") -> "BertEncoder":
        """Load a model directory (``None``: the bundled all-MiniLM-L6-v2)."""
        from ..checkpoints import default_model_path, refuse_quantized
        from ..safetensors_io import Checkpoint

        root = Path(path) if path is not None else default_model_path()
        if not root.is_dir():
            raise NpquantError(f"MODEL {root} is not a model directory (config.json, tokenizer.json, safetensors)")
        for needed in ("config.json", "tokenizer.json"):
            if not (root / needed).is_file():
                raise NpquantError(f"MODEL {root} has no {needed}")
        config = BertConfig.from_json(json.loads((root / "config.json").read_text()))
        max_len = 256
        st_config = root / "sentence_bert_config.json"
        if st_config.is_file():
            max_len = int(json.loads(st_config.read_text()).get("max_seq_length", max_len))
        with Checkpoint(root) as ckpt:
            refuse_quantized(ckpt)  # fp8 or packed codes read as float weights would run, silently wrong
            tensors = {}
            for name, src in ckpt.tensors.items():
                arr = src.read()
                key = name[len("bert."):] if name.startswith("bert.") else name
                tensors[key] = arr.astype(np.float32) if arr.dtype.kind in "fV" else arr
        missing = [n for n in _required(config) if n not in tensors]
        if missing:
            raise NpquantError(f"MODEL {root} lacks tensor {missing[0]!r}: not a BERT encoder")
        return cls(config, tensors, _load_tokenizer(root / "tokenizer.json", max_len), max_len, backend)

    def linear_names(self) -> list[str]:
        """The linear weights of the encoder blocks (what :meth:`quantized` replaces)."""
        names = []
        for i in range(self.config.num_layers):
            p = f"encoder.layer.{i}."
            names += [p + s + ".weight" for s in _BLOCK_LINEARS]
        return names

    def with_backend(self, backend: str) -> "BertEncoder":
        """A copy of this encoder (same class) that runs on ``backend``, holding the same tensors in a dict of its
        own: replacing a tensor of the copy leaves this encoder as it is."""
        return type(self)(self.config, dict(self.tensors), self.tokenizer, self.max_seq_length, backend, self.scheme)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the encoder holds (quantized ones exactly)."""
        return int(sum(t.nbytes for t in self.tensors.values()))

    @property
    def linear_bits_per_weight(self) -> float:
        """Storage bits per weight of the linear layers, scales included."""
        names = self.linear_names()
        nbytes = sum(self.tensors[n].nbytes for n in names)  # float32 layers count 32 bits
        count = sum(int(np.prod(self.tensors[n].shape)) for n in names)
        return 8.0 * nbytes / count

    # --- inference ------------------------------------------------------------------
    def tokenize(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids and attention mask, both ``(B, T)``, padded to the longest."""
        encodings = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask

    def encode(self, sentences, batch_size: int = 32) -> np.ndarray:
        """float32 ``(n, C)``: L2-normalised mean-pooled embeddings, in input order.

        Sentences are sorted by token count and batched (at most
        ``batch_size``, and a batch ends where lengths halve, so one long
        sentence does not pad many short ones), then put back in order.
        Padding does not change a sentence's embedding beyond float32
        rounding: padded keys get zero attention weight.
        """
        if isinstance(sentences, str):
            raise NpquantError("sentences must be a list of strings, not one string")
        sentences = list(sentences)
        if not all(isinstance(s, str) for s in sentences):
            raise NpquantError("sentences must be strings")
        if batch_size < 1:
            raise NpquantError(f"batch_size must be at least 1, got {batch_size}")
        out = np.zeros((len(sentences), self.config.hidden_size), np.float32)
        for batch in self.batches(sentences, batch_size):
            ids, mask = self.tokenize([sentences[j] for j in batch])
            out[batch] = self._forward(ids, mask)
        return out

    def batches(self, sentences: list[str], batch_size: int = 32) -> list[list[int]]:
        """Indices of ``sentences`` grouped as :meth:`encode` runs them: longest first, breaking where lengths halve."""
        lengths = [sum(e.attention_mask) for e in self.tokenizer.encode_batch(list(sentences))]
        order = sorted(range(len(sentences)), key=lambda i: -lengths[i])
        out: list[list[int]] = []
        batch: list[int] = []
        for i in order + [None]:
            if batch and (i is None or len(batch) == batch_size or 2 * lengths[i] < lengths[batch[0]]):
                out.append(batch)
                batch = []
            if i is not None:
                batch.append(i)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        x, bias = self._embed(ids, mask)
        for i in range(self.config.num_layers):
            x = self._block(i, x, bias)
        return self._pool(x, mask)

    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(B, T, C)`` embeddings after LayerNorm, and the additive attention mask over keys ``(B, T)``."""
        cfg = self.config
        t = self.tensors
        T = ids.shape[1]
        x = t["embeddings.word_embeddings.weight"][ids]  # (B, T, C)
        x = x + t["embeddings.position_embeddings.weight"][:T][None]
        x = x + t["embeddings.token_type_embeddings.weight"][0][None, None]
        x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], cfg.layer_norm_eps)
        # Additive mask over keys, as transformers builds it: 0 or float32.min.
        bias = (1.0 - mask.astype(np.float32)) * np.finfo(np.float32).min  # (B, T)
        return x, bias

    def _block(self, i: int, x: np.ndarray, bias: np.ndarray, observe=None) -> np.ndarray:
        """Transformer block ``i`` on ``x (B, T, C)``; ``observe(module, input)`` sees each linear's input first.

        An array ``observe`` was shown is never written afterwards: a caller may keep it.
        """
        cfg = self.config
        t = self.tensors
        B, T, C = x.shape
        H = cfg.num_heads
        D = C // H
        scale = np.float32(1.0 / math.sqrt(D))
        p = f"encoder.layer.{i}."

        def lin(inp: np.ndarray, module: str) -> np.ndarray:
            if observe is not None:
                observe(p + module, inp)
            return self._linear(inp, p + module)

        fused = self._fused_qkv(i) if observe is None else None
        if fused is not None:  # one call for the three projections
            qkv = linear(x, fused[0], bias=fused[1], backend=self.backend)  # (B, T, 3C)
            q, k, v = (qkv[..., j * C : (j + 1) * C] for j in range(3))
        else:
            q, k, v = (lin(x, "attention.self." + m) for m in ("query", "key", "value"))
        q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = k.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        v = v.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        ops = self._ops()
        probs = ops.softmax_scaled(q @ k.transpose(0, 1, 3, 2), scale, bias)  # (B, H, T, T)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
        attn = lin(ctx, "attention.output.dense")
        x = ops.add_layer_norm(attn, x, t[p + "attention.output.LayerNorm.weight"],
                               t[p + "attention.output.LayerNorm.bias"], cfg.layer_norm_eps)
        h = ops.gelu(lin(x, "intermediate.dense"))  # (B, T, intermediate)
        h = lin(h, "output.dense")
        return ops.add_layer_norm(h, x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"],
                                  cfg.layer_norm_eps)

    def _ops(self):
        """The non-linear parts for this encoder's backend: one-pass numba kernels on ``"numba"``, else numpy."""
        if self._nonlinear is None:
            self._nonlinear = _NumbaOps if resolve_backend(self.backend) == "numba" else _NumpyOps
        return self._nonlinear

    @staticmethod
    def _pool(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """float32 ``(B, C)``: mean over the kept tokens of ``x (B, T, C)``, L2-normalised."""
        m = mask.astype(np.float32)[:, :, None]  # (B, T, 1)
        pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))  # (B, C)
        norm = np.sqrt((pooled * pooled).sum(axis=1, keepdims=True))
        return pooled / np.maximum(norm, np.float32(1e-12))

    def _linear(self, x: np.ndarray, module: str) -> np.ndarray:
        w = self.tensors[module + ".weight"]
        b = self.tensors[module + ".bias"]
        if isinstance(w, QuantizedTensor):
            return linear(x, self._runnable(module + ".weight", w), bias=b, backend=self.backend)
        y = x.reshape(-1, x.shape[-1]) @ w.T  # (B * T, O): one BLAS call
        y += b
        return y.reshape(*x.shape[:-1], w.shape[0])


    def _fused_qkv(self, i: int):
        """Block ``i``'s query, key and value weights as one ``(3C, C)`` tensor to run, and their bias; or None.

        An engine's fused QKV projection: one call reads ``x`` once and
        splits its work over more rows. The codes and scales are the three
        tensors' rows stacked, so every output row is computed as by its own
        layer, bit for bit (at large batches each part goes to BLAS as its
        own layer's: :func:`~npquant.prepare`'s ``parts``). Only on the numba
        backend (the numpy one is the reference), where the three are quantized
        alike with scales per row or per block of rows that fits ``C`` (not
        per tensor, no global scale or act-order permutation) and
        :func:`~npquant.prepare` lays them out. Made once per set of tensors,
        like :meth:`_runnable`.
        """
        p = f"encoder.layer.{i}.attention.self."
        ws = tuple(self.tensors[p + m + ".weight"] for m in ("query", "key", "value"))
        cached = self._prepared.get(p + "qkv")
        if cached is not None and all(a is b for a, b in zip(cached[0], ws)):
            return cached[1]
        fused = None
        first = ws[0]
        fits = (resolve_backend(self.backend) == "numba"
                and all(isinstance(w, QuantizedTensor) for w in ws)
                and all(w.scheme == first.scheme and w.shape == first.shape for w in ws)
                and first.scheme.granularity != "tensor"
                and all(w.global_scale is None and w.perm is None for w in ws)
                and first.shape[0] % first.block_shape[0] == 0)
        if fits:
            zp = None if first.zero_point is None else np.concatenate([w.zero_point for w in ws])
            qt = QuantizedTensor(np.concatenate([w.codes for w in ws]), np.concatenate([w.scale for w in ws]), zp,
                                 (3 * first.shape[0], first.shape[1]), first.scheme)
            run = prepare(qt, parts=tuple(w.shape[0] for w in ws)) if first.shape[0] % ROWS == 0 else qt
            if isinstance(run, PreparedTensor):
                bias = np.concatenate([self.tensors[p + m + ".bias"] for m in ("query", "key", "value")])
                fused = (run, bias.astype(np.float32))
        self._prepared[p + "qkv"] = (ws, fused)
        return fused

    def _runnable(self, name: str, w: QuantizedTensor):
        """What :func:`npquant.linear` runs for weight ``w``: its prepared form on the numba backend (made once).

        The kernels read :func:`npquant.prepare`'s blocks of rows faster at
        every batch (the engine's load-time repack); ``w`` itself stays in
        :attr:`tensors` (checkpoints, byte counts). Kept per name with the
        tensor it was made from, so a layer replaced since is prepared again.
        """
        cached = self._prepared.get(name)
        if cached is not None and cached[0] is w:
            return cached[1]
        run = prepare(w) if resolve_backend(self.backend) == "numba" else w
        self._prepared[name] = (w, run)
        return run


class _NumpyOps:
    """The encoder's non-linear parts in numpy (the reference; shapes as :class:`_NumbaOps`)."""

    @staticmethod
    def gelu(h: np.ndarray) -> np.ndarray:
        return _gelu(h)

    @staticmethod
    def add_layer_norm(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
        return _layer_norm(a + b, gamma, beta, eps)

    @staticmethod
    def softmax_scaled(scores: np.ndarray, scale: np.float32, key_bias: np.ndarray) -> np.ndarray:
        return _softmax(scores * scale + key_bias[:, None, None, :])


class _NumbaOps:
    """The encoder's non-linear parts, each one pass of :mod:`npquant.kernels` (numba).

    Measured on 2 cores, float32: GELU of ``(12, 1536)`` (one sentence)
    60 -> 20 us and of ``(480, 1536)`` 2.2-8 -> 0.8 ms; residual LayerNorm
    of ``(12, 384)`` 20 -> 2 us; softmax of ``(32, 12, 15, 15)`` 0.57 ->
    0.19 ms.
    """

    @staticmethod
    def gelu(h: np.ndarray) -> np.ndarray:
        """GELU of ``h (..., F)``, a linear's fresh output: computed in place."""
        from ..kernels import gelu

        return gelu(h, out=h)

    @staticmethod
    def add_layer_norm(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
        """float32 ``(..., C)``: LayerNorm of ``a + b``, both ``(..., C)``."""
        from ..kernels import add_layer_norm

        return add_layer_norm(a, b, gamma, beta, eps)

    @staticmethod
    def softmax_scaled(scores: np.ndarray, scale: np.float32, key_bias: np.ndarray) -> np.ndarray:
        """float32 ``(B, H, T, K)``: softmax over keys of ``scores * scale + key_bias`` (``key_bias (B, K)``)."""
        from ..kernels import softmax_scaled

        return softmax_scaled(scores, scale, key_bias)


_BLOCK_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def _required(config: BertConfig) -> list[str]:
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(config.num_layers):
        p = f"encoder.layer.{i}."
        for s in _BLOCK_LINEARS:
            names += [p + s + ".weight", p + s + ".bias"]
        for s in ("attention.output.LayerNorm", "output.LayerNorm"):
            names += [p + s + ".weight", p + s + ".bias"]
    return names


def _load_tokenizer(path: Path, max_len: int):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise NpquantError("the sentence encoder needs tokenizers: pip install 'npquant[models]'") from None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises a plain Exception on bad files
        raise NpquantError(f"{path} is not a tokenizers file: {exc}") from None
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis, float32 (biased variance, as torch)."""
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + np.float32(eps)) * gamma + beta


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


# Abramowitz & Stegun 7.1.26: |erf(x) - approximation| <= 1.5e-7 for all x,
# about float32's resolution of erf's values near 1.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(x: np.ndarray) -> np.ndarray:
    """float32 erf, within 1.5e-7 (+ float32 rounding) of the exact value."""
    a = np.abs(x)
    t = np.float32(_AS_P) * a
    t += np.float32(1.0)
    np.reciprocal(t, out=t)
    poly = np.float32(_AS_A[4]) * t
    for c in _AS_A[3::-1]:
        poly += np.float32(c)
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(np.float32(1.0), poly, out=poly)
    return np.copysign(poly, x, out=poly)


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``x / 2 * (1 + erf(x / sqrt(2)))``."""
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(1.0 / math.sqrt(2.0))))
