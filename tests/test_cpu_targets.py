"""Every CPU: numba's target read exactly, nothing compiled for features the target lacks, and the whole package
importable and right where numba targets a CPU without AVX-512 (Zen 2)."""

import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")
from numba.core import config  # noqa: E402

from npquant import NpquantError, kernels  # noqa: E402
from npquant.kernels import _target  # noqa: E402


@pytest.fixture
def target(monkeypatch):
    """Set numba's target features for one test; the cached answers are cleared before and after."""

    def set_features(features):
        monkeypatch.setattr(config, "CPU_FEATURES", features)
        _target.has_avx512.cache_clear()
        _target.has_vnni.cache_clear()

    yield set_features
    monkeypatch.undo()
    _target.has_avx512.cache_clear()
    _target.has_vnni.cache_clear()


def test_target_features_are_what_numba_compiles_with():
    from numba.core.registry import cpu_target

    codegen = cpu_target.target_context.codegen()
    if not hasattr(codegen, "_tm_features"):
        pytest.skip("this numba keeps its target machine's features elsewhere; the string is checked by its rule below")
    assert _target.target_features() == codegen._tm_features


def test_a_feature_counts_only_where_the_string_enables_it(target):
    target("+avx2,+avx512f,-avx512f")  # the last mention wins, as in LLVM
    assert not _target.target_has("avx512f") and _target.target_has("avx2")
    assert not kernels.has_avx512()
    target("+avx2")  # silent on AVX-512: the CPU name would decide, so no
    assert not kernels.has_avx512() and not kernels.has_vnni()
    target("+avx512f,+avx512bw")
    assert kernels.has_avx512() and not kernels.has_vnni()
    target("+avx512f,+avx512bw,+avx512vnni")
    assert kernels.has_avx512() and kernels.has_vnni()
    target("+avx512f,+avx512bw,+avx512vnni,-evex512")  # AVX-512 features on 256-bit registers only
    assert not kernels.has_avx512() and not kernels.has_vnni()
    target(" +avx512f , +avx512bw ,")  # blanks and empty entries
    assert kernels.has_avx512()


def test_no_feature_kernel_on_a_target_without_avx512(target, monkeypatch):
    target(_target.features_of("znver2"))
    assert kernels._lut_kernels() is None and kernels._vnni_kernels() is None
    from npquant.kernels import _lut, _vnni

    # Their own guards refuse too, before anything reaches LLVM.
    for module in (_lut, _vnni):
        with pytest.raises(NpquantError, match="lacks"):
            module.compile_jobs.__wrapped__()


def test_a_kernel_that_fails_to_compile_warns_and_the_portable_ones_serve():
    def compile_jobs():
        raise RuntimeError("no such intrinsic")

    module = types.ModuleType("npquant.kernels._broken")
    module.compile_jobs = compile_jobs
    with pytest.warns(RuntimeWarning, match="_broken did not compile .*no such intrinsic"):
        assert kernels._compiled(module) is False
    assert kernels._compiled(module) is False  # once: cached, no second warning needed


def test_features_of_znver2():
    host = "+avx,+avx2,+avx512f,+avx512vnni,+avxvnni,+gfni,-sse4a,+fma,+amx-tile"
    flags = _target._flags(_target.features_of("znver2", host))
    assert flags["avx2"] and flags["fma"] and flags["sse4a"]
    assert not any(flags[name] for name in ("avx512f", "avx512vnni", "avxvnni", "gfni", "amx-tile"))
    assert set(_target._flags(host)) <= set(flags)  # every feature the host names is set one way or the other
    with pytest.raises(NpquantError, match="cpu='m1'"):
        _target.features_of("m1")


# What the subprocess runs: every module of the package imported, then each kernel path a batch-1 and a batch-8
# call can take, against the numpy reference.
_EVERY_MODULE = r"""
import importlib, pkgutil, warnings
import numpy as np
import npquant
from npquant import kernels

warnings.simplefilter("error")  # a fallback warning would mean a compile failed
names = [m.name for m in pkgutil.walk_packages(npquant.__path__, "npquant.")]
for name in names:
    importlib.import_module(name)
assert not kernels.has_avx512() and not kernels.has_vnni(), "the target was meant to lack AVX-512"
assert kernels._lut_kernels() is None and kernels._vnni_kernels() is None
w = np.random.default_rng(0).standard_normal((96, 256)).astype(np.float32)
for scheme in ("w4-g128", "w8-channel", "nvfp4", "mxfp4", "fp8-channel"):
    qt = npquant.quantize(w, scheme)
    for obj in (qt, npquant.prepare(qt)):
        for rows in (1, 8):
            x = np.random.default_rng(rows).standard_normal((rows, 256)).astype(np.float32)
            fast = npquant.linear(x, obj, backend="numba")
            ref = npquant.linear(x, qt, backend="numpy")
            # Both are float32 sums of 256 products, with at most 16 block sums and 2 scalings more: fewer
            # than 300 roundings on any path, so each is within 300 * 2**-24 |x| @ |W_hat|.T of the exact
            # sum, and within twice that of each other.
            bound = 2 * 300 * 2.0**-24 * (np.abs(x) @ np.abs(qt.dequantize()).T)
            assert np.all(np.abs(fast - ref) <= bound), (scheme, type(obj).__name__, rows)
print(len(names), "modules")
"""


@pytest.mark.slow
def test_every_module_imports_and_runs_where_numba_targets_avx2():
    # A fresh interpreter targeting Zen 2 on whatever this machine is: importing a module that compiled AVX-512
    # intrinsics at import would abort it (exit 134), not raise. Slow: the first run compiles every kernel for
    # that target (about a minute on 2 cores; cached after).
    env = dict(os.environ, NUMBA_CPU_NAME="znver2", NUMBA_CPU_FEATURES=_target.features_of("znver2"))
    done = subprocess.run([sys.executable, "-c", _EVERY_MODULE], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    assert "modules" in done.stdout
