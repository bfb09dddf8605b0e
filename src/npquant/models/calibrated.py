"""Sequential calibration of the sentence encoder: each layer quantized on the inputs it will really see.

The calibration texts run through the model once to the first block. Then,
block after block and, inside a block, in forward order (query/key/value
together, since they read the same input; then the attention output; the
feed-forward input; its output), the block runs on every calibration batch
with everything before already quantized, the inputs of the next layers are
gathered (``X.T X`` and ``mean |x|``, padding tokens left out), and those
layers are quantized. The block's quantized output is the next block's input.

Methods (``method=``):

- ``"gptq"``: :func:`~npquant.calibrate.gptq` on each layer's Hessian. fp8
  codes have no GPTQ (its error feedback is for integer grids): they are
  rounded to nearest, from the float target with ``objective="model"``
  (which still compensates the error of the layers before).
- ``"awq"``: AWQ's per-input-channel scales (:mod:`npquant.calibrate.awq`)
  where ``1 / s`` folds into the model, then round to nearest; elsewhere
  round to nearest.
- ``"awq+gptq"``: AWQ's scales, each point of its grid scored by the
  error after GPTQ (:func:`~npquant.calibrate.awq.loss_after_gptq`: ``a = 0``
  is GPTQ alone), then GPTQ on the scaled weights with the Hessian of the
  scaled inputs; elsewhere GPTQ.

**Where AWQ folds in a BERT encoder.** The model is post-LayerNorm: each
LayerNorm's output is both the next linears' input *and* the residual added
back before the next LayerNorm, so dividing it by ``s`` (folding into the
LayerNorm's weight and bias) changes the residual stream and the model, not
just the linears' input (:func:`~npquant.models.awq_bert.fold_scale` refuses
it; a test measures how much it changes). Query/key/value (the embeddings'
or previous block's output LayerNorm) and ``intermediate.dense``
(``attention.output.LayerNorm``) are therefore left unscaled, and so is
``output.dense``, whose input is GELU's output. ``attention.output.dense``
reads the attention context ``softmax(q k.T) v``, linear in ``v`` per
channel: its scale folds into the value projection's output rows and bias.
Value is quantized before the context can be observed, so once the scale is
chosen it is quantized again from its float weight divided by ``s`` (the
same method; row scaling commutes with symmetric per-row-block rounding up
to float rounding), and for GPTQ the context is gathered again from the
folded model before the attention output is quantized.

**The objective** (``objective=``) of the GPTQ methods:

- ``"model"`` (the default): each layer's target is the *float* model's
  output at that layer, ``X W.T`` with ``X`` the float model's inputs,
  reproduced from the inputs ``X~`` the quantized model gives it: GPTQ
  rounds :func:`~npquant.calibrate.target.model_target`'s ``W*`` against
  ``X~``'s Hessian, so the error the earlier layers made is compensated
  where it can be, and the scales are then refitted to the chosen codes
  (:func:`~npquant.calibrate.refit.refit_scales`; symmetric schemes). The
  float model runs beside the quantized one on the calibration batches.
- ``"layer"``: GPTQ as published (and as llm-compressor runs it): each
  layer reproduces its own float weight's output on ``X~``.

Each layer's row reports its loss for round to nearest and for the method:
with ``objective="layer"`` ``tr(dW H dW.T)`` relative to ``tr(W H W.T)``
(the mean squared output error on ``X~``); with ``"model"``
``||X W.T - X~ Q.T||**2`` relative to ``||X W.T||**2`` (round to nearest:
``Q`` the rounded ``W`` on the same ``X~``); AWQ's exponent ``a`` where it
scaled, and the seconds it took.
"""

from __future__ import annotations

import time

import numpy as np

from ..calibrate import calibration_texts, gptq, hessian_loss
from ..calibrate.awq import (
    DEFAULT_GRID,
    InputStats,
    loss_after_gptq,
    scale_hessian,
    search_scale,
)
from ..calibrate.refit import refit_scales
from ..calibrate.target import CrossMoment, model_loss, model_target
from ..errors import NpquantError
from ..metrics import weight_error
from ..quantize import quantize
from ..schemes import Scheme
from .awq_bert import SCALED_GROUPS, fold_scale

__all__ = ["CALIBRATED_METHODS", "CALIBRATION_BATCH", "OBJECTIVES", "calibrated_tensors", "changed_tensors",
           "gptq_tensors"]

