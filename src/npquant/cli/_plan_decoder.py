"""``npquant plan`` on a decoder: each unit's measured KL cost per candidate, on calibration text.

:mod:`.plan` sends a Llama-family model directory here (a ``.gguf`` file
arrives as its temporary float32 copy, :mod:`._gguf`). The costs are
:func:`npquant.models.sensitivity_lm.unit_costs`: per unit (q/k/v together,
gate/up together, as vLLM fuses them) and candidate, the mean KL divergence of
the next-token distributions with that unit alone rounded to nearest, on the
built-in calibration text (or ``--calibration``) tokenized by the model's own
tokenizer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import NpquantError
from ._common import Progress, calibration_texts

__all__ = ["is_decoder", "decoder_costs"]


def is_decoder(config: dict) -> bool:
    """Whether ``config`` (a config.json) names an architecture npquant's CausalLM runs."""
    from ..models.causal_lm_config import ARCHITECTURES

    archs = config.get("architectures")
    return isinstance(archs, list) and bool(archs) and archs[0] in ARCHITECTURES


def decoder_costs(args, model, config: dict, units: dict, candidates: dict, method: str):
    """Measured KL costs of a decoder's units: ``(costs, nbytes, cost_kind, calibration, seconds)``.

    ``units``: ``{unit: [weight names]}`` (:func:`npquant.plan.fused_units`);
    ``candidates``: ``{label: Scheme}``. Units outside the decoder layers
    (none in the supported architectures) cost 0. ``costs`` and ``nbytes``
    are keyed by unit.
    """
    from ..models.sensitivity_lm import DEFAULT_COST_TOKENS, calibration_batches, unit_costs
    from ..plan import layer_bytes
    from ..safetensors_io import Checkpoint

    if method in ("gptq", "awq+gptq"):
        then = "the plan records method rtn" if method == "gptq" else f"quantize --plan runs {method}"
        print("npquant plan: note: GPTQ costs are not measured for decoders yet: each unit is measured rounded to "
              f"nearest (RTN); {then}", file=sys.stderr)
    tokens = DEFAULT_COST_TOKENS if args.tokens is None else args.tokens
    if tokens < 2:
        raise NpquantError(f"--tokens must be at least 2 (one token to condition on, one to predict), got {tokens}")
    tokenizer = _tokenizer(Path(model), args.model)
    texts = calibration_texts(args)
    batches = calibration_batches(tokenizer, texts, tokens)
    n_tokens = sum(b.size for b in batches)
    scored = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    inside = {u: m for u, m in units.items() if all(n.startswith("model.layers.") for n in m)}
    steps = 0
    with Checkpoint(model) as ckpt:
        shapes = {n: ckpt.tensors[n].shape for m in units.values() for n in m}
        for members in inside.values():
            steps += sum(all(layer_bytes(shapes[n], s) is not None for n in members) for s in candidates.values())
        start = time.monotonic()
        with Progress(steps, "units", unit="steps", prefix="measuring ") as bar:
            costs, nbytes = unit_costs(config, ckpt.tensors, batches, candidates, units=inside,
                                       observer=args.observer,
                                       progress=lambda unit, label, done, total: bar(f"{unit} {label}", 1))
        seconds = time.monotonic() - start
    for unit, members in units.items():
        if unit not in inside:
            nbytes[unit] = {label: sum(layer_bytes(shapes[n], s) for n in members) for label, s in candidates.items()
                            if all(layer_bytes(shapes[n], s) is not None for n in members)}
            costs[unit] = {label: 0.0 for label in nbytes[unit]}
    source = f"--calibration {args.calibration}" if args.calibration else "npquant's built-in calibration text"
    kind = (f"output: mean KL(float32 || quantized) of the next-token distributions at {scored:,} positions of "
            f"{source} ({n_tokens:,} tokens, windows of up to {max(b.shape[1] for b in batches)}), each unit alone rounded to nearest "
            f"(RTN costs), every other weight float32; q/k/v and gate/up are one unit each, as vLLM fuses them")
    calibration = {"texts": len(texts), "file": args.calibration, "tokens": n_tokens, "positions": scored}
    return costs, nbytes, kind, calibration, seconds


def _tokenizer(root: Path, given):
    """The model's own tokenizer (tokenizer.json in ``root``), or one line saying why not."""
    path = root / "tokenizer.json"
    if not path.is_file():
        raise NpquantError(f"MODEL {given} has no tokenizer.json: a decoder's costs are measured on calibration "
                           f"text tokenized by the model's own tokenizer")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise NpquantError("planning a decoder needs the tokenizers package: pip install 'npquant[models]'") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises its own exception type
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NpquantError(f"{path} is not a tokenizers tokenizer: {first}") from None
