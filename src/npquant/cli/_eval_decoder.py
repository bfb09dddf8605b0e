"""``npquant eval MODEL`` on a decoder: perplexity, mean KL and top-1 agreement per scheme (RTN, GPTQ, AWQ).

:mod:`.eval` sends a ``.gguf`` file or a Llama-family directory here. The
model is read as :class:`~npquant.models.CausalLM` reads it (a GGUF file
through :func:`~npquant.checkpoints.gguf.read_gguf`, one tensor dequantized
at a time; a directory through its safetensors), the text tokenized by the
model's own tokenizer and cut into windows, and the measures taken by
:func:`npquant.fidelity_lm.evaluate_lm`; the table is printed here. With
a calibrated ``--method`` (gptq, awq, awq+gptq) the calibration texts (``--calibration``, ``--max-samples``;
the built-in set by default) are tokenized the same way, joined by newlines
and cut into windows of 512 tokens (or ``max_position_embeddings``), and
each int scheme gets a row for the method beside its RTN row. A calibration text
found in the evaluation text is refused: a figure measured on calibration
text is no figure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress, calibration_texts, model_tokenizer, need_matplotlib
from ._gguf import lossy_note

__all__ = ["run_decoder"]


def run_decoder(args) -> int:
    """The decoder path of ``npquant eval`` (its options checked before the model is read)."""
    from ..fidelity_lm import DEFAULT_CONTEXT, DEFAULT_LM_SCHEMES, eval_text, evaluate_lm, read_text, token_windows
    from ..models.calibrated_lm import DEFAULT_SEQ_LEN, calibration_windows
    from ..schemes import get_scheme

    # Everything the user can get wrong is refused before the model is read.
    encoder_only = [(flag, value) for flag, value in (
        ("--sentences", args.sentences), ("--plan", args.plan), ("--batch-size", args.batch_size),
    ) if value is not None]
    method = args.method or "rtn"
    if encoder_only:
        flag = encoder_only[0][0]
        hint = "; a decoder reads --text FILE" if flag == "--sentences" else ""
        raise NpquantError(f"{flag} is not available for decoders yet{hint}")
    smooth = getattr(args, "smooth", None)
    if smooth is not None and not 0 <= smooth <= 1:
        raise NpquantError(f"--smooth must be in [0, 1] (SmoothQuant's migration strength; 0.5 its default), got "
                           f"{smooth}")
    if method == "rtn" and (args.observer is not None or getattr(args, "objective", None) is not None):
        raise NpquantError("--observer and --objective are for a calibrated --method (decoders are rounded to "
                           "nearest with the minmax observer)")
    if method == "rtn" and smooth is None and (args.calibration or args.max_samples is not None):
        raise NpquantError("--calibration and --max-samples are for a calibrated --method or --smooth (decoders "
                           "are rounded to nearest)")
    if method == "awq" and getattr(args, "objective", None) is not None:
        raise NpquantError("--objective is for the GPTQ methods (--method gptq or awq+gptq)")
    texts = calibration_texts(args) if method != "rtn" or smooth is not None else None  # refused before the model
    labels = args.scheme or list(DEFAULT_LM_SCHEMES)
    for label in labels:
        get_scheme(label)  # unknown presets, before the model is read
    if smooth is not None and not any(get_scheme(label).activations for label in labels):
        raise NpquantError("--smooth is for W8A8 schemes, whose activations are quantized: add --scheme w8a8-int8 "
                           "or --scheme w8a8-fp8")
    if args.context is not None and args.context < 2:
        raise NpquantError(f"--context must be at least 2 tokens (one to condition on, one to predict), "
                           f"got {args.context}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise NpquantError(f"--max-tokens must be at least 2 (one token to condition on, one to predict), "
                           f"got {args.max_tokens}")
    if args.plot:
        need_matplotlib()
    text = read_text(args.text) if args.text else eval_text()

    with _open_decoder(args.model) as (config, weights, tokenizer, facts):
        limit = config.get("max_position_embeddings")
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 2 else None
        context = args.context or (DEFAULT_CONTEXT if limit is None else min(DEFAULT_CONTEXT, limit))
        if limit is not None and context > limit:
            raise NpquantError(f"--context {context} is longer than the model's max_position_embeddings={limit}")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        where = f"--text {args.text}" if args.text else "the built-in evaluation text"
        if len(ids) < 2:
            raise NpquantError(f"{where} is {len(ids)} token{'s' if len(ids) != 1 else ''} long; scoring needs "
                               f"at least 2 (one to condition on, one to predict)")
        batches = token_windows(ids, context, args.max_tokens)
        calibration = None
        if texts is not None:
            _check_disjoint(texts, text, args)
            seq_len = DEFAULT_SEQ_LEN if limit is None else min(DEFAULT_SEQ_LEN, limit)
            calib_ids = tokenizer.encode("\n".join(texts), add_special_tokens=False).ids
            calibration = calibration_windows(calib_ids, seq_len)
            what = " and ".join(([method.upper()] if method != "rtn" else []) + (
                [f"SmoothQuant (alpha {smooth})"] if smooth is not None else []))
            facts["calibration"] = (f"{what} calibrated on {len(calib_ids):,} tokens of "
                                    f"{args.calibration or 'the built-in calibration text'} ({len(texts)} texts) in "
                                    f"windows of up to {seq_len}, disjoint from the evaluation text")
        n_windows = sum(b.shape[0] for b in batches)
        n_scored = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
        header = (f"{Path(args.model).name}: {config['architectures'][0]}, {facts['layers']} decoder layers; "
                  f"{where}, {sum(b.size for b in batches):,} of its {len(ids):,} tokens in {n_windows} "
                  f"window{'s' if n_windows != 1 else ''} of up to {context}, {n_scored:,} tokens scored")
        objective = None
        if method in ("gptq", "awq+gptq"):
            from ..models.calibrated_lm import default_objective

            objective = args.objective or default_objective(config)
            facts["objective"] = (f"GPTQ objective: {objective} (" + (
                "each layer keeps the float model's output there, scales refitted" if objective == "model" else
                "each layer keeps its own output on the quantized inputs") + ("; the default for this model's width"
                                                                              if args.objective is None else "")
                + "; --objective layer|model)")
        start = time.monotonic()
        n_gptq = sum(1 for label in labels if not get_scheme(label).is_float) if method != "rtn" else 0
        n_smooth = sum(1 for label in labels if get_scheme(label).activations) if smooth is not None else 0
        with Progress((1 + len(labels) + n_gptq + n_smooth) * n_scored, "scoring", unit="steps") as bar:
            rows = evaluate_lm(config, weights, batches, labels, backend=args.backend,
                               progress=lambda label, n: bar(label, n), method=method, calibration=calibration,
                               observer=args.observer or "minmax", objective=objective, smooth=smooth)
        seconds = time.monotonic() - start
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        _print_decoder(rows, header, facts, seconds)
    if args.plot:
        _plot_decoder(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _check_disjoint(texts: list[str], text: str, args) -> None:
    """Refuse calibration texts found in the evaluation text (whitespace-normalised; texts of 24+ characters)."""
    flat = " ".join(text.split())
    shared = [t for t in texts if len(t) >= 24 and " ".join(t.split()) in flat]
    if shared:
        where = f"--text {args.text}" if args.text else "the built-in evaluation text"
        raise NpquantError(f"{len(shared)} calibration text{'s' if len(shared) > 1 else ''} of "
                           f"{args.calibration or 'the built-in set'} also occur in {where} (e.g. {shared[0][:60]!r}): "
                           f"a figure measured on calibration text is no figure; make --calibration and --text "
                           f"disjoint")


class _open_decoder:
    """``with _open_decoder(path) as (config, weights, tokenizer, facts)``: a GGUF file or a model directory.

    ``facts``: ``{"layers": int, "gguf_types": {type: count} or None, "lossy": {type: count}}``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._close = None

    def __enter__(self):
        if self.path.suffix.lower() == ".gguf":
            from ..checkpoints.gguf import read_gguf

            model = read_gguf(self.path)
            self._close = model.close
            facts = {"gguf_types": model.types, "lossy": model.lossy}
            config, weights, tokenizer = model.config, model, model.tokenizer()
        else:
            config, weights, tokenizer = self._directory()
            facts = {"gguf_types": None, "lossy": {}}
        facts["layers"] = config.get("num_hidden_layers")
        return config, weights, tokenizer, facts

    def _directory(self):
        from ..models.causal_lm_config import CausalLMConfig
        from ..safetensors_io import Checkpoint

        ckpt = Checkpoint(self.path)
        self._close = ckpt.close
        config = ckpt.config
        if "quantization_config" in config:
            raise NpquantError(f"MODEL {self.path} is quantized already (config.json has a quantization_config): "
                               f"eval compares a float model with its quantized forms; give the float model")
        CausalLMConfig.from_json(config)  # an unsupported architecture: one line naming the supported ones
        tokenizer = model_tokenizer(self.path, "evaluating", "eval tokenizes the text")
        return config, ckpt.tensors, tokenizer

    def __exit__(self, *exc):
        if self._close is not None:
            self._close()


