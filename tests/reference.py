"""An independent reference of npquant's rules, written from the docstrings.

It shares no code with npquant: plain Python loops over blocks, float64
arithmetic rounded to float32 after each operation where the rules say
float32 (for +, -, *, / of float32 operands, computing in float64 and
rounding once gives exactly IEEE float32's answer, since 53 >= 2 * 24 + 2),
Python's ``round`` (half to even), and fp8 values decoded from their bit
fields by formula. It is slow and meant for small matrices.
"""

import math
import struct

import numpy as np


def f32(v: float) -> float:
    """Round a float64 to the nearest float32 (half to even), as a Python float."""
    return float(np.float32(v))


def round_bf16(v: float) -> float:
    """Round a float32 value to bfloat16 (half to even), by its bits."""
    (bits,) = struct.unpack("<I", struct.pack("<f", v))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def round_scale(v: float, scale_dtype: str) -> float:
    if scale_dtype == "float32":
        return v
    if scale_dtype == "float16":
        return float(np.float16(v))
    return round_bf16(v)


# --- fp8 by formula -----------------------------------------------------
FP8_FORMATS = {
    # name: (exponent bits, mantissa bits, bias, has_inf)
    "fp8_e4m3": (4, 3, 7, False),
    "fp8_e5m2": (5, 2, 15, True),
}


def fp8_decode(code: int, fmt: str) -> float:
    """The value of an 8-bit pattern: sign, exponent, mantissa fields."""
    e_bits, m_bits, bias, has_inf = FP8_FORMATS[fmt]
    sign = -1.0 if code & 0x80 else 1.0
    exp = (code >> m_bits) & ((1 << e_bits) - 1)
    man = code & ((1 << m_bits) - 1)
    top = (1 << e_bits) - 1
    if has_inf and exp == top:
        return sign * math.inf if man == 0 else math.nan
    if not has_inf and exp == top and man == (1 << m_bits) - 1:
        return math.nan  # e4m3fn: only S.1111.111 is NaN, no infinities
    if exp == 0:
        return sign * man * 2.0 ** (1 - bias - m_bits)
    return sign * (1 + man / 2**m_bits) * 2.0 ** (exp - bias)


def fp8_finite_table(fmt: str) -> list[tuple[float, int]]:
    """(value, code) of every finite pattern, +0 and -0 included."""
    out = []
    for code in range(256):
        v = fp8_decode(code, fmt)
        if math.isfinite(v):
            out.append((v, code))
    return out


def fp8_round(v: float, fmt: str) -> int:
    """Code of the nearest finite fp8 value; ties go to the even mantissa (code's low bit 0)."""
    negative = math.copysign(1.0, v) < 0
    best = None
    for value, code in fp8_finite_table(fmt):
        if value == 0 and bool(code & 0x80) != negative:
            continue  # zero keeps the input's sign
        d = abs(value - v)
        key = (d, code & 1)
        if best is None or key < best[0]:
            best = (key, code)
    return best[1]


FLOAT_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


