"""The writer: :func:`quantize_checkpoint`, a safetensors checkpoint quantized into compressed-tensors.

The output is a model directory that compressed-tensors and vLLM load
(facts in ``shared/spec/compressed-tensors-format.md``):

- int schemes, ``format: pack-quantized``: per linear layer ``<m>``,
  ``<m>.weight_packed`` int32 ``(O, ceil(I * bits / 32))`` (stored value
  ``q + 2**(bits-1)``, or the unsigned code when asymmetric; element ``i`` of
  a row at bit ``i * bits`` of the row's little-endian stream),
  ``<m>.weight_scale`` ``(O, 1)`` per channel or ``(O, I / group_size)``
  per group, ``<m>.weight_shape`` int64 ``[O, I]``, and for asymmetric
  schemes ``<m>.weight_zero_point`` int32 ``(ceil(O * bits / 32), n_groups)``
  (the zero points packed along the output dimension). Symmetric codes on
  the full grid (``[-2**(b-1), 2**(b-1) - 1]``, the presets' default) are
  compressed-tensors' own, byte for byte: their scales are in the layer's
  dtype (bfloat16 or float16 for such a layer, as compressed-tensors
  stores them, the codes computed from those scales); the restricted grid's
  scales, and asymmetric ones, are float32;
- fp8 (e4m3), ``format: float-quantized``: ``<m>.weight`` float8_e4m3fn
  ``(O, I)`` and ``<m>.weight_scale`` float32 ``(O, 1)`` per channel or
  ``(1,)`` per tensor;
- W8A8 (``w8a8-int8``, ``w8a8-fp8``): the group's ``input_activations``
  says per token, dynamic, symmetric; int8 is ``format: int-quantized``,
  ``<m>.weight`` int8 ``(O, I)`` (the codes themselves) and
  ``<m>.weight_scale`` ``(O, 1)`` (in the layer's dtype, as for
  ``w8-channel``); fp8 is ``float-quantized`` as above.

Every other tensor is copied unchanged, shards and the index keep their
names, ``config.json`` gains a ``quantization_config``, every other file
beside the weights (tokenizer, configs) is copied, and the model card
(``README.md``) is copied with a short header saying what this copy is.

Where the output goes, and what an existing OUT may be, is
:mod:`.output_dir`'s business: the input is never written over, ``force``
replaces only a directory npquant wrote (recognised by its
``.npquant-output.json``), and a killed run's temporary directory is
removed by the next run beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import NpquantError
from ..metrics import weight_error
from ..packing import pack_codes
from ..quantize import QuantizedTensor, quantize_measured
from ..safetensors_io import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint, TensorPlan, TensorSource, write_safetensors
from ..schemes import Scheme, get_scheme, schemes
from .config import _quantization_config, check_loadable
from .output_dir import OutputLock, check_output, clean_stale, existing_output_problem, npquant_version
from .selection import _QUANTIZABLE, LayerChoice, left_alone_notes, select_layers

__all__ = [
    "quantize_checkpoint",
]


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


def _layer_plans(module: str, shape: tuple[int, int], scheme: Scheme) -> list[TensorPlan]:
    out_features, in_features = shape
    if scheme.microscaled:
        from ..quantize import code_numpy_dtype, scale_numpy_dtype

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
    from ..quantize import scale_numpy_dtype

    if scheme.activations is not None:  # int-quantized: int8 codes as they are
        return [TensorPlan(f"{module}.weight", np.dtype(np.int8), shape),
                TensorPlan(f"{module}.weight_scale", scale_numpy_dtype(scheme), (out_features, 1))]
    n_groups = 1 if scheme.granularity == "channel" else in_features // scheme.group_size
    plans = [
        TensorPlan(f"{module}.weight_packed", np.dtype(np.int32), (out_features, math.ceil(in_features * scheme.bits / 32))),
        TensorPlan(f"{module}.weight_scale", scale_numpy_dtype(scheme), (out_features, n_groups)),
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
    if scheme.activations is not None:  # int-quantized
        return {f"{module}.weight": qt.codes, f"{module}.weight_scale": qt.scale}
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
    replaced: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """Write ``model`` quantized with ``scheme`` as a compressed-tensors directory ``out``.

    Reads one tensor at a time (row slices of the memory-mapped file) and
    writes each output tensor as soon as it is made, so memory stays at a
    few tensors whatever the checkpoint's size; ``workers`` tensors are
    quantized at once. The output is built under a temporary name beside
    ``out`` (``.<out>.tmp-<pid>-<random>``) and renamed when complete: a
    run that fails or is interrupted leaves no ``out`` and no temporary
    directory, and one that is killed leaves a temporary directory that the
    next run beside it removes (see :mod:`npquant.checkpoints.output_dir`).

    ``out`` is checked before anything is read (:func:`check_output`):
    never the input model, inside it or containing it; an existing ``out``
    is replaced only with ``force``, and only when it is a directory npquant
    wrote (its ``.npquant-output.json`` lists what it holds, and it holds
    nothing else), never a file or someone else's directory. A write that
    fails part-way (disk full, file size limit) raises :class:`NpquantError`
    naming ``out``, with nothing left behind and an old ``out`` untouched.

    Returns a summary: ``layers`` (list of :class:`LayerResult`),
    ``skipped`` (list of :class:`LayerChoice`), ``warnings`` (including a
    line for each temporary directory of an earlier run removed or left
    alone), byte totals. ``progress(name, nbytes)`` is called after each
    input tensor.

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

    ``replaced`` maps tensor names to float arrays that stand in for the
    checkpoint's (what AWQ's folds change: norm weights, biases, a
    producer's rows), each of the checkpoint tensor's shape and written in
    its dtype (rounded to nearest): a selected layer not in ``quantized`` is
    quantized from it, any other tensor written as it is. The error of a
    ``quantized`` tensor is measured against ``replaced``'s array where it
    has one, else against the checkpoint's weight.
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
    out = check_output(model, out, force=force)
    quantized = dict(quantized or {})
    with Checkpoint(model) as ckpt:
        replaced = _checked_replacements(ckpt, replaced or {})
        if per_layer is None:
            choices = select_layers(ckpt, scheme, include, exclude)
            layer_scheme = {c.name: scheme for c in choices if c.quantize}
        else:
            choices = _choices_for_mapping(ckpt, per_layer)
            layer_scheme = per_layer
        picked = {c.name: c for c in choices if c.quantize}
        left_alone = left_alone_notes(choices)
        if not picked:
            raise NpquantError(f"no tensor of {ckpt.path} was selected for quantization; see --include"
                               + "".join(f"; {note}" for note in left_alone))
        notes = [*notes, *left_alone]
        for name, qt in quantized.items():
            if name not in picked:
                raise NpquantError(f"quantized tensor {name!r} is not a layer selected for quantization in {ckpt.path}")
            want = layer_scheme[name]
            # as the layer's scheme, or as this writer stores it (scales in a 16-bit layer's dtype)
            stored = _stored_scheme(want, ckpt.tensors[name])
            if (not isinstance(qt, QuantizedTensor) or qt.scheme not in (want, stored)
                    or qt.shape != picked[name].shape):
                got = f"{qt.scheme} {qt.shape}" if isinstance(qt, QuantizedTensor) else type(qt).__name__
                raise NpquantError(
                    f"quantized tensor {name!r} must be a QuantizedTensor of {want} {picked[name].shape}, got {got}"
                )
        parent = Path(os.path.abspath(out)).parent
        notes = notes + clean_stale(parent)
        results: list[LayerResult] = []
        written = scheme if per_layer is None else {n: layer_scheme[n] for n in picked}
        try:
            lock = OutputLock.create(parent, out.name)
        except OSError as exc:
            raise _write_failed(out, exc, None) from None
        tmp = lock.directory
        try:
            _chmod_as_umask(tmp)  # mkdtemp makes 0700; OUT should look like any new directory
            shard_files = _write_shards(ckpt, tmp, layer_scheme, picked, results, workers, progress, quantized, observer,
                                        replaced)
            notes += _write_sidecars(ckpt, tmp, written, choices, shard_files)
            lock.finish()
            _replace(tmp, out, force)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.close()
            cause = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc, NpquantError) else None
            if isinstance(cause, OSError):  # disk full, file size limit, permissions: name OUT, not the temporary
                raise _write_failed(out, cause, tmp) from None
            raise
        lock.close()
    skipped = [c for c in choices if not c.quantize and c.reason != "not a .weight tensor"]
    return {
        "layers": results,
        "skipped": skipped,
        "warnings": notes,
        "bytes_before": sum(r.bytes_before for r in results),
        "bytes_after": sum(r.bytes_after for r in results),
        "out": out,
    }


