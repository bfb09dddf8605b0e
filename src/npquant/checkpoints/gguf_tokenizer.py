"""The tokenizer of a GGUF file as ``tokenizer.json``: a byte-level BPE from its vocabulary and merges.

llama.cpp stores a BPE tokenizer as ``tokenizer.ggml.tokens`` (the
vocabulary, byte-level strings as in Hugging Face's files), ``token_type``
(normal, control, user-defined...), ``merges`` (``"a b"``, by rank) and the
name of its pre-tokenizer, ``tokenizer.ggml.pre``. :func:`tokenizer_json`
writes them in the ``tokenizers`` library's format with the pre-tokenizer
the model's own ``tokenizer.json`` has (:data:`SUPPORTED_PRE_TOKENIZERS`);
anything else is a one-line NpquantError naming it.

``meta`` is the reader's typed metadata (``text``, ``integer``, ``flag``,
``array`` accessors that raise one-line errors), passed in by
:mod:`npquant.checkpoints.gguf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import NpquantError

__all__ = [
    "tokenizer_json",
    "tokenizer_config",
    "SUPPORTED_PRE_TOKENIZERS",
]

#: ``tokenizer.ggml.pre`` values npquant builds a ``tokenizers`` pre-tokenizer for.
SUPPORTED_PRE_TOKENIZERS = ("smollm", "llama-bpe", "llama3", "llama-v3", "qwen2")

# Split patterns from the models' own tokenizer.json (llama.cpp's llama-vocab.cpp quotes them too).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


@dataclass(frozen=True)
class _Pre:
    """How a model's tokenizer.json splits text, and what llama.cpp assumes of it by default."""

    normalizer: dict | None  # tokenizers' normalizer, or None
    pre_tokenizer: dict  # tokenizers' pre-tokenizer
    ignore_merges: bool  # a word already in the vocabulary is one token (Llama 3)
    add_bos: bool  # llama.cpp's default where the GGUF has no tokenizer.ggml.add_bos_token
    clean_up_spaces: bool  # transformers' clean_up_tokenization_spaces


_PRE = {
    # SmolLM (StarCoder's): single digits, then GPT-2's byte-level split
    "smollm": _Pre(None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                _byte_level(True)]}, False, False, False),
    "llama-bpe": _Pre(None, {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_SPLIT), _byte_level(False)]},
                      True, True, True),
    "qwen2": _Pre({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [_split(_QWEN2_SPLIT), _byte_level(False)]},
                  False, False, False),
}
_PRE["llama3"] = _PRE["llama-v3"] = _PRE["llama-bpe"]

# tokenizer.ggml.token_type values
_CONTROL, _USER_DEFINED = 3, 4


def _vocabulary(path: Path, meta) -> tuple[list[str], list[int]]:
    model = meta.text("tokenizer.ggml.model", required=False)
    if model is None:
        raise NpquantError(f"{path} holds no tokenizer (no tokenizer.ggml.model)")
    if model != "gpt2":
        raise NpquantError(f"{path}: tokenizer.ggml.model is {model!r}; npquant builds byte-level BPE "
                           f"tokenizers ('gpt2') only")
    tokens = meta.array("tokenizer.ggml.tokens")
    types = meta.array("tokenizer.ggml.token_type", required=False) or [1] * len(tokens)
    if (len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in types)):
        raise NpquantError(f"{path}: tokenizer.ggml.tokens ({len(tokens)}) and token_type ({len(types)}) "
                           f"must be lists of the same length, of strings and integers")
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise NpquantError(f"{path}: token {token!r} appears twice in the vocabulary (ids {seen[token]} and {i})")
        seen[token] = i
    return tokens, types


def tokenizer_json(path: Path, meta) -> dict:
    """``tokenizer.json`` of the GGUF whose metadata is ``meta`` (see GGUFModel.tokenizer_json)."""
    tokens, types = _vocabulary(path, meta)
    pre = meta.text("tokenizer.ggml.pre", "default", required=False)
    if pre not in _PRE:
        raise NpquantError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; npquant builds "
                           f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    how = _PRE[pre]
    merges = meta.array("tokenizer.ggml.merges")
    for merge in merges:
        if not isinstance(merge, str) or merge.count(" ") != 1:
            raise NpquantError(f"{path}: merge {merge!r} of tokenizer.ggml.merges is not two tokens and a space")
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == _CONTROL}
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)]
    byte_level_post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    post = _template(path, meta, tokens, how.add_bos, byte_level_post)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": how.normalizer,
        "pre_tokenizer": how.pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": how.ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def _special(path: Path, meta, tokens: list[str], which: str) -> int | None:
    token = meta.integer(f"tokenizer.ggml.{which}_token_id")
    if token is not None and token >= len(tokens):
        raise NpquantError(f"{path}: tokenizer.ggml.{which}_token_id = {token} is outside the vocabulary "
                           f"of {len(tokens)} tokens")
    return token


def _template(path: Path, meta, tokens: list[str], add_bos_default: bool, byte_level: dict) -> dict:
    """The post-processor: byte-level offsets, then bos/eos where the GGUF says they are added."""
    add = [(which, meta.flag(f"tokenizer.ggml.add_{which}_token", default)) for which, default in
           (("bos", add_bos_default), ("eos", False))]
    added = {which: _special(path, meta, tokens, which) for which, on in add if on}
    added = {which: token for which, token in added.items() if token is not None}
    if not added:
        return byte_level

    def piece(type_id: int, seq: str) -> list:
        out = [{"SpecialToken": {"id": tokens[added["bos"]], "type_id": type_id}}] if "bos" in added else []
        out.append({"Sequence": {"id": seq, "type_id": type_id}})
        if "eos" in added:
            out.append({"SpecialToken": {"id": tokens[added["eos"]], "type_id": type_id}})
        return out

    template = {"type": "TemplateProcessing", "single": piece(0, "A"), "pair": piece(0, "A") + piece(1, "B"),
                "special_tokens": {tokens[t]: {"id": tokens[t], "ids": [t], "tokens": [tokens[t]]}
                                   for t in added.values()}}
    return {"type": "Sequence", "processors": [byte_level, template]}


def tokenizer_config(path: Path, meta, config: dict) -> dict:
    """A minimal ``tokenizer_config.json``: special tokens, ``add_bos_token``/``add_eos_token``, the chat template."""
    tokens, _ = _vocabulary(path, meta)
    pre = meta.text("tokenizer.ggml.pre", "default", required=False)
    if pre not in _PRE:
        raise NpquantError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; npquant builds "
                           f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    how = _PRE[pre]
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": how.clean_up_spaces,
                 "model_max_length": config["max_position_embeddings"]}
    for which in ("bos", "eos", "unknown", "padding"):
        token = _special(path, meta, tokens, which)
        if token is not None:
            out[{"unknown": "unk", "padding": "pad"}.get(which, which) + "_token"] = tokens[token]
    out["add_bos_token"] = bool(meta.flag("tokenizer.ggml.add_bos_token", how.add_bos))
    out["add_eos_token"] = bool(meta.flag("tokenizer.ggml.add_eos_token", False))
    template = meta.text("tokenizer.chat_template", required=False)
    if template is not None:
        out["chat_template"] = template
    return out
