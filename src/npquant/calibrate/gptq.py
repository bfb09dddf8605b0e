"""GPTQ: round each weight column, then push its error onto the columns not yet rounded.

For a layer ``y = x @ W.T`` with inputs whose second moment is ``H = X.T X``,
GPTQ (Frantar et al., 2022) rounds the columns of ``W`` one at a time. After
column ``j`` is rounded with error ``e = (w_j - q_j) / U[j, j]`` it updates
every later column ``k`` by ``-e * U[j, k]``, where ``U`` is the upper
Cholesky factor of ``H^-1`` (``H^-1 = U.T @ U``): the update that keeps the
layer's output closest to the original given the columns fixed so far.

npquant's variant, as the issue tracker specifies it:

- **Static scales.** Every block's scale (and zero point) is the engine's,
  computed from the original weight before any update (``observer``:
  ``"minmax"`` or ``"mse"``, the latter weighting its errors by ``diag(H)``).
  Only the codes change, so the result is an ordinary QuantizedTensor
  (no ``g_idx``), and with a diagonal ``H`` GPTQ returns exactly
  :func:`npquant.quantize`'s codes.
- **Each column is rounded by the engine's float32 rule**: the updated
  weight rounded to float32, divided by the float32 scale, rounded half to
  even, clipped (plus the zero point).
- **Act-order** (``act_order=True``): columns in order of decreasing
  ``diag(H)``, so the most important inputs are rounded first and the
  errors land on the least important ones.
- **Lazy batches** of ``block_size`` columns: inside a batch the update is
  applied column by column; the batch's accumulated errors then update the
  rest of the matrix with one BLAS product.
- **Dead inputs** (``H[i, i] == 0``: the input never fired) get ``H[i, i] = 1``
  and no coupling: their columns are rounded to nearest, and the weight is
  kept (never zeroed). **Damping** adds ``damp * mean(diag(H))`` to the
  diagonal before the Cholesky factorisation.

Arithmetic is float64 throughout (weights, updates, ``H^-1``); the codes and
scales are float32 exactly as the engine makes them.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_finite_rows, check_weight, dtype_name
from ..errors import NpquantError
from ..quantize import OBSERVERS, QuantizedTensor, _quantize
from ..schemes import Scheme, get_scheme

__all__ = ["gptq"]


def gptq(w, hessian, scheme: Scheme | str, *, act_order: bool = True, block_size: int = 128, damp: float = 0.01,
         observer: str = "minmax") -> QuantizedTensor:
    """Quantize ``w`` with GPTQ against the inputs' second moment ``hessian``.

    Parameters
    ----------
    w : float16, bfloat16, float32 or float64 (O, I)
        The weight. Never modified.
    hessian : float (I, I)
        ``X.T @ X`` of the layer's inputs, at any positive scale (a
        :class:`~npquant.calibrate.Hessian`'s ``matrix()``, say). Symmetric
        positive semi-definite.
    scheme : an int Scheme or preset name (any bits, granularity, symmetry)
    act_order : bool
        Round columns in order of decreasing ``hessian[i, i]``.
    block_size : int
        Columns per lazy batch (the result does not depend on it beyond rounding).
    damp : float
        Added to the diagonal, relative to its mean: ``H + damp * mean(diag H) * I``.
    observer : {"minmax", "mse"}
        How the static block ranges are chosen (see :mod:`npquant.quantize`).

    Returns
    -------
    QuantizedTensor
        The same layout :func:`npquant.quantize` makes: it packs, writes,
        loads, runs and prepares like any other.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))  # correlated inputs
    >>> w = rng.standard_normal((32, 64)).astype(np.float32)
    >>> qt = gptq(w, x.T @ x, "w4-g32")
    >>> qt.codes.shape, qt.scale.shape
    ((32, 32), (32, 2))
    """
    scheme = get_scheme(scheme)
    if scheme.is_float:
        raise NpquantError(
            f"gptq takes int schemes; {scheme.dtype} codes are rounded to nearest by npquant.quantize "
            f"(GPTQ's error feedback is defined here for integer grids)"
        )
    check_weight(w, "w")
    out_features, in_features = w.shape
    h = _check_hessian(hessian, in_features)
    if not isinstance(act_order, (bool, np.bool_)):
        raise NpquantError(f"act_order must be True or False, got {act_order!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise NpquantError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not np.isfinite(damp) or damp < 0:
        raise NpquantError(f"damp must be a finite float >= 0, got {damp!r}")
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {OBSERVERS}")

    w32 = np.asarray(w).astype(np.float32)  # (O, I)
    check_finite_rows(w32, 0, "w")
    diag = np.diag(h).copy()
    # Static scales: the engine's, from the original weight (with the Hessian's diagonal as importance for mse).
    importance = (diag / diag.max()).astype(np.float32) if observer == "mse" and diag.max() > 0 else None
    ref, _ = _quantize(w32, scheme, "w", measure=False, backend="numpy", observer=observer, importance=importance)
    bo, bi = ref.block_shape
    scale32 = ref.scale.astype(np.float32)  # (O / bo, I / bi)
    zp32 = None if ref.zero_point is None else ref.zero_point.astype(np.float32)

    order = np.argsort(-diag, kind="stable") if act_order else np.arange(in_features)  # (I,)
    u = _inverse_cholesky(h[np.ix_(order, order)], diag[order], damp)  # (I, I) upper, in rounding order

    row_block = np.arange(out_features) // bo  # (O,)
    wt = w32.T[order].astype(np.float64)  # (I, O): column j of W is row j here, contiguous
    q = np.empty((in_features, out_features), np.int16)  # integer codes, permuted order
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        errors = np.empty((i2 - i1, out_features), np.float64)  # (b, O)
        for j in range(i1, i2):
            col = order[j]
            s = scale32[row_block, col // bi]  # (O,)
            z = None if zp32 is None else zp32[row_block, col // bi]
            codes, deq = _round_column(wt[j], s, z, scheme)
            q[j] = codes
            err = (wt[j] - deq) / u[j, j]  # (O,)
            errors[j - i1] = err
            if j + 1 < i2:
                wt[j + 1 : i2] -= u[j, j + 1 : i2, None] * err[None, :]  # (b', O)
        if i2 < in_features:
            wt[i2:] -= u[i1:i2, i2:].T @ errors  # (I - i2, b) @ (b, O)
    q_out = np.empty((out_features, in_features), np.int16)
    q_out[:, order] = q.T
    return QuantizedTensor.from_int_codes(q_out, ref.scale, ref.zero_point, scheme)


def _round_column(w_col: np.ndarray, s: np.ndarray, z: np.ndarray | None, scheme: Scheme):
    """Codes (int16) and dequantized values (float64) of one column ``(O,)``: the engine's float32 rule."""
    v = w_col.astype(np.float32)
    ratio = np.zeros_like(v)
    np.divide(v, s, out=ratio, where=s != 0)  # a zero scale (all-zero block) gives code 0 (zero point 0)
    np.rint(ratio, out=ratio)
    if z is not None:
        ratio += z
    np.clip(ratio, scheme.qmin, scheme.qmax, out=ratio)
    levels = ratio - z if z is not None else ratio
    deq = (levels * s).astype(np.float64)  # float32 product, as dequantize()
    return ratio.astype(np.int16), deq


