"""Fused quantized-linear kernels (optional extra ``npquant[fast]``: numba, threadpoolctl).

Importing this package imports numba; :func:`npquant.linear` imports it only
when the ``"numba"`` backend is asked for (or ``"auto"`` finds numba).
Kernels compile on first use and are cached on disk, so a second process
loads them instead of compiling; nothing compiles for a CPU feature at
import (:mod:`~npquant.kernels._target`).

Which kernel a call runs is one table, :data:`ROUTES`: a row per kernel,
by layout (:class:`~npquant.QuantizedTensor`, the checkpoint layout, or
:class:`~npquant.PreparedTensor`), batch (1, 2 to :func:`small_m`, larger),
the codes it reads and the CPU features it needs; the first row a call
fits takes it, and :func:`explain` says which and why. Batch 1 and small
batches read each code once, decoded in registers (by table lookup where
AVX-512 is, as exact integer dot products for int8 where AVX-512 VNNI is);
larger batches dequantize tiles of 1-2 MiB on all threads for
OpenBLAS to multiply, so the float32 weight never exists whole. The
kernels run on OpenBLAS's own threads where numpy's BLAS lets them
(:mod:`~npquant.kernels._blas_threads`), else on npquant's pool.

The modules, one idea each: ``_decode`` (code formats to float32),
``_gemv`` (batch 1), ``_small_m`` (batch 2 to :func:`small_m`), ``_tiles``
and ``_vector`` (dequantization for BLAS, 16 codes as one LLVM vector),
``_tiling`` (the large-batch tiles and BLAS over them), ``_sgemm``
(OpenBLAS's GEMM adding into its output), ``_lut`` (batch-1 4-bit kernels
decoding by table lookup, AVX-512), ``_vnni`` (batch-1 int8 as exact
integer dot products, AVX-512 VNNI), ``_target`` (the CPU features numba
compiles for), ``_nonlinear`` (GELU, LayerNorm and softmax in one pass
each), ``_llvm`` (bit casts, stack arrays, the atomic work counter),
``_jobs`` and ``_blas_threads`` (the kernels on OpenBLAS's threads),
``_pool`` (npquant's own threads), ``_buffers`` (aligned outputs and
copies of ``x``), ``_env`` (the thread count the environment allows, read
in compiled code). ``docs/kernels.md`` holds the design of each path and
the measurements that chose it; ``docs/performance.md`` the figures.

This module is longer than the others because it holds one idea whole: the
table and the runners it names (each a few lines that turn a tensor into
one kernel's arguments), which read best beside each other.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import Callable, NamedTuple

import numpy as np

from .. import _numba_cache
from ..errors import NpquantError
from ..activations import quantize_activations_fp8
from ..linear_w8a8 import MAX_FP8_K, scale_outputs
from ..linear_w8a8_apply import w8a8_reference, weight_codes
from ..prepared import _W8A8_MAX_K, ROWS, PreparedTensor, PreparedW8A8, prepare
from ..tensor import QuantizedTensor, _float_code_values

_numba_cache.install()  # before any kernel is defined: one cache key for all numba sources (see there)

from . import _blas_threads, _buffers, _pool, _tiling
from . import _nonlinear, _w8a8_fp8
from ._args import (_BYTE_KIND, _FP8, _INT4_OFFSET, _INT4_TWOS, _NIBBLES, _NO_E4M3, _NO_SCALE_2D,  # noqa: F401
                    _NO_SCALE_BLOCKS, _NO_SCALE_CODES, _NO_SCALE_CODES_2D, _NO_SCALE_TABLE, _NO_ZP, _NO_ZP_BLOCKS,
                    _PLANS, _VK_OF_KIND, _code_kind, _code_scale_values, _dequantize_rows_args, _dequantizes,
                    _kernel_args, _lut_args, _lut_rows_shape, _plan, _prepared_scales, _prepared_zp, _scale_table,
                    _scale_values, _vector_kind, _y_mult)
from ._decode import e4m3_multipliers
from ._env import threads_allowed
from ._target import has_avx512, has_vnni
from ._gemv import gemv_bytes, gemv_bytes_blocks, gemv_int4, gemv_int4_blocks
from ._small_m import gemm_small_m, gemm_small_m_bytes_blocks, gemm_small_m_int4_blocks
from ._tiling import tile_shape, tiled
from ._tiles import (dequantize_bytes_blocks_t, dequantize_int4_blocks_t, dequantize_rows, dequantize_rows_16,
                     dequantize_rows_int4_split)

__all__ = ["numba_linear", "numba_dequantize", "has_kernels", "explain", "ROUTES", "Route", "default_threads", "SMALL_M",
           "small_m", "batch_rows", "gelu", "add_layer_norm", "softmax_scaled"]

#: Largest batch a checkpoint tensor's small-batch kernel takes (one-byte codes; others stop earlier, the prepared
#: layout's kernels go further: :func:`small_m`).
SMALL_M = 32
_FLOAT32 = np.dtype(np.float32)
_TILE_ELEMENTS = 1 << 19  # 2 MiB float32 tile for the large-M path
_TILE_K = 256  # its columns, where tiles add into y (see _tiling.tiled)
# The prepared layout's tiles up to this many rows of x: 1 MiB, 128 columns. 11008 x 4096, each call after a
# float32 matmul of another matrix, the two sizes alternating in one process (4 rounds), ratio to float32 for
# 2 MiB / 256 -> 1 MiB / 128: batch 32 w8-channel 0.922 -> 0.857, w4-g128 0.903 -> 0.829, fp8-channel 0.935 ->
# 0.868, nvfp4 0.914 -> 0.856; batch 128 1.035 -> 1.005, 1.040 -> 0.977, 1.043 -> 0.997, 1.058 -> 1.000 (numba
# targeting Zen 2: batch 32 0.952 -> 0.909, 0.947 -> 0.888, 0.985 -> 0.980; 128 1.047 -> 1.037, 1.024 -> 0.995,
# 1.048 -> 1.062); batch 64 0.957 -> 0.904; 4096 x 11008 at 128 1.062 -> 1.031, 1.069 -> 1.020. More rows of x
# want deeper tiles (each pass adds into y: M x T floats): batch 256 1.057 -> 1.082, 512 1.057 -> 1.116. The
# checkpoint layout's tiles gained nothing clear (within 2% either way) and keep 2 MiB / 256. bench_linear.py at
# batch 128, prepared, two runs each way in turn: w8 / w4-g128 / fp8 1.040 1.053 1.035 and 1.023 1.043 1.027 ->
# 1.005 0.988 1.003 and 1.009 1.022 1.013 (host); Zen 2 target 1.041 1.018 1.067 and 1.058 1.062 1.051 ->
# 1.049 1.041 1.039 and 1.038 1.024 1.056.
# Only where the L2 holds such a tile twice (the tile and BLAS's packed copy of it): on an AMD EPYC (Zen 3, 512 KiB
# of L2 a core, 32 MiB of L3), 11008 x 4096, numba for the host (AVX2), the two sizes alternating in one process
# (11 rounds), 1 MiB / 128 -> 2 MiB / 256: batch 128 w8-channel 1.115 -> 1.052, w4-g128 1.090 -> 1.060; batch 80
# w8-channel 1.085 -> 1.054; batch 100 w4-g128 1.081 -> 1.044 (larger tiles, 4-8 MiB, gained nothing clear more).
_NARROW_TILES_UP_TO = 128
_NARROW_TILE_ELEMENTS = 1 << 18
_NARROW_TILE_K = 128
# Below this cost (weights times rows of x: the multiply-adds, whatever the
# code width) a call runs in the caller's thread alone: handing work to
# another thread costs more than it saves. Measured on the MiniLM encoder
# (one sentence, ~12 tokens): 384 x 384 layers alone, 1536 x 384 and the
# fused 1152 x 384 QKV on both threads. Dequantizing a tile counts its bytes.
_PARALLEL_FROM = 1 << 22
# The small-batch kernels (2 to small_m rows of x) take both threads from a quarter of that: there each weight meets
# several rows, so a call of 1-4 M multiply-adds runs long enough to share. Measured on an Intel Xeon, MiniLM one
# sentence (12 tokens: its 384 x 384 layers, 1.8 M, now on both threads), the thresholds alternating in one
# process, 30 rounds: w8-channel 0.541 -> 0.520 of float32 (AVX2 build), 0.433 -> 0.418 (host); w4-g128 and
# fp8-channel alike. 256 K changed nothing more.
_SMALL_M_PARALLEL_FROM = 1 << 20
# A tile of the large-batch path is dequantized on all threads from this
# many bytes of float32: BLAS's workers, just used for the tile before it or
# the model's own matmul, are still polling, so handing them work is cheap.
_PARALLEL_TILE_FROM = 1 << 18
_CHUNKS_PER_THREAD = 8
# From this many multiply-adds a small-batch e4m3 call scales x by 2**8 (a copy) so that each code's decode loses
# its multiply: the same products, the same bits. Measured on an AMD EPYC (Zen 3), one thread, codes in cache, 8
# and 12 rows of 4096 x 4096 and 1536 x 384: 0.92-0.98 of the kernel's time; but the copy and the scan of x for
# its largest element cost about 9 us a call (more inside a model), which made MiniLM's one sentence (24 calls of
# 1.8-7 M) 8-11% slower (two runs of 60-80 rounds, the two settings alternating in one process).
_X_TAKES_E4M3_FROM = 1 << 24
# GELU, LayerNorm and softmax (elements) run on all threads from this size: one sentence's feed-forward
# activations (12 x 1536) stay in the caller's thread, a batch's (480 x 1536) take every core.
_NONLINEAR_PARALLEL_FROM = 1 << 16
#: Whether kernels run on OpenBLAS's threads where they can (tests switch it off to reach the pool).
USE_BLAS_THREADS = True
#: Whether batch-1 4-bit calls take the table-lookup kernels where numba's target has AVX-512
#: (:mod:`npquant.kernels._lut`; tests switch it off to reach the portable ones).
USE_LUT = True
#: Whether batch-1 int8 calls take the exact integer kernel where numba's target has AVX-512 VNNI
#: (:mod:`npquant.kernels._vnni`; tests switch it off to reach the float32 one).
USE_VNNI = True
def _aligned_empty(shape: tuple) -> np.ndarray:
    """An uninitialised C-contiguous float32 ``(n,)`` or ``(m, n)`` array whose data starts on a cache line.

    malloc aligns large blocks to 16 bytes only; BLAS and the kernels read
    and write these tiles, outputs and copies of ``x`` by whole lines.
    """
    if len(shape) == 1:
        return _buffers.empty_aligned(1, shape[0])[0]
    return _buffers.empty_aligned(*shape)


def _e4m3_multipliers(x2: np.ndarray) -> np.ndarray:
    """The ``e4m3_mults`` of :func:`gemv_bytes` and :func:`gemv_bytes_blocks` for float32 ``x2 (1, I)``: see
    :func:`~npquant.kernels._decode.e4m3_multipliers` (compiled: one call where numpy took six)."""
    return e4m3_multipliers(x2)


def _even_odd(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x's even and odd columns, each C-contiguous float32 ``(M, I / 2)``: what byte ``j``'s two nibbles meet."""
    return _buffers.even_odd(x2)


