"""The int8 GEMM kernels (npquant.kernels._w8a8): every path's int32 accumulators equal to the exact integer sums
and its float32 outputs bit-equal to the numpy reference (npquant.linear_w8a8), at every batch."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")

from npquant import NpquantError  # noqa: E402
from npquant.kernels import _target, _w8a8  # noqa: E402
from npquant.linear_w8a8 import w8a8_int8_linear  # noqa: E402

# Every path this machine's numba target can run: VNNI only where it has AVX-512 VNNI, AVX2 where it has AVX2.
PATHS = [p for p in _w8a8.PATHS if _w8a8.int8_path(p) == p]


def exact_sums(xq, wq):
    """int64 (M, N): the integer dot products, summed in int64 by numpy (no float step anywhere)."""
    return np.einsum("mk,nk->mn", xq.astype(np.int64), wq.astype(np.int64))


def codes(rng, shape):
    return rng.integers(-128, 128, shape).astype(np.int8)


def test_the_paths_this_machine_runs():
    assert "portable" in PATHS
    if _target.has_vnni():
        assert PATHS[0] == "vnni"
    if _target.target_has("avx2"):
        assert "avx2" in PATHS


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 128])
@pytest.mark.parametrize("n, k", [(67, 37), (130, 101), (64, 256), (5, 3)])
def test_accumulators_exact_and_outputs_bit_equal(path, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    wq = codes(rng, (n, k))
    ws = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    weight = _w8a8.prepare_int8(wq, ws)
    xq = codes(rng, (m, k))
    np.testing.assert_array_equal(_w8a8.int8_accumulators(xq, weight, path), exact_sums(xq, wq))
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 100, (m, 1))).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for b in (None, bias):
        y = _w8a8.w8a8_int8_linear(x, weight, b, path)
        assert y.dtype == np.float32 and y.shape == (m, n)
        np.testing.assert_array_equal(y, w8a8_int8_linear(x, wq, ws, b))


@pytest.mark.parametrize("path", PATHS)
def test_extreme_codes_and_int32_wraparound(path):
    # -128 and 127 in both operands: the largest products (2**14), vpmaddubsw's saturating pairs (u8 255 * -128),
    # and for VNNI's offset codes partial sums past int32 that wrap and come back after the correction.
    k = 4099
    wq = np.array([[-128] * k, [127] * k, [-128, 127] * (k // 2) + [0], [127, -128] * (k // 2) + [-128]], np.int8)
    xq = np.array([[-128] * k, [127] * k, [-128, 127] * (k // 2) + [127], [0] * k], np.int8)
    weight = _w8a8.prepare_int8(wq, np.ones(4, np.float32))
    np.testing.assert_array_equal(_w8a8.int8_accumulators(xq, weight, path), exact_sums(xq, wq))
    assert _w8a8.int8_accumulators(xq, weight, path)[0, 0] == k * 2**14


@pytest.mark.parametrize("path", PATHS)
def test_longest_rows_whose_sums_fit_int32(path):
    k = (2**31 - 1) // 2**14  # 131071: every product 2**14 sums to 2**31 - 2**14
    wq = np.full((2, k), -128, np.int8)
    wq[1, ::2] = 127
    xq = np.full((3, k), -128, np.int8)
    xq[1] = 127
    weight = _w8a8.prepare_int8(wq, np.ones(2, np.float32))
    np.testing.assert_array_equal(_w8a8.int8_accumulators(xq, weight, path), exact_sums(xq, wq))
    with pytest.raises(NpquantError, match="in_features=131072"):
        _w8a8.prepare_int8(np.zeros((1, k + 1), np.int8), np.ones(1, np.float32))


@pytest.mark.parametrize("blas_threads", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_threads_and_zero_tokens(path, blas_threads, monkeypatch):
    monkeypatch.setattr(_w8a8, "USE_BLAS_THREADS", blas_threads)  # OpenBLAS's threads where usable, else the pool
    rng = np.random.default_rng(7)
    n, k, m = 1000, 515, 33  # 16 blocks of 64 rows: several chunks per thread
    wq = codes(rng, (n, k))
    ws = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    weight = _w8a8.prepare_int8(wq, ws)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[5] = 0  # an all-zero token: scale 0, codes 0, outputs 0 (+ bias)
    ref = w8a8_int8_linear(x, wq, ws)
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(_w8a8.w8a8_int8_linear(x, weight, None, path, threads), ref)
        # one token, a different one each time (an output left unwritten could hold the last call's values):
        # its own chunking (_STREAM_CHUNKS, one part of the blocks per thread)
        t = x[threads : threads + 1]
        np.testing.assert_array_equal(_w8a8.w8a8_int8_linear(t, weight, None, path, threads), ref[threads : threads + 1])
    assert not ref[5].any()
    x[-1, -1] = np.inf  # in the last chunk of rows: whichever thread quantizes it must report it
    for threads in (1, 2, 3):
        with pytest.raises(NpquantError, match="^x must be finite"):
            _w8a8.w8a8_int8_linear(x, weight, None, path, threads)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 20), st.integers(1, 80), st.integers(1, 150), st.integers(0, 2**32 - 1),
       st.sampled_from(PATHS))
def test_random_shapes(m, n, k, seed, path):
    rng = np.random.default_rng(seed)
    wq = codes(rng, (n, k))
    xq = codes(rng, (m, k))
    ws = rng.uniform(1e-4, 1, n).astype(np.float32)
    weight = _w8a8.prepare_int8(wq, ws)
    acc = _w8a8.int8_accumulators(xq, weight, path)
    assert acc.dtype == np.int32
    np.testing.assert_array_equal(acc, exact_sums(xq, wq))
    x = rng.standard_normal((m, k)).astype(np.float32)
    np.testing.assert_array_equal(_w8a8.w8a8_int8_linear(x, weight, None, path), w8a8_int8_linear(x, wq, ws))


def test_inputs_are_checked_and_left_alone():
    rng = np.random.default_rng(8)
    wq = codes(rng, (10, 20))
    ws = np.ones(10, np.float32)
    weight = _w8a8.prepare_int8(wq, ws)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    x_copy, wq_copy = x.copy(), wq.copy()
    y = _w8a8.w8a8_int8_linear(x[None], weight)
    assert y.shape == (1, 3, 10)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(wq, wq_copy)
    x[1, 2] = np.nan
    with pytest.raises(NpquantError, match="^x must be finite"):
        _w8a8.w8a8_int8_linear(x, weight)
    with pytest.raises(NpquantError, match=r"x must be \(\.\.\., 20\)"):
        _w8a8.w8a8_int8_linear(x[:, :19], weight)
    with pytest.raises(NpquantError, match=r"w_scale must be float32 \(10,\)"):
        _w8a8.prepare_int8(wq, ws[:9])
    with pytest.raises(NpquantError, match="wq must be a non-empty 2-d int8 array"):
        _w8a8.prepare_int8(wq.astype(np.int16), ws)
    with pytest.raises(NpquantError, match=r"bias must be float32 \(10,\)"):
        _w8a8.w8a8_int8_linear(x, weight, np.ones(9, np.float32))
    with pytest.raises(NpquantError, match="path='sse'"):
        _w8a8.int8_path("sse")


# A fresh interpreter compiling as for Zen 2 (AVX2, no AVX-512): the AVX2 path is taken, is exact, and its machine
# code names no 512-bit register (zmm); the VNNI path is refused before anything reaches LLVM.
_ZEN2 = r"""
import warnings
import numpy as np
from npquant import NpquantError
from npquant.kernels import _w8a8, _w8a8_avx2, _w8a8_vnni
from npquant.linear_w8a8 import w8a8_int8_linear

