"""Decoder GPTQ's peak memory: two Llama-3-8B-shaped layers in bfloat16 from disk, through npquant quantize.

Writes a synthetic LlamaForCausalLM (hidden 4096, MLP 14336, 32 heads of 128
with 8 key/value heads, a vocabulary of 2048 so that the layers dominate, tied
embeddings; random bfloat16 weights, about 0.9 GB) with a word-level
tokenizer into a temporary directory, then runs

    npquant quantize MODEL -o OUT --method gptq --scheme w4-g128 --calibration FILE --seq-len 128 --objective layer

in a child process: sequential GPTQ over both layers (q/k/v, o, gate/up,
down_proj, whose Hessian is 14336 x 14336) and the checkpoint written. This
process samples the child's RssAnon every 5 ms and reads its ru_maxrss
(``os.wait4``) when it ends: ru_maxrss also counts the pages of the
memory-mapped input that the child touched (RssFile), which the kernel can
drop at any time; RssAnon is what the process allocated.

    python benchmarks/bench_gptq_decoder.py            # the 8B-shaped layers (minutes on 2 cores)
    python benchmarks/bench_gptq_decoder.py --quick    # hidden 1024, MLP 3584: a smoke test

It prints the peak against the formula of npquant.models.calibrated_lm,
``8 F**2 + 8 F C + 64 MiB + 4 N C + Q + forward + base`` (``F`` MLP width,
``C`` hidden, ``N`` calibration tokens, ``Q`` the packed quantized tensors,
``forward`` one batch's activations, ``base`` the interpreter and its
libraries, measured here as a child that imports what the run imports),
and the target of 3 GB for the full size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30


def write_model(root: Path, hidden: int, mlp: int, heads: int, kv_heads: int, layers: int, vocab: int) -> int:
    """config.json, model.safetensors (bfloat16, one tensor made at a time) and tokenizer.json; returns bytes."""
    import ml_dtypes
    import numpy as np
    import tokenizers

    from npquant.safetensors_io import TensorPlan, write_safetensors

    root.mkdir(parents=True)
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": True,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
              "torch_dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp)})
    shapes["model.norm.weight"] = (hidden,)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)

    def arrays():
        for name, shape in shapes.items():
            if len(shape) == 1:
                yield {name: np.ones(shape, bf16)}
            else:
                w = rng.standard_normal(shape, dtype=np.float32)
                w *= np.float32(shape[1] ** -0.5)
                yield {name: w.astype(bf16)}

    total = write_safetensors(root / "model.safetensors", [TensorPlan(n, bf16, s) for n, s in shapes.items()],
                              arrays(), {"format": "pt"})
    words = ["[UNK]"] + [f"w{i}" for i in range(vocab - 1)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    return total


def rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], log: Path, out: Path | None = None) -> tuple[int, int, float, int, float]:
    """Run ``cmd`` (stderr to ``log``, stdout to ``out``): (peak RssAnon KiB, ru_maxrss KiB, wall s, exit status,
    CPU s)."""
    peak = 0
    t0 = time.perf_counter()
    with open(log, "w") as err, open(out or os.devnull, "w") as stdout:
        child = subprocess.Popen(cmd, stdout=stdout, stderr=err)
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_anon_kib(child.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        done.set()
        sampler.join()
        child.returncode = os.waitstatus_to_exitcode(status)
    return peak, usage.ru_maxrss, time.perf_counter() - t0, child.returncode, usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="hidden 1024, MLP 3584, 8 heads: a smoke test")
    p.add_argument("--scheme", default="w4-g128", help="preset (default w4-g128)")
    p.add_argument("--lines", type=int, default=8, help="calibration lines of 64 words (default 8: 512 tokens)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    hidden, mlp, heads, kv_heads = (1024, 3584, 8, 2) if args.quick else (4096, 14336, 32, 8)
    layers, vocab, seq_len = 2, 2048, 128
    work = Path(tempfile.mkdtemp(prefix="npquant-bench-gptq-"))
    try:
        t0 = time.perf_counter()
        total = write_model(work / "model", hidden, mlp, heads, kv_heads, layers, vocab)
        import numpy as np

        rng = np.random.default_rng(1)
        calib = work / "calibration.txt"
        calib.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, vocab - 1, 64))
                                   for _ in range(args.lines)) + "\n")
        os.sync()  # flush the input now, so its writeback does not compete with the run measured
        print(f"wrote a {total / 1e9:.2f} GB bfloat16 model ({layers} layers, hidden {hidden}, MLP {mlp}, "
              f"{heads} heads / {kv_heads} kv heads, vocab {vocab}) in {time.perf_counter() - t0:.0f} s")
        # The interpreter with what the run imports, before any model is read.
        imports = ("import numpy, safetensors, tokenizers, ml_dtypes, npquant.models.calibrated_lm, "
                   "npquant.checkpoints, npquant.cli.quantize, npquant.kernels")
        base_anon, base_max, _, code, _ = measure([sys.executable, "-c", imports], work / "base.log")
        cmd = [sys.executable, "-m", "npquant", "quantize", str(work / "model"), "-o", str(work / "out"),
               "--scheme", args.scheme, "--method", "gptq", "--calibration", str(calib), "--seq-len", str(seq_len),
               "--objective", "layer", "--json"]  # the formula's objective (the 8B shapes' default; --quick's is model)
        anon, maxrss, wall, code, cpu = measure(cmd, work / "run.log", work / "rows.json")
        if code:
            print((work / "run.log").read_text(), file=sys.stderr)
            return code
        tokens = 64 * args.lines
        q_bytes = sum(r["bytes_after"] for r in json.loads((work / "rows.json").read_text()))
        f, c = mlp, hidden
        forward = 4 * min(tokens, 2048) * (c + 2 * f)
        rows_bytes = 64 * 2**20  # GPTQ's two blocks of output rows in float64
        formula = 8 * f * f + 8 * f * c + rows_bytes + 4 * tokens * c + q_bytes + forward + base_max * 1024
        print(f"npquant quantize --method gptq --scheme {args.scheme}: {tokens} calibration tokens in windows of "
              f"{seq_len}; {wall:.0f} s wall, {cpu:.0f} s CPU, {os.cpu_count()} cores "
              f"(load average {os.getloadavg()[0]:.1f})")
        print(f"peak RssAnon {anon / 1024:.0f} MiB, ru_maxrss {maxrss / 1024:.0f} MiB "
              f"(base: the interpreter and npquant's imports, ru_maxrss {base_max / 1024:.0f} MiB)")
        print(f"formula 8 F^2 + 8 F C + 64 MiB + 4 N C + Q + forward + base = {8 * f * f / GIB:.2f} + "
              f"{8 * f * c / GIB:.2f} + {rows_bytes / GIB:.2f} + {4 * tokens * c / GIB:.3f} + {q_bytes / GIB:.2f} + "
              f"{forward / GIB:.2f} + {base_max / 2**20:.2f} = {formula / GIB:.2f} GiB")
        if not args.quick:
            print(f"target 3 GB: ru_maxrss {maxrss * 1024 / 1e9:.2f} GB, RssAnon {anon * 1024 / 1e9:.2f} GB: "
                  f"{'within' if maxrss * 1024 <= 3e9 else 'OVER (see RssAnon)' if anon * 1024 <= 3e9 else 'OVER'}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
