"""The reader: :func:`load`, a compressed-tensors directory back into QuantizedTensors.

Every config group is read (one Scheme per group, from :mod:`.config`),
each module's tensors are decoded with its group's scheme and format, and
everything is checked on the way: shapes, dtypes, scales, ``weight_g_idx``,
tensors no format has. Errors name the directory, the tensor and the group.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import NpquantError
from ..packing import pack_codes, unpack_codes
from ..quantize import QuantizedTensor
from ..safetensors_io import Checkpoint
from ..schemes import Scheme
from .config import _READ_FORMATS, _group_for, _matches_any, _scheme_from_weights

__all__ = [
    "load",
]

# Dtypes a dense weight never has: a ``.weight`` of these is quantized codes.
_CODE_ONLY_DTYPES = ("F8_E4M3", "F8_E5M2", "I8", "U8")


def load(path: str | os.PathLike) -> dict[str, QuantizedTensor]:
    """Read a compressed-tensors directory into QuantizedTensors.

    Keys are the original weight names (``<m>.weight``). Every config group
    is read (a mixed-precision checkpoint decodes each module with its own
    group's scheme); a module matches a group's targets by exact name, then
    ``re:`` pattern (``re.match``), then class name (``Linear``), and
    ``ignore`` wins over every target. Codes and scales come back exactly
    as :func:`quantize` made them.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise NpquantError(f"{path} has no config.json; is it a compressed-tensors directory?")
    try:
        qc = json.loads(config_path.read_text())["quantization_config"]
        raw_groups = qc["config_groups"]
        top_format = qc["format"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise NpquantError(f"{config_path} has no usable quantization_config ({exc!r})") from None
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise NpquantError(f"{config_path}: config_groups must be a non-empty object")
    groups = []
    for gname, g in raw_groups.items():
        where = f"{config_path}: config_groups.{gname}"
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise NpquantError(f"{where} has no 'weights' object")
        targets = g.get("targets")
        if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
            raise NpquantError(f"{where}.targets must be a list of strings, got {targets!r}")
        fmt = g.get("format") or top_format
        if fmt == "mixed-precision":
            raise NpquantError(f"{where} has no format of its own under a mixed-precision config")
        if fmt not in _READ_FORMATS:
            raise NpquantError(f"{where}: format {fmt!r} is not one npquant reads ({', '.join(_READ_FORMATS)})")
        groups.append((gname, _scheme_from_weights(g["weights"], where), fmt, targets))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise NpquantError(f"{config_path}: ignore must be a list of strings, got {ignore!r}")
    out: dict[str, QuantizedTensor] = {}
    with Checkpoint(path) as ckpt:
        t = ckpt.tensors
        modules = []
        for name in t:
            if name.endswith(".weight_packed"):
                modules.append(name[: -len(".weight_packed")])
            elif name.endswith(".weight_scale") and f"{name[: -len('.weight_scale')]}.weight_packed" not in t:
                modules.append(name[: -len(".weight_scale")])
            elif (name.endswith(".weight") and t[name].code in _CODE_ONLY_DTYPES
                  and f"{name[: -len('.weight')]}.weight_scale" not in t):
                modules.append(name[: -len(".weight")])  # codes without scales: refused below
        present = set(modules)
        for gname, _, _, targets in groups:
            for target in targets:
                if not target.startswith("re:") and "." in target and target not in present:
                    raise NpquantError(f"{path}: config group {gname} targets module {target!r}, "
                                       f"which has no quantized tensors in the checkpoint")
        for module in modules:
            if _matches_any(module, ignore):
                raise NpquantError(f"{path}: module {module!r} is in ignore but has quantized tensors")
            group = _group_for(module, groups)
            if group is None:
                raise NpquantError(f"{path}: module {module!r} has quantized tensors but no config group targets it")
            gname, (scheme, act_order), fmt, _ = group
            try:
                out[f"{module}.weight"] = _read_module(t, module, scheme, fmt, act_order)
            except NpquantError as exc:
                raise NpquantError(f"{path}: tensor {module}.weight: {exc} (config group {gname})") from None
            except KeyError as exc:
                raise NpquantError(f"{path}: module {module!r} ({gname}, {fmt}) lacks tensor {exc.args[0]!r}") from None
    return out


def _read_module(t, module: str, scheme: Scheme, fmt: str, act_order: bool) -> QuantizedTensor:
    """One module's tensors decoded as ``fmt`` with ``scheme``; every tensor of the module must be used."""
    used = {f"{module}.weight_scale"}
    scale_src = t[f"{module}.weight_scale"]
    if fmt == "pack-quantized":
        if scheme.is_float:
            raise NpquantError("pack-quantized holds int weights, but the group's weights are float")
        used |= {f"{module}.weight_packed", f"{module}.weight_shape"}
        shape = _weight_shape(t[f"{module}.weight_shape"].read())
        words = t[f"{module}.weight_packed"].read()
        want = (shape[0], math.ceil(shape[1] * scheme.bits / 32))
        if words.shape != want or words.dtype != np.int32:
            raise NpquantError(f"weight_packed is {words.dtype} {words.shape}; {scheme.bits}-bit codes of {shape} "
                               f"take int32 {want}")
        u = _unpack_words(words, scheme.bits, shape[1])
        zp = None
        if not scheme.symmetric:
            used.add(f"{module}.weight_zero_point")
            zp_words = t[f"{module}.weight_zero_point"].read()
            n_groups = scheme.scale_shape(shape)[1]
            want_zp = (math.ceil(shape[0] * scheme.bits / 32), n_groups)
            if zp_words.shape != want_zp or zp_words.dtype != np.int32:
                raise NpquantError(f"weight_zero_point is {zp_words.dtype} {zp_words.shape}; {scheme.bits}-bit zero "
                                   f"points of {shape} take int32 {want_zp}")
            zp = np.ascontiguousarray(_unpack_words(zp_words.T.copy(), scheme.bits, shape[0]).T)
        perm = None
        if f"{module}.weight_g_idx" in t:
            used.add(f"{module}.weight_g_idx")
            perm = _g_idx_order(t[f"{module}.weight_g_idx"].read(), scheme, shape, act_order)
            if perm is not None:
                u = np.ascontiguousarray(u[:, perm])
        elif act_order:
            raise NpquantError("the config says actorder 'group' but the module has no weight_g_idx")
        if scheme.packed:
            codes = pack_codes(u, scheme.bits)
        elif scheme.symmetric:
            codes = (u.astype(np.int16) - 128).astype(np.int8)
        else:
            codes = u
        scale = _float_scale(scale_src)
        qt = QuantizedTensor(codes, scale, zp, shape, scheme, perm=perm)
    elif fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized"):
        bits = {"nvfp4-pack-quantized": 4, "mxfp4-pack-quantized": 4, "mxfp6-pack-quantized": 6}[fmt]
        if scheme.bits != bits or scheme.dtype not in ("fp4_e2m1", "fp6_e2m3"):
            raise NpquantError(f"{fmt} holds {bits}-bit float codes, but the group's weights are {scheme.dtype} "
                               f"{scheme.bits}-bit with {scheme.scale_dtype} scales")
        if (fmt == "nvfp4-pack-quantized") != scheme.global_scale:
            raise NpquantError(f"{fmt} does not fit weights with {scheme.scale_dtype} scales")
        used.add(f"{module}.weight_packed")
        packed = t[f"{module}.weight_packed"].read()
        if packed.dtype != np.uint8 or packed.ndim != 2 or (packed.shape[1] * 8) % bits:
            raise NpquantError(f"weight_packed must be uint8 (out, in * {bits} / 8), got {packed.dtype} {packed.shape}")
        shape = (packed.shape[0], packed.shape[1] * 8 // bits)
        global_scale = None
        if scheme.global_scale:
            used.add(f"{module}.weight_global_scale")
            global_scale = t[f"{module}.weight_global_scale"].read()
            if global_scale.dtype != np.float32 or global_scale.size != 1:
                raise NpquantError(f"weight_global_scale must be float32 [1], got {global_scale.dtype} "
                                   f"{list(global_scale.shape)}")
            global_scale = global_scale.reshape(1)
        qt = QuantizedTensor(packed, scale_src.read(), None, shape, scheme, global_scale)
    elif fmt in ("float-quantized", "naive-quantized", "int-quantized", "mxfp8-quantized"):
        used.add(f"{module}.weight")
        codes = t[f"{module}.weight"].read()
        if codes.ndim != 2:
            raise NpquantError(f"weight must be 2-D (out, in), got {codes.shape}")
        if fmt == "mxfp8-quantized" or scheme.scale_dtype == "e8m0":
            if fmt != "mxfp8-quantized" or scheme.scale_dtype != "e8m0" or scheme.dtype != "fp8_e4m3":
                raise NpquantError(f"{fmt} does not fit {scheme.dtype} weights with {scheme.scale_dtype} scales")
            scale = scale_src.read()
        else:
            if ((fmt == "int-quantized" and scheme.is_float) or (fmt == "float-quantized" and not scheme.is_float)
                    or (not scheme.is_float and scheme.bits != 8)):
                raise NpquantError(f"{fmt} does not hold {scheme.dtype} {scheme.bits}-bit weights")
            if not scheme.symmetric:
                raise NpquantError(f"{fmt} is read for symmetric weights; the group's are asymmetric")
            scale = _float_scale(scale_src)
            if scheme.granularity in ("tensor", "channel"):
                scale = scale.reshape(-1, 1)
        qt = QuantizedTensor(codes, scale, None, codes.shape, scheme)
    else:  # the config check refuses other formats first
        raise NpquantError(f"format {fmt!r} is not one npquant reads ({', '.join(_READ_FORMATS)})")
    if scheme.scale_dtype not in ("fp8_e4m3", "e8m0"):
        _check_scale(qt.scale)
    extra = sorted(n for n in t if n.startswith(f"{module}.weight") and n not in used)
    if extra:
        raise NpquantError(f"tensor {extra[0]!r} is not one a {fmt} module has")
    return qt


def _unpack_words(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unsigned codes ``(R, n)`` from int32 words."""
    return unpack_codes(np.ascontiguousarray(words).view(np.uint8), bits, n)


def _weight_shape(shape: np.ndarray) -> tuple[int, int]:
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape <= 0).any():
        raise NpquantError(f"weight_shape must hold [out, in] as 2 positive integers, got {shape.dtype} {shape.tolist()}")
    return (int(shape[0]), int(shape[1]))


def _float_scale(src) -> np.ndarray:
    """float32 scales from a float32, bfloat16 or float16 tensor (exact)."""
    if src.code not in ("F32", "BF16", "F16"):
        raise NpquantError(f"weight_scale must be float32, bfloat16 or float16, got {src.code}")
    return src.read().astype(np.float32)


def _g_idx_order(g_idx: np.ndarray, scheme: Scheme, shape: tuple[int, int], act_order: bool) -> np.ndarray | None:
    """The stored column order a ``weight_g_idx`` gives, or None for the plain order.

    ``g_idx[j]`` is the group of input column j (compressed-tensors 0.18 and
    earlier; -1 everywhere means unset). Every group must have exactly
    ``group_size`` columns: the stable sort of the columns by group then
    gives plain contiguous groups, the same weight read as ``W[:, perm]``.
    """
    in_features = shape[1]
    if g_idx.shape != (in_features,) or g_idx.dtype.kind not in "iu":
        raise NpquantError(f"weight_g_idx must be integer ({in_features},), got {g_idx.dtype} {g_idx.shape}")
    if (g_idx == -1).all():
        return None
    if scheme.granularity != "group":
        raise NpquantError(f"weight_g_idx is for group scales; the config says strategy {scheme.granularity!r}")
    n_groups = in_features // scheme.group_size
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise NpquantError(f"weight_g_idx holds groups {int(g_idx.min())}..{int(g_idx.max())}; "
                           f"{n_groups} groups take 0..{n_groups - 1}")
    counts = np.bincount(g_idx, minlength=n_groups)
    if (counts != scheme.group_size).any():
        g = int(np.argmax(counts != scheme.group_size))
        raise NpquantError(f"weight_g_idx gives group {g} {int(counts[g])} columns; every group has "
                           f"group_size={scheme.group_size}")
    perm = np.argsort(g_idx, kind="stable").astype(np.int64)
    return None if np.array_equal(perm, np.arange(in_features)) else perm


def _check_scale(scale: np.ndarray) -> None:
    scale = scale.astype(np.float32)
    bad = ~np.isfinite(scale) | (scale < 0)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise NpquantError(f"weight_scale{list(idx)} = {float(scale[idx])}: scales must be finite and non-negative")
