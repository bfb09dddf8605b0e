"""numba's disk cache keyed on all of npquant's numba sources (npquant._numba_cache): an edit to any of them
recompiles every function that may hold its code, and numba functions outside npquant keep numba's own keys."""

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="numba is not installed (pip install 'npquant[fast]'); the kernels are optional")

from npquant import _numba_cache
from npquant import kernels  # installs the locators
from npquant.kernels import _gemv, _jobs, _nonlinear
from numba import cfunc


def _locator(dispatcher):
    return dispatcher._cache._impl.locator


def test_kernels_and_their_jobs_share_one_key_over_every_source():
    # The job OpenBLAS's threads run holds the kernel from another file: both must be keyed on both files.
    job = cfunc(_jobs.SIGNATURE, cache=True)(_jobs.gemv_int4_blocks_job)  # as _jobs.job_address compiles it
    for fn in (_gemv.gemv_int4_blocks, _nonlinear.gelu, job, kernels._buffers.empty_aligned):
        loc = _locator(fn)
        assert getattr(type(loc), "_npquant", False), type(loc).__name__
        assert loc.get_source_stamp() == _numba_cache.stamp()
    names = {os.path.basename(p) for p in _numba_cache.sources()}
    assert {"_gemv.py", "_jobs.py", "_decode.py", "_quantize_numba.py"} <= names


def test_digest_follows_every_file(tmp_path):
    files = [tmp_path / n for n in ("a.py", "b.py", "c.py")]
    for i, f in enumerate(files):
        f.write_text(f"x = {i}\n")
    paths = [str(f) for f in files]
    first = _numba_cache.digest(paths)
    assert _numba_cache.digest(paths) == first
    files[2].write_text("x = 2  # edited\n")  # the last file alone: the key of all changes
    assert _numba_cache.digest(paths) != first
    files[2].write_text("x = 2\n")
    os.utime(files[2], ns=(1, 1))  # back to the same contents: the same key whatever the time stamp
    assert _numba_cache.digest(paths) == first


def test_other_numba_functions_keep_numba_keys(tmp_path, monkeypatch):
    (tmp_path / "elsewhere_mod.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("elsewhere_mod")
    assert mod.f(1) == 2
    assert not getattr(type(_locator(mod.f)), "_npquant", False)


def test_install_is_idempotent_and_honours_numba_cache_dir(tmp_path):
    from numba.core import caching

    before = list(caching.CacheImpl._locator_classes)
    _numba_cache.install()
    assert caching.CacheImpl._locator_classes == before
    code = ("from npquant.kernels import _gemv; "
            "print(type(_gemv.gemv_bytes._cache._impl.locator).__name__)")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NpquantUserProvidedCacheLocator"


def test_a_source_unreadable_later_falls_back_to_numbas_key(monkeypatch):
    loc = _locator(_gemv.gemv_int4_blocks)

    def gone():
        raise FileNotFoundError("a kernel source removed after import")

    monkeypatch.setattr(_numba_cache, "stamp", gone)
    base = type(loc).__mro__[1]  # numba's own locator class this one extends
    assert loc.get_source_stamp() == base.get_source_stamp(loc)
