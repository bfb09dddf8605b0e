"""The kernels on OpenBLAS's own threads: one pool for numpy's BLAS and npquant.

After each BLAS call, OpenBLAS's worker threads poll for the next job for a
while (about 0.1 s) before they sleep. A model alternates numpy's BLAS calls
with npquant's, so those workers are always polling, and any other thread
the kernels start shares a core with one of them: measured on 2 cores,
11008 x 4096 at batch 1, the kernels ran about 2x slower alternating with
float32 matmuls than alone. Run on OpenBLAS's threads instead, the kernels
find them awake and take nothing from BLAS.

OpenBLAS runs a function on its threads through ``blas_level1_thread``
(exported, not documented; unchanged in its arguments since GotoBLAS):
``blas_level1_thread(mode, m, n, k, alpha, a, lda, b, ldb, c, ldc, routine,
nthreads)`` cuts ``m`` into ``nthreads`` parts and calls ``routine(m_part,
n, k, alpha, a + ..., lda, ...)`` once per part, the caller's thread taking
the first, and returns when all are done. With ``m = nthreads`` and
``lda = 0``, every thread gets the same ``a``: the job block of
:mod:`npquant.kernels._jobs`, whose kernels share the work out themselves.
``mode`` 3 asks for a real, non-complex routine whose ``alpha`` is a float
(double in current versions, double or extended in the oldest): every
precision passes ``alpha`` in a floating-point register, so the integer and
pointer arguments the jobs read land where they expect in all of them.

The large-batch tiles want more: each thread dequantizing the rows that
it packs in the GEMM after. OpenBLAS runs both calls' parts in the same
order of threads (the caller's first), and with ``b`` NULL and ``ldb`` 1
each part's ``b`` is its position times a width the build gives the
precision (measured by the probe): :func:`npquant.kernels._jobs.launch`
passes the thread count in ``k`` and that width in ``ldc``, untouched.

Used only when the process's BLAS is an OpenBLAS exporting that function
and a probe at first use runs a counting routine on exactly the threads
asked for; otherwise (MKL, Accelerate, BLIS, a failed probe) the kernels
use npquant's own pool (:mod:`npquant.kernels._pool`). The thread count is
BLAS's own, read at each call: limiting BLAS (``threadpoolctl``,
``OPENBLAS_NUM_THREADS``) limits the kernels alike. OpenBLAS handles fork
itself (its threads are restarted in the child on first use) and accepts
calls from several user threads at once.
"""

from __future__ import annotations

import ctypes
import functools
import numpy as np

__all__ = ["blas_threads", "run", "usable"]

_MODE = 3


@functools.cache
def _setup():
    """``(blas_level1_thread, BLAS's thread-count function, OpenBLAS controller, step between the threads' b)`` when
    usable here, else None. Probed once per process (a step of 0, where BLAS had one thread then, leaves the
    kernels unable to take OpenBLAS's own split: see :func:`npquant.kernels._jobs.launch`)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    libs = [c for c in ThreadpoolController().select(internal_api="openblas").lib_controllers]
    if len(libs) != 1:  # none, or two OpenBLAS copies: which one numpy calls is not ours to guess
        return None
    ctl = libs[0]
    try:
        fn = ctl.dynlib.blas_level1_thread
    except AttributeError:
        return None
    # The thread count threadpoolctl reads: its OpenMP builds' omp_get_max_threads, else
    # openblas_get_num_threads under the prefix and suffix the build gave its symbols.
    names = (["omp_get_max_threads"] if getattr(ctl, "threading_layer", None) == "openmp" else
             [f"{p}openblas_get_num_threads{s}" for p in ("", "scipy_") for s in ("", "64_", "_64")])
    get_threads = next((getattr(ctl.dynlib, n) for n in names if hasattr(ctl.dynlib, n)), None)
    if get_threads is None:
        return None
    get_threads.restype, get_threads.argtypes = ctypes.c_int, []
    if get_threads() != ctl.num_threads:
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                   ctypes.c_void_p, ctypes.c_int]
    unit = _probe(fn, max(1, ctl.num_threads))
    return None if unit is None else (fn, get_threads, ctl, unit)


_ALPHA = np.array([1.0, 0.0, 0.0, 0.0])  # read as a float, a double, an extended double or a complex pair


def _probe(fn, threads: int) -> int | None:
    """Whether ``fn`` runs a routine once per thread, each with ``m == 1`` and the block it was given: then the step
    between the threads' ``b`` (``NULL`` with ``ldb`` 1: each thread's position times a width the build gives the
    precision; 0 with one thread, where it cannot be seen), else None."""
    from numba import carray, cfunc

    from ._jobs import SIGNATURE
    from ._llvm import _fetch_add

    @cfunc(SIGNATURE)
    def count(m, n, k, alpha, a, lda, b, ldb, c, ldc, sb):
        blk = carray(a, (n,))
        for _ in range(m):
            slot = _fetch_add(blk[0:1])
            if slot < n - 2:
                blk[2 + slot] = b
        if k == 7:
            _fetch_add(blk[1:2])
        return 0

    block = np.zeros(2 + threads, np.int64)
    fn(_MODE, threads, block.size, 7, _ALPHA.ctypes.data, block.ctypes.data, 0, None, 1, None, 0, count.address,
       threads)
    if int(block[0]) != threads or int(block[1]) != threads:
        return None
    steps = np.sort(block[2:])
    unit = int(steps[1]) if threads > 1 else 0
    return unit if np.array_equal(steps, unit * np.arange(threads)) and (unit > 0 or threads == 1) else None


def usable() -> bool:
    """Whether the kernels can run on OpenBLAS's threads in this process (probed once)."""
    return _setup() is not None


def blas_threads() -> int:
    """OpenBLAS's thread count now, or 0 when the kernels cannot run on its threads."""
    setup = _setup()
    return 0 if setup is None else max(1, setup[1]())


@functools.cache
def _addresses() -> tuple:
    """``(blas_level1_thread, BLAS's thread-count function, alpha)`` as addresses and the step between the threads'
    ``b`` (:func:`_probe`), for :func:`npquant.kernels._jobs.launch`."""
    fn, get_threads, _, unit = _setup()
    return (ctypes.cast(fn, ctypes.c_void_p).value, ctypes.cast(get_threads, ctypes.c_void_p).value,
            _ALPHA.ctypes.data, unit)


def run(kernel, args: tuple, n_units: int, threads: int, chunks: int) -> int:
    """``kernel(*args, work, per)`` on OpenBLAS's threads (:func:`blas_threads` > 0): ``threads`` at most (0:
    :func:`npquant.kernels.default_threads`), BLAS's count now at most; about ``chunks`` chunks of its ``n_units``
    units per thread (0: the part of them that each thread takes of a GEMM, see
    :func:`npquant.kernels._jobs.launch`). Returns the threads used; 0, having run nothing, when ``threads`` is 0
    and only Python can read the default (see :func:`npquant.kernels._jobs.launch`).

    The arrays in ``args`` must be C-contiguous; the caller keeps them alive.
    """
    from ._jobs import job_address, launch

    job = job_address(kernel, args)
    fn, get_threads, alpha, unit = _addresses()
    return launch(fn, get_threads, _MODE, alpha, job, unit, threads, n_units, chunks, *args)
