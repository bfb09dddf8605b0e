"""Where AWQ's ``1 / s`` folds in a Llama-family decoder, and the fold itself.

A Llama, Mistral, Qwen2 or Qwen3 layer is pre-norm: the residual is taken
*before* each RMSNorm, so a norm's output feeds only the linears that
read it, and dividing it by ``s`` changes nothing else. Each group of
linears that share an input, and what produces that input:

======================  ===============================  ==================================================
group                   its input                        fold ``1 / s`` into
======================  ===============================  ==================================================
q_proj, k_proj, v_proj  ``RMSNorm(x)``                   ``input_layernorm.weight``
o_proj                  the attention context            ``v_proj``'s output rows (and bias), where every
                                                         query head that shares a key/value head takes the
                                                         same scale (grouped-query attention)
gate_proj, up_proj      ``RMSNorm(x)``                   ``post_attention_layernorm.weight``
down_proj               ``silu(gate) * up``              ``up_proj``'s output rows (and bias): the product
                                                         is linear in ``up`` per channel
======================  ===============================  ==================================================

**Grouped-query attention.** With ``H`` query heads and ``K`` key/value
heads, query head ``h`` reads value head ``h // (H / K)``; context channel
``h * D + d`` is ``softmax_h @ v[:, (h // G) * D + d]``. Dividing value's
row ``k * D + d`` by ``t`` divides the context channels ``(k * G + g) * D + d``
of all ``G = H / K`` heads by ``t``. So o_proj's scale must be equal across
the heads that share a value head: :func:`tie_heads` averages ``mean |x|``
over them before the search (so every exponent gives a tied scale), and
:func:`fold_scale` refuses a scale that is not tied. Qwen3's per-head
q/k RMSNorm acts on q and k, not on v, and changes none of this.

The sequential calibration loop for decoders (which runs these groups in
order on calibration text) is not here yet; these are its folds.
"""

from __future__ import annotations

import numpy as np

from ..calibrate.awq import fold_into_norm, fold_into_rows, scale_columns
from ..errors import NpquantError

__all__ = ["DECODER_GROUPS", "fold_scale", "tie_heads"]

#: Groups of a decoder layer (modules that share an input) -> (where ``1 / s`` folds, how): ``"norm"`` (an
#: RMSNorm's weight) or ``"rows"`` (a linear's output rows and bias).
DECODER_GROUPS = {
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): ("input_layernorm", "norm"),
    ("self_attn.o_proj",): ("self_attn.v_proj", "rows"),
    ("mlp.gate_proj", "mlp.up_proj"): ("post_attention_layernorm", "norm"),
    ("mlp.down_proj",): ("mlp.up_proj", "rows"),
}


def tie_heads(abs_mean, num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """float64 ``(H * D,)``: o_proj's ``mean |x|`` averaged over the query heads that share a key/value head.

    >>> tie_heads(np.array([1.0, 2.0, 3.0, 6.0]), num_heads=2, num_kv_heads=1, head_dim=2).tolist()
    [2.0, 4.0, 2.0, 4.0]
    """
    H, K, D = num_heads, num_kv_heads, head_dim
    m = np.asarray(abs_mean, np.float64)
    if m.shape != (H * D,) or K < 1 or H % K:
        raise NpquantError(f"abs_mean must have num_heads * head_dim = {H * D} entries with num_heads={H} a multiple "
                           f"of num_kv_heads={K}, got shape {m.shape}")
    tied = m.reshape(K, H // K, D).mean(axis=1, keepdims=True)  # (K, 1, D): head h = k * G + g
    return np.broadcast_to(tied, (K, H // K, D)).reshape(H * D).copy()


def fold_scale(tensors, config, layer: int, group, scale) -> dict:
    """The tensors that change when ``group`` of decoder layer ``layer`` takes input scale ``scale``.

    Parameters
    ----------
    tensors : mapping of Hugging Face tensor names to float arrays (the group's weights, the producer's)
    config : CausalLMConfig or a config.json dict
    layer : int
    group : tuple of module names, a key of :data:`DECODER_GROUPS` (e.g. ``("mlp.down_proj",)``)
    scale : float (I,), ``s``; for o_proj equal across the heads sharing a key/value head

    Returns
    -------
    dict : name -> new float32 array: each weight of the group ``W * s``, and the producer divided by ``s``
        (the norm's weight, or the linear's rows and bias). The input mapping is not changed.
    """
    from .causal_lm_config import CausalLMConfig

    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    group = tuple(group)
    if group not in DECODER_GROUPS:
        raise NpquantError(f"group={group!r} is not a group of a decoder layer; expected one of "
                           f"{list(DECODER_GROUPS)}")
    if not (isinstance(layer, (int, np.integer)) and 0 <= layer < cfg.num_layers):
        raise NpquantError(f"layer must be an int in [0, {cfg.num_layers}), got {layer!r}")
    p = f"model.layers.{layer}."
    producer, how = DECODER_GROUPS[group]

    def get(name):
        if name not in tensors:
            raise NpquantError(f"tensors lack {name!r}")
        t = tensors[name]
        if not isinstance(t, np.ndarray) or t.dtype.kind not in "fV":
            raise NpquantError(f"tensor {name!r} must be a float array to fold a scale into, got "
                               f"{type(t).__name__} (fold before quantizing)")
        return t

    out = {p + m + ".weight": scale_columns(get(p + m + ".weight"), scale) for m in group}
    s = np.asarray(scale)
    if how == "norm":
        out[p + producer + ".weight"] = fold_into_norm(get(p + producer + ".weight"), None, s)[0]
        return out
    if group == ("self_attn.o_proj",):
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        heads = s.reshape(K, H // K, D)  # (K, G, D)
        if not np.array_equal(heads, np.broadcast_to(heads[:, :1], heads.shape)):
            raise NpquantError(f"o_proj's scale must be equal across the {H // K} query heads that share each "
                               f"key/value head (num_heads={H}, num_kv_heads={K}): tie it with tie_heads")
        s = np.ascontiguousarray(heads[:, 0]).reshape(K * D)  # (K * D,): value's rows
    bias_name = p + producer + ".bias"
    w, b = fold_into_rows(get(p + producer + ".weight"), get(bias_name) if bias_name in tensors else None, s)
    out[p + producer + ".weight"] = w
    if b is not None:
        out[bias_name] = b
    return out
