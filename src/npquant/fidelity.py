"""What quantizing a sentence encoder's linear layers does to its embeddings.

For each scheme: the cosine similarity of every sentence's quantized
embedding to its float32 embedding (mean, minimum, the worst sentences), and
top-1 retrieval agreement: the share of sentences whose nearest neighbour
among the others (by cosine) is the same with the quantized encoder as with
the float32 one. Nothing here prints.
"""

from __future__ import annotations

import numpy as np

from .errors import NpquantError
from .schemes import get_scheme

__all__ = ["SENTENCES", "evaluate", "has_method_row", "read_sentences", "DEFAULT_EVAL_SCHEMES", "EVAL_METHODS"]

DEFAULT_EVAL_SCHEMES = ("w8-channel", "fp8-channel", "w4-g128", "w4-g32", "w3-g128")

#: The methods :func:`evaluate` compares with round to nearest (as :data:`npquant.models.METHODS`).
EVAL_METHODS = ("rtn", "gptq", "awq", "awq+gptq")


def read_sentences(path) -> list[str]:
    """One sentence per line of a UTF-8 text file; blank lines are skipped."""
    from .calibrate.data import read_text_lines

    sentences = read_text_lines(path, "--sentences")
    if len(sentences) < 2:
        raise NpquantError(f"--sentences {path} needs at least 2 non-empty lines, found {len(sentences)}")
    return sentences


def has_method_row(scheme, method: str, objective: str = "model") -> bool:
    """Whether :func:`evaluate` gives ``scheme`` a row for ``method`` beside its RTN row: int schemes for every
    calibrated method; fp8 too where GPTQ's model objective rounds their float target."""
    if method == "rtn":
        return False
    return not get_scheme(scheme).is_float or (objective == "model" and method in ("gptq", "awq+gptq"))


def evaluate(encoder, schemes=None, sentences=None, batch_size: int = 32, progress=None, *, method: str = "rtn",
             calibration=None, observer: str = "minmax", objective: str = "model",
             plans=None) -> tuple[list[dict], dict]:
    """Compare the float32 encoder's embeddings with each quantized encoder's.

    Parameters
    ----------
    encoder : SentenceEncoder (float32)
    schemes : preset names or Schemes (default :data:`DEFAULT_EVAL_SCHEMES`)
    sentences : list of str (default :data:`SENTENCES`)
    progress : called as ``progress(label)`` after each encoder has run
    method : {"rtn", "gptq", "awq", "awq+gptq"}
        A calibrated method: each int scheme twice, rounded to nearest (label
        ``"<scheme>"``) and with the method (``"<scheme> gptq"``, ``"<scheme> awq"``,
        ``"<scheme> awq+gptq"``; see :meth:`SentenceEncoder.quantized`), calibrated on
        ``calibration`` (default: the built-in calibration texts, disjoint from
        :data:`SENTENCES`).
    observer : {"minmax", "mse"}, for every quantized encoder
    objective : {"model", "layer"}, what the GPTQ methods reproduce (:meth:`SentenceEncoder.quantized`)
    plans : list of ``(label, {layer: scheme}, method, observer)``, or None
        Per-layer schemes (a size plan's) evaluated after the presets.

    Returns
    -------
    rows : one dict per scheme, a float32 row first: ``scheme``,
        ``bits_per_weight`` (linear layers), ``model_bytes`` (every tensor),
        ``mean_cosine``, ``min_cosine``, ``top1_agreement``, ``worst``
        (the 3 lowest-cosine sentences as ``{"sentence", "cosine"}``)
    base : ``{"sentences": [...], "embeddings": float32 (n, C)}``
    """
    if method not in EVAL_METHODS:
        raise NpquantError(f"method={method!r} is not known; expected one of {EVAL_METHODS}")
    sentences = list(SENTENCES if sentences is None else sentences)
    if len(sentences) < 2:
        raise NpquantError("evaluation needs at least 2 sentences")
    names = list(schemes or DEFAULT_EVAL_SCHEMES)
    resolved = [(n if isinstance(n, str) else str(n), get_scheme(n)) for n in names]
    base = encoder.encode(sentences, batch_size=batch_size)
    base_nn = _nearest(base)
    if progress is not None:
        progress("float32")
    rows = [_row("float32", encoder, base, base, base_nn, sentences)]
    runs = []
    for label, scheme in resolved:
        runs.append((label, scheme, "rtn", observer))
        if has_method_row(scheme, method, objective):
            runs.append((f"{label} {method}", scheme, method, observer))
    runs += list(plans or [])
    for label, scheme, how, obs in runs:
        q = encoder.quantized(scheme, method=how, calibration=calibration, observer=obs, objective=objective)
        emb = q.encode(sentences, batch_size=batch_size)
        rows.append(_row(label, q, emb, base, base_nn, sentences))
        if progress is not None:
            progress(label)
    return rows, {"sentences": sentences, "embeddings": base}


