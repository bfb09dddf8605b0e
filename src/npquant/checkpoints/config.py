"""The scheme <-> compressed-tensors ``quantization_config`` mapping, both ways.

Which schemes vLLM loads (:func:`check_loadable`); the config group a
scheme writes as (``weights`` arguments, ``format``, ``targets``); the
Scheme a group's ``weights`` read as; and how a module name matches a
group's ``targets`` or the ``ignore`` list. The writer and the reader both
build on it; it imports neither.

compressed-tensors' ``weights`` have no grid: a symmetric int scheme writes
the same group on the full and the restricted grid, and a group reads back
as the full grid (``Scheme.grid="full"``), whose codes
``[-2**(b-1), 2**(b-1) - 1]`` are every code the format stores.

W8A8 (``Scheme.activations``): a group's ``input_activations`` is
``{num_bits: 8, type: int | float, strategy: token, dynamic: true,
symmetric: true, group_size: null}`` (compressed-tensors' ``W8A8`` and
``FP8_DYNAMIC``), its format ``int-quantized`` (int8 ``weight``) or
``float-quantized``. Read back, such a group's scheme carries the rule;
any other ``input_activations`` (static scales, other strategies,
asymmetric, other widths) and any ``output_activations`` are refused in
one line naming the field, with one exception kept from before W8A8:
fp8 blocks' per-group fp8 activations (``FP8_BLOCK``) load as the
weight-only ``fp8-block``, ``x`` staying float32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

from ..errors import NpquantError
from ..safetensors_io import json_kind
from ..schemes import Scheme

__all__ = [
    "check_loadable",
    "VLLM_GROUP_SIZES",
]

#: Group sizes that vLLM's fast int kernels take.
VLLM_GROUP_SIZES = (32, 64, 128)


def check_loadable(scheme: Scheme) -> list[str]:
    """Refuse schemes vLLM cannot load; return warnings for ones it loads slowly."""
    if scheme.microscaled:
        return _check_microscaled(scheme)
    if scheme.scale_dtype != "float32":
        raise NpquantError(f"checkpoints are written with float32 scales; scheme has scale_dtype={scheme.scale_dtype!r}")
    if scheme.dtype == "fp8_e5m2":
        raise NpquantError("vLLM loads fp8 weights as e4m3 only; use fp8-channel or fp8-tensor")
    if scheme.dtype == "int" and scheme.granularity == "tensor":
        raise NpquantError(
            "vLLM cannot load per-tensor int weight-only checkpoints (its weight-only int kernels take "
            "per-channel or per-group scales); use w8-channel, w4-g128 or another channel/group preset"
        )
    if scheme.dtype != "int" and scheme.granularity == "group":
        raise NpquantError("fp8 weights are written per channel or per tensor; per-group fp8 is not a vLLM format")
    notes = []
    if scheme.granularity == "group" and scheme.group_size not in VLLM_GROUP_SIZES:
        notes.append(
            f"group_size={scheme.group_size}: vLLM's fast kernels take group sizes {VLLM_GROUP_SIZES}; "
            f"this checkpoint may load on slower paths or not at all"
        )
    if scheme.dtype == "int" and scheme.bits not in (4, 8):
        notes.append(f"{scheme.bits}-bit codes: vLLM's fast kernels take 4 and 8 bits only")
    return notes


def _check_microscaled(scheme: Scheme) -> list[str]:
    """NVFP4 takes groups of 16, MX groups of 32: compressed-tensors tells the formats apart by group size."""
    if scheme.global_scale and scheme.group_size != 16:
        raise NpquantError(f"NVFP4 checkpoints take groups of 16 (nvfp4); got group_size={scheme.group_size}")
    if scheme.scale_dtype == "e8m0" and scheme.group_size != 32:
        raise NpquantError(f"MX checkpoints take groups of 32 (mxfp4, mxfp6, mxfp8); got group_size={scheme.group_size}")
    if scheme.granularity == "block" and scheme.block_size != (128, 128):
        return [f"block_size={scheme.block_size}: vLLM's fp8 block kernels take 128 x 128 blocks"]
    return []


# --- scheme -> config ---------------------------------------------------------------
def _weights_args(scheme: Scheme) -> dict:
    args = {
        "num_bits": scheme.bits,
        "type": "float" if scheme.is_float else "int",
        "symmetric": scheme.symmetric,
        "strategy": "tensor_group" if scheme.global_scale else scheme.granularity,
        "group_size": scheme.group_size,
        "dynamic": False,
    }
    if scheme.granularity == "block":
        args["block_structure"] = list(scheme.block_size)
    if scheme.scale_dtype in ("fp8_e4m3", "e8m0"):
        args["scale_dtype"] = "torch.float8_e4m3fn" if scheme.global_scale else "torch.uint8"
    return args


def _activations_args(scheme: Scheme) -> dict | None:
    """A group's ``input_activations``: per token, dynamic, symmetric, 8 bits (None for weight-only schemes)."""
    if scheme.activations is None:
        return None
    return {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token", "symmetric": True,
            "type": "int" if scheme.activations == "int8-token" else "float"}


