"""npquant's own thread pool: the kernels' threads sleep between calls, so BLAS keeps the cores.

Why not numba's ``parallel=True``: its threading layers either spin after
each parallel region (GNU OpenMP: for milliseconds, on every core), which
slows the float32 BLAS call a model makes next, or abort a forked child
("fork() called from a process already using GNU OpenMP"), or (workqueue)
abort when two user threads launch kernels at once. The kernels are
therefore serial, GIL-free numba functions, and a call runs one of them on
several threads at once: the caller's and sleeping workers of this pool.

How a call runs (:func:`run`): the caller queues ``n - 1`` tasks, wakes as
many workers, and runs ``fn`` itself. Each copy of ``fn`` takes chunks of
the work from a shared atomic counter (:func:`npquant.kernels._llvm._claim`)
until none is left, so the threads balance themselves: when a core is busy
(OpenBLAS's idle workers poll for a while after each BLAS call), the thread
on it takes fewer chunks instead of holding the call back. A task no worker
has started when the caller is done is cancelled: the caller never waits
for a worker that was not needed.

Safety: each call owns its counter and tasks, so user threads may call at
once; a forked child starts with no workers and a fresh pool (the parent's
locks may have been held at the fork); a spawned child imports afresh.
Workers are daemon threads, created on first need.
"""

from __future__ import annotations

import collections
import os
import threading

__all__ = ["cpu_count", "run"]


def cpu_count() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Task:
    """One copy of a call's function for a worker; ``claim`` decides who runs it (a worker) or cancels it (the caller)."""

    __slots__ = ("fn", "claim", "done", "error")

    def __init__(self, fn):
        self.fn = fn
        self.claim = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Pool:
    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Task] = collections.deque()
        self._workers = 0

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                task = self._queue.popleft()
            if not task.claim.acquire(blocking=False):
                continue  # the caller finished without it
            try:
                task.fn()
            except BaseException as exc:  # re-raised in the caller
                task.error = exc
            finally:
                task.done.set()

    def run(self, fn, n: int) -> None:
        tasks = [_Task(fn) for _ in range(n - 1)]
        with self._cv:
            while self._workers < len(tasks):
                threading.Thread(target=self._work, name=f"npquant-kernels-{self._workers}", daemon=True).start()
                self._workers += 1
            self._queue.extend(tasks)
            self._cv.notify(len(tasks))
        try:
            fn()
        finally:
            for task in tasks:
                if not task.claim.acquire(blocking=False):  # a worker has it: wait for it
                    task.done.wait()
        for task in tasks:
            if task.error is not None:
                raise task.error


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _POOL, _POOL_LOCK
    _POOL = None  # the parent's workers do not exist here
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def run(fn, n: int) -> None:
    """Run ``fn()`` on ``n`` threads at once (the caller's and ``n - 1`` workers); return when all are done.

    ``fn`` must share its work out itself (the kernels claim chunks from an
    atomic counter) and be safe to run ``n`` times concurrently; copies that
    no worker started before the caller's copy returned are not run. The
    first error of any copy is raised here, after every copy has finished.
    """
    global _POOL
    if n <= 1:
        fn()
        return
    pool = _POOL
    if pool is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = _Pool()
            pool = _POOL
    pool.run(fn, n)
