"""llm-compressor's own round-to-nearest checkpoint of a model against npquant's, tensor by tensor, byte for byte.

Run it in a separate environment that has torch, transformers and
llm-compressor (npquant needs none of them, CI neither):

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor ml_dtypes
    npquant quantize MODEL -o OURS --scheme w4-g128                  # in npquant's own environment
    PYTHONPATH=src /tmp/llmc/bin/python benchmarks/check_llm_compressor.py MODEL OURS [SCHEME]

llm-compressor quantizes MODEL (a transformers directory; its float dtype
kept) with ``QuantizationModifier(targets="Linear", scheme=SCHEME)``,
SCHEME ``W4A16`` by default (int4, symmetric, groups of 128: npquant's
``w4-g128``; ``W8A16`` is ``w8-g128``; ``W8A8`` is ``w8a8-int8`` and
``FP8_DYNAMIC`` ``w8a8-fp8``, whose activations are dynamic and store
nothing), data-free (its memoryless min-max
observer: round to nearest), and saves it compressed into a temporary
directory. Every tensor of each module npquant quantized
(``weight_packed``, ``weight_scale``, ``weight_shape``, or ``weight`` where a
module has a ``weight_scale`` beside it: int-quantized and float-quantized) is compared with
llm-compressor's, dtype, shape and bytes; a module one side quantized and
the other did not counts as a difference. Prints one line per module and a
summary; exits 1 on any difference.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__)
        return 2
    model, ours_dir = Path(sys.argv[1]), Path(sys.argv[2])
    scheme = sys.argv[3] if len(sys.argv) == 4 else "W4A16"
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModel

    net = AutoModel.from_pretrained(str(model), torch_dtype="auto")
    oneshot(model=net, recipe=QuantizationModifier(targets="Linear", scheme=scheme))
    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(tmp, save_compressed=True)
        theirs = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            theirs.update(load_file(str(f)))
    ours = {}
    for f in sorted(ours_dir.glob("*.safetensors")):
        ours.update(load_file(str(f)))
    prefix = _prefix(theirs, ours)
    suffixes = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")
    modules = sorted({k.rsplit(".", 1)[0] for k in ours if k.endswith(suffixes)}
                     | {k[len(prefix):].rsplit(".", 1)[0] for k in theirs if k.endswith(suffixes)})
    bad = 0
    for module in modules:
        names = sorted({k.rsplit(".", 1)[1] for k in ours if k.startswith(module + ".") and k.endswith(suffixes)}
                       | {k.rsplit(".", 1)[1] for k in theirs
                          if k.startswith(prefix + module + ".") and k.endswith(suffixes)})
        if f"{module}.weight_packed" not in ours and f"{prefix}{module}.weight_packed" not in theirs:
            names.append("weight")  # int-quantized, float-quantized: the codes are the module's weight itself
        diffs = []
        for n in names:
            a, b = ours.get(f"{module}.{n}"), theirs.get(f"{prefix}{module}.{n}")
            if a is None or b is None:
                diffs.append(f"{n} only in {'llm-compressor' if a is None else 'npquant'}")
            elif a.dtype != b.dtype or a.shape != b.shape:
                diffs.append(f"{n} {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
            elif not a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)):
                diffs.append(f"{n} bytes differ")
        bad += bool(diffs)
        print(f"{'BAD' if diffs else 'ok '} {module}: {', '.join(diffs) if diffs else ', '.join(names)}")
    print(f"{len(modules)} modules of {model} ({scheme}, llm-compressor round to nearest): "
          f"{len(modules) - bad} byte-equal to {ours_dir}, {bad} not")
    return 1 if bad or not modules else 0


def _prefix(theirs: dict, ours: dict) -> str:
    """The prefix transformers put before the checkpoint's own names on save (e.g. ``bert.``), or ``""``."""
    for key in theirs:
        for cut in range(len(key)):
            if key[cut:] in ours and not key[cut:].endswith((".weight_packed", ".weight_scale")):
                return key[:cut]
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
