"""How the large-batch path cuts a weight into tiles, and BLAS over each (the kernels write the tiles).

A call at a larger batch dequantizes the weight tile by tile into one
float32 buffer of the calling thread's and multiplies each tile with
OpenBLAS's ``cblas_sgemm`` (:mod:`~npquant.kernels._sgemm`), adding the
product into ``y``; where that BLAS is not OpenBLAS, tiles are whole rows
through numpy's ``matmul``. :func:`tile_shape` chooses the tiles,
:func:`tiled` runs them.
"""

from __future__ import annotations

import functools

import numpy as np

from .._caches import SYSFS, cache_sizes
from . import _buffers, _sgemm

__all__ = ["tile_shape", "odd_lines", "row_tiles", "tiled", "l2_bytes"]


@functools.cache
def l2_bytes(root: str = SYSFS) -> int | None:
    """Bytes of cpu0's level-2 cache as Linux's sysfs under ``root`` gives them, or None where they cannot be read
    (another system, no such files)."""
    return next((size for level, size in cache_sizes(root) if level == 2), None)


def tile_shape(out_features: int, in_features: int, tile_elements: int, tile_k: int, row_step: int,
               padded: bool = False) -> tuple:
    """``(T, K)``: rows (a multiple of ``row_step``) and columns of the large-batch path's tiles.

    Where tiles can be added into ``y`` (:mod:`~npquant.kernels._sgemm`),
    ``in_features`` is cut into about equal parts of at most ``tile_k``
    columns (whole 64s), else tiles are whole rows; as many rows as
    ``tile_elements`` holds. ``padded`` (transposed tiles, ``row_step``
    16, for :func:`tiled`): ``out_features`` cut into about equal parts,
    each an odd number of 64-byte lines (:func:`odd_lines`), a whole number
    of 16 rows, at most 16 more than ``tile_elements`` holds.
    """
    cols = in_features
    if tile_k < in_features and _sgemm.usable():
        parts = -(-in_features // tile_k)
        cols = min(in_features, -(-in_features // (parts * 64)) * 64)
    rows = max(row_step, tile_elements // cols // row_step * row_step)
    if padded:
        n_tiles = -(-out_features // rows)
        return odd_lines(-(-out_features // (n_tiles * 16)) * 16), cols
    return min(rows, -(-out_features // row_step) * row_step), cols


def odd_lines(n: int) -> int:
    """The least 16 times an odd number that is at least ``n``: so many float32 fill an odd number of 64-byte
    lines. The row stride of a transposed tile.

    A tile ``(K, T)`` with ``T`` 2048 puts its ``K`` rows 8 KiB apart: each
    16 x 16 block the kernel moves out, and each panel BLAS packs from it,
    falls into the same cache sets of L1 and a few of L2. An odd number of
    lines apart they spread over all of them. 11008 x 4096 at batch 128,
    each call between two float32 matmuls (6 rounds, one process; tiles of
    2048 / 2032 / 1840 rows): w8-channel 1.06 / 0.94 / 0.98, fp8-channel
    1.10 / 1.03 / 1.00, mxfp6 1.06 / 1.03 / 0.96, w3-g128 1.11 / 0.99 /
    0.96 of the float32 matmul.
    """
    lines = -(-n // 16)
    return 16 * (lines + 1 - lines % 2)


def row_tiles(out_features: int, tile_rows: int, parts: tuple | None = None) -> list:
    """``[(o0, n, pieces)]``: the weight's rows ``[o0, o0 + n)`` dequantized as one tile, and the ``(start, rows)``
    of it that BLAS multiplies in one call each.

    Without ``parts``, tiles of ``tile_rows`` rows, each one piece. With
    ``parts`` (the row counts of layers stacked in the weight, summing to
    ``out_features``), each part is cut as it would be alone, in tiles of
    ``min(tile_rows, part)`` rows, each its own piece, so that BLAS sees
    the products that part alone gives it (:func:`tile_shape`'s rows are its
    cap or the whole weight's, and a part of more rows than ``tile_rows``
    gets the cap alone too). Parts of one tile each share a tile while
    their rows fit in ``tile_rows``.

    >>> row_tiles(1152, 2048, (384, 384, 384))
    [(0, 1152, [(0, 384), (384, 384), (768, 384)])]
    >>> row_tiles(1536, 512, (1024, 256, 256))
    [(0, 512, [(0, 512)]), (512, 512, [(512, 512)]), (1024, 512, [(1024, 256), (1280, 256)])]
    """
    tiles, group, filled, start = [], [], 0, 0  # group: the pieces of the tile being filled, filled: its rows
    for size in parts or (out_features,):
        if group and (size > tile_rows or filled + size > tile_rows):
            tiles.append((group[0][0], filled, group))
            group, filled = [], 0
        if size > tile_rows:  # a part of several tiles: each alone
            tiles += [(o0, min(tile_rows, start + size - o0), [(o0, min(tile_rows, start + size - o0))])
                      for o0 in range(start, start + size, tile_rows)]
        else:
            group.append((start, size))
            filled += size
        start += size
    if group:
        tiles.append((group[0][0], filled, group))
    return tiles


def tiled(x2: np.ndarray, y: np.ndarray, tile_rows: int, tile_cols: int, dequantize, transposed: bool,
          padded: bool = False, parts: tuple | None = None) -> None:
    """``y (M, O) = x2 (M, I) @ W.T`` tile by tile: ``dequantize(o0, k0, tile)`` writes the weight's rows
    ``[o0, o0 + T)``, columns ``[k0, k0 + K)`` into ``tile``, ``(T, K)`` or, ``transposed``, ``(K, T)``; BLAS
    multiplies it and adds the product into ``y``.

    ``padded`` (transposed): each tile is ``(K, L)``, ``L`` the least odd
    number of lines that holds its ``T`` (:func:`odd_lines`), its first ``T``
    columns the weight's rows; ``tile_rows`` should be such a number itself
    (:func:`tile_shape`), then only the last tile is wider than its rows.
    ``parts``: the row counts of layers stacked in the weight, each handed to
    BLAS as it would be alone (:func:`row_tiles`; not with ``padded``).
    The tile is the calling thread's (:func:`~npquant.kernels._buffers.tile`).
    Tiles narrower than ``I`` only where :mod:`~npquant.kernels._sgemm` is usable.
    """
    m_rows, in_features = x2.shape
    out_features = y.shape[1]
    buf = _buffers.tile((odd_lines(tile_rows) if padded else tile_rows) * tile_cols)  # this thread's, reused
    whole_rows = tile_cols == in_features and not _sgemm.usable()
    x_at, y_at, tile_at = (0, 0, 0) if whole_rows else (x2.ctypes.data, y.ctypes.data, buf.ctypes.data)
    for o0, n, pieces in row_tiles(out_features, tile_rows, None if padded else parts):
        ld = odd_lines(n) if padded else n
        for k0 in range(0, in_features, tile_cols):
            k = min(tile_cols, in_features - k0)
            tile = buf[: ld * k].reshape((k, ld) if transposed else (n, k))
            dequantize(o0, k0, tile)
            for a, m in pieces:
                t0 = a - o0  # the piece's first row in the tile
                if whole_rows:
                    np.matmul(x2, tile[:, t0 : t0 + m] if transposed else tile[t0 : t0 + m].T, out=y[:, a : a + m])
                else:
                    _sgemm.sgemm(x_at + 4 * k0, in_features, m_rows, tile_at + 4 * (t0 if transposed else t0 * k),
                                 (k, m) if transposed else (m, k), tile.shape[1], transposed,
                                 0.0 if k0 == 0 else 1.0, y_at + 4 * a, out_features)
