"""Root pytest configuration: skip collecting the numba kernels when numba is absent."""

import importlib.util

# --doctest-modules imports every module; the kernels import numba.
collect_ignore = [] if importlib.util.find_spec("numba") else ["src/npquant/kernels"]
