"""Quantization schemes: what a format is, how it is blocked, and the presets.

A :class:`Scheme` says everything :func:`npquant.quantize` needs to turn a
weight ``w (out_features, in_features)`` into codes and scales:

- ``dtype``: ``"int"`` (``bits`` from 2 to 8), ``"fp8_e4m3"`` or ``"fp8_e5m2"``;
- ``granularity``: which weights share one scale. Every granularity is one
  block shape ``(block_rows, block_cols)`` over ``w``:

  ============  ======================  =======================
  granularity   block of ``w (O, I)``   scale shape
  ============  ======================  =======================
  ``tensor``    ``(O, I)``              ``(1, 1)``
  ``channel``   ``(1, I)``              ``(O, 1)``
  ``group``     ``(1, group_size)``     ``(O, I // group_size)``
  ============  ======================  =======================

- ``symmetric``: int only; asymmetric adds a zero point per block;
- ``scale_dtype``: the dtype the scales are stored in.

>>> s = Scheme(bits=4, granularity="group", group_size=128)
>>> s.qmin, s.qmax, s.block_shape((256, 512))
(-7, 7, (1, 128))
>>> get_scheme("w8-channel").block_shape((256, 512))
(1, 512)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import NpquantError

__all__ = ["Scheme", "schemes", "get_scheme", "FP8_MAX"]

#: Largest finite magnitude of each fp8 format.
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}

_DTYPES = ("int", "fp8_e4m3", "fp8_e5m2")
_GRANULARITIES = ("tensor", "channel", "group")
_SCALE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Scheme:
    """How to quantize a weight matrix.

    Parameters
    ----------
    dtype : {"int", "fp8_e4m3", "fp8_e5m2"}
        Code format.
    bits : int
        Bits per code: 2..8 for ``"int"``; always 8 for fp8.
    granularity : {"tensor", "channel", "group"}
        Which weights share a scale (see the module docstring).
    group_size : int or None
        Consecutive input columns per scale; required for ``"group"`` only.
    symmetric : bool
        ``True``: codes in ``[-qmax, qmax]``, no zero point. ``False`` (int
        only): codes in ``[0, 2**bits - 1]`` with a zero point per block.
    scale_dtype : {"float32", "float16", "bfloat16"}
        Storage dtype of the scales. Quantization uses the scale after it is
        rounded to this dtype, so codes match what an engine will read.
    """

    dtype: str = "int"
    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise NpquantError(f"Scheme dtype={self.dtype!r} is not known; expected one of {_DTYPES}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise NpquantError(f"Scheme bits={self.bits!r} must be an int")
        if self.dtype == "int" and not 2 <= self.bits <= 8:
            raise NpquantError(f"Scheme bits={self.bits} is out of range; int codes take 2 to 8 bits")
        if self.dtype != "int" and self.bits != 8:
            raise NpquantError(f"Scheme bits={self.bits} does not fit dtype={self.dtype!r}; fp8 codes are 8 bits")
        if self.dtype != "int" and not self.symmetric:
            raise NpquantError(f"Scheme symmetric=False is for int codes only; dtype={self.dtype!r} is symmetric")
        if self.granularity not in _GRANULARITIES:
            raise NpquantError(
                f"Scheme granularity={self.granularity!r} is not known; expected one of {_GRANULARITIES}"
            )
        if self.granularity == "group":
            gs = self.group_size
            if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
                raise NpquantError(f"Scheme granularity='group' needs a positive int group_size, got {gs!r}")
        elif self.group_size is not None:
            raise NpquantError(
                f"Scheme group_size={self.group_size} is only for granularity='group', "
                f"not {self.granularity!r}; leave it None"
            )
        if self.scale_dtype not in _SCALE_DTYPES:
            raise NpquantError(
                f"Scheme scale_dtype={self.scale_dtype!r} is not known; expected one of {_SCALE_DTYPES}"
            )

    # --- format facts -------------------------------------------------
    @property
    def is_float(self) -> bool:
        """True for the fp8 formats."""
        return self.dtype != "int"

    @property
    def qmax(self) -> int | float:
        """Largest code: ``2**(bits-1) - 1`` symmetric, ``2**bits - 1`` asymmetric, fp8's max."""
        if self.is_float:
            return FP8_MAX[self.dtype]
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qmin(self) -> int | float:
        """Smallest code: ``-qmax`` symmetric, ``0`` asymmetric."""
        return -self.qmax if self.symmetric else 0

    @property
    def packed(self) -> bool:
        """True when codes are bit-packed (int codes below 8 bits)."""
        return self.dtype == "int" and self.bits < 8

    def block_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Block ``(block_rows, block_cols)`` sharing one scale for ``w`` of ``shape (O, I)``.

        Raises :class:`NpquantError` when ``group_size`` does not divide ``I``.
        """
        out_features, in_features = shape
        if self.granularity == "tensor":
            return (out_features, in_features)
        if self.granularity == "channel":
            return (1, in_features)
        if in_features % self.group_size:
            raise NpquantError(
                f"group_size={self.group_size} must divide in_features={in_features} "
                f"(weight shape {tuple(shape)}); pick a divisor of {in_features}"
            )
        return (1, self.group_size)

    def describe(self) -> str:
        """The rule in one line, e.g. for ``npquant schemes``."""
        if self.granularity == "group":
            where = f"per group of {self.group_size} inputs"
        else:
            where = f"per {self.granularity}"
        if self.is_float:
            rule = f"{self.dtype} codes = round(w / scale), scale = absmax / {self.qmax:g}"
        elif self.symmetric:
            rule = f"int{self.bits} codes in [{self.qmin}, {self.qmax}], scale = absmax / {self.qmax}"
        else:
            rule = (
                f"uint{self.bits} codes in [0, {self.qmax}] with zero point, "
                f"scale = (max - min) / {self.qmax}"
            )
        return f"{rule}, {where}, {self.scale_dtype} scales"


def schemes() -> dict[str, Scheme]:
    """The named presets, in the order a user would read them.

    >>> list(schemes())[:3]
    ['w8-tensor', 'w8-channel', 'w8-g128']
    """
    return dict(_PRESETS)


def get_scheme(scheme: Scheme | str) -> Scheme:
    """A :class:`Scheme` from itself or a preset name; unknown names list the valid ones."""
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str):
        try:
            return _PRESETS[scheme]
        except KeyError:
            raise NpquantError(
                f"scheme={scheme!r} is not a preset; valid presets: {', '.join(_PRESETS)}"
            ) from None
    raise NpquantError(f"scheme must be a Scheme or a preset name, got {type(scheme).__name__}")


def _group(bits: int, size: int, symmetric: bool = True) -> Scheme:
    return Scheme("int", bits, "group", size, symmetric)


_PRESETS: dict[str, Scheme] = {
    "w8-tensor": Scheme("int", 8, "tensor"),
    "w8-channel": Scheme("int", 8, "channel"),
    "w8-g128": _group(8, 128),
    "w4-tensor": Scheme("int", 4, "tensor"),
    "w4-channel": Scheme("int", 4, "channel"),
    "w4-g128": _group(4, 128),
    "w4-g64": _group(4, 64),
    "w4-g32": _group(4, 32),
    "w4-g128-asym": _group(4, 128, symmetric=False),
    "w3-g128": _group(3, 128),
    "w2-g64": _group(2, 64),
    "fp8-tensor": Scheme("fp8_e4m3", 8, "tensor"),
    "fp8-channel": Scheme("fp8_e4m3", 8, "channel"),
}
