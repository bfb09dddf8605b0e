"""The W8A8 int8 linear on the CPU: per-token int8 activations times int8 weights, an integer GEMM.

``y (M, N) = x (M, K) @ W.T`` for int8 weight codes with one float32 scale
per output row: ``x`` is quantized per token inside the call (the rule of
:func:`npquant.activations.quantize_activations_int8`, bit for bit, in one
compiled pass), the codes multiplied in integers, and the two scales
applied as :func:`npquant.linear_w8a8.scale_outputs` does. The int32
accumulators equal the exact integer sums and the float32 outputs are
bit-equal to :func:`npquant.linear_w8a8.w8a8_int8_linear`'s (tests), at
every batch.

Three paths, by what numba compiles for (:mod:`~npquant.kernels._target`):

- ``"vnni"`` (AVX-512 VNNI, :mod:`~npquant.kernels._w8a8_vnni`): ``vpdpbusd``,
  64 multiply-adds an instruction, ``x`` offset by 128 to unsigned bytes and
  ``128 * rowsum(w)`` subtracted.
- ``"avx2"`` (:mod:`~npquant.kernels._w8a8_avx2`): ``vpmaddwd`` on codes
  widened to int16, 16 multiply-adds an instruction, exact for every code.
  Not ``vpmaddubsw``: it adds two ``u8 * s8`` products into a saturating
  int16, and with ``x`` offset to ``[0, 255]`` a pair reaches ``2 * 255 *
  127 = 64770 > 32767`` (even ``|w| <= 127`` saturates); its exact use, the
  sign trick (``|x|`` against ``w`` with ``x``'s sign), needs ``|w| <= 127``
  and one ``vpsignb`` per product pair, which costs as many instructions
  per multiply-add as widening to int16 does.
- ``"portable"`` (:func:`~npquant.kernels._w8a8_core.gemm_portable`): loops,
  on any CPU.

One token with no path asked for takes the AVX2 kernel where the VNNI one
would serve (:func:`_path_for`: at batch 1 it reads the weight faster).
A feature-specific module compiles on first use, only where the target has
the feature; where it fails to compile anyway, one warning says so and the
next path serves. The weight is laid out once (:func:`prepare_int8`, as
vLLM's ``process_weights_after_loading``): blocks of 64 rows, ``K`` padded
to a multiple of 4 (see :mod:`~npquant.kernels._w8a8_core`). Threads: on
OpenBLAS's own threads where numpy's BLAS allows it, else npquant's pool,
each claiming blocks of 64 rows (:mod:`~npquant.kernels._blas_threads`).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import numpy as np

from ..errors import NpquantError
from . import _blas_threads, _pool
from ._env import threads_allowed
from ._target import has_vnni, target_has
from ._w8a8_core import gemm_portable, pack_weight, quantize_x_int8

__all__ = ["Int8Weight", "prepare_int8", "w8a8_int8_linear", "int8_accumulators", "int8_path", "PATHS"]

#: The kernel paths, fastest first.
PATHS = ("vnni", "avx2", "portable")
_MAX_K = (2**31 - 1) // (128 * 128)  # npquant.linear_w8a8.MAX_INT32_K: int32 sums exact whatever the codes
_PARALLEL_FROM = 1 << 22  # multiply-adds below which a call stays on the caller's thread (as the other kernels)
_QUANTIZE_PARALLEL_FROM = 1 << 16  # elements of x below which its quantization stays on the caller's thread
#: Whether calls run on OpenBLAS's threads where they can (tests and benchmarks switch it off to reach the pool).
USE_BLAS_THREADS = True
_CHUNKS_PER_THREAD = 32  # small chunks (3 blocks of 64 rows for 11008 rows, 2 threads): a thread the OS
# holds back leaves little for the others to wait on
# Chunks per thread at batch 1, where a call only streams the weight: one contiguous part each, as OpenBLAS
# splits its own GEMV. 11008 x 4096, prepared, each call after a float32 matmul of another matrix, six weights in
# turn, the two settings alternating in one process (3 runs): 1.553 / 1.609 / 1.590 ms with 32 chunks, 1.535 /
# 1.556 / 1.569 ms with one (AVX-512 host; numba targeting Zen 2: 1.643 / 1.619 -> 1.620 / 1.607).
_STREAM_CHUNKS = 1


class Int8Weight(NamedTuple):
    """An int8 weight in the GEMM's layout (:func:`prepare_int8`); ``shape`` is ``(N, K)``."""

    packed: np.ndarray  # uint8 (Np / 64, Kp / 4, 256)
    corr: np.ndarray  # int32 (Np,): 128 * rowsum(wq)
    w_scale: np.ndarray  # float32 (Np,), zeros past N
    shape: tuple  # (N, K)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.corr.nbytes + self.w_scale.nbytes


