"""Make tests/data/ct_fixtures: small checkpoints written by compressed-tensors itself, and its own decompression.

Not run by the tests (they read what it wrote). Needs torch and
compressed-tensors in a separate environment:

    python -m venv /tmp/ct && /tmp/ct/bin/pip install torch==2.13.0 compressed-tensors
    /tmp/ct/bin/python tests/data/make_ct_fixtures.py

For each format and model dtype: seeded weights for three Linear layers;
scales and zero points from compressed-tensors' own ``calculate_qparams``
over the min/max reductions llm-compressor's memoryless min-max observer
takes (per row, per group of a row, whole tensor); codes from the format's
own compressor (``compress``: compressed-tensors' rounding, its full
symmetric range, its zero-point packing); the reference from the same
compressor's ``decompress``. Writes ``<name>/config.json`` (with the
quantization_config compressed-tensors validates), ``<name>/model.safetensors``
and ``<name>/reference/dense.safetensors`` (the dense weights it decompresses to,
in its output dtype). compressed-tensors 0.20.1, torch 2.13.0 made the
committed files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from safetensors.torch import save_file

OUT = Path(__file__).parent / "ct_fixtures"
LAYERS = {"model.layers.0.q_proj": (48, 128), "model.layers.0.down_proj": (64, 256), "model.layers.1.up_proj": (96, 64)}

# name: (format, weights args)
FORMATS = {
    "w4-g32-sym": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}),
    "w4-g32-asym": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}),
    "w8-channel": ("pack-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}),
    "w8-channel-asym": ("pack-quantized", {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}),
    "w3-g64": ("pack-quantized", {"num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}),
    "w2-channel": ("pack-quantized", {"num_bits": 2, "type": "int", "symmetric": True, "strategy": "channel"}),
    "fp8-channel": ("naive-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}),
    "fp8-tensor": ("naive-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}),
}


def minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's memoryless min-max reduction for a weight (out, in)."""
    if str(getattr(args.strategy, "value", args.strategy)) == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if str(getattr(args.strategy, "value", args.strategy)) == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    g = w.reshape(w.shape[0], -1, args.group_size)
    return g.amin(dim=2), g.amax(dim=2)


def weights_for(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, (name, shape) in enumerate(LAYERS.items()):
        w = torch.randn(shape, generator=gen) * (0.02 * (k + 1))
        w[0, 0] = -w.abs().max() * 1.5  # an exact negative maximum: the full symmetric range (-8 for int4)
        w[1, :] = 0.0  # an all-zero row
        w[2, 5] = -0.0
        out[name] = w.to(dtype)
    return out


def make(name: str, fmt: str, args: dict, dtype: torch.dtype) -> None:
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    comp = BaseCompressor.get_value_from_registry(fmt)
    tensors, expected = {}, {}
    for module, w in weights_for(dtype, seed=len(name)).items():
        lo, hi = minmax(w, scheme.weights)
        scale, zp = calculate_qparams(lo, hi, scheme.weights)
        local = {"weight": w, "weight_scale": scale.to(dtype), "weight_zero_point": zp}
        packed = comp.compress(local, scheme)
        for key, value in packed.items():
            if value is not None:
                tensors[f"{module}.{key}"] = value.contiguous()
        dense = comp.decompress({k: v for k, v in packed.items() if v is not None}, scheme)["weight"]
        expected[f"{module}.weight"] = dense.contiguous()
    directory = OUT / f"{name}-{str(dtype).removeprefix('torch.')}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
          "config_groups": {"group_0": scheme.model_dump(exclude_none=False)}, "ignore": []}
    qc["config_groups"]["group_0"]["weights"] = {k: v for k, v in args.items()}
    qc["config_groups"]["group_0"]["weights"].setdefault("group_size", None)
    qc["config_groups"]["group_0"]["weights"]["dynamic"] = False
    QuantizationConfig.model_validate(qc)  # what compressed-tensors accepts
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "reference").mkdir()
    save_file(expected, str(directory / "reference" / "dense.safetensors"))


def main() -> None:
    for name, (fmt, args) in FORMATS.items():
        for dtype in (torch.float32, torch.bfloat16):
            make(name, fmt, args, dtype)
    print(f"wrote {len(FORMATS) * 2} fixtures under {OUT}")


if __name__ == "__main__":
    main()
