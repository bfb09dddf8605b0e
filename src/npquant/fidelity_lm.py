"""What quantizing a decoder's linear layers does to its next-token predictions.

For each scheme, the decoder's linear layers (every ``*_proj`` weight of its
decoder layers; the embedding, the norms and the head stay float32) are
rounded to nearest (RTN) and the model is run on the same token windows as
the float32 model. Compared at every scored position (each position of a
window but its last, which has no next token to predict):

- **perplexity** ``exp(-mean log p(next token))``, of each model;
- **KL divergence** ``KL(float || quantized) = sum_v p_v (log p_v - log q_v)``
  of the two next-token distributions over the whole vocabulary, averaged
  over the positions;
- **top-1 agreement**: the share of positions whose most likely next token
  is the same for both models.

These are what llama.cpp's ``llama-perplexity --kl-divergence`` reports.
With a calibrated ``method`` (``"gptq"``, ``"awq"``, ``"awq+gptq"``) each int
scheme is also measured with its layers quantized by it on calibration
windows of other text.
Log-softmax, KL and the sums run in float64 on the float32 logits, a block of
positions at a time, so the ``(N, V)`` logits are never held whole.

Text is cut into windows of ``context`` tokens, each run from position 0 on
its own (no state carries from one window to the next), as llama.cpp and
transformers' perplexity recipe do; perplexity depends on ``context``, so
compare figures at one context only. Nothing here prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from importlib import resources

import numpy as np

from ._checks import stat_text_file
from .errors import NpquantError
from .models.calibrated_lm import gptq_decoder
from .models.causal_lm import CausalLM
from .models.causal_lm_config import CausalLMConfig
from .quantize import quantize
from .schemes import Scheme, get_scheme

__all__ = [
    "DEFAULT_LM_SCHEMES",
    "LM_METHODS",
    "DEFAULT_CONTEXT",
    "eval_text",
    "read_text",
    "token_windows",
    "log_softmax",
    "kl_divergence",
    "compare_logits",
    "perplexity",
    "evaluate_lm",
]

#: Schemes ``npquant eval`` measures on a decoder by default.
DEFAULT_LM_SCHEMES = ("w8-channel", "fp8-channel", "w4-g128", "w4-g32", "w4-g128-asym", "nvfp4", "mxfp4")

#: The methods :func:`evaluate_lm` measures beside round to nearest.
LM_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
#: Tokens per window (each window is run from position 0 on its own).
DEFAULT_CONTEXT = 512
#: Tokens per forward call: full windows are run this many tokens at a time (one progress step each).
BATCH_TOKENS = 2048
#: Largest user text read whole (the built-in one is ~40 KB).
MAX_TEXT_BYTES = 64 << 20
# float64 logits per block of positions in the comparison: 2**21 (16 MiB), a few such arrays at a time.
_BLOCK_ELEMENTS = 1 << 21


# --- text and windows ------------------------------------------------------------------------------------
def eval_text() -> str:
    """The built-in evaluation text: ~40 KB of English prose written for npquant (UTF-8).

    Several domains (science, history, instructions, dialogue, code with its
    comments, news, fiction, letters), paragraphs separated by blank lines;
    no sentence and no 8-word span of it is in the calibration text
    (``npquant/data/calibration.txt``), which a test checks.

    >>> len(eval_text()) > 30000
    True
    """
    return resources.files("npquant").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def read_text(path, what: str = "--text") -> str:
    """The whole of a UTF-8 text file (a user's evaluation text), refused in one line when unusable.

    Refused: a missing path, a directory or anything not a regular file
    (a FIFO would block), a file over :data:`MAX_TEXT_BYTES`, one that is not
    UTF-8, one that holds only whitespace.
    """
    st = stat_text_file(path, what, "give a UTF-8 text file")
    if st.st_size > MAX_TEXT_BYTES:
        raise NpquantError(f"{what} {path} holds {st.st_size:,} bytes, over {MAX_TEXT_BYTES >> 20} MiB; "
                           f"a few thousand tokens are plenty: pass a smaller file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise NpquantError(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise NpquantError(f"{what} {path} is not UTF-8 text: {exc.reason}") from None
    if len(text) > MAX_TEXT_BYTES:  # grew while read
        raise NpquantError(f"{what} {path} holds over {MAX_TEXT_BYTES >> 20} MiB of text; pass a smaller file")
    if not text.strip():
        raise NpquantError(f"{what} {path} holds no text")
    return text


def token_windows(token_ids, context: int = DEFAULT_CONTEXT, max_tokens: int | None = None,
                  batch_tokens: int = BATCH_TOKENS) -> list[np.ndarray]:
    """Cut a stream of token ids into windows of ``context`` tokens, grouped into batches.

    Parameters
    ----------
    token_ids : sequence of int, 1-D
        The text's ids, in order (a tokenizer's ``encode(text).ids``).
    context : int >= 2
        Tokens per window.
    max_tokens : int >= 2 or None
        Use the first ``max_tokens`` ids only (None: all).
    batch_tokens : int
        Full windows are grouped ``max(1, batch_tokens // context)`` to a batch.

    Returns
    -------
    list of int64 arrays ``(B, T)``: the full windows ``(B, context)`` in
    batches, then the remainder ``(1, r)`` where ``2 <= r < context`` (a last
    single token, with nothing to predict it from in its window, is dropped).
    Each window scores ``T - 1`` tokens.

    >>> [b.shape for b in token_windows(range(11), context=4, batch_tokens=8)]
    [(2, 4), (1, 3)]
    >>> [b.shape for b in token_windows(range(9), context=4)]
    [(2, 4)]
    """
    for name, value, low in (("context", context, 2), ("batch_tokens", batch_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise NpquantError(f"{name} must be an int >= {low}, got {value!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 2):
        raise NpquantError(f"max_tokens must be an int >= 2 (one token to condition on, one to predict), "
                           f"got {max_tokens!r}")
    ids = np.asarray(list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise NpquantError(f"token_ids must be a 1-D sequence of ints, got shape {ids.shape} of {ids.dtype}")
    ids = ids.astype(np.int64)[:max_tokens]
    if ids.size < 2:
        raise NpquantError(f"the evaluation text is {ids.size} token{'s' if ids.size != 1 else ''} long; "
                           f"it needs at least 2 (one to condition on, one to predict): give a longer text")
    n_full = ids.size // context
    full = ids[: n_full * context].reshape(n_full, context)  # (n_full, context)
    per_batch = max(1, batch_tokens // context)
    batches = [full[i:i + per_batch] for i in range(0, n_full, per_batch)]
    rest = ids[n_full * context:]
    if rest.size >= 2:
        batches.append(rest[None, :])  # (1, r)
    return batches


# --- the measures ----------------------------------------------------------------------------------------
def log_softmax(logits) -> np.ndarray:
    """float64 ``(..., V)``: ``log softmax`` of ``logits`` ``(..., V)`` (any float dtype) over its last axis.

    >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 6)
    array([0.25, 0.75])
    """
    x = _float_array(logits, "logits").astype(np.float64)  # a new array
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_divergence(ref_logits, logits) -> np.ndarray:
    """float64 ``(...)``: ``KL(p || q)`` at each position, ``p = softmax(ref_logits)``, ``q = softmax(logits)``.

    Both ``(..., V)``; the divergence of the quantized model's next-token
    distribution ``q`` from the float model's ``p``, in nats. Exactly 0 where
    the two rows are equal.

    >>> float(kl_divergence(np.zeros(4), np.zeros(4)))
    0.0
    """
    ref_logits, logits = _same_shape(ref_logits, logits)
    return _kl(log_softmax(ref_logits), log_softmax(logits))


def compare_logits(ref_logits, logits, targets) -> dict[str, np.ndarray]:
    """Per position: the float and quantized models' log-probs of the next token, their KL, top-1 agreement.

    Parameters
    ----------
    ref_logits, logits : float ``(N, V)``
        The float model's and the quantized model's logits at ``N`` positions.
    targets : int ``(N,)``
        The next token at each position, in ``[0, V)``.

    Returns
    -------
    dict of ``(N,)`` arrays: ``"log_prob_reference"`` and ``"log_prob"``
    (float64, the targets' log-probs), ``"kl"`` (float64, ``KL(ref || model)``),
    ``"same_top1"`` (bool: the argmax of the two rows is the same token).
    """
    ref_logits, logits = _same_shape(ref_logits, logits)
    if ref_logits.ndim != 2:
        raise NpquantError(f"logits must have shape (N, V), got {ref_logits.shape}")
    N, V = ref_logits.shape
    targets = np.asarray(targets)
    if targets.shape != (N,) or targets.dtype.kind not in "iu":
        raise NpquantError(f"targets must be ints of shape ({N},), got {targets.dtype} {targets.shape}")
    if N and (targets.min() < 0 or targets.max() >= V):
        raise NpquantError(f"targets must lie in [0, V={V}), got {int(targets.min())}..{int(targets.max())}")
    lp_ref = log_softmax(ref_logits)  # (N, V)
    lp = log_softmax(logits)  # (N, V)
    rows = np.arange(N)
    return {
        "log_prob_reference": lp_ref[rows, targets],
        "log_prob": lp[rows, targets],
        "kl": _kl(lp_ref, lp),
        "same_top1": ref_logits.argmax(axis=1) == logits.argmax(axis=1),
    }


def perplexity(log_probs) -> float:
    """``exp(-mean(log_probs))`` of the next-token log-probs (any shape), the mean taken in float64.

    >>> round(perplexity(np.log([0.5, 0.25])), 6)  # exp(-(ln 1/2 + ln 1/4) / 2) = sqrt(8)
    2.828427
    """
    lp = _float_array(log_probs, "log_probs")
    if lp.size == 0:
        raise NpquantError("perplexity needs at least one log-prob, got none")
    return float(math.exp(-np.mean(lp, dtype=np.float64)))


# --- the evaluation --------------------------------------------------------------------------------------
def evaluate_lm(config, weights, batches, schemes=None, *, backend: str = "auto", progress=None,
                method: str = "rtn", calibration=None, observer: str = "minmax",
                objective: str | None = None, smooth: float | None = None) -> list[dict]:
    """Run the float32 decoder and, per scheme, its linear layers rounded to nearest, on the same windows.

    With a calibrated ``method``, each int scheme also gets a row with its
    layers quantized by it on the ``calibration`` windows (int ``(B, T)``
    arrays, which must be other text than ``batches``), right after its RTN
    row: ``"gptq"``, sequential GPTQ
    (:func:`npquant.models.calibrated_lm.gptq_decoder`); ``"awq"`` and
    ``"awq+gptq"``, AWQ's scales folded into the model, then round to nearest
    or GPTQ (:func:`npquant.models.awq_calibrated_lm.awq_decoder`); fp8 and
    fp4 schemes get their RTN row only.

    Parameters
    ----------
    config : dict (``config.json``) or :class:`~npquant.models.causal_lm_config.CausalLMConfig`
    weights : the float model's tensors, as :class:`~npquant.models.CausalLM` reads them
        (a mapping such as a GGUF model from ``read_gguf``, or a callable).
        Read again for each scheme, one tensor at a time.
    batches : list of int ``(B, T)`` arrays, ``T >= 2``
        Token windows (:func:`token_windows`); each row is run from position 0.
    schemes : preset names or Schemes (default :data:`DEFAULT_LM_SCHEMES`)
        Every ``*_proj`` weight is quantized by :func:`npquant.quantize`; a
        layer whose ``in_features`` a scheme's group size does not divide
        stays float32 (as ``npquant quantize`` leaves it), listed in the row.
    backend : {"auto", "numpy", "numba"}, for quantizing and the quantized linears
    progress : called as ``progress(label, tokens)`` after each batch of each model (and as
        ``progress(label, 0)`` after each layer GPTQ quantizes)
    method : {"rtn", "gptq", "awq", "awq+gptq"}
    calibration : list of int ``(B, T)`` arrays, the calibration windows (calibrated methods only)
    observer : {"minmax", "mse"}, GPTQ's block ranges
    objective : {"layer", "model"} or None (the model's default), what GPTQ reproduces
        (:func:`~npquant.models.calibrated_lm.gptq_decoder`)
    smooth : float in [0, 1] or None: SmoothQuant's ``alpha``; each W8A8 scheme also gets a row (method
        ``"smoothquant"``) rounded to nearest after the model is smoothed on the ``calibration`` windows
        (:func:`~npquant.models.smooth_lm.smooth_decoder`)

    Returns
    -------
    rows : list of dict, the float32 row first, then one per scheme:
        ``scheme`` (label), ``method`` (None for float32, ``"rtn"`` or the calibrated method),
        ``bits_per_weight`` (storage bits of the linear layers, scales
        included; float32 layers count 32), ``tokens`` (scored positions),
        ``perplexity``, ``perplexity_ratio`` (to float32's), ``mean_kl``
        (nats), ``top1_agreement`` (share of positions), ``left_float``
        (linear weights left float32, with the reason), ``layers`` (linear weights in all)
    """
    cfg = config if isinstance(config, CausalLMConfig) else CausalLMConfig.from_json(config)
    resolved = [(s if isinstance(s, str) else str(s), get_scheme(s)) for s in (schemes or DEFAULT_LM_SCHEMES)]
    batches = _check_batches(batches)
    if method not in LM_METHODS:
        raise NpquantError(f"method={method!r} is not known; expected one of {LM_METHODS}")
    if method != "rtn" or smooth is not None:
        if calibration is None:
            what = f"method={method!r}" if method != "rtn" else "smooth"
            raise NpquantError(f"{what} needs calibration windows (calibration=[int (B, T) arrays])")
        calibration = _check_batches(calibration, "calibration", min_tokens=1)
    elif calibration is not None:
        raise NpquantError("calibration windows are for a calibrated method (gptq, awq, awq+gptq) or smooth")
    if smooth is not None and not any(scheme.activations for _, scheme in resolved):
        raise NpquantError("smooth is for W8A8 schemes (w8a8-int8, w8a8-fp8), whose activations are quantized: "
                           "none was given")
    reference = CausalLM(cfg, weights, backend=backend)
    names = cfg.linear_names()
    shapes = cfg.tensor_shapes()
    n_weights = sum(shapes[n][0] * shapes[n][1] for n in names)

    # The float model: its hidden states at the scored positions are kept (N C floats: 18 MB for 8k tokens
    # of SmolLM2) so each scheme re-runs only the head on them, never the float layers.
    hidden, targets, lp_sum, n_tokens = [], [], 0.0, 0
    for ids in batches:
        B, T = ids.shape
        h = reference.hidden_states(ids)[:, :-1].reshape(B * (T - 1), -1)  # (N, C): positions that predict
        t = ids[:, 1:].reshape(-1)  # (N,)
        for s in _blocks(len(t), cfg.vocab_size):
            lp = log_softmax(reference.head(h[s]))  # (n, V)
            lp_sum += float(lp[np.arange(len(lp)), t[s]].sum())
        hidden.append(h)
        targets.append(t)
        n_tokens += len(t)
        if progress is not None:
            progress("float32", len(t))
    float_ppl = math.exp(-lp_sum / n_tokens)
    rows = [{"scheme": "float32", "method": None, "bits_per_weight": 32.0, "tokens": n_tokens,
             "perplexity": float_ppl, "perplexity_ratio": 1.0, "mean_kl": 0.0, "top1_agreement": 1.0,
             "left_float": {}, "layers": len(names)}]

    runs = [run for label, scheme in resolved
            for run in [(label, scheme, "rtn")] + ([(label, scheme, method)] if method != "rtn" and not scheme.is_float
                                                   else [])
            + ([(label, scheme, "smoothquant")] if smooth is not None and scheme.activations else [])]
    smoothed = None
    for label, scheme, how in runs:
        stored: dict[str, int] = {}  # weight name -> bytes of its quantized form
        left: dict[str, str] = {}  # weight name -> why it stays float32
        tick = None if progress is None else (lambda name, done, total, tag=f"{label} {how.upper()}": progress(tag, 0))
        if how == "gptq":
            quantized, _, left = gptq_decoder(cfg, weights, scheme, calibration, observer=observer,
                                              objective=objective, progress=tick)
            stored = {name: qt.nbytes for name, qt in quantized.items()}
            model = CausalLM(cfg, weights, quantized=quantized, backend=backend)
        elif how in ("awq", "awq+gptq"):
            from .models.awq_calibrated_lm import awq_decoder

            quantized, replaced, _, left = awq_decoder(cfg, weights, scheme, calibration, method=how,
                                                       observer=observer, objective=objective, progress=tick)
            stored = {name: qt.nbytes for name, qt in quantized.items()}
            model = CausalLM(cfg, _overlay(weights, replaced), quantized=quantized, backend=backend)
        elif how == "smoothquant":
            if smoothed is None:  # once for every W8A8 scheme: the float model smoothed
                from .models.smooth_lm import smooth_decoder

                smoothed = smooth_decoder(cfg, weights, calibration, alpha=smooth)
            model = CausalLM(cfg, _overlay(weights, smoothed), quantizer=_rtn(scheme, backend, stored, left),
                             backend=backend)
        else:
            model = CausalLM(cfg, weights, quantizer=_rtn(scheme, backend, stored, left), backend=backend)
        lp_sum = kl_sum = same = 0.0
        for ids, h_ref, t in zip(batches, hidden, targets):
            B, T = ids.shape
            h = model.hidden_states(ids)[:, :-1].reshape(B * (T - 1), -1)  # (N, C)
            for s in _blocks(len(t), cfg.vocab_size):
                c = compare_logits(reference.head(h_ref[s]), model.head(h[s]), t[s])
                lp_sum += float(c["log_prob"].sum())
                kl_sum += float(c["kl"].sum())
                same += int(c["same_top1"].sum())
            if progress is not None:
                progress(label if how == "rtn" else f"{label} {how.upper()}", len(t))
        nbytes = sum(stored.values()) + sum(4 * shapes[n][0] * shapes[n][1] for n in left)
        ppl = math.exp(-lp_sum / n_tokens)
        rows.append({"scheme": label, "method": how, **({"alpha": smooth} if how == "smoothquant" else {}),
                     "bits_per_weight": 8.0 * nbytes / n_weights,
                     "tokens": n_tokens, "perplexity": ppl, "perplexity_ratio": ppl / float_ppl,
                     "mean_kl": kl_sum / n_tokens, "top1_agreement": same / n_tokens,
                     "left_float": dict(left), "layers": len(names)})
        del model
    return rows


# --- helpers ---------------------------------------------------------------------------------------------
def _overlay(weights, replaced: dict):
    """A callable source: ``replaced[name]`` (AWQ's folded float tensors) where present, else ``weights``'s."""
    if not replaced:
        return weights

    def read(name: str):
        if name in replaced:
            return replaced[name]
        return weights[name] if isinstance(weights, Mapping) else weights(name)

    return read


def _rtn(scheme: Scheme, backend: str, stored: dict, left: dict):
    """A CausalLM quantizer: round each linear weight to nearest, noting its bytes (or why it stays float)."""

    def quantizer(name: str, w: np.ndarray):
        in_features = w.shape[1]
        if scheme.granularity == "group" and in_features % scheme.group_size:
            left[name] = f"group_size={scheme.group_size} does not divide in_features={in_features}"
            return None
        qt = quantize(w, scheme, name=name, backend=backend)
        stored[name] = qt.nbytes
        return qt

    return quantizer


def _kl(lp_ref: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """``sum_v exp(lp_ref) (lp_ref - lp)`` over the last axis (float64 log-probs)."""
    return np.einsum("...v,...v->...", np.exp(lp_ref), lp_ref - lp)


def _blocks(n: int, vocab_size: int):
    """Slices of ``range(n)`` holding at most ``_BLOCK_ELEMENTS`` logits each."""
    step = max(1, _BLOCK_ELEMENTS // vocab_size)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _float_array(x, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise NpquantError(f"{what} must be a float array, got {x.dtype}")
    return x


def _same_shape(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _float_array(a, "ref_logits"), _float_array(b, "logits")
    if a.shape != b.shape or a.ndim < 1 or a.shape[-1] < 1:
        raise NpquantError(f"ref_logits and logits must have one shape (..., V), got {a.shape} and {b.shape}")
    return a, b


def _check_batches(batches, what: str = "batches", min_tokens: int = 2) -> list[np.ndarray]:
    if isinstance(batches, np.ndarray):
        batches = [batches]
    out = []
    for i, ids in enumerate(batches):
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < min_tokens or ids.dtype.kind not in "iu":
            raise NpquantError(f"{what}[{i}] must be token ids of shape (B, T) with T >= {min_tokens}, "
                               f"got {ids.dtype} {ids.shape}")
        out.append(ids)
    if not out:
        raise NpquantError(f"{what} is empty: give at least one window of {min_tokens} or more tokens")
    return out
