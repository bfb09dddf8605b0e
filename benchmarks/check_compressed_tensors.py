"""Decompress an npquant checkpoint with the real compressed-tensors library and compare with npquant.load.

Run it in a separate environment that has torch and compressed-tensors
(npquant needs neither, CI neither):

    python -m venv /tmp/ct && /tmp/ct/bin/pip install torch==2.13.0 compressed-tensors
    /tmp/ct/bin/pip install -e .            # npquant, for the comparison
    /tmp/ct/bin/python benchmarks/check_compressed_tensors.py OUT_DIR

For every quantized module: compressed-tensors' own decompressor for the
module's config group (its registered format, the group's scheme) against
``npquant.load(OUT_DIR)[name].dequantize()``, bit for bit in float32. Also
runs the model-free ``CompressedTensorsDequantizer`` over the whole state
dict and compares again. Prints one line per module and a summary; exits 1
on any difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    root = Path(sys.argv[1])
    import numpy as np
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    import npquant

    config = json.loads((root / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(config)
    sd = {}
    for f in sorted(root.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    ours = npquant.load(root)
    bad = 0
    checked = 0
    import re

    modules = [n[: -len(".weight")] for n in ours]
    exact = {t for g in cfg.config_groups.values() for t in g.targets}
    for gname, scheme in cfg.config_groups.items():
        fmt = scheme.format or config["format"]
        comp = BaseCompressor.get_value_from_registry(fmt)
        # Exact names as written; a class name such as "Linear" claims the modules no exact name does.
        claimed = [m for m in modules if m in scheme.targets
                   or any(t.startswith("re:") and re.match(t[3:], m) for t in scheme.targets)
                   or (m not in exact and any(t[:1].isupper() and "." not in t for t in scheme.targets))]
        for module in claimed:
            name = f"{module}.weight"
            local = {p: sd[f"{module}.{p}"] for p in comp.compression_param_names(scheme) if f"{module}.{p}" in sd}
            # compressed-tensors decompresses to the scale dtype; ours are float32 scales.
            dense = comp.decompress(local, scheme)["weight"].to(torch.float32).numpy()
            mine = ours[name].dequantize()
            same = dense.shape == mine.shape and np.array_equal(dense.view(np.uint32), mine.view(np.uint32))
            checked += 1
            bad += not same
            diff = "" if same else f" max |diff| {float(np.abs(dense - mine).max()):.3e}"
            print(f"{'ok ' if same else 'BAD'} {gname} {fmt:<16} {module} {tuple(mine.shape)}{diff}")
    dense_sd = CompressedTensorsDequantizer(str(root), dtype=torch.float32).process(dict(sd))
    model_free_bad = 0
    for name, qt in ours.items():
        d = dense_sd[name].to(torch.float32).numpy()
        model_free_bad += not np.array_equal(d.view(np.uint32), qt.dequantize().view(np.uint32))
    print(f"{checked} modules through each group's compressor: {checked - bad} bit-equal to npquant.load, {bad} not")
    print(f"model-free CompressedTensorsDequantizer: {len(ours) - model_free_bad} of {len(ours)} bit-equal")
    return 1 if bad or model_free_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
