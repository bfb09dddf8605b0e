"""The second moment of a layer's inputs, streamed: ``H = X.T @ X`` over every token.

GPTQ minimises the layer's output error ``||X W.T - X Q.T||**2``, which is
``tr((W - Q) H (W - Q).T)``: the inputs enter only through ``H``. Batches
of activations are added as they come (padding rows left out), in float64.

**Memory.** ``H`` is ``8 I**2`` bytes (1.64 GB at ``I = 14336``), and
nothing else of that size is made: a batch is cast to float64 a block of
tokens at a time and its product added a block of rows of ``H`` at a time
(temporaries of at most :data:`CHUNK_BYTES`); :meth:`Hessian.take` hands
the matrix over without a copy; :func:`hessian_loss` works a block of the
weight's rows at a time.

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

__all__ = ["Hessian", "hessian_loss", "check_in_features", "CHUNK_BYTES"]

#: Bytes of float64 temporaries of add() and hessian_loss (a block of tokens, of rows of H, of rows of w).
CHUNK_BYTES = 16 << 20

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_in_features(in_features) -> int:
    """``in_features`` as an int, refused in one line unless it is a positive int (not a bool)."""
    if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
        raise NpquantError(f"in_features must be a positive int, got {in_features!r}")
    return int(in_features)


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
        self._width = check_in_features(in_features)
        self.xtx = np.zeros((self._width, self._width), np.float64)
        self.tokens = 0

    @property
    def in_features(self) -> int:
        return self._width

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
        if self.xtx is None:
            raise NpquantError("this Hessian was handed over by take(): start a new one")
        if not np.isfinite(x2 if x2.dtype.kind == "f" and x2.dtype.itemsize >= 4 else x2.astype(np.float32)).all():
            raise NpquantError("x holds NaN or Inf: a Hessian needs finite activations")
        n, width = x2.shape
        step = max(1, CHUNK_BYTES // (8 * width))
        for t0 in range(0, n, step):
            x64 = x2[t0:t0 + step].astype(np.float64)  # (n', I)
            for r0 in range(0, width, step):  # xtx[r0:r1] += x64[:, r0:r1].T @ x64, an (r1 - r0, I) temporary
                self.xtx[r0:r0 + step] += x64[:, r0:r0 + step].T @ x64
        self.tokens += n

    def matrix(self) -> np.ndarray:
        """float64 ``(I, I)``: the mean ``X.T @ X / tokens`` (what GPTQ takes), a new array."""
        self._check_tokens()
        return self.xtx / self.tokens

    def take(self) -> np.ndarray:
        """:meth:`matrix`, divided in place and handed over: no copy, and this Hessian is done.

        For the last use of a large Hessian (``gptq(..., overwrite_hessian=True)``
        may then use it as its workspace). ``add`` and ``matrix`` refuse afterwards.
        """
        self._check_tokens()
        h, self.xtx = self.xtx, None
        h /= self.tokens
        return h

    def _check_tokens(self) -> None:
        if self.xtx is None:
            raise NpquantError("this Hessian was handed over by take(): start a new one")
        if self.tokens == 0:
            raise NpquantError("the Hessian has no tokens yet: add() some activations first")


def hessian_loss(w, w_hat, hessian: np.ndarray) -> float:
    """``tr((W - W_hat) H (W - W_hat).T)``: the output error a Hessian predicts.

    With ``H = X.T @ X / n`` it is the mean over tokens of the squared error
    of the layer's outputs, ``||x W.T - x W_hat.T||**2``.

    Parameters
    ----------
    w, w_hat : float (O, I); ``w_hat`` may be a QuantizedTensor, or None
        (zero: the result is then ``tr(W H W.T)``, the output's own size)
    hessian : float (I, I)

    Worked out a block of rows at a time, so memory stays at ``hessian`` and
    the weights whatever ``O``.
    """
    hessian = np.asarray(hessian)
    w = np.asarray(w)
    out_features, in_features = w.shape
    if hessian.dtype != np.float64:
        hessian = hessian.astype(np.float64)
    rows = max(1, CHUNK_BYTES // (8 * in_features))
    total = 0.0
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        if w_hat is None:
            part = 0.0
        elif hasattr(w_hat, "dequantize_rows"):
            part = w_hat.dequantize_rows(r0, r1)
        elif hasattr(w_hat, "dequantize"):
            part = w_hat.dequantize()[r0:r1]
        else:
            part = np.asarray(w_hat)[r0:r1]
        d = w[r0:r1].astype(np.float64) - np.asarray(part, np.float64)  # (rows, I)
        total += float(np.einsum("oi,oi->", d @ hessian, d))
    return total