def _format_of(scheme: Scheme) -> str:
    if scheme.activations is not None:  # compressed-tensors' inference: int or float, input_activations not null
        return "int-quantized" if scheme.activations == "int8-token" else "float-quantized"
    if scheme.global_scale:
        return "nvfp4-pack-quantized"
    if scheme.scale_dtype == "e8m0":
        return {"fp4_e2m1": "mxfp4-pack-quantized", "fp6_e2m3": "mxfp6-pack-quantized"}.get(scheme.dtype,
                                                                                              "mxfp8-quantized")
    return "float-quantized" if scheme.is_float else "pack-quantized"


# Formats whose codes are named ``weight``: compressed-tensors' model-free dequantizer takes a ``Linear``
# target of theirs to claim every ``.weight`` (embeddings and LayerNorms too) and fails, so these
# checkpoints name their modules exactly (vLLM and compressed-tensors' module path read both).
_WEIGHT_NAMED_FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "mxfp8-quantized")


def _quantization_config(scheme: Scheme | Mapping[str, Scheme], ignore: list[str], modules: list[str]) -> dict:
    """One group for a single scheme (targets ``Linear``, or ``modules`` by exact name for the
    weight-named formats); for a per-layer mapping, one group per scheme targeting its modules by exact name."""
    if isinstance(scheme, Scheme):
        fmt = _format_of(scheme)
        targets = sorted(modules) if fmt in _WEIGHT_NAMED_FORMATS else ["Linear"]
        groups = {"group_0": {"targets": targets, "weights": _weights_args(scheme),
                              "input_activations": _activations_args(scheme), "output_activations": None}}
    else:
        by_scheme: dict[Scheme, list[str]] = {}
        for name, sch in scheme.items():
            by_scheme.setdefault(sch, []).append(name[: -len(".weight")])
        groups = {}
        for k, (sch, modules) in enumerate(by_scheme.items()):
            groups[f"group_{k}"] = {"format": _format_of(sch), "targets": sorted(modules), "weights": _weights_args(sch),
                                    "input_activations": _activations_args(sch), "output_activations": None}
        formats = {g["format"] for g in groups.values()}
        fmt = formats.pop() if len(formats) == 1 else "mixed-precision"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
    }


# --- config -> scheme ---------------------------------------------------------------
# The formats load reads.
_READ_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "nvfp4-pack-quantized",
                 "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")
# The fields compressed-tensors 0.20 defines (its QuantizationArgs and QuantizationScheme forbid others).
_WEIGHT_FIELDS = ("num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
                  "scale_dtype", "zp_dtype", "observer", "observer_kwargs")
_GROUP_FIELDS = ("targets", "weights", "input_activations", "output_activations", "format")


