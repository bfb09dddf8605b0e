"""The apply path: ``y = x @ dequantize(qt).T (+ bias)`` without the float32 weight.

Backends, chosen by argument (never by a global):

- ``"numpy"``: the reference. Dequantizes ``qt`` in tiles of rows (about 4 MiB
  of float32 each) and multiplies each tile with BLAS, so the full float32
  weight never exists.
- ``"numba"``: fused kernels (optional extra ``npquant[fast]``) that read the
  codes directly; see :mod:`npquant.kernels`.
- ``"auto"``: ``"numba"`` when numba is installed, else ``"numpy"``.

Schemes with activations (``w8a8-int8``, ``w8a8-fp8``: ``qt.scheme.activations``)
quantize ``x`` per token inside the call (W8A8). ``"numpy"`` runs the exact
reference (:mod:`npquant.linear_w8a8_apply`); ``"numba"`` the integer GEMM for
int8 (VNNI, AVX2 or portable, :mod:`npquant.kernels._w8a8`), on the layout
:func:`npquant.prepare` makes, or, for a tensor not prepared, on that layout
made at its first call and kept while the tensor lives; its float32 outputs
are bit-equal to the reference's. fp8 has no kernel: both backends run the
reference. ``x`` is converted to float32 first either way.

>>> import numpy as np
>>> from npquant import quantize
>>> w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
>>> x = np.ones((5, 64), np.float32)
>>> linear(x, quantize(w, "w8-channel"), backend="numpy").shape
(5, 32)
"""

from __future__ import annotations

import functools

import numpy as np

from ._backends import available_backends, resolve_backend
from ._checks import dtype_name
from .errors import NpquantError
from .linear_numpy import numpy_linear
from .linear_w8a8_apply import w8a8_reference
from .prepared import PreparedTensor, PreparedW8A8
from .tensor import QuantizedTensor

__all__ = ["linear", "available_backends"]

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FLOAT32 = np.dtype(np.float32)
_TENSORS = (QuantizedTensor, PreparedTensor, PreparedW8A8)


def linear(x, qt: QuantizedTensor | PreparedTensor, bias=None, backend: str = "auto") -> np.ndarray:
    """Quantized linear layer ``x @ W.T + bias`` with ``W = qt.dequantize()``.

    Parameters
    ----------
    x : float16, bfloat16, float32 or float64 (I,) or (..., I)
        Activations; computed in float32.
    qt : QuantizedTensor, PreparedTensor or PreparedW8A8 (see :func:`npquant.prepare`) of shape (O, I); a W8A8
        scheme (``qt.scheme.activations``) quantizes ``x`` per token (see the module docstring)
    bias : float (O,) or None
    backend : {"auto", "numpy", "numba"}

    Returns
    -------
    float32 (O,) or (..., O)
    """
    if not isinstance(qt, _TENSORS):
        raise NpquantError(
            f"qt must be a QuantizedTensor (see npquant.quantize) or PreparedTensor (npquant.prepare), "
            f"got {type(qt).__name__}"
        )
    out_features, in_features = qt.shape
    # float32 by identity first: a model's calls meet this code out of cache, where a dtype's name costs ~10 us.
    if not isinstance(x, np.ndarray) or (x.dtype is not _FLOAT32 and dtype_name(x) not in _FLOAT_DTYPES):
        got = dtype_name(x) if isinstance(x, np.ndarray) else type(x).__name__
        raise NpquantError(f"x must be a floating numpy array ({', '.join(_FLOAT_DTYPES)}), got {got}")
    ndim = x.ndim
    if ndim == 0 or x.shape[-1] != in_features:
        raise NpquantError(
            f"x shape {x.shape} does not fit the weight shape {qt.shape}: "
            f"x's last dimension must be in_features={in_features}"
        )
    if bias is not None:
        if not isinstance(bias, np.ndarray) or dtype_name(bias) not in _FLOAT_DTYPES:
            raise NpquantError("bias must be a floating numpy array (O,) or None")
        if bias.shape != (out_features,):
            raise NpquantError(f"bias must have shape ({out_features},) for weight {qt.shape}, got {bias.shape}")
    backend = resolve_backend(backend)

    x2 = x if ndim == 2 else x.reshape(-1, in_features)  # (M, I)
    if isinstance(qt, QuantizedTensor) and qt.perm is not None:  # act-order groups: the stored weight is W[:, perm]
        x2 = x2[:, qt.perm]
        qt = qt.in_stored_order()
    b32 = None if bias is None else bias if bias.dtype is _FLOAT32 else bias.astype(np.float32)
    if backend == "numba":  # converts x2 to float32 itself; numpy's tiles where no kernel reads qt; adds the bias
        y = _kernels().numba_linear(x2, qt, bias=b32)
    else:
        if qt.scheme.activations is not None:  # W8A8: x quantized per token, the exact reference
            y = w8a8_reference(x2.astype(np.float32, copy=False), qt)
        else:
            y = numpy_linear(x2.astype(np.float32, copy=False), qt)
        if b32 is not None:
            y += b32
    return y if ndim == 2 else y.reshape(*x.shape[:-1], out_features)


@functools.cache
def _kernels():
    """:mod:`npquant.kernels`, imported at the first numba call (it imports numba). A cached call: an import
    statement runs Python code of importlib at each call, which a model's calls meet out of cache."""
    from . import kernels

    return kernels
