"""Sequential GPTQ for a decoder: each layer calibrated on the outputs of the quantized layers before it.

The calibration windows run through the embedding once. Then, decoder layer
after decoder layer and, inside a layer, in forward order, the layer runs on
every window with everything before already quantized until the next group
of linears has seen its input, that input's second moment is gathered in
one :class:`~npquant.calibrate.Hessian`, and the group is quantized with
:func:`~npquant.calibrate.gptq` against it:

1. ``q_proj``, ``k_proj``, ``v_proj``: one Hessian, of ``input_layernorm``'s output;
2. ``o_proj``: the attention output, computed with the quantized q/k/v;
3. ``gate_proj``, ``up_proj``: one Hessian, of ``post_attention_layernorm``'s output;
4. ``down_proj``: the SwiGLU output, from the quantized gate/up.

The layer's quantized output is the next layer's input. The forward is
:class:`~npquant.models.CausalLM`'s, its quantized linears on the numpy
backend (so the Hessians, and the codes, do not depend on numba).

**Memory.** The model is read one tensor at a time (CausalLM streams it);
held are the hidden states of the windows (``4 N C`` bytes for ``N``
calibration tokens), one Hessian (``8 I**2``: it is handed to the group's
last GPTQ call as its workspace, :meth:`~npquant.calibrate.Hessian.take`),
the weight being quantized (float32 ``4 O I``, int16 codes ``2 O I``, its
stored float16/bfloat16 copy ``2 O I``, GPTQ's blocks of rows ``2 x 32 MiB``)
and the quantized tensors made so far (packed; the caller writes them at
the end). The peak is at the widest input, ``down_proj``'s ``F``:
``8 F**2 + 8 F C + 64 MiB + 4 N C + Q + forward + base`` bytes (``6 F C`` for
a float32 model), ``Q`` the packed tensors so far, ``forward`` one window
batch's activations (``4 B T (C + 2 F)``, see :mod:`npquant.models.causal_lm`;
they and the Hessian are held together while it is gathered) and ``base``
the interpreter and libraries.

**The objective.** ``objective="layer"`` is GPTQ as published: each layer
reproduces its own float weight's output on the inputs ``X~`` the quantized
layers before it give. ``objective="model"`` makes the float model's output
at the layer, ``X W.T``, the target: the float model runs beside on the
same windows, once per layer, keeping its linears' inputs (``4 N (3 C + F)``
more bytes: q/k/v and gate/up share theirs), each group's cross moment ``X.T X~`` and
the float inputs' ``X.T X`` are gathered with ``X~.T X~`` (``16 I**2`` more
bytes at the widest input, and the Hessian is no longer GPTQ's workspace,
so ``8 F**2`` becomes ``24 F**2`` in the peak below), GPTQ rounds
:func:`~npquant.calibrate.target.model_target`'s ``W*`` and the scales are
refitted to the codes (:func:`~npquant.calibrate.refit.refit_scales`,
symmetric schemes), as :mod:`npquant.models.calibrated` does for encoders.
By default (``objective=None``, :func:`default_objective`) a model whose
``24 F**2`` is at most :data:`MODEL_OBJECTIVE_BYTES` gets ``"model"`` (up to
``F = 9459``: SmolLM2, Llama-3.2-3B) and a wider one ``"layer"``
(Llama-3-8B's ``F = 14336`` would need 4.9 GB for the three matrices): the
rule reads the config only, so a model gets the same objective on every
machine.

Each quantized layer's row reports the loss of round-to-nearest and of
GPTQ: with ``objective="layer"`` ``tr(dW H dW.T)`` (the mean squared output
error on the calibration tokens) relative to ``tr(W H W.T)``; with
``"model"`` ``||X W.T - X~ Q.T||**2`` relative to ``||X W.T||**2``; and the
seconds GPTQ took.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from ..calibrate import Hessian, hessian_loss
from ..calibrate.gptq import gptq_with_loss
from ..calibrate.refit import refit_scales
from ..calibrate.target import CrossMoment, model_loss, model_target
from ..errors import NpquantError
from ..quantize import quantize
from ..schemes import Scheme, get_scheme
from .causal_lm import CausalLM
from .causal_lm_config import CausalLMConfig

__all__ = ["gptq_decoder", "calibration_windows", "default_objective", "GROUPS", "DEFAULT_SEQ_LEN", "BATCH_TOKENS",
           "MODEL_OBJECTIVE_BYTES"]

#: Tokens per calibration window (each run from position 0).
DEFAULT_SEQ_LEN = 512
#: Tokens per calibration forward call: full windows are grouped this many tokens at a time.
BATCH_TOKENS = 2048

#: The most bytes the model objective's three float64 ``(F, F)`` matrices may take for it to be the default.
MODEL_OBJECTIVE_BYTES = 2 << 30

#: The linears of a decoder layer that share an input, in forward order.
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def calibration_windows(token_ids, seq_len: int = DEFAULT_SEQ_LEN, batch_tokens: int = BATCH_TOKENS) -> list:
    """Cut calibration token ids into windows of ``seq_len``, full ones grouped into batches.

    Returns a list of int64 ``(B, seq_len)`` batches of full windows
    (``max(1, batch_tokens // seq_len)`` to a batch), then the remainder as
    ``(1, r)``, ``0 < r < seq_len``.

    >>> [b.shape for b in calibration_windows(range(10), seq_len=4, batch_tokens=8)]
    [(2, 4), (1, 2)]
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise NpquantError(f"seq_len must be a positive int (tokens per calibration window), got {seq_len!r}")
    ids = np.asarray(list(token_ids), dtype=np.int64)  # (N,)
    if ids.size == 0:
        raise NpquantError("the calibration text has no tokens: give text the model's tokenizer reads")
    n_full = ids.size // seq_len
    full = ids[: n_full * seq_len].reshape(n_full, seq_len)  # (n_full, seq_len)
    per_batch = max(1, batch_tokens // seq_len)
    batches = [full[i:i + per_batch] for i in range(0, n_full, per_batch)]
    if ids.size > n_full * seq_len:
        batches.append(ids[n_full * seq_len:][None, :])  # (1, r)
    return batches


def default_objective(config) -> str:
    """``"model"`` where the model objective's ``24 F**2`` bytes fit :data:`MODEL_OBJECTIVE_BYTES`, else ``"layer"``.

    >>> default_objective({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
    ...     "intermediate_size": 14336, "num_hidden_layers": 1, "num_attention_heads": 2})
    'layer'
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    widest = max(shape[1] for name, shape in cfg.tensor_shapes().items() if name in set(cfg.linear_names()))
    return "model" if 24 * widest ** 2 <= MODEL_OBJECTIVE_BYTES else "layer"


def gptq_decoder(config, weights, schemes, windows, *, observer: str = "minmax", act_order: bool = True,
                 damp: float = 0.01, objective: str | None = None, progress=None, inspect=None):
    """A decoder's linear layers quantized by sequential GPTQ on calibration ``windows``.

    Parameters
    ----------
    config : dict (``config.json``) or CausalLMConfig
    weights : the float model's tensors, as :class:`CausalLM` reads them (a
        mapping such as ``Checkpoint(path).tensors`` or a GGUF model, or a
        callable), read one tensor at a time
    schemes : Scheme or preset name (every decoder-layer linear), or ``{weight
        name: Scheme}`` (weights left out stay float). A weight whose
        ``in_features`` the scheme's group size does not divide stays float
        (listed in ``left``); fp8/fp4 layers are rounded to nearest (no row).
    windows : list of int ``(B, T)`` token arrays (:func:`calibration_windows`)
    observer : {"minmax", "mse"}; act_order, damp : as :func:`~npquant.calibrate.gptq`
    objective : {"layer", "model"} or None (:func:`default_objective`), what each layer reproduces (module docstring)
    progress : ``progress(name, done, total)`` after each weight, or None
    inspect : ``inspect(names, hessian)`` with each group's float64 ``(I, I)``
        Hessian (the mean ``X.T X``) before it is used, or None; it must not
        change it (tests read the Hessians with it)

    Returns
    -------
    quantized : dict, weight name -> QuantizedTensor
    rows : list of dict per GPTQ'd weight: ``name``, ``shape``, ``scheme``,
        ``tokens``, ``rtn_loss``, ``gptq_loss`` (both relative, as the module
        docstring says), ``ratio`` (GPTQ / RTN), ``objective``, ``seconds``
    left : dict, weight name -> why it stays float
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    names = cfg.linear_names()
    if isinstance(schemes, (Scheme, str)):
        scheme = get_scheme(schemes)
        schemes = {name: scheme for name in names}
    else:
        schemes = {name: get_scheme(s) for name, s in schemes.items()}
        unknown = [n for n in schemes if n not in names]
        if unknown:
            raise NpquantError(f"schemes names {unknown[0]!r}, which is not a decoder-layer linear weight of this "
                               f"{cfg.architecture} (e.g. {names[0]!r})")
    if not schemes or all(s.is_float for s in schemes.values()):
        raise NpquantError("GPTQ takes int schemes; fp8 and fp4 are rounded to nearest (method='rtn')")
    if objective is None:
        objective = default_objective(cfg)
    if objective not in ("layer", "model"):
        raise NpquantError(f"objective={objective!r} is not known; expected 'layer' or 'model'")
    windows = _check_windows(windows, cfg.vocab_size)
    shapes = cfg.tensor_shapes()
    quantized: dict = {}
    left: dict[str, str] = {}
    model = CausalLM(cfg, weights, quantized=quantized, backend="numpy")
    xs = [model.embed(ids) for ids in windows]  # (B, T, C) per batch: the next layer's inputs
    reference = CausalLM(cfg, weights, backend="numpy") if objective == "model" else None  # the float model
    xfs = list(xs) if reference is not None else None  # (B, T, C) per batch: the float model's
    tokens = sum(ids.size for ids in windows)
    total = sum(1 for n in names if n in schemes)
    rows: list[dict] = []
    done = 0
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        # The float model's layer runs once: each linear's input kept, its output the next layer's input.
        float_inputs = _float_inputs(reference, i, xfs) if reference is not None else None
        for group in GROUPS:
            group = [prefix + m for m in group if prefix + m + ".weight" in schemes]
            work = []  # the group's weights that GPTQ quantizes (int schemes whose group size fits)
            for module in group:
                name = module + ".weight"
                scheme = schemes[name]
                in_features = shapes[name][1]
                if scheme.granularity == "group" and in_features % scheme.group_size:
                    left[name] = f"group_size={scheme.group_size} does not divide in_features={in_features}"
                elif scheme.is_float:  # GPTQ's feedback is for integer grids: rounded to nearest
                    quantized[name] = quantize(_stored_weight(model, weights, name), scheme, name=name,
                                               observer=observer, backend="numpy")
                else:
                    work.append(module)
                    continue
                done += 1
                if progress is not None:
                    progress(name, done, total)
            if not work:
                continue
            if reference is None:
                h = _hessian(model, i, xs, work[0])  # (I, I), the mean X.T X of the group's input
                moments = None
            else:
                moments = _moments(model, i, xs, float_inputs, work[0])  # (C, H~, H), (I, I) each
                h = moments[1]
            if inspect is not None:
                inspect(tuple(m + ".weight" for m in work), h)
            for k, module in enumerate(work):
                name = module + ".weight"
                scheme = schemes[name]
                w = _stored_weight(model, weights, name)  # (O, I) in its stored float dtype
                start = time.perf_counter()
                rtn_qt = quantize(w, scheme, observer=observer, backend="numpy")
                if moments is None:
                    ref = hessian_loss(w, None, h)
                    rtn = hessian_loss(w, rtn_qt, h)
                    last = k == len(work) - 1  # the group's last use of h: GPTQ may factorise it in place
                    qt, loss = gptq_with_loss(w, h, scheme, act_order=act_order, damp=damp, observer=observer,
                                              overwrite_hessian=last)
                else:
                    cross, h_q, h_f = moments
                    # float32: the scheme carries the scale dtype (a checkpoint's 16-bit one, from the writer)
                    target = model_target(w, cross, h_q)
                    qt, _ = gptq_with_loss(target, h_q, scheme, act_order=act_order, damp=damp, observer=observer)
                    if scheme.symmetric:
                        qt = refit_scales(qt, target, h_q)
                    w32 = w.astype(np.float32)
                    ref = hessian_loss(w32, None, h_f)
                    rtn = model_loss(w32, rtn_qt.dequantize(), cross, h_q, h_f)
                    loss = model_loss(w32, qt.dequantize(), cross, h_q, h_f)
                    del target, w32
                seconds = time.perf_counter() - start
                del w
                quantized[name] = qt
                rel_rtn = rtn / ref if ref > 0 else 0.0
                rel = loss / ref if ref > 0 else 0.0
                rows.append({"name": name, "shape": tuple(qt.shape), "scheme": scheme, "tokens": tokens,
                             "rtn_loss": rel_rtn, "gptq_loss": rel, "ratio": rel / rel_rtn if rel_rtn > 0 else 1.0,
                             "objective": objective, "seconds": seconds})
                done += 1
                if progress is not None:
                    progress(name, done, total)
            del h, moments
        del float_inputs
        for b in range(len(xs)):  # the quantized layer's output feeds the next layer
            xs[b] = model.layer(i, xs[b])
    return quantized, rows, left


def _stored_weight(model: CausalLM, weights, name: str) -> np.ndarray:
    """Weight ``name`` ``(O, I)`` in its stored dtype where that is float16 or bfloat16 (so its scales are that
    dtype's, as ``npquant quantize`` writes them), else as CausalLM reads it (float32, checked)."""
    raw = weights[name] if isinstance(weights, Mapping) else weights(name)
    if hasattr(raw, "read") and not isinstance(raw, np.ndarray):
        raw = raw.read()
    if (isinstance(raw, np.ndarray) and raw.dtype.name in ("float16", "bfloat16")
            and raw.shape == model.config.tensor_shapes()[name]):
        return raw
    return model._tensor(name)


class _Stop(Exception):
    """Raised once the wanted linear has seen its input: the rest of the layer is not needed."""


def _hessian(model: CausalLM, i: int, xs: list, module: str) -> np.ndarray:
    """float64 ``(I, I)``: the mean ``X.T X`` of ``module``'s input, layer ``i`` run on every batch of ``xs``."""
    hess = None

    def watch(name, x):
        nonlocal hess
        if name == module:
            if hess is None:
                hess = Hessian(x.shape[-1])
            hess.add(x)
            raise _Stop

    for x in xs:
        try:
            model.layer(i, x, observe=watch)
        except _Stop:
            pass
    return hess.take()


def _float_inputs(reference: CausalLM, i: int, xfs: list) -> list[dict]:
    """Layer ``i`` of the float ``reference`` on every batch of ``xfs``: per batch ``{module: its input}`` (the
    arrays themselves: :meth:`CausalLM.layer` never writes one it showed ``observe``), and ``xfs`` advanced in
    place to the layer's outputs."""
    out = []
    for b, x in enumerate(xfs):
        seen: dict = {}
        xfs[b] = reference.layer(i, x, observe=seen.__setitem__)
        out.append(seen)
    return out


def _moments(model: CausalLM, i: int, xs: list, float_inputs: list, module: str):
    """``(C, H~, H)`` float64 ``(I, I)`` per token: ``module``'s inputs in layer ``i`` of the quantized ``model``
    (``X~``, run from ``xs``) and the float model's (``X``, from :func:`_float_inputs`): ``X.T X~``, ``X~.T X~``,
    ``X.T X``."""
    moments = None
    for x, seen in zip(xs, float_inputs):
        got = {}

        def watch(name, inp):
            if name == module:
                got["q"] = inp
                raise _Stop

        try:
            model.layer(i, x, observe=watch)
        except _Stop:
            pass
        if moments is None:
            moments = CrossMoment(got["q"].shape[-1])
        moments.add(seen[module], got["q"])
    return moments.matrices()


def _check_windows(windows, vocab_size: int) -> list:
    if isinstance(windows, np.ndarray):
        windows = [windows]
    out = []
    for k, ids in enumerate(windows):
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
            raise NpquantError(f"windows[{k}] must be token ids of shape (B, T), got {ids.dtype} {ids.shape}")
        out.append(ids)
    if not out:
        raise NpquantError("windows is empty: GPTQ needs calibration tokens")
    return out
