"""Sequential GPTQ for the sentence encoder: each layer calibrated on the inputs it will really see.

The calibration texts run through the model once to the first block. Then,
block after block and, inside a block, in forward order (query/key/value
together, since they read the same input; then the attention output; the
feed-forward input; its output), the block runs on every calibration batch
with everything before already quantized, the inputs of the next layers are
gathered into a :class:`~npquant.calibrate.Hessian` (padding tokens left
out), and those layers are quantized with :func:`~npquant.calibrate.gptq`.
The block's quantized output is the next block's input.

Each layer's row reports the loss ``tr(dW H dW.T)`` (the mean squared
output error on the calibration tokens) of round-to-nearest and of GPTQ,
relative to ``tr(W H W.T)``, and the seconds GPTQ took.
"""

from __future__ import annotations

import time

import numpy as np

from ..calibrate import Hessian, calibration_texts, gptq, hessian_loss
from ..errors import NpquantError
from ..quantize import quantize
from ..schemes import Scheme

__all__ = ["gptq_tensors", "CALIBRATION_BATCH"]

#: Sentences per calibration forward pass.
CALIBRATION_BATCH = 32

# Linear layers of a block that share an input, in forward order.
_GROUPS = (
    ("attention.self.query", "attention.self.key", "attention.self.value"),
    ("attention.output.dense",),
    ("intermediate.dense",),
    ("output.dense",),
)


def gptq_tensors(encoder, schemes, texts=None, *, observer: str = "minmax", progress=None):
    """The encoder's tensors with its linear layers quantized by sequential GPTQ.

    Parameters
    ----------
    encoder : BertEncoder (float32), e.g. a SentenceEncoder: the model, taken as an argument
    schemes : Scheme, or ``{layer name: Scheme}`` (layers left out stay float32;
        fp8 layers are rounded to nearest, and have no row)
    texts : list of str or None (the built-in calibration set)
    observer : {"minmax", "mse"}
    progress : ``progress(module, done, total)`` after each layer, or None

    Returns
    -------
    tensors : dict, the encoder's tensors with QuantizedTensors for its linear weights
    rows : list of dict per layer: ``name``, ``shape``, ``rtn_loss``, ``gptq_loss``
        (both relative to ``tr(W H W.T)``), ``ratio`` (GPTQ / RTN), ``seconds``
    """
    if isinstance(schemes, Scheme):
        schemes = {name: schemes for name in encoder.linear_names()}
    if all(s.is_float for s in schemes.values()):
        raise NpquantError("GPTQ takes int schemes; fp8 is rounded to nearest (method='rtn')")
    texts = calibration_texts() if texts is None else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise NpquantError("calibration texts must be a non-empty list of non-empty strings")
    # The numpy backend throughout: the Hessians (so the codes) do not depend on whether numba is installed.
    work = encoder.with_backend("numpy")
    batches = []
    for idx in work.batches(texts, CALIBRATION_BATCH):
        ids, mask = work.tokenize([texts[j] for j in idx])
        x, bias = work._embed(ids, mask)
        batches.append([x, bias, mask])  # block input, attention bias, token mask
    names = [n for n in work.linear_names() if n in schemes]
    rows = []
    done = 0
    for i in range(work.config.num_layers):
        prefix = f"encoder.layer.{i}."
        for group in _GROUPS:
            group = tuple(m for m in group if prefix + m + ".weight" in schemes)
            if not group:
                continue
            wanted = prefix + group[0]
            hess = None
            for x, bias, mask in batches:

                def observe(module, inp, mask=mask):
                    nonlocal hess
                    if module == wanted:
                        if hess is None:
                            hess = Hessian(inp.shape[-1])
                        hess.add(inp, mask)

                _run_until(work, i, x, bias, observe, wanted)
            h = hess.matrix()
            tokens = hess.tokens
            for module in group:
                name = prefix + module + ".weight"
                w = work.tensors[name]
                scheme = schemes[name]
                start = time.perf_counter()
                if scheme.is_float:  # GPTQ's feedback is for integer grids: fp8 is rounded to nearest
                    work.tensors[name] = quantize(w, scheme, observer=observer)
                    done += 1
                    if progress is not None:
                        progress(name, done, len(names))
                    continue
                qt = gptq(w, h, scheme, observer=observer)
                seconds = time.perf_counter() - start
                ref = float(np.einsum("oi,oi->", w.astype(np.float64) @ h, w.astype(np.float64)))
                rtn = hessian_loss(w, quantize(w, scheme, observer=observer), h) / ref
                ours = hessian_loss(w, qt, h) / ref
                rows.append({"name": name, "shape": tuple(w.shape), "scheme": scheme, "tokens": tokens, "rtn_loss": rtn,
                             "gptq_loss": ours, "ratio": ours / rtn if rtn > 0 else 1.0, "seconds": seconds})
                work.tensors[name] = qt
                done += 1
                if progress is not None:
                    progress(name, done, len(names))
        for batch in batches:  # the quantized block's output feeds the next block
            batch[0] = work._block(i, batch[0], batch[1])
    return work.tensors, rows


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