def prepare_int8(wq: np.ndarray, w_scale: np.ndarray) -> Int8Weight:
    """The layout of int8 codes ``wq (N, K)`` (``[-128, 127]``) with float32 ``w_scale (N,)``, made once.

    ``K`` must be at most 131071 (int32 sums exact whatever the codes).
    """
    wq = np.asarray(wq)
    if wq.dtype != np.int8 or wq.ndim != 2 or 0 in wq.shape:
        raise NpquantError(f"wq must be a non-empty 2-d int8 array (out_features, in_features), got {wq.dtype} "
                           f"{wq.shape}")
    n, k = wq.shape
    if k > _MAX_K:
        raise NpquantError(f"wq has in_features={k}: the int8 GEMM sums in int32, exact up to {_MAX_K} columns")
    w_scale = np.asarray(w_scale)
    if w_scale.dtype != np.float32 or w_scale.shape != (n,):
        raise NpquantError(f"w_scale must be float32 ({n},) for wq {wq.shape}, got {w_scale.dtype} {w_scale.shape}")
    packed, corr = pack_weight(wq)
    scale = np.zeros(corr.shape, np.float32)
    scale[:n] = w_scale
    return Int8Weight(packed, corr, scale, (n, k))


@functools.cache
def _module(path: str):
    """The module of a SIMD path where it compiled (once), else None with one warning."""
    if path == "vnni":
        from . import _w8a8_vnni as module
    else:
        from . import _w8a8_avx2 as module
    try:
        module.compile_jobs()
    except Exception as error:  # a compile error must cost speed, not the call
        warnings.warn(f"npquant: {module.__name__} did not compile ({type(error).__name__}: {error}); "
                      "a slower int8 GEMM serves instead", RuntimeWarning, stacklevel=4)
        return None
    return module


@functools.cache
def _target_allows(path: str) -> bool:
    """Whether numba's target has ``path``'s instructions (read once, as :func:`~npquant.kernels.has_vnni` is)."""
    return has_vnni() if path == "vnni" else target_has("avx2") if path == "avx2" else True


def int8_path(path: str | None = None) -> str:
    """The path a call with ``path`` takes: ``path`` itself where numba's target has its features (and it
    compiled), else the next of :data:`PATHS`; ``None`` asks for the fastest."""
    if path is not None and path not in PATHS:
        raise NpquantError(f"path={path!r}: expected one of {PATHS} or None")
    for p in PATHS[PATHS.index(path) if path else 0:]:
        if p == "portable" or (_target_allows(p) and _module(p) is not None):
            return p
    return "portable"


def _path_for(m_rows: int, path: str | None) -> str:
    """The path a call of ``m_rows`` tokens takes: :func:`int8_path`, except that one token, with no path asked
    for, takes the AVX2 kernel where the VNNI one would serve and AVX2 compiled.

    At batch 1 the GEMM only streams the weight, and the AVX2 kernel's tiles
    of 16 rows (four passes over each 4 KiB of the layout, a line of each
    quad at a time) read it faster than the VNNI kernel's 64-row tile: 11008
    x 4096, each call after a float32 matmul of another matrix, one of four
    weights in turn, medians of 30, the two alternating in one process (Intel
    Xeon, 2 threads): 1.76-1.82 ms VNNI, 1.56-1.58 ms AVX2. The results are
    the same bits (both exact, one epilogue).
    """
    p = int8_path(path)
    if p == "vnni" and m_rows == 1 and path is None and int8_path("avx2") == "avx2":
        return "avx2"
    return p


def _kernel(path: str):
    if path == "portable":
        return gemm_portable
    module = _module(path)
    return module.gemm_vnni if path == "vnni" else module.gemm_avx2


