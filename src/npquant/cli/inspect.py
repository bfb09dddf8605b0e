"""``npquant inspect``: the quantized modules of any tool's compressed-tensors directory."""

from __future__ import annotations

import json

__all__ = ["add_parser", "run", "module_rows"]


def add_parser(sub) -> None:
    """The ``inspect`` subcommand and its options."""
    ins = sub.add_parser(
        "inspect",
        help="read a compressed-tensors checkpoint (any tool's) and list its quantized modules",
        description=(
            "Load a compressed-tensors directory as npquant.load does (every weight format of compressed-tensors "
            "0.20: pack-quantized int2-8 with zero points or act-order weight_g_idx, int-, naive- and "
            "float-quantized, fp8 blocks, NVFP4, MXFP4/6/8, mixed-precision configs), checking every tensor "
            "against the config, and list each module's codes, scales, shape and bytes. A broken or "
            "inconsistent checkpoint is refused with one line naming the module and tensor."
        ),
    )
    ins.add_argument("path", metavar="DIR", help="a compressed-tensors model directory (config.json + safetensors)")
    ins.add_argument("--json", action="store_true", help="print the modules as JSON")
    ins.set_defaults(run=run)


def module_rows(tensors) -> list[dict]:
    """One dict per quantized module of ``{name: QuantizedTensor}``: codes, blocks, scales, the activations'
    rule (``"float"``: weight-only), shape, bytes."""
    rows = []
    for name, qt in tensors.items():
        s = qt.scheme
        rows.append({
            "module": name[: -len(".weight")],
            "codes": s.dtype if s.is_float else f"int{s.bits}" + ("" if s.symmetric else " asym"),
            "blocks": {"tensor": "tensor", "channel": "channel", "group": f"group {s.group_size}",
                       "block": "block " + "x".join(map(str, s.block_size or ()))}[s.granularity],
            "scales": s.scale_dtype + (" x global" if qt.global_scale is not None else ""),
            "activations": {None: "float", "int8-token": "int8 per token", "fp8-token": "fp8 per token"}.get(
                s.activations, s.activations),
            "act_order": qt.perm is not None,
            "shape": list(qt.shape),
            "bits_per_weight": round(qt.bits_per_weight, 4),
            "bytes": qt.nbytes,
        })
    return rows


def run(args) -> int:
    from .. import render
    from ..checkpoints import load

    rows = module_rows(load(args.path))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    render.print_inspect(f"{args.path}: {len(rows)} quantized modules, {sum(r['bytes'] for r in rows):,} bytes", rows)
    return 0
