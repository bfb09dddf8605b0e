"""Which compute backend runs: one resolution for every entry point that takes ``backend``."""

from __future__ import annotations

import functools
import importlib.util

from .errors import NpquantError

BACKENDS = ("auto", "numpy", "numba")


def available_backends() -> list[str]:
    """Backends that can run here, ``"numpy"`` first."""
    return ["numpy", "numba"] if _numba_installed() else ["numpy"]


@functools.cache
def _numba_installed() -> bool:
    # Looked up once: a module search on every call of a small layer costs
    # about a microsecond.
    return importlib.util.find_spec("numba") is not None


def resolve_backend(backend: str) -> str:
    """``"numpy"`` or ``"numba"`` for a ``backend`` argument; ``"auto"`` means numba when installed."""
    if backend not in BACKENDS:
        raise NpquantError(f"backend={backend!r} is not known; expected one of {BACKENDS}")
    if backend == "auto":
        return "numba" if _numba_installed() else "numpy"
    if backend == "numba" and not _numba_installed():
        raise NpquantError("backend='numba' needs numba: pip install 'npquant[fast]'")
    return backend
