"""The numpy reference linear: ``x @ W.T`` from a quantized weight, a tile of rows at a time.

:func:`npquant.linear`'s ``"numpy"`` backend, and the path
:mod:`npquant.kernels` takes for a tensor no kernel reads. Below both, so the
kernels never import :mod:`npquant.linear`. Each tile of rows is dequantized
(about 4 MiB of float32) and multiplied with BLAS, so the full float32 weight
never exists.

>>> import numpy as np
>>> from npquant import quantize
>>> w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
>>> numpy_linear(np.ones((5, 64), np.float32), quantize(w, "w8-channel")).shape
(5, 32)
"""

from __future__ import annotations

import numpy as np

from .prepared import PreparedTensor
from .tensor import QuantizedTensor

__all__ = ["numpy_linear"]

# float32 elements per dequantized tile (4 MiB)
_TILE_ELEMENTS = 1 << 20


def numpy_linear(x2: np.ndarray, qt: QuantizedTensor | PreparedTensor, tile_elements: int = _TILE_ELEMENTS) -> np.ndarray:
    """float32 ``(M, O)`` = ``x2 @ W.T`` with ``W = qt.dequantize()``, dequantizing a tile of rows at a time.

    Parameters
    ----------
    x2 : float32 (M, I)
    qt : QuantizedTensor or PreparedTensor of shape (O, I)
    tile_elements : int
        float32 elements per dequantized tile: ``tile_elements // I`` rows (at least one).

    Returns
    -------
    float32 (M, O)
    """
    out_features, in_features = qt.shape
    y = np.empty((x2.shape[0], out_features), np.float32)
    tile = max(1, tile_elements // in_features)
    for o0 in range(0, out_features, tile):
        w_tile = qt.dequantize_rows(o0, min(o0 + tile, out_features))  # (T, I)
        np.matmul(x2, w_tile.T, out=y[:, o0 : o0 + w_tile.shape[0]])
        del w_tile  # free this tile before the next one is made
    return y
