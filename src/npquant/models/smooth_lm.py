"""SmoothQuant for decoders: activation outliers moved into the weights, folded into the RMSNorms.

W8A8 quantizes each token's activations with one scale, so a few input
channels that are always large (outliers) take the range and every other
channel gets few levels. SmoothQuant (Xiao et al., 2023) divides input
channel ``j`` by

    s_j = max|x_j| ** a / max|W_j| ** (1 - a)

and multiplies the weights' column ``j`` by it, ``x @ W.T = (x / s) @ (W * s).T``:
with ``a`` near 0.5 the activations' and the weights' ranges meet half way.
``max|x_j|`` is taken over the calibration tokens of the float model,
``max|W_j|`` over the rows of every linear that reads the input (both
floored at 1e-5, as the reference implementation does).

In a pre-norm decoder (Llama, Mistral, Qwen2, Qwen3) the inputs of q/k/v
and of gate/up are RMSNorm outputs that feed nothing else, so ``1 / s``
folds into the norm's weight and the model is unchanged in exact
arithmetic (:func:`npquant.models.awq_lm.fold_scale`): the result is an
ordinary checkpoint, smoothed before it is quantized. o_proj and down_proj
read the attention context and ``silu(gate) * up``; their scales would fold
into v_proj's and up_proj's rows, and are left out here, as in the
reference recipe. A post-LayerNorm BERT's norm outputs also feed the
residual, so nothing folds there (see :mod:`npquant.models.calibrated`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import NpquantError
from .awq_lm import fold_scale
from .causal_lm import CausalLM
from .causal_lm_config import CausalLMConfig

__all__ = ["SMOOTHED_GROUPS", "smooth_decoder", "smooth_scale"]

#: The groups SmoothQuant scales, each folded into the RMSNorm before it.
SMOOTHED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))

_FLOOR = 1e-5


def smooth_scale(act_max, weights, alpha: float) -> np.ndarray:
    """float32 ``(I,)``: ``max|x_j| ** a / max|W_j| ** (1 - a)``, both maxima floored at 1e-5.

    ``act_max``: float ``(I,)``, ``max |x_j|`` over the calibration tokens;
    ``weights``: list of float ``(O_k, I)``, the linears that read ``x``.

    >>> smooth_scale(np.array([4.0, 1.0]), [np.array([[1.0, 4.0]])], 0.5).tolist()
    [2.0, 0.5]
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0 <= alpha <= 1:
        raise NpquantError(f"alpha must be a float in [0, 1] (SmoothQuant's migration strength), got {alpha!r}")
    a = np.asarray(act_max, np.float64)
    if a.ndim != 1 or not np.isfinite(a).all() or (a < 0).any():
        raise NpquantError(f"act_max must be a finite, non-negative 1-D array (I,), got shape {a.shape}")
    w_max = np.zeros_like(a)
    for k, w in enumerate(weights):
        w64 = np.asarray(w).astype(np.float64)
        if w64.ndim != 2 or w64.shape[1] != a.shape[0]:
            raise NpquantError(f"weights[{k}] must be (O, {a.shape[0]}), got shape {w64.shape}")
        np.maximum(w_max, np.abs(w64).max(axis=0), out=w_max)
    s = np.maximum(a, _FLOOR) ** float(alpha) / np.maximum(w_max, _FLOOR) ** (1.0 - float(alpha))
    return s.astype(np.float32)


def smooth_decoder(config, weights, windows, alpha: float = 0.5) -> dict:
    """The float tensors SmoothQuant changes in a decoder, smoothed on the float model's calibration activations.

    Parameters
    ----------
    config : dict (``config.json``) or CausalLMConfig
    weights : mapping (or callable) of the float model's tensors, as :class:`CausalLM` reads them
    windows : list of int ``(B, T)`` token arrays (the calibration text, never the evaluation text)
    alpha : float in [0, 1], the migration strength (0.5: SmoothQuant's default)

    Returns
    -------
    dict : name -> float32 array: per decoder layer, ``input_layernorm.weight / s`` and q/k/v ``* s`` (columns),
        ``post_attention_layernorm.weight / s`` and gate/up ``* s``; the float model they make computes the same
        function up to float rounding. Quantize these weights in place of the input's.
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    windows = [np.asarray(w) for w in ([windows] if isinstance(windows, np.ndarray) else windows)]
    if not windows or any(w.ndim != 2 or w.size == 0 or w.dtype.kind not in "iu" for w in windows):
        raise NpquantError("windows must be a non-empty list of int token arrays (B, T)")
    smooth_scale(np.zeros(1), [], alpha)  # alpha checked before the forward
    read = weights.__getitem__ if isinstance(weights, Mapping) else weights
    model = CausalLM(cfg, read, backend="numpy")
    first = tuple("." + g[0] for g in SMOOTHED_GROUPS)
    act_max: dict = {}  # "model.layers.<i>.<module>" -> float64 (I,)

    def watch(name, x):
        if name.endswith(first):  # never written afterwards: read here, not kept
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0).astype(np.float64)
            act_max[name] = m if name not in act_max else np.maximum(act_max[name], m)

    for ids in windows:
        model.hidden_states(ids, observe=watch)
    out: dict = {}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for group in SMOOTHED_GROUPS:
            ws = [model._tensor(p + m + ".weight") for m in group]  # float arrays, whatever the source holds
            s = smooth_scale(act_max[p + group[0]], ws, alpha)
            producer = "input_layernorm" if group[0].startswith("self_attn") else "post_attention_layernorm"
            view = {p + m + ".weight": w for m, w in zip(group, ws)}
            view[p + producer + ".weight"] = model._tensor(p + producer + ".weight")
            out.update(fold_scale(view, cfg, i, group, s))
    return out
