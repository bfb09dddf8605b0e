"""What numba compiles for: the CPU features of its target, read as numba hands them to LLVM.

Kernels written with an instruction set's own LLVM intrinsics (AVX-512's
``vpermps`` in :mod:`~npquant.kernels._lut`, ``vpdpwssd`` in
:mod:`~npquant.kernels._vnni`) cannot be compiled for a target without
it: LLVM does not raise there, it aborts the process ("Do not know how to
split the result of this operator!"). So whether a feature is there must
be known before the first compile, and known exactly, not guessed from
the host: numba compiles for the features string ``NUMBA_CPU_FEATURES``
gives, else for the host's (whatever ``NUMBA_CPU_NAME`` says: a CPU name
alone keeps the host's features, so ``NUMBA_CPU_NAME=znver2`` on an
AVX-512 machine still compiles AVX-512 code). :func:`target_features`
reads that string the way numba does, and :func:`target_has` says yes only
where it names the feature with a ``+`` (the last mention wins, as in
LLVM): where the string is silent, the CPU name would decide, and the
answer is no. A no where LLVM would have said yes costs speed (the
portable kernels serve); a yes is always right.

To compile as for a CPU without AVX-512 on one that has it, give both
variables: ``NUMBA_CPU_NAME=znver2`` and ``NUMBA_CPU_FEATURES`` from
:func:`features_of`. Tests and CI run the suite that way.
"""

from __future__ import annotations

import functools

__all__ = ["features_of", "has_avx512", "has_vnni", "target_features", "target_has"]

# The features LLVM 20 gives AMD's Zen 2 (znver2): AVX2 and FMA, no AVX-512,
# no VNNI of either width, no GFNI or VAES. Every other feature is turned off.
_ZNVER2 = frozenset("""
64bit adx aes avx avx2 bmi bmi2 clflushopt clwb clzero cmov crc32 cx16 cx8 f16c fma fsgsbase fxsr lzcnt
mmx movbe mwaitx pclmul popcnt prfchw rdpid rdpru rdrnd rdseed sahf sha sse sse2 sse3 sse4.1 sse4.2 sse4a
ssse3 wbnoinvd xsave xsavec xsaveopt xsaves
""".split())
_CPUS = {"znver2": _ZNVER2}


def target_features() -> str:
    """The features string numba compiles with: ``NUMBA_CPU_FEATURES`` if set, else the host's.

    Returns
    -------
    str
        Comma-separated ``+name`` / ``-name`` entries (LLVM's names), as
        numba passes them to LLVM's target machine.
    """
    from numba.core import config

    if config.CPU_FEATURES is not None:
        return config.CPU_FEATURES
    from numba.core.codegen import get_host_cpu_features

    return get_host_cpu_features()


def _flags(features: str) -> dict[str, bool]:
    """``{name: enabled}`` of a features string; a later entry for a name overrides an earlier one."""
    flags = {}
    for item in features.split(","):
        item = item.strip()
        if len(item) > 1 and item[0] in "+-":
            flags[item[1:]] = item[0] == "+"
    return flags


def target_has(*features: str) -> bool:
    """Whether numba's target names every one of ``features`` (LLVM's names, e.g. ``"avx512f"``) as enabled."""
    flags = _flags(target_features())
    return all(flags.get(f, False) for f in features)


@functools.cache
def has_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (foundation, 512-bit registers not turned off)."""
    return target_has("avx512f") and _flags(target_features()).get("evex512", True)


@functools.cache
def has_vnni() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI (``vpdpwssd``) on 512-bit registers."""
    return has_avx512() and target_has("avx512bw", "avx512vnni")


def features_of(cpu: str, host_features: str | None = None) -> str:
    """A complete features string for ``cpu`` (``"znver2"``): every feature LLVM lists here, ``+`` where ``cpu`` has it.

    Parameters
    ----------
    cpu : str
        A CPU this module knows (``"znver2"``: AVX2 and FMA, no AVX-512).
    host_features : str, optional
        The list of features to set, as numba's host string gives it
        (default: this host's). Names ``cpu`` has that the list lacks are
        added.

    Returns
    -------
    str
        For ``NUMBA_CPU_FEATURES``, beside ``NUMBA_CPU_NAME=cpu``.
    """
    from ..errors import NpquantError

    if cpu not in _CPUS:
        raise NpquantError(f"cpu={cpu!r}: expected one of {sorted(_CPUS)}")
    if host_features is None:
        from numba.core.codegen import get_host_cpu_features

        host_features = get_host_cpu_features()
    has = _CPUS[cpu]
    names = list(_flags(host_features)) + sorted(has - set(_flags(host_features)))
    return ",".join(("+" if name in has else "-") + name for name in names)
