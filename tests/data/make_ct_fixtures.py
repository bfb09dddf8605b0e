"""Make tests/data/ct_fixtures: small checkpoints written by compressed-tensors itself, and its own decompression.

Not run by the tests (they read what it wrote). Needs torch and
compressed-tensors in a separate environment:

    python -m venv /tmp/ct && /tmp/ct/bin/pip install torch==2.13.0 compressed-tensors
    /tmp/ct/bin/python tests/data/make_ct_fixtures.py

and, for the act-order ``weight_g_idx`` checkpoints only 0.18 and earlier wrote:

    /tmp/ct/bin/pip install --no-deps -t /tmp/ct18 compressed-tensors==0.18.0
    PYTHONPATH=/tmp/ct18 /tmp/ct/bin/python tests/data/make_ct_fixtures.py

For each format and model dtype: seeded weights for three Linear layers;
scales and zero points from compressed-tensors' own ``calculate_qparams``
over the min/max reductions llm-compressor's memoryless min-max observer
takes (per row, per group of a row, whole tensor); codes from the format's
own compressor (``compress``: compressed-tensors' rounding, its full
symmetric range, its zero-point packing); the reference from the same
compressor's ``decompress``. Writes ``<name>/config.json`` (with the
quantization_config compressed-tensors validates), ``<name>/model.safetensors``
and ``<name>/reference/dense.safetensors`` (the dense weights it decompresses to,
in its output dtype) and ``<name>/source/model.safetensors`` (the weights it
quantized, for checking npquant's writer). compressed-tensors 0.20.1, torch 2.13.0 made the
committed files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
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
    "w8-g32": ("pack-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}),
    "w4a16-actorder-weight": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                                 "group_size": 32, "actorder": "weight"}),
    "w8a8-int": ("int-quantized", "W8A8"),
    "w8-channel-naive": ("naive-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}),
    "nvfp4": ("nvfp4-pack-quantized", "NVFP4A16"),
    "mxfp4": ("mxfp4-pack-quantized", "MXFP4A16"),
    "mxfp6": ("mxfp6-pack-quantized", "MXFP6A16"),
    "mxfp8": ("mxfp8-quantized", "MXFP8A16"),
    "fp8-block": ("float-quantized", "FP8_BLOCK"),
    "fp8-block-a16": ("naive-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                                          "block_structure": [128, 128]}),
}
# Block formats also get a layer whose shape the 128 x 128 blocks do not divide.
RAGGED = {"model.layers.1.o_proj": (200, 300)}


def minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """llm-compressor's memoryless min-max reduction for a weight (out, in)."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "tensor":
        return w.min().reshape(1), w.max().reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if strategy == "block":  # blocks of W zero-padded to whole blocks
        bh, bw = args.block_structure
        rows, cols = -(-w.shape[0] // bh) * bh, -(-w.shape[1] // bw) * bw
        padded = torch.zeros((rows, cols), dtype=w.dtype)
        padded[: w.shape[0], : w.shape[1]] = w
        b = padded.reshape(rows // bh, bh, cols // bw, bw)
        return b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
    g = w.reshape(w.shape[0], -1, args.group_size)
    return g.amin(dim=2), g.amax(dim=2)


def weights_for(dtype: torch.dtype, seed: int, block: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, (name, shape) in enumerate({**LAYERS, **(RAGGED if block else {})}.items()):
        w = torch.randn(shape, generator=gen) * (0.02 * (k + 1))
        w[0, 0] = -w.abs().max() * 1.5  # an exact negative maximum: the full symmetric range (-8 for int4)
        w[1, :] = 0.0  # an all-zero row
        w[2, 5] = -0.0
        w[3, 7] = -1e-9  # a tiny negative: the formats' sign-of-zero rules
        w[4, 16:48] = 0.0  # an all-zero group of 16 and of 32
        w[5, :32] = w[5, :32] * 1e-37  # a group whose maximum is subnormal in float32 and bfloat16 (about 1e-39)
        out[name] = w.to(dtype)
    return out


def compress_module(module: str, w: torch.Tensor, scheme, tensors: dict, expected: dict) -> None:
    """One module through compressed-tensors: qparams, its format's compress and decompress; adds to both dicts."""
    comp = BaseCompressor.get_value_from_registry(scheme.format)
    lo, hi = minmax(w, scheme.weights)
    local = {"weight": w}
    gs = None
    if scheme.weights.strategy == "tensor_group":  # NVFP4: one float32 global scale over the tensor
        gs = generate_gparam(w.min(), w.max())
        local["weight_global_scale"] = gs
    scale, zp = calculate_qparams(lo, hi, scheme.weights, global_scale=gs)
    local.update({"weight_scale": scale.to(w.dtype) if scale.dtype != torch.float8_e4m3fn else scale,
                  "weight_zero_point": zp})
    packed = comp.compress(local, scheme)
    for key, value in packed.items():
        if value is not None:
            tensors[f"{module}.{key}"] = value.contiguous()
    dense = comp.decompress({k: v for k, v in packed.items() if v is not None}, scheme)["weight"]
    expected[f"{module}.weight"] = dense.contiguous()


def save(name: str, qc: dict, tensors: dict, expected: dict, source: dict) -> None:
    """``<name>/config.json``, ``model.safetensors``, ``reference/dense.safetensors`` and ``source/model.safetensors``."""
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}, indent=2))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "reference").mkdir()
    save_file(expected, str(directory / "reference" / "dense.safetensors"))
    (directory / "source").mkdir()
    save_file({f"{m}.weight": w.contiguous() for m, w in source.items()}, str(directory / "source" / "model.safetensors"))


