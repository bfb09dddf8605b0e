"""GGUF to the Hugging Face layout: :func:`convert_gguf`.

The output directory holds what a safetensors checkpoint of the model holds,
so that :func:`npquant.quantize_checkpoint` quantizes it and vLLM or
transformers load it:

- ``config.json`` from the GGUF metadata (:attr:`GGUFModel.config`), with
  ``torch_dtype`` the dtype written;
- ``model.safetensors``: every tensor dequantized (one at a time, through
  npquant's streaming writer) and stored as float32, float16 or bfloat16;
- ``tokenizer.json`` from the GGUF vocabulary and merges, and
  ``tokenizer_config.json`` (special tokens, ``add_bos_token``, the chat
  template), ``generation_config.json`` (bos/eos ids).

It is written to a hidden temporary directory beside OUT and renamed once
complete; a failure leaves neither OUT nor the temporary directory. An
existing OUT is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import NpquantError
from ..safetensors_io import TensorPlan, write_safetensors
from .gguf import read_gguf

__all__ = [
    "convert_gguf",
    "Conversion",
    "CONVERT_DTYPES",
]

#: The dtypes :func:`convert_gguf` writes.
CONVERT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_gguf` wrote.

    ``out`` the directory; ``architecture`` the Hugging Face class;
    ``dtype`` of the weights written; ``tensors`` how many; ``bytes`` of
    tensor data; ``types`` each GGML type of the GGUF -> how many tensors had
    it; ``lossy`` the same for the types llama.cpp had quantized already
    (every type but F32, F16, BF16): those weights are llama.cpp's grid.
    """

    out: Path
    architecture: str
    dtype: str
    tensors: int
    bytes: int
    types: dict = field(default_factory=dict)
    lossy: dict = field(default_factory=dict)


def convert_gguf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "bfloat16",
    *,
    progress: Callable[[str, int], None] | None = None,
) -> Conversion:
    """Write the GGUF model ``path`` as a Hugging Face model directory ``out``.

    Parameters
    ----------
    path : a ``.gguf`` file (see :func:`npquant.checkpoints.gguf.read_gguf`)
    out : the directory to create; it must not exist
    dtype : ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``, of
        every tensor written. float32 keeps the dequantized values exactly;
        bfloat16 rounds them to 8 significant bits, float16 to 11 (and a
        value beyond float16's range, 65504, is an error naming the tensor).
    progress : called as ``progress(name, nbytes)`` after each tensor written

    Returns
    -------
    Conversion : what was written, and which GGML types were lossy already

    Raises
    ------
    NpquantError : one line naming the file or OUT; nothing is left behind
    """
    if dtype not in CONVERT_DTYPES:
        raise NpquantError(f"dtype={dtype!r} is not one npquant converts to; choose one of {', '.join(CONVERT_DTYPES)}")
    out = Path(out)
    if os.path.lexists(out):
        raise NpquantError(f"OUT {out} already exists; give a new directory (convert never writes over anything)")
    parent = Path(os.path.abspath(out)).parent
    if not parent.is_dir():
        raise NpquantError(f"cannot write OUT {out}: the folder {parent} does not exist; create it first")
    target = _numpy_dtype(dtype)
    with read_gguf(path) as model:
        sidecars = {  # built before anything is written: an unsupported tokenizer stops here
            "config.json": {**model.config, "torch_dtype": dtype},
            "tokenizer.json": model.tokenizer_json(),
            "tokenizer_config.json": model.tokenizer_config(),
            "generation_config.json": _generation_config(model.config),
        }
        model.tokenizer()  # the tokenizers library accepts the vocabulary and merges
        plans = [TensorPlan(t.name, target, t.shape) for t in model.tensors.values()]
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
        except OSError as exc:
            raise NpquantError(f"cannot write OUT {out}: {exc.strerror or exc}") from None
        try:
            _chmod_as_umask(tmp)  # mkdtemp makes 0700; OUT should look like any new directory
            nbytes = write_safetensors(tmp / "model.safetensors", plans, _arrays(model, target, dtype, progress),
                                       metadata={"format": "pt"})
            for name, content in sidecars.items():
                (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            if os.path.lexists(out):
                raise NpquantError(f"OUT {out} appeared while converting; nothing was written to it")
            os.rename(tmp, out)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, permissions: name OUT, not the temporary directory
                raise NpquantError(f"cannot write OUT {out}: {exc.strerror or exc}") from None
            raise
        return Conversion(out=out, architecture=model.config["architectures"][0], dtype=dtype,
                          tensors=len(plans), bytes=nbytes, types=model.types, lossy=model.lossy)


def _arrays(model, target: np.dtype, dtype: str, progress):
    """Each tensor as a one-entry dict ``{name: array of target dtype}``, dequantized as it is drawn."""
    for name in model:
        w = model[name]
        with np.errstate(over="ignore"):
            arr = w.astype(target)
        if not np.isfinite(arr).all():  # w is finite (the reader checks): float16 overflowed
            raise NpquantError(f"tensor {name} holds {float(np.abs(w).max()):g}, beyond {dtype}'s range "
                               f"({float(np.finfo(target).max):g}): convert with dtype bfloat16 or float32")
        del w
        yield {name: arr}
        if progress is not None:
            progress(name, arr.nbytes)


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _generation_config(config: dict) -> dict:
    out = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
    return {**out, "_from_model_config": True}


def _chmod_as_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
