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

**Memory.** ``H`` is factorised in one float64 ``(I, I)`` array, in place
(:mod:`._linalg`): a copy of ``hessian``, or ``hessian`` itself with
``overwrite_hessian=True``. The weight is updated a block of output rows at
a time (rows are independent in GPTQ: each is rounded against the same
``U``), at most :data:`ROW_CHUNK_BYTES` of float64 twice (the block and its
original). With ``O`` outputs and ``I`` inputs the peak is about
``8 I**2`` (``+ 8 I**2`` for the copy) ``+ 4 O I`` (a float32 weight, if
``w`` is not one) ``+ 2 O I`` (int16 codes) ``+ 2 ROW_CHUNK_BYTES`` bytes,
plus the packed result.

**The loss without H.** GPTQ's updates make ``W - Q = E U`` row by row
(``E`` the scaled errors ``(w_j - q_j) / U[j, j]``), so with
``H' = U^-1 U^-T`` (``H`` damped, dead inputs fixed) the output error is
``tr((W - Q) H' (W - Q).T) = ||E||**2``, and ``tr((W - Q) H (W - Q).T) =
||E||**2 - lam ||W - Q||**2 - ||(W - Q)[:, dead]||**2`` with ``lam`` the
damping added: :func:`gptq_with_loss` gives it even where ``hessian`` was
overwritten.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_finite_rows, check_weight, dtype_name
from ..errors import NpquantError
from ..quantize import OBSERVERS, QuantizedTensor, _quantize
from ..schemes import Scheme, get_scheme
from ._linalg import cholesky_lower, invert_lower, permute_symmetric, reverse_both_axes

__all__ = ["gptq", "gptq_with_loss", "ROW_CHUNK_BYTES"]

#: float64 bytes of the weight updated at once (a block of its output rows).
ROW_CHUNK_BYTES = 32 << 20


def gptq(w, hessian, scheme: Scheme | str, *, act_order: bool = True, block_size: int = 128, damp: float = 0.01,
         observer: str = "minmax", overwrite_hessian: bool = False) -> QuantizedTensor:
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
    overwrite_hessian : bool
        Use ``hessian`` as the workspace (it is destroyed) where it is a
        writeable C-contiguous float64 array, instead of a copy: the caller's
        last use of a large Hessian. Otherwise ``hessian`` is never modified.

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
    return gptq_with_loss(w, hessian, scheme, act_order=act_order, block_size=block_size, damp=damp,
                          observer=observer, overwrite_hessian=overwrite_hessian)[0]


def gptq_with_loss(w, hessian, scheme: Scheme | str, *, act_order: bool = True, block_size: int = 128,
                   damp: float = 0.01, observer: str = "minmax",
                   overwrite_hessian: bool = False) -> tuple[QuantizedTensor, float]:
    """:func:`gptq`, and its output error ``tr((W - Q) H (W - Q).T)`` at ``hessian``'s scale.

    The loss is worked out from GPTQ's own errors (module docstring), so it
    is there when ``overwrite_hessian`` consumed ``hessian``; it equals
    :func:`~npquant.calibrate.hessian_loss` up to float64 rounding.
    """
    scheme = get_scheme(scheme)
    if scheme.is_float:
        raise NpquantError(
            f"gptq takes int schemes; {scheme.dtype} codes are rounded to nearest by npquant.quantize "
            f"(GPTQ's error feedback is defined here for integer grids)"
        )
    check_weight(w, "w")
    out_features, in_features = w.shape
    _check_hessian(hessian, in_features)
    if not isinstance(act_order, (bool, np.bool_)):
        raise NpquantError(f"act_order must be True or False, got {act_order!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise NpquantError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not np.isfinite(damp) or damp < 0:
        raise NpquantError(f"damp must be a finite float >= 0, got {damp!r}")
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {OBSERVERS}")

    w32 = np.asarray(w).astype(np.float32, copy=False)  # (O, I), never written
    check_finite_rows(w32, 0, "w")
    diag = np.diag(hessian).astype(np.float64)  # (I,), a copy
    # Static scales: the engine's, from the original weight (with the Hessian's diagonal as importance for mse).
    importance = (diag / diag.max()).astype(np.float32) if observer == "mse" and diag.max() > 0 else None
    # A float16/bfloat16 weight gets its own dtype's scales, as npquant.quantize (and a checkpoint) gives it.
    source = w if dtype_name(w) in ("float16", "bfloat16") else w32
    ref, _ = _quantize(source, scheme, "w", measure=False, backend="numpy", observer=observer, importance=importance)
    bo, bi = ref.block_shape
    scale32 = ref.scale.astype(np.float32)  # (O / bo, I / bi)
    zp32 = None if ref.zero_point is None else ref.zero_point.astype(np.float32)
    ref_scale, ref_zero_point = ref.scale, ref.zero_point
    del ref

    order = np.argsort(-diag, kind="stable") if act_order else np.arange(in_features)  # (I,)
    u, lam = _inverse_cholesky(hessian, diag, order, damp, overwrite_hessian)  # (I, I) upper, in rounding order
    dead = diag[order] == 0  # (I,) in rounding order

    q_out = np.empty((out_features, in_features), np.int16)
    err_sq = dw_sq = dead_sq = 0.0
    rows = max(1, ROW_CHUNK_BYTES // (8 * in_features))
    for r0 in range(0, out_features, rows):  # rows are independent: each is rounded against the same U
        r1 = min(out_features, r0 + rows)
        row_block = np.arange(r0, r1) // bo  # (Oc,)
        orig = w32[r0:r1].T[order].astype(np.float64)  # (I, Oc): column j of W is row j here, contiguous
        wt = orig.copy()
        q = np.empty((in_features, r1 - r0), np.int16)  # integer codes, rounding order
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            errors = np.empty((i2 - i1, r1 - r0), np.float64)  # (b, Oc)
            for j in range(i1, i2):
                col = order[j]
                s = scale32[row_block, col // bi]  # (Oc,)
                z = None if zp32 is None else zp32[row_block, col // bi]
                codes, deq = _round_column(wt[j], s, z, scheme)
                q[j] = codes
                err = (wt[j] - deq) / u[j, j]  # (Oc,)
                errors[j - i1] = err
                if j + 1 < i2:
                    wt[j + 1 : i2] -= u[j, j + 1 : i2, None] * err[None, :]  # (b', Oc)
                wt[j] = deq  # column j is final: W - Q below is orig - wt
            if i2 < in_features:
                wt[i2:] -= u[i1:i2, i2:].T @ errors  # (I - i2, b) @ (b, Oc)
            err_sq += float(np.einsum("bo,bo->", errors, errors))
        orig -= wt  # (I, Oc): W - Q, transposed
        col_sq = np.einsum("io,io->i", orig, orig)  # (I,)
        dw_sq += float(col_sq.sum())
        dead_sq += float(col_sq[dead].sum())
        q_out[r0:r1, order] = q.T
        del orig, wt, q
    del u
    loss = max(0.0, err_sq - lam * dw_sq - dead_sq)
    return QuantizedTensor.from_int_codes(q_out, ref_scale, ref_zero_point, scheme), loss


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


def _check_hessian(hessian, in_features: int) -> None:
    """Refuse a ``hessian`` that is not a finite symmetric ``(I, I)`` float array with a non-negative diagonal.

    Read a block of rows at a time (no whole-matrix temporaries).
    """
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
    n = in_features
    rows = max(1, (1 << 20) // n)
    biggest = 0.0
    for r0 in range(0, n, rows):
        block = hessian[r0:r0 + rows].astype(np.float64)  # (rows, n)
        if not np.isfinite(block).all():
            raise NpquantError("hessian holds NaN or Inf")
        biggest = max(biggest, float(np.abs(block).max()))
    diag = np.diag(hessian).astype(np.float64)
    if (diag < 0).any():
        i = int(np.argmax(diag < 0))
        raise NpquantError(f"hessian[{i}, {i}] = {diag[i]:.3g} is negative: X.T @ X has a non-negative diagonal")
    scale = max(biggest, 1e-300)
    for r0 in range(0, n, rows):
        block = hessian[r0:r0 + rows].astype(np.float64)  # (rows, n)
        if float(np.abs(block - hessian[:, r0:r0 + rows].T).max()) > 1e-6 * scale:
            raise NpquantError("hessian is not symmetric: pass X.T @ X of the layer's inputs")


def _inverse_cholesky(hessian: np.ndarray, diag: np.ndarray, order: np.ndarray, damp: float,
                      overwrite: bool) -> tuple[np.ndarray, float]:
    """Upper ``U`` with ``U.T @ U = (H')^-1`` in rounding ``order``, and the damping added, ``lam``.

    ``H'`` is ``hessian`` with dead inputs fixed and ``lam = damp * mean(diag)``
    added to the diagonal. With ``P`` the reversal permutation and
    ``P H' P = L L.T``, ``(H')^-1 = (P L^-1 P).T (P L^-1 P)`` and
    ``P L^-1 P`` is upper triangular: one Cholesky factorisation and one
    triangular inverse (about ``I**3 / 3`` multiply-adds each), all in one
    array (``hessian`` itself when ``overwrite`` allows it).
    """
    usable = (overwrite and hessian.dtype == np.float64 and hessian.flags.c_contiguous
              and hessian.flags.writeable)
    h = hessian if usable else np.array(hessian, dtype=np.float64, order="C")  # (I, I), the one workspace
    reverse = order[::-1]
    permute_symmetric(h, reverse)  # h = P H[order][:, order] P
    dead = diag[reverse] == 0
    if dead.any():
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1.0
    idx = np.diag_indices_from(h)
    lam = damp * float(h[idx].mean())
    h[idx] += lam
    try:
        cholesky_lower(h)  # P H' P = L L^T
    except np.linalg.LinAlgError:
        raise NpquantError(
            f"hessian is not positive definite even with damp={damp}: it must be X.T @ X of real inputs; "
            f"a larger damp (e.g. 0.1) regularises a nearly singular one"
        ) from None
    invert_lower(h)  # L^-1
    reverse_both_axes(h)  # P L^-1 P, upper
    return h, lam