def make(name: str, fmt: str, args: dict | str, dtype: torch.dtype) -> None:
    if isinstance(args, str):  # a compressed-tensors preset
        scheme = preset_name_to_scheme(args, ["Linear"])
        scheme.format = fmt
    else:
        scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    tensors, expected = {}, {}
    block = scheme.weights.strategy == "block"
    source = weights_for(dtype, seed=len(name), block=block)
    for module, w in source.items():
        compress_module(module, w, scheme, tensors, expected)
    qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
          "config_groups": {"group_0": json.loads(scheme.model_dump_json())}, "ignore": []}
    QuantizationConfig.model_validate(qc)  # what compressed-tensors accepts
    save(f"{name}-{str(dtype).removeprefix('torch.')}", qc, tensors, expected, source)


def make_mixed(dtype: torch.dtype) -> None:
    """A mixed-precision checkpoint: int4 by regex, NVFP4 by exact name, MXFP8 by class name (the last group), one ignored."""
    groups = [
        ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
         ["re:.*q_proj$"]),
        ("nvfp4-pack-quantized", "NVFP4A16", ["model.layers.0.down_proj"]),
        ("mxfp8-quantized", "MXFP8A16", ["Linear"]),
    ]
    ignore = ["model.layers.1.o_proj"]
    schemes = []
    for fmt, args, targets in groups:
        if isinstance(args, str):
            sch = preset_name_to_scheme(args, targets)
            sch.format = fmt
        else:
            sch = QuantizationScheme(targets=targets, weights=args, format=fmt)
        schemes.append(sch)
    owner = {"model.layers.0.q_proj": 0, "model.layers.0.down_proj": 1, "model.layers.1.up_proj": 2}
    tensors, expected = {}, {}
    source = weights_for(dtype, seed=7, block=True)
    for module, w in source.items():
        if module in ignore:
            tensors[f"{module}.weight"] = w.contiguous()
            expected[f"{module}.weight"] = w.contiguous()
            continue
        compress_module(module, w, schemes[owner[module]], tensors, expected)
    qc = {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
          "config_groups": {f"group_{k}": json.loads(s.model_dump_json()) for k, s in enumerate(schemes)},
          "ignore": ignore}
    QuantizationConfig.model_validate(qc)
    save(f"mixed-{str(dtype).removeprefix('torch.')}", qc, tensors, expected, source)


def make_g_idx(dtype: torch.dtype) -> None:
    """An int4 group-32 checkpoint with act-order ``weight_g_idx``, as compressed-tensors 0.18 wrote it.

    Groups are column sets ``{j : g_idx[j] = g}`` of a seeded permutation (each of
    32 columns); each group's scale is its columns' min/max through
    ``calculate_qparams``; codes and the reference from 0.18's own pack-quantized
    compressor, which quantizes and dequantizes column j with group g_idx[j].
    """
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "actorder": "group"}
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    tensors, expected = {}, {}
    gen = torch.Generator().manual_seed(18)
    source = weights_for(dtype, seed=18)
    for module, w in source.items():
        cols = w.shape[1]
        g_idx = (torch.randperm(cols, generator=gen) // 32).to(torch.int32)
        n_groups = cols // 32
        lo = torch.stack([w[:, g_idx == g].amin(dim=1) for g in range(n_groups)], dim=1)
        hi = torch.stack([w[:, g_idx == g].amax(dim=1) for g in range(n_groups)], dim=1)
        scale, zp = calculate_qparams(lo, hi, scheme.weights)
        local = {"weight": w, "weight_scale": scale.to(dtype), "weight_zero_point": zp, "weight_g_idx": g_idx}
        packed = comp.compress(dict(local), scheme)
        for key, value in packed.items():
            if value is not None:
                tensors[f"{module}.{key}"] = value.contiguous()
        if f"{module}.weight_g_idx" not in tensors:
            tensors[f"{module}.weight_g_idx"] = g_idx
        dense = comp.decompress({k: v for k, v in packed.items() if v is not None} | {"weight_g_idx": g_idx}, scheme)
        expected[f"{module}.weight"] = dense["weight"].contiguous()
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {"group_0": json.loads(scheme.model_dump_json())}, "ignore": [], "version": "0.18.0"}
    save(f"w4-g32-actorder-group-v0.18-{str(dtype).removeprefix('torch.')}", qc, tensors, expected, source)


def main() -> None:
    import compressed_tensors

    if compressed_tensors.__version__.startswith("0.18"):
        # PYTHONPATH=<compressed-tensors 0.18.0 installed with --no-deps> python tests/data/make_ct_fixtures.py
        for dtype in (torch.float32, torch.bfloat16):
            make_g_idx(dtype)
        print(f"wrote the act-order g_idx fixtures under {OUT}")
        return
    for name, (fmt, args) in FORMATS.items():
        for dtype in (torch.float32, torch.bfloat16):
            make(name, fmt, args, dtype)
    for dtype in (torch.float32, torch.bfloat16):
        make_mixed(dtype)
    print(f"wrote {len(FORMATS) * 2 + 2} fixtures under {OUT}")


if __name__ == "__main__":
    main()
