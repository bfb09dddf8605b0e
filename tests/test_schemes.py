"""Scheme construction, presets and their rules."""

import pytest

import npquant
from npquant import NpquantError, Scheme, get_scheme


def test_presets_are_the_documented_list():
    assert list(npquant.schemes()) == [
        "w8-tensor", "w8-channel", "w8-g128", "w4-tensor", "w4-channel", "w4-g128", "w4-g64",
        "w4-g32", "w4-g128-asym", "w3-g128", "w2-g64", "w8-channel-restricted", "w4-g128-restricted",
        "w4-g64-restricted", "w4-g32-restricted", "fp8-tensor", "fp8-channel",
        "fp8-block", "nvfp4", "mxfp4", "mxfp6", "mxfp8", "w8a8-int8", "w8a8-fp8",
    ]
    # Symmetric int presets use the full grid; each -restricted preset is its plain name on the restricted grid.
    presets = npquant.schemes()
    for name, s in presets.items():
        if name.endswith("-restricted"):
            assert s.grid == "restricted" and presets[name[: -len("-restricted")]] == Scheme(
                s.dtype, s.bits, s.granularity, s.group_size, s.symmetric, s.scale_dtype)
        else:
            assert s.grid == "full", name
    assert all(s.scale_dtype == "float32" for s in npquant.schemes().values() if not s.microscaled)
    assert get_scheme("nvfp4") == Scheme("fp4_e2m1", 4, "group", 16, scale_dtype="fp8_e4m3")
    assert get_scheme("mxfp6") == Scheme("fp6_e2m3", 6, "group", 32, scale_dtype="e8m0")
    assert get_scheme("fp8-block") == Scheme("fp8_e4m3", 8, "block", block_size=(128, 128))
    assert get_scheme("w4-g128-asym") == Scheme("int", 4, "group", 128, symmetric=False)
    assert get_scheme("fp8-channel") == Scheme("fp8_e4m3", 8, "channel")


def test_format_facts():
    for bits in range(2, 9):  # the full grid (the default) and the restricted one, by the rule
        half = 2 ** (bits - 1)
        full, restricted = Scheme(bits=bits), Scheme(bits=bits, grid="restricted")
        assert (full.qmin, full.qmax, full.scale_divisor) == (-half, half - 1, half - 0.5)
        assert (restricted.qmin, restricted.qmax, restricted.scale_divisor) == (-(half - 1), half - 1, half - 1)
        assert full.bits_per_weight() == restricted.bits_per_weight()  # the same storage
    assert (Scheme(bits=8).qmin, Scheme(bits=8).qmax, Scheme(bits=8).scale_divisor) == (-128, 127, 127.5)
    assert (Scheme(bits=4).qmin, Scheme(bits=4).qmax, Scheme(bits=4).scale_divisor) == (-8, 7, 7.5)
    assert (Scheme(bits=4, grid="restricted").qmin, Scheme(bits=4, grid="restricted").qmax) == (-7, 7)
    assert (Scheme(bits=4, symmetric=False).qmin, Scheme(bits=4, symmetric=False).qmax) == (0, 15)
    assert Scheme(bits=4, symmetric=False).scale_divisor == 15
    assert (Scheme("fp8_e4m3").qmin, Scheme("fp8_e4m3").scale_divisor) == (-448.0, 448.0)
    assert Scheme("fp8_e5m2").qmax == 57344.0
    assert Scheme(bits=3).packed and not Scheme(bits=8).packed and not Scheme("fp8_e4m3").packed


def test_schemes_are_frozen():
    with pytest.raises(AttributeError):
        Scheme().bits = 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="int9"), r"dtype='int9' is not known; expected one of \('int', 'fp8_e4m3', 'fp8_e5m2', 'fp4_e2m1'"),
        (dict(dtype="fp4_e2m1", bits=4, granularity="group", group_size=32), r"takes scale_dtype='e8m0' \(MX\) or"),
        (dict(dtype="fp4_e2m1", bits=6, granularity="group", group_size=32, scale_dtype="e8m0"),
         r"bits=6 does not fit dtype='fp4_e2m1'; its codes are 4 bits"),
        (dict(dtype="fp6_e2m3", bits=6, granularity="group", group_size=32, scale_dtype="fp8_e4m3"),
         r"scale_dtype='fp8_e4m3' is NVFP4's"),
        (dict(dtype="fp4_e2m1", bits=4, granularity="channel", scale_dtype="e8m0"), r"scales groups; granularity='channel'"),
        (dict(scale_dtype="e8m0", granularity="group", group_size=32), r"scale_dtype='e8m0' is for MX float codes"),
        (dict(dtype="fp8_e4m3", granularity="block"), r"needs block_size=\(rows, cols\) of positive ints, got None"),
        (dict(dtype="fp8_e4m3", granularity="block", block_size=(128, 0)), r"positive ints, got \(128, 0\)"),
        (dict(granularity="block", block_size=(128, 128)), r"granularity='block' is for fp8_e4m3 codes"),
        (dict(block_size=(128, 128)), r"block_size=\(128, 128\) is only for granularity='block'"),
        (dict(bits=1), r"bits=1 is out of range; int codes take 2 to 8 bits"),
        (dict(bits=9), r"bits=9 is out of range"),
        (dict(bits=4.0), r"bits=4.0 must be an int"),
        (dict(dtype="fp8_e4m3", bits=4), r"bits=4 does not fit dtype='fp8_e4m3'"),
        (dict(dtype="fp8_e5m2", symmetric=False), r"symmetric=False is for int codes only"),
        (dict(granularity="row"), r"granularity='row' is not known"),
        (dict(granularity="group"), r"granularity='group' needs a positive int group_size, got None"),
        (dict(granularity="group", group_size=0), r"needs a positive int group_size, got 0"),
        (dict(granularity="channel", group_size=64), r"group_size=64 is only for granularity='group'"),
        (dict(scale_dtype="float64"), r"scale_dtype='float64' is not known"),
        (dict(grid="half"), r"grid='half' is not known; expected one of \('full', 'restricted'\)"),
        (dict(symmetric=False, grid="restricted"), r"grid='restricted' is for symmetric int codes only; "
                                                   r"symmetric=False uses its full grid"),
        (dict(dtype="fp8_e4m3", grid="restricted"), r"grid='restricted' is for symmetric int codes only; "
                                                    r"dtype='fp8_e4m3'"),
    ],
)
def test_invalid_combinations_say_what_is_allowed(kwargs, match):
    with pytest.raises(NpquantError, match=match):
        Scheme(**kwargs)


def test_get_scheme_refuses_other_types():
    with pytest.raises(NpquantError, match=r"scheme must be a Scheme or a preset name, got int"):
        get_scheme(4)


def test_describe_is_one_line_per_preset():
    for name, s in npquant.schemes().items():
        text = s.describe()
        assert "\n" not in text and "scale" in text, name
    assert "per group of 128 inputs" in get_scheme("w4-g128").describe()
    assert "[0, 15] with zero point" in get_scheme("w4-g128-asym").describe()
    assert "int4 codes in [-8, 7] (full grid), scale = absmax / 7.5" in get_scheme("w4-g128").describe()
    assert "int4 codes in [-7, 7] (restricted grid), scale = absmax / 7," in get_scheme("w4-g128-restricted").describe()
    assert "int8 codes in [-128, 127] (full grid), scale = absmax / 127.5" in get_scheme("w8-channel").describe()
