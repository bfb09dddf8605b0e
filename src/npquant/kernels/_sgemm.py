"""OpenBLAS's ``cblas_sgemm``, called directly: tiles that add into ``y`` (``beta = 1``), which numpy cannot.

The large-batch path multiplies tiles of a few hundred columns of the
weight and adds each product into ``y``: a tile small enough to stay in
the caches between its dequantization and BLAS reading it. numpy's
``matmul`` only writes its product (``beta = 0``); adding it into ``y``
afterwards would read and write ``y`` once more per tile.

Used when numpy's BLAS is one OpenBLAS (found by ``threadpoolctl``)
exporting ``cblas_sgemm`` under a name whose integers are known (32-bit,
or 64-bit under a ``64_`` suffix), and a probe product at first use comes
out right; otherwise :func:`usable` is False and the caller multiplies
whole rows with numpy. The call runs on BLAS's own threads, as numpy's
does.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

__all__ = ["usable", "sgemm"]

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Exported names and the width of their integer arguments
_NAMES = [(f"{p}cblas_sgemm{s}", ctypes.c_int64 if "64" in s else ctypes.c_int32)
          for p in ("", "scipy_") for s in ("64_", "_64", "")]


@functools.cache
def _function():
    """``cblas_sgemm`` with its argument types set, or None where there is none to trust (probed once)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
    if len(libs) != 1:
        return None
    lib = libs[0].dynlib
    for name, blas_int in _NAMES:
        fn = getattr(lib, name, None)
        if fn is not None:
            break
    else:
        return None
    e, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    fn.restype = None
    fn.argtypes = [e, e, e, blas_int, blas_int, blas_int, f, p, blas_int, p, blas_int, f, p, blas_int]
    return fn if _probe(fn) else None


def _probe(fn) -> bool:
    """Whether ``fn`` adds a transposed and a plain product into a strided output, as :func:`sgemm` asks."""
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, (3, 8)).astype(np.float32)  # small integers: every sum exact
    w = rng.integers(-4, 5, (5, 4)).astype(np.float32)
    y = np.ones((3, 7), np.float32)
    fn(_ROW_MAJOR, _NO_TRANS, _TRANS, 3, 5, 4, 1.0, x[:, 2:].ctypes.data, 8, w.ctypes.data, 4, 1.0,
       y[:, 1:].ctypes.data, 7)
    w_t = np.ascontiguousarray(w.T)
    fn(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, 3, 5, 4, 1.0, x[:, 4:].ctypes.data, 8, w_t.ctypes.data, 5, 1.0,
       y[:, 1:].ctypes.data, 7)
    want = np.ones((3, 7), np.float32)
    want[:, 1:6] += x[:, 2:6] @ w.T + x[:, 4:8] @ w.T
    return bool(np.array_equal(y, want))


def usable() -> bool:
    """Whether :func:`sgemm` can be called in this process (probed once)."""
    return _function() is not None


def sgemm(x_at: int, lda: int, m_rows: int, tile_at: int, tile_shape: tuple, ldb: int, transposed: bool,
          beta: float, y_at: int, ldc: int) -> None:
    """``Y = beta * Y + X @ W`` for float32 row-major ``X (M, K)`` at address ``x_at`` (rows ``lda`` apart) and
    ``Y (M, T)`` at ``y_at`` (rows ``ldc`` apart); ``W`` is the tile at ``tile_at``, rows ``ldb`` apart:
    ``tile_shape`` ``(T, K)`` (``W`` its transpose) or, ``transposed``, ``(K, T)``. Only where :func:`usable`.

    Addresses, not arrays: the caller reads them once a call (``ndarray.ctypes`` costs microseconds).
    """
    k, n = tile_shape if transposed else tile_shape[::-1]
    _function()(_ROW_MAJOR, _NO_TRANS, _NO_TRANS if transposed else _TRANS, m_rows, n, k, 1.0, x_at, lda,
                tile_at, ldb, beta, y_at, ldc)
