"""The fused quantizer: symmetric int codes and scales of float32 rows in one pass.

The numba twin of the engine's symmetric int path (:mod:`npquant.quantize`
imports it for ``backend="numba"``, and only then: it imports numba). Beside
the engine, not in :mod:`npquant.kernels`, whose package imports the engine.
"""

import numpy as np
from numba import njit

from ._numba_cache import install as _install_cache_keys

_install_cache_keys()  # before the kernels below are defined (see npquant._numba_cache)

# --- quantization -----------------------------------------------------------------
# Exact IEEE division and rounding: fastmath only for the reductions ("reassoc"
# to vectorise the sums, "nnan"/"nsz" to vectorise the max; callers have
# refused NaN and Inf already). No "arcp" (reciprocals) and no "contract".
_QUANT_FASTMATH = {"reassoc", "nnan", "nsz"}


@njit(nogil=True, cache=True, fastmath=_QUANT_FASTMATH)
def quantize_sym_rows(chunk, bi, qmin, qmax, divisor, zero_scale, offset, codes, scale, sums):
    """Symmetric int codes of float32 rows ``chunk (R, I)``, blocks of ``bi`` columns.

    The numpy engine's rule bit for bit: ``s = absmax / divisor`` (float32;
    ``divisor`` is ``Scheme.scale_divisor``: ``2**(b-1) - 0.5`` on the full
    grid, ``qmax`` on the restricted one), ``q = clip(rint(w / s), qmin,
    qmax)``; a block with ``s == 0`` gets codes 0 and the scale
    ``zero_scale`` (the full grid's float32 epsilon, or 0). Writes
    ``codes (R, I)`` as ``q + offset`` (int8 with offset 0, or uint8 stored
    values), ``scale (R, I // bi)``, and adds the squared error of
    ``q * s`` and the squared weights (float32 squares, float64 sums) to
    ``sums[0]`` and ``sums[1]``.
    Serial and GIL-free: tensors run in parallel threads.
    """
    rows, in_features = chunk.shape
    lo = np.float32(qmin)
    hi = np.float32(qmax)
    dv = np.float32(divisor)
    err = 0.0
    ref = 0.0
    for r in range(rows):
        for g in range(in_features // bi):
            seg = chunk[r, g * bi : (g + 1) * bi]
            out = codes[r, g * bi : (g + 1) * bi]
            m = np.float32(0.0)
            for k in range(bi):
                a = abs(seg[k])
                m = a if a > m else m
            s = m / dv
            e = 0.0  # float64 sums of float32 squares, as the numpy engine
            w2 = 0.0
            if s == 0:
                # |w| / zero_scale rounds to 0 whenever absmax / divisor underflows: codes 0.
                scale[r, g] = zero_scale
                for k in range(bi):
                    out[k] = offset
                    w2 += seg[k] * seg[k]
                e = w2
            else:
                scale[r, g] = s
                for k in range(bi):
                    v = min(max(np.rint(seg[k] / s), lo), hi)
                    out[k] = v + offset
                    d = seg[k] - v * s
                    e += d * d
                    w2 += seg[k] * seg[k]
            err += e
            ref += w2
    sums[0] += err
    sums[1] += ref