# --- quantization -------------------------------------------------------
def blocks(shape, granularity, group_size):
    """Yield (rows, cols) index ranges of each block, in scale order (row-major)."""
    out_features, in_features = shape
    if granularity == "tensor":
        yield range(out_features), range(in_features)
    elif granularity == "channel":
        for o in range(out_features):
            yield range(o, o + 1), range(in_features)
    else:
        for o in range(out_features):
            for g in range(in_features // group_size):
                yield range(o, o + 1), range(g * group_size, (g + 1) * group_size)


#: Machine epsilon of each scale dtype: a full-grid block's scale when absmax / (2**(b-1) - 0.5) is 0.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def round_to(v: float, dtype: str | None) -> float:
    """``v`` rounded (half to even) to ``dtype`` (``"bfloat16"``, ``"float16"``), or unchanged for None."""
    if dtype is None:
        return v
    if dtype == "float16":
        return float(np.float16(v))
    return round_bf16(v)


def reference_quantize(w, dtype="int", bits=8, granularity="channel", group_size=None,
                       symmetric=True, scale_dtype="float32", grid="full", ratio_dtype=None):
    """Codes (int64 or fp8 bit patterns), scales and zero points as nested lists.

    Symmetric int codes follow ``grid``: ``"full"`` is compressed-tensors'
    rule (spec 0.3/0.4, e.1, g): ``scale = absmax / (2**(b-1) - 0.5)`` rounded
    to ``scale_dtype``, 0 replaced by that dtype's epsilon; ``w / scale``
    rounded to ``ratio_dtype`` (the model's 16-bit dtype, when the scales
    share it), clamped to ``[-2**(b-1), 2**(b-1) - 1]``, then rounded half to
    even. ``"restricted"``: ``scale = absmax / qmax``, ``[-qmax, qmax]``.

    Returns
    -------
    codes : int64 (O, I): signed codes (symmetric), unsigned (asymmetric), or
        fp8 bit patterns
    scales : list of float, one per block in row-major block order
    zero_points : list of int or None
    """
    w = np.asarray(w).astype(np.float64)
    codes = np.zeros(w.shape, dtype=np.int64)
    scales, zero_points = [], []
    for rows, cols in blocks(w.shape, granularity, group_size):
        vals = [f32(w[o, i]) for o in rows for i in cols]
        full = dtype == "int" and symmetric and grid == "full"
        if dtype != "int":
            qmax = FLOAT_MAX[dtype]
        elif symmetric:
            qmax = 2 ** (bits - 1) - 1
        else:
            qmax = 2**bits - 1
        if full:
            half_range = (qmax - (-(2 ** (bits - 1)))) / 2  # compressed-tensors' R / 2: 7.5 for int4
            scale = round_scale(f32(max(abs(v) for v in vals) / half_range), scale_dtype)
            if scale == 0:
                scale = EPS[scale_dtype]
        elif symmetric:
            scale = round_scale(f32(max(abs(v) for v in vals) / qmax), scale_dtype)
        else:
            lo = min(min(vals), 0.0)
            hi = max(max(vals), 0.0)
            scale = round_scale(f32(f32(hi - lo) / qmax), scale_dtype)
        scales.append(scale)
        zp = 0
        if not symmetric:
            zp = 0 if scale == 0 else min(max(round(f32(-lo / scale)), 0), qmax)
            zero_points.append(zp)
        for o in rows:
            for i in cols:
                r = 0.0 if scale == 0 else f32(f32(w[o, i]) / scale)
                if full:
                    codes[o, i] = round(min(max(round_to(r, ratio_dtype), -(2 ** (bits - 1))), qmax))
                elif dtype != "int":
                    codes[o, i] = fp8_round(min(max(r, -qmax), qmax), dtype)
                elif symmetric:
                    codes[o, i] = min(max(round(r), -qmax), qmax)
                else:
                    codes[o, i] = min(max(round(r) + zp, 0), qmax)
    return codes, scales, (zero_points if not symmetric else None)


def reference_dequantize(codes, scales, zero_points, shape, dtype="int", granularity="channel", group_size=None):
    """float32 (O, I) from the reference's codes: ``(q - zp) * scale`` rounded to float32."""
    out = np.zeros(shape, dtype=np.float32)
    for b, (rows, cols) in enumerate(blocks(shape, granularity, group_size)):
        zp = zero_points[b] if zero_points is not None else 0
        for o in rows:
            for i in cols:
                q = fp8_decode(int(codes[o, i]), dtype) if dtype != "int" else codes[o, i] - zp
                out[o, i] = f32(q * scales[b])
    return out


def reference_pack(values, bits):
    """One row of unsigned values into bytes, through a Python big integer."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * bits)
    nbytes = (len(values) * bits + 7) // 8
    return list(acc.to_bytes(nbytes, "little"))


# --- compressed-tensors' microscaled formats (float32 models), from the spec's rules ---------
FP4_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # e2m1, by mantissa code 0..7


def fp4_decode(code: int) -> float:
    """The value of a 4-bit e2m1 pattern ``s<<3 | mag``."""
    return -FP4_MAGNITUDES[code & 7] if code & 8 else FP4_MAGNITUDES[code & 7]


def fp6_decode(code: int) -> float:
    """The value of a 6-bit e2m3 pattern ``s<<5 | e<<3 | m`` (bias 1, subnormals at e = 0, no Inf/NaN)."""
    e, m = (code >> 3) & 3, code & 7
    v = m / 8 if e == 0 else 2.0 ** (e - 1) * (1 + m / 8)
    return -v if code & 0x20 else v


def _nearest(a: float, magnitudes: list[float]) -> int:
    """Index of the magnitude nearest ``a``; ties to the even index (the mantissa's low bit)."""
    return min(range(len(magnitudes)), key=lambda k: (abs(magnitudes[k] - a), k & 1))


def fp4_round(x: float) -> int:
    """compressed-tensors' fp4 code: clamp to +-6, nearest with ties to even, sign bit ``x < 0``."""
    mag = _nearest(min(abs(x), 6.0), FP4_MAGNITUDES)
    return mag | (8 if x < 0 else 0)


FP6_MAGNITUDES = [fp6_decode(c) for c in range(32)]


def fp6_round(x: float) -> int:
    """The fp6 e2m3 code: clamp to +-7.5, nearest with ties to even, the sign bit of ``x``."""
    mag = _nearest(min(abs(x), 7.5), FP6_MAGNITUDES)
    return mag | (0x20 if math.copysign(1.0, x) < 0 else 0)


def mx_exponent(amax: float, dtype: str) -> int:
    """The biased e8m0 exponent E of a float32 group maximum, written from the rule's arithmetic.

    The power of two is 2**floor(log2 amax), doubled when amax's mantissa is at
    least 2 - 2**-(m+1) (m = 1 for fp4 and fp8: 1.75; m = 3 for fp6: 1.9375).
    Below the smallest normal 2**-126 the rounding reaches 2**-126 from
    2**-126 * (1 - 2**-(m+1)) up, else the power is 0 (log2 0 = -inf).
    """
    m, off = {"fp4_e2m1": (1, 2), "fp6_e2m3": (3, 2), "fp8_e4m3": (1, 8)}[dtype]
    if amax >= 2.0**-126:
        e = math.frexp(amax)[1] - 1  # amax = mant * 2**e, 1 <= mant < 2
        if amax / 2.0**e >= 2 - 2.0 ** -(m + 1):
            e += 1
    elif amax >= 2.0**-126 * (1 - 2.0 ** -(m + 1)):
        e = -126
    else:
        return 0
    return min(max(127 + e - off, 0), 255)


def reference_microscaled(w, preset: str):
    """Codes (one per weight, unpacked), stored scale values and NVFP4's global scale of float32 ``w``.

    Returns ``(codes int64 (O, I), scales float list per block in row-major order, global scale or None)``;
    MX scales are their exponents E, NVFP4's their fp8 codes.
    """
    w = np.asarray(w, np.float32).astype(np.float64)
    rows, cols = w.shape
    codes = np.zeros(w.shape, np.int64)
    scales, gs = [], None
    if preset == "nvfp4":
        gs = f32(f32(1 / max(np.abs(w).max(), 2.0**-126)) * 2688)
    size = {"nvfp4": (1, 16), "mxfp4": (1, 32), "mxfp6": (1, 32), "mxfp8": (1, 32), "fp8-block": (128, 128)}[preset]
    for r0 in range(0, rows, size[0]):
        for c0 in range(0, cols, size[1]):
            block = w[r0 : r0 + size[0], c0 : c0 + size[1]]
            amax = float(np.abs(block).max())
            if preset == "nvfp4":
                raw = f32(gs * f32(amax / 6))
                s_code = fp8_round(min(raw, 448.0), "fp8_e4m3")
                s = fp8_decode(s_code, "fp8_e4m3") or 0.125
                s_code = s_code if fp8_decode(s_code, "fp8_e4m3") else fp8_round(0.125, "fp8_e4m3")
                scales.append(s_code)
                divisor = f32(s / gs)
            elif preset == "fp8-block":
                divisor = f32(amax / 448) or 2.0**-23
                scales.append(divisor)
            else:
                dtype = {"mxfp4": "fp4_e2m1", "mxfp6": "fp6_e2m3", "mxfp8": "fp8_e4m3"}[preset]
                e = mx_exponent(amax, dtype)
                scales.append(e)
                divisor = 2.0 ** (e - 127)
            for i in range(block.shape[0]):
                for j in range(block.shape[1]):
                    x = f32(block[i, j] / divisor)
                    if preset in ("nvfp4", "mxfp4"):
                        code = fp4_round(x)
                    elif preset == "mxfp6":
                        code = fp6_round(x)
                    else:  # fp8 adds the zero point 0 first: -0.0 becomes +0.0
                        code = fp8_round(min(max(x + 0.0, -448.0), 448.0), "fp8_e4m3")
                    codes[r0 + i, c0 + j] = code
    return codes, scales, gs