def _vnni_kernels():
    """:mod:`npquant.kernels._vnni` where it can run (AVX-512 VNNI, ``USE_VNNI``), else None. Compiles it on first
    use."""
    if not (USE_VNNI and has_vnni()):
        return None
    from . import _vnni

    return _vnni if _compiled(_vnni) else None


def _lut_kernels():
    """:mod:`npquant.kernels._lut` where it can run (AVX-512, ``USE_LUT``), else None. Compiles it on first use."""
    if not (USE_LUT and has_avx512()):
        return None
    from . import _lut

    return _lut if _compiled(_lut) else None


@functools.cache
def _compiled(module) -> bool:
    """Whether ``module``'s feature-specific jobs compiled (:func:`~npquant.kernels._lut.compile_jobs`); where they
    did not, a warning says so once and the portable kernels serve. The feature check before it is exact
    (:mod:`npquant.kernels._target`), so LLVM is never handed an instruction the target lacks."""
    try:
        module.compile_jobs()
    except Exception as error:  # a compile error must cost speed, not the call
        warnings.warn(f"npquant: {module.__name__} did not compile ({type(error).__name__}: {error}); "
                      "the portable kernels serve instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def _lut_rows_fit(qt: QuantizedTensor) -> bool:
    """Whether :func:`~npquant.kernels._lut.gemv_lut_rows` reads ``qt``: 4-bit codes in whole blocks of 16 columns
    (in pairs) or a multiple of 32."""
    return _lut_rows_shape(qt) and _lut_kernels() is not None


def has_kernels(qt: QuantizedTensor | PreparedTensor | PreparedW8A8, m_rows: int = 1) -> bool:
    """Whether the kernels read ``qt``'s codes for a batch of ``m_rows``.

    Every format but blocks cut at the weight's edge (``m_rows``
    does not matter: every batch has kernels). :func:`npquant.linear` takes
    the numpy path for the others.
    """
    if isinstance(qt, (PreparedTensor, PreparedW8A8)):
        return True
    return _plan(qt)[2]


def numba_dequantize(qt: QuantizedTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    """float32 ``(R, I)``: rows ``[start, stop)`` of ``qt``'s weight, bit-equal to ``qt.dequantize_rows``."""
    if not _dequantizes(qt):
        return qt.dequantize_rows(start, stop)
    stop = qt.shape[0] if stop is None else stop
    out = np.empty((stop - start, qt.shape[1]), np.float32)
    kernel, args = _dequantize_rows_args(qt, None)
    _parallel(kernel, (*args, start, 0, out), out.shape[0], out.nbytes, None)
    return out


def default_threads() -> int:
    """Threads a kernel call may use: ``NPQUANT_NUM_THREADS`` if set, else every core this process may run on."""
    n = threads_allowed()  # compiled, for the common cases (see _env)
    if n > 0:
        return n
    env = os.environ.get("NPQUANT_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise NpquantError(f"NPQUANT_NUM_THREADS={env!r}: expected a whole number of threads >= 1")
        return n
    return _pool.cpu_count()


def _parallel(kernel, args: tuple, n_units: int, cost: int, threads: int | None,
              parallel_from: int = _PARALLEL_FROM, as_gemm: bool = False) -> None:
    """``kernel(*args, work, per)`` on the threads the call deserves: ``threads``, or by default one below a cost
    (weights times rows of ``x``; a tile's bytes) of ``parallel_from``, else :func:`default_threads`.

    On OpenBLAS's threads where it can (:mod:`npquant.kernels._blas_threads`:
    as many as BLAS has now; the default read there, in compiled code), else
    on npquant's pool (:mod:`npquant.kernels._pool`). The kernel takes
    chunks of ``per`` of its ``n_units`` units (blocks of rows) from the
    counter ``work`` until none is left: about ``_CHUNKS_PER_THREAD`` chunks
    per thread, so a slowed thread takes fewer. ``as_gemm``: a tile for
    BLAS, each of OpenBLAS's threads taking the part it will pack for the
    GEMM (:func:`~npquant.kernels._jobs.launch`).
    """
    if threads is None:
        threads = 1 if cost < parallel_from else 0  # 0: default_threads()
    blas = threads != 1 and n_units > 1 and USE_BLAS_THREADS and _blas_threads.usable()
    chunks = 0 if as_gemm else _CHUNKS_PER_THREAD
    if blas and _blas_threads.run(kernel, args, n_units, threads, chunks):
        return  # 0 threads used: the default is one only Python reads (or refuses)
    n = max(1, min(threads or default_threads(), n_units))
    if blas and n > 1:
        _blas_threads.run(kernel, args, n_units, n, chunks)
        return
    work = np.zeros(1, np.int64)
    if n == 1:
        kernel(*args, work, n_units)
        return
    per = max(1, -(-n_units // (n * _CHUNKS_PER_THREAD)))
    _pool.run(lambda: kernel(*args, work, per), n)


def numba_linear(x2: np.ndarray, qt: QuantizedTensor | PreparedTensor, tile_elements: int | None = None,
                 threads: int | None = None, tile_k: int | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """float32 ``(M, O)`` = ``x2 (M, I) @ W.T`` (``+ bias``) for a floating ``x2 (M, I)``, by the kernel
    :data:`ROUTES` names.

    ``tile_elements`` bounds each float32 tile of the tiled paths, ``tile_k``
    its columns (None: 2 MiB and 256, or for the prepared layout up to 128
    rows of ``x``, 1 MiB and 128);
    ``threads`` is the number of threads (default: :func:`default_threads`,
    one for small layers). A tensor no kernel reads (:func:`has_kernels`)
    goes through numpy's tiles (:func:`npquant.linear`'s ``"numpy"`` backend).
    ``bias``: float32 ``(O,)`` or None, added to the float32 product: in the
    int8 GEMM's epilogue (one pass over ``y`` less), else after the kernel;
    the same sum either way.
    """
    out_features, in_features = qt.shape
    m_rows = x2.shape[0]
    if x2.ndim != 2 or x2.shape[1] != in_features:  # the kernels and BLAS read x by the weight's shape
        raise NpquantError(f"x must be (M, {in_features}) for a weight of shape {qt.shape}, got {x2.shape}")
    if x2.dtype is not _FLOAT32 and x2.dtype != _FLOAT32:  # identity first (cheap); arrays numba made hold equal copies
        x2 = x2.astype(np.float32)
    route = _route(qt, m_rows)
    if route.run is None:
        from ..linear_numpy import numpy_linear

        y = numpy_linear(x2, qt, tile_elements or _TILE_ELEMENTS)
    elif qt.scheme.activations is not None:  # W8A8: x quantized per token inside the call, the runner's own output
        return route.run(x2, qt, None, _Call(tile_elements, tile_k, threads, bias))
    else:
        # The kernels read x by whole lines; BLAS (larger batches) does not care, and
        # copying a batch of hundreds of rows to align it cost 0.2-0.5 ms a call.
        x2, y = _buffers.io_aligned(x2, out_features, route.batch != _LARGE)  # one compiled call (see _buffers)
        route.run(x2, qt, y, _Call(tile_elements, tile_k, threads))
    if bias is not None:
        y += bias
    return y


class _Call(NamedTuple):
    """What a call asks of its kernel besides ``x`` and the weight."""

    tile_elements: int | None  # None: the path's own (see numba_linear)
    tile_k: int | None
    threads: int | None
    bias: np.ndarray | None = None  # float32 (O,): added by the W8A8 runners, in their epilogue or after


def _cost(x2: np.ndarray, t) -> int:
    """Weights times rows of ``x``: the multiply-adds of a call, whatever the code width."""
    return t.shape[0] * t.shape[1] * x2.shape[0]


def _run_lut_rows(x2, qt, y, call) -> None:
    """:func:`~npquant.kernels._lut.gemv_lut_rows` (or its one-byte-scale twin), four rows per load of ``x``."""
    coded, *args = _plan(qt)[3] or _lut_args(qt)
    lut = _lut_kernels()
    kernel = lut.gemv_lut_rows_coded if coded else lut.gemv_lut_rows
    x_even, x_odd = _even_odd(x2)
    _parallel(kernel, (x_even[0], x_odd[0], *args, y), -(-qt.shape[0] // 4), _cost(x2, qt), call.threads)


def _run_tiles(x2, qt, y, call) -> None:
    """Tiles dequantized by all threads, then BLAS (:func:`_rows_linear`)."""
    _rows_linear(x2, qt, _plan(qt)[0], y, call.tile_elements or _TILE_ELEMENTS, call.tile_k or _TILE_K,
                 call.threads)


def _run_vnni(x2, qt, y, call) -> None:
    """:func:`~npquant.kernels._vnni.gemv_int8_exact`; NaN or Inf in ``x`` (no integers for them) go on to
    :func:`_run_gemv_bytes`, which gives them their float32 meaning."""
    codes, scale, zp, has_zp, bo, bi = (_plan(qt)[0] or _kernel_args(qt))[:6]
    vnni = _vnni_kernels()
    _parallel(vnni.gemv_int8_exact, (x2, codes, scale, bo, bi, y), -(-qt.shape[0] // vnni.ROW_SET), _cost(x2, qt),
              call.threads)
    if y[0, 0] != y[0, 0]:
        _run_gemv_bytes(x2, qt, y, call)


def _run_gemv_bytes(x2, qt, y, call) -> None:
    """:func:`~npquant.kernels._gemv.gemv_bytes`: eight rows per load of ``x``."""
    codes, scale, zp, has_zp, bo, bi, kind = (_plan(qt)[0] or _kernel_args(qt))[:7]
    code_kind = 0 if kind == 0 else 1 if _FP8[qt.scheme.dtype][0] else 2  # int8, e4m3, e5m2 (float16 decode)
    mults = _e4m3_multipliers(x2) if code_kind == 1 else _NO_E4M3
    _parallel(gemv_bytes, (x2, codes, scale, bo, bi, code_kind, mults, y), -(-qt.shape[0] // 8), _cost(x2, qt),
              call.threads)


def _run_gemv_int4(x2, qt, y, call) -> None:
    """:func:`~npquant.kernels._gemv.gemv_int4`: each byte's two nibbles against ``x``'s even and odd columns."""
    codes, scale, zp, has_zp, bo, bi, kind, bits, base_off = (_plan(qt)[0] or _kernel_args(qt))[:9]
    x_even, x_odd = _even_odd(x2)
    _parallel(gemv_int4, (x_even[0], x_odd[0], codes, scale, zp, has_zp, bo, bi, base_off, y), qt.shape[0],
              _cost(x2, qt), call.threads)


def _run_small_m(x2, qt, y, call) -> None:
    """:func:`~npquant.kernels._small_m.gemm_small_m`: each weight row decoded once, in L1, for every row of ``x``."""
    _parallel(gemm_small_m, (x2, *(_plan(qt)[0] or _kernel_args(qt)), y), -(-qt.shape[0] // 4), _cost(x2, qt),
              call.threads, _SMALL_M_PARALLEL_FROM)


def _rows_linear(x2: np.ndarray, qt: QuantizedTensor, args: tuple | None, y: np.ndarray, tile_elements: int,
                 tile_k: int, threads: int | None) -> None:
    """``y (M, O) = x2 (M, I) @ W.T`` for a larger batch: the weight dequantized tile by tile for BLAS
    (:func:`~npquant.kernels._tiling.tiled`); ``args`` the plan's :func:`_kernel_args`, or None."""
    out_features, in_features = qt.shape
    kernel, kernel_args = _tile_kernel(qt, args)
    transposed = kernel is dequantize_rows_16 and kernel_args[-1]  # tiles (K, T), in groups of 16 rows
    tile_rows, tile_cols = tile_shape(out_features, in_features, tile_elements, tile_k, 16 if transposed else 1,
                                      padded=transposed)
    if kernel is dequantize_rows_int4_split:
        x2 = _split_columns(x2, tile_cols)

    def dequantize(o0: int, k0: int, w_tile: np.ndarray) -> None:
        n_units = -(-min(w_tile.shape[1], out_features - o0) // 16) if transposed else w_tile.shape[0]  # as units16
        _parallel(kernel, (*kernel_args, o0, k0, w_tile), n_units, w_tile.nbytes, threads, _PARALLEL_TILE_FROM,
                  as_gemm=True)

    tiled(x2, y, tile_rows, tile_cols, dequantize, transposed, padded=transposed)


def _tile_kernel(qt: QuantizedTensor, args: tuple | None) -> tuple:
    """``(kernel, its arguments before o0)``: the row kernel of :func:`_rows_linear`'s tiles (``args`` as for
    :func:`_dequantize_rows_args`). The 16-lane kernel writes them transposed, ``(K, T)``: BLAS multiplies
    those as they are, faster than ``(T, K)`` tiles it transposes (11008 x 4096 at batch 128, BLAS alone over
    ready tiles: 0.86-0.88 of the float32 matmul, 0.96-0.99 transposing). 4-bit codes in blocks not whole 16s
    dequantize faster into even|odd column order (unit-stride stores: 8.3 -> 4 ms for 11008 x 4096), and then
    x's columns follow suit in each tile's columns (:func:`_split_columns`)."""
    kernel, kernel_args = _dequantize_rows_args(qt, args)
    if kernel is dequantize_rows_16:
        return kernel, kernel_args[:-1] + (True,)
    if kernel is dequantize_rows and kernel_args[6] == 2:
        return dequantize_rows_int4_split, kernel_args[:6] + kernel_args[8:9]
    return kernel, kernel_args


def _split_columns(x2: np.ndarray, tile_cols: int) -> np.ndarray:
    """float32 ``(M, I)``: in each ``tile_cols`` columns of ``x2 (M, I)``, the even ones, then the odd ones."""
    in_features = x2.shape[1]
    x_split = _aligned_empty(x2.shape)
    for k0 in range(0, in_features, tile_cols):
        k1 = min(k0 + tile_cols, in_features)
        half = (k1 - k0) // 2
        x_split[:, k0 : k0 + half], x_split[:, k0 + half : k1] = _even_odd(x2[:, k0:k1])
    return x_split


def _run_prepared_lut(x2, p, y, call) -> None:
    """:func:`~npquant.kernels._lut.gemv_lut_blocks`: 16 rows' codes decoded by table lookup, lanes as rows."""
    fp4 = p.scheme.dtype == "fp4_e2m1"
    scale, scale_codes, _ = _prepared_scales(p)
    kind = (1 if p.scheme.scale_dtype == "fp8_e4m3" else 2) if fp4 else 0
    table = _float_code_values("fp4_e2m1") if fp4 else _INT4_TWOS
    x_even, x_odd = _even_odd(x2)
    _parallel(_lut_kernels().gemv_lut_blocks, (x_even[0], x_odd[0], p.codes, scale, scale_codes, kind, table,
                                                _y_mult(p), y), p.codes.shape[0], _cost(x2, p), call.threads)


def _run_prepared_gemv_int4(x2, p, y, call) -> None:
    """:func:`~npquant.kernels._gemv.gemv_int4_blocks`: lanes as rows, nibbles against ``x``'s even and odd columns."""
    fp4 = p.scheme.dtype == "fp4_e2m1"
    scale, scale_codes, _ = _prepared_scales(p)
    table = _scale_table(p.scheme) if fp4 else _NO_SCALE_TABLE  # NVFP4's global scale: y_mult, once per output
    x_even, x_odd = _even_odd(x2)
    _parallel(gemv_int4_blocks, (x_even[0], x_odd[0], p.codes, scale, scale_codes, table, *_prepared_zp(p), fp4,
                                 p.block_shape[1] // 2, _y_mult(p), y), p.codes.shape[0], _cost(x2, p), call.threads)


def _run_prepared_gemv_bytes(x2, p, y, call) -> None:
    """:func:`~npquant.kernels._gemv.gemv_bytes_blocks`: one-byte codes, lanes as rows."""
    zp, has_zp = _prepared_zp(p)
    code_kind = _BYTE_KIND.get(p.scheme.dtype, 3 if has_zp else 0)
    mults = _e4m3_multipliers(x2) if code_kind == 1 else _NO_E4M3
    _parallel(gemv_bytes_blocks, (x2, p.codes, p.scale, zp, code_kind, p.block_shape[1], mults, y),
              p.codes.shape[0], _cost(x2, p), call.threads)


def _run_prepared_small_m(x2, p, y, call) -> None:
    """:func:`~npquant.kernels._small_m.gemm_small_m_bytes_blocks` or ``_int4_blocks``: each block decoded once for
    every row of ``x``."""
    zp, has_zp = _prepared_zp(p)
    cost = _cost(x2, p)
    if p.scheme.bits == 8:
        code_kind = _BYTE_KIND.get(p.scheme.dtype, 3 if has_zp else 0)
        fp8_mult = np.float32(_FP8.get(p.scheme.dtype, (0, 1.0))[1])
        if code_kind == 1 and cost >= _X_TAKES_E4M3_FROM and _e4m3_multipliers(x2)[2] != 1:
            x2, code_kind = x2 * np.float32(2.0**8), 4  # x takes e4m3's 2**8 (exact: |x| < 2**100)
        kernel, args = gemm_small_m_bytes_blocks, (x2, p.codes, p.scale, zp, code_kind, fp8_mult, p.block_shape[1])
    else:
        fp4 = p.scheme.dtype == "fp4_e2m1"
        kernel, args = gemm_small_m_int4_blocks, (x2, p.codes, *_prepared_scales(p), zp, has_zp, fp4,
                                                  p.block_shape[1] // 2)
    _parallel(kernel, (*args, y), p.codes.shape[0], cost, call.threads, _SMALL_M_PARALLEL_FROM)


def _narrow_tiles_fit() -> bool:
    """Whether the prepared layout's narrow tiles (see ``_NARROW_TILES_UP_TO``) fit twice in the L2 (where its size
    cannot be read, as on the machine they were measured on: yes)."""
    l2 = _tiling.l2_bytes()
    return l2 is None or l2 >= 2 * 4 * _NARROW_TILE_ELEMENTS


def _run_prepared_tiles(x2, p, y, call) -> None:
    """Tiles of whole blocks dequantized transposed, ``(K, T)``, by all threads, then BLAS (each of ``p.parts`` as
    its own layer's: see :func:`~npquant.kernels._tiling.row_tiles`)."""
    zp, has_zp = _prepared_zp(p)
    if p.scheme.bits == 8:
        code_kind = _BYTE_KIND.get(p.scheme.dtype, 3 if has_zp else 0)
        fp8_mult = np.float32(_FP8.get(p.scheme.dtype, (0, 1.0))[1])
        kernel, args = dequantize_bytes_blocks_t, (p.codes, p.scale, zp, code_kind, fp8_mult, p.block_shape[1])
    else:
        fp4 = p.scheme.dtype == "fp4_e2m1"
        kernel, args = dequantize_int4_blocks_t, (p.codes, *_prepared_scales(p), zp, has_zp, fp4,
                                                  p.block_shape[1] // 2)

    def dequantize_t(o0: int, k0: int, w_t: np.ndarray) -> None:
        _parallel(kernel, (*args, o0 // ROWS, k0, w_t), -(-w_t.shape[1] // ROWS), w_t.nbytes, call.threads,
                  _PARALLEL_TILE_FROM, as_gemm=True)

    narrow = x2.shape[0] <= _NARROW_TILES_UP_TO and _narrow_tiles_fit()
    elements = call.tile_elements or (_NARROW_TILE_ELEMENTS if narrow else _TILE_ELEMENTS)
    cols = call.tile_k or (_NARROW_TILE_K if narrow else _TILE_K)
    tile_rows, tile_cols = tile_shape(p.shape[0], p.shape[1], elements, cols, ROWS)
    tiled(x2, y, tile_rows, tile_cols, dequantize_t, True, parts=p.parts)


# id(w8a8-int8 QuantizedTensor) -> (weak reference to it, its PreparedW8A8); an entry leaves with its tensor
_W8A8_LAYOUTS: dict[int, tuple] = {}


def _w8a8_layout(qt: QuantizedTensor) -> PreparedW8A8:
    """``prepare(qt)`` for a ``w8a8-int8`` tensor not prepared: made at its first call, kept while it lives."""
    key = id(qt)
    entry = _W8A8_LAYOUTS.get(key)
    if entry is None or entry[0]() is not qt:
        entry = _W8A8_LAYOUTS[key] = (weakref.ref(qt, lambda _, key=key: _W8A8_LAYOUTS.pop(key, None)), prepare(qt))
    return entry[1]


def _w8a8_fits(qt: QuantizedTensor) -> bool:
    """Whether the int8 GEMM takes ``qt``: w8a8-int8 codes in stored order, in_features up to 131071."""
    return qt.scheme.activations == "int8-token" and qt.perm is None and qt.shape[1] <= _W8A8_MAX_K


def _run_w8a8_int8(x2, t, y, call) -> np.ndarray:
    """:func:`~npquant.kernels._w8a8.w8a8_int8_linear`: ``x`` quantized per token and the integer GEMM, on
    :class:`~npquant.prepared.PreparedW8A8`'s layout (for a QuantizedTensor, made once by :func:`_w8a8_layout`);
    returns ``y`` (float32 ``(M, O)``, bit-equal to the reference)."""
    from . import _w8a8

    p = t if isinstance(t, PreparedW8A8) else _w8a8_layout(t)
    weight = _w8a8.Int8Weight(p.packed, p.corr, p.w_scale, p.shape)
    return _w8a8.w8a8_int8_linear(x2, weight, call.bias, threads=call.threads)


def _w8a8_fp8_fits(qt: QuantizedTensor) -> bool:
    """Whether the fp8 GEMM takes ``qt``: w8a8-fp8 codes in stored order, sums exact (in_features up to 2**17)."""
    return qt.scheme.activations == "fp8-token" and qt.perm is None and qt.shape[1] <= MAX_FP8_K


def _run_w8a8_fp8(x2, t, y, call) -> np.ndarray:
    """:mod:`~npquant.kernels._w8a8_fp8`: ``x`` quantized per token to e4m3 (numpy, the reference's rule), exact
    float64 sums (:func:`~npquant.kernels._w8a8_fp8.fp8_sums` for few tokens, decoded tiles and BLAS for more),
    then the reference's epilogue; returns ``y``, bit-equal to :func:`npquant.linear_w8a8_apply.w8a8_reference`."""
    wq, w_scale = weight_codes(t)
    codes = np.ascontiguousarray(wq).view(np.uint8)  # (N, K) e4m3 bytes
    xq, x_scale = quantize_activations_fp8(x2)
    xd = _w8a8_fp8.decode_x(np.ascontiguousarray(xq).view(np.uint8))  # (M, K) float64, values / 2**8
    m_rows, k = xd.shape
    n = codes.shape[0]
    if m_rows <= _w8a8_fp8.DOT_MAX_M:
        acc = np.empty((m_rows, n), np.float64)
        _parallel(_w8a8_fp8.fp8_sums, (xd, codes, acc), n, m_rows * n * k, call.threads)
    else:
        acc_t = np.empty((n, m_rows), np.float64)  # tiles of rows of the weight land on rows of acc_t
        rows = max(1, min(n, _w8a8_fp8.TILE_ELEMENTS // k))
        tile = np.empty((rows, k), np.float64)
        for r0 in range(0, n, rows):
            part = tile[: min(rows, n - r0)]
            _parallel(_w8a8_fp8.decode_rows, (codes, r0, part), part.shape[0], part.nbytes, call.threads,
                      _PARALLEL_TILE_FROM)
            np.matmul(part, xd.T, out=acc_t[r0 : r0 + part.shape[0]])  # BLAS dgemm: exact in any order
        acc = acc_t.T
    acc32 = (acc * _w8a8_fp8.UNSCALE).astype(np.float32, order="C")  # exact product (a power of two); C order,
    # as every other path's y (a transposed one would reach the model's next matmul in another BLAS order)
    return scale_outputs(acc32, x_scale, w_scale, call.bias)


def _run_w8a8_reference(x2, t, y, call) -> np.ndarray:
    """:func:`npquant.linear_w8a8_apply.w8a8_reference`, for W8A8 tensors neither GEMM takes; returns ``y``."""
    y = w8a8_reference(x2, t)
    if call.bias is not None:
        y += call.bias
    return y


# --- the kernel choice ----------------------------------------------------------------------------------------


class Route(NamedTuple):
    """One row of :data:`ROUTES`: which calls a kernel takes, what it needs of the CPU, and how it is run."""

    layout: str  # "checkpoint" (QuantizedTensor) or "prepared" (PreparedTensor)
    batch: str  # rows of x: "1", "small", "large" (past small_m(t)) or "any" (batch_rows says which numbers)
    codes: str  # the codes it reads, in words
    fits: Callable  # tensor -> bool: the codes, in code
    needs: str  # CPU features, in words ("" for none)
    available: Callable | None  # () -> bool: numba's target has them and the kernels compiled
    kernel: str  # module.function
    run: Callable | None  # (x2, tensor, y, _Call) -> None, writing y; None: the numpy backend's tiles. W8A8 rows
    # (scheme.activations) are called with y None and return their own y
    why: str


def _always(t) -> bool:
    return True


def _has_lut() -> bool:
    return _lut_kernels() is not None


def _has_vnni() -> bool:
    return _vnni_kernels() is not None


def small_m(t) -> int:
    """The largest batch for which ``t`` takes the small-batch kernels (each block decoded once into L1 for every
    row of ``x``); larger batches take tiles and BLAS.

    Where each kernel was measured to beat the tiles, in this machine's
    fast phases and in its slow ones (which slow the tiles more, moving the
    crossover up): 11008 x 4096, each call between float32 matmuls in one
    process, small-batch kernel / tiles as ratios to float32 (slow phase ->
    fast phase where both were measured).

    Prepared layout: 48 rows with AVX-512; without, 96 for one-byte codes
    and 128 for 4-bit ones; 32 where scales come every 16 or 32 columns
    (fp4: each short run of the inner loop ends in a scaling pass). Its
    inner loop runs at the FMA units' pace, a row of ``x`` costing about
    the same at any batch, where BLAS gains on it as the batch grows. AVX-512 build, w8-channel: batch 17 0.49 / 1.05; 32 0.69 /
    1.09; 48 0.85 / 1.09 -> 0.84 / 0.90; 64 0.89-1.01 / 1.12-1.14 -> 0.97 /
    0.88; w4-g128 at 64 0.99 / 1.12 -> 1.00 / 0.91; nvfp4 at 32 0.83 / 1.03
    -> 0.82 / 0.89, at 64 1.27 / 1.07. AVX2 build (Zen 2 target),
    w8-channel: 32 0.68 / 1.05; 64 0.89 / 1.14 -> 0.88 / 0.97; 96 1.01 /
    1.10 -> 0.98 / 0.96; 128 1.05-1.08 / 1.13 -> 1.06 / 1.00; nvfp4 at 64
    1.16 / 1.15. On a real AVX2 CPU, an AMD EPYC (Zen 3, 2 cores, the
    tiles at 2 MiB: ``_narrow_tiles_fit``), the crossovers lie higher:
    w8-channel at 64 0.95 / 1.09, 80 0.99 / 1.08, 96 1.02 / 1.04, 128 1.05
    / 1.06; fp8-channel at 96 1.00 / 1.06, 128 1.01 / 1.03; w4-g128 at 64
    1.00 / 1.19, 80 1.03 / 1.11, 88 1.06 / 1.12, 96 1.11 / 1.10, 128 1.10
    / 1.06. Hence 96 for one-byte codes there (the Zen 2 target on the
    Intel host had w8-channel at 96 1.01 / 1.10 slow, 0.98 / 0.96 fast).
    The 4-bit kernel, once it decoded its nibbles in column order (a tenth
    faster), beat the tiles further: w4-g128 at 96 1.02 / 1.06, 104 1.03 /
    1.14, 112 1.03 / 1.06, 128 0.97 / 1.09 and 1.04 / 1.13 (two runs), 160
    1.07 / 1.14, 192 1.14 / 1.07, 256 1.12 / 1.08; w4-g128-asym at 128 1.06
    / 1.06. Hence 128 for 4-bit codes.

    Checkpoint layout (four rows a pass, scalar sums, every format through
    one decoder): 32 for one-byte codes, 24 for byte-aligned 4-bit ones, 4
    for MXFP4, and not past batch 1 for the rest (NVFP4, fp6, bit streams).
    AVX-512 build: w8-channel at 32 0.75-0.77 / 1.28-1.34 -> 0.71 / 1.17,
    fp8-channel 0.74 / 1.22, w8-g128 1.03 / 1.17, fp8-block 1.02 / 1.26;
    w4-g128 at 24 0.95 / 1.19 -> 0.98 / 1.06, at 32 1.15 / 1.20 -> 1.17 /
    1.08; at batch 2 nvfp4 1.94 / 1.26 -> 2.03 / 1.20, mxfp6 2.66 / 1.27,
    w3-g128 1.82 / 1.30, mxfp4 1.07 / 1.21 (4: 1.13 / 1.12, 8: 1.41 /
    1.14). AVX2 build at 32: w8-channel 0.77 / 1.28, fp8-channel 0.84 /
    1.32, w4-g128 1.00 / 1.23 -> 0.96 / 1.09.
    """
    if isinstance(t, QuantizedTensor):
        kind = _code_kind(t)
        if kind in (0, 1, 4):  # int8 (with or without a zero point), fp8
            return SMALL_M
        if kind == 2:  # 4-bit ints in byte-aligned blocks
            return 24
        return 4 if kind == 5 and t.scheme.scale_dtype == "e8m0" else 1
    if not isinstance(t, PreparedTensor):  # W8A8's layout: its GEMM takes every batch
        return SMALL_M
    if t.block_shape[1] < 128:
        return 32
    if has_avx512():
        return 48
    return 96 if t.scheme.bits == 8 else 128


_BIG = 1 << 62
_ONE, _SMALL, _LARGE, _ANY = "1", "small", "large", "any"


def batch_rows(route, t) -> tuple[int, int]:
    """The batches (rows of ``x``, lo and hi inclusive) ``route`` takes for tensor ``t`` (see :func:`small_m`)."""
    if route.batch == _ONE:
        return 1, 1
    if route.batch == _SMALL:
        return 1, small_m(t)
    if route.batch == _LARGE:
        return small_m(t) + 1, _BIG
    return 1, _BIG


_P4 = "4-bit codes (int4, fp4)"

#: Every quantized-linear kernel, by layout, batch, codes and CPU features: the first row a call fits takes it.
ROUTES = (
    Route("checkpoint", _ANY, "int8 codes with int8 activations per token (w8a8-int8)", _w8a8_fits, "", None,
          "_w8a8.w8a8_int8_linear", _run_w8a8_int8, "x quantized per token, an int8 GEMM summing in int32 (VNNI, AVX2 "
          "or portable: _w8a8.int8_path()) on prepare's layout, made at the first call and kept with the tensor"),
    Route("checkpoint", _ANY, "fp8 e4m3 codes with fp8 activations per token (w8a8-fp8)", _w8a8_fp8_fits, "",
          None, "_w8a8_fp8.fp8_sums / decode_rows + BLAS", _run_w8a8_fp8, "x quantized per token, exact float64 sums "
          f"of the decoded codes: a pass over the weight's bytes up to {_w8a8_fp8.DOT_MAX_M} tokens, float64 tiles "
          "and BLAS beyond"),
    Route("checkpoint", _ANY, "codes with activations per token no kernel takes (act-order, very long rows)",
          lambda qt: qt.scheme.activations is not None, "", None, "npquant.linear_w8a8_apply.w8a8_reference",
          _run_w8a8_reference, "the exact numpy reference, x quantized per token"),
    Route("prepared", _ANY, "int8 codes with int8 activations per token (PreparedW8A8)",
          lambda p: isinstance(p, PreparedW8A8), "", None, "_w8a8.w8a8_int8_linear", _run_w8a8_int8,
          "x quantized per token, an int8 GEMM summing in int32 (VNNI, AVX2 or portable: _w8a8.int8_path())"),
    Route("checkpoint", _ANY, "codes in blocks cut at the weight's edge", lambda qt: not _dequantizes(qt), "", None,
          "npquant.linear_numpy.numpy_linear", None, "no kernel reads a block cut short"),
    Route("checkpoint", _ONE, f"{_P4} in blocks of 32s or paired 16s", lambda qt: _plan(qt)[1], "AVX-512", _has_lut,
          "_lut.gemv_lut_rows", _run_lut_rows, "each row's block is a 16-entry table in a register (vpermps)"),
    Route("checkpoint", _LARGE, "any codes", _always, "", None, "_tiles (per format) + OpenBLAS", _run_tiles,
          "compute-bound: tiles of 1-2 MiB dequantized by all threads, multiplied by BLAS"),
    Route("checkpoint", _ONE, "symmetric int8 codes in blocks of 64s", lambda qt: _code_kind(qt) == 0
          and qt.block_shape[1] % _vnni_kernels()._CHUNK == 0, "AVX-512 VNNI", _has_vnni, "_vnni.gemv_int8_exact",
          _run_vnni, "exact integer dot products (vpdpwssd), one widening per 32 codes"),
    Route("checkpoint", _ONE, "int8 or fp8 codes", lambda qt: _code_kind(qt) in (0, 4), "", None, "_gemv.gemv_bytes",
          _run_gemv_bytes, "eight rows per load of x, codes decoded in registers"),
    Route("checkpoint", _ONE, "int4 codes in byte-aligned blocks", lambda qt: _code_kind(qt) == 2, "", None,
          "_gemv.gemv_int4", _run_gemv_int4, "nibbles against x's even and odd columns"),
    Route("checkpoint", _SMALL, "any codes", _always, "", None, "_small_m.gemm_small_m", _run_small_m,
          "each weight row decoded once into L1 for every row of x"),
    Route("prepared", _ONE, f"{_P4} without a zero point", lambda p: p.scheme.bits == 4 and p.zero_point is None,
          "AVX-512", _has_lut, "_lut.gemv_lut_blocks", _run_prepared_lut,
          "16 rows' codes decoded by table lookup, lanes as rows"),
    Route("prepared", _ONE, _P4, lambda p: p.scheme.bits == 4, "", None, "_gemv.gemv_int4_blocks",
          _run_prepared_gemv_int4, "lanes as rows: no horizontal sums, one stream per block"),
    Route("prepared", _ONE, "one-byte codes", _always, "", None, "_gemv.gemv_bytes_blocks", _run_prepared_gemv_bytes,
          "lanes as rows: no horizontal sums, one stream per block"),
    Route("prepared", _SMALL, "any codes", _always, "", None, "_small_m.gemm_small_m_*_blocks", _run_prepared_small_m,
          "each block decoded once for every row of x"),
    Route("prepared", _LARGE, "any codes", _always, "", None, "_tiles.dequantize_*_blocks_t + OpenBLAS",
          _run_prepared_tiles, "compute-bound: tiles dequantized transposed, (K, T), multiplied by BLAS as they are"),
)


# id(tensor) -> (weak reference to it, {(batch regime, USE_LUT, USE_VNNI): route}); an entry leaves with its tensor
_CHOSEN: dict[int, tuple] = {}


def _route(t: QuantizedTensor | PreparedTensor, m_rows: int) -> Route:
    """The row of :data:`ROUTES` a call of ``m_rows`` rows on ``t`` takes; chosen once per tensor and batch regime."""
    key = id(t)
    entry = _CHOSEN.get(key)
    if entry is None or entry[0]() is not t:
        entry = _CHOSEN[key] = (weakref.ref(t, lambda _, key=key: _CHOSEN.pop(key, None)), {}, small_m(t))
    regime = (1 if m_rows == 1 else 2 if m_rows <= entry[2] else 3, USE_LUT, USE_VNNI)
    route = entry[1].get(regime)
    if route is None:
        route = entry[1][regime] = _choose(t, m_rows)
    return route


def _choose(t: QuantizedTensor | PreparedTensor, m_rows: int) -> Route:
    layout = "prepared" if isinstance(t, (PreparedTensor, PreparedW8A8)) else "checkpoint"
    for route in ROUTES:
        lo, hi = batch_rows(route, t)
        if (route.layout == layout and lo <= m_rows <= hi and (route.available is None or route.available())
                and route.fits(t)):
            return route
    raise NpquantError(f"no kernel reads a {layout} {t.scheme} tensor at batch {m_rows}")  # the table covers all


def explain(t: QuantizedTensor | PreparedTensor, batch: int = 1) -> str:
    """Which kernel :func:`numba_linear` runs for ``batch`` rows of ``x`` on ``t``, and why (one line).

    Examples
    --------
    >>> import numpy as np, npquant
    >>> qt = npquant.quantize(np.ones((64, 128), np.float32), "w8-channel")
    >>> explain(qt, 4)
    'checkpoint layout, batch 1-32, any codes: _small_m.gemm_small_m (each weight row decoded once into L1 for every row of x)'
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise NpquantError(f"batch must be a positive integer, got {batch!r}")
    route = _route(t, int(batch))
    lo, hi = batch_rows(route, t)
    rows = str(lo) if lo == hi else f"{lo}+" if hi == _BIG else f"{lo}-{hi}"
    kernel = route.kernel
    if route.run is _run_tiles:
        kernel = f"_tiles.{_tile_kernel(t, None)[0].__name__} + OpenBLAS"
    needs = f"; needs {route.needs}, which numba's target has" if route.needs else ""
    if "*" in kernel:
        kernel = kernel.replace("*", "bytes" if t.scheme.bits == 8 else "int4")
    if route.run is _run_w8a8_int8:
        from ._w8a8 import _path_for

        kernel += f" on the {_path_for(int(batch), None)} path"
    return f"{route.layout} layout, batch {rows}, {route.codes}: {kernel} ({route.why}{needs})"


def _rows_f32(a: np.ndarray, name: str) -> np.ndarray:
    """``a (..., C)`` as a C-contiguous float32 ``(N, C)``, a view when it is one."""
    if a.dtype != np.float32:
        raise NpquantError(f"{name} must be float32, got {a.dtype}")
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def gelu(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``(..., F)``: exact-erf GELU of float32 ``h (..., F)``, into ``out`` if given (``h`` itself may be)."""
    if h.dtype != np.float32:
        raise NpquantError(f"h must be float32, got {h.dtype}")
    if out is None:
        out = np.empty(h.shape, np.float32)
    elif out.shape != h.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise NpquantError(f"gelu: out must be a C-contiguous float32 {h.shape} array, got {out.dtype} {out.shape}")
    if out is not h:
        np.copyto(out, h)
    x2 = out.reshape(-1, h.shape[-1])
    _parallel(_nonlinear.gelu, (x2,), x2.shape[0], x2.size, None, _NONLINEAR_PARALLEL_FROM)  # in place (see there)
    return out


def add_layer_norm(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``(..., C)``: LayerNorm over the last axis of ``a + b`` (both float32 ``(..., C)``), new array."""
    if a.shape != b.shape or gamma.shape != (a.shape[-1],) or beta.shape != gamma.shape:
        raise NpquantError(f"add_layer_norm: a {a.shape}, b {b.shape}, gamma {gamma.shape} and beta {beta.shape} "
                           f"must be (..., C), (..., C), (C,), (C,)")
    out = np.empty(a.shape, np.float32)
    out2 = out.reshape(-1, a.shape[-1])
    args = (_rows_f32(a, "a"), _rows_f32(b, "b"), _rows_f32(gamma, "gamma")[0], _rows_f32(beta, "beta")[0],
            float(eps), out2)
    _parallel(_nonlinear.add_layer_norm, args, out2.shape[0], out2.size, None, _NONLINEAR_PARALLEL_FROM)
    return out


def softmax_scaled(scores: np.ndarray, scale, key_bias: np.ndarray) -> np.ndarray:
    """float32 ``(B, H, T, K)``, new: softmax over the last axis of ``scores * scale + key_bias[:, None, None, :]``.

    ``scores`` float32 (B, H, T, K); ``key_bias`` float32 (B, K), e.g. 0
    for kept keys and float32's lowest for padding.
    """
    if scores.ndim != 4 or key_bias.shape != (scores.shape[0], scores.shape[3]):
        raise NpquantError(f"softmax_scaled: scores {scores.shape} must be (B, H, T, K) and key_bias "
                           f"{key_bias.shape} (B, K)")
    if scores.dtype != np.float32 or key_bias.dtype != np.float32:
        raise NpquantError(f"softmax_scaled: scores and key_bias must be float32, got {scores.dtype}, {key_bias.dtype}")
    B, H, T, K = scores.shape
    out = np.empty(scores.shape, np.float32)
    args = (np.ascontiguousarray(scores).reshape(B * H, T, K), np.float32(scale), np.ascontiguousarray(key_bias), H,
            out.reshape(B * H, T, K))
    _parallel(_nonlinear.softmax_scaled, args, B * H, scores.size, None, _NONLINEAR_PARALLEL_FROM)
    return out