warnings.simplefilter("error")
assert _w8a8.int8_path() == "avx2" and _w8a8.int8_path("vnni") == "avx2"
try:
    _w8a8_vnni.compile_jobs.__wrapped__()
    raise SystemExit("the VNNI path compiled for Zen 2")
except NpquantError as error:
    assert "lacks" in str(error)
rng = np.random.default_rng(0)
for m, n, k in ((1, 67, 37), (7, 130, 101), (17, 64, 256), (128, 70, 45)):
    wq = rng.integers(-128, 128, (n, k)).astype(np.int8)
    ws = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    weight = _w8a8.prepare_int8(wq, ws)
    xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    acc = _w8a8.int8_accumulators(xq, weight, threads=1)
    assert np.array_equal(acc, xq.astype(np.int64) @ wq.astype(np.int64).T), (m, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    assert np.array_equal(_w8a8.w8a8_int8_linear(x, weight, threads=1), w8a8_int8_linear(x, wq, ws)), (m, n, k)
asm = "".join(_w8a8_avx2.gemm_avx2.inspect_asm(sig) for sig in _w8a8_avx2.gemm_avx2.signatures)
assert "vpmaddwd" in asm and "zmm" not in asm, "AVX-512 registers in the AVX2 kernel"
print("avx2 ok")
"""


@pytest.mark.slow
def test_avx2_path_where_numba_targets_zen2(tmp_path):
    # Slow: compiles the AVX2 kernel afresh for that target (a cache of its own, so its machine code can be read).
    env = dict(os.environ, NUMBA_CPU_NAME="znver2", NUMBA_CPU_FEATURES=_target.features_of("znver2"),
               NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _ZEN2], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "avx2 ok" in done.stdout


@pytest.mark.slow
def test_bench_w8a8_quick():
    # The benchmark script runs and says which path ran; no timing is asserted.
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_w8a8.py")
    done = subprocess.run([sys.executable, bench, "--quick", "--repeats", "1"], capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.strip().startswith("512 x 768")]
    assert len(rows) == 2 and all(row.split()[-1] in _w8a8.PATHS for row in rows)
    assert "int8 GEMM path:" in done.stdout and "instruction set:" in done.stdout


def test_one_token_takes_the_avx2_kernel_where_vnni_would_serve(monkeypatch):
    # Batch 1 only streams the weight, which the AVX2 kernel reads faster: an unasked path at M = 1 takes it where
    # it compiled; a path asked for is kept; larger batches keep the fastest path. Results are the same bits.
    fastest = _w8a8.int8_path()
    has_avx2 = _w8a8.int8_path("avx2") == "avx2"
    assert _w8a8._path_for(1, None) == ("avx2" if fastest == "vnni" and has_avx2 else fastest)
    assert _w8a8._path_for(2, None) == fastest
    for p in PATHS:
        assert _w8a8._path_for(1, p) == p
    rng = np.random.default_rng(11)
    wq = codes(rng, (300, 200))
    ws = rng.uniform(1e-3, 1e-1, 300).astype(np.float32)
    weight = _w8a8.prepare_int8(wq, ws)
    x = rng.standard_normal((1, 200)).astype(np.float32)
    taken = []
    real = _w8a8._run
    monkeypatch.setattr(_w8a8, "_run", lambda p, *args: taken.append(p) or real(p, *args))
    np.testing.assert_array_equal(_w8a8.w8a8_int8_linear(x, weight), w8a8_int8_linear(x, wq, ws))
    assert taken == [_w8a8._path_for(1, None)]