def _threads_default() -> int:
    n = threads_allowed()
    if n > 0:
        return n
    env = os.environ.get("NPQUANT_NUM_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise NpquantError(f"NPQUANT_NUM_THREADS={env!r}: expected a whole number of threads >= 1") from None
    return _pool.cpu_count()


def _parallel(kernel, args: tuple, n_units: int, cost: int, threads: int | None,
              parallel_from: int = _PARALLEL_FROM, chunks: int = _CHUNKS_PER_THREAD) -> None:
    """``kernel(*args, work, per)`` on OpenBLAS's threads or npquant's pool, as
    :func:`npquant.kernels._parallel` runs the other kernels (one thread below a ``cost`` of ``parallel_from``)."""
    if threads is None:
        threads = 1 if cost < parallel_from else 0
    blas = threads != 1 and n_units > 1 and USE_BLAS_THREADS and _blas_threads.usable()
    if blas and _blas_threads.run(kernel, args, n_units, threads, chunks):
        return
    n = max(1, min(threads or _threads_default(), n_units))
    if blas and n > 1:
        _blas_threads.run(kernel, args, n_units, n, chunks)
        return
    work = np.zeros(1, np.int64)
    if n == 1:
        kernel(*args, work, n_units)
        return
    per = max(1, -(-n_units // (n * chunks)))
    _pool.run(lambda: kernel(*args, work, per), n)


def _quantize_x(x2: np.ndarray, k_pad: int, offset: bool, threads: int | None):
    """``(codes_u8, codes_i16, scale, finite)`` of float32 ``x2 (M, K)``: :func:`quantize_x_int8` on the threads
    a call of ``M K`` elements deserves (from ``_QUANTIZE_PARALLEL_FROM``; ``threads`` caps them), codes offset
    by 128 into uint8 ``(M, k_pad)`` (padding 128) when ``offset``, else int16 (padding 0)."""
    m_rows, k = x2.shape
    if offset:
        codes_u8 = np.full((m_rows, k_pad), 128, np.uint8)
        codes_i16 = _NO_I16
    else:
        codes_u8 = _NO_U8
        codes_i16 = np.zeros((m_rows, k_pad), np.int16)
    scale = np.empty(m_rows, np.float32)
    bad = np.zeros(1, np.int64)
    _parallel(quantize_x_int8, (x2, offset, codes_u8, codes_i16, scale, bad), m_rows, m_rows * k, threads,
              _QUANTIZE_PARALLEL_FROM)
    return codes_u8, codes_i16, scale, bad[0] == 0


_NO_U8 = np.zeros((1, 1), np.uint8)
_NO_I16 = np.zeros((1, 1), np.int16)
_NO_F32 = np.zeros(1, np.float32)
_NO_Y = np.zeros((1, 1), np.float32)
_NO_ACC = np.zeros((1, 1), np.int32)


def _run(path, codes, x_scale, weight, bias, want_acc, threads) -> np.ndarray:
    m_rows = codes.shape[0]
    n, k = weight.shape
    y = np.empty((m_rows, n), np.int32 if want_acc else np.float32)
    corr = weight.corr if path == "vnni" else np.zeros_like(weight.corr)  # only vnni's codes are offset
    has_bias = bias is not None
    args = (codes, weight.packed, corr, x_scale, weight.w_scale, bias if has_bias else _NO_F32, has_bias,
            _NO_Y if want_acc else y, want_acc, y if want_acc else _NO_ACC)
    _parallel(_kernel(path), args, weight.packed.shape[0], m_rows * n * k, threads,
              chunks=_STREAM_CHUNKS if m_rows == 1 else _CHUNKS_PER_THREAD)
    return y


def _check_x(x, k: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim < 1 or a.shape[-1] != k:
        raise NpquantError(f"x must be (..., {k}) for a weight of {k} in_features, got shape {a.shape}")
    return a


def w8a8_int8_linear(x, weight: Int8Weight, bias: np.ndarray | None = None, path: str | None = None,
                     threads: int | None = None) -> np.ndarray:
    """float32 ``(..., N)``: ``x (..., K)`` (float32, float16 or bfloat16, finite) quantized per token to int8,
    times the prepared ``weight``, scaled, plus float32 ``bias (N,)`` if given; bit-equal to
    :func:`npquant.linear_w8a8.w8a8_int8_linear`.

    ``path``: one of :data:`PATHS` (it or the next one the target allows,
    :func:`int8_path`), or None for the fastest. ``threads``: at most this
    many (default: every core for a large call, one for a small).
    """
    n, k = weight.shape
    a = _check_x(x, k)
    x2 = np.ascontiguousarray(a.reshape(-1, k), dtype=np.float32)  # (M, K)
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32 or bias.shape != (n,):
            raise NpquantError(f"bias must be float32 ({n},), got {bias.dtype} {bias.shape}")
        bias = np.ascontiguousarray(bias)
    p = _path_for(x2.shape[0], path)
    k_pad = weight.packed.shape[1] * 4
    codes_u8, codes_i16, x_scale, finite = _quantize_x(x2, k_pad, p == "vnni", threads)
    if not finite:
        raise NpquantError("x must be finite: it holds NaN or Inf, which have no int8 code")
    y = _run(p, codes_u8 if p == "vnni" else codes_i16, x_scale, weight, bias, False, threads)
    return y.reshape(*a.shape[:-1], n)


def int8_accumulators(xq: np.ndarray, weight: Int8Weight, path: str | None = None,
                      threads: int | None = None) -> np.ndarray:
    """int32 ``(M, N)``: ``xq (M, K) @ wq.T`` for int8 codes ``xq`` (``[-128, 127]``), exactly, by the kernel of
    ``path`` (as :func:`w8a8_int8_linear`)."""
    n, k = weight.shape
    xq = np.asarray(xq)
    if xq.dtype != np.int8 or xq.ndim != 2 or xq.shape[1] != k:
        raise NpquantError(f"xq must be int8 (M, {k}), got {xq.dtype} {xq.shape}")
    p = int8_path(path)
    k_pad = weight.packed.shape[1] * 4
    if p == "vnni":
        codes = np.full((xq.shape[0], k_pad), 128, np.uint8)
        codes[:, :k] = xq.view(np.uint8) ^ np.uint8(0x80)  # x + 128
    else:
        codes = np.zeros((xq.shape[0], k_pad), np.int16)
        codes[:, :k] = xq
    ones = np.ones(xq.shape[0], np.float32)
    return _run(p, codes, ones, weight, None, True, threads)
