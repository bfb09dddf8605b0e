"""Sequential AWQ for a decoder: each group's scale searched on the outputs of the quantized layers before it.

Decoder layer after decoder layer, group after group in forward order
(q/k/v; o; gate/up; down: :data:`~npquant.models.awq_lm.DECODER_GROUPS`),
the layer runs on every calibration window with everything before already
scaled and quantized until the group has seen its input; ``mean |x|`` and
``X.T X`` of that input choose the group's AWQ scale
(:func:`~npquant.calibrate.awq.search_scale`; o_proj's statistics tied across
the query heads that share a value head, :func:`~npquant.models.awq_lm.tie_heads`);
``1 / s`` is folded into the producer (:func:`~npquant.models.awq_lm.fold_scale`)
and ``W * s`` is quantized: rounded to nearest (``"awq"``) or by GPTQ with
the Hessian of the scaled inputs (``"awq+gptq"``). With ``"awq+gptq"`` each
point of the grid is scored by the group's error after GPTQ (under the
objective GPTQ runs with), not after rounding to nearest: ``a = 0`` is then
GPTQ alone, and a scale is taken only where it beats it on the calibration
inputs (:func:`~npquant.calibrate.awq.loss_after_gptq`).

The producers of o and down (v_proj, up_proj) are quantized before their
consumer's input can be seen: once its scale is chosen, the producer is
quantized again from its folded float weight (row scaling commutes with
per-row-block rounding up to float rounding), and for GPTQ the consumer's
input is gathered again from the folded model.

A group whose weights have different schemes, or some of which stay float,
is quantized without a scale (its row says ``alpha`` None).

**Memory.** Beside what :func:`~npquant.models.calibrated_lm.gptq_decoder`
holds, the folded float weights of the layer being calibrated are kept (the
group's and the producers'), and every folded norm weight and bias of the
model (small).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial

import numpy as np

from ..calibrate import gptq, hessian_loss
from ..calibrate.awq import (
    DEFAULT_GRID,
    InputStats,
    loss_after_gptq,
    scale_hessian,
    search_scale,
)
from ..calibrate.refit import refit_scales
from ..calibrate.target import model_loss, model_target
from ..errors import NpquantError
from ..metrics import weight_error
from ..quantize import quantize
from ..schemes import Scheme, get_scheme
from .awq_lm import DECODER_GROUPS, fold_scale, tie_heads
from .calibrated_lm import _float_inputs, _moments, default_objective
from .causal_lm import CausalLM
from .causal_lm_config import CausalLMConfig

__all__ = ["AWQ_METHODS", "awq_decoder"]

#: The methods :func:`awq_decoder` runs.
AWQ_METHODS = ("awq", "awq+gptq")


def awq_decoder(config, weights, schemes, windows, *, method: str = "awq", observer: str = "minmax",
                grid: int = DEFAULT_GRID, damp: float = 0.01, objective: str | None = None, progress=None):
    """A decoder's linear layers quantized with AWQ's scales (then RTN or GPTQ), sequentially.

    Parameters
    ----------
    config : dict (``config.json``) or CausalLMConfig
    weights : mapping (or callable) of the float model's tensors, as :class:`CausalLM` reads them
    schemes : Scheme or preset name (every decoder-layer linear), or ``{weight name: Scheme}``
    windows : list of int ``(B, T)`` token arrays (:func:`~npquant.models.calibrated_lm.calibration_windows`)
    method : {"awq", "awq+gptq"}
    observer : {"minmax", "mse"}; grid : AWQ's points of ``a``; damp : GPTQ's
    objective : {"layer", "model"} or None (the model's default,
        :func:`~npquant.models.calibrated_lm.default_objective`): what GPTQ reproduces with ``"awq+gptq"``; with
        ``"model"`` the float model runs beside and GPTQ rounds
        :func:`~npquant.calibrate.target.model_target`'s ``W*`` of the scaled weight, scales refitted (as
        :mod:`npquant.models.calibrated_lm`); ``"awq"`` rounds to nearest either way
    progress : ``progress(name, done, total)`` after each weight, or None

    Returns
    -------
    quantized : dict, weight name -> QuantizedTensor
    replaced : dict, name -> float32 array: the tensors AWQ's folds changed that stay float (norm weights,
        v_proj/up_proj biases, weights a mapping leaves float); a checkpoint writes them instead of the input's
    rows : list of dict per quantized int weight: ``name``, ``shape``, ``scheme``, ``tokens``, ``method``,
        ``rtn_loss``, ``loss`` (relative to ``ref``, ``tr(W H W.T)``), ``ratio``, ``alpha`` (None: unscaled),
        ``seconds``; folded weights also ``weight_error``, :func:`~npquant.metrics.weight_error` against the
        folded float weight the codes stand for. AWQ minimises the loss of a group (q/k/v; gate/up) as a whole:
        one weight's may exceed RTN's
    left : dict, weight name -> why it stays float (a group size that does not divide its ``in_features``); a
        group with a float weight is quantized without a scale
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    if method not in AWQ_METHODS:
        raise NpquantError(f"method={method!r} is not known; expected one of {AWQ_METHODS}")
    names = cfg.linear_names()
    if isinstance(schemes, (Scheme, str)):
        schemes = dict.fromkeys(names, get_scheme(schemes))
    else:
        schemes = {n: get_scheme(s) for n, s in schemes.items()}
        unknown = [n for n in schemes if n not in names]
        if unknown:
            raise NpquantError(f"schemes names {unknown[0]!r}, which is not a decoder-layer linear weight (e.g. "
                               f"{names[0]!r})")
    if not schemes:
        raise NpquantError("schemes is empty: name at least one decoder-layer linear weight")
    if objective is None:
        objective = default_objective(cfg)
    if objective not in ("layer", "model"):
        raise NpquantError(f"objective={objective!r} is not known; expected 'layer' or 'model'")
    shapes = cfg.tensor_shapes()
    left = {n: f"group_size={s.group_size} does not divide in_features={shapes[n][1]}" for n, s in schemes.items()
            if s.granularity == "group" and shapes[n][1] % s.group_size}
    schemes = {n: s for n, s in schemes.items() if n not in left}  # as gptq_decoder: those stay float
    windows = [np.asarray(w) for w in ([windows] if isinstance(windows, np.ndarray) else windows)]
    if not windows or any(w.ndim != 2 or w.size == 0 or w.dtype.kind not in "iu" for w in windows):
        raise NpquantError("windows must be a non-empty list of int token arrays (B, T)")
    floats: dict = {}  # folded float tensors, read before the source's
    read = weights.__getitem__ if isinstance(weights, Mapping) else weights

    def source(name):
        return floats[name] if name in floats else read(name)

    quantized: dict = {}
    model = CausalLM(cfg, source, quantized=quantized, backend="numpy")
    use_gptq = method == "awq+gptq"
    xs = [model.embed(ids) for ids in windows]
    to_model = use_gptq and objective == "model"
    reference = CausalLM(cfg, read, backend="numpy") if to_model else None  # the float model, unfolded
    xfs = list(xs) if to_model else None
    tokens = sum(ids.size for ids in windows)
    total = sum(n in schemes for n in names)
    rows: list[dict] = []
    done = 0

    quantize_layer = partial(_quantize_layer, use_gptq=use_gptq, observer=observer, damp=damp)

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        float_inputs = _float_inputs(reference, i, xfs) if to_model else None  # and xfs advanced
        hessians: dict = {}  # weight name -> the (scaled) Hessian it was quantized with
        moments_of: dict = {}  # weight name -> the (C, H~, H) it was quantized with (model objective)
        for group, (producer, how) in DECODER_GROUPS.items():
            wnames = [p + m + ".weight" for m in group]
            if not any(n in schemes for n in wnames):
                continue
            stats = _gather(model, i, xs, p + group[0])
            h = stats.hessian()
            moments = _moments(model, i, xs, float_inputs, p + group[0]) if to_model else None
            start = time.perf_counter()
            ws = [model._tensor(n) for n in wnames]  # float32, already folded by earlier groups where they were
            found = None
            if all(n in schemes for n in wnames) and len({schemes[n] for n in wnames}) == 1:
                m = stats.abs_mean()
                if group == ("self_attn.o_proj",):
                    m = tie_heads(m, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
                scheme0 = schemes[wnames[0]]
                loss = loss_after_gptq(quantize_layer, ws, h, moments, scheme0) \
                    if use_gptq and not scheme0.is_float else None
                found = search_scale(ws, m, h, scheme0, grid=grid, observer=observer, loss=loss)
            h_q, ws_q, moments_q = h, ws, moments
            if found is not None:
                view = {n: model._tensor(n) for n in _fold_inputs(p, group, producer, how, cfg)}
                floats.update(fold_scale(view, cfg, i, group, found.scale))
                ws_q = [floats[n] for n in wnames]
                h_q = scale_hessian(h, found.scale)
                moments_q = None
                prod = p + producer + ".weight"
                if how == "rows" and prod in quantized:  # the producer was quantized: again, from its folded rows
                    # (its float input is unchanged; its float target is the folded rows themselves)
                    quantized[prod] = quantize_layer(floats[prod], hessians[prod], schemes[prod],
                                                     moments_of.get(prod))
                    for row in rows:
                        if row["name"] == prod:
                            row["weight_error"] = weight_error(floats[prod], quantized[prod])
                    if use_gptq:
                        h_q = _gather(model, i, xs, p + group[0]).hessian()
                if to_model:  # the scaled inputs, against the float model's unscaled ones
                    moments_q = _moments(model, i, xs, float_inputs, p + group[0])
                    h_q = moments_q[1]
            for name, w, w_q in zip(wnames, ws, ws_q):
                if name not in schemes:
                    continue
                scheme = schemes[name]
                qt = quantize_layer(w, h_q, scheme, moments_q, anchor=w_q)
                quantized[name] = qt
                hessians[name] = h_q
                if moments is not None:
                    moments_of[name] = moments
                done += 1
                if not scheme.is_float:
                    if moments_q is not None:  # the float model's output at the layer (model objective)
                        h_f = moments[2]
                        ref = hessian_loss(w, np.zeros_like(w), h_f)
                        rtn = model_loss(w, quantize(w, scheme, observer=observer, backend="numpy").dequantize(),
                                         moments[0], moments[1], h_f) / ref
                        ours = model_loss(w, qt.dequantize(), moments_q[0], moments_q[1], h_f) / ref
                    else:
                        ref = hessian_loss(w, np.zeros_like(w), h)
                        rtn = hessian_loss(w, quantize(w, scheme, observer=observer, backend="numpy"), h) / ref
                        ours = hessian_loss(w_q, qt, h_q) / ref
                    rows.append({"name": name, "shape": tuple(w.shape), "scheme": scheme, "tokens": tokens,
                                 "method": method, "rtn_loss": rtn, "loss": ours, "ref": ref,
                                 "ratio": ours / rtn if rtn > 0 else 1.0,
                                 "alpha": None if found is None else found.alpha,
                                 "seconds": time.perf_counter() - start})
                    if found is not None:  # the checkpoint's error column: against the folded weight
                        rows[-1]["weight_error"] = weight_error(w_q, qt)
                if progress is not None:
                    progress(name, done, total)
        del float_inputs
        for b in range(len(xs)):  # the quantized layer's output feeds the next layer
            xs[b] = model.layer(i, xs[b])
        for name in [n for n in floats if n.startswith(p) and n in quantized]:
            del floats[name]  # the layer is done: its quantized weights are what runs
    replaced = {n: t for n, t in floats.items() if n not in quantized}
    return quantized, replaced, rows, left


def _quantize_layer(w, h, scheme, moments=None, anchor=None, *, use_gptq: bool, observer: str, damp: float):
    """``anchor`` (``w`` by default) quantized: by GPTQ with ``h`` where ``use_gptq`` (and ``scheme`` is int), else
    to nearest; ``moments`` ``(C, H~, H)`` make GPTQ round the model objective's target of the float ``w`` (whose
    input is the float model's), scales refitted."""
    anchor = w if anchor is None else anchor
    if not (use_gptq and not scheme.is_float):
        return quantize(anchor, scheme, observer=observer, backend="numpy")
    if moments is None:
        return gptq(anchor, h, scheme, observer=observer, damp=damp)
    target = model_target(w, moments[0], moments[1], anchor=anchor)
    qt = gptq(target, moments[1], scheme, observer=observer, damp=damp)
    return refit_scales(qt, target, moments[1]) if scheme.symmetric else qt


def _fold_inputs(p: str, group, producer: str, how: str, cfg: CausalLMConfig) -> list[str]:
    """The tensor names :func:`fold_scale` reads for ``group``: its weights, the producer's weight (and bias)."""
    out = [p + m + ".weight" for m in group] + [p + producer + ".weight"]
    if how == "rows":
        has_bias = cfg.qkv_bias if producer == "self_attn.v_proj" else cfg.mlp_bias
        if has_bias:
            out.append(p + producer + ".bias")
    return out


class _Stop(Exception):
    """Raised once the wanted linear has seen its input."""


def _gather(model: CausalLM, i: int, xs: list, module: str) -> InputStats:
    """``X.T X`` and ``sum |x|`` of ``module``'s input, layer ``i`` run on every batch of ``xs``."""
    stats = None

    def watch(name, x):
        nonlocal stats
        if name == module:
            if stats is None:
                stats = InputStats(x.shape[-1])
            stats.add(x)
            raise _Stop

    for x in xs:
        try:
            model.layer(i, x, observe=watch)
        except _Stop:
            pass
    return stats