def _nearest(emb: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine (rows are unit vectors)."""
    sims = emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def _row(label, enc, emb, base, base_nn, sentences) -> dict:
    cos = (emb.astype(np.float64) * base.astype(np.float64)).sum(axis=1)
    worst = np.argsort(cos)[:3]
    return {
        "scheme": label,
        "bits_per_weight": enc.linear_bits_per_weight,
        "model_bytes": enc.nbytes,
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float(np.mean(_nearest(emb) == base_nn)),
        "worst": [{"sentence": sentences[i], "cosine": float(cos[i])} for i in worst],
    }


_LONG = (
    "Quantization stores each weight of a neural network with fewer bits than the thirty-two of a float, "
    "keeping a scale per tensor, per output channel or per group of inputs so that the codes can be mapped back "
    "to real numbers when the layer runs; the fewer the bits, the smaller and faster the model, and the larger "
    "the rounding error that every matrix multiplication carries forward into the next layer, which is why "
    "practitioners measure the error layer by layer, compare the outputs of the quantized model with those of "
    "the original on real inputs, and choose per-channel scales for eight-bit integers, groups of one hundred "
    "and twenty-eight inputs for four-bit integers, and floating-point eight-bit formats when the hardware "
    "supports them, always checking that the memory saved is worth the accuracy lost on the task that matters, "
    "whether that task is retrieval, classification, translation, summarisation or open-ended generation, and "
    "always remembering that outliers in a few channels can dominate the scale and crush the resolution of all "
    "the others unless they are handled separately, rescaled, or kept in higher precision by design. "
    "This sentence keeps going well past the two hundred and fifty-six tokens that the encoder reads, so "
    "everything after that point is cut off by the tokenizer before the model ever sees it, exactly as the "
    "reference library does it."
)

#: Built-in evaluation sentences: paraphrase pairs on varied topics (so that
#: nearest neighbours mean something), short and long, punctuation, accents,
#: numbers, all caps, and one longer than the encoder's 256 tokens.
SENTENCES = (
    "A man is playing a guitar on stage.",
    "A musician performs a song with his guitar in front of an audience.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "How do I reset my password?",
    "I forgot my password and need to change it.",
    "The stock market fell sharply on Monday.",
    "Shares dropped steeply at the start of the week.",
    "She is baking bread for the family dinner.",
    "Fresh loaves are in the oven for tonight's meal.",
    "The train to Zürich leaves at 7:45 from platform 3.",
    "Our 07:45 departure for Zurich is on track three.",
    "Café au lait, crème brûlée et pâtisseries françaises !",
    "French pastries, coffee with milk and caramelised custard.",
    "WARNING: HIGH VOLTAGE. DO NOT TOUCH!",
    "Danger, electric current; keep your hands off.",
    "The meeting was moved to Thursday, 14 March 2024.",
    "We rescheduled the meeting for March 14th, a Thursday.",
    "Photosynthesis turns sunlight, water and CO2 into sugar.",
    "Plants make glucose from light, water and carbon dioxide.",
    "He scored 3 goals in the final 10 minutes!!!",
    "A hat-trick late in the match sealed the win.",
    "Is it going to rain tomorrow?",
    "What's the weather forecast for tomorrow?",
    "The patient's blood pressure was 120/80 mmHg.",
    "Her blood pressure reading was normal.",
    "Python lists are mutable; tuples are not.",
    "In Python you can change a list but not a tuple.",
    "The Eiffel Tower is 330 metres tall.",
    "Paris's iron tower rises about a thousand feet.",
    "I'd like two tickets for the 8 p.m. show, please.",
    "Can I book a pair of seats for the evening performance?",
    "The bridge was closed after the earthquake.",
    "Authorities shut the bridge because of the quake damage.",
    "Ñandú, jalapeño, São Paulo, Kraków, Øresund.",
    "Names with accents: Kraków, São Paulo and the Øresund strait.",
    "Quarterly revenue grew 12% to $4.2 billion.",
    "The company's sales rose twelve percent this quarter.",
    "A dog chases a red ball across the park.",
    "The puppy runs after its ball on the grass.",
    "Turn left at the second traffic light.",
    "Take the next left after two sets of lights.",
    "The vaccine trial enrolled 30,000 volunteers.",
    "Thousands of people joined the clinical study of the vaccine.",
    "OK.",
    "Fine, agreed.",
    "Neural networks can be compressed by quantizing their weights.",
    "Storing model weights in fewer bits makes networks smaller.",
    "The library closes at 6 pm on Sundays.",
    "On Sunday evenings the library shuts at six.",
    "She won the chess tournament without losing a game.",
    "Undefeated, she took first place at the chess championship.",
    "Mix 2 cups of flour with 1 cup of sugar.",
    "Combine flour and sugar in a two-to-one ratio.",
    "The spacecraft entered orbit around Mars.",
    "A probe reached Martian orbit successfully.",
    "Why is the sky blue?",
    "What makes the sky look blue during the day?",
    _LONG,
    "A very long explanation of why weight quantization trades accuracy for memory.",
)
