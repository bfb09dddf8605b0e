"""Argument checks shared by the public entry points (private)."""

from __future__ import annotations

import functools
import os
import stat

import numpy as np

from .errors import NpquantError

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(a) -> str:
    """A dtype's name, also for ml_dtypes' types (bfloat16, float8_*)."""
    return _name_of(a.dtype)


@functools.lru_cache(maxsize=256)
def _name_of(dtype) -> str:
    # numpy computes ``dtype.name`` on every access (about 2 us): a quarter
    # of a small layer's whole ``linear`` call before this cache.
    return np.dtype(dtype).name


def check_weight(w, name: str = "w") -> np.ndarray:
    """Check that ``w`` is a non-empty 2-D floating array ``(out_features, in_features)``.

    ``w`` is an ndarray or a row source: anything with ``shape``, ``dtype``
    and row slicing (``np.memmap``, a checkpoint's TensorSource). Returns
    ``w`` itself, never a converted copy: callers convert row chunks to
    float32 so big inputs stay cheap.
    """
    row_source = all(hasattr(w, a) for a in ("shape", "dtype", "__getitem__")) and not isinstance(w, (list, tuple))
    if not (isinstance(w, np.ndarray) or row_source):
        raise NpquantError(f"{name} must be a numpy array (out_features, in_features), got {type(w).__name__}")
    if dtype_name(w) not in _FLOAT_DTYPES:
        raise NpquantError(
            f"{name} must be floating ({', '.join(_FLOAT_DTYPES)}), got dtype {dtype_name(w)}; "
            f"convert it with .astype(np.float32)"
        )
    if len(w.shape) != 2:
        raise NpquantError(f"{name} must be 2-D (out_features, in_features), got shape {w.shape}")
    if 0 in w.shape:
        raise NpquantError(f"{name} must not be empty, got shape {w.shape}")
    return w


def check_finite_rows(chunk: np.ndarray, row0: int, name: str) -> None:
    """Raise naming the first row of ``chunk`` (offset ``row0``) holding NaN or Inf."""
    finite = np.isfinite(chunk).all(axis=1)
    if not finite.all():
        row = row0 + int(np.argmin(finite))
        raise NpquantError(f"{name} row {row} holds NaN or Inf; only finite weights can be quantized")


def rows_per_chunk(in_features: int, elements: int = 1 << 21) -> int:
    """Rows per work chunk so that a float32 chunk holds about ``elements`` values (8 MiB)."""
    return max(1, elements // max(1, in_features))


def stat_text_file(path, what: str, hint: str) -> os.stat_result:
    """``os.stat(path)`` of a text file about to be read, refused (one line naming ``what`` and ``path``) when it is
    missing, a directory or anything but a regular file: a FIFO would block the read, a device never end it.
    ``hint`` ends the refusal (what to give instead)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise NpquantError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device?)"
        raise NpquantError(f"{what} {path} is {kind}; {hint}")
    return st