def _write_failed(out: Path, exc: OSError, tmp: Path | None) -> NpquantError:
    """One line for an OSError while writing: OUT, the file inside it, the reason, and that nothing was left."""
    where = ""
    name = getattr(exc, "filename", None)
    if tmp is not None and isinstance(name, str) and name.startswith(str(tmp)):
        where = f" (at {name[len(str(tmp)) + 1:] or '.'})"
    elif isinstance(name, str):
        where = f" ({name})"
    kept = f"; the existing {out} is as it was" if os.path.lexists(out) else ""
    return NpquantError(f"cannot write output {out}: {exc.strerror or exc}{where}; nothing was written{kept}")


def _choices_for_mapping(ckpt, per_layer: dict[str, Scheme]) -> list[LayerChoice]:
    """Layer choices for a per-layer mapping: exactly its names, each checked against the checkpoint."""
    defaults = {c.name: c for c in select_layers(ckpt)}
    for name, sch in per_layer.items():
        if name not in ckpt.tensors:
            raise NpquantError(f"the plan names layer {name!r}, which {ckpt.path} lacks: is the plan for another model?")
        t = ckpt.tensors[name]
        if t.ndim != 2 or t.code not in _QUANTIZABLE or not name.endswith(".weight"):
            raise NpquantError(f"the plan names {name!r} ({t.code} {t.shape}), which is not a 2-D float linear weight")
        if not defaults[name].quantizable:
            raise NpquantError(f"the plan names {name!r}, which npquant cannot quantize: {defaults[name].reason}")
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


