"""Quantization schemes: what a format is, how it is blocked, and the presets.

A :class:`Scheme` says everything :func:`npquant.quantize` needs to turn a
weight ``w (out_features, in_features)`` into codes and scales:

- ``dtype``: ``"int"`` (``bits`` from 2 to 8), ``"fp8_e4m3"``, ``"fp8_e5m2"``,
  ``"fp4_e2m1"`` (4 bits) or ``"fp6_e2m3"`` (6 bits);
- ``granularity``: which weights share one scale. Every granularity is one
  block shape ``(block_rows, block_cols)`` over ``w``:

  ============  ======================  ==================================
  granularity   block of ``w (O, I)``   scale shape
  ============  ======================  ==================================
  ``tensor``    ``(O, I)``              ``(1, 1)``
  ``channel``   ``(1, I)``              ``(O, 1)``
  ``group``     ``(1, group_size)``     ``(O, I // group_size)``
  ``block``     ``block_size``          ``(ceil(O / rows), ceil(I / cols))``
  ============  ======================  ==================================

  Blocks that do not divide the shape are cut at its edge (the weight is
  read as if zero-padded to whole blocks, as compressed-tensors does).
- ``symmetric``: int only; asymmetric adds a zero point per block;
- ``grid``: symmetric int only: ``"full"`` uses every code of ``b`` bits,
  ``[-2**(b-1), 2**(b-1) - 1]``, with ``scale = absmax / (2**(b-1) - 0.5)``
  (compressed-tensors' rule: int4 ``[-8, 7]``, ``absmax / 7.5``);
  ``"restricted"`` leaves out the lowest code, ``[-qmax, qmax]`` with
  ``scale = absmax / qmax`` (int4 ``[-7, 7]``, ``absmax / 7``). Every other
  format (asymmetric int, fp8, fp6, fp4) always uses its full grid;
- ``scale_dtype``: the dtype the scales are stored in: ``"float32"``,
  ``"float16"``, ``"bfloat16"``, ``"fp8_e4m3"`` (NVFP4: fp8 scales times one
  float32 global scale per tensor) or ``"e8m0"`` (MX: a power of two,
  stored as its biased exponent byte);
- ``activations``: ``None`` (weight-only: ``x`` stays float32) or the rule
  that quantizes ``x`` inside :func:`npquant.linear`, per token, dynamic,
  symmetric (W8A8, :mod:`npquant.activations`): ``"int8-token"`` (int8
  weight codes per channel, symmetric) or ``"fp8-token"`` (fp8 e4m3 weight
  codes per channel). compressed-tensors' ``input_activations`` ``{num_bits:
  8, type: int | float, strategy: token, dynamic: true, symmetric: true}``.
  The weights are quantized as without it (``w8a8-int8``'s codes and
  scales are ``w8-channel``'s, ``w8a8-fp8``'s ``fp8-channel``'s);
  :meth:`Scheme.bits_per_weight` counts the weights' storage only.

Schemes with fp4/fp6 codes, fp8/e8m0 scales or blocks follow
compressed-tensors' own rules (:mod:`npquant.microscaling`) bit for bit, so
that their checkpoints are byte-equal to its; the int and fp8 channel,
group and tensor schemes follow npquant's rules (:mod:`npquant.quantize`).

>>> s = Scheme(bits=4, granularity="group", group_size=128)
>>> s.qmin, s.qmax, s.scale_divisor, s.block_shape((256, 512))
(-8, 7, 7.5, (1, 128))
>>> r = get_scheme("w4-g128-restricted")
>>> r.qmin, r.qmax, r.scale_divisor
(-7, 7, 7)
>>> get_scheme("w8-channel").block_shape((256, 512))
(1, 512)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import NpquantError

__all__ = ["Scheme", "schemes", "get_scheme", "FLOAT_MAX", "ACTIVATIONS"]

#: Largest finite magnitude of each float code format.
FLOAT_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp4_e2m1": 6.0, "fp6_e2m3": 7.5}
#: Bits of each float code format.
FLOAT_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "fp6_e2m3": 6}

_DTYPES = ("int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp6_e2m3")
_GRANULARITIES = ("tensor", "channel", "group", "block")
_SCALE_DTYPES = ("float32", "float16", "bfloat16", "fp8_e4m3", "e8m0")
_GRIDS = ("full", "restricted")
#: Activation rules (``Scheme.activations``): the weight codes each needs, and its bits per activation.
ACTIVATIONS = {"int8-token": ("int", 8), "fp8-token": ("fp8_e4m3", 8)}


@dataclass(frozen=True)
class Scheme:
    """How to quantize a weight matrix.

    Parameters
    ----------
    dtype : {"int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp6_e2m3"}
        Code format.
    bits : int
        Bits per code: 2..8 for ``"int"``; 8 for fp8, 4 for fp4, 6 for fp6.
    granularity : {"tensor", "channel", "group", "block"}
        Which weights share a scale (see the module docstring).
    group_size : int or None
        Consecutive input columns per scale; required for ``"group"`` only.
    block_size : (int, int) or None
        ``(rows, cols)`` per scale; required for ``"block"`` only.
    symmetric : bool
        ``True``: codes in ``[qmin, qmax]``, no zero point. ``False`` (int
        only): codes in ``[0, 2**bits - 1]`` with a zero point per block.
    scale_dtype : {"float32", "float16", "bfloat16", "fp8_e4m3", "e8m0"}
        Storage dtype of the scales. Quantization uses the scale after it is
        rounded to this dtype, so codes match what an engine will read.
        ``"fp8_e4m3"`` (fp4 codes, groups) adds a float32 global scale;
        ``"e8m0"`` (float codes, groups) stores powers of two.
    grid : {"full", "restricted"}
        Symmetric int codes: ``"full"`` (the default, compressed-tensors'
        rule) takes ``[-2**(bits-1), 2**(bits-1) - 1]`` and
        ``scale = absmax / (2**(bits-1) - 0.5)``; ``"restricted"`` takes
        ``[-qmax, qmax]`` and ``scale = absmax / qmax``. Other formats use
        their whole grid and take ``"full"`` only.
    activations : {None, "int8-token", "fp8-token"}
        ``None``: weight-only. Otherwise :func:`npquant.linear` quantizes
        ``x`` per token at each call (dynamic, symmetric) and multiplies
        8-bit codes: ``"int8-token"`` needs symmetric int8 weight codes,
        ``"fp8-token"`` fp8 e4m3 ones, both per channel with float scales.
    """

    dtype: str = "int"
    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float32"
    block_size: tuple[int, int] | None = None
    grid: str = "full"
    activations: str | None = None

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise NpquantError(f"Scheme dtype={self.dtype!r} is not known; expected one of {_DTYPES}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise NpquantError(f"Scheme bits={self.bits!r} must be an int")
        if self.dtype == "int" and not 2 <= self.bits <= 8:
            raise NpquantError(f"Scheme bits={self.bits} is out of range; int codes take 2 to 8 bits")
        if self.dtype != "int" and self.bits != FLOAT_BITS[self.dtype]:
            raise NpquantError(
                f"Scheme bits={self.bits} does not fit dtype={self.dtype!r}; its codes are {FLOAT_BITS[self.dtype]} bits"
            )
        if self.dtype != "int" and not self.symmetric:
            raise NpquantError(f"Scheme symmetric=False is for int codes only; dtype={self.dtype!r} is symmetric")
        if self.grid not in _GRIDS:
            raise NpquantError(f"Scheme grid={self.grid!r} is not known; expected one of {_GRIDS}")
        if self.grid == "restricted" and (self.dtype != "int" or not self.symmetric):
            what = f"dtype={self.dtype!r}" if self.dtype != "int" else "symmetric=False"
            raise NpquantError(f"Scheme grid='restricted' is for symmetric int codes only; {what} uses its full grid, "
                               f"leave grid='full'")
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
        if self.granularity == "block":
            b = self.block_size
            if (not isinstance(b, tuple) or len(b) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b)):
                raise NpquantError(f"Scheme granularity='block' needs block_size=(rows, cols) of positive ints, got {b!r}")
            if self.dtype != "fp8_e4m3":
                raise NpquantError(f"Scheme granularity='block' is for fp8_e4m3 codes (fp8-block), not {self.dtype!r}")
        elif self.block_size is not None:
            raise NpquantError(f"Scheme block_size={self.block_size} is only for granularity='block'; leave it None")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise NpquantError(
                f"Scheme scale_dtype={self.scale_dtype!r} is not known; expected one of {_SCALE_DTYPES}"
            )
        if self.dtype in ("fp4_e2m1", "fp6_e2m3") and self.scale_dtype not in ("fp8_e4m3", "e8m0"):
            raise NpquantError(
                f"Scheme dtype={self.dtype!r} takes scale_dtype='e8m0' (MX) or, for fp4, 'fp8_e4m3' (NVFP4), "
                f"not {self.scale_dtype!r}"
            )
        if self.scale_dtype == "fp8_e4m3" and self.dtype != "fp4_e2m1":
            raise NpquantError(f"Scheme scale_dtype='fp8_e4m3' is NVFP4's, for fp4_e2m1 codes, not {self.dtype!r}")
        if self.scale_dtype == "e8m0" and self.dtype not in ("fp4_e2m1", "fp6_e2m3", "fp8_e4m3"):
            raise NpquantError(f"Scheme scale_dtype='e8m0' is for MX float codes (fp4, fp6, fp8_e4m3), not {self.dtype!r}")
        if self.scale_dtype in ("fp8_e4m3", "e8m0") and self.granularity != "group":
            raise NpquantError(
                f"Scheme scale_dtype={self.scale_dtype!r} scales groups; granularity={self.granularity!r} does not"
            )
        if self.activations is not None:
            self._check_activations()

    def _check_activations(self) -> None:
        """The weights an activation rule multiplies with: 8-bit codes of its kind, per channel, float scales."""
        act = self.activations
        if act not in ACTIVATIONS:
            raise NpquantError(f"Scheme activations={act!r} is not known; expected None or one of {tuple(ACTIVATIONS)}")
        dtype, bits = ACTIVATIONS[act]
        if self.dtype != dtype or self.bits != bits or not self.symmetric:
            want = "symmetric int8" if dtype == "int" else "fp8_e4m3"
            got = f"dtype={self.dtype!r}, bits={self.bits}" + ("" if self.symmetric else ", symmetric=False")
            raise NpquantError(f"Scheme activations={act!r} multiplies {want} weight codes, got {got}")
        if self.granularity != "channel":
            raise NpquantError(f"Scheme activations={act!r} needs one weight scale per output channel "
                               f"(granularity='channel'), got granularity={self.granularity!r}")

    # --- format facts -------------------------------------------------
    @property
    def is_float(self) -> bool:
        """True for float codes (fp8, fp6, fp4)."""
        return self.dtype != "int"

    @property
    def microscaled(self) -> bool:
        """True for the schemes quantized by compressed-tensors' rules (:mod:`npquant.microscaling`).

        fp4/fp6 codes, fp8 or e8m0 scales, or blocks.
        """
        return (self.dtype in ("fp4_e2m1", "fp6_e2m3") or self.scale_dtype in ("fp8_e4m3", "e8m0")
                or self.granularity == "block")

    @property
    def global_scale(self) -> bool:
        """True when a float32 global scale divides every scale (NVFP4)."""
        return self.scale_dtype == "fp8_e4m3"

    @property
    def qmax(self) -> int | float:
        """Largest code: ``2**(bits-1) - 1`` symmetric, ``2**bits - 1`` asymmetric, fp8's max."""
        if self.is_float:
            return FLOAT_MAX[self.dtype]
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qmin(self) -> int | float:
        """Smallest code: ``-2**(bits-1)`` symmetric int on the full grid, ``-qmax`` on the restricted grid
        and for float codes, ``0`` asymmetric."""
        if not self.symmetric:
            return 0
        if self.dtype == "int" and self.grid == "full":
            return -(2 ** (self.bits - 1))
        return -self.qmax

    @property
    def scale_divisor(self) -> int | float:
        """What a block's range is divided by to give its scale: ``(qmax - qmin) / 2`` of ``absmax`` symmetric
        (``2**(bits-1) - 0.5`` on the full int grid, ``qmax`` on the restricted one and for float codes),
        ``qmax - qmin`` of ``max - min`` asymmetric. compressed-tensors' ``R / 2`` and ``R``."""
        if not self.symmetric:
            return self.qmax - self.qmin
        if self.dtype == "int" and self.grid == "full":
            return 2 ** (self.bits - 1) - 0.5
        return self.qmax

    @property
    def packed(self) -> bool:
        """True when codes are bit-packed (below 8 bits: int2-7, fp4, fp6)."""
        return self.bits < 8

    def block_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Block ``(block_rows, block_cols)`` sharing one scale for ``w`` of ``shape (O, I)``.

        Raises :class:`NpquantError` when ``group_size`` does not divide ``I``.
        """
        out_features, in_features = shape
        if self.granularity == "block":
            return self.block_size
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

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """``(ceil(O / block_rows), ceil(I / block_cols))``: one scale per block of ``w (O, I)``."""
        bo, bi = self.block_shape(shape)
        return (-(-shape[0] // bo), -(-shape[1] // bi))

    def bits_per_weight(self, shape: tuple[int, int] = (4096, 4096)) -> float:
        """Storage bits per weight of a ``shape`` weight: codes, scales, zero points and any global scale."""
        out_features, in_features = shape
        rows, cols = self.scale_shape(shape)
        scale_bytes = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8_e4m3": 1, "e8m0": 1}[self.scale_dtype]
        total = out_features * ((in_features * self.bits + 7) // 8) + rows * cols * scale_bytes
        total += 0 if self.symmetric else rows * cols
        total += 4 if self.global_scale else 0
        return 8.0 * total / (out_features * in_features)

    @property
    def activation_bits(self) -> int | None:
        """Bits per activation code ``linear`` multiplies (8 for W8A8), or None for weight-only schemes (float32 x)."""
        return None if self.activations is None else ACTIVATIONS[self.activations][1]

    def describe(self) -> str:
        """The rule in one line, e.g. for ``npquant schemes``; W8A8 schemes add their activations' rule."""
        rule = self._describe_weights()
        if self.activations == "int8-token":
            rule += ("; activations int8 per token, dynamic: scale = absmax / 127, codes in [-128, 127] "
                     "(8 bits per activation)")
        elif self.activations == "fp8-token":
            rule += ("; activations fp8 e4m3 per token, dynamic: scale = max(absmax / 448, 1 / 229376) "
                     "(8 bits per activation)")
        return rule

    def _describe_weights(self) -> str:
        if self.scale_dtype == "fp8_e4m3":
            return (f"NVFP4: fp4 e2m1 codes per group of {self.group_size} inputs, fp8 e4m3 scales "
                    f"(global x (group absmax / 6)) over one float32 global scale (1 / absmax(w)) * 2688, "
                    f"a reciprocal then a product")
        if self.scale_dtype == "e8m0":
            name = {"fp4_e2m1": "fp4 e2m1", "fp6_e2m3": "fp6 e2m3", "fp8_e4m3": "fp8 e4m3"}[self.dtype]
            return (f"MX: {name} codes per group of {self.group_size} inputs, power-of-two e8m0 scales "
                    f"(group absmax rounded to a power of two over the code's largest power of two)")
        if self.granularity == "block":
            return (f"{self.dtype} codes = round(w / scale), scale = absmax / {self.qmax:g} per "
                    f"{self.block_size[0]}x{self.block_size[1]} block, {self.scale_dtype} scales")
        if self.granularity == "group":
            where = f"per group of {self.group_size} inputs"
        else:
            where = f"per {self.granularity}"
        if self.is_float:
            rule = f"{self.dtype} codes = round(w / scale), scale = absmax / {self.qmax:g}"
        elif self.symmetric:
            grid = "full grid" if self.grid == "full" else "restricted grid"
            rule = (f"int{self.bits} codes in [{self.qmin}, {self.qmax}] ({grid}), "
                    f"scale = absmax / {self.scale_divisor:g}")
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


