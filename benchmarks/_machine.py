"""What the benchmarks say of the machine they ran on."""


def instruction_set() -> str:
    """What numba compiles the kernels for: the CPU features the kernel choice reads (npquant.kernels.explain)."""
    try:
        from numba.core import config

        from npquant.kernels import has_avx512, has_vnni
    except ImportError:
        return "numba not installed: the numpy backend"
    isa = "AVX-512 VNNI" if has_vnni() else "AVX-512" if has_avx512() else "no AVX-512 (AVX2 kernels)"
    target = config.CPU_NAME or "host"
    given = " with NUMBA_CPU_FEATURES" if config.CPU_FEATURES is not None else ""
    return f"{isa}; numba's target {target}{given}"