def _print_decoder(rows, header: str, facts: dict, seconds: float) -> None:
    """The decoder table: float32 first, then each scheme (RTN), and what the figures rest on."""
    from .. import render

    out = render.console()
    out.print(header, highlight=False)
    out.print(f"float32 perplexity: {rows[0]['perplexity']:.4f}", highlight=False)
    columns = [(h, "left" if h in ("scheme", "method") else "right")
               for h in ("scheme", "method", "bits/w", "perplexity", "vs float32", "mean KL", "top-1 agreement")]
    cells = [[r["scheme"], (r["method"] or "-").upper(), f"{r['bits_per_weight']:.3g}", f"{r['perplexity']:.4f}",
              f"{r['perplexity_ratio']:.4f}", "0" if r["mean_kl"] == 0 else f"{r['mean_kl']:.4g}",
              f"{100 * r['top1_agreement']:.2f}%"] for r in rows]
    methods = " and ".join(sorted({r["method"].upper() for r in rows[1:]}, reverse=True))
    render.print_rows(out, f"next-token predictions, {rows[0]['tokens']:,} tokens: quantized ({methods}) vs float32",
                      columns, cells, long=0)
    for r in rows[1:]:
        if r["left_float"] and r["method"] == "rtn":
            reasons = sorted(set(r["left_float"].values()))
            out.print(f"{r['scheme']}: {len(r['left_float'])} of {r['layers']} linear weights stay float32 "
                      f"({'; '.join(reasons)}), as npquant quantize leaves them", highlight=False)
    out.print("mean KL: KL(float32 || quantized) of the next-token distributions, in nats; top-1 agreement: "
              "positions whose most likely next token is unchanged", highlight=False)
    if facts.get("calibration"):
        out.print(facts["calibration"], highlight=False)
    if facts.get("objective"):
        out.print(facts["objective"], highlight=False)
    if facts["lossy"]:
        line = f"note: float32 is this GGUF's weights, {lossy_note(facts['lossy'])}"
        if "Q4_1" in facts["lossy"]:
            # Measured on SmolLM2 (docs/calibration.md): a 4-bit asymmetric group-32 scheme is not lossless here.
            line += ("; Q4_1's own grid (4-bit codes in blocks of 32, an fp16 scale and minimum) would be lossless, "
                     "but npquant's asymmetric int4 rounds the minimum to an integer zero point, off that grid")
        out.print(line, highlight=False)
    out.print(f"took {seconds:.0f} s", highlight=False)


def _plot_decoder(rows, path: str) -> None:
    """Mean KL per scheme (log scale), each bar labelled with its bits/weight and perplexity ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = rows[1:]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(q) + 2), 4))
    xs = range(len(q))
    ax.bar(list(xs), [max(r["mean_kl"], 1e-12) for r in q], width=0.6, label="mean KL (nats)")
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['scheme']}{'' if r['method'] == 'rtn' else ' ' + r['method'].upper()}"
                        f"\n{r['bits_per_weight']:.2f} b/w"
                        f"\nppl x{r['perplexity_ratio']:.3f}" for r in q])
    ax.set_ylabel("KL(float32 || quantized), lower is better")
    ax.set_title(f"Quantized vs float32 next-token distributions, {rows[0]['tokens']:,} tokens")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