def _checked_replacements(ckpt, replaced: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``replaced`` checked against ``ckpt`` and cast to each tensor's dtype (see :func:`quantize_checkpoint`)."""
    out = {}
    for name, a in replaced.items():
        t = ckpt.tensors.get(name)
        if t is None:
            raise NpquantError(f"replaced tensor {name!r} is not in {ckpt.path}")
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.shape != tuple(t.shape):
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise NpquantError(f"replaced tensor {name!r} must be a float array of shape {tuple(t.shape)}, got {got}")
        if t.code not in ("F64", "F32", "F16", "BF16"):
            raise NpquantError(f"replaced tensor {name!r} is stored as {t.code} in {ckpt.path}: only float tensors "
                               f"(F32, F16, BF16) can be replaced")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            cast = a.astype(t.dtype)
        if not np.isfinite(cast.astype(np.float32)).all():
            raise NpquantError(f"replaced tensor {name!r} holds NaN or Inf (or overflows {t.code})")
        out[name] = cast
    return out


def _write_shards(ckpt, tmp, layer_scheme, picked, results, workers, progress, quantized, observer,
                  replaced) -> dict[str, list[str]]:
    """Write every shard into ``tmp``; return each output file's tensor names."""
    def job(src: TensorSource) -> dict:
        if src.name in quantized:
            qt = quantized[src.name]
            rel, sqnr = weight_error(replaced.get(src.name, src), qt)
            results.append(LayerResult(src.name, src.shape, src.nbytes, qt.nbytes, rel, sqnr))
            arrays = _layer_arrays(src.name[: -len(".weight")], qt)
        elif src.name in picked:
            qt, rel, sqnr = quantize_measured(replaced.get(src.name, src),
                                              _stored_scheme(layer_scheme[src.name], src),
                                              name=f"tensor {src.name!r} in {src.file.name}:",
                                              observer=observer)
            results.append(LayerResult(src.name, src.shape, src.nbytes, qt.nbytes, rel, sqnr))
            arrays = _layer_arrays(src.name[: -len(".weight")], qt)
        elif src.name in replaced:
            arrays = {src.name: replaced[src.name]}
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
                if src.name in quantized:  # made elsewhere: written with its own scheme (its scales' dtype)
                    plans += _layer_plans(src.name[: -len(".weight")], src.shape, quantized[src.name].scheme)
                elif src.name in picked:
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
    """fp8 blocks and symmetric int codes on the full grid store their scales in the layer's dtype, as
    compressed-tensors does (bfloat16 for a bfloat16 layer, float16 for float16); the engine then divides in that
    dtype too (:mod:`npquant.quantize`)."""
    full_int = scheme.dtype == "int" and scheme.symmetric and scheme.grid == "full"
    if (scheme.granularity == "block" or full_int) and src.code in ("BF16", "F16"):
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


def _write_sidecars(ckpt, tmp, scheme, choices, shard_files) -> list[str]:
    """config.json, the index, the model card with its header, and every other file beside the weights.

    Returns a note for each entry left out because it is neither a file nor a
    folder (a FIFO, a socket, a device, a broken link): copying one would
    block or fail.
    """
    ignore = sorted({c.module for c in choices if not c.quantize and c.name.endswith(".weight") and len(c.shape) == 2})
    config = ckpt.config or {}
    config["quantization_config"] = _quantization_config(scheme, ignore, [c.module for c in choices if c.quantize])
    notes: list[str] = []
    if ckpt.path.is_dir():
        for item in sorted(ckpt.root.iterdir()):
            if item.suffix == ".safetensors" or item.suffix in PICKLE_SUFFIXES or item.name in (INDEX_NAME, "config.json"):
                continue
            if item.name.startswith("."):
                continue
            kind = _entry_kind(item)
            if kind is None:
                notes.append(f"left out {item}: not a regular file or folder")
            elif item.name == "README.md" and kind == "file":
                card = _model_card(item.read_bytes(), scheme, config["quantization_config"]["format"], choices)
                (tmp / item.name).write_bytes(card)
                shutil.copystat(item, tmp / item.name)
            elif kind == "dir":
                shutil.copytree(item, tmp / item.name, ignore=_ignore_in_copy(notes))
            else:
                shutil.copy2(item, tmp / item.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if ckpt.index is not None:
        weight_map = {name: file for file, names in shard_files.items() for name in names}
        total = sum(_tensor_bytes(tmp / f) for f in shard_files)
        index = {**ckpt.index, "metadata": {**ckpt.index.get("metadata", {}), "total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return notes


def _entry_kind(path: Path) -> str | None:
    """``"file"`` or ``"dir"`` (symbolic links followed), or None for anything else and broken links."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else None


def _ignore_in_copy(notes: list[str]):
    """copytree's ``ignore``: pickles, and entries that are not files or folders (noted)."""
    def ignore(folder, names):
        skip = set()
        for name in names:
            if name.endswith(PICKLE_SUFFIXES):
                skip.add(name)
            elif _entry_kind(Path(folder) / name) is None:
                notes.append(f"left out {Path(folder) / name}: not a regular file or folder")
                skip.add(name)
        return skip
    return ignore


# YAML front matter at the top of a model card: the hub reads its metadata only there, so the header goes after it.
_FRONT_MATTER = re.compile(rb"\A---[ \t]*\r?\n(?:.*?\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def _model_card(original: bytes, scheme, fmt: str, choices) -> bytes:
    """The source model card with a short header saying it is npquant's quantized copy, and with which schemes.

    The original bytes follow unchanged (after its YAML front matter, if it
    has one, which must stay first for the hub to read it).

    >>> print(_model_card(b"---\\nlicense: mit\\n---\\n# A model\\n", schemes()["w8-channel"],
    ...                   "pack-quantized", []).decode())  # doctest: +ELLIPSIS
    ---
    license: mit
    ---
    <!-- npquant: quantized copy -->
    > **Quantized copy**, written by npquant...: linear layers quantized with w8-channel, ...
    <BLANKLINE>
    # A model
    <BLANKLINE>
    """
    names = {sch: label for label, sch in schemes().items()}
    if isinstance(scheme, Scheme):
        what = f"linear layers quantized with {names.get(scheme, str(scheme))}"
    else:
        counts: dict[str, int] = {}
        for sch in scheme.values():
            label = names.get(sch, str(sch))
            counts[label] = counts.get(label, 0) + 1
        what = "a scheme per linear layer: " + ", ".join(f"{label} ({_layers(n)})" for label, n in counts.items())
    kept = sum(1 for c in choices if not c.quantize and c.name.endswith(".weight") and len(c.shape) == 2)
    left = f"; {_layers(kept)} left as they were" if kept else ""
    version = npquant_version()
    header = (f"<!-- npquant: quantized copy -->\n"
              f"> **Quantized copy**, written by npquant{' ' + version if version else ''}: {what}, "
              f"stored as compressed-tensors ({fmt}){left}. Every other tensor is unchanged. "
              f"The original model card follows, unchanged.\n\n").encode()
    m = _FRONT_MATTER.match(original)
    cut = m.end() if m else 0
    return original[:cut] + header + original[cut:]


def _layers(n: int) -> str:
    return f"{n} linear layer{'' if n == 1 else 's'}"


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


def _chmod_as_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` goes only once the new one is in place.

    ``out`` is checked again here (the run may have taken minutes): what
    appeared there meanwhile is replaced only by the same rules as before.
    """
    if not os.path.lexists(out):
        os.rename(tmp, out)  # over a directory made meanwhile only if it is empty: never loses anything
        return
    problem = existing_output_problem(out, force)
    if problem:
        raise NpquantError(problem)
    trash = OutputLock.create(out.parent, out.name, "old")
    old = trash.directory / "old"
    done = False
    try:
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # the old output back where it was
            raise
        done = True
    finally:
        if done or not os.path.lexists(old):
            shutil.rmtree(trash.directory, ignore_errors=True)
        trash.close()
