"""Dense bit packing of unsigned codes below 8 bits.

Bit order (the one compressed-tensors and vLLM use, see ``pack-quantized``):
each row is one little-endian bit stream. Element ``i`` of a row occupies
stream bits ``[i * bits, (i + 1) * bits)``, its least significant bit first;
stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. A row of ``n`` codes
takes ``ceil(n * bits / 8)`` bytes; the unused high bits of the last byte are
zero. Rows never share a byte, so any row slice unpacks on its own.

Reading the bytes of a row as little-endian int32 words (after padding the
row to a multiple of 4 bytes) gives exactly the ``weight_packed`` words of a
compressed-tensors checkpoint: int4 codes ``[1, 2, 3, 4, 5, 6, 7, 0]`` pack to
the word ``0x07654321``.

>>> import numpy as np
>>> u = np.array([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=np.uint8)
>>> p = pack_codes(u, 4)
>>> p.shape, hex(int(p.view("<u4")[0, 0]))
((1, 4), '0x7654321')
>>> bool((unpack_codes(p, 4, 8) == u).all())
True
"""

from __future__ import annotations

import numpy as np

__all__ = ["packed_row_bytes", "pack_codes", "unpack_codes"]

# Elements per chunk on the 3, 5, 6 and 7-bit path, which holds each run of
# whole bytes (3 to 7 of them) as one uint64 word: this bounds its temporary memory.
_CHUNK_ELEMENTS = 1 << 22


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes: ``ceil(n * bits / 8)``."""
    return (n * bits + 7) // 8


def pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes row by row.

    Parameters
    ----------
    u : uint8 (R, n)
        Codes, each in ``[0, 2**bits - 1]`` (not checked here: callers make them).
    bits : int
        2 to 8.

    Returns
    -------
    uint8 (R, ceil(n * bits / 8))
    """
    rows, n = u.shape
    nbytes = packed_row_bytes(n, bits)
    if bits == 8:
        return u.astype(np.uint8, copy=True)
    if 8 % bits == 0:
        per = 8 // bits
        padded = np.zeros((rows, nbytes * per), dtype=np.uint8)
        padded[:, :n] = u
        lanes = padded.reshape(rows, nbytes, per)  # (R, B, codes per byte)
        out = np.zeros((rows, nbytes), dtype=np.uint8)
        for k in range(per):
            out |= lanes[:, :, k] << np.uint8(k * bits)
        return out
    per, width = _word_shape(bits)  # codes, bytes per word
    n_words = -(-n // per)
    out = np.empty((rows, n_words * width), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for r0 in range(0, rows, step):
        chunk = u[r0 : r0 + step]
        codes = np.zeros((chunk.shape[0], n_words * per), dtype=np.uint64)
        codes[:, :n] = chunk
        codes = codes.reshape(chunk.shape[0], n_words, per)  # (r, W, codes per word)
        word = np.zeros((chunk.shape[0], n_words), dtype=np.uint64)
        for k in range(per):
            word |= codes[:, :, k] << np.uint64(k * bits)
        as_bytes = out[r0 : r0 + step].reshape(chunk.shape[0], n_words, width)
        for k in range(width):
            as_bytes[:, :, k] = (word >> np.uint64(8 * k)).astype(np.uint8)
    return out[:, :nbytes].copy() if out.shape[1] != nbytes else out


def _word_shape(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of the smallest run of whole bytes holding whole codes: 3 bits (8, 3), 6 bits (4, 3)."""
    import math

    width = bits // math.gcd(bits, 8)
    return 8 * width // bits, width


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`.

    Parameters
    ----------
    packed : uint8 (R, ceil(n * bits / 8))
    bits : int
    n : int
        Codes per row.

    Returns
    -------
    uint8 (R, n)
    """
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n].astype(np.uint8, copy=True)
    mask = np.uint8((1 << bits) - 1)
    if 8 % bits == 0:
        per = 8 // bits
        out = np.empty((rows, packed.shape[1], per), dtype=np.uint8)  # (R, B, codes per byte)
        for k in range(per):
            np.bitwise_and(packed >> np.uint8(k * bits), mask, out=out[:, :, k])
        return out.reshape(rows, -1)[:, :n]
    per, width = _word_shape(bits)
    n_words = -(-n // per)
    out = np.empty((rows, n_words * per), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for r0 in range(0, rows, step):
        chunk = packed[r0 : r0 + step]
        padded = np.zeros((chunk.shape[0], n_words * width), dtype=np.uint8)
        padded[:, : chunk.shape[1]] = chunk
        as_bytes = padded.reshape(chunk.shape[0], n_words, width)  # (r, W, bytes per word)
        word = np.zeros((chunk.shape[0], n_words), dtype=np.uint64)
        for k in range(width):
            word |= as_bytes[:, :, k].astype(np.uint64) << np.uint64(8 * k)
        codes = out[r0 : r0 + step].reshape(chunk.shape[0], n_words, per)
        for k in range(per):
            codes[:, :, k] = (word >> np.uint64(k * bits)) & np.uint64(mask)
    return out[:, :n]
