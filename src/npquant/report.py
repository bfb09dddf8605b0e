"""Rows that compare schemes on one weight: what is saved and what is lost.

Nothing here prints; the CLI renders the rows.

>>> w = demo_matrix(64, 128, seed=0)
>>> rows = compare_schemes(w, ["w8-channel"], seed=0)
>>> [r["scheme"] for r in rows], round(rows[1]["saving"], 3)
(['float32', 'w8-channel'], 3.879)
"""

from __future__ import annotations

import numpy as np

from .errors import NpquantError
from .metrics import max_abs_error, output_relative_error, relative_error, sqnr_db
from .quantize import quantize
from .schemes import get_scheme, schemes

__all__ = ["demo_matrix", "compare_schemes", "COLUMNS"]

#: Column key -> meaning, in reading order (the CLI's --help prints these).
COLUMNS = {
    "scheme": "preset name (float32 is the unquantized baseline)",
    "bits_per_weight": "storage bits per weight, scales and zero points included",
    "bytes": "exact bytes of codes + scales (+ zero points)",
    "saving": "float32 bytes / these bytes",
    "rel_error": "||W - W_hat||_F / ||W||_F, weight round-trip error",
    "sqnr_db": "20 log10(||W|| / ||W - W_hat||), higher is better",
    "max_abs_error": "max |W - W_hat| over all weights",
    "output_rel_error": "||xW^T - xW_hat^T||_F / ||xW^T||_F on a random batch x",
}


def demo_matrix(out_features: int = 512, in_features: int = 1024, seed: int = 0, outlier: float = 100.0):
    """float32 ``(O, I)``: Gaussian weights (std 0.02) whose row 0 is ``outlier`` times larger.

    One large-magnitude output channel is what makes per-tensor scales fail.
    """
    if out_features < 1 or in_features < 1:
        raise NpquantError(f"shape must be positive, got ({out_features}, {in_features})")
    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_normal((out_features, in_features))).astype(np.float32)
    w[0] *= np.float32(outlier)
    return w


def compare_schemes(w: np.ndarray, names=None, batch: int = 16, seed: int = 0) -> list[dict]:
    """One row per scheme (a float32 row first), with the keys of :data:`COLUMNS`.

    Parameters
    ----------
    w : float (O, I)
    names : list of preset names or Schemes; None means every preset
    batch : rows of the random activation batch ``x (batch, I)``
    seed : seed of ``x``
    """
    names = list(schemes()) if names is None else list(names)
    resolved = [(n if isinstance(n, str) else str(n), get_scheme(n)) for n in names]
    w32 = np.asarray(w).astype(np.float32)
    x = np.random.default_rng(seed + 1).standard_normal((batch, w32.shape[1])).astype(np.float32)
    rows = [
        {
            "scheme": "float32",
            "bits_per_weight": 32.0,
            "bytes": int(w32.nbytes),
            "saving": 1.0,
            "rel_error": 0.0,
            "sqnr_db": float("inf"),
            "max_abs_error": 0.0,
            "output_rel_error": 0.0,
        }
    ]
    for label, scheme in resolved:
        qt = quantize(w, scheme)
        w_hat = qt.dequantize()
        rows.append(
            {
                "scheme": label,
                "bits_per_weight": qt.bits_per_weight,
                "bytes": qt.nbytes,
                "saving": w32.nbytes / qt.nbytes,
                "rel_error": relative_error(w32, w_hat),
                "sqnr_db": sqnr_db(w32, w_hat),
                "max_abs_error": max_abs_error(w32, w_hat),
                "output_rel_error": output_relative_error(x, w32, w_hat),
            }
        )
    return rows
