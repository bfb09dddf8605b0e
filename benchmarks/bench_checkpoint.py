"""Quantize a synthetic sharded bf16 checkpoint: throughput and peak anonymous memory.

Writes a Llama-like checkpoint (hidden 2048, intermediate 5632, GQA k/v of
256 rows, vocabulary 32000; as many layers as fit the size asked) in shards
of about 1 GB with an index, then runs ``npquant quantize`` on it in a
child process while this process samples the child's RssAnon (anonymous
memory: what the process allocated, not the file pages it maps) every 5 ms.

    python benchmarks/bench_checkpoint.py                  # ~2 GB, w8-channel
    python benchmarks/bench_checkpoint.py --size-gb 4 --scheme w4-g128
    python benchmarks/bench_checkpoint.py --quick          # ~0.2 GB, for CI

It prints input GB/s (bytes of the input checkpoint over wall time, the
input being in the page cache, as just written and flushed) and the peak
RssAnon against the target ``3 x largest tensor in float32 + 300 MiB``. The
output goes through the page cache too; once it outgrows the kernel's dirty
limit, the disk's write speed sets the pace.
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

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000


def layer_shapes(i: int) -> dict[str, tuple[int, int]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (KV, HIDDEN),
        p + "self_attn.v_proj.weight": (KV, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),
        p + "post_attention_layernorm.weight": (HIDDEN,),
    }


def write_checkpoint(root: Path, size_bytes: int, shard_bytes: int = 1 << 30) -> tuple[int, tuple]:
    """Write the model; return (bytes written, largest 2-D shape)."""
    rng = np.random.default_rng(0)
    per_layer = sum(2 * int(np.prod(s)) for s in layer_shapes(0).values())
    fixed = 2 * (2 * VOCAB * HIDDEN) + 2 * HIDDEN
    n_layers = max(1, (size_bytes - fixed) // per_layer)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(n_layers):
        shapes.update(layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    shards, current, current_bytes = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and current_bytes + nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = shape
        current_bytes += nbytes
    shards.append(current)
    root.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name, shape in shard.items():
            scale = 1.0 if len(shape) == 1 else 0.02
            arrays[name] = (scale * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            weight_map[name] = file
            total += arrays[name].nbytes
        save_file(arrays, str(root / file), metadata={"format": "pt"})
        del arrays
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN,
                                                  "num_hidden_layers": int(n_layers)}))
    return total, (VOCAB, HIDDEN)


def rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    p.add_argument("--scheme", default="w8-channel", help="preset (default w8-channel)")
    p.add_argument("--workers", type=int, default=2, help="tensors quantized at once (default 2)")
    p.add_argument("--quick", action="store_true", help="a ~0.2 GB checkpoint, for CI")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    size = int((0.2 if args.quick else args.size_gb) * 1e9)
    work = Path(tempfile.mkdtemp(prefix="npquant-bench-"))
    try:
        t0 = time.perf_counter()
        total, largest = write_checkpoint(work / "model", size)
        os.sync()  # flush the input now, so its writeback does not compete with the run measured
        print(f"wrote {total / 1e9:.2f} GB bf16 checkpoint in {time.perf_counter() - t0:.0f} s "
              f"({len(list((work / 'model').glob('*.safetensors')))} shards)")
        cmd = [sys.executable, "-m", "npquant", "quantize", str(work / "model"), "-o", str(work / "out"),
               "--scheme", args.scheme, "--workers", str(args.workers), "--json"]
        peak = 0
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def sample():
            nonlocal peak
            while child.poll() is None:
                peak = max(peak, rss_anon_kib(child.pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        _, err = child.communicate()
        sampler.join()
        wall = time.perf_counter() - t0
        if child.returncode:
            print(err, file=sys.stderr)
            return child.returncode
        largest_f32 = 4 * largest[0] * largest[1]
        target = 3 * largest_f32 + 300 * 2**20
        out_bytes = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
        print(f"scheme {args.scheme}, workers {args.workers}, {os.cpu_count()} cores")
        print(f"quantized in {wall:.1f} s: {total / wall / 1e9:.2f} GB/s of input; output {out_bytes / 1e9:.2f} GB")
        print(f"peak RssAnon {peak / 1024:.0f} MiB; target 3 x largest tensor in float32 "
              f"({largest_f32 / 2**20:.0f} MiB) + 300 MiB = {target / 2**20:.0f} MiB: "
              f"{'within' if peak * 1024 <= target else 'OVER'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
