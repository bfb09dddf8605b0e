"""Output arrays and copies of ``x`` starting on a cache line, made in compiled code.

A model calls :func:`npquant.linear` right after numpy's own work has
streamed hundreds of megabytes through the caches, so every line of Python
a call runs comes from memory. Measured on 2 cores right after a float32
11008 x 4096 matmul: reading an array's address through ``ndarray.ctypes``
took about 57 us, an aligned ``(1, 11008)`` output made that way about
100 us; one compiled call making both takes about 47 us. With
:func:`npquant.kernels._jobs.launch`, measured end to end in one process
(old and new code alternating, 80 calls each, every call right after a
float32 matmul of another 11008 x 4096 matrix): batch-1 calls 25-55 us
faster (w8-channel 1.89 -> 1.87 ms, fp8-channel 2.06 -> 2.00, w4-g128
1.39 -> 1.35).

Tiles (:func:`tile`): the large-batch path dequantizes into a float32 tile
each call. Made afresh, a tile of MiniLM's 1536 x 384 (2.4 MB) is past
malloc's mmap threshold, so each call mapped new pages and the kernel
zeroed every one on first touch: 9-19 thousand page faults more than the
float32 encoder per 64 sentences, and 5-11% of their time. Each thread
keeps its largest tile (up to ``KEEP_UP_TO``) for its next call instead.
"""

import threading

import numpy as np
from numba import njit

_ALIGN = 64  # bytes: one cache line
#: Largest tile (float32 elements, 16 MiB) a thread keeps for its next call; larger ones are made per call.
KEEP_UP_TO = 1 << 22
_KEPT = threading.local()  # .tile: this thread's tile; a thread's own, so user threads calling at once never share one


def tile(n: int) -> np.ndarray:
    """float32 ``(n,)``, uninitialised, on a cache line: this thread's tile, reused by its next call.

    Valid until this thread asks again; nothing that outlives a call may be
    made in it. Grows to the largest ``n`` asked for up to ``KEEP_UP_TO``.
    """
    kept = getattr(_KEPT, "tile", None)
    if kept is not None and kept.shape[0] >= n:
        return kept[:n]
    made = empty_aligned(1, n)[0]
    if n <= KEEP_UP_TO:
        _KEPT.tile = made
    return made


@njit(cache=True)
def empty_aligned(m, n):
    """An uninitialised float32 ``(m, n)`` C-contiguous array whose data starts on a cache line."""
    raw = np.empty(m * n + _ALIGN // 4, np.float32)
    start = (_ALIGN - raw.ctypes.data % _ALIGN) % _ALIGN // 4
    return raw[start : start + m * n].reshape((m, n))


@njit(cache=True)
def io_aligned(x, out_features, align_x):
    """``(x or its copy, y)`` for a call: ``y`` float32 ``(M, out_features)`` uninitialised on a cache line;
    ``x`` float32 ``(M, I)``, copied if not C-contiguous, and to a cache line when ``align_x`` and it starts
    elsewhere."""
    x = np.ascontiguousarray(x)  # itself when C-contiguous
    m = x.shape[0]
    if align_x and x.ctypes.data % _ALIGN:
        copy = empty_aligned(m, x.shape[1])
        copy[:] = x
        x = copy
    return x, empty_aligned(m, out_features)


@njit(cache=True)
def even_odd(x):
    """x's even and odd columns, each a new C-contiguous float32 array: ``(M, ceil(I / 2))`` and ``(M, I // 2)``,
    for float32 ``x (M, I)``. One compiled call where numpy took two strided copies."""
    m, n = x.shape
    even = np.empty((m, (n + 1) // 2), np.float32)
    odd = np.empty((m, n // 2), np.float32)
    for r in range(m):
        for j in range(n // 2):
            even[r, j] = x[r, 2 * j]
            odd[r, j] = x[r, 2 * j + 1]
        if n % 2:
            even[r, n // 2] = x[r, n - 1]
    return even, odd