def _group(bits: int, size: int, symmetric: bool = True, grid: str = "full") -> Scheme:
    return Scheme("int", bits, "group", size, symmetric, grid=grid)


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
    "w8-channel-restricted": Scheme("int", 8, "channel", grid="restricted"),
    "w4-g128-restricted": _group(4, 128, grid="restricted"),
    "w4-g64-restricted": _group(4, 64, grid="restricted"),
    "w4-g32-restricted": _group(4, 32, grid="restricted"),
    "fp8-tensor": Scheme("fp8_e4m3", 8, "tensor"),
    "fp8-channel": Scheme("fp8_e4m3", 8, "channel"),
    "fp8-block": Scheme("fp8_e4m3", 8, "block", block_size=(128, 128)),
    "nvfp4": Scheme("fp4_e2m1", 4, "group", 16, scale_dtype="fp8_e4m3"),
    "mxfp4": Scheme("fp4_e2m1", 4, "group", 32, scale_dtype="e8m0"),
    "mxfp6": Scheme("fp6_e2m3", 6, "group", 32, scale_dtype="e8m0"),
    "mxfp8": Scheme("fp8_e4m3", 8, "group", 32, scale_dtype="e8m0"),
    "w8a8-int8": Scheme("int", 8, "channel", activations="int8-token"),
    "w8a8-fp8": Scheme("fp8_e4m3", 8, "channel", activations="fp8-token"),
}
