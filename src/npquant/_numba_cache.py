"""numba's disk cache keyed on every numba source of npquant, not only the file a function is in.

numba keys a cached function on the contents of the file that defines it,
but the machine code it caches holds every numba function it calls, from
other files too: the C jobs that OpenBLAS's threads run (``kernels/_jobs.py``)
hold the kernels of ``_gemv.py`` and the rest, and a kernel holds
``_decode.py``'s helpers. Edit one of those and the cache went on serving
the old code wherever the caller's file was unchanged: a prefetch added to
``_gemv.py`` ran on npquant's pool but not on OpenBLAS's threads, and a
changed result would have been as silent. An editable install that pulls a
new version meets the same. Here every function defined in one of
:func:`sources` is cached under one key, the digest of all of them: any edit
recompiles them all, once.

:func:`install` puts locators in front of numba's own for those files only
(every other numba function in the process keeps numba's rules), in numba's
order (``NUMBA_CACHE_DIR``, beside the source, the user's cache directory).
With a numba whose caching module differs, nothing is installed and numba's
per-file keys apply; ``NUMBA_CACHE_LOCATOR_CLASSES`` (the user's own list)
is left to rule.
"""

from __future__ import annotations

import functools
import hashlib
import os

__all__ = ["digest", "install", "sources", "stamp"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def sources() -> tuple[str, ...]:
    """The files whose numba functions share the key: ``kernels/*.py`` and ``_quantize_numba.py``, absolute."""
    kernels = os.path.join(_PACKAGE, "kernels")
    names = sorted(os.path.join(kernels, n) for n in os.listdir(kernels) if n.endswith(".py"))
    names.append(os.path.join(_PACKAGE, "_quantize_numba.py"))
    return tuple(n for n in names if os.path.isfile(n))


@functools.lru_cache(maxsize=8)
def _digest_of(stamps: tuple) -> bytes:
    h = hashlib.sha256()
    for path, _, _ in stamps:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.digest()


def digest(paths) -> bytes:
    """sha256 over the names and contents of ``paths``, in order (re-read when a file's time or size changes)."""
    stamps = []
    for p in paths:
        st = os.stat(p)
        stamps.append((p, st.st_mtime_ns, st.st_size))
    return _digest_of(tuple(stamps))


def stamp() -> bytes:
    """The cache key shared by every numba function of :func:`sources`."""
    return digest(sources())


def _ours(py_file: str) -> bool:
    return os.path.abspath(py_file) in sources()


def _locator(base):
    class Locator(base):
        _npquant = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _ours(py_file):
                return None  # numba's own locators take it
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            try:
                return stamp()
            except OSError:  # a source gone or unreadable since: numba's own key for this file
                return super().get_source_stamp()

    Locator.__name__ = Locator.__qualname__ = "Npquant" + base.__name__
    return Locator


def install() -> None:
    """Put the shared-key locators in front of numba's (once a process; before npquant defines a cached function)."""
    try:
        from numba.core import caching

        classes = caching.CacheImpl._locator_classes
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)
    except (ImportError, AttributeError):
        return
    if any(getattr(c, "_npquant", False) for c in classes):
        return
    classes[:0] = [_locator(b) for b in bases]