#: Sentences per calibration forward pass.
CALIBRATION_BATCH = 32

#: The methods :func:`calibrated_tensors` runs.
CALIBRATED_METHODS = ("gptq", "awq", "awq+gptq")

#: What the GPTQ methods reproduce (module docstring); the first is the default.
OBJECTIVES = ("model", "layer")

# Linear layers of a block that share an input, in forward order.
_GROUPS = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


def gptq_tensors(encoder, schemes, texts=None, *, observer: str = "minmax", objective: str = "model", progress=None):
    """The encoder's tensors with its linear layers quantized by sequential GPTQ.

    Parameters
    ----------
    encoder : BertEncoder (float32), e.g. a SentenceEncoder: the model, taken as an argument
    schemes : Scheme, or ``{layer name: Scheme}`` (layers left out stay float32;
        fp8 layers are rounded to nearest, and have no row)
    texts : list of str or None (the built-in calibration set)
    observer : {"minmax", "mse"}
    objective : {"model", "layer"} (module docstring)
    progress : ``progress(module, done, total)`` after each layer, or None

    Returns
    -------
    tensors : dict, the encoder's tensors with QuantizedTensors for its linear weights
    rows : list of dict per layer: ``name``, ``shape``, ``rtn_loss``, ``gptq_loss``
        (both relative, as the module docstring says), ``ratio`` (GPTQ / RTN), ``seconds``
    """
    return calibrated_tensors(encoder, schemes, texts, method="gptq", observer=observer, objective=objective,
                              progress=progress)


