"""How much each layer alone costs the model's output, per scheme: the numbers a size plan is solved on.

For every linear layer and candidate scheme, the layer alone is quantized
(round to nearest, or GPTQ on that layer's Hessian from the float32 model)
and the calibration texts run from that layer's block onward, every other
layer in float32; the cost is the mean over texts of ``1 - cosine`` between
that embedding and the float32 one. Block inputs of the float32 model are
computed once and reused, so each measurement runs only the blocks from the
layer's own. The planner adds these costs over layers: a first-order
picture that ranks layers by what quantizing them does to the output.
"""

from __future__ import annotations

import numpy as np

from ..calibrate import Hessian, gptq
from ..errors import NpquantError
from ..plan import layer_bytes
from ..quantize import OBSERVERS, quantize
from ..schemes import Scheme, get_scheme

__all__ = ["layer_costs"]

_BATCH = 32


def layer_costs(encoder, schemes: dict[str, Scheme], texts: list[str], *, method: str = "rtn",
                observer: str = "minmax", progress=None) -> tuple[dict, dict]:
    """Output cost and exact bytes of every linear layer under every candidate scheme.

    Parameters
    ----------
    encoder : BertEncoder (float32), e.g. a SentenceEncoder: the model, taken as an argument
    schemes : ``{label: Scheme}`` candidates
    texts : calibration texts (never the evaluation set)
    method : {"rtn", "gptq"}; with ``"gptq"``, int schemes are GPTQ'd on the
        layer's float32-model Hessian (fp8 is rounded to nearest)
    progress : ``progress(layer, done, total)`` after each layer, or None

    Returns
    -------
    costs : ``{layer: {label: mean(1 - cos)}}``, the candidates that fit the
        layer only (a group size must divide its ``in_features``)
    nbytes : ``{layer: {label: bytes}}`` (codes, scales, zero points)

    Everything is checked before the first forward pass: ``method``,
    ``observer``, the texts, the schemes, and that every layer fits at
    least one candidate (:func:`npquant.plan.check_budget` refuses a budget
    from the same shapes, also before measuring).
    """
    if method not in ("rtn", "gptq"):
        raise NpquantError(f"method={method!r} is not known; expected 'rtn' or 'gptq'")
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {', '.join(OBSERVERS)}")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise NpquantError("layer costs need a non-empty list of non-empty calibration texts")
    if not schemes:
        raise NpquantError("layer costs need at least one candidate scheme")
    schemes = {label: get_scheme(s) for label, s in schemes.items()}
    names = encoder.linear_names()
    fits = {}
    for name in names:
        shape = encoder.tensors[name].shape
        fits[name] = {label: s for label, s in schemes.items() if layer_bytes(shape, s) is not None}
        if not fits[name]:
            raise NpquantError(f"no candidate scheme fits layer {name!r} {tuple(shape)} (no group size divides "
                               f"{shape[1]}); add a channel scheme to the candidates")
    work = encoder.with_backend("numpy")
    n_layers = work.config.num_layers
    batches = []  # (block inputs [x_0 .. x_{L-1}], bias, mask, float32 embeddings)
    hessians: dict[str, Hessian] = {}
    for idx in work.batches(texts, _BATCH):
        ids, mask = work.tokenize([texts[j] for j in idx])
        x, bias = work._embed(ids, mask)
        inputs = []
        for i in range(n_layers):
            inputs.append(x)

            def observe(module, inp, mask=mask):
                if method == "gptq":
                    hessians.setdefault(module, Hessian(inp.shape[-1])).add(inp, mask)

            x = work._block(i, x, bias, observe)
        batches.append((inputs, bias, mask, work._pool(x, mask)))
    costs, nbytes = {}, {}
    for done, name in enumerate(names, 1):
        module = name[: -len(".weight")]
        block = int(name.split(".")[2])
        w = encoder.tensors[name]
        costs[name], nbytes[name] = {}, {}
        for label, scheme in fits[name].items():
            if method == "gptq" and not scheme.is_float:
                qt = gptq(w, hessians[module].matrix(), scheme, observer=observer)
            else:
                qt = quantize(w, scheme, observer=observer)
            nbytes[name][label] = qt.nbytes
            work.tensors[name] = qt
            total, count = 0.0, 0
            for inputs, bias, mask, base in batches:
                x = inputs[block]
                for i in range(block, n_layers):
                    x = work._block(i, x, bias)
                emb = work._pool(x, mask)
                cos = np.sum(emb.astype(np.float64) * base.astype(np.float64), axis=1)
                total += float(np.sum(1.0 - cos))
                count += cos.size
            costs[name][label] = max(total / count, 0.0)
        work.tensors[name] = w
        if progress is not None:
            progress(name, done, len(names))
    return costs, nbytes
