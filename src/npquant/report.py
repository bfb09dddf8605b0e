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

__all__ = ["demo_matrix", "compare_schemes", "COLUMNS", "layer_report", "outlier_ratio", "totals", "LAYER_KEYS"]

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


#: Keys of each :func:`layer_report` row (the JSON and CSV columns), in order.
LAYER_KEYS = (
    "name",
    "shape",
    "scheme",
    "bits_per_weight",
    "bytes_before",
    "bytes_after",
    "rel_error",
    "sqnr_db",
    "outlier_ratio",
)


def outlier_ratio(w) -> float:
    """Largest row absmax over the median row absmax of ``w (O, I)``, read in row chunks.

    1 for evenly scaled rows; large when one output channel dwarfs the rest
    (what makes per-tensor scales fail). ``inf`` when the median row is zero.
    """
    from ._checks import rows_per_chunk

    out_features, in_features = w.shape
    step = rows_per_chunk(in_features)
    absmax = np.empty(out_features, np.float64)
    for r0 in range(0, out_features, step):
        absmax[r0 : r0 + step] = np.abs(np.asarray(w[r0 : r0 + step]).astype(np.float32)).max(axis=1)
    med = float(np.median(absmax))
    top = float(absmax.max())
    if med == 0.0:
        return 0.0 if top == 0.0 else float("inf")
    return top / med


def layer_report(model, names=None, include=None, exclude=None, progress=None) -> tuple[list[dict], list]:
    """Per layer and scheme: what quantizing saves and costs, for a safetensors model.

    Parameters
    ----------
    model : path of a .safetensors file or model directory
    names : preset names or Schemes (default: w8-channel, w4-g128, fp8-channel)
    include, exclude : regexes, as for :func:`npquant.checkpoints.select_layers`
    progress : called as ``progress(name, nbytes)`` after each layer

    Returns
    -------
    rows : list of dicts with the keys of :data:`LAYER_KEYS`, layer by layer,
        schemes in the order given
    skipped : list of ``(name, reason)`` for tensors left alone
    """
    from .checkpoints import select_layers
    from .quantize import quantize_measured
    from .safetensors_io import Checkpoint

    names = list(names or DEFAULT_REPORT_SCHEMES)
    schemes_ = [(n if isinstance(n, str) else str(n), get_scheme(n)) for n in names]
    rows, skipped = [], []
    with Checkpoint(model) as ckpt:
        choices = select_layers(ckpt, None, include, exclude)
        for c in choices:
            if not c.quantize:
                if c.reason != "not a .weight tensor":
                    skipped.append((c.name, c.reason))
                continue
            src = ckpt.tensors[c.name]
            ratio = outlier_ratio(src)
            for label, scheme in schemes_:
                if scheme.granularity == "group" and c.shape[1] % scheme.group_size:
                    skipped.append((c.name, f"{label}: group_size={scheme.group_size} does not divide in_features={c.shape[1]}"))
                    continue
                qt, rel, sqnr = quantize_measured(src, scheme, name=f"tensor {c.name!r}:")
                rows.append(
                    {
                        "name": c.name,
                        "shape": list(c.shape),
                        "scheme": label,
                        "bits_per_weight": qt.bits_per_weight,
                        "bytes_before": src.nbytes,
                        "bytes_after": qt.nbytes,
                        "rel_error": rel,
                        "sqnr_db": sqnr,
                        "outlier_ratio": ratio,
                    }
                )
            if progress is not None:
                progress(c.name, src.nbytes)
    return rows, skipped


def totals(rows: list[dict]) -> list[dict]:
    """One row per scheme: layers, bytes before and after, saving, and errors over all layers.

    ``rms_rel_error`` is the root mean square of the layers' relative errors
    weighted by their number of weights, ``sqrt(sum(rel_i**2 * n_i) / sum(n_i))``;
    ``worst_sqnr_db`` and ``worst_layer`` name the layer that loses most.
    """
    out = {}
    for r in rows:
        t = out.setdefault(r["scheme"], {"scheme": r["scheme"], "layers": 0, "bytes_before": 0, "bytes_after": 0,
                                         "_err": 0.0, "_n": 0, "worst_sqnr_db": float("inf"), "worst_layer": ""})
        n = r["shape"][0] * r["shape"][1]
        t["layers"] += 1
        t["bytes_before"] += r["bytes_before"]
        t["bytes_after"] += r["bytes_after"]
        t["_err"] += r["rel_error"] ** 2 * n
        t["_n"] += n
        if r["sqnr_db"] < t["worst_sqnr_db"]:
            t["worst_sqnr_db"], t["worst_layer"] = r["sqnr_db"], r["name"]
    result = []
    for t in out.values():
        t["saving"] = t["bytes_before"] / t["bytes_after"]
        t["rms_rel_error"] = (t.pop("_err") / t.pop("_n")) ** 0.5
        result.append(t)
    return result


DEFAULT_REPORT_SCHEMES = ("w8-channel", "w4-g128", "fp8-channel")