@dataclass(frozen=True)
class _ReadGroup:
    """One config group as load reads it."""

    name: str  # its key in config_groups
    scheme: Scheme  # what its weights decode as
    act_order: bool  # codes in act-order groups (weight_g_idx)
    format: str  # the group's own format, or the config's
    targets: "_Targets"


def _read_quantization_config(config: object, where: str) -> tuple[list[_ReadGroup], "_Targets"]:
    """The groups and the ignore list of a ``config.json`` (parsed), every field's type and value checked.

    ``where`` names the file in messages. Each ``re:`` pattern is compiled once, whatever the number of
    groups naming it.
    """
    if not isinstance(config, dict):
        raise NpquantError(f"{where} must hold a JSON object, got {json_kind(config)}")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise NpquantError(f"{where} has no quantization_config object (got {json_kind(qc)}); "
                           f"is it a compressed-tensors checkpoint?")
    method = qc.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise NpquantError(f"{where}: quant_method {method!r} is not 'compressed-tensors', the format npquant reads")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise NpquantError(f"{where}: quantization_status {status!r}: npquant reads 'compressed' checkpoints only "
                           f"(the other states store float weights)")
    top_format = qc.get("format")
    if not isinstance(top_format, str):
        raise NpquantError(f"{where}: quantization_config.format must be a string, got {json_kind(top_format)}")
    raw_groups = qc.get("config_groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise NpquantError(f"{where}: config_groups must be a non-empty object")
    compiled: dict[str, re.Pattern] = {}
    groups = []
    for gname, g in raw_groups.items():
        at = f"{where}: config_groups.{gname}"
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise NpquantError(f"{at} has no 'weights' object")
        unknown = sorted(set(g) - set(_GROUP_FIELDS))
        if unknown:
            raise NpquantError(f"{at} has field {unknown[0]!r}, which compressed-tensors does not define "
                               f"({', '.join(_GROUP_FIELDS)})")
        for field in ("input_activations", "output_activations"):
            if not isinstance(g.get(field), (dict, type(None))):
                raise NpquantError(f"{at}.{field} must be an object or null, got {json_kind(g[field])}")
        fmt = g.get("format") or top_format
        if fmt == "mixed-precision":
            raise NpquantError(f"{at} has no format of its own under a mixed-precision config")
        if not isinstance(fmt, str) or fmt not in _READ_FORMATS:
            raise NpquantError(f"{at}: format {fmt!r} is not one npquant reads ({', '.join(_READ_FORMATS)})")
        scheme, act_order = _scheme_from_weights(g["weights"], at)
        if g.get("output_activations") is not None:
            raise NpquantError(f"{at}.output_activations is set: npquant does not quantize a layer's outputs "
                               f"(null expected)")
        scheme = _with_activations(scheme, g.get("input_activations"), f"{at}.input_activations")
        targets = _compile_targets(g.get("targets"), f"{at}.targets", compiled)
        groups.append(_ReadGroup(gname, scheme, act_order, fmt, targets))
    ignore = _compile_targets(qc.get("ignore") or [], f"{where}: ignore", compiled)
    return groups, ignore


def _scheme_from_weights(weights: dict, where: str) -> tuple[Scheme, bool]:
    """The Scheme a group's ``weights`` describe, and whether it has act-order groups.

    Every field compressed-tensors defines is checked, for every format;
    wrong JSON types are errors, never coerced. Strings compressed-tensors
    lower-cases (``type``, ``strategy``, ``actorder``) are read the same way.
    """
    unknown = sorted(set(weights) - set(_WEIGHT_FIELDS))
    if unknown:
        raise NpquantError(f"{where}.weights has field {unknown[0]!r}, which compressed-tensors does not define")
    lower = lambda v: v.lower() if isinstance(v, str) else v  # noqa: E731
    num_bits, kind = weights.get("num_bits"), lower(weights.get("type", "int"))
    strategy, symmetric = lower(weights.get("strategy")), weights.get("symmetric", True)
    group_size, scale_dtype = weights.get("group_size"), weights.get("scale_dtype")
    actorder, dynamic = lower(weights.get("actorder")), lower(weights.get("dynamic", False))
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise NpquantError(f"{where}.weights.num_bits must be an integer, got {num_bits!r}")
    if not isinstance(symmetric, bool):
        raise NpquantError(f"{where}.weights.symmetric must be true or false, got {symmetric!r}")
    if kind not in ("int", "float"):
        raise NpquantError(f"{where}.weights.type must be 'int' or 'float', got {kind!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise NpquantError(f"{where}.weights.group_size must be an integer or null, got {group_size!r}")
    if dynamic not in (False, True, "local"):
        raise NpquantError(f"{where}.weights.dynamic must be true, false or 'local', got {dynamic!r}")
    if dynamic is not False:
        raise NpquantError(f"{where}.weights.dynamic is {dynamic!r}: dynamic weights store no scales; "
                           f"npquant reads static weights (dynamic: false)")
    for field in ("zp_dtype", "observer"):
        if not isinstance(weights.get(field), (str, type(None))):
            raise NpquantError(f"{where}.weights.{field} must be a string or null, got {weights[field]!r}")
    if not isinstance(weights.get("observer_kwargs"), (dict, type(None))):
        raise NpquantError(f"{where}.weights.observer_kwargs must be an object, got {weights['observer_kwargs']!r}")
    if strategy is None:  # compressed-tensors infers it from group_size
        strategy = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    if strategy not in ("tensor", "channel", "group", "tensor_group", "block"):
        raise NpquantError(f"{where}.weights.strategy {strategy!r} is not one npquant reads "
                           f"(tensor, channel, group, tensor_group, block)")
    if scale_dtype not in (None, "torch.float8_e4m3fn", "torch.uint8"):
        raise NpquantError(f"{where}.weights.scale_dtype {scale_dtype!r} is not one npquant reads "
                           f"(null, 'torch.float8_e4m3fn', 'torch.uint8')")
    if actorder not in (None, "weight", "static", "group", "dynamic", True, False):
        raise NpquantError(f"{where}.weights.actorder {actorder!r} is not known (null, 'weight', 'static', 'group')")
    if actorder not in (None, False) and strategy not in ("group", "tensor_group"):
        raise NpquantError(f"{where}.weights: actorder {actorder!r} is for group scales, not strategy {strategy!r}")
    if strategy in ("group", "tensor_group"):
        if group_size is None or group_size <= 0:
            raise NpquantError(f"{where}.weights.group_size must be a positive integer for strategy {strategy!r}, "
                               f"got {group_size!r}")
    elif group_size is not None and group_size not in (-1,):
        raise NpquantError(f"{where}.weights.group_size={group_size} is for strategy 'group' or 'tensor_group', "
                           f"not {strategy!r} (null or -1 there)")
    else:
        group_size = None
    block = _block_structure(weights.get("block_structure"), strategy, where)
    try:
        if kind == "int":
            if strategy not in ("tensor", "channel", "group") or scale_dtype is not None:
                raise NpquantError(f"int weights with strategy {strategy!r} and scale_dtype {scale_dtype!r} are not "
                                   f"a format npquant reads")
            scheme = Scheme("int", num_bits, strategy, group_size, symmetric)
        elif not symmetric:
            raise NpquantError(f"symmetric is false, but float weights (fp8, NVFP4, MX) are stored without zero "
                               f"points; a {num_bits}-bit float group must say symmetric: true")
        elif num_bits in (4, 6):
            if strategy == "tensor_group" and num_bits == 4 and scale_dtype == "torch.float8_e4m3fn":
                scheme = Scheme("fp4_e2m1", 4, "group", group_size, scale_dtype="fp8_e4m3")
            elif strategy == "group" and scale_dtype == "torch.uint8":
                scheme = Scheme("fp4_e2m1" if num_bits == 4 else "fp6_e2m3", num_bits, "group", group_size,
                                scale_dtype="e8m0")
            else:
                raise NpquantError(f"float weights of {num_bits} bits are read as NVFP4 (strategy tensor_group, "
                                   f"scale_dtype torch.float8_e4m3fn) or MX (group, torch.uint8); got strategy "
                                   f"{strategy!r}, scale_dtype {scale_dtype!r}")
        elif num_bits == 8:
            if strategy == "group" and scale_dtype == "torch.uint8":
                scheme = Scheme("fp8_e4m3", 8, "group", group_size, scale_dtype="e8m0")
            elif strategy in ("tensor", "channel", "block") and scale_dtype is None:
                scheme = Scheme("fp8_e4m3", 8, strategy, symmetric=symmetric, block_size=block)
            else:
                raise NpquantError(f"fp8 weights are read per tensor, channel or block (or MX groups with "
                                   f"scale_dtype torch.uint8); got strategy {strategy!r}, scale_dtype {scale_dtype!r}")
        else:
            raise NpquantError(f"float weights of {num_bits} bits are not a format npquant reads (4, 6 or 8)")
    except NpquantError as exc:
        raise NpquantError(f"{where}.weights: {exc}") from None
    act_order = actorder in ("group", "dynamic", True)
    if act_order and scheme.granularity != "group":
        raise NpquantError(f"{where}.weights: actorder {actorder!r} is for group scales, not strategy {strategy!r}")
    return scheme, act_order


def _with_activations(scheme: Scheme, acts: dict | None, at: str) -> Scheme:
    """``scheme`` with the activation rule ``input_activations`` (``acts``) gives it; refuses, naming the field,
    any rule npquant does not run (see the module docstring)."""
    if acts is None:
        return scheme
    unknown = sorted(set(acts) - set(_WEIGHT_FIELDS))
    if unknown:
        raise NpquantError(f"{at} has field {unknown[0]!r}, which compressed-tensors does not define")
    lower = lambda v: v.lower() if isinstance(v, str) else v  # noqa: E731
    kind, strategy = lower(acts.get("type", "int")), lower(acts.get("strategy"))
    if scheme.granularity == "block" and kind == "float" and strategy == "group":
        return scheme  # FP8_BLOCK: loaded weight-only, as before W8A8 (x stays float32)
    dynamic, symmetric, num_bits = lower(acts.get("dynamic", False)), acts.get("symmetric", True), acts.get("num_bits")
    if dynamic is not True:
        raise NpquantError(f"{at}.dynamic is {dynamic!r}: static activation scales (input_scale) are not run; npquant "
                           f"quantizes activations per token at run time (dynamic: true)")
    if strategy != "token":
        raise NpquantError(f"{at}.strategy is {strategy!r}: npquant quantizes activations per token (strategy: "
                           f"'token')")
    if symmetric is not True:
        raise NpquantError(f"{at}.symmetric is {symmetric!r}: npquant's activation codes are symmetric (true)")
    if isinstance(num_bits, bool) or num_bits != 8:
        raise NpquantError(f"{at}.num_bits is {num_bits!r}: npquant quantizes activations to 8 bits")
    if kind not in ("int", "float"):
        raise NpquantError(f"{at}.type must be 'int' or 'float', got {kind!r}")
    if acts.get("group_size") not in (None, -1):
        raise NpquantError(f"{at}.group_size is {acts['group_size']!r}: per-token activations have none (null)")
    for field in ("block_structure", "actorder", "scale_dtype", "zp_dtype"):
        if acts.get(field) not in (None, False):
            raise NpquantError(f"{at}.{field} is {acts[field]!r}: per-token activations take none (null)")
    try:
        return replace(scheme, activations="int8-token" if kind == "int" else "fp8-token")
    except NpquantError as exc:
        raise NpquantError(f"{at}: {exc}") from None


def _block_structure(block, strategy: str, where: str) -> tuple[int, int] | None:
    """``block_structure`` as (rows, cols): required for strategy block, absent (null) otherwise.

    compressed-tensors also reads the older string form ``"128x128"``.
    """
    if block is None:
        if strategy == "block":
            raise NpquantError(f"{where}.weights.block_structure must be [rows, cols] of positive integers for "
                               f"strategy 'block', got null")
        return None
    if strategy != "block":
        raise NpquantError(f"{where}.weights.block_structure is for strategy 'block', not {strategy!r}")
    if isinstance(block, str) and re.fullmatch(r"[0-9]{1,9}x[0-9]{1,9}", block):
        block = [int(v) for v in block.split("x")]
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
        raise NpquantError(f"{where}.weights.block_structure must be [rows, cols] of positive integers, got {block!r}")
    return tuple(block)


# --- targets and ignore -------------------------------------------------------------
#: The one class name a target matches by: a checkpoint holds no modules, so every module whose weight is
#: stored quantized (a 2-D weight, all the reader decodes) is taken for a ``Linear``.
LINEAR_CLASS = "Linear"
_TIERS = ("exact name", "re: pattern", "class name")


@dataclass(frozen=True)
class _Targets:
    """A ``targets`` or ``ignore`` list as load matches it, its ``re:`` patterns compiled.

    A module matches by exact name (tier 0), then a ``re:`` pattern
    (``re.match``: anchored at the start only; tier 1), then the class name
    ``Linear`` (tier 2), which every quantized module is. Any other class
    name (no dot, a capital first letter) matches nothing.
    """

    names: frozenset[str]
    patterns: tuple[tuple[str, re.Pattern], ...]
    linear: bool

    def match(self, module: str) -> tuple[int, str] | None:
        """``(tier, target)`` of the most specific target matching ``module``, or None."""
        if module in self.names:
            return 0, module
        for target, pattern in self.patterns:
            if pattern.match(module) is not None:
                return 1, target
        return (2, LINEAR_CLASS) if self.linear else None


def _compile_targets(targets, where: str, compiled: dict[str, re.Pattern]) -> _Targets:
    """``targets`` (a list of strings) with each ``re:`` pattern compiled once: ``compiled`` is shared by the
    lists of one config."""
    if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
        raise NpquantError(f"{where} must be a list of strings, got {targets!r:.200}")
    patterns = {}
    for target in targets:
        if target.startswith("re:") and target not in patterns:
            if target not in compiled:
                try:
                    compiled[target] = re.compile(target[3:])
                except (re.error, RecursionError, OverflowError) as exc:
                    raise NpquantError(f"{where}: {target!r:.200} is not a valid regular expression: {exc}") from None
            patterns[target] = compiled[target]
    names = frozenset(x for x in targets if not x.startswith("re:"))
    return _Targets(names, tuple(patterns.items()), LINEAR_CLASS in names)


def _group_for(module: str, groups: list[_ReadGroup]) -> _ReadGroup | None:
    """The group claiming ``module``: the one whose most specific matching target (exact name, then ``re:``,
    then class) is more specific than every other group's; two groups claiming it alike are an error,
    whatever their order."""
    best, claim = None, []
    for group in groups:
        found = group.targets.match(module)
        if found is None:
            continue
        if best is None or found[0] < best[0]:
            best, claim = found, [(group, found[1])]
        elif found[0] == best[0]:
            claim.append((group, found[1]))
    if len(claim) > 1:
        (g1, t1), (g2, t2) = claim[:2]
        raise NpquantError(f"module {module!r} is claimed alike by config groups {g1.name} ({t1!r}) and "
                           f"{g2.name} ({t2!r}), both by {_TIERS[best[0]]}; tools pick between them "
                           f"differently, so the checkpoint is ambiguous")
    return claim[0][0] if claim else None
