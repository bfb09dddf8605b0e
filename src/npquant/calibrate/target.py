"""The float model's output as a layer's target: the weight GPTQ should round when earlier layers are quantized.

Sequential GPTQ gives each layer the inputs ``X~`` it will see (the outputs
of the layers already quantized) and minimises ``||X~ W.T - X~ Q.T||**2``:
it reproduces what ``W`` would do *on the perturbed inputs*, and the error
the earlier layers made is carried along. What the model needs is the float
model's output ``X W.T`` (``X`` the float model's inputs at the same tokens),
so the objective here is

    ||X W.T - X~ Q.T||**2 = const + tr((W* - Q) H~ (W* - Q).T),
    W* = W C H~^-1,   C = X.T X~,   H~ = X~.T X~

(the least-squares ``W*`` splits the error into a part no ``Q`` can change
and GPTQ's own form): GPTQ on ``W*`` with ``H~`` minimises the float-target
error. ``W*`` is a regression of the float outputs on the perturbed inputs
fitted on the calibration tokens, and unregularised it overfits them; the
ridge here pulls it towards the weight the layer objective would round,
``W0`` (``W`` itself, or ``W`` with AWQ's scales folded in):

    W* = (W C + lam W0) (H~ + lam I)^-1,   lam = ridge * mean(diag H~)

``ridge`` 0 is the plain regression; as it grows ``W*`` goes to ``W0``, and
where ``X~ == X`` (nothing before is quantized) ``W* = W`` exactly for any
``ridge`` (with ``W0 = W``). npquant uses :data:`DEFAULT_RIDGE` = 1. On
all-MiniLM-L6-v2 (w4-g128, mse observer, no scale refit; docs/calibration.md)
the held-out mean cosine was 0.9894, 0.9898, 0.9899 and 0.9897 at ``ridge``
0.1, 0.3, 1 and 3: flat, so the value is not tuned to a figure. A ridge
towards zero instead of ``W0`` shrinks the weights (0.9227 at 0.1).

:class:`CrossMoment` streams ``C``, ``H~`` and the float inputs' own
``X.T X`` (the latter only to report the objective).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_weight
from ..errors import NpquantError
from .hessian import check_in_features

__all__ = ["DEFAULT_RIDGE", "CrossMoment", "model_target", "model_loss"]

#: The ridge of :func:`model_target`, relative to ``mean(diag H~)``.
DEFAULT_RIDGE = 1.0


class CrossMoment:
    """Streaming second moments of a layer's float inputs ``X`` and quantized-model inputs ``X~`` at the same tokens.

    Parameters
    ----------
    in_features : int

    Attributes
    ----------
    cross : float64 (I, I), ``sum x x~^T``
    xtx_q : float64 (I, I), ``sum x~ x~^T``
    xtx_f : float64 (I, I), ``sum x x^T``
    tokens : int
    """

    def __init__(self, in_features: int):
        n = check_in_features(in_features)
        self.cross = np.zeros((n, n))
        self.xtx_q = np.zeros((n, n))
        self.xtx_f = np.zeros((n, n))
        self.tokens = 0

    def add(self, x_float, x_quant, mask=None) -> None:
        """Add tokens: ``x_float``, ``x_quant`` float ``(..., I)`` of one shape; ``mask (...)`` non-zero to keep."""
        xf = np.asarray(x_float)
        xq = np.asarray(x_quant)
        n = self.cross.shape[0]
        if xf.shape != xq.shape or xf.shape[-1:] != (n,):
            raise NpquantError(f"x_float and x_quant must both be (..., {n}), got {xf.shape} and {xq.shape}")
        xf = xf.reshape(-1, n)  # (N, I)
        xq = xq.reshape(-1, n)
        if mask is not None:
            keep = np.asarray(mask).reshape(-1) != 0  # (N,)
            if keep.shape[0] != xf.shape[0]:
                raise NpquantError(f"mask must have {xf.shape[0]} entries, got {keep.shape[0]}")
            xf, xq = xf[keep], xq[keep]
        xf = xf.astype(np.float64)
        xq = xq.astype(np.float64)
        if not (np.isfinite(xf).all() and np.isfinite(xq).all()):
            raise NpquantError("the layer's inputs hold NaN or Inf")
        self.cross += xf.T @ xq
        self.xtx_q += xq.T @ xq
        self.xtx_f += xf.T @ xf
        self.tokens += xf.shape[0]

    def matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(C, H~, H)`` float64 ``(I, I)`` each, divided by the tokens."""
        if self.tokens == 0:
            raise NpquantError("no tokens were added")
        return self.cross / self.tokens, self.xtx_q / self.tokens, self.xtx_f / self.tokens


