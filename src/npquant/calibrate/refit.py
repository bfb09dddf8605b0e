"""Scales refitted to fixed codes: the least output error a layer's codes allow.

GPTQ chooses codes against scales fixed beforehand (its static scales are
the engine's, from the original weight). Once the codes are chosen, the
output error ``tr((W - Q) H (W - Q).T)`` is a quadratic function of the
scales: row ``r`` of ``Q`` is ``A_r s`` where ``s`` holds the row block's
scales ``(G,)`` and column ``g`` of ``A_r (I, G)`` is row ``r``'s codes on
block ``g``'s columns (zero elsewhere). So the scales that minimise the
error for the chosen codes solve, for each block of rows ``R``, the ``G x G``
normal equations

    sum_{r in R} A_r.T H A_r  s  =  sum_{r in R} A_r.T H w_r

:func:`refit_scales` solves them in float64 and keeps a block's old scale
where the new one would not be a positive finite number of the scale dtype
(codes all zero, a singular system). The old scales are one solution the
system was free to choose, so in exact arithmetic the error never grows; a
test checks it after the rounding to the scale dtype. The codes do not
change, so the result packs, writes and runs like any other
QuantizedTensor. Symmetric int schemes only: with a zero point the error is
a function of ``s`` and ``s * z`` together, with ``z`` an integer.

The cost: one ``(O, I) @ (I, I)`` product for ``W H`` and one per block of
columns for ``A.T H A`` (``G`` products of ``(O, I/G) @ (I/G, I)``), about
``2 O I**2`` multiply-adds in all, as much as GPTQ's own update.
"""

from __future__ import annotations

import numpy as np

from .._checks import check_weight
from ..errors import NpquantError
from ..tensor import QuantizedTensor

__all__ = ["refit_scales"]


def refit_scales(qt: QuantizedTensor, w, hessian) -> QuantizedTensor:
    """``qt`` with each block's scale re-solved for the least ``tr((W - Q) H (W - Q).T)`` given its codes.

    Parameters
    ----------
    qt : QuantizedTensor (O, I), a symmetric int scheme (any bits, granularity) in plain column order
    w : float16, bfloat16, float32 or float64 (O, I)
        The weight ``qt`` approximates (what GPTQ quantized).
    hessian : float (I, I)
        The inputs' second moment, as for :func:`~npquant.calibrate.gptq`.

    Returns
    -------
    QuantizedTensor
        The same codes (the same ``codes`` array) with new scales in the
        scheme's scale dtype.

    Examples
    --------
    >>> import npquant
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((256, 64))
    >>> w = rng.standard_normal((8, 64)).astype(np.float32)
    >>> qt = npquant.quantize(w, "w4-g32")
    >>> new = refit_scales(qt, w, x.T @ x)
    >>> new.scale.shape, new.scale.dtype.name
    ((8, 2), 'float32')
    """
    if not isinstance(qt, QuantizedTensor):
        raise NpquantError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    scheme = qt.scheme
    if scheme.is_float or not scheme.symmetric or scheme.global_scale or scheme.scale_dtype == "e8m0":
        raise NpquantError(f"refit_scales takes symmetric int schemes with float scales, got {scheme}")
    if qt.perm is not None:
        raise NpquantError("refit_scales takes a QuantizedTensor in plain column order (perm is None)")
    check_weight(w, "w")
    if tuple(w.shape) != qt.shape:
        raise NpquantError(f"w must be {qt.shape} like qt, got {tuple(w.shape)}")
    out_features, in_features = qt.shape
    if not isinstance(hessian, np.ndarray) or hessian.shape != (in_features, in_features):
        got = getattr(hessian, "shape", type(hessian).__name__)
        raise NpquantError(f"hessian must be a numpy array ({in_features}, {in_features}), got {got}")
    h = np.asarray(hessian, dtype=np.float64)  # (I, I)
    if not np.isfinite(h).all():
        raise NpquantError("hessian holds NaN or Inf")
    w64 = np.asarray(w).astype(np.float64)  # (O, I)
    if not np.isfinite(w64).all():
        raise NpquantError("w holds NaN or Inf")

    bo, bi = qt.block_shape
    n_row_blocks, n_groups = qt.scale.shape  # (O / bo, G)
    q = qt.int_codes().astype(np.float64)  # (O, I)
    padded = n_groups * bi  # columns padded to whole blocks, so each block is one slice of a reshape
    if padded != in_features:
        q = np.pad(q, ((0, 0), (0, padded - in_features)))
        w64 = np.pad(w64, ((0, 0), (0, padded - in_features)))
        h = np.pad(h, ((0, padded - in_features), (0, padded - in_features)))
    # v[r, g] = sum over block g's columns of q[r, i] (H w_r)[i]
    v = (q * (w64 @ h)).reshape(out_features, n_groups, bi).sum(axis=2)  # (O, G)
    # m[r, g, k] = q_r[g cols] . H[g cols, k cols] q_r[k cols]
    m = np.empty((out_features, n_groups, n_groups))
    for k in range(n_groups):
        cols = slice(k * bi, (k + 1) * bi)
        hq_k = q[:, cols] @ h[cols, :]  # (O, I): sum over block k's columns of q[r, j] H[j, i]
        m[:, :, k] = (q * hq_k).reshape(out_features, n_groups, bi).sum(axis=2)
    # Sum the equations over each block of rows.
    if out_features % bo == 0:
        mb = m.reshape(n_row_blocks, bo, n_groups, n_groups).sum(axis=1)  # (O / bo, G, G)
        vb = v.reshape(n_row_blocks, bo, n_groups).sum(axis=1)  # (O / bo, G)
    else:
        row_block = np.arange(out_features) // bo  # (O,)
        mb = np.zeros((n_row_blocks, n_groups, n_groups))
        vb = np.zeros((n_row_blocks, n_groups))
        np.add.at(mb, row_block, m)
        np.add.at(vb, row_block, v)

    old = qt.scale.astype(np.float64)  # (O / bo, G)
    # A group whose codes are all zero contributes nothing: pin its scale to the old one.
    idle = np.einsum("bgg->bg", mb) <= 0  # (O / bo, G)
    eye = np.eye(n_groups)
    mb = np.where(idle[:, :, None] | idle[:, None, :], 0.0, mb) + idle[:, :, None] * eye[None]
    vb = np.where(idle, old, vb)
    new = old.copy()
    for b in range(n_row_blocks):
        try:
            s = np.linalg.solve(mb[b], vb[b])  # (G,)
        except np.linalg.LinAlgError:
            continue
        if np.isfinite(s).all() and (s > 0).all():
            new[b] = s
    new_scale = new.astype(qt.scale.dtype)
    bad = ~(np.isfinite(new_scale.astype(np.float64)) & (new_scale.astype(np.float64) > 0))
    if bad.any():  # overflow or underflow in the scale dtype: keep those blocks' old scales
        new_scale[bad] = qt.scale[bad]
    return QuantizedTensor(qt.codes, new_scale, None, qt.shape, scheme)
