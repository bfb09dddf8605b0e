"""How many threads a kernel call may use, read in compiled code: ``NPQUANT_NUM_THREADS``, else the CPU affinity.

The same reading as :func:`npquant.kernels.default_threads`, for the common
cases: the variable unset, empty, or a plain number of threads (ASCII
digits between ASCII blanks), and an affinity mask of at most 1024 CPUs on
Linux. Anything else (a value Python's ``int`` reads some other way or
refuses, a larger mask, another system) gives 0, and the caller asks
Python. Why compiled: a model calls its layers right after numpy's own
work has left the interpreter's memory out of cache (see
:mod:`npquant.kernels._buffers`); measured on 2 cores right after a float32
11008 x 4096 matmul, ``os.environ.get`` took about 31 us and
``os.sched_getaffinity`` 15 us, this function 8 us, and nothing at all
inside :func:`npquant.kernels._jobs.launch`, which calls it.
"""

import sys

import numpy as np
from numba import carray, njit

from ._llvm import _address_as, _getenv, _sched_getaffinity, _stack_empty

__all__ = ["threads_allowed"]

_NAME = tuple(b"NPQUANT_NUM_THREADS\0")  # 20 bytes: fits _stack_empty's 24
_MAX_DIGITS = 6
_BLANKS = tuple(b" \t\n\r\x0b\x0c")


@njit(cache=True)
def _is_blank(c):
    for b in _BLANKS:
        if c == b:
            return True
    return False


@njit(cache=True)
def _env_threads():
    """``NPQUANT_NUM_THREADS`` as a number of threads; -1 when unset or blank; 0 when Python must read it."""
    name = _stack_empty(1, 24, np.uint8)[0]
    for i in range(len(_NAME)):
        name[i] = _NAME[i]
    address = _getenv(name)
    if address == 0:
        return -1
    text = carray(_address_as(address, np.uint8), (1 << 16,))  # read only up to its NUL
    i = 0
    while text[i] != 0 and _is_blank(text[i]):
        i += 1
    n = 0
    digits = 0
    while ord("0") <= text[i] <= ord("9") and digits < _MAX_DIGITS:
        n = 10 * n + (text[i] - ord("0"))
        digits += 1
        i += 1
    while text[i] != 0 and _is_blank(text[i]):
        i += 1
    if text[i] != 0:  # more digits, a sign, an underscore, a letter, a non-ASCII blank
        return 0
    if digits == 0:
        return -1  # blank
    return n  # 0 threads: Python refuses it


if sys.platform.startswith("linux"):

    @njit(cache=True)
    def _affinity_count():
        """CPUs this process may run on (its affinity mask), or 0 when the mask does not fit 1024 bits."""
        mask = _stack_empty(1, 16, np.uint64)[0]
        if _sched_getaffinity(mask) != 0:
            return 0
        n = 0
        for word in mask:
            while word:
                word &= word - np.uint64(1)
                n += 1
        return n

else:

    @njit(cache=True)
    def _affinity_count():
        return 0


@njit(cache=True)
def threads_allowed():
    """:func:`npquant.kernels.default_threads` (>= 1), or 0 when only Python can tell (see the module's text)."""
    n = _env_threads()
    return _affinity_count() if n < 0 else n
