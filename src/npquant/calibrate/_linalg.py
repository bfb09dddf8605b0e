"""GPTQ's linear algebra on one ``(n, n)`` float64 matrix, in place: its memory is the matrix and slices of it.

A Hessian of a layer with ``n`` inputs takes ``8 n**2`` bytes (1.64 GB for a
Llama-3-8B ``down_proj``, ``n = 14336``). numpy's ``cholesky`` and ``inv``
return new arrays, so factorising and inverting it with them holds three
or four such matrices at once. Here each step works in blocks of
:data:`BLOCK` columns, with temporaries of at most ``n x BLOCK`` float64
(29 MB at ``n = 14336``):

- :func:`permute_symmetric` puts rows and columns in a new order;
- :func:`cholesky_lower` overwrites the lower triangle with ``L``
  (``A = L L.T``, blocked left-looking: each block column is updated by the
  columns before it with one BLAS product, then its diagonal block is
  factorised and the block below it solved) and zeroes the upper one;
- :func:`invert_lower` overwrites ``L`` with ``L^-1`` (blocked, from the
  last block up: ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``);
- :func:`reverse_both_axes` turns a lower-triangular matrix into the upper
  one ``P M P`` (``P`` the reversal), reversing the flat array by halves.

The results equal numpy's whole-matrix ones up to float64 rounding (the
sums are taken in another order).

>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((600, 300))
>>> a = x.T @ x
>>> l = a.copy()
>>> cholesky_lower(l, block=64)
>>> bool(np.allclose(l @ l.T, a))
True
>>> invert_lower(l, block=64)
>>> bool(np.allclose(l @ np.linalg.cholesky(a), np.eye(300)))
True
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "permute_symmetric", "cholesky_lower", "invert_lower", "reverse_both_axes"]

#: Columns per block of the factorisation and the inverse.
BLOCK = 256
# Elements per temporary of the row permutation and the reversal (8 MiB of float64).
_CHUNK = 1 << 20


def permute_symmetric(a: np.ndarray, perm: np.ndarray) -> None:
    """``a[:] = a[perm][:, perm]`` in place, ``a`` a C-contiguous ``(n, n)`` array, ``perm`` int ``(n,)``.

    Columns are permuted a block of rows at a time (a temporary of those
    rows), then rows by following the permutation's cycles (one row held).
    """
    n = a.shape[0]
    rows = max(1, _CHUNK // max(n, 1))
    for r0 in range(0, n, rows):
        a[r0:r0 + rows] = a[r0:r0 + rows][:, perm]  # (rows, n)
    done = np.zeros(n, bool)
    for start in range(n):
        if done[start] or perm[start] == start:
            continue
        held = a[start].copy()  # (n,)
        i = start
        while True:
            done[i] = True
            j = perm[i]
            if j == start:
                a[i] = held
                break
            a[i] = a[j]
            i = j


def cholesky_lower(a: np.ndarray, block: int = BLOCK) -> None:
    """Overwrite symmetric positive definite float64 ``a (n, n)`` with its lower Cholesky factor ``L``.

    Reads the lower triangle only; the upper one is set to zero. Raises
    :class:`numpy.linalg.LinAlgError` where ``a`` is not positive definite.
    """
    n = a.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        if k0:
            a[k0:, k0:k1] -= a[k0:, :k0] @ a[k0:k1, :k0].T  # (n - k0, b): the columns before, applied at once
        diag = np.linalg.cholesky(a[k0:k1, k0:k1])  # (b, b) lower
        a[k0:k1, k0:k1] = diag
        if k1 < n:
            # L21 = A21 L11^-T: with L11^-1 a small triangular inverse, one BLAS product
            a[k1:, k0:k1] = a[k1:, k0:k1] @ np.tril(np.linalg.inv(diag)).T  # (n - k1, b)
            a[k0:k1, k1:] = 0.0


def invert_lower(a: np.ndarray, block: int = BLOCK) -> None:
    """Overwrite lower-triangular float64 ``a (n, n)`` (zero above the diagonal) with its inverse.

    From the last block column to the first: the trailing part already holds
    ``C^-1``, so the block column below the diagonal becomes ``-C^-1 B A^-1``.
    """
    n = a.shape[0]
    for k0 in reversed(range(0, n, block)):
        k1 = min(n, k0 + block)
        inv = np.tril(np.linalg.inv(a[k0:k1, k0:k1]))  # (b, b)
        if k1 < n:
            a[k1:, k0:k1] = (a[k1:, k1:] @ a[k1:, k0:k1]) @ -inv  # (n - k1, b)
        a[k0:k1, k0:k1] = inv


def reverse_both_axes(a: np.ndarray) -> None:
    """``a[:] = a[::-1, ::-1]`` in place for a C-contiguous ``a``: its flat array reversed, a chunk from each end."""
    flat = a.reshape(-1)  # a view: a is C-contiguous
    n = flat.size
    half = n // 2
    for s in range(0, half, _CHUNK):
        e = min(half, s + _CHUNK)
        held = flat[s:e].copy()
        flat[s:e] = flat[n - e:n - s][::-1]  # the two ranges never overlap: e <= half <= n - e
        flat[n - e:n - s] = held[::-1]
