"""Fused quantized-linear kernels (optional extra ``npquant[fast]``: numba, threadpoolctl).

Importing this package imports numba; :func:`npquant.linear` imports it only
when the ``"numba"`` backend is asked for (or ``"auto"`` finds numba).
Kernels compile on first use and are cached on disk, so a second process
loads them instead of compiling. The modules, one idea each: ``_decode``
(code formats to float32), ``_nonlinear`` (a transformer's GELU,
LayerNorm and softmax in one pass each), ``_gemv`` (batch 1), ``_small_m`` (batch 2 to
``SMALL_M``), ``_tiles`` (dequantization for BLAS), ``_vector`` (16 codes
decoded, scaled and stored as one LLVM vector, for ``_tiles``), ``_lut`` (batch-1
4-bit kernels decoding by table lookup, AVX-512), ``_vnni`` (the batch-1
int8 kernel as exact integer dot products, AVX-512 VNNI), ``_target`` (the
CPU features numba compiles for), ``_llvm`` (bit casts, stack arrays, the atomic work
counter), ``_jobs`` and ``_blas_threads`` (the kernels on OpenBLAS's
threads), ``_pool`` (npquant's own threads where that is not possible),
``_buffers`` (aligned outputs and copies of ``x``), ``_tiling`` (the
large-batch path's tiles and BLAS over them), ``_sgemm`` (OpenBLAS's GEMM
adding into its output), ``_env`` (the thread
count the environment allows, read in compiled code).

For a :class:`~npquant.QuantizedTensor` (the checkpoint layout):

- ``M == 1``: kernels of their own for int8 (eight rows per pass over
  ``x``), 4-bit codes in byte-aligned blocks (nibbles against ``x``'s even
  and odd columns) and fp8 (decoded in registers: e4m3's fields shifted
  into a float32's, e5m2 through float16). Where numba's target has
  AVX-512, 4-bit codes (int4, and fp4 in blocks of 16 or 32 columns)
  take :mod:`~npquant.kernels._lut` instead: each row's block of
  dequantized weights is a 16-entry table in a register, four rows share
  each load of ``x``, and the next rows' lines are prefetched (short rows
  are streams the hardware prefetcher ramps up on too late). Where it has
  AVX-512 VNNI, symmetric int8 in blocks of whole 64 columns takes
  :mod:`~npquant.kernels._vnni`: ``x`` rounded to a grid of ``2**-30``
  of its largest element (exact for every element within a factor 64 of
  it) and the dot products summed exactly in integers, then scaled in
  float64 (nearer the exact product than a float32 sum; NaN or Inf in
  ``x`` go to the float32 kernel). The one-byte kernels ask for their rows'
  lines a pass ahead (``PREFETCH_AHEAD``, 32 KiB) into L2: eight 4 KiB rows
  are eight short streams the hardware prefetcher starts late (int8
  11008 x 4096 1.97 -> 1.67 ms, fp8 2.24 -> 1.85 ms, each call after a
  float32 matmul; into L1 it was slower).
- ``M <= SMALL_M``: :func:`gemm_small_m` reads each weight row once,
  decodes it chunk by chunk into float32 in L1, and accumulates all ``M``
  rows of ``x`` against it.
- larger ``M`` (prefill): the weight goes through tiles of about
  ``_TILE_K`` columns and as many rows as fit about 2 MiB of float32
  (:mod:`~npquant.kernels._tiling`), each dequantized by all threads (16 columns at a time
  as one vector, :func:`dequantize_rows_16`, for every format in blocks of
  whole 16 columns: a block of 16 or 32 went through the loop vectorizer's
  scalar remainder before, and bit streams eight codes at a time through scalar
  shifts), then multiplied by
  OpenBLAS's ``cblas_sgemm`` adding into ``y`` (``beta = 1``:
  :mod:`~npquant.kernels._sgemm`; BLAS's own threads); the full float32
  weight never exists. Whole-row tiles of 256 rows (4 MiB, numpy's
  ``matmul``) made BLAS run 256 columns of output at a time, packing
  ``x`` again for each: BLAS over such tiles, already made, took 1.28x the
  float32 matmul of 11008 x 4096 at batch 128, over 2048 x 256 tiles
  0.95-1.03x. Each of OpenBLAS's threads dequantizes the rows of the tile
  that it packs in the GEMM that follows (OpenBLAS cuts a GEMM's ``N``, the
  tile's rows, into one part per thread), so it reads back from its own
  L2 what it has just written: with chunks claimed by whichever thread
  came first, half of each tile crossed between the cores: in a slow phase
  of this machine (the README's Performance), every preset at batch 128
  took 1.17-1.32x float32, 1.07-1.18x so (in one process, each call between
  two float32 matmuls, the two splits alternating). The tiles are written
  transposed, ``(K, T)`` (:func:`_tile_kernel`), which BLAS multiplies as
  they are, their rows an odd number of 64-byte lines apart
  (:func:`~npquant.kernels._tiling.odd_lines`; 2048 rows, 8 KiB apart,
  filled the same cache sets: nvfp4 1.10 -> 0.96x, fp8-channel 1.11 ->
  1.00x float32).
  Narrow tiles read a few lines of each code row, so the next rows' lines
  are prefetched. Where numpy's BLAS is not OpenBLAS, tiles are whole rows
  through ``matmul``. The buffer is the calling thread's, kept for its
  next call (:func:`~npquant.kernels._buffers.tile`: a fresh one cost a
  page fault per 4 KiB at every call).

For a :class:`~npquant.PreparedTensor` (:func:`npquant.prepare`: 4-bit or
one-byte codes in blocks of 64 rows): ``M == 1`` and ``M <= SMALL_M``
kernels whose SIMD lanes are output rows (no horizontal sums, one memory
stream per block; 4-bit ones without a zero point, and fp4, by table
lookup where AVX-512 is), and for larger ``M`` tiles dequantized
transposed, ``(K, T)``, for BLAS (no transposition in BLAS: faster than
the float32 matmul of ``W.T`` itself), each thread taking the blocks of
64 columns that it packs in the GEMM (as above; in slow phases at batch
128, 0.92-1.01x float32 where chunks claimed by any thread took 1.01-1.27x).

Threads. A model alternates numpy's BLAS calls (attention, other layers)
with npquant's. The kernels are serial, GIL-free numba functions that take
chunks of output rows from a shared atomic counter; a call runs one on
several threads at once:

1. on OpenBLAS's own worker threads, where numpy's BLAS is an OpenBLAS
   that lets us (:mod:`npquant.kernels._blas_threads`): one pool for both.
   After each BLAS call those workers poll for new work for about 0.1 s;
   any other thread the kernels woke would share a core with one of them.
2. else on npquant's pool of sleeping threads (:mod:`npquant.kernels._pool`).

numba's own ``parallel=True`` is not used: its OpenMP workers poll after
each kernel and slowed the float32 BLAS call after it (3.5 -> 5.6-6.7 ms
for 11008 x 4096), its GNU OpenMP layer kills a forked child that calls a
kernel, and its workqueue layer aborts when two user threads call at once.
Measured on 2 cores, 11008 x 4096 at batch 1, each call alternating with a
float32 matmul of another matrix (``benchmarks/bench_linear.py``): with
OpenMP, w8-channel 0.55-1.2x float32's time and the float32 calls 1.5-2x
slower; with npquant's pool, the float32 calls as fast as alone but the
kernels still about 2x slower than alone (OpenBLAS's polling workers);
on OpenBLAS's threads, both close to their time alone (the README's table).
Nothing in the process is changed: BLAS keeps its thread count, and
limiting it (``threadpoolctl``, ``OPENBLAS_NUM_THREADS``) limits the
kernels alike. Calls below ``_PARALLEL_FROM`` of work run in the caller's
thread alone. A forked child, a spawned child and user threads calling at
once all work (``tests/test_threads.py``).

A call out of cache. In a model, each call comes right after numpy's own
work has streamed its weights through the caches, so the interpreter's
own memory (bytecode, objects, numpy's Python layers) comes from DRAM
again and every line of Python a call runs costs microseconds, not
nanoseconds: measured on 2 cores right after a float32 11008 x 4096
matmul, the Python around a batch-1 kernel took about 260 us (``.ctypes``
alone about 57 us, an aligned output about 100 us, BLAS's thread count
through threadpoolctl 40 us, a call through ctypes 70 us), a seventh of a
w8-channel call. So what a call needs of a tensor is worked out at its
first call and kept beside it (:func:`_plan`, while those are the tensor's
own arrays), and the rest runs compiled: aligned ``x`` and ``y`` in one
call (:mod:`~npquant.kernels._buffers`), e4m3's multipliers in one, and
BLAS's thread count, the job block and the call into OpenBLAS in one
(:func:`~npquant.kernels._jobs.launch`). Measured end to end, old and new
code alternating in one process after float32 matmuls: w8-channel 1.91 ->
1.78 ms, fp8-channel 2.14 -> 1.93, w4-g128 1.33 -> 1.21 (float32 4.8-6.0).
Then npquant's own thread count (``NPQUANT_NUM_THREADS``, else the CPU
affinity: ``os.environ.get`` alone took 31 us out of cache) read in
compiled code, inside ``launch`` (:mod:`~npquant.kernels._env`), and
:func:`npquant.linear` in fewer steps (float32 ``x`` known by identity,
``x``'s layout fixed in the compiled buffers, one plan lookup): another
35-70 us a call (w8-channel 1.80 -> 1.72 ms, fp8-channel 1.80 -> 1.76,
w4-g128 1.23 -> 1.18, the same alternation). What is left around a
batch-1 call is about 50 us; the rest is the kernel reading its codes.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import Callable, NamedTuple

import numpy as np

from ..errors import NpquantError
from ..prepared import ROWS, PreparedTensor
from ..tensor import QuantizedTensor, _float_code_values, scale_numpy_dtype, scale_values
from . import _blas_threads, _buffers, _pool
from . import _nonlinear
from ._decode import e4m3_multipliers, table_values
from ._env import threads_allowed
from ._target import has_avx512, has_vnni
from ._gemv import gemv_bytes, gemv_bytes_blocks, gemv_int4, gemv_int4_blocks
from ._small_m import gemm_small_m, gemm_small_m_bytes_blocks, gemm_small_m_int4_blocks
from ._tiling import tile_shape, tiled
from ._tiles import (dequantize_bytes_blocks_t, dequantize_int4_blocks_t, dequantize_rows, dequantize_rows_16,
                     dequantize_rows_int4_split)
from ._vector import VK_BITS, VK_E4M3, VK_E5M2, VK_FP4, VK_FP6, VK_INT4, VK_INT8, VK_UINT8

# _kernel_args' code kind -> the vector kind of dequantize_rows_16 (4, fp8: by its format; 3: VK_BITS + bits)
_VK_OF_KIND = {0: VK_INT8, 1: VK_UINT8, 2: VK_INT4, 5: VK_FP4, 6: VK_FP6}

__all__ = ["numba_linear", "numba_dequantize", "has_kernels", "explain", "ROUTES", "Route", "default_threads", "SMALL_M",
           "gelu", "add_layer_norm", "softmax_scaled"]

#: Largest batch handled by the fused small-M kernel.
SMALL_M = 16
_TILE_ELEMENTS = 1 << 19  # 2 MiB float32 tile for the large-M path
_TILE_K = 256  # its columns, where tiles add into y (see _tiling.tiled)
# Below this cost (weights times rows of x: the multiply-adds, whatever the
# code width) a call runs in the caller's thread alone: handing work to
# another thread costs more than it saves. Measured on the MiniLM encoder
# (one sentence, ~12 tokens): 384 x 384 layers alone, 1536 x 384 and the
# fused 1152 x 384 QKV on both threads. Dequantizing a tile counts its bytes.
_PARALLEL_FROM = 1 << 22
# A tile of the large-batch path is dequantized on all threads from this
# many bytes of float32: BLAS's workers, just used for the tile before it or
# the model's own matmul, are still polling, so handing them work is cheap.
_PARALLEL_TILE_FROM = 1 << 18
_CHUNKS_PER_THREAD = 8
#: Whether kernels run on OpenBLAS's threads where they can (tests switch it off to reach the pool).
USE_BLAS_THREADS = True
#: Whether batch-1 4-bit calls take the table-lookup kernels where numba's target has AVX-512
#: (:mod:`npquant.kernels._lut`; tests switch it off to reach the portable ones).
USE_LUT = True
#: Whether batch-1 int8 calls take the exact integer kernel where numba's target has AVX-512 VNNI
#: (:mod:`npquant.kernels._vnni`; tests switch it off to reach the float32 one).
USE_VNNI = True
# Each nibble's value, for the table-lookup kernels: checkpoint-layout symmetric
# int4 (stored q + 8), prepared symmetric int4 (two's complement q), stored q
# (asymmetric), fp4 e2m1.
_NIBBLES = np.arange(16, dtype=np.float32)
_INT4_OFFSET = _NIBBLES - 8
_INT4_TWOS = np.where(_NIBBLES < 8, _NIBBLES, _NIBBLES - 16).astype(np.float32)
_NO_SCALE_TABLE = np.zeros(1, np.float32)
_NO_SCALE_BLOCKS = np.zeros((1, 1, ROWS), np.float32)  # float32 scales of prepared blocks, where codes are read
_NO_SCALE_CODES = np.zeros((1, 1, ROWS), np.uint8)  # scale codes of prepared blocks, where float32 scales are read
# fp8: (e4m3?, power of two taking the float16 the fields make to the value)
_FP8 = {"fp8_e4m3": (1, 2.0**8), "fp8_e5m2": (0, 1.0)}
# e4m3_mults of the batch-1 kernels where no e4m3 is decoded
_NO_E4M3 = np.array([1.0, 1.0, 1.0, 1.0, 2.0**-140, 2.0**100], np.float32)
# code_kind of the one-byte blocks kernels (int8: 0 symmetric, 3 asymmetric)
_BYTE_KIND = {"fp8_e4m3": 1, "fp8_e5m2": 2}
_NO_ZP = np.zeros((1, 1), np.uint8)
_FLOAT32 = np.dtype(np.float32)
_NO_ZP_BLOCKS = np.zeros((1, 1, 1), np.uint8)
_NO_SCALE_2D = np.zeros((0, 1), np.float32)  # float32 scales, where one-byte ones are read as stored
_NO_SCALE_CODES_2D = np.zeros((0, 1), np.uint8)  # one-byte scales, where float32 ones are read


def _aligned_empty(shape: tuple) -> np.ndarray:
    """An uninitialised C-contiguous float32 ``(n,)`` or ``(m, n)`` array whose data starts on a cache line.

    malloc aligns large blocks to 16 bytes only; BLAS and the kernels read
    and write these tiles, outputs and copies of ``x`` by whole lines.
    """
    if len(shape) == 1:
        return _buffers.empty_aligned(1, shape[0])[0]
    return _buffers.empty_aligned(*shape)


def _code_kind(qt: QuantizedTensor) -> int:
    """How the kernels read ``qt``'s codes: 0 symmetric int8, 1 uint8 with a zero point, 2 4-bit int in
    byte-aligned blocks, 3 a bit stream (int2-7, 4-bit in odd blocks), 4 fp8, 5 fp4 e2m1, 6 fp6 e2m3."""
    scheme = qt.scheme
    if scheme.dtype == "fp4_e2m1":
        return 5
    if scheme.dtype == "fp6_e2m3":
        return 6
    if scheme.is_float:
        return 4
    if scheme.packed:  # the 4-bit fast path reads whole bytes: blocks must start on a byte
        return 2 if scheme.bits == 4 and qt.block_shape[1] % 2 == 0 else 3
    return 1 if qt.zero_point is not None else 0


def _kernel_args(qt: QuantizedTensor, convert_scales: bool = True) -> tuple:
    """The arrays and constants every kernel takes, in order; one-byte scales left out (an empty float32 array in
    their place) where not ``convert_scales``."""
    scheme = qt.scheme
    bo, bi = qt.block_shape
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    scale = _scale_values(qt) if convert_scales or qt.scale.dtype.itemsize != 1 else _NO_SCALE_2D
    has_zp = qt.zero_point is not None
    zp = qt.zero_point if has_zp else _NO_ZP
    fp8_e4m3, fp8_mult = _FP8.get(scheme.dtype, (0, 1.0))
    kind = _code_kind(qt)
    base_off = 1 << (scheme.bits - 1) if kind in (2, 3) and not has_zp else 0
    return (codes, scale, zp, has_zp, bo, bi, kind, scheme.bits, base_off, fp8_e4m3, np.float32(fp8_mult))


# id(tensor) -> (weak reference to it, its plan); an entry leaves when its tensor does
_PLANS: dict[int, tuple] = {}


def _plan(qt: QuantizedTensor) -> tuple:
    """``(kernel args or None, whether its format suits the 4-bit table kernels, whether the kernels read it,
    the table kernels' args or None)`` for ``qt``.

    Worked out at a tensor's first call and kept beside it (not on it: a
    pickled tensor stays the same): a model calls its layers right after
    numpy's own work has left the interpreter's memory out of cache, where
    each line of Python a call saves counts. The arguments are kept only
    when they are the tensor's own arrays (float32 scales), not converted
    copies (bfloat16 or one-byte scales, converted at each call as before),
    which writing into the tensor's scales would leave stale.
    """
    key = id(qt)
    entry = _PLANS.get(key)
    if entry is not None and entry[0]() is qt:
        return entry[1]
    dequantizes = _dequantizes(qt)
    args = _kernel_args(qt) if dequantizes else None
    own = args is not None and np.may_share_memory(args[0], qt.codes) and np.may_share_memory(args[1], qt.scale)
    lut_shape = dequantizes and _lut_rows_shape(qt)
    lut = _lut_args(qt) if lut_shape else None
    lut_own = (lut is not None and np.may_share_memory(lut[1], qt.codes) and np.may_share_memory(lut[2], qt.scale)
               and qt.global_scale is None)  # NVFP4's table is divided by its global scale
    plan = (args if own else None, lut_shape, dequantizes, lut if lut_own else None)
    _PLANS[key] = (weakref.ref(qt, lambda _, key=key: _PLANS.pop(key, None)), plan)
    return plan


def _scale_values(qt: QuantizedTensor) -> np.ndarray:
    """float32 C-contiguous values of ``qt``'s scales; one-byte ones (e8m0, NVFP4's e4m3) looked up in a table of
    their 256 values, compiled (for an 11008 x 4096 weight, medians of 20 calls: NVFP4 4.2 -> 1.0 ms, its
    table divided by the global scale included; MXFP4 and MXFP8 2.0 -> 0.4 ms, where numpy's ``table[codes]``
    took the time)."""
    if qt.scale.dtype.itemsize == 1:
        return table_values(_scale_table(qt.scheme, qt.global_scale), np.ascontiguousarray(qt.scale).view(np.uint8))
    return np.ascontiguousarray(scale_values(qt.scale, qt.scheme, qt.global_scale))


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


def _lut_rows_shape(qt: QuantizedTensor) -> bool:
    """Whether ``qt``'s format and blocks are those :func:`_lut_rows_fit` asks for."""
    scheme = qt.scheme
    four_bit = scheme.dtype == "fp4_e2m1" or (scheme.packed and not scheme.is_float and scheme.bits == 4)
    bo, bi = qt.block_shape
    fits = (bi % 32 == 0 or (bi == 16 and qt.shape[1] % 32 == 0)) and qt.shape[1] % bi == 0 and qt.shape[0] % bo == 0
    return four_bit and fits


