"""W8A8 schemes: the activation rule is part of the scheme, validated, shown, counted apart from the weights'
bits; the weights are exactly the weight-only presets'."""

import numpy as np
import pytest

import npquant
from npquant import NpquantError, Scheme, get_scheme, quantize
from npquant.cli import main


def test_presets_carry_their_activation_rule():
    int8, fp8 = get_scheme("w8a8-int8"), get_scheme("w8a8-fp8")
    assert int8 == Scheme("int", 8, "channel", activations="int8-token")
    assert fp8 == Scheme("fp8_e4m3", 8, "channel", activations="fp8-token")
    assert int8.activation_bits == fp8.activation_bits == 8
    assert get_scheme("w8-channel").activation_bits is None and get_scheme("w8-channel").activations is None
    # the weights' storage is the weight-only preset's: activations are not stored
    assert int8.bits_per_weight((300, 500)) == get_scheme("w8-channel").bits_per_weight((300, 500))
    assert fp8.bits_per_weight() == get_scheme("fp8-channel").bits_per_weight()
    assert "activations int8 per token, dynamic" in int8.describe() and "\n" not in int8.describe()
    assert "activations fp8 e4m3 per token, dynamic" in fp8.describe()


@pytest.mark.parametrize("kwargs, message", [
    (dict(activations="int4-token"), r"activations='int4-token' is not known; expected None or one of"),
    (dict(activations="token"), r"activations='token' is not known"),
    (dict(activations=8), r"activations=8 is not known"),
    (dict(bits=4, activations="int8-token"), r"multiplies symmetric int8 weight codes, got dtype='int', bits=4"),
    (dict(symmetric=False, activations="int8-token"), r"symmetric int8 weight codes, got .*symmetric=False"),
    (dict(dtype="fp8_e4m3", activations="int8-token"), r"symmetric int8 weight codes, got dtype='fp8_e4m3'"),
    (dict(activations="fp8-token"), r"activations='fp8-token' multiplies fp8_e4m3 weight codes, got dtype='int'"),
    (dict(granularity="tensor", activations="int8-token"), r"per output channel \(granularity='channel'\), got "
                                                           r"granularity='tensor'"),
    (dict(granularity="group", group_size=32, activations="int8-token"), r"granularity='group'"),
])
def test_bad_activation_rules_are_refused_in_one_line(kwargs, message):
    with pytest.raises(NpquantError, match=message) as info:
        Scheme(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("w8a8, weight_only", [("w8a8-int8", "w8-channel"), ("w8a8-fp8", "fp8-channel")])
@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_weights_are_the_weight_only_presets(w8a8, weight_only, backend):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((67, 203)) * np.exp(rng.uniform(-3, 3, (67, 1)))).astype(np.float32)
    a, b = quantize(w, w8a8, backend=backend), quantize(w, weight_only, backend=backend)
    assert a.scheme.activations is not None and b.scheme.activations is None
    assert a.codes.dtype == b.codes.dtype and a.codes.view(np.uint8).tobytes() == b.codes.view(np.uint8).tobytes()
    assert a.scale.dtype == b.scale.dtype and a.scale.tobytes() == b.scale.tobytes()
    assert a.nbytes == b.nbytes and a.bits_per_weight == b.bits_per_weight


def test_schemes_command_shows_activation_bits_apart(capsys):
    assert main(["schemes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["preset", "bits/w", "bits/a"]
    cols = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert cols["w8a8-int8"] == ["8.008", "8"] and cols["w8a8-fp8"] == ["8.008", "8"]
    assert cols["w8-channel"] == ["8.008", "32"] and cols["w4-g128"] == ["4.250", "32"]
    assert main(["schemes", "--json"]) == 0
    import json

    presets = json.loads(capsys.readouterr().out)
    assert presets["w8a8-int8"]["activations"] == "int8-token" and presets["w8a8-int8"]["bits_per_activation"] == 8
    assert presets["w4-g128"]["activations"] is None and presets["w4-g128"]["bits_per_activation"] == 32
    assert set(npquant.schemes()) == set(presets)