def calibrated_tensors(encoder, schemes, texts=None, *, method: str = "gptq", observer: str = "minmax",
                       objective: str = "model", grid: int = DEFAULT_GRID, progress=None):
    """The encoder's tensors with its linear layers quantized by a calibrated method, block after block.

    Parameters
    ----------
    encoder : BertEncoder (float32), e.g. a SentenceEncoder: the model, taken as an argument
    schemes : Scheme, or ``{layer name: Scheme}`` (layers left out stay float32;
        fp8 layers are rounded to nearest (scaled first with AWQ), and have no row)
    texts : list of str or None (the built-in calibration set)
    method : {"gptq", "awq", "awq+gptq"} (see the module docstring)
    observer : {"minmax", "mse"}
    objective : {"model", "layer"}, what GPTQ reproduces (module docstring; ``"awq"`` rounds to nearest either way)
    grid : int, AWQ's points of ``a`` (``a = j / grid``, ``j < grid``)
    progress : ``progress(module, done, total)`` after each layer, or None

    Returns
    -------
    tensors : dict, the encoder's tensors: QuantizedTensors for its linear weights, and (AWQ) the value
        projections' float32 weights and biases with ``1 / s`` folded in where a scale was applied
    rows : list of dict per layer: ``name``, ``shape``, ``scheme``, ``tokens``, ``method``, ``rtn_loss``,
        ``loss`` (the method's; GPTQ methods also as ``gptq_loss``), both relative (module docstring),
        ``objective`` (GPTQ methods),
        ``ratio`` (method / RTN), ``alpha`` (AWQ's exponent, None where unscaled), ``seconds``; folded weights
        (scaled ones, and value quantized again) also ``weight_error``, :func:`~npquant.metrics.weight_error`
        against the folded float weight the codes stand for
    """
    if method not in CALIBRATED_METHODS:
        raise NpquantError(f"method={method!r} is not a calibrated method; expected one of {CALIBRATED_METHODS}")
    if objective not in OBJECTIVES:
        raise NpquantError(f"objective={objective!r} is not known; expected one of {OBJECTIVES}")
    if isinstance(schemes, Scheme):
        schemes = {name: schemes for name in encoder.linear_names()}
    if method == "gptq" and objective == "layer" and all(s.is_float for s in schemes.values()):
        raise NpquantError("GPTQ takes int schemes; fp8 is rounded to nearest (method='rtn')")
    texts = calibration_texts() if texts is None else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise NpquantError("calibration texts must be a non-empty list of non-empty strings")
    use_gptq = method in ("gptq", "awq+gptq")
    to_model = use_gptq and objective == "model"
    # The numpy backend throughout: the Hessians (so the codes) do not depend on whether numba is installed.
    work = encoder.with_backend("numpy")
    reference = encoder.with_backend("numpy") if to_model else None  # the float model, run beside
    batches = []
    for idx in work.batches(texts, CALIBRATION_BATCH):
        ids, mask = work.tokenize([texts[j] for j in idx])
        x, bias = work._embed(ids, mask)
        batches.append([x, bias, mask, x])  # block input, attention bias, token mask, the float model's block input
        # (with the model objective, batch[3] holds the float model's input of block i + 1 while block i is calibrated)
    total = sum(n in schemes for n in work.linear_names())
    rows = []
    done = 0

    def quantize_layer(w, h, scheme, moments=None, anchor=None):
        """``w`` quantized by the method: ``moments`` ``(C, H~, H)`` give the model objective's target."""
        if not use_gptq:
            return quantize(anchor if anchor is not None else w, scheme, observer=observer)
        if scheme.is_float:  # GPTQ's feedback is for integer grids: fp8 is rounded to nearest (its float target's)
            if moments is not None:
                w = model_target(w, moments[0], moments[1], anchor=anchor)
            elif anchor is not None:
                w = anchor
            return quantize(w, scheme, observer=observer)
        if moments is None:
            return gptq(w if anchor is None else anchor, h, scheme, observer=observer)
        cross, h_q, _ = moments
        target = model_target(w, cross, h_q, anchor=anchor)
        qt = gptq(target, h_q, scheme, observer=observer)
        if scheme.symmetric:
            qt = refit_scales(qt, target, h_q)
        return qt

    for i in range(work.config.num_layers):
        prefix = f"encoder.layer.{i}."
        float_inputs = None  # per batch {module: its input} in the float model's block i, which runs once
        if reference is not None:
            float_inputs = [{} for _ in batches]
            for batch, seen in zip(batches, float_inputs):
                batch[3] = reference._block(i, batch[3], batch[1], seen.__setitem__)  # the next block's input
        qkv_hessian = None  # value's, for quantizing it again once the attention output's scale folds into it
        qkv_moments = None
        for group in _GROUPS:
            group = tuple(m for m in group if prefix + m + ".weight" in schemes)
            if not group:
                continue
            stats, moments = _gather(work, i, batches, prefix + group[0], float_inputs)
            h = stats.hessian()
            if group[0] == "attention.self.query" or "attention.self.value" in group:
                qkv_hessian, qkv_moments = h, moments
            start = time.perf_counter()
            names = [prefix + m + ".weight" for m in group]
            ws = [work.tensors[n] for n in names]
            found = None
            if method != "gptq" and group[0] in SCALED_GROUPS and len({schemes[n] for n in names}) == 1:
                scheme0 = schemes[names[0]]  # awq+gptq: each scale scored by the error after GPTQ
                loss = loss_after_gptq(quantize_layer, ws, h, moments, scheme0) \
                    if use_gptq and not scheme0.is_float else None
                found = search_scale(ws, stats.abs_mean(), h, scheme0, grid=grid, observer=observer, loss=loss)
            h_q, moments_q = h, moments
            if found is not None:
                value = prefix + SCALED_GROUPS[group[0]] + ".weight"  # the producer: value
                folded = fold_scale({**work.tensors, value: encoder.tensors[value]}, i, group[0], found.scale)
                work.tensors.update(folded)  # value's float rows / s and bias / s (and our scaled weight)
                if value in schemes:  # value was quantized already: again, from its folded float weight
                    # (its float input is unchanged, and its float target is the folded rows: w = anchor)
                    work.tensors[value] = quantize_layer(folded[value], qkv_hessian, schemes[value], qkv_moments,
                                                         folded[value] if qkv_moments is not None else None)
                    for row in rows:
                        if row["name"] == value:  # the checkpoint's error column: against the folded weight
                            row["weight_error"] = weight_error(folded[value], work.tensors[value])
                ws_q = [folded[n] for n in names]
                if use_gptq:  # the context as the folded, quantized value makes it
                    stats_q, moments_q = _gather(work, i, batches, prefix + group[0], float_inputs)
                    h_q = stats_q.hessian()
                else:
                    h_q = scale_hessian(h, found.scale)
            else:
                ws_q = ws
            for name, w, w_q in zip(names, ws, ws_q):
                scheme = schemes[name]
                if moments_q is not None:
                    qt = quantize_layer(w, h_q, scheme, moments_q, anchor=w_q)
                else:
                    qt = quantize_layer(w_q, h_q, scheme)
                work.tensors[name] = qt
                done += 1
                if not scheme.is_float or moments_q is not None:
                    rtn_qt = quantize(w, scheme, observer=observer)
                    if moments_q is not None:  # the float model's output at this layer
                        cross, h_x, h_f = moments
                        ref = float(np.einsum("oi,oi->", w.astype(np.float64) @ h_f, w.astype(np.float64)))
                        rtn = model_loss(w, rtn_qt.dequantize(), cross, h_x, h_f) / ref
                        ours = model_loss(w, qt.dequantize(), moments_q[0], moments_q[1], h_f) / ref
                    else:
                        ref = float(np.einsum("oi,oi->", w.astype(np.float64) @ h, w.astype(np.float64)))
                        rtn = hessian_loss(w, rtn_qt, h) / ref
                        ours = hessian_loss(w_q, qt, h_q) / ref  # in the scaled space: the same output error
                    row = {"name": name, "shape": tuple(w.shape), "scheme": scheme, "tokens": stats.tokens,
                           "method": method, "rtn_loss": rtn, "loss": ours, "ratio": ours / rtn if rtn > 0 else 1.0,
                           "alpha": None if found is None else found.alpha, "seconds": time.perf_counter() - start}
                    if use_gptq:
                        row["gptq_loss"] = ours
                        row["objective"] = objective
                    if found is not None:  # the checkpoint's error column: against the folded weight
                        row["weight_error"] = weight_error(w_q, qt)
                    rows.append(row)
                if progress is not None:
                    progress(name, done, total)
        for batch in batches:  # the quantized block's output feeds the next block
            batch[0] = work._block(i, batch[0], batch[1])
    return work.tensors, rows


