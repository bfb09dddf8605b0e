"""AWQ: per-input-channel scales that protect the weights of the inputs that fire most.

For linear layers ``y_k = x @ W_k.T`` that share an input ``x (N, I)``,
activation-aware weight quantization (Lin et al., 2023) multiplies each
input column ``i`` of every ``W_k`` by ``s_i`` before quantizing and divides
the input by it, ``x @ W_k.T = (x / s) @ (W_k * s).T``: columns fed by large
activations are quantized on a finer grid relative to their size. Where
``x`` is produced by something linear per channel (a norm's weight, a
linear's output rows), ``1 / s`` is folded into that producer, so the model
stays an ordinary one: same architecture, same tensors, new values.

The scale is ``s = m ** a`` with ``m = mean |x|`` per input channel over the
calibration tokens, normalised as AWQ does (values below ``1e-4`` raised to
it, then divided by ``sqrt(max(s) * min(s))``), for the ``a`` of a grid
(``a = j / grid``, ``j = 0 .. grid - 1``: AWQ's 20 points from 0 to 0.95 by
default) whose quantized group has the least output error

    loss(s) = sum_k tr(dW_k H dW_k.T),   dW_k = W_k - Q(W_k * s) / s,

with ``H = X.T X / N`` (:class:`~npquant.calibrate.Hessian`'s matrix): the
mean over tokens of the squared error of the group's concatenated outputs.
``Q`` is round to nearest with the target scheme (:func:`npquant.quantize`,
numpy backend). ``a = 0`` gives ``s = 1``, plain round to nearest, so the
chosen scale is never worse than it on the calibration inputs.

GPTQ after AWQ (``awq+gptq``) runs on ``W_k * s`` with the Hessian of the
scaled inputs, ``H / (s s.T)`` (:func:`scale_hessian`).

Everything here is a pure function of arrays: the sequential drivers (which
model, which layers share an input, where ``1 / s`` folds) are in
:mod:`npquant.models`. Nothing prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_weight, dtype_name
from ..errors import NpquantError
from ..quantize import OBSERVERS, quantize
from ..schemes import get_scheme

__all__ = [
    "DEFAULT_GRID",
    "AwqResult",
    "InputStats",
    "awq_loss",
    "awq_scale",
    "fold_into_norm",
    "fold_into_rows",
    "loss_after_gptq",
    "scale_columns",
    "scale_hessian",
    "search_scale",
]

#: Points of ``a`` searched: ``a = j / DEFAULT_GRID``, ``j = 0 .. DEFAULT_GRID - 1`` (AWQ's ``n_grid``).
DEFAULT_GRID = 20

# AWQ's floor on m ** a before normalising: a dead input channel keeps a finite scale.
_FLOOR = 1e-4


@dataclass(frozen=True)
class AwqResult:
    """What :func:`search_scale` found.

    Attributes
    ----------
    scale : float32 (I,)
        ``s``: multiply the weights' input columns by it, divide the input by it.
    alpha : float
        The chosen exponent ``a``.
    loss : float
        The group's output error with ``scale`` (see the module docstring).
    rtn_loss : float
        The same with ``s = 1`` (``a = 0``): plain round to nearest.
    losses : float64 (grid,)
        The loss at every ``a`` of the grid, in order.
    """

    scale: np.ndarray
    alpha: float
    loss: float
    rtn_loss: float
    losses: np.ndarray


class InputStats:
    """What AWQ and GPTQ need of a layer's inputs, streamed: ``X.T X`` and ``sum |x|`` per channel.

    Parameters
    ----------
    in_features : int

    Attributes
    ----------
    xtx : float64 (I, I)
    abs_sum : float64 (I,)
    tokens : int
    """

    def __init__(self, in_features: int):
        from .hessian import Hessian

        self._hessian = Hessian(in_features)
        self.abs_sum = np.zeros(self._hessian.in_features, np.float64)

    @property
    def tokens(self) -> int:
        return self._hessian.tokens

    @property
    def xtx(self) -> np.ndarray:
        return self._hessian.xtx

    def add(self, x, mask=None) -> None:
        """Add the rows of ``x (..., I)`` where ``mask (...)`` is non-zero (all rows without a mask)."""
        self._hessian.add(x, mask)  # checks x and mask
        x2 = np.asarray(x).reshape(-1, self._hessian.in_features)  # (N, I)
        if mask is not None:
            x2 = x2[np.asarray(mask).reshape(-1) != 0]
        self.abs_sum += np.abs(x2.astype(np.float64)).sum(axis=0)

    def hessian(self) -> np.ndarray:
        """float64 ``(I, I)``: ``X.T X / tokens``."""
        return self._hessian.matrix()

    def abs_mean(self) -> np.ndarray:
        """float64 ``(I,)``: ``mean |x|`` per input channel."""
        if self.tokens == 0:
            raise NpquantError("the input statistics have no tokens yet: add() some activations first")
        return self.abs_sum / self.tokens


def awq_scale(abs_mean, alpha: float) -> np.ndarray:
    """float32 ``(I,)``: AWQ's scale ``m ** a``, floored at 1e-4, divided by ``sqrt(max * min)``.

    >>> awq_scale(np.array([1.0, 4.0]), 0.5).tolist()
    [0.7071067690849304, 1.4142135381698608]
    >>> awq_scale(np.array([1.0, 4.0]), 0.0).tolist()
    [1.0, 1.0]
    """
    m = _check_abs_mean(abs_mean)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 <= alpha <= 1:
        raise NpquantError(f"alpha must be a float in [0, 1], got {alpha!r}")
    s = np.maximum(m ** float(alpha), _FLOOR)  # (I,) float64
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def awq_loss(ws, hessian, scale, scheme, *, observer: str = "minmax") -> float:
    """``sum_k tr(dW_k H dW_k.T)`` with ``dW_k = W_k - Q(W_k * s) / s``: the group's mean squared output error.

    Parameters
    ----------
    ws : list of float (O_k, I): the weights that read the same input
    hessian : float (I, I): ``X.T X / N`` of the (unscaled) inputs
    scale : float (I,): ``s``
    scheme : Scheme or preset name
    """
    ws, h, scheme = _check_group(ws, hessian, scheme, observer)
    s = _check_scale(scale, h.shape[0])
    return _group_loss(ws, h, s, scheme, observer)


def search_scale(ws, abs_mean, hessian, scheme, *, grid: int = DEFAULT_GRID, observer: str = "minmax",
                 loss=None) -> AwqResult:
    """The AWQ scale of a group of weights sharing an input: the ``a`` of the grid with the least loss.

    Parameters
    ----------
    ws : list of float16, bfloat16, float32 or float64 (O_k, I)
        The group's weights (e.g. query, key and value). Never modified.
    abs_mean : float (I,)
        ``mean |x|`` per input channel (:meth:`InputStats.abs_mean`).
    hessian : float (I, I)
        ``X.T X / N`` of the same inputs (:meth:`InputStats.hessian`).
    scheme : Scheme or preset name
        What the weights will be quantized with.
    grid : int
        ``a = j / grid`` for ``j = 0 .. grid - 1``; ties go to the smaller ``a``.
    observer : {"minmax", "mse"}
    loss : callable or None
        ``loss(s) -> float``: the group's output error with the scale ``s``
        (float32 ``(I,)``) under the quantizer that will run, e.g. GPTQ on
        ``W * s`` (AWQ+GPTQ: a scale chosen for rounding to nearest is not
        the one GPTQ does best with). None: :func:`awq_loss`, round to
        nearest. Called once per point of the grid, ``a = 0`` (``s = 1``)
        first; it must return a finite float >= 0.

    Returns
    -------
    AwqResult

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((256, 64)) * np.where(np.arange(64) < 4, 20.0, 1.0)  # 4 loud channels
    >>> w = rng.standard_normal((32, 64)).astype(np.float32)
    >>> r = search_scale([w], np.abs(x).mean(0), x.T @ x / 256, "w4-g32")
    >>> r.scale.shape, r.scale.dtype, r.loss <= r.rtn_loss, r.alpha > 0
    ((64,), dtype('float32'), True, True)
    """
    ws, h, scheme = _check_group(ws, hessian, scheme, observer)
    m = _check_abs_mean(abs_mean, h.shape[0])
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise NpquantError(f"grid must be a positive int (points of a in [0, 1)), got {grid!r}")
    if loss is not None and not callable(loss):
        raise NpquantError(f"loss must be a callable loss(scale) -> float or None, got {type(loss).__name__}")
    losses = np.empty(int(grid), np.float64)
    best = None
    for j in range(int(grid)):
        s = awq_scale(m, j / grid)
        losses[j] = _group_loss(ws, h, s, scheme, observer) if loss is None else _checked_loss(loss, s, j / grid)
        if best is None or losses[j] < losses[best[0]]:  # strict: ties keep the smaller a
            best = (j, s)
    j, s = best
    return AwqResult(scale=s, alpha=j / grid, loss=float(losses[j]), rtn_loss=float(losses[0]), losses=losses)


def scale_hessian(hessian, scale) -> np.ndarray:
    """float64 ``(I, I)``: the Hessian of ``x / s`` from that of ``x``, ``H[i, j] / (s_i s_j)`` (what GPTQ takes
    for ``W * s``)."""
    h = np.asarray(hessian, np.float64)
    s = _check_scale(scale, h.shape[0]).astype(np.float64)
    return h / np.outer(s, s)


def scale_columns(w, scale) -> np.ndarray:
    """float32 ``(O, I)``: ``W * s``, input column ``i`` times ``s_i`` (a new array)."""
    check_weight(w, "w")
    s = _check_scale(scale, w.shape[1])
    return np.asarray(w).astype(np.float32) * s[None, :]


def fold_into_rows(w, bias, scale) -> tuple[np.ndarray, np.ndarray | None]:
    """A linear whose output ``j`` is divided by ``s_j``: ``(W / s[:, None], b / s)``, float32 (new arrays).

    For a linear that produces the scaled group's input (value -> attention
    output, up -> down): its outputs become ``y / s``. ``bias`` may be None.
    """
    check_weight(w, "w")
    s = _check_scale(scale, w.shape[0])
    w_out = np.asarray(w).astype(np.float32) / s[:, None]
    if bias is None:
        return w_out, None
    b = np.asarray(bias)
    if b.shape != (w.shape[0],):
        raise NpquantError(f"bias must have shape ({w.shape[0]},) for w {w.shape}, got {b.shape}")
    return w_out, b.astype(np.float32) / s


def fold_into_norm(weight, bias, scale) -> tuple[np.ndarray, np.ndarray | None]:
    """A norm (LayerNorm or RMSNorm) whose output is divided by ``s``: ``(weight / s, bias / s)``, float32.

    The norm's output must feed only the scaled group: where it also feeds
    a residual (a post-LayerNorm BERT), the fold changes the model.
    ``bias`` may be None (RMSNorm).
    """
    g = np.asarray(weight)
    if g.ndim != 1:
        raise NpquantError(f"norm weight must be 1-D (C,), got shape {g.shape}")
    s = _check_scale(scale, g.shape[0])
    if bias is not None and np.asarray(bias).shape != g.shape:
        raise NpquantError(f"norm bias must have shape {g.shape} like its weight, got {np.asarray(bias).shape}")
    return g.astype(np.float32) / s, None if bias is None else np.asarray(bias).astype(np.float32) / s


def loss_after_gptq(quantize_layer, ws, h, moments, scheme):
    """``loss(s)`` for :func:`search_scale`: the group's output error after GPTQ on ``W * s`` (AWQ+GPTQ).

    ``quantize_layer(w, h, scheme, moments=None, anchor=None)`` is the
    driver's GPTQ: ``anchor`` (``w`` when None) by GPTQ with ``h``, or with
    ``moments`` GPTQ on the model objective's target of ``w`` anchored there
    (:func:`~npquant.calibrate.target.model_target`). ``ws``: float32
    ``(O_k, I)``; ``h``: float64 ``(I, I)``, ``X~.T X~ / N``.

    Layer objective (``moments`` None): ``sum_k tr((W_k s - Q_k) H_s (W_k s - Q_k).T)``, ``H_s = H / (s s.T)``, the
    loss GPTQ itself minimises. Model objective (``moments = (C, H~, H)`` of the unscaled quantized inputs):
    the scaled inputs' ``C / s`` and ``H~ / (s s.T)`` (exact up to the fold's float rounding), GPTQ on the
    target of ``W`` anchored at ``W * s``, scored by :func:`~npquant.calibrate.target.model_loss`. ``s = 1``
    scores what GPTQ alone gives, so the chosen scale never does worse on the calibration inputs.
    """
    from .hessian import hessian_loss
    from .target import model_loss

    def loss(s):
        s64 = s.astype(np.float64)
        if moments is not None:
            scaled = (moments[0] / s64[None, :], moments[1] / np.outer(s64, s64), moments[2])
        else:
            h_s = scale_hessian(h, s)
        total = 0.0
        for w in ws:
            w_s = w * s[None, :]  # float32, as folded
            if moments is None:
                total += hessian_loss(w_s, quantize_layer(w_s, h_s, scheme), h_s)
            else:
                qt = quantize_layer(w, None, scheme, scaled, anchor=w_s)
                total += model_loss(w, qt.dequantize(), *scaled)
        return total

    return loss


# --- the loss and the checks --------------------------------------------------------------------------------
def _group_loss(ws, h: np.ndarray, s: np.ndarray, scheme, observer: str) -> float:
    """``sum_k tr(dW_k H dW_k.T)``, float64, for float32 ``ws`` and float32 ``s``."""
    s64 = s.astype(np.float64)
    total = 0.0
    for w in ws:
        qt = quantize(w * s[None, :], scheme, backend="numpy", observer=observer)  # W * s in float32, as folded
        d = w.astype(np.float64) - qt.dequantize().astype(np.float64) / s64[None, :]  # (O, I)
        total += float(np.einsum("oi,oi->", d @ h, d))
    return total


def _checked_loss(loss, s: np.ndarray, alpha: float) -> float:
    value = loss(s)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value) \
            or value < 0:
        raise NpquantError(f"loss(scale) must return a finite float >= 0, got {value!r} at a={alpha}")
    return float(value)


def _check_group(ws, hessian, scheme, observer):
    """``(float32 weights, float64 Hessian, Scheme)``, checked."""
    if isinstance(ws, np.ndarray) or not isinstance(ws, (list, tuple)) or not ws:
        raise NpquantError("ws must be a non-empty list of weights (O_k, I) that read the same input")
    out = []
    for k, w in enumerate(ws):
        check_weight(w, f"ws[{k}]")
        if w.shape[1] != ws[0].shape[1]:
            raise NpquantError(f"ws[{k}] has in_features={w.shape[1]}, ws[0] {ws[0].shape[1]}: a group shares its "
                               f"input")
        w32 = np.asarray(w).astype(np.float32)
        if not np.isfinite(w32).all():
            raise NpquantError(f"ws[{k}] holds NaN or Inf")
        out.append(w32)
    in_features = out[0].shape[1]
    if not isinstance(hessian, np.ndarray) or hessian.shape != (in_features, in_features):
        got = hessian.shape if isinstance(hessian, np.ndarray) else type(hessian).__name__
        raise NpquantError(f"hessian must be a numpy array ({in_features}, {in_features}), got {got}")
    h = hessian.astype(np.float64)
    if not np.isfinite(h).all():
        raise NpquantError("hessian holds NaN or Inf")
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {OBSERVERS}")
    return out, h, get_scheme(scheme)


def _check_abs_mean(abs_mean, in_features: int | None = None) -> np.ndarray:
    if not isinstance(abs_mean, np.ndarray) or abs_mean.ndim != 1 or abs_mean.dtype.kind != "f":
        got = f"{abs_mean.shape} {dtype_name(abs_mean)}" if isinstance(abs_mean, np.ndarray) else type(abs_mean).__name__
        raise NpquantError(f"abs_mean must be a 1-D float array (I,) of mean |x| per input channel, got {got}")
    if in_features is not None and abs_mean.shape[0] != in_features:
        raise NpquantError(f"abs_mean must have {in_features} entries (the weights' in_features), got "
                           f"{abs_mean.shape[0]}")
    m = abs_mean.astype(np.float64)
    if not np.isfinite(m).all() or (m < 0).any():
        raise NpquantError("abs_mean must be finite and >= 0 (a mean of |x|)")
    return m


def _check_scale(scale, n: int) -> np.ndarray:
    """float32 ``(n,)``, finite and positive."""
    if not isinstance(scale, np.ndarray) or scale.shape != (n,) or scale.dtype.kind != "f":
        got = f"{scale.shape} {dtype_name(scale)}" if isinstance(scale, np.ndarray) else type(scale).__name__
        raise NpquantError(f"scale must be a float array ({n},), got {got}")
    s = scale.astype(np.float32)
    if not np.isfinite(s).all() or (s <= 0).any():
        raise NpquantError("scale must be finite and > 0 per channel")
    return s