def model_target(w, cross, hessian, *, anchor=None, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """float32 ``(O, I)``: the weight whose rounding on ``X~`` best reproduces ``X w.T`` (module docstring).

    Parameters
    ----------
    w : float (O, I), the float layer (its input is the float model's ``X``)
    cross : float64 (I, I), ``X.T X~`` (per token)
    hessian : float64 (I, I), ``X~.T X~`` (per token)
    anchor : float (O, I) or None
        ``W0``, what the ridge pulls towards (default ``w``).
    ridge : float >= 0

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((500, 16))
    >>> w = rng.standard_normal((4, 16)).astype(np.float32)
    >>> h = x.T @ x / 500
    >>> bool(np.allclose(model_target(w, h, h), w, atol=1e-6))  # nothing perturbed: w itself
    True
    """
    check_weight(w, "w")
    w64 = np.asarray(w).astype(np.float64)  # (O, I)
    n = w64.shape[1]
    for value, what in ((cross, "cross"), (hessian, "hessian")):
        if not isinstance(value, np.ndarray) or value.shape != (n, n):
            raise NpquantError(f"{what} must be a numpy array ({n}, {n}), got "
                               f"{getattr(value, 'shape', type(value).__name__)}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not np.isfinite(ridge) or ridge < 0:
        raise NpquantError(f"ridge must be a finite float >= 0, got {ridge!r}")
    w0 = w64 if anchor is None else np.asarray(anchor).astype(np.float64)
    if w0.shape != w64.shape:
        raise NpquantError(f"anchor must be {w64.shape} like w, got {w0.shape}")
    h = np.array(hessian, dtype=np.float64)  # (I, I), a copy we damp
    lam = float(ridge) * float(np.mean(np.diag(h)))
    if lam <= 0:
        lam = 1e-12 * max(float(np.abs(h).max()), 1e-300)
    h[np.diag_indices_from(h)] += lam
    rhs = w64 @ np.asarray(cross, dtype=np.float64) + lam * w0  # (O, I)
    try:
        target = np.linalg.solve(h, rhs.T).T  # (O, I): W* = rhs h^-1, i.e. h W*.T = rhs.T (h symmetric)
    except np.linalg.LinAlgError:
        raise NpquantError("hessian + ridge is singular: pass X~.T X~ of real inputs") from None
    if not np.isfinite(target).all():
        raise NpquantError("the model target overflowed: the layer's inputs are degenerate")
    return target.astype(np.float32)


def model_loss(w, q, cross, hessian, hessian_float) -> float:
    """``||X w.T - X~ q.T||**2`` per token: ``tr(w H w.T) - 2 tr(w C q.T) + tr(q H~ q.T)``.

    ``w``, ``q`` float ``(O, I)`` (``q`` dequantized); ``cross`` ``X.T X~``,
    ``hessian`` ``X~.T X~``, ``hessian_float`` ``X.T X``, per token, float64 ``(I, I)``.
    """
    w64 = np.asarray(w, dtype=np.float64)
    q64 = np.asarray(q, dtype=np.float64)
    value = (np.einsum("oi,oi->", w64 @ hessian_float, w64) - 2.0 * np.einsum("oi,oi->", w64 @ cross, q64)
             + np.einsum("oi,oi->", q64 @ hessian, q64))
    return max(0.0, float(value))
