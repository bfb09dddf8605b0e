"""The benchmark scripts run (quick modes): they must not rot. No timing is asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

# Slow: the benchmark scripts, each in a subprocess. `pytest -m "not slow"` leaves them out.
pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# A guard against a hang, never a timing. On 2 cores bench_gptq's quick mode, the longest (6 GPTQ
# runs of MiniLM), took 45 s quiet and 119 s at a load average of 5; a busier machine passed 300 s.
# 1200 s is 10 times the loaded figure. Passing runs take what they take, so CI's time is unchanged.
LIMIT_S = 1200


def run(script, *args, timeout=LIMIT_S):
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bench_linear_quick():
    out = run("bench_linear.py", "--quick", "--repeats", "1", "--batch", "1", "--batch", "40")
    lines = [line for line in out.splitlines() if "channel" in line or "g128" in line]
    rows = [line for line in lines if "kernel:" not in line]
    assert len(rows) == 2 * 2 * 6  # shapes x batches x three schemes, each also prepared
    assert sum(" prep " in line for line in rows) == 2 * 2 * 3
    kernels = [line for line in lines if "kernel:" in line]  # each case's kernel, as npquant.kernels.explain says
    # At batch 40 the checkpoint layout takes tiles, the prepared one its small-batch kernels (kernels.small_m)
    assert len(kernels) == 2 * 2 * 6
    assert sum("checkpoint layout, batch" in line and "_tiles" in line for line in kernels) == 2 * 3
    assert sum("prepared layout, batch 1-" in line and "_small_m" in line for line in kernels) == 2 * 3
    assert "read bandwidth (measured, best round)" in out and "instruction set:" in out


def test_last_level_cache_is_the_largest_size_sysfs_gives(tmp_path, monkeypatch):
    # bench_linear sizes the copies it rotates over by this: read apart from the benchmark, on a fake sysfs.
    monkeypatch.syspath_prepend(str(BENCH))
    from _machine import last_level_cache_bytes

    for index, size in (("index0", "48K\n"), ("index2", "2048K\n"), ("index3", "491520K\n"), ("index4", "junk\n")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size)
    assert last_level_cache_bytes(root=str(tmp_path)) == 491520 * 1024
    (tmp_path / "index3" / "size").write_text("1G")
    assert last_level_cache_bytes(root=str(tmp_path)) == 1 << 30
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setattr("os.sysconf", lambda name: 0)  # no sysfs, no sysconf figure: the default
    assert last_level_cache_bytes(default=12345, root=str(empty)) == 12345


def test_bench_linear_refuses_a_negative_rotation():
    done = subprocess.run([sys.executable, str(BENCH / "bench_linear.py"), "--rotate-mib", "-1"],
                          capture_output=True, text=True, timeout=LIMIT_S)
    assert done.returncode == 2 and "--rotate-mib must be 0 or more, got -1" in done.stderr


def test_bench_checkpoint_quick():
    out = run("bench_checkpoint.py", "--quick")
    assert "GB/s of input" in out and "peak RssAnon" in out


def require_default_model():
    """Skip (saying why) unless tokenizers and the default model are installed."""
    pytest.importorskip("tokenizers", reason="the encoder needs tokenizers (npquant[models])")
    from npquant import NpquantError
    from npquant.checkpoints import default_model_path

    try:
        default_model_path()
    except NpquantError as exc:
        pytest.skip(f"the default model is not installed ({exc})")


def test_bench_encoder_quick():
    require_default_model()
    out = run("bench_encoder.py", "--repeats", "1", "--scheme", "w8-channel")
    assert "float32-only process, a round before each of this process" in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("float32 ", "w8-channel "))]
    assert rows == ["float32", "w8-channel"]


def test_bench_gptq_quick():
    require_default_model()
    out = run("bench_gptq.py", "--quick")
    assert "GPTQ / RTN" in out and "gptq mse" in out and "held-out" in out


def test_bench_gptq_decoder_quick():
    pytest.importorskip("tokenizers", reason="the decoder's calibration needs tokenizers (npquant[models])")
    out = run("bench_gptq_decoder.py", "--quick", "--lines", "2")
    assert "npquant quantize --method gptq --scheme w4-g128" in out and "peak RssAnon" in out
    assert "formula 8 F^2 + 8 F C" in out
