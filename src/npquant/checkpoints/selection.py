"""Which tensors of a checkpoint are quantized: :class:`LayerChoice` and :func:`select_layers`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import NpquantError
from ..safetensors_io import Checkpoint, TensorSource
from ..schemes import Scheme

__all__ = [
    "LayerChoice",
    "select_layers",
]

_QUANTIZABLE = ("F32", "F16", "BF16")
# Module names that are not linear layers, or that engines keep in full precision.
_SKIP_RULES = (
    (re.compile(r"(^|\.)lm_head$"), "lm_head is kept in full precision"),
    (re.compile(r"(embed|embedding|wte$|wpe$)", re.I), "embedding table, not a linear layer"),
    (re.compile(r"(norm|ln_\w*$|ln\d*$)", re.I), "normalization weight, not a linear layer"),
)


@dataclass(frozen=True)
class LayerChoice:
    """Whether one tensor is quantized, and why not when it is not."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantize: bool
    reason: str = ""

    @property
    def module(self) -> str:
        """The module name: the tensor name without ``.weight``."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


def select_layers(
    ckpt: Checkpoint, scheme: Scheme | None = None, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[LayerChoice]:
    """Decide for every tensor of ``ckpt`` whether it is quantized.

    By default: every 2-D floating (F32, F16, BF16) tensor named ``*.weight``
    of a linear layer; embeddings, norms and ``lm_head`` are skipped. A name
    matching an ``include`` regex (``re.search``) is picked whatever the
    default says; one matching an ``exclude`` regex is skipped. With a group
    scheme, a layer whose ``in_features`` the group size does not divide is
    skipped. A tensor picked by ``include`` that is not a 2-D floating
    weight is an error.
    """
    inc = [_compile(p, "--include") for p in include or []]
    exc = [_compile(p, "--exclude") for p in exclude or []]
    out = []
    for name, t in ckpt.tensors.items():
        forced = any(r.search(name) for r in inc)
        reason = _default_skip(name, t)
        if forced and (t.ndim != 2 or t.code not in _QUANTIZABLE):
            raise NpquantError(
                f"tensor {name!r} ({t.code} {t.shape}) was picked by --include but only 2-D "
                f"float32/float16/bfloat16 weights can be quantized"
            )
        if forced:
            reason = ""
        if not reason and any(r.search(name) for r in exc):
            reason = "excluded by --exclude"
        if not reason and scheme is not None and scheme.granularity == "group" and t.shape[1] % scheme.group_size:
            reason = f"group_size={scheme.group_size} does not divide in_features={t.shape[1]}"
        out.append(LayerChoice(name, t.shape, t.code, not reason, reason))
    return out


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise NpquantError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None


def _default_skip(name: str, t: TensorSource) -> str:
    if not name.endswith(".weight"):
        return "not a .weight tensor"
    if t.ndim != 2:
        return f"{t.ndim}-D, not a linear weight"
    if t.code not in _QUANTIZABLE:
        return f"dtype {t.code} is not float32, float16 or bfloat16"
    module = name[: -len(".weight")]
    for rule, why in _SKIP_RULES:
        if rule.search(module):
            return why
    return ""
