"""Which tensors of a checkpoint are quantized: :class:`LayerChoice` and :func:`select_layers`.

A tensor is quantized when it is a 2-D float linear weight stored
``(out_features, in_features)``. Everything else is left alone with a
reason, and the reasons come in three kinds:

- it cannot be quantized as a linear weight at all (not 2-D, not float, a
  GPT-2 ``Conv1D`` weight stored ``(in, out)``, fused 3-D MoE experts, a
  name that the quantized tensors' names would clash with): ``--include``
  refuses it;
- it is kept in float by convention (embeddings, norms, ``lm_head``, MoE
  routers): ``--include`` may quantize it anyway;
- the user or the scheme says so (``--exclude``, a group size that does
  not divide ``in_features``).

A checkpoint that is already quantized (a ``quantization_config`` in its
config.json, integer or fp8 weights, compressed-tensors or GPTQ tensor
names) is refused whole: quantizing it again would write a checkpoint that
:func:`npquant.load` refuses.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from ..errors import NpquantError
from ..safetensors_io import Checkpoint, TensorSource
from ..schemes import Scheme

__all__ = [
    "LayerChoice",
    "select_layers",
    "left_alone_notes",
    "refuse_quantized",
]

_QUANTIZABLE = ("F32", "F16", "BF16")
# Module names that are not linear layers, or that engines keep in full precision.
_SKIP_RULES = (
    (re.compile(r"(^|\.)lm_head$"), "lm_head is kept in full precision"),
    (re.compile(r"(embed|embedding|wte$|wpe$)", re.I), "embedding table, not a linear layer"),
    (re.compile(r"(norm|ln_\w*$|ln\d*$)", re.I), "normalization weight, not a linear layer"),
)

NOT_A_WEIGHT = "not a .weight tensor"  # biases and buffers: left alone without a listing
CONV1D = "Conv1D weight stored (in, out), not (out, in): GPT-2's layout, left in float"
ROUTER = "MoE router (experts x hidden), kept in float as every engine keeps it"
FUSED_EXPERTS = "fused MoE experts (every expert in one tensor), not a 2-D linear weight: left in float"


@dataclass(frozen=True)
class LayerChoice:
    """Whether one tensor is quantized, and why not when it is not.

    ``quantizable`` is False when no flag can make npquant quantize it
    correctly (``--include`` and plans refuse it); ``notable`` marks a tensor
    left alone that the user should hear of: a layer npquant does not
    understand, or an MoE router.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantize: bool
    reason: str = ""
    quantizable: bool = True
    notable: bool = False

    @property
    def module(self) -> str:
        """The module name: the tensor name without ``.weight``."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name


def select_layers(
    ckpt: Checkpoint, scheme: Scheme | None = None, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[LayerChoice]:
    """Decide for every tensor of ``ckpt`` whether it is quantized.

    By default: every 2-D floating (F32, F16, BF16) tensor named ``*.weight``
    of a linear layer; embeddings, norms, ``lm_head`` and MoE routers are
    skipped, and so are tensors npquant cannot quantize as ``(out, in)``
    linear weights: GPT-2's ``Conv1D`` weights (stored ``(in, out)``), fused
    3-D expert tensors, anything not 2-D or not float. A name matching an
    ``include`` regex (``re.search``) is picked whatever the convention
    says; one matching an ``exclude`` regex is skipped. With a group
    scheme, a layer whose ``in_features`` the group size does not divide is
    skipped. A tensor picked by ``include`` that cannot be quantized is an
    error, and so is a checkpoint that is already quantized.
    """
    config = _config(ckpt)
    refuse_quantized(ckpt, config)
    inc = [_compile(p, "--include") for p in include or []]
    exc = [_compile(p, "--exclude") for p in exclude or []]
    conv1d = _is_conv1d_model(ckpt, config)
    names = sorted(ckpt.tensors)
    out = []
    for name, t in ckpt.tensors.items():
        forced = any(r.search(name) for r in inc)
        reason, notable = _cannot_quantize(name, t, conv1d, names)
        if forced and reason:
            why = (f"cannot be quantized: {reason}" if notable
                   else "only 2-D float32/float16/bfloat16 weights can be quantized")
            raise NpquantError(f"tensor {name!r} ({t.code} {t.shape}) was picked by --include but {why}")
        if reason:
            out.append(LayerChoice(name, t.shape, t.code, False, reason, quantizable=False, notable=notable))
            continue
        reason = "" if forced else _kept_in_float(name[: -len(".weight")], t)
        if not reason and any(r.search(name) for r in exc):
            reason = "excluded by --exclude"
        if not reason and scheme is not None and scheme.granularity == "group" and t.shape[1] % scheme.group_size:
            reason = f"group_size={scheme.group_size} does not divide in_features={t.shape[1]}"
        out.append(LayerChoice(name, t.shape, t.code, not reason, reason, notable=reason == ROUTER))
    return out


def left_alone_notes(choices: list[LayerChoice]) -> list[str]:
    """One line per notable reason a tensor was left alone, naming the first few tensors.

    >>> left_alone_notes([LayerChoice("h.0.attn.c_attn.weight", (8, 24), "F32", False, CONV1D, False, True)])
    ["left alone, Conv1D weight stored (in, out), not (out, in): GPT-2's layout, left in float: h.0.attn.c_attn"]
    """
    by_reason: dict[str, list[str]] = {}
    for c in choices:
        if c.notable and not c.quantize:
            by_reason.setdefault(c.reason, []).append(c.module)
    notes = []
    for why, modules in by_reason.items():
        more = f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        notes.append(f"left alone, {why}: {', '.join(modules[:3])}{more}")
    return notes


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise NpquantError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None


def _config(ckpt: Checkpoint) -> dict:
    config = ckpt.config
    return config if isinstance(config, dict) else {}


# --- an input that is already quantized ----------------------------------------------
# Dtypes a dense weight never has: a ``.weight`` of these holds quantized codes (the reader's rule too).
_CODE_DTYPES = {"I8": "int8", "U8": "uint8", "F8_E4M3": "fp8 e4m3", "F8_E5M2": "fp8 e5m2"}
# Tensor names that only quantized checkpoints have.
_QUANTIZED_NAMES = (
    (re.compile(r"\.weight_(packed|scale|zero_point|shape|g_idx|global_scale)$"), "a compressed-tensors tensor"),
    (re.compile(r"(^|\.)(qweight|qzeros)$"), "a GPTQ/AWQ packed tensor"),
)
_WHAT_TO_DO = "npquant quantizes float checkpoints: give the original float32/float16/bfloat16 model"


def refuse_quantized(ckpt: Checkpoint, config: dict | None = None) -> None:
    """Raise :class:`NpquantError` when ``ckpt`` is already quantized, saying what it is and what to do.

    Already quantized: config.json (``config``, read from ``ckpt`` when
    None) has a ``quantization_config`` or ``compression_config``, a
    ``.weight`` is int8, uint8 or fp8, or a tensor has a compressed-tensors
    (``.weight_packed``, ``.weight_scale``, ...) or GPTQ/AWQ (``.qweight``)
    name. Quantizing such a model again would write a checkpoint that
    :func:`npquant.load` refuses; :func:`select_layers` calls this first, and
    work that comes before it (calibration) should too.
    """
    if config is None:
        config = _config(ckpt)
    for key in ("quantization_config", "compression_config"):
        qc = config.get(key)
        if qc is not None:
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            fmt = qc.get("format") if isinstance(qc, dict) else None
            what = ", ".join(f"{k} {v!r}" for k, v in (("quant_method", method), ("format", fmt)) if v)
            hint = " (npquant.load reads it as it is)" if method == "compressed-tensors" else ""
            raise NpquantError(f"MODEL {ckpt.path} is already quantized: its config.json has a {key}"
                               f"{f' ({what})' if what else ''}{hint}; {_WHAT_TO_DO}")
    for name, t in ckpt.tensors.items():
        if name.endswith(".weight") and t.code in _CODE_DTYPES:
            raise NpquantError(f"MODEL {ckpt.path} is already quantized: tensor {name!r} in {t.file.name} is "
                               f"{_CODE_DTYPES[t.code]} ({t.code} {t.shape}), not float; {_WHAT_TO_DO}")
        for rule, what in _QUANTIZED_NAMES:
            if rule.search(name):
                raise NpquantError(f"MODEL {ckpt.path} is already quantized: tensor {name!r} in {t.file.name} is "
                                   f"{what}; {_WHAT_TO_DO}")


# --- tensors npquant cannot quantize as (out, in) linear weights ----------------------
# GPT-2's Conv1D modules (transformers' GPT2, OpenAI GPT, ImageGPT, Decision Transformer): weight (in, out).
_CONV1D_NAMES = re.compile(r"(^|\.)((attn|crossattention)\.(c_attn|q_attn|c_proj)|mlp\.(c_fc|c_proj))\.weight$")
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_ARCHITECTURES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer")
# The two Conv1D modules that widen their input: (in, out) is wider than tall, (out, in) taller than wide.
_WIDENING = re.compile(r"\.(c_attn|c_fc)\.weight$")


def _is_conv1d_model(ckpt: Checkpoint, config: dict) -> bool:
    """Whether the tensors named like GPT-2's ``Conv1D`` modules are stored ``(in, out)``.

    config.json decides when it names the model (``model_type`` or
    ``architectures``): GPTBigCode uses the same names for ordinary
    ``(out, in)`` Linear modules. Without it the shapes decide: ``c_attn``
    ``(I, 3 I)`` and ``c_fc`` ``(I, 4 I)`` are wider than tall only when
    stored ``(in, out)``; with neither to look at, the names alone leave
    the layers in float (the side that cannot quantize them wrong).
    """
    named = [n for n in ckpt.tensors if _CONV1D_NAMES.search(n)]
    if not named:
        return False
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    architectures = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []
    if isinstance(model_type, str) or architectures:
        return model_type in _CONV1D_MODEL_TYPES or any(a.startswith(_CONV1D_ARCHITECTURES) for a in architectures)
    for name in named:
        t = ckpt.tensors[name]
        if _WIDENING.search(name) and t.ndim == 2 and t.shape[0] != t.shape[1]:
            return t.shape[0] < t.shape[1]
    return True


def _cannot_quantize(name: str, t: TensorSource, conv1d: bool, names: list[str]) -> tuple[str, bool]:
    """Why ``t`` cannot be quantized as an ``(out, in)`` linear weight (``""`` when it can), and whether
    the reason is one to tell the user of: a weight npquant does not understand, rather than a bias or
    buffer."""
    is_float = t.code in _QUANTIZABLE or t.code == "F64"
    if is_float and t.ndim >= 2 and _is_fused_experts(name, t):
        return FUSED_EXPERTS, True
    if not name.endswith(".weight"):
        return NOT_A_WEIGHT, False
    if t.ndim != 2:
        return f"{t.ndim}-D, not a linear weight", False
    if t.code not in _QUANTIZABLE:
        return f"dtype {t.code} is not float32, float16 or bfloat16", False
    if conv1d and _CONV1D_NAMES.search(name):
        return CONV1D, True
    # The quantized tensors are named <m>.weight_*: any tensor of that prefix would clash, or make load refuse.
    # Sorted names put the ones that extend ``name`` right after it.
    i = bisect.bisect_right(names, name)
    if i < len(names) and names[i].startswith(name):
        return f"tensor {names[i]!r} beside it would clash with the names of its quantized tensors", True
    return "", False


_EXPERTS = re.compile(r"(^|\.)experts(\.|$)")


def _is_fused_experts(name: str, t: TensorSource) -> bool:
    """Every expert's weight in one tensor: ``(E, out, in)`` or ``(E, in, out)`` (gpt-oss, Llama 4,
    ``experts.gate_up_proj``), or 2-D ``(E * out, in)`` without a ``.weight`` name (DBRX's ``experts.mlp.w1``)."""
    if name.endswith("bias") or not _EXPERTS.search(name):
        return False
    return t.ndim >= 3 or not name.endswith(".weight")


# --- tensors kept in float by convention ------------------------------------------------
# MoE routers: ``router`` modules (gpt-oss, Llama 4, Jamba, Switch, DBRX's ``router.layer``), Qwen-MoE's
# ``shared_expert_gate``, Mixtral's ``block_sparse_moe.gate``, and a ``gate`` (or Hunyuan's ``gate.wg``)
# with fewer rows than columns, (n_experts, hidden) as in Qwen-MoE, DeepSeek, OLMoE; a dense model's gated
# projection is (intermediate, hidden), taller than wide, and is named gate_proj anyway.
_ROUTER_NAMES = re.compile(r"(^|\.)(router|shared_expert_gate)(\.|$)|(^|\.)block_sparse_moe\.gate$")
_GATE = re.compile(r"(^|\.)gate(\.wg)?$")


def _kept_in_float(module: str, t: TensorSource) -> str:
    """Why a 2-D float linear weight is left in float by convention, or ``""``."""
    if _ROUTER_NAMES.search(module) or (_GATE.search(module) and t.shape[0] < t.shape[1]):
        return ROUTER
    for rule, why in _SKIP_RULES:
        if rule.search(module):
            return why
    return ""