def _check_hessian(hessian, in_features: int) -> np.ndarray:
    """float64 (I, I) copy of ``hessian``, checked."""
    if not isinstance(hessian, np.ndarray):
        raise NpquantError(
            f"hessian must be a numpy array ({in_features}, {in_features}), got {type(hessian).__name__}"
        )
    if hessian.dtype.kind != "f" and dtype_name(hessian) != "bfloat16":
        raise NpquantError(f"hessian must be floating, got dtype {dtype_name(hessian)}")
    if hessian.shape != (in_features, in_features):
        raise NpquantError(
            f"hessian must be ({in_features}, {in_features}) for w with in_features={in_features}, got {hessian.shape}"
        )
    h = hessian.astype(np.float64)
    if not np.isfinite(h).all():
        raise NpquantError("hessian holds NaN or Inf")
    diag = np.diag(h)
    if (diag < 0).any():
        i = int(np.argmax(diag < 0))
        raise NpquantError(f"hessian[{i}, {i}] = {diag[i]:.3g} is negative: X.T @ X has a non-negative diagonal")
    scale = max(float(np.abs(h).max()), 1e-300)
    if float(np.abs(h - h.T).max()) > 1e-6 * scale:
        raise NpquantError("hessian is not symmetric: pass X.T @ X of the layer's inputs")
    return h


def _inverse_cholesky(h: np.ndarray, diag: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U.T @ U = (H')^-1``, ``H'`` = ``h`` with dead inputs fixed and damping added.

    With ``P`` the reversal permutation and ``P H' P = L L.T``,
    ``(H')^-1 = (P L^-1 P).T (P L^-1 P)`` and ``P L^-1 P`` is upper
    triangular: one Cholesky factorisation and one triangular inverse
    (about ``I**3 / 3`` multiply-adds each) instead of an inverse and a
    second factorisation.
    """
    h = h.copy()
    dead = diag == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.diag(h).mean())
    try:
        lower = np.linalg.cholesky(h[::-1, ::-1])  # P H' P = L L^T
    except np.linalg.LinAlgError:
        raise NpquantError(
            f"hessian is not positive definite even with damp={damp}: it must be X.T @ X of real inputs; "
            f"a larger damp (e.g. 0.1) regularises a nearly singular one"
        ) from None
    return np.ascontiguousarray(_lower_inverse(lower)[::-1, ::-1])


def _lower_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular ``a (n, n)``, by halves: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``."""
    n = a.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(a))
    k = n // 2
    out = np.zeros_like(a)
    a_inv = _lower_inverse(a[:k, :k])
    c_inv = _lower_inverse(a[k:, k:])
    out[:k, :k] = a_inv
    out[k:, k:] = c_inv
    out[k:, :k] = -(c_inv @ (a[k:, :k] @ a_inv))
    return out