def changed_tensors(before, after) -> tuple[dict, dict]:
    """What a checkpoint writer takes from :func:`calibrated_tensors`: ``(quantized, replaced)``.

    ``quantized``: name -> QuantizedTensor, every quantized linear weight.
    ``replaced``: name -> float32 array, every float tensor of ``after`` that
    is not the very array of ``before`` (the encoder's own tensors): with AWQ
    the value projections' biases (and their weights where a plan leaves
    them float) with ``1 / s`` folded in. Names are the encoder's (no
    ``bert.`` prefix).
    """
    from ..tensor import QuantizedTensor

    quantized = {n: t for n, t in after.items() if isinstance(t, QuantizedTensor)}
    replaced = {n: t for n, t in after.items()
                if not isinstance(t, QuantizedTensor) and (n not in before or t is not before[n])}
    return quantized, replaced


def _gather(work, i: int, batches, wanted: str, float_inputs=None):
    """``(InputStats, (C, H~, H) or None)`` of ``wanted``'s inputs in block ``i`` over every calibration batch.

    ``InputStats``: ``X~.T X~`` and ``sum |x~|`` of the inputs ``work`` gives
    it. With ``float_inputs`` (per batch ``{module: input}`` of the float
    model's block ``i``), also the moments of those inputs with the float
    model's own at the same tokens (:class:`~npquant.calibrate.target.CrossMoment`).
    """
    stats = None
    moments = None
    for b, (x, bias, mask, _) in enumerate(batches):
        seen = {}

        def observe(module, inp, mask=mask):
            nonlocal stats
            if module == wanted:
                if stats is None:
                    stats = InputStats(inp.shape[-1])
                stats.add(inp, mask)
                seen["x"] = inp

        _run_until(work, i, x, bias, observe, wanted)
        if float_inputs is not None:
            if moments is None:
                moments = CrossMoment(seen["x"].shape[-1])
            moments.add(float_inputs[b][wanted], seen["x"], mask)
    return stats, None if moments is None else moments.matrices()


class _Stop(Exception):
    """Raised by the observer once the wanted layer's input is seen: the rest of the block is not needed."""


def _run_until(work, i: int, x, bias, observe, wanted: str) -> None:
    """Run block ``i`` until ``wanted`` has seen its input."""

    def watch(module, inp):
        observe(module, inp)
        if module == wanted:
            raise _Stop

    try:
        work._block(i, x, bias, watch)
    except _Stop:
        pass
