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
    out = run("bench_linear.py", "--quick", "--repeats", "1", "--batch", "1", "--batch", "17")
    lines = [line for line in out.splitlines() if "channel" in line or "g128" in line]
    rows = [line for line in lines if "kernel:" not in line]
    assert len(rows) == 2 * 2 * 6  # shapes x batches x three schemes, each also prepared
    assert sum(" prep " in line for line in rows) == 2 * 2 * 3
    kernels = [line for line in lines if "kernel:" in line]  # each case's kernel, as npquant.kernels.explain says
    assert len(kernels) == 2 * 2 * 6 and sum("layout, batch 17+" in line for line in kernels) == 2 * 6
    assert "read bandwidth (measured, best round)" in out and "instruction set:" in out


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
