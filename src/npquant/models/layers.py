"""The pieces of a Llama-family decoder layer in numpy float32: RMSNorm, RoPE, causal attention, SwiGLU.

Shapes: ``B`` sequences of ``T`` tokens, width ``C``; ``H`` query heads and
``K`` key/value heads of width ``D`` (grouped-query attention: ``G = H // K``
query heads share one key/value head, query head ``h`` reads key/value head
``h // G``, as transformers' ``repeat_kv`` lays them out).

Everything computes in float32. One table is worked out in float64 and
rounded: RoPE's ``D / 2`` inverse frequencies (:meth:`Rope.inverse_frequencies`).
The angles ``position * frequency`` are float32 products, as transformers
and vLLM form them.

>>> import numpy as np
>>> rope = Rope(theta=10000.0)
>>> cos, sin = rope.tables(5, head_dim=8)
>>> cos.shape, cos.dtype
((5, 8), dtype('float32'))
>>> q = np.ones((2, 5, 4, 8), np.float32)       # (B, T, H, D)
>>> k = v = np.ones((2, 5, 2, 8), np.float32)   # (B, T, K, D)
>>> causal_attention(q, k, v).shape
(2, 5, 4, 8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import NpquantError

__all__ = ["Rope", "ROPE_KINDS", "rms_norm", "apply_rope", "causal_attention", "swiglu"]

#: The RoPE scalings the forward runs (``rope_scaling.rope_type`` in a config).
ROPE_KINDS = ("default", "linear", "llama3")

# Scores of one block of query rows in causal_attention: at most this many float32 (64 MiB).
_SCORE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: the base, and the scaling of its frequencies.

    ``kind`` is one of :data:`ROPE_KINDS`: ``"default"`` (none), ``"linear"``
    (every frequency divided by ``factor``) or ``"llama3"`` (Llama 3.1's:
    wavelengths longer than ``original_max_position_embeddings /
    low_freq_factor`` divided by ``factor``, shorter than ``... /
    high_freq_factor`` kept, the band between interpolated).
    """

    theta: float  # base of the wavelengths, config's rope_theta
    kind: str = "default"  # one of ROPE_KINDS
    factor: float = 1.0  # "linear", "llama3": how much longer the context is
    low_freq_factor: float = 1.0  # "llama3"
    high_freq_factor: float = 4.0  # "llama3"
    original_max_position_embeddings: int = 8192  # "llama3": the context trained before scaling

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise NpquantError(f"rope_type={self.kind!r} is not supported; the forward runs {', '.join(ROPE_KINDS)}")
        if not (math.isfinite(self.theta) and self.theta > 1.0):
            raise NpquantError(f"rope_theta must be a finite number above 1, got {self.theta!r}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise NpquantError(f"rope factor must be a positive number, got {self.factor!r}")
        if self.kind == "llama3":
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise NpquantError(
                    f"llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                    f"high_freq_factor={self.high_freq_factor!r}, low_freq_factor={self.low_freq_factor!r}"
                )
            if self.original_max_position_embeddings < 1:
                raise NpquantError(f"llama3 rope scaling needs original_max_position_embeddings >= 1, got "
                                   f"{self.original_max_position_embeddings!r}")

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """float32 ``(D / 2,)``: the angle per position of each pair of dimensions.

        Worked out in float64 and rounded once (transformers works them out
        in float32: the two differ by at most an ulp per frequency).
        """
        exponent = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim  # (D / 2,)
        inv = 1.0 / self.theta**exponent
        if self.kind == "linear":
            inv = inv / self.factor
        elif self.kind == "llama3":
            old = float(self.original_max_position_embeddings)
            wavelen = 2.0 * math.pi / inv
            low_wavelen = old / self.low_freq_factor  # longer than this: divided by factor
            high_wavelen = old / self.high_freq_factor  # shorter than this: kept
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            between = (1.0 - smooth) * inv / self.factor + smooth * inv
            inv = np.where(wavelen > low_wavelen, inv / self.factor, np.where(wavelen < high_wavelen, inv, between))
        return inv.astype(np.float32)

    def tables(self, length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``cos, sin``, each ``(T, D)``, for positions ``0 .. T - 1``.

        Column ``j`` and ``j + D / 2`` hold the same angle (transformers'
        half-split layout, which :func:`apply_rope` rotates).
        """
        inv = self.inverse_frequencies(head_dim)  # (D / 2,)
        angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]  # (T, D / 2), float32 products
        angles = np.concatenate([angles, angles], axis=1)  # (T, D)
        return np.cos(angles), np.sin(angles)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * weight``.

    ``x`` float32 ``(..., N)``, ``weight`` float32 ``(N,)``; returns a new
    float32 ``(..., N)``.
    """
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)  # (..., 1)
    inv_rms = np.float32(1.0) / np.sqrt(mean_square + np.float32(eps))  # (..., 1)
    out = x * inv_rms
    out *= weight
    return out


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head of ``x (B, T, H, D)`` by its position's angles: ``x * cos + rotate_half(x) * sin``.

    ``cos, sin (T, D)`` from :meth:`Rope.tables`. Dimension ``j`` pairs with
    ``j + D / 2`` (the Hugging Face layout; llama.cpp's interleaved pairs
    are reordered on loading a GGUF). Returns a new float32 array.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (B, T, H, D)
    out = x * cos[:, None, :]  # (B, T, H, D) * (T, 1, D)
    rotated *= sin[:, None, :]
    out += rotated
    return out


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None = None) -> np.ndarray:
    """Grouped-query attention with the causal mask: ``softmax(q k^T / sqrt(D) + mask) v`` per head.

    Parameters
    ----------
    q : float32 (B, T, H, D)
    k, v : float32 (B, T, K, D), with ``H`` a multiple of ``K``
    window : int or None
        Sliding window (Mistral's): query ``i`` sees keys ``j`` with
        ``i - window < j <= i``; None: every ``j <= i``.

    Returns
    -------
    float32 (B, T, H, D)

    Query rows go in blocks whose scores stay under 64 MiB, each against the
    keys it can see, so memory grows with ``T``, not ``T**2``.
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K  # query heads per key/value head
    scale = np.float32(D**-0.5)
    qh = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D)
    kh = np.ascontiguousarray(k.transpose(0, 2, 1, 3))  # (B, K, T, D)
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, K, T, D)
    out = np.empty((B, T, K, G, D), np.float32)
    rows = max(1, _SCORE_ELEMENTS // (B * H * T))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        k0 = 0 if window is None else max(0, t0 - window + 1)  # the first key any row of the block sees
        tq, tk = t1 - t0, t1 - k0
        qc = np.ascontiguousarray(qh[:, :, :, t0:t1]).reshape(B, K, G * tq, D)  # (B, K, G * tq, D)
        scores = qc @ kh[:, :, k0:t1].swapaxes(-1, -2)  # (B, K, G * tq, tk)
        scores *= scale
        scores = scores.reshape(B, K, G, tq, tk)  # (B, K, G, tq, tk), a view
        scores += _mask(t0, t1, k0, window)  # (tq, tk)
        _softmax_last_axis(scores)
        ctx = scores.reshape(B, K, G * tq, tk) @ vh[:, :, k0:t1]  # (B, K, G * tq, D)
        out[:, t0:t1] = ctx.reshape(B, K, G, tq, D).transpose(0, 3, 1, 2, 4)  # (B, tq, K, G, D)
    return out.reshape(B, T, H, D)  # (B, T, H, D): head h = k * G + g


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up``, both float32 ``(..., F)``; ``silu(g) = g / (1 + exp(-g))``.

    Computed in place in ``gate`` (a linear's fresh output) and returned.
    Where ``exp(-g)`` overflows (``g`` below about -88) the quotient is -0,
    silu's limit; where it underflows, ``g`` itself.
    """
    e = np.negative(gate)
    with np.errstate(over="ignore", under="ignore"):
        np.exp(e, out=e)
    e += np.float32(1.0)
    np.divide(gate, e, out=gate)
    gate *= up
    return gate


def _mask(t0: int, t1: int, k0: int, window: int | None) -> np.ndarray:
    """float32 ``(t1 - t0, t1 - k0)``: 0 where query ``t0 + r`` sees key ``k0 + c``, else -inf."""
    i = np.arange(t0, t1)[:, None]  # (tq, 1) query positions
    j = np.arange(k0, t1)[None, :]  # (1, tk) key positions
    seen = j <= i
    if window is not None:
        seen &= j > i - window
    return np.where(seen, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


def _softmax_last_axis(s: np.ndarray) -> None:
    """Softmax over the last axis of float32 ``s``, in place (every row has a finite entry)."""
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