def _vector_kind(args: tuple) -> int | None:
    """The vector kind (``VK_*`` of :mod:`~npquant.kernels._vector`) in which :func:`dequantize_rows_16` reads the
    codes of :func:`_kernel_args` ``args`` (of a tensor :func:`_dequantizes`: its rows are whole blocks), or None
    where it does not: blocks whose columns are not whole 16s."""
    bi, kind, bits, fp8_e4m3 = args[5], args[6], args[7], args[9]
    if bi % 16:
        return None
    if kind == 4:
        return VK_E4M3 if fp8_e4m3 else VK_E5M2
    return _VK_OF_KIND.get(kind, VK_BITS + bits)


def _dequantize_rows_args(qt: QuantizedTensor, args: tuple | None) -> tuple:
    """``(kernel, its arguments before o0)`` of the fastest row kernel reading ``qt``, whose :func:`_kernel_args`
    are ``args`` (None: worked out here, one-byte scales left as stored where the kernel reads them so)."""
    args = args or _kernel_args(qt, convert_scales=False)
    vk = _vector_kind(args)
    coded = args[1] is _NO_SCALE_2D  # one-byte scales (the Scheme allows them for fp4, fp6 and e4m3 codes only)
    if vk is not None and (not coded or vk in (VK_FP4, VK_FP6, VK_E4M3)):
        codes, scale, zp, has_zp, bo, bi, kind, bits, base_off, fp8_e4m3, fp8_mult = args
        if coded:  # read as stored: see dequantize_rows_16
            scale_codes, table = np.ascontiguousarray(qt.scale).view(np.uint8), _scale_table(qt.scheme, qt.global_scale)
        else:
            scale_codes, table = _NO_SCALE_CODES_2D, _NO_SCALE_TABLE
        return dequantize_rows_16, (codes, scale, scale_codes, table, zp, has_zp, bo, bi, vk, base_off, fp8_mult,
                                    False)
    return dequantize_rows, _kernel_args(qt) if coded else args


