"""Root pytest configuration.

--doctest-modules imports every module it collects: the numba kernels need
numba (skipped when it is absent), and tests/data holds the script that
made the reference embeddings with sentence-transformers, which the tests
never need.
"""

import importlib.util

collect_ignore = ["tests/data"]
if importlib.util.find_spec("numba") is None:
    collect_ignore.append("src/npquant/kernels")
