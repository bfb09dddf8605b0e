"""Where AWQ's ``1 / s`` folds in a BERT encoder, and the fold itself.

A scale ``s`` on the input channels of a group of linears is applied as
``W * s`` (columns) with the input divided by ``s`` where it is produced
(:mod:`npquant.calibrate.awq`). In a BERT encoder (post-LayerNorm):

=========================  =====================================  ==========================================
group                      its input                              fold
=========================  =====================================  ==========================================
query, key, value          the embeddings' or the previous        none: that LayerNorm's output is also the
                           block's output LayerNorm               residual of this block
attention.output.dense     the context ``softmax(q k.T) v``       value's output rows and bias (exact: the
                                                                  context is linear in ``v`` per channel)
intermediate.dense         attention.output.LayerNorm             none: also the residual of the output
                                                                  LayerNorm
output.dense               ``GELU(intermediate)``                 none: GELU is not linear
=========================  =====================================  ==========================================

Folding ``1 / s`` into a LayerNorm whose output is also a residual divides
the residual by ``s`` too; the next LayerNorm normalises over channels, so
the model changes (a test measures it). Only the attention output's scale
is therefore applied to BERT.
"""

from __future__ import annotations

import numpy as np

from ..calibrate.awq import fold_into_rows, scale_columns
from ..errors import NpquantError

__all__ = ["SCALED_GROUPS", "UNFOLDABLE", "fold_scale"]

#: Groups (named by their first module) whose AWQ scale folds into the model: group -> where.
SCALED_GROUPS = {"attention.output.dense": "attention.self.value"}

#: Groups whose scale has nowhere to fold, and why.
UNFOLDABLE = {
    "attention.self.query": "its input, a LayerNorm's output, is also the block's residual",
    "intermediate.dense": "its input, attention.output.LayerNorm's output, is also the residual of output.LayerNorm",
    "output.dense": "its input is GELU's output, which is not linear",
}


def fold_scale(tensors, layer: int, module: str, scale) -> dict:
    """The tensors that change when group ``module`` of block ``layer`` takes input scale ``scale``.

    Parameters
    ----------
    tensors : mapping of the encoder's tensor names (no ``bert.`` prefix) to arrays; the group's weight and
        the producer's weight and bias must be float arrays
    layer : int, the block
    module : str, the group's first module (``"attention.output.dense"``)
    scale : float (I,), ``s``

    Returns
    -------
    dict : name -> new float32 array: the group's weight ``W * s`` and the producer's (value's) weight
        ``W_v / s[:, None]`` and bias ``b_v / s``. The input mapping is not changed.
    """
    if module not in SCALED_GROUPS:
        why = UNFOLDABLE.get(module, "it is not a group of a BERT block")
        raise NpquantError(f"module={module!r}: an AWQ scale cannot be folded there ({why}); foldable: "
                           f"{tuple(SCALED_GROUPS)}")
    p = f"encoder.layer.{layer}."
    producer = SCALED_GROUPS[module]
    names = (p + module + ".weight", p + producer + ".weight", p + producer + ".bias")
    for name in names:
        if name not in tensors:
            raise NpquantError(f"tensors lack {name!r}: is layer={layer} a block of this encoder?")
        if not isinstance(tensors[name], np.ndarray):
            raise NpquantError(f"tensor {name!r} must be a float array to fold a scale into, got "
                               f"{type(tensors[name]).__name__} (fold before quantizing)")
    w_v, b_v = fold_into_rows(tensors[names[1]], tensors[names[2]], scale)
    return {names[0]: scale_columns(tensors[names[0]], scale), names[1]: w_v, names[2]: b_v}
