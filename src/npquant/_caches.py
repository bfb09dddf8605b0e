"""The CPU's caches as Linux's sysfs describes them: read by the kernels (tile sizes) and the benchmarks."""

from __future__ import annotations

import glob
import os

__all__ = ["cache_sizes"]

SYSFS = "/sys/devices/system/cpu/cpu0/cache"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cache_sizes(root: str = SYSFS) -> list[tuple[int | None, int]]:
    """``(level, bytes)`` of each cache cpu0 reports under ``root`` (``index*/size`` such as ``512K``, ``index*/level``),
    in index order; ``level`` None where it cannot be read, entries whose size cannot be read left out; ``[]`` on
    another system."""
    sizes = []
    for index in sorted(glob.glob(os.path.join(root, "index*"))):
        text = _read(os.path.join(index, "size")) or ""
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if unit > 1 else text
        if not digits.isdigit() or int(digits) == 0:
            continue
        level = _read(os.path.join(index, "level"))
        sizes.append((int(level) if level is not None and level.isdigit() else None, int(digits) * unit))
    return sizes
