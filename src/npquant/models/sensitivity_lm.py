"""What each plan unit of a decoder alone costs its next-token predictions, per scheme: a decoder plan's costs.

**Plan units.** vLLM runs a Llama-family layer's q, k and v projections as one
fused ``qkv_proj`` and its gate and up projections as one ``gate_up_proj``, and
refuses a compressed-tensors checkpoint whose fused shards carry different
schemes ("Found a different quantization schemes for ['q_proj', 'k_proj',
'v_proj'] ... vLLM requires all to use the same scheme"). So a decoder plan
chooses one scheme per unit, :func:`plan_units`: per layer ``qkv_proj``
(q, k, v), ``o_proj``, ``gate_up_proj`` (gate, up) and ``down_proj``, each
unit's weights quantized together.

**The cost** of unit ``u`` under scheme ``s`` is the mean over calibration
positions of ``KL(p || q)`` (nats), ``p`` the float32 model's next-token
distribution and ``q`` that of the model with only ``u``'s weights rounded to
nearest (RTN) with ``s`` (every other weight float32): what ``npquant eval``
reports for a whole model, here for one unit at a time. The positions are
those of calibration text (:func:`npquant.calibrate.calibration_texts`,
joined one text per line and tokenized by the model's tokenizer), never the
evaluation text.

**Cached.** The float32 model runs once: the input ``(B, T, C)`` of every
decoder layer and, per scored position, ``p`` (float64 ``(N, V)``) and
``sum_v p log p`` are kept. Unit ``u`` of layer ``i`` then runs layer ``i``
on its cached input with ``u``'s weights replaced by their dequantized
values, the float32 layers ``i + 1 .. L - 1``, the final norm and the head,
and ``KL = sum_v p log p - sum_v p log q`` in float64. A unit in layer ``i``
costs ``L - i`` layers and one head per scheme: on SmolLM2 (30 layers, 120
units; 6 default candidates fit in_features 576, 7 fit down_proj's 1536) that
is 750 unit and scheme pairs, 11,625 layer runs and 750 heads on 128 tokens
(see ``benchmarks/bench_plan_decoder.py`` for the measured time). Memory,
beside the model's own: ``4 L N C`` bytes of layer inputs and ``8 N V`` of
``p`` (SmolLM2 at 128 tokens: 9 MB and 50 MB).

The planner adds the units' costs: a first-order picture (each unit's damage
measured alone) whose additivity the benchmark measures on whole plans.
Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import NpquantError
from ..plan import DECODER_CANDIDATES, DEFAULT_COST_TOKENS, fused_units, layer_bytes
from ..quantize import OBSERVERS, quantize
from ..schemes import get_scheme
from .causal_lm import CausalLM
from .causal_lm_config import CausalLMConfig
from .layers import rms_norm

__all__ = ["DECODER_CANDIDATES", "DEFAULT_COST_TOKENS", "COST_CONTEXT", "plan_units", "calibration_batches",
           "unit_costs", "plan_quantizer"]

#: Tokens per window of calibration text (each window runs from position 0).
COST_CONTEXT = 256
# float64 log-probs per block of positions in the KL: at most this many (16 MiB), a few such arrays at a time.
_BLOCK_ELEMENTS = 1 << 21


def plan_units(config) -> dict[str, tuple[str, ...]]:
    """``{unit: (weight names)}``: the modules vLLM runs, each a set of linear weights that share one scheme.

    :func:`npquant.plan.fused_units` of the decoder's linear weights.
    Per decoder layer ``i``, in the order the forward reads them:
    ``model.layers.{i}.self_attn.qkv_proj`` (q, k, v), ``.self_attn.o_proj``,
    ``.mlp.gate_up_proj`` (gate, up), ``.mlp.down_proj``; the members are
    weight names (``....q_proj.weight``).

    >>> cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
    ...        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    >>> plan_units(cfg)["model.layers.0.self_attn.qkv_proj"]
    ('model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.v_proj.weight')
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    return {unit: tuple(members) for unit, members in fused_units(cfg.linear_names()).items()}


