"""The second moment of a layer's inputs, streamed: ``H = X.T @ X`` over every token.

GPTQ minimises the layer's output error ``||X W.T - X Q.T||**2``, which is
``tr((W - Q) H (W - Q).T)``: the inputs enter only through ``H``. Batches
of activations are added as they come (padding rows left out), in float64.

>>> import numpy as np
>>> h = Hessian(4)
>>> h.add(np.ones((2, 3, 4), np.float32), mask=np.array([[1, 1, 0], [1, 0, 0]]))
>>> h.tokens, float(h.matrix()[0, 0])
(3, 1.0)
"""

from __future__ import annotations

import numpy as np

from .._checks import dtype_name
from ..errors import NpquantError

__all__ = ["Hessian", "hessian_loss"]

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Hessian:
    """Streaming ``X.T @ X`` of a layer's inputs ``X (tokens, in_features)``.

    Parameters
    ----------
    in_features : int
        I, the width of the inputs.

    Attributes
    ----------
    xtx : float64 (I, I)
        The sum over tokens of ``x x^T``.
    tokens : int
        How many input rows were added.
    """

    def __init__(self, in_features: int):
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
            raise NpquantError(f"in_features must be a positive int, got {in_features!r}")
        self.xtx = np.zeros((int(in_features), int(in_features)), np.float64)
        self.tokens = 0

    @property
    def in_features(self) -> int:
        return self.xtx.shape[0]

    def add(self, x, mask=None) -> None:
        """Add the rows of ``x (..., I)``; where ``mask (...)`` is 0 the row is padding and left out.

        Rows are cast to float64 before the product, so the sum is float64
        throughout whatever ``x``'s dtype.
        """
        if not isinstance(x, np.ndarray) or dtype_name(x) not in _FLOAT_DTYPES:
            got = dtype_name(x) if isinstance(x, np.ndarray) else type(x).__name__
            raise NpquantError(f"x must be a floating numpy array (..., {self.in_features}), got {got}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise NpquantError(f"x must have last dimension in_features={self.in_features}, got shape {x.shape}")
        x2 = x.reshape(-1, self.in_features)  # (N, I)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != x.shape[:-1]:
                raise NpquantError(f"mask must have shape {x.shape[:-1]} (x without its last axis), got {mask.shape}")
            x2 = x2[mask.reshape(-1) != 0]
        x64 = x2.astype(np.float64)
        if not np.isfinite(x64).all():
            raise NpquantError("x holds NaN or Inf: a Hessian needs finite activations")
        self.xtx += x64.T @ x64
        self.tokens += x64.shape[0]

    def matrix(self) -> np.ndarray:
        """float64 ``(I, I)``: the mean ``X.T @ X / tokens`` (what GPTQ takes)."""
        if self.tokens == 0:
            raise NpquantError("the Hessian has no tokens yet: add() some activations first")
        return self.xtx / self.tokens


def hessian_loss(w, w_hat, hessian: np.ndarray) -> float:
    """``tr((W - W_hat) H (W - W_hat).T)``: the output error a Hessian predicts.

    With ``H = X.T @ X / n`` it is the mean over tokens of the squared error
    of the layer's outputs, ``||x W.T - x W_hat.T||**2``.

    Parameters
    ----------
    w, w_hat : float (O, I); ``w_hat`` may be a QuantizedTensor
    hessian : float (I, I)
    """
    if hasattr(w_hat, "dequantize"):
        w_hat = w_hat.dequantize()
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)  # (O, I)
    return float(np.einsum("oi,oi->", d @ np.asarray(hessian, np.float64), d))
