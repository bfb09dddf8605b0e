"""Decompress an npquant checkpoint with the real compressed-tensors library and compare with npquant.load.

Run it in a separate environment that has torch and compressed-tensors
(npquant needs neither, CI neither):

    python -m venv /tmp/ct && /tmp/ct/bin/pip install torch==2.13.0 compressed-tensors
    /tmp/ct/bin/pip install -e .            # npquant, for the comparison
    /tmp/ct/bin/python benchmarks/check_compressed_tensors.py OUT_DIR [MODEL]

For every quantized module: compressed-tensors' own decompressor for the
module's config group (its registered format, the group's scheme) against
``npquant.load(OUT_DIR)[name].dequantize()``, bit for bit (in float32, or
rounded once to bfloat16 where compressed-tensors decompresses to it: MX and
NVFP4). Also runs the model-free ``CompressedTensorsDequantizer`` over the
whole state dict and compares again. With MODEL (the checkpoint OUT_DIR was
made from, for the presets that follow compressed-tensors' rules: the
symmetric int presets on the full grid (w4-g128, w4-g64, w4-g32, w8-channel,
w3-g128, w2-g64, ...), nvfp4, mxfp4, mxfp6, mxfp8, fp8-block; float32,
bfloat16 or float16 models): quantizes each layer with compressed-tensors'
own calculate_qparams (memoryless min-max reductions, as llm-compressor's
round-to-nearest W4A16 does) and compressor, and compares every tensor with
OUT_DIR's, byte for byte. Prints one line per module and a summary; exits 1
on any difference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) not in (2, 3):
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
            dense_t = comp.decompress(local, scheme)["weight"]
            mine = _as_theirs(ours[name].dequantize(), dense_t.dtype)
            dense = dense_t.to(torch.float32).numpy()
            same = dense.shape == mine.shape and np.array_equal(dense.view(np.uint32), mine.view(np.uint32))
            checked += 1
            bad += not same
            diff = "" if same else f" max |diff| {float(np.abs(dense - mine).max()):.3e}"
            print(f"{'ok ' if same else 'BAD'} {gname} {fmt:<16} {module} {tuple(mine.shape)}{diff}")
    dense_sd = CompressedTensorsDequantizer(str(root), dtype=torch.float32).process(dict(sd))
    model_free_bad = 0
    for name, qt in ours.items():
        d_t = dense_sd[name]
        # MX and NVFP4 decompress through bfloat16 (also when asked for float32), int and fp8 through the dtype of
        # their scales (a bfloat16 or float16 model's)
        module = name[: -len(".weight")]
        scale_dtype = sd[f"{module}.weight_scale"].dtype
        through = torch.bfloat16 if qt.scheme.scale_dtype in ("fp8_e4m3", "e8m0") else scale_dtype
        mine = _as_theirs(qt.dequantize(), torch.bfloat16 if d_t.dtype == torch.bfloat16 else through)
        d = d_t.to(torch.float32).numpy()
        model_free_bad += not np.array_equal(d.view(np.uint32), mine.view(np.uint32))
    print(f"{checked} modules through each group's compressor: {checked - bad} bit-equal to npquant.load, {bad} not")
    print(f"model-free CompressedTensorsDequantizer: {len(ours) - model_free_bad} of {len(ours)} bit-equal")
    written_bad = _compare_writer(Path(sys.argv[2]), cfg, sd) if len(sys.argv) == 3 else 0
    return 1 if bad or model_free_bad or written_bad else 0


def _as_theirs(mine, dtype):
    """npquant's float32 weight rounded once to ``dtype`` (torch's bfloat16 or float16) as float32, or itself.

    compressed-tensors multiplies code by scale in that dtype; npquant's float32 product of the same code and
    scale is exact (at most 8 + 11 significant bits), so one rounding gives compressed-tensors' value.
    """
    import ml_dtypes
    import numpy as np
    import torch

    to = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16}.get(dtype)
    return mine if to is None else mine.astype(to).astype(np.float32)


def _compare_writer(model: Path, cfg, sd) -> int:
    """compressed-tensors' own compression of MODEL's weights against OUT_DIR's tensors, byte for byte."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    from safetensors.torch import load_file

    source = {}
    for f in sorted(model.glob("*.safetensors")):
        source.update(load_file(str(f)))
    scheme = next(iter(cfg.config_groups.values()))
    args = scheme.weights
    comp = BaseCompressor.get_value_from_registry(scheme.format or cfg.format)
    modules = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith((".weight_scale",))})
    bad = 0
    for module in modules:
        w = source[f"{module}.weight"]
        strategy = str(getattr(args.strategy, "value", args.strategy))
        if strategy == "block":
            bh, bw = args.block_structure
            rows, cols = -(-w.shape[0] // bh) * bh, -(-w.shape[1] // bw) * bw
            padded = torch.zeros((rows, cols), dtype=w.dtype)
            padded[: w.shape[0], : w.shape[1]] = w
            b = padded.reshape(rows // bh, bh, cols // bw, bw)
            lo, hi = b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
        else:  # group: (O, I / G, G); channel: one group of the whole row
            g = w.reshape(w.shape[0], -1, args.group_size if strategy in ("group", "tensor_group") else w.shape[1])
            lo, hi = g.amin(dim=2), g.amax(dim=2)
        local = {"weight": w}
        gs = None
        if strategy == "tensor_group":
            gs = generate_gparam(w.min(), w.max())
            local["weight_global_scale"] = gs
        scale, zp = calculate_qparams(lo, hi, args, global_scale=gs)
        local.update({"weight_scale": scale if scale.dtype == torch.float8_e4m3fn else scale.to(w.dtype),
                      "weight_zero_point": zp})
        theirs = {k: v for k, v in comp.compress(local, scheme).items() if v is not None}
        same = all(
            f"{module}.{k}" in sd and sd[f"{module}.{k}"].dtype == v.dtype and sd[f"{module}.{k}"].shape == v.shape
            and sd[f"{module}.{k}"].contiguous().view(torch.uint8).equal(v.contiguous().view(torch.uint8))
            for k, v in theirs.items()
        )
        bad += not same
        print(f"{'ok ' if same else 'BAD'} written {module}: {sorted(theirs)}")
    print(f"{len(modules)} modules compressed by compressed-tensors from {model}: {len(modules) - bad} byte-equal "
          f"to the checkpoint, {bad} not")
    return bad


if __name__ == "__main__":
    raise SystemExit(main())
