"""The reader: :func:`load`, a compressed-tensors directory back into QuantizedTensors.

Every config group is read (one Scheme per group, from :mod:`.config`),
each module's tensors are decoded with its group's scheme and format, and
everything is checked on the way: shapes, dtypes, scales, ``weight_g_idx``,
tensors no format has. Errors name the directory, the tensor and the group.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import NpquantError
from ..packing import pack_codes, unpack_codes
from ..quantize import QuantizedTensor
from ..safetensors_io import Checkpoint, read_json
from ..schemes import Scheme
from ..tensor import scale_values
from .config import _READ_FORMATS, _TIERS, _group_for, _read_quantization_config

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
    ``re:`` pattern (``re.match``), then the class name ``Linear``, which
    every module with quantized tensors is taken to be; ``ignore`` wins over
    every target, and two groups claiming a module alike are an error.
    Codes and scales come back exactly as :func:`quantize` made them
    (16-bit scales as their float32 values, which are exact).

    Symmetric int modules load with ``grid="full"``: compressed-tensors'
    configs carry no grid, its codes are any of ``[-2**(b-1), 2**(b-1) - 1]``
    (int4's stored nibble 0 is code -8), and the full grid is that range. A
    checkpoint npquant wrote on the restricted grid loads the same way: its
    codes are a subset, so they decode alike.

    Whatever is refused raises a one-line NpquantError naming the file (and
    the tensor and config group): see docs/formats.md, "Reading checkpoints".
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NpquantError(f"{path} does not exist") from None
    except OSError as exc:
        raise NpquantError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise NpquantError(f"{path} is not a directory; a compressed-tensors checkpoint is a directory "
                           f"with config.json and safetensors files")
    config_path = path / "config.json"
    try:
        os.lstat(config_path)
    except FileNotFoundError:
        raise NpquantError(f"{path} has no config.json; is it a compressed-tensors directory?") from None
    except OSError as exc:  # the directory cannot be searched
        raise NpquantError(f"{config_path} cannot be read: {exc.strerror or exc}") from None
    groups, ignore = _read_quantization_config(read_json(config_path), str(config_path))
    out: dict[str, QuantizedTensor] = {}
    with Checkpoint(path) as ckpt:
        t = ckpt.tensors
        modules = _quantized_modules(t)
        if not modules:
            raise NpquantError(f"{path} holds no quantized tensors (no .weight_packed, .weight_scale, or fp8/int8 "
                               f".weight), though {config_path} has a quantization_config")
        present = set(modules)
        for group in groups:
            for target in sorted(group.targets.names):
                if "." in target and target not in present:
                    raise NpquantError(f"{path}: config group {group.name} targets module {target!r}, "
                                       f"which has no quantized tensors in the checkpoint")
        for module in modules:
            ignored = ignore.match(module)
            if ignored is not None:
                raise NpquantError(f"{path}: module {module!r} is in ignore but has quantized tensors (ignore "
                                   f"names it by {_TIERS[ignored[0]]}: {ignored[1]!r})")
            try:
                group = _group_for(module, groups)
            except NpquantError as exc:
                raise NpquantError(f"{config_path}: {exc}") from None
            if group is None:
                raise NpquantError(f"{path}: module {module!r} has quantized tensors but no config group targets it")
            try:
                qt = _read_module(t, module, group.scheme, group.format, group.act_order)
                _check_dequantizes_finite(qt)
            except NpquantError as exc:
                raise NpquantError(f"{path}: tensor {module}.weight: {exc} (config group {group.name})") from None
            except KeyError as exc:
                raise NpquantError(f"{path}: module {module!r} ({group.name}, {group.format}) lacks tensor "
                                   f"{exc.args[0]!r}") from None
            out[f"{module}.weight"] = qt
    return out


def _quantized_modules(t) -> list[str]:
    """The modules whose tensors are quantized: those with ``weight_packed``, a ``weight_scale``, or a
    ``weight`` of a dtype only codes have (the last without scales is refused when read)."""
    modules = []
    for name in t:
        if name.endswith(".weight_packed"):
            modules.append(name[: -len(".weight_packed")])
        elif name.endswith(".weight_scale") and f"{name[: -len('.weight_scale')]}.weight_packed" not in t:
            modules.append(name[: -len(".weight_scale")])
        elif (name.endswith(".weight") and t[name].code in _CODE_ONLY_DTYPES
              and f"{name[: -len('.weight')]}.weight_scale" not in t):
            modules.append(name[: -len(".weight")])  # codes without scales: refused below
    return modules


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
        _check_padding(words, scheme.bits, shape[1], "weight_packed", f"weight_shape's {shape[1]} columns")
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
            _check_padding(zp_words.T, scheme.bits, shape[0], "weight_zero_point", f"weight_shape's {shape[0]} rows")
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


def _check_padding(words: np.ndarray, bits: int, n: int, name: str, what: str) -> None:
    """Refuse set bits past the ``n`` codes of each row of int32 ``words (R, ceil(n * bits / 32))``.

    Writers pad the last word of a row with zero bits, so a set bit there is
    a code the shape does not hold (a ``weight_shape`` shrunk within the
    same number of words drops it) or corrupt data.
    """
    used = n * bits - 32 * (words.shape[1] - 1)  # bits of the last word that hold codes, 1..32
    if used == 32 or words.shape[0] == 0:
        return
    last = words[:, -1].astype(np.int64) & 0xFFFFFFFF  # (R,) as unsigned words
    spill = last >> used
    if spill.any():
        row = int(np.flatnonzero(spill)[0])
        raise NpquantError(f"{name} row {row} has set bits past {what} (word {words.shape[1] - 1} is "
                           f"0x{int(last[row]):08X}; its top {32 - used} bits must be zero): the shape does not "
                           f"fit the packed codes")


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


# The smallest magnitude float32 rounds to infinity: halfway between its largest finite value,
# (2 - 2**-23) * 2**127 = 2**128 - 2**104, and 2**128 (ties go to the even 2**128, i.e. infinity).
_F32_OVERFLOW = 2.0**128 - 2.0**103


def _largest_code(scheme: Scheme) -> float:
    """The largest magnitude a decoded code (``q``, ``q - zero_point`` or a float code) can have."""
    if scheme.is_float:
        return {"fp4_e2m1": 6.0, "fp6_e2m3": 7.5, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[scheme.dtype]
    # symmetric: stored values 0..2**b - 1 decode to -2**(b-1)..2**(b-1) - 1; asymmetric: q - zp in +-(2**b - 1)
    return float(2 ** (scheme.bits - 1) if scheme.symmetric else 2**scheme.bits - 1)


def _check_dequantizes_finite(qt: QuantizedTensor) -> None:
    """Refuse a tensor any weight of which dequantizes to +-inf (float32), naming the scale and the weight.

    Cheap when it holds: the block scales are computed as dequantize
    computes them (NVFP4: ``float32(scale) / global_scale``, which must be
    finite itself), and the largest times the format's largest code is
    compared in float64 (exact: a float32 times a code of at most 17
    significant bits) with float32's overflow threshold. Only when that
    bound fails are the rows dequantized, a slice at a time, to find the
    first weight that is infinite, or to accept the tensor when its codes
    are small enough after all.
    """
    scheme = qt.scheme
    with np.errstate(over="ignore"):
        values = scale_values(qt.scale, scheme, qt.global_scale)  # float32 (SO, SI), as dequantize computes them
    if not np.isfinite(values).all():  # NVFP4 only: the other scales were checked finite
        i, j = (int(v) for v in np.argwhere(~np.isfinite(values))[0])
        raise NpquantError(f"{_describe_scale(qt, values, i, j)}: every weight of its block would dequantize to "
                           f"inf or NaN")
    if values.size == 0 or float(values.max()) * _largest_code(scheme) < _F32_OVERFLOW:
        return
    bo, bi = qt.block_shape
    step = max(1, (4 << 20) // max(1, qt.shape[1]))  # rows of 16 MiB of float32 at a time
    for r0 in range(0, qt.shape[0], step):
        with np.errstate(over="ignore", invalid="ignore"):
            w = qt.stored_rows(r0, min(r0 + step, qt.shape[0]))  # (R, I), columns in stored order
        bad = np.argwhere(~np.isfinite(w))
        if bad.size:
            r, c = (int(v) for v in bad[0])
            code = qt.int_codes(r0 + r, r0 + r + 1)[0, c].item()
            zp = "" if qt.zero_point is None else f" less zero point {int(qt.zero_point[(r0 + r) // bo, c // bi])}"
            raise NpquantError(f"{_describe_scale(qt, values, (r0 + r) // bo, c // bi)} times code {code!r}{zp} "
                               f"makes weight [{r0 + r}, {c}] {w[r, c]!s} in float32, past its largest finite "
                               f"value {float(np.finfo(np.float32).max):.8g}: scales must keep every weight finite")


def _describe_scale(qt: QuantizedTensor, values: np.ndarray, i: int, j: int) -> str:
    """``weight_scale[i, j]`` as stored and, where it differs, as the float32 it decodes to."""
    raw = qt.scale[i, j]
    if qt.scheme.scale_dtype == "e8m0":
        return f"weight_scale[{i}, {j}] = e8m0 byte 0x{int(raw):02X} (2**{int(raw) - 127})"
    text = f"weight_scale[{i}, {j}] = {np.float32(raw)!s}"  # float32's shortest form: 1e+38, not 9.99...e+37
    if qt.global_scale is not None:
        text += f" over weight_global_scale {qt.global_scale[0]!s} = {values[i, j]!s}"
    return text


def _check_scale(scale: np.ndarray) -> None:
    scale = scale.astype(np.float32)
    bad = ~np.isfinite(scale) | (scale < 0)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise NpquantError(f"weight_scale{list(idx)} = {float(scale[idx])}: scales must be finite and non-negative")
