"""The kernels' threads: results independent of the thread count, and safe in forked and spawned
children and under concurrent user threads (npquant.kernels._pool)."""

import multiprocessing
import threading

import numpy as np
import pytest

from npquant import NpquantError, Scheme, linear, prepare, quantize

numba = pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")
from npquant import kernels  # noqa: E402
from npquant.kernels import _pool  # noqa: E402
from npquant.kernels._jobs import _f32_1d, _i64_1d  # noqa: E402
from npquant.kernels._llvm import _claim  # noqa: E402

SCHEMES = {"w8-channel": "w8-channel", "w4-g128": "w4-g128", "fp8-channel": "fp8-channel",
           "w4-g128-asym": "w4-g128-asym", "w8-g64-asym": Scheme("int", 8, "group", 64, symmetric=False)}


def weight(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def cases():
    """(name, tensor) for the checkpoint layout and the prepared one of each scheme, 300 x 256 (ragged blocks of rows)."""
    w = weight((300, 256))
    out = []
    for name, scheme in SCHEMES.items():
        qt = quantize(w, scheme)
        out += [(name, qt), (name + " prep", prepare(qt))]
    out.append(("nvfp4 prep", prepare(quantize(w, "nvfp4"))))
    mx = quantize(w, "mxfp4")
    out += [("mxfp4", mx), ("mxfp4 prep", prepare(mx))]
    return out


CASES = cases()


@pytest.fixture(params=["openblas threads", "npquant pool"])
def where(request, monkeypatch):
    """Both ways a kernel call runs on several threads: OpenBLAS's threads (where it can) and npquant's pool."""
    if request.param == "openblas threads":
        if kernels._blas_threads.blas_threads() < 2:
            pytest.skip("BLAS here is not an OpenBLAS with two threads or more the kernels can run on")
    else:
        monkeypatch.setattr(kernels, "USE_BLAS_THREADS", False)
    return request.param


def test_openblas_threads_found_where_numpy_uses_openblas():
    # numpy's wheels ship OpenBLAS: there the kernels must find its threads
    # (a failed probe would silently fall back to the pool).
    threadpoolctl = pytest.importorskip("threadpoolctl")
    libs = [lib for lib in threadpoolctl.threadpool_info() if lib["internal_api"] == "openblas"]
    if len(libs) != 1:
        pytest.skip("numpy here does not use one OpenBLAS")
    assert kernels._blas_threads.blas_threads() == max(1, libs[0]["num_threads"])


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("name,qt", CASES, ids=[c[0] for c in CASES])
def test_thread_count_does_not_change_a_bit(name, qt, m, where):
    # Each output row is one thread's loop over the same codes in the same
    # order, whichever thread takes its chunk: equal to the bit.
    if not kernels.has_kernels(qt, m):
        pytest.skip(f"{name} at batch {m} takes the numpy path (see has_kernels)")
    x = weight((m, 256), seed=m)
    one = kernels.numba_linear(x, qt, threads=1)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(kernels.numba_linear(x, qt, threads=threads), one)


FOUR_BIT = [c for c in CASES if c[0].startswith(("w4", "nvfp4", "mxfp4"))]


@pytest.mark.parametrize("name,qt", FOUR_BIT, ids=[c[0] for c in FOUR_BIT])
def test_thread_count_does_not_change_a_bit_portable_batch1(name, qt, where, monkeypatch):
    # Where AVX-512 is, batch-1 4-bit calls take the table-lookup kernels
    # (the test above); the portable ones serve every other CPU.
    monkeypatch.setattr(kernels, "USE_LUT", False)
    if not kernels.has_kernels(qt, 1):
        pytest.skip(f"{name} at batch 1 takes the numpy path without the table-lookup kernels")
    x = weight((1, 256), seed=1)
    one = kernels.numba_linear(x, qt, threads=1)
    for threads in (2, 3, 7):
        np.testing.assert_array_equal(kernels.numba_linear(x, qt, threads=threads), one)


@pytest.mark.parametrize("name,qt", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_tiles_in_threads_match_numpy(name, qt):
    # Large batches: each tile dequantized by all threads, then one BLAS
    # call; compared with the numpy backend (float32 sums in another order:
    # the tolerance is test_linear's float32 summation bound).
    from test_linear import sum_bound

    x = weight((130, 256), seed=9)  # past every small_m: tiles
    want = linear(x, qt, backend="numpy")
    bound = 2 * sum_bound(x, qt.dequantize(), 256)  # both sides stray at most this far from the exact sum
    for threads in (1, 2, 3):
        got = kernels.numba_linear(x, qt, tile_elements=256 * 64, threads=threads)
        assert np.all(np.abs(got - want) <= bound), threads


def run_users(user, n: int) -> None:
    """``user(k)`` in ``n`` threads at once (``k`` = 0 .. n - 1); the first exception any raised, raised here."""
    errors = []

    def guarded(k):
        try:
            user(k)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a user thread did not finish"
    if errors:
        raise errors[0]


def test_tile_is_the_calling_threads_own_and_kept():
    from npquant.kernels import _buffers

    first = _buffers.tile(1000)
    assert first.dtype == np.float32 and first.shape == (1000,) and first.ctypes.data % 64 == 0
    again = _buffers.tile(700)  # smaller: the same memory
    assert again.ctypes.data == first.ctypes.data
    other = []
    t = threading.Thread(target=lambda: other.append(_buffers.tile(1000).ctypes.data))
    t.start()
    t.join(30)
    assert other and other[0] != first.ctypes.data  # another thread: a tile of its own
    big = _buffers.tile(_buffers.KEEP_UP_TO + 1)  # past the limit: made for this call only
    assert _buffers.tile(1000).ctypes.data == first.ctypes.data != big.ctypes.data
    grown = _buffers.tile(5000)  # larger, within the limit: kept from now on
    assert _buffers.tile(5000).ctypes.data == grown.ctypes.data


def test_user_threads_with_weights_of_their_own_run_tiles_at_once(where):
    # Each thread's large-batch calls dequantize into that thread's tile: four
    # threads with different weights, several tiles a call, all at once.
    from test_linear import sum_bound

    barrier = threading.Barrier(4, timeout=60)

    def user(k):
        w = weight((300 + 37 * k, 256), seed=20 + k)
        x = weight((130, 256), seed=30 + k)
        tensors = [quantize(w, "w8-channel"), prepare(quantize(w, "w4-g128"))]
        bounds = [2 * sum_bound(x, t.dequantize(), 256) for t in tensors]
        wants = [linear(x, t, backend="numpy") for t in tensors]
        barrier.wait()
        for _ in range(20):
            for t, want, bound in zip(tensors, wants, bounds):
                got = kernels.numba_linear(x, t, tile_elements=256 * 64, threads=2)
                assert np.all(np.abs(got - want) <= bound), (k, type(t).__name__)

    run_users(user, 4)


def test_job_block_holds_each_argument():
    from npquant.kernels._jobs import _MAX_JOB, _pack_into

    a = np.zeros((2, 3), np.float32)
    b = np.zeros((4, 5, 6), np.uint8)
    block = np.full(_MAX_JOB, -99, np.int64)
    n = _pack_into(block, a, True, 2.5, np.float32(1.5), 7, np.int64(-3), b, False)
    expected = [a.ctypes.data, 2, 3, 1, np.float64(2.5).view(np.int64), np.float64(1.5).view(np.int64), 7, -3,
                b.ctypes.data, 4, 5, 6, 0]
    assert n == len(expected)
    np.testing.assert_array_equal(block[:n], np.array(expected, np.int64))
    assert np.all(block[n:] == -99)
    # A job rebuilds C-contiguous arrays from an address and dimensions: nothing else compiles.
    with pytest.raises(numba.core.errors.TypingError):
        _pack_into(block, np.zeros((4, 4), np.float32)[:, ::2])


def test_launch_takes_blas_thread_count_at_each_call():
    # launch reads OpenBLAS's thread count in compiled code at every call: limiting
    # BLAS limits the kernels; one unit of work, or one thread asked, runs on one.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from npquant.kernels import _blas_threads
    from npquant.kernels._gemv import gemv_bytes

    if _blas_threads.blas_threads() < 2:
        pytest.skip("BLAS here is not an OpenBLAS with two threads or more the kernels can run on")
    qt = quantize(weight((64, 256)), "w8-channel")
    codes, scale = qt.codes.view(np.uint8), qt.scale
    x = weight((1, 256), seed=1)
    want = linear(x, qt, backend="numpy")

    def run(n_units, threads):
        y = np.full((1, 64), np.nan, np.float32)
        used = _blas_threads.run(gemv_bytes, (x, codes, scale, 1, 256, 0, kernels._NO_E4M3, y), n_units, threads, 8)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
        return used

    assert run(8, 2) == 2
    assert run(8, 1) == 1
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        assert run(8, 2) == 1
    assert run(8, 2) == 2  # the limit lifted: read again
    assert run(1, 2) == 1  # one unit of work: one thread


def _toy_kernel(x, y, work, per):
    while True:
        lo, hi = _claim(work, per, x.shape[0])
        if lo >= hi:
            break
        for i in range(lo, hi):
            y[i] = 2 * x[i]


def _toy_job(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
    blk = numba.carray(a, (n,))
    x, i = _f32_1d(blk, 0)
    y, i = _f32_1d(blk, i)
    work, i = _i64_1d(blk, i)
    _TOY(x, y, work, blk[i])
    return 0


_TOY = numba.njit(nogil=True)(_toy_kernel)


def test_job_compiles_after_its_kernel_for_the_same_types(monkeypatch):
    # A job's call binds to a copy of its kernel already loaded (the same name: the same types), else to its own,
    # compiled apart: the kernel first, so that a job runs the code the kernel runs on one thread.
    from npquant.kernels import _blas_threads, _jobs

    compiled_before_job = []
    real = _jobs.cfunc

    def spy(sig, **options):
        compiled_before_job.append(list(_TOY.signatures))
        return real(sig, **options)

    monkeypatch.setattr(_jobs, "cfunc", spy)
    monkeypatch.setitem(_jobs.JOBS, _TOY, _toy_job)
    x = np.arange(100, dtype=np.float32)
    y = np.zeros(100, np.float32)
    address = _jobs.job_address(_TOY, (x, y))
    assert address and _jobs.job_address(_TOY, (x, y)) == address  # once
    want = tuple(numba.typeof(a) for a in (x, y, np.zeros(1, np.int64))) + (numba.types.int64,)
    assert compiled_before_job == [[want]]
    if _blas_threads.blas_threads() >= 2:  # and it runs, on OpenBLAS's threads
        assert _blas_threads.run(_TOY, (x, y), 100, 2, 8) == 2
        np.testing.assert_array_equal(y, 2 * x)
    monkeypatch.delitem(_jobs._ADDRESSES, _TOY)


def test_kernel_plan_follows_its_tensor(where):
    # The per-tensor plan (npquant.kernels._plan) holds the tensor's own arrays: writing into
    # them shows at the next call, a converted copy (bfloat16 scales) is not kept, the
    # plan leaves with its tensor and is not part of it (pickling it carries nothing more).
    import dataclasses
    import gc
    import pickle

    import ml_dtypes

    x = weight((1, 256), seed=2)
    for scheme in ("w8-channel", "w4-g128", "fp8-channel"):
        qt = quantize(weight((300, 256)), scheme)
        first = linear(x, qt, backend="numba")
        assert set(vars(qt)) == {"codes", "scale", "zero_point", "shape", "scheme", "global_scale", "perm"}
        assert len(pickle.dumps(qt)) < qt.codes.nbytes + qt.scale.nbytes + 4096
        qt.scale[...] *= 2
        np.testing.assert_allclose(linear(x, qt, backend="numba"), 2 * first, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(linear(x, qt, backend="numba"), linear(x, qt, backend="numba"))
        key = id(qt)
        assert key in kernels._PLANS
        del qt
        gc.collect()
        assert key not in kernels._PLANS
    qt = quantize(weight((300, 256)), "w8-channel")
    bf = type(qt)(qt.codes, qt.scale.astype(ml_dtypes.bfloat16), None, qt.shape,
                  dataclasses.replace(qt.scheme, scale_dtype="bfloat16"))  # as a bfloat16 checkpoint loads
    before = linear(x, bf, backend="numba")
    bf.scale[...] = bf.scale * 2
    np.testing.assert_allclose(linear(x, bf, backend="numba"), 2 * before, rtol=1e-6, atol=1e-6)
    assert kernels._plan(bf)[0] is None
    nv = quantize(weight((64, 256)), "nvfp4")  # its table kernels read a table divided by the global scale
    before = linear(x, nv, backend="numba")
    nv.global_scale[...] /= 2
    np.testing.assert_allclose(linear(x, nv, backend="numba"), 2 * before, rtol=1e-6, atol=1e-6)
    assert kernels._plan(nv)[3] is None


def test_nonlinear_kernels_on_threads_change_no_bit(where, monkeypatch):
    # GELU, residual LayerNorm and softmax share a call out by rows (heads for softmax) on every thread; each row
    # is computed alone, so the result must equal one thread's, bit for bit, and every row must be written.
    from npquant.kernels import _nonlinear

    rng = np.random.default_rng(3)
    h = rng.standard_normal((301, 1536)).astype(np.float32)  # 462k elements: above the threaded size
    a, b = rng.standard_normal((2, 301, 384)).astype(np.float32)
    gamma, beta = rng.standard_normal((2, 384)).astype(np.float32)
    scores = rng.standard_normal((7, 12, 29, 29)).astype(np.float32)
    key_bias = np.where(rng.random((7, 29)) < 0.2, np.finfo(np.float32).min, 0).astype(np.float32)

    one = h.copy()
    _nonlinear.gelu(one, np.zeros(1, np.int64), one.shape[0])
    ln_one = np.empty_like(a)
    _nonlinear.add_layer_norm(a, b, gamma, beta, 1e-12, ln_one, np.zeros(1, np.int64), a.shape[0])
    sm_one = np.empty_like(scores)
    _nonlinear.softmax_scaled(scores.reshape(-1, 29, 29), np.float32(0.125), key_bias, 12, sm_one.reshape(-1, 29, 29),
                              np.zeros(1, np.int64), 7 * 12)

    runs = []
    target = kernels._pool if where == "npquant pool" else kernels._blas_threads
    real = target.run
    monkeypatch.setattr(target, "run", lambda *args: runs.append(1) or real(*args))
    np.testing.assert_array_equal(kernels.gelu(h), one)
    np.testing.assert_array_equal(kernels.add_layer_norm(a, b, gamma, beta, 1e-12), ln_one)
    np.testing.assert_array_equal(kernels.softmax_scaled(scores, 0.125, key_bias), sm_one)
    assert len(runs) == 3  # each call ran on several threads


@pytest.mark.parametrize("shape", [(1, 8), (3, 7), (2, 1), (4, 0)])
def test_even_odd_columns(shape):
    from npquant.kernels import _buffers

    x = weight(shape)
    even, odd = _buffers.even_odd(x)
    for got, want in ((even, x[:, 0::2]), (odd, x[:, 1::2])):
        assert got.flags.c_contiguous and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_default_threads_env(monkeypatch):
    monkeypatch.setenv("NPQUANT_NUM_THREADS", "3")
    assert kernels.default_threads() == 3
    monkeypatch.delenv("NPQUANT_NUM_THREADS")
    assert kernels.default_threads() == _pool.cpu_count() >= 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("NPQUANT_NUM_THREADS", bad)
        with pytest.raises(NpquantError, match="NPQUANT_NUM_THREADS"):
            kernels.default_threads()


def _python_reading(env: str | None, cpus: int) -> int | None:
    """The threads NPQUANT_NUM_THREADS=env allows, read as the documentation says (written apart from the
    code): the variable stripped, a whole number >= 1, unset or blank meaning every CPU; None when refused."""
    if env is None or not env.strip():
        return cpus
    try:
        n = int(env.strip())
    except ValueError:
        return None
    return n if n >= 1 else None


ENV_VALUES = [None, "", "  ", "1", "3", " 4 ", "\t7\n", "007", "64", "999999", "1000000", "12345678",
              "0", "-1", "+2", "1_0", "two", "2x", "3 4", "\u0663", "\u00a05", "5\u00a0"]


@pytest.mark.parametrize("env", ENV_VALUES)
def test_threads_allowed_reads_the_environment_as_python_does(env, monkeypatch):
    # The compiled reading (kernels._env) gives Python's answer or 0 ("ask Python"), never another
    # number; default_threads, which uses it, gives Python's answer or refuses the value.
    from npquant.kernels._env import threads_allowed

    if env is None:
        monkeypatch.delenv("NPQUANT_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("NPQUANT_NUM_THREADS", env)
    want = _python_reading(env, _pool.cpu_count())
    got = threads_allowed()
    assert got == want or got == 0
    plain = None if env is None else env.strip(" \t\n\r\x0b\x0c")  # ASCII blanks only
    if plain is not None and plain.isascii() and plain.isdigit() and 1 <= int(plain) < 10**6:
        assert got == want  # a plain number: read in compiled code
    if want is None:
        with pytest.raises(NpquantError, match="NPQUANT_NUM_THREADS"):
            kernels.default_threads()
    else:
        assert kernels.default_threads() == want


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_threads_allowed_follows_cpu_affinity(monkeypatch):
    import os

    from npquant.kernels._env import threads_allowed

    monkeypatch.delenv("NPQUANT_NUM_THREADS", raising=False)
    before = os.sched_getaffinity(0)
    assert threads_allowed() == len(before)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert threads_allowed() == kernels.default_threads() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert threads_allowed() == len(before)


def test_default_threads_where_only_python_reads_it(monkeypatch):
    # A large call asks for the default inside the compiled launch (OpenBLAS's threads); a value
    # only Python reads runs nothing there and is read (or refused) in Python.
    from npquant.kernels import _blas_threads
    from npquant.kernels._gemv import gemv_bytes

    w = weight((2048, 2048))
    qt = quantize(w, "w8-channel")
    x = weight((1, 2048), seed=3)
    want = linear(x, qt, backend="numpy")
    monkeypatch.setenv("NPQUANT_NUM_THREADS", "two")
    with pytest.raises(NpquantError, match="NPQUANT_NUM_THREADS='two'"):
        linear(x, qt, backend="numba")
    monkeypatch.setenv("NPQUANT_NUM_THREADS", "+1")  # int() reads it; the compiled reading leaves it to Python
    np.testing.assert_allclose(linear(x, qt, backend="numba"), want, rtol=1e-4, atol=1e-3)
    if _blas_threads.blas_threads() < 1:
        return
    y = np.full((1, 2048), np.nan, np.float32)
    args = (x, qt.codes.view(np.uint8), qt.scale, 1, 2048, 0, kernels._NO_E4M3, y)
    assert _blas_threads.run(gemv_bytes, args, 256, 0, 8) == 0
    assert np.isnan(y).all()  # nothing ran
    monkeypatch.setenv("NPQUANT_NUM_THREADS", "1")
    assert _blas_threads.run(gemv_bytes, args, 256, 0, 8) == 1
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3)


# --- the pool itself ------------------------------------------------------------------


def test_pool_runs_n_copies_and_raises_a_workers_error():
    pool = _pool._Pool()
    barrier = threading.Barrier(3, timeout=10)  # all three copies must run at once
    seen = []

    def fn():
        barrier.wait()
        seen.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("from a worker")

    with pytest.raises(ValueError, match="from a worker"):
        pool.run(fn, 3)
    assert len(seen) == 3 and sum(n.startswith("npquant-kernels-") for n in seen) == 2


def test_pool_caller_does_not_wait_for_a_busy_worker():
    # The pool's only worker is held by another call; a second call's task
    # is never started: the caller runs its own copy, cancels the task and
    # returns instead of waiting for the worker.
    pool = _pool._Pool()
    started, release = threading.Event(), threading.Event()

    def hold():
        if threading.current_thread().name.startswith("npquant-kernels-"):
            started.set()
            release.wait(10)
        else:
            started.wait(10)

    t = threading.Thread(target=pool.run, args=(hold, 2))
    t.start()
    assert started.wait(10)
    calls = []
    pool.run(lambda: calls.append(threading.current_thread().name), 2)
    assert calls == [threading.current_thread().name]
    release.set()
    t.join(10)
    assert not t.is_alive()


# --- processes and user threads -------------------------------------------------------


def child_results(seed: int = 0) -> list:
    """linear over every case at batch 1, 5 and 40, with 2 threads where the kernels run: what parent and children compare."""
    out = []
    for name, qt in cases():
        for m in (1, 5, 40):
            x = weight((m, 256), seed=seed + m)
            if kernels.has_kernels(qt, m):
                out.append(kernels.numba_linear(x, qt, tile_elements=256 * 64, threads=2))
            else:
                out.append(linear(x, qt, backend="numpy"))
    return out


def _child(queue, seed, use_blas_threads):
    kernels.USE_BLAS_THREADS = use_blas_threads  # a spawned child imports afresh: the parent's choice, again
    try:
        queue.put(("ok", child_results(seed)))
    except BaseException as exc:  # reported to the parent
        queue.put(("error", repr(exc)))


def run_in_child(method: str) -> list:
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, 0, kernels.USE_BLAS_THREADS))
    proc.start()
    try:
        status, result = queue.get(timeout=240)
    finally:
        proc.join(60)
    assert proc.exitcode == 0, f"{method} child exited with {proc.exitcode}"
    assert status == "ok", result
    return result


def assert_same(got: list, want: list):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        # Batch 40 goes through BLAS, which another process's thread setup
        # may sum in another order.
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_forked_child_runs_the_kernels_after_the_parent(where):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform cannot fork")
    want = child_results()  # the parent uses the kernels and the pool first
    assert_same(run_in_child("fork"), want)


def test_spawned_child_runs_the_kernels(where):
    want = child_results()
    assert_same(run_in_child("spawn"), want)


def test_eight_user_threads_at_once(where):
    want = child_results()
    barrier = threading.Barrier(8, timeout=60)
    results = {}

    def user(k):
        barrier.wait()
        for _ in range(2):
            results[k] = child_results()
        w = weight((64, 256), seed=k)
        qt = quantize(w, "w4-g128")  # quantize too, in every thread at once
        np.testing.assert_array_equal(qt.codes, quantize(w, "w4-g128", backend="numpy").codes)

    run_users(user, 8)
    assert sorted(results) == list(range(8))
    for got in results.values():
        assert_same(got, want)


@pytest.mark.parametrize("scheme,kernel_name", [
    ("w8-channel", "dequantize_rows_16"), ("nvfp4", "dequantize_rows_16"),
    (Scheme("int", 4, "group", 40), "dequantize_rows_int4_split"), (Scheme("int", 3, "group", 40), "dequantize_rows"),
], ids=["16-lane", "16-lane coded scales", "int4 split", "rows"])
def test_tiles_split_as_blas_splits_its_gemm(scheme, kernel_name):
    # The large-batch tiles are dequantized with each OpenBLAS thread taking the
    # rows it packs in the GEMM that follows (chunks=0): every row of the tile
    # written once, whatever the count of rows and threads, bit-equal to one
    # thread taking all (tiles NaN-filled first: a row no thread took stays NaN).
    from npquant.kernels import _blas_threads

    if _blas_threads.blas_threads() < 2:
        pytest.skip("BLAS here is not an OpenBLAS with two threads or more the kernels can run on")
    assert _blas_threads._addresses()[3] > 0  # the probe saw each thread's position
    qt = quantize(weight((301, 320)), scheme)
    kernel, args = kernels._tile_kernel(qt, None)
    assert kernel.__name__ == kernel_name
    transposed = kernel is kernels.dequantize_rows_16  # (K, T) tiles, in groups of 16 rows
    k0, cols = (96, 160) if transposed else (80, 160)
    # (the weight's first row, its rows in the tile, the tile's width where transposed: the last tile padded)
    for o0, rows, width in [(0, 301, 301), (7, 1, 1), (7, 2, 2), (100, 3, 3), (40, 65, 65), (280, 21, 21),
                            (16, 64, 64), (280, 21, 48), (285, 16, 48)]:
        if width > rows and not transposed:
            continue
        shape, units = ((cols, width), -(-rows // 16)) if transposed else ((rows, cols), rows)
        one = np.full(shape, np.nan, np.float32)
        kernel(*args, o0, k0, one, np.zeros(1, np.int64), units)
        written, past = (one[:, :rows], one[:, rows:]) if transposed else (one, one[:0])
        assert not np.isnan(written).any() and np.isnan(past).all()
        for threads in (2, 3):
            tile = np.full(shape, np.nan, np.float32)
            _blas_threads.run(kernel, (*args, o0, k0, tile), units, threads, 0)
            np.testing.assert_array_equal(tile, one, err_msg=f"rows {o0}+{rows}, {threads} threads")


@pytest.mark.parametrize("scheme", ["w4-g128", "nvfp4", "w8-channel", "fp8-channel"])
def test_prepared_tiles_split_as_blas_splits_its_gemm(scheme):
    # The prepared layout's tiles, transposed (K, T): each thread takes the
    # blocks of 64 columns it packs in the GEMM; every column written once.
    from npquant.kernels import _blas_threads
    from npquant.kernels._tiles import dequantize_bytes_blocks_t, dequantize_int4_blocks_t

    if _blas_threads.blas_threads() < 2:
        pytest.skip("BLAS here is not an OpenBLAS with two threads or more the kernels can run on")
    p = prepare(quantize(weight((64 * 7, 256)), scheme))
    captured = []
    real = kernels._parallel

    def capture(kernel, args, *rest, **kw):
        captured.append((kernel, args[:-3]))  # the arguments before blk0, k0 and the tile
        return real(kernel, args, *rest, **kw)

    kernels._parallel = capture
    try:
        kernels.numba_linear(weight((130, 256), seed=3), p, tile_elements=64 * 7 * 128, tile_k=128)
    finally:
        kernels._parallel = real
    kernel, args = captured[-1]
    assert kernel in (dequantize_int4_blocks_t, dequantize_bytes_blocks_t)
    for blk0, blocks in [(0, 7), (1, 1), (2, 3), (0, 5)]:
        cols = 64 * blocks - (5 if blocks > 1 else 0)  # a last block cut short, as at the weight's end
        one = np.full((128, cols), np.nan, np.float32)
        kernel(*args, blk0, 128, one, np.zeros(1, np.int64), 1 << 20)
        assert not np.isnan(one).any()
        for threads in (2, 3):
            tile = np.full((128, cols), np.nan, np.float32)
            _blas_threads.run(kernel, (*args, blk0, 128, tile), -(-cols // 64), threads, 0)
            np.testing.assert_array_equal(tile, one, err_msg=f"blocks {blk0}+{blocks}, {threads} threads")


@pytest.mark.parametrize("n_units,parts", [(2048, 2), (768, 2), (301, 2), (301, 3), (10, 3), (1, 2), (5, 4)])
def test_own_units_follow_openblas_split_of_n(n_units, parts):
    # OpenBLAS cuts a GEMM's N into parts of ceil(left / parts left), in its
    # threads' order: the reference below, written from that rule. Each
    # thread then claims its own part, in one chunk, and nothing more.
    from numba import njit

    from npquant.kernels._jobs import _own_units
    from npquant.kernels._llvm import _claim

    @njit
    def own(work, n_units, parts, b, unit):
        counter, per = _own_units(work, 0, n_units, parts, b, unit)
        lo, hi = _claim(counter, per, n_units)
        lo2, hi2 = _claim(counter, per, n_units)
        return lo, hi, lo2 >= hi2, counter.ctypes.data

    work = np.full(3 * parts, 5, np.int64)
    start = 0
    for position in range(parts):
        width = -(-(n_units - start) // (parts - position))
        lo, hi, done, at = own(work, n_units, parts, position * 24, 24)
        assert (lo, hi, done) == (start, start + width, True), position
        assert at == work.ctypes.data + 24 * position  # its own three entries
        start += width
    assert start == n_units
    # parts 0: the threads share the units out by chunks from the one counter, all arguments as given
    work = np.zeros(1, np.int64)
    counter, per = njit(lambda w: _own_units(w, 9, n_units, 0, 48, 24))(work)
    assert per == 9 and counter.ctypes.data == work.ctypes.data