def calibration_batches(tokenizer, texts: list[str], tokens: int = DEFAULT_COST_TOKENS,
                        context: int = COST_CONTEXT) -> list[np.ndarray]:
    """Calibration text as token windows: ``texts`` joined one per line, tokenized, the first ``tokens`` ids.

    Parameters
    ----------
    tokenizer : a ``tokenizers.Tokenizer`` (the model's own)
    texts : list of str, calibration texts (never the evaluation text)
    tokens : int >= 2, ids used at most
    context : int >= 2, ids per window

    Returns
    -------
    list of int64 ``(B, T)`` arrays (:func:`npquant.fidelity_lm.token_windows`).
    """
    from ..fidelity_lm import token_windows

    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise NpquantError("decoder costs need a non-empty list of non-empty calibration texts")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 2:
        raise NpquantError(f"tokens must be an int >= 2 (one token to condition on, one to predict), got {tokens!r}")
    ids = tokenizer.encode("\n".join(texts), add_special_tokens=False).ids
    if len(ids) < 2:
        raise NpquantError(f"the calibration text is {len(ids)} token{'s' if len(ids) != 1 else ''} long; "
                           f"costs need at least 2")
    return token_windows(ids, min(context, tokens), max_tokens=tokens)


def unit_costs(config, weights, batches, schemes, *, units=None, observer: str = "minmax",
               progress=None) -> tuple[dict, dict]:
    """Mean KL(float || unit alone quantized) of the next-token distributions, per unit and scheme.

    Parameters
    ----------
    config : dict (``config.json``) or CausalLMConfig
    weights : the float model's tensors, as :class:`~npquant.models.CausalLM` reads them (a mapping or a
        callable); read again for each unit and scheme, one layer tensor at a time
    batches : list of int ``(B, T)`` arrays, ``T >= 2``: calibration windows (:func:`calibration_batches`)
    schemes : ``{label: Scheme or preset name}``, the candidates
    units : ``{unit: (weight names)}`` (default :func:`plan_units`); each unit's weights lie in one decoder layer
    observer : {"minmax", "mse"}, for :func:`npquant.quantize`
    progress : ``progress(unit, label, done, total)`` after each unit and scheme, or None

    Returns
    -------
    costs : ``{unit: {label: mean KL in nats}}`` over the candidates that fit every weight of the unit
        (a group size must divide ``in_features``)
    nbytes : ``{unit: {label: bytes}}``, the unit's weights quantized (codes, scales, zero points)

    Everything is checked before the first forward: the schemes, the
    observer, the batches, the units, and that every unit fits a candidate.
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {', '.join(OBSERVERS)}")
    if not schemes:
        raise NpquantError("decoder costs need at least one candidate scheme")
    schemes = {label: get_scheme(s) for label, s in schemes.items()}
    batches = _check_batches(batches, cfg.vocab_size)
    units = plan_units(cfg) if units is None else units
    shapes = cfg.tensor_shapes()
    layer_of, fits = {}, {}
    for unit, members in units.items():
        members = tuple(members)
        bad = [m for m in members if m not in shapes or not m.startswith("model.layers.") or len(shapes[m]) != 2]
        if not members or bad:
            raise NpquantError(f"unit {unit!r} must list linear weights of the decoder layers, got "
                               f"{bad[0] if bad else 'none'!r}")
        layers = {int(m.split(".")[2]) for m in members}
        if len(layers) != 1:
            raise NpquantError(f"unit {unit!r} spans decoder layers {sorted(layers)}; a unit lies in one layer")
        layer_of[unit] = layers.pop()
        fits[unit] = {label: sum(layer_bytes(shapes[m], s) for m in members) for label, s in schemes.items()
                      if all(layer_bytes(shapes[m], s) is not None for m in members)}
        if not fits[unit]:
            raise NpquantError(f"no candidate scheme fits unit {unit!r} {shapes[members[0]]} (no group size "
                               f"divides {shapes[members[0]][1]}); add a channel scheme to the candidates")

    override: dict[str, np.ndarray] = {}  # weight name -> its dequantized float32 values, for the unit measured

    def source(name):
        if name in override:
            return override[name]
        return weights[name] if isinstance(weights, Mapping) else weights(name)

    model = CausalLM(cfg, source, backend="numpy")
    reference = [_Reference(model, ids) for ids in batches]
    costs, nbytes = {}, {}
    total = sum(len(f) for f in fits.values())
    done = 0
    for unit, members in units.items():
        i = layer_of[unit]
        floats = {m: model._tensor(m) for m in members}  # float32 (O, I)
        costs[unit], nbytes[unit] = {}, {}
        for label in fits[unit]:
            size = 0
            for m in members:
                qt = quantize(floats[m], schemes[label], name=m, observer=observer)
                override[m] = qt.dequantize()
                size += qt.nbytes
            kl_sum = n = 0.0
            for ref in reference:
                kl = ref.kl_from(i)
                kl_sum += float(kl.sum())
                n += kl.size
            costs[unit][label] = max(kl_sum / n, 0.0)  # KL >= 0; a rounding of an equal model can give -1e-17
            nbytes[unit][label] = size
            done += 1
            if progress is not None:
                progress(unit, label, done, total)
        for m in members:
            override.pop(m, None)
    return costs, nbytes


def plan_quantizer(schemes: dict, *, observer: str = "minmax", backend: str = "auto"):
    """A :class:`~npquant.models.CausalLM` ``quantizer``: each weight a plan names, rounded to nearest with its scheme.

    ``schemes``: ``{weight name: Scheme or preset}`` (e.g.
    :func:`npquant.plan.plan_schemes` of a plan.json); a weight it does not
    name stays float32. ``CausalLM(config, weights, quantizer=plan_quantizer(schemes))``
    is the model the plan describes, for ``npquant eval --plan`` on a decoder.
    """
    if observer not in OBSERVERS:
        raise NpquantError(f"observer={observer!r} is not known; expected one of {', '.join(OBSERVERS)}")
    resolved = {name: get_scheme(s) for name, s in schemes.items()}

    def quantizer(name: str, w: np.ndarray):
        scheme = resolved.get(name)
        if scheme is None:
            return None
        return quantize(w, scheme, name=name, observer=observer, backend=backend)

    return quantizer


# --- the float model, kept ---------------------------------------------------------------------------------
class _Reference:
    """One window batch of the float32 model: each layer's input, and ``p`` with ``sum p log p`` per position."""

    def __init__(self, model: CausalLM, ids: np.ndarray):
        cfg = model.config
        self.model = model
        x = model.embed(ids)  # (B, T, C)
        self.inputs = []  # L arrays (B, T, C)
        for i in range(cfg.num_layers):
            self.inputs.append(x)
            x = model.layer(i, x)
        h = self._final(x)  # (N, C)
        self.p, self.neg_entropy = [], []
        for s in _blocks(len(h), cfg.vocab_size):
            lp = _log_softmax(model.head(h[s]))  # (n, V) float64
            p = np.exp(lp)
            self.neg_entropy.append(np.einsum("nv,nv->n", p, lp))  # (n,)
            self.p.append(p)

    def _final(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(N, C)``: the final norm of ``x`` ``(B, T, C)`` at the positions that predict a token."""
        cfg = self.model.config
        h = rms_norm(x[:, :-1], self.model._tensor("model.norm.weight"), cfg.rms_norm_eps)  # (B, T - 1, C)
        return h.reshape(-1, cfg.hidden_size)

    def kl_from(self, i: int) -> np.ndarray:
        """float64 ``(N,)``: KL(float || model) per position, the model run from layer ``i`` on its cached input."""
        x = self.inputs[i]
        for j in range(i, self.model.config.num_layers):
            x = self.model.layer(j, x)
        h = self._final(x)
        out = []
        for s, p, neg in zip(_blocks(len(h), self.model.config.vocab_size), self.p, self.neg_entropy):
            lq = _log_softmax(self.model.head(h[s]))  # (n, V)
            out.append(neg - np.einsum("nv,nv->n", p, lq))  # sum p log p - sum p log q
        return np.concatenate(out)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 ``(n, V)``: log-softmax of float32 ``logits`` ``(n, V)``."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def _blocks(n: int, vocab_size: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most ``_BLOCK_ELEMENTS`` logits each."""
    step = max(1, _BLOCK_ELEMENTS // vocab_size)
    return [slice(k, min(k + step, n)) for k in range(0, n, step)]


def _check_batches(batches, vocab_size: int) -> list[np.ndarray]:
    if isinstance(batches, np.ndarray):
        batches = [batches]
    out = []
    for k, ids in enumerate(batches):
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2 or ids.dtype.kind not in "iu":
            raise NpquantError(f"batches[{k}] must be token ids of shape (B, T) with T >= 2, got {ids.dtype} "
                               f"{ids.shape}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise NpquantError(f"batches[{k}] holds token ids outside [0, vocab_size={vocab_size})")
        out.append(ids)
    if not out:
        raise NpquantError("batches is empty: give at least one window of 2 or more tokens")
    return out