def _dequantizes(qt: QuantizedTensor) -> bool:
    """Whether the dequantizing and portable kernels read ``qt``: not blocks cut at the weight's edge."""
    bo, bi = qt.block_shape
    return qt.shape[0] % bo == 0 and qt.shape[1] % bi == 0


def has_kernels(qt: QuantizedTensor | PreparedTensor, m_rows: int = 1) -> bool:
    """Whether the kernels read ``qt``'s codes for a batch of ``m_rows``.

    Every format but blocks cut at the weight's edge (``m_rows``
    does not matter: every batch has kernels). :func:`npquant.linear` takes
    the numpy path for the others.
    """
    if isinstance(qt, PreparedTensor):
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


def numba_linear(x2: np.ndarray, qt: QuantizedTensor | PreparedTensor, tile_elements: int = _TILE_ELEMENTS,
                 threads: int | None = None, tile_k: int = _TILE_K) -> np.ndarray:
    """float32 ``(M, O)`` = ``x2 (M, I) @ W.T`` for a floating ``x2 (M, I)``, by the kernel :data:`ROUTES` names.

    ``tile_elements`` bounds each float32 tile of the tiled paths;
    ``threads`` is the number of threads (default: :func:`default_threads`,
    one for small layers). A tensor no kernel reads (:func:`has_kernels`)
    goes through numpy's tiles (:func:`npquant.linear`'s ``"numpy"`` backend).
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

        return numpy_linear(x2, qt, tile_elements)
    # The kernels read x by whole lines; BLAS (larger batches) does not care, and
    # copying a batch of hundreds of rows to align it cost 0.2-0.5 ms a call.
    x2, y = _buffers.io_aligned(x2, out_features, m_rows <= SMALL_M)  # one compiled call (see _buffers)
    route.run(x2, qt, y, _Call(tile_elements, tile_k, threads))
    return y


class _Call(NamedTuple):
    """What a call asks of its kernel besides ``x`` and the weight."""

    tile_elements: int
    tile_k: int
    threads: int | None


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
    _rows_linear(x2, qt, _plan(qt)[0], y, call.tile_elements, call.tile_k, call.threads)


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
              call.threads)


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


def _scale_table(scheme, global_scale: np.ndarray | None = None) -> np.ndarray:
    """float32 (256,): the value of each one-byte scale code (e8m0, fp8 e4m3 over ``global_scale`` if given),
    computed as :func:`~npquant.tensor.scale_values` computes each (a float32 division by the global scale)."""
    table = _code_scale_values(scheme)
    return table if global_scale is None else table / global_scale[0]


@functools.cache
def _code_scale_values(scheme) -> np.ndarray:
    """float32 (256,): :func:`~npquant.tensor.scale_values` of every one-byte scale code of ``scheme``.

    Shared by every call: the kernels only read it (a read-only array would
    make numba compile each kernel once more for that type).
    """
    every = np.arange(256, dtype=np.uint8).view(scale_numpy_dtype(scheme))
    with np.errstate(over="ignore", invalid="ignore"):  # the NaN codes: QuantizedTensor and PreparedTensor refuse them
        return np.ascontiguousarray(scale_values(every, scheme), np.float32)


def _lut_args(qt: QuantizedTensor) -> tuple:
    """``(coded, codes, scale, scale_table, zp, has_zp, values, bo)`` for :func:`_run_lut_rows`.

    One-byte scales (e8m0, NVFP4's fp8) stay codes (``coded``), read through
    a table of their 256 values (computed as
    :func:`~npquant.tensor.scale_values` computes each); decoding them all
    would cost more than the call.
    """
    scheme = qt.scheme
    has_zp = qt.zero_point is not None
    if scheme.dtype == "fp4_e2m1":
        values = _float_code_values("fp4_e2m1")
    else:
        values = _NIBBLES if has_zp else _INT4_OFFSET
    codes = np.ascontiguousarray(qt.codes).view(np.uint8)
    coded = qt.scale.dtype.itemsize == 1
    if coded:
        scale = np.ascontiguousarray(qt.scale).view(np.uint8)
        scale_table = _scale_table(scheme, qt.global_scale)
    else:
        scale = _scale_values(qt)
        scale_table = _NO_SCALE_TABLE
    zp = qt.zero_point if has_zp else np.zeros((1, scale.shape[1]), np.uint8)
    return coded, codes, scale, scale_table, zp, has_zp, values, qt.block_shape[0]


def _prepared_scales(p: PreparedTensor) -> tuple:
    """``(scale, scale_codes, scale_table)`` of the prepared 4-bit kernels: fp4's one-byte scale codes with their
    values in a table (NVFP4's over its global scale, as dequantize divides), int4's float32 scales."""
    if p.scheme.dtype == "fp4_e2m1":
        return _NO_SCALE_BLOCKS, p.scale, _scale_table(p.scheme, p.global_scale)
    return p.scale, _NO_SCALE_CODES, _NO_SCALE_TABLE


def _prepared_zp(p: PreparedTensor) -> tuple:
    """``(zp, has_zp)`` of a prepared tensor, a placeholder where it has no zero point."""
    has_zp = p.zero_point is not None
    return (p.zero_point if has_zp else _NO_ZP_BLOCKS), has_zp


def _y_mult(p: PreparedTensor) -> np.float32:
    """What the batch-1 4-bit kernels multiply ``y`` by: one over NVFP4's global scale, else 1."""
    return np.float32(1.0) if p.global_scale is None else np.float32(1.0) / p.global_scale[0]


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
    if p.scheme.bits == 8:
        code_kind = _BYTE_KIND.get(p.scheme.dtype, 3 if has_zp else 0)
        fp8_mult = np.float32(_FP8.get(p.scheme.dtype, (0, 1.0))[1])
        kernel, args = gemm_small_m_bytes_blocks, (x2, p.codes, p.scale, zp, code_kind, fp8_mult, p.block_shape[1])
    else:
        fp4 = p.scheme.dtype == "fp4_e2m1"
        kernel, args = gemm_small_m_int4_blocks, (*_even_odd(x2), p.codes, *_prepared_scales(p), zp, has_zp, fp4,
                                                  p.block_shape[1] // 2)
    _parallel(kernel, (*args, y), p.codes.shape[0], _cost(x2, p), call.threads)


def _run_prepared_tiles(x2, p, y, call) -> None:
    """Tiles of whole blocks dequantized transposed, ``(K, T)``, by all threads, then BLAS."""
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

    tile_rows, tile_cols = tile_shape(p.shape[0], p.shape[1], call.tile_elements, call.tile_k, ROWS)
    tiled(x2, y, tile_rows, tile_cols, dequantize_t, True)


# --- the kernel choice ----------------------------------------------------------------------------------------


class Route(NamedTuple):
    """One row of :data:`ROUTES`: which calls a kernel takes, what it needs of the CPU, and how it is run."""

    layout: str  # "checkpoint" (QuantizedTensor) or "prepared" (PreparedTensor)
    batch: tuple[int, int]  # rows of x, lo and hi inclusive
    codes: str  # the codes it reads, in words
    fits: Callable  # tensor -> bool: the codes, in code
    needs: str  # CPU features, in words ("" for none)
    available: Callable | None  # () -> bool: numba's target has them and the kernels compiled
    kernel: str  # module.function
    run: Callable | None  # (x2, tensor, y, _Call) -> None, writing y; None: the numpy backend's tiles
    why: str


def _always(t) -> bool:
    return True


def _has_lut() -> bool:
    return _lut_kernels() is not None


def _has_vnni() -> bool:
    return _vnni_kernels() is not None


_BIG = 1 << 62
_ONE, _SMALL, _LARGE = (1, 1), (1, SMALL_M), (SMALL_M + 1, _BIG)
_P4 = "4-bit codes (int4, fp4)"

#: Every quantized-linear kernel, by layout, batch, codes and CPU features: the first row a call fits takes it.
ROUTES = (
    Route("checkpoint", (1, _BIG), "codes in blocks cut at the weight's edge", lambda qt: not _dequantizes(qt), "", None,
          "npquant.linear_numpy.numpy_linear", None, "no kernel reads a block cut short"),
    Route("checkpoint", _ONE, f"{_P4} in blocks of 32s or paired 16s", lambda qt: _plan(qt)[1], "AVX-512", _has_lut,
          "_lut.gemv_lut_rows", _run_lut_rows, "each row's block is a 16-entry table in a register (vpermps)"),
    Route("checkpoint", _LARGE, "any codes", _always, "", None, "_tiles (per format) + OpenBLAS", _run_tiles,
          "compute-bound: tiles of about 2 MiB dequantized by all threads, multiplied by BLAS"),
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
        entry = _CHOSEN[key] = (weakref.ref(t, lambda _, key=key: _CHOSEN.pop(key, None)), {})
    regime = (1 if m_rows == 1 else 2 if m_rows <= SMALL_M else 3, USE_LUT, USE_VNNI)
    route = entry[1].get(regime)
    if route is None:
        route = entry[1][regime] = _choose(t, m_rows)
    return route


def _choose(t: QuantizedTensor | PreparedTensor, m_rows: int) -> Route:
    layout = "prepared" if isinstance(t, PreparedTensor) else "checkpoint"
    for route in ROUTES:
        lo, hi = route.batch
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
    'checkpoint layout, batch 1-16, any codes: _small_m.gemm_small_m (each weight row decoded once into L1 for every row of x)'
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise NpquantError(f"batch must be a positive integer, got {batch!r}")
    route = _route(t, int(batch))
    lo, hi = route.batch
    rows = str(lo) if lo == hi else f"{lo}+" if hi == _BIG else f"{lo}-{hi}"
    kernel = route.kernel
    if route.run is _run_tiles:
        kernel = f"_tiles.{_tile_kernel(t, None)[0].__name__} + OpenBLAS"
    needs = f"; needs {route.needs}, which numba's target has" if route.needs else ""
    if "*" in kernel:
        kernel = kernel.replace("*", "bytes" if t.scheme.bits == 8 else "int4")
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
    _nonlinear.gelu(out.reshape(-1, h.shape[-1]))  # in place (see there)
    return out


def add_layer_norm(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``(..., C)``: LayerNorm over the last axis of ``a + b`` (both float32 ``(..., C)``), new array."""
    if a.shape != b.shape or gamma.shape != (a.shape[-1],) or beta.shape != gamma.shape:
        raise NpquantError(f"add_layer_norm: a {a.shape}, b {b.shape}, gamma {gamma.shape} and beta {beta.shape} "
                           f"must be (..., C), (..., C), (C,), (C,)")
    out = np.empty(a.shape, np.float32)
    _nonlinear.add_layer_norm(_rows_f32(a, "a"), _rows_f32(b, "b"), _rows_f32(gamma, "gamma")[0],
                              _rows_f32(beta, "beta")[0], float(eps), out.reshape(-1, a.shape[-1]))
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
    out = np.empty(scores.shape, np.float32)
    _nonlinear.softmax_scaled(np.ascontiguousarray(scores), np.float32(scale), np.ascontiguousarray(key_bias), out)
    return out
