"""W8A8 checkpoints: quantize writes compressed-tensors' input_activations and int-quantized / float-quantized,
load returns tensors whose scheme carries the activation rule, linear on them quantizes x as the checkpoint says,
and the reader refuses, in one line naming the field, every activation rule npquant does not run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import npquant
from npquant import NpquantError
from npquant.safetensors_io import Checkpoint

FIXTURES = Path(__file__).parent / "data" / "ct_fixtures"
SOURCE = FIXTURES / "w8a8-int-float32" / "source" / "model.safetensors"


def read_all(path):
    with Checkpoint(path) as ckpt:
        return {name: src.read() for name, src in ckpt.tensors.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = {}
    for preset in ("w8a8-int8", "w8a8-fp8"):
        d = tmp_path_factory.mktemp(preset) / "out"
        npquant.quantize_checkpoint(SOURCE, d, preset)
        out[preset] = d
    return out


@pytest.mark.parametrize("preset, kind, fmt", [("w8a8-int8", "int", "int-quantized"),
                                               ("w8a8-fp8", "float", "float-quantized")])
def test_written_config_and_tensors(written, preset, kind, fmt):
    qc = json.loads((written[preset] / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert qc["format"] == fmt and group["output_activations"] is None
    assert group["input_activations"] == {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token",
                                          "symmetric": True, "type": kind}
    tensors = read_all(written[preset] / "model.safetensors")
    source = read_all(SOURCE)
    weight_only = {"w8a8-int8": "w8-channel", "w8a8-fp8": "fp8-channel"}[preset]
    for name, qt in npquant.load(written[preset]).items():
        assert qt.scheme == npquant.get_scheme(preset), name  # the rule comes back with the tensor
        m = name[: -len(".weight")]
        assert sorted(k for k in tensors if k.startswith(m + ".")) == [f"{m}.weight", f"{m}.weight_scale"]
        assert tensors[f"{m}.weight"].shape == qt.shape and tensors[f"{m}.weight_scale"].shape == (qt.shape[0], 1)
        ref = npquant.quantize(source[name], weight_only)  # the weights are the weight-only preset's, byte for byte
        assert tensors[f"{m}.weight"].tobytes() == ref.codes.tobytes()
        assert tensors[f"{m}.weight_scale"].tobytes() == ref.scale.tobytes()
        x = np.random.default_rng(0).standard_normal((5, qt.shape[1])).astype(np.float32)
        want = npquant.linear(x, npquant.quantize(source[name], preset), backend="numpy")
        for backend in npquant.available_backends():
            assert np.array_equal(npquant.linear(x, qt, backend=backend), want), (name, backend)


@pytest.mark.parametrize("preset, rule", [("w8a8-int8", "int8 per token"), ("w8a8-fp8", "fp8 per token")])
def test_inspect_shows_the_activation_rule(written, preset, rule, capsys):
    from npquant.cli import main

    assert main(["inspect", str(written[preset]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["activations"] for r in rows} == {rule}
    assert main(["inspect", str(written[preset])]) == 0
    assert rule in capsys.readouterr().out


def test_prepared_w8a8_is_exported():
    assert npquant.PreparedW8A8 is npquant.prepared.PreparedW8A8 and "PreparedW8A8" in npquant.__all__
    qt = npquant.quantize(np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32), "w8a8-int8")
    if "numba" in npquant.available_backends():
        assert isinstance(npquant.prepare(qt), npquant.PreparedW8A8)


def test_fp8_blocks_with_group_activations_still_load_weight_only():
    loaded = npquant.load(FIXTURES / "fp8-block-float32")
    assert {qt.scheme.activations for qt in loaded.values()} == {None}


def edited(tmp_path, edit, source=FIXTURES / "w8a8-int-float32"):
    d = tmp_path / "ckpt"
    shutil.copytree(source, d, ignore=shutil.ignore_patterns("reference", "source"))
    config = json.loads((d / "config.json").read_text())
    edit(config["quantization_config"]["config_groups"]["group_0"])
    (d / "config.json").write_text(json.dumps(config))
    return d


def act(**changes):
    def edit(group):
        group["input_activations"].update(changes)
    return edit


@pytest.mark.parametrize("edit, message", [
    (act(dynamic=False), r"input_activations\.dynamic is False: static activation scales"),
    (act(strategy="tensor"), r"input_activations\.strategy is 'tensor': npquant quantizes activations per token"),
    (act(strategy="group", group_size=128), r"input_activations\.strategy is 'group'"),
    (act(symmetric=False), r"input_activations\.symmetric is False"),
    (act(num_bits=4), r"input_activations\.num_bits is 4"),
    (act(type="float"), r"input_activations: Scheme activations='fp8-token' multiplies fp8_e4m3 weight codes"),
    (act(group_size=16), r"input_activations\.group_size is 16"),
    (act(actorder="group"), r"input_activations\.actorder is 'group'"),
    (act(colour="red"), r"input_activations has field 'colour'"),
    (lambda g: g.update(output_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     r"output_activations is set"),
])
def test_reader_refuses_what_it_cannot_run(tmp_path, edit, message):
    with pytest.raises(NpquantError, match=message) as info:
        npquant.load(edited(tmp_path, edit))
    assert "\n" not in str(info.value) and "group_0" in str(info.value)


def test_token_activations_need_channel_weights(tmp_path):
    def edit(group):
        group["weights"].update(strategy="tensor")
    d = edited(tmp_path, edit)
    # its weight_scale would be (1,) for tensor weights; the config check comes first and names the field
    with pytest.raises(NpquantError, match=r"input_activations: Scheme activations='int8-token' needs one weight "
                                           r"scale per output channel"):
        npquant.load(d)
