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


def last_level_cache_bytes(default: int = 32 << 20, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Bytes of the largest CPU cache cpu0 reports (Linux sysfs under ``root``, sizes such as ``491520K``, read by
    ``npquant._caches.cache_sizes``; else ``sysconf``), or ``default``.

    A benchmark whose weights must come from memory, as a large model's do,
    rotates over copies that together outgrow this.
    """
    import os

    from npquant._caches import cache_sizes

    sizes = [size for _, size in cache_sizes(root)]
    if not sizes:
        try:
            sizes.append(int(os.sysconf("SC_LEVEL3_CACHE_SIZE")))
        except (ValueError, OSError, AttributeError):
            pass
    best = max(sizes, default=0)
    return best if best > 0 else default
