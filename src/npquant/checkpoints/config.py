"""The scheme <-> compressed-tensors ``quantization_config`` mapping, both ways.

Which schemes vLLM loads (:func:`check_loadable`); the config group a
scheme writes as (``weights`` arguments, ``format``, ``targets``); the
Scheme a group's ``weights`` read as; and how a module name matches a
group's ``targets`` or the ``ignore`` list. The writer and the reader both
build on it; it imports neither.
"""

from __future__ import annotations

import re
from typing import Mapping

from ..errors import NpquantError
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


def _format_of(scheme: Scheme) -> str:
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
        groups = {"group_0": {"targets": targets, "weights": _weights_args(scheme), "input_activations": None,
                              "output_activations": None}}
    else:
        by_scheme: dict[Scheme, list[str]] = {}
        for name, sch in scheme.items():
            by_scheme.setdefault(sch, []).append(name[: -len(".weight")])
        groups = {}
        for k, (sch, modules) in enumerate(by_scheme.items()):
            groups[f"group_{k}"] = {"format": _format_of(sch), "targets": sorted(modules), "weights": _weights_args(sch),
                                    "input_activations": None, "output_activations": None}
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


def _scheme_from_weights(weights: dict, where: str) -> tuple[Scheme, bool]:
    """The Scheme a group's ``weights`` describe, and whether it has act-order groups.

    Wrong JSON types are errors, never coerced.
    """
    num_bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy, symmetric = weights.get("strategy"), weights.get("symmetric", True)
    group_size, scale_dtype = weights.get("group_size"), weights.get("scale_dtype")
    actorder = weights.get("actorder")
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise NpquantError(f"{where}.weights.num_bits must be an integer, got {num_bits!r}")
    if not isinstance(symmetric, bool):
        raise NpquantError(f"{where}.weights.symmetric must be true or false, got {symmetric!r}")
    if kind not in ("int", "float"):
        raise NpquantError(f"{where}.weights.type must be 'int' or 'float', got {kind!r}")
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
    if strategy in ("group", "tensor_group"):
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise NpquantError(f"{where}.weights.group_size must be a positive integer for strategy {strategy!r}, "
                               f"got {group_size!r}")
    else:
        group_size = None
    block = None
    if strategy == "block":
        block = weights.get("block_structure")
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
            raise NpquantError(f"{where}.weights.block_structure must be [rows, cols] of positive integers, got {block!r}")
        block = tuple(block)
    try:
        if kind == "int":
            if strategy not in ("tensor", "channel", "group") or scale_dtype is not None:
                raise NpquantError(f"int weights with strategy {strategy!r} and scale_dtype {scale_dtype!r} are not "
                                   f"a format npquant reads")
            scheme = Scheme("int", num_bits, strategy, group_size, symmetric)
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


# --- targets and ignore -------------------------------------------------------------
def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], module) is not None
        except re.error as exc:
            raise NpquantError(f"target {target!r} is not a valid regular expression: {exc}") from None
    return target == module


def _matches_any(module: str, targets: list[str]) -> bool:
    return any(_matches(module, x) for x in targets if x == module or x.startswith("re:"))


def _group_for(module: str, groups: list):
    """The group claiming ``module``: an exact name first, then a ``re:`` pattern, then a class name."""
    for test in (lambda x: x == module, lambda x: x.startswith("re:") and _matches(module, x),
                 lambda x: not x.startswith("re:") and "." not in x and x[:1].isupper()):
        for group in groups:
            if any(test(x) for x in group[3]):
                return group
    return None
