"""npquant.load on broken or edited checkpoints: one-line NpquantError naming what is wrong, never a silent load."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import npquant
from npquant import NpquantError
from test_checkpoint import write_model

MODULE = "model.layers.0.mlp.up_proj"


@pytest.fixture
def written(tmp_path):
    """A w4-g32 checkpoint and a w4-g128-asym one, written by npquant from the test model."""
    model = tmp_path / "model"
    write_model(model)
    out = {}
    for preset in ("w4-g32", "w4-g128-asym", "fp8-channel", "nvfp4", "mxfp4", "mxfp8", "fp8-block"):
        path = tmp_path / preset
        npquant.quantize_checkpoint(model, path, preset)
        out[preset] = path
    return out


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def poke_float32(path, name, flat_index, value):
    """Overwrite one float32 element of tensor ``name`` in place (works beside fp8 tensors numpy cannot load)."""
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])[name]
    assert meta["dtype"] == "F32"
    at = 8 + n + meta["data_offsets"][0] + 4 * flat_index
    data[at : at + 4] = np.float32(value).tobytes()
    f.write_bytes(bytes(data))


def weights(qc):
    return qc["config_groups"]["group_0"]["weights"]


def poke_bytes(path, name, offset, raw: bytes):
    """Overwrite bytes of tensor ``name`` at ``offset`` in place (any dtype, also fp8)."""
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0] + offset
    data[at : at + len(raw)] = raw
    f.write_bytes(bytes(data))


def rewrite(path, fn):
    """Rewrite model.safetensors through npquant's reader (fp8 tensors too): ``fn(dict of arrays)``."""
    from npquant.safetensors_io import Checkpoint

    with Checkpoint(path / "model.safetensors") as ckpt:
        tensors = {name: src.read() for name, src in ckpt.tensors.items()}
    fn(tensors)
    from npquant.safetensors_io import TensorPlan, write_safetensors  # safetensors' numpy API lacks fp8

    plans = [TensorPlan(n, a.dtype, a.shape) for n, a in tensors.items()]
    (path / "model.safetensors").unlink()
    write_safetensors(path / "model.safetensors", plans, iter([tensors]), {"format": "pt"})


M = MODULE
MODERN_EDITS = [
    ("nvfp4", lambda p: poke_bytes(p, f"{M}.weight_scale", 3, b"\x7f"), r"scale\[0, 3\] holds a NaN or negative fp8"),
    ("nvfp4", lambda p: poke_bytes(p, f"{M}.weight_scale", 0, b"\xb8"), r"holds a NaN or negative fp8 e4m3 scale"),
    ("nvfp4", lambda p: poke_float32(p, f"{M}.weight_global_scale", 0, 0.0), r"global_scale must be a positive finite"),
    ("nvfp4", lambda p: poke_float32(p, f"{M}.weight_global_scale", 0, np.nan), r"global_scale must be a positive finite"),
    ("nvfp4", lambda p: rewrite(p, lambda t: t.pop(f"{M}.weight_global_scale")), r"lacks tensor .*weight_global_scale"),
    ("nvfp4", lambda p: rewrite(p, lambda t: t.__setitem__(f"{M}.weight_zero_point", np.zeros(3, np.int32))),
     r"tensor '.*weight_zero_point' is not one a nvfp4-pack-quantized module has"),
    ("nvfp4", lambda p: rewrite(p, lambda t: t.__setitem__(f"{M}.weight_packed", t[f"{M}.weight_packed"][:, :-8])),
     r"scale must be fp8_e4m3 \(96, 15\), got float8_e4m3fn \(96, 16\)"),
    ("nvfp4", lambda p: edit_config(p, lambda qc: weights(qc).pop("scale_dtype")), r"float weights of 4 bits are read as"),
    ("nvfp4", lambda p: edit_config(p, lambda qc: qc["config_groups"]["group_0"].update(format="mxfp4-pack-quantized")),
     r"mxfp4-pack-quantized does not fit weights with fp8_e4m3 scales"),
    ("mxfp4", lambda p: poke_bytes(p, f"{M}.weight_scale", 9, b"\xff"), r"scale\[1, 1\] holds the e8m0 NaN byte 0xFF"),
    ("mxfp4", lambda p: edit_config(p, lambda qc: qc["config_groups"]["group_0"].update(format="mxfp6-pack-quantized")),
     r"mxfp6-pack-quantized holds 6-bit float codes, but the group's weights are fp4_e2m1 4-bit"),
    ("mxfp4", lambda p: edit_config(p, lambda qc: weights(qc).update(group_size=16)), r"scale must be e8m0 \(\d+, \d+\), got uint8"),
    ("mxfp4", lambda p: rewrite(p, lambda t: t.__setitem__(f"{M}.weight_scale", t[f"{M}.weight_scale"].astype(np.float32))),
     r"scale must be e8m0 \(96, 8\), got float32"),
    ("mxfp8", lambda p: poke_bytes(p, f"{M}.weight", 5, b"\x7f"), r"codes hold a NaN or Inf fp8_e4m3 pattern at row 0, column 5"),
    ("mxfp8", lambda p: edit_config(p, lambda qc: weights(qc).pop("scale_dtype")), r"fp8 weights are read per tensor, channel"),
    # the test model is float16: fp8 blocks keep their scales in it
    ("fp8-block", lambda p: poke_bytes(p, f"{M}.weight_scale", 2, np.float16(np.nan).tobytes()),
     r"weight_scale\[0, 1\] = nan"),
    ("fp8-block", lambda p: poke_bytes(p, f"{M}.weight_scale", 0, np.float16(-1).tobytes()), r"weight_scale\[0, 0\] = -1.0"),
    ("fp8-block", lambda p: edit_config(p, lambda qc: weights(qc).update(block_structure=[128])),
     r"block_structure must be \[rows, cols\] of positive integers, got \[128\]"),
    ("fp8-block", lambda p: edit_config(p, lambda qc: weights(qc).update(block_structure=[64, 128])),
     r"scale must be float32 \(\d+, \d+\), got float32"),
    ("fp8-block", lambda p: rewrite(p, lambda t: t.pop(f"{M}.weight_scale")), r"lacks tensor .*weight_scale"),
]


@pytest.mark.parametrize("preset, edit, message", MODERN_EDITS)
def test_broken_modern_checkpoints_are_refused_in_one_line(written, preset, edit, message, capsys):
    path = written[preset]
    edit(path)
    with pytest.raises(NpquantError, match=message) as info:
        npquant.load(path)
    assert "\n" not in str(info.value)
    from npquant.cli import main

    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err.lower(), err


CONFIG_EDITS = [
    ("w4-g32", lambda qc: weights(qc).update(num_bits=2), r"weight_packed is int32 .* 2-bit codes of .* take int32"),
    ("w4-g32", lambda qc: weights(qc).update(num_bits=5.5), r"num_bits must be an integer, got 5.5"),
    ("w4-g32", lambda qc: weights(qc).update(num_bits="4"), r"num_bits must be an integer, got '4'"),
    ("w4-g128-asym", lambda qc: weights(qc).update(symmetric="false"), r"symmetric must be true or false, got 'false'"),
    ("w4-g32", lambda qc: weights(qc).update(group_size=0), r"group_size must be a positive integer"),
    ("w4-g32", lambda qc: weights(qc).update(group_size=64), r"scale must be float32 \(\d+, \d+\), got float32"),
    ("w4-g32", lambda qc: weights(qc).update(strategy="block"), r"block_structure must be \[rows, cols\] of positive"),
    ("w4-g32", lambda qc: weights(qc).update(strategy="block", block_structure=[128, 128]),
     r"int weights with strategy 'block' and scale_dtype None are not a format npquant reads"),
    ("w4-g32", lambda qc: weights(qc).update(strategy="attn_head"), r"strategy 'attn_head' is not one npquant reads"),
    ("w4-g32", lambda qc: weights(qc).update(scale_dtype="torch.float16"), r"scale_dtype 'torch.float16' is not one"),
    ("w4-g32", lambda qc: weights(qc).update(actorder="sometimes"), r"actorder 'sometimes' is not known"),
    ("w4-g32", lambda qc: weights(qc).update(actorder="group"), r"actorder 'group' but the module has no weight_g_idx"),
    ("w4-g32", lambda qc: weights(qc).update(type="nf4"), r"type must be 'int' or 'float'"),
    ("w4-g32", lambda qc: qc.update(format="marlin-24"), r"format 'marlin-24' is not one npquant reads"),
    ("w4-g32", lambda qc: qc.update(config_groups=[]), r"config_groups must be a non-empty object"),
    ("w4-g32", lambda qc: qc["config_groups"]["group_0"].update(targets="Linear"), r"targets must be a list of strings"),
    ("w4-g32", lambda qc: qc["config_groups"]["group_0"].update(targets=["model.layers.0.mlp.gate_proj"]),
     r"targets module 'model.layers.0.mlp.gate_proj', which has no quantized tensors"),
    ("w4-g32", lambda qc: qc["config_groups"]["group_0"].update(targets=[MODULE]),
     r"has quantized tensors but no config group targets it"),
    ("w4-g32", lambda qc: qc.update(ignore=[MODULE]), r"is in ignore but has quantized tensors"),
    ("fp8-channel", lambda qc: weights(qc).update(num_bits=4), r"float weights of 4 bits are read as NVFP4 \(strategy tensor_group.*got strategy 'channel'"),
]


TENSOR_EDITS = [
    ("w4-g32", lambda t: t[f"{MODULE}.weight_scale"].__setitem__((3, 1), np.nan), r"weight_scale\[3, 1\] = nan"),
    ("w4-g32", lambda t: t[f"{MODULE}.weight_scale"].__setitem__((0, 0), -0.5), r"weight_scale\[0, 0\] = -0.5"),
    ("w4-g32", lambda t: t.pop(f"{MODULE}.weight_shape"), rf"module '{MODULE}' .* lacks tensor '{MODULE}.weight_shape'"),
    ("w4-g128-asym", lambda t: t.pop(f"{MODULE}.weight_zero_point"), r"lacks tensor .*weight_zero_point"),
    ("w4-g32", lambda t: t.__setitem__(f"{MODULE}.weight_shape", np.array([96, 512], np.int64)),
     r"weight_packed is int32 \(96, 32\); 4-bit codes of \(96, 512\) take int32 \(96, 64\)"),
    ("w4-g32", lambda t: t.__setitem__(f"{MODULE}.weight_shape", np.array([96, 256, 1], np.int64)),
     r"weight_shape must hold \[out, in\]"),
    ("w4-g32", lambda t: t.__setitem__(f"{MODULE}.weight_scale", t[f"{MODULE}.weight_scale"][:, :4]),
     r"scale must be float32 \(96, 8\), got float32 \(96, 4\)"),
]


@pytest.mark.parametrize("preset, editor, edit, message",
                         [(p, edit_config, e, m) for p, e, m in CONFIG_EDITS]
                         + [(p, edit_tensors, e, m) for p, e, m in TENSOR_EDITS])
def test_edited_configs_and_broken_tensors_are_refused(written, preset, editor, edit, message):
    path = written[preset]
    editor(path, edit)
    with pytest.raises(NpquantError, match=message):
        npquant.load(path)


def test_an_infinite_fp8_scale_is_refused(written):
    path = written["fp8-channel"]
    poke_float32(path, f"{MODULE}.weight_scale", 5, np.inf)
    with pytest.raises(NpquantError, match=r"weight_scale\[5, 0\] = inf: scales must be finite and non-negative"):
        npquant.load(path)


def test_every_config_group_is_read(written, tmp_path):
    # Hand-split one uniform checkpoint into two groups, one by exact name and one by regex.
    path = written["w4-g32"]
    before = npquant.load(path)

    def split(qc):
        g = qc["config_groups"]["group_0"]
        qc["config_groups"] = {
            "group_0": {**g, "targets": [MODULE]},
            "group_1": {**g, "targets": ["re:model\\.layers\\.0\\.(self_attn|mlp\\.down)"]},
        }

    edit_config(path, split)
    after = npquant.load(path)
    assert sorted(after) == sorted(before)
    for name in before:
        np.testing.assert_array_equal(after[name].codes, before[name].codes)


@pytest.mark.parametrize("preset, edit, message", CONFIG_EDITS[:4])
def test_messages_are_one_line_and_name_the_file(written, preset, edit, message):
    path = written[preset]
    edit_config(path, edit)
    with pytest.raises(NpquantError) as info:
        npquant.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def add_g_idx(path, g_idx):
    edit_tensors(path, lambda t: t.__setitem__(f"{MODULE}.weight_g_idx", np.asarray(g_idx, np.int32)))


def test_g_idx_loads_by_its_groups_and_broken_ones_are_refused(written):
    path = written["w4-g32"]
    before = npquant.load(path)[f"{MODULE}.weight"]
    add_g_idx(path, np.arange(256) // 32)  # the plain layout: same weights
    np.testing.assert_array_equal(npquant.load(path)[f"{MODULE}.weight"].codes, before.codes)
    add_g_idx(path, np.full(256, -1))  # "unset"
    np.testing.assert_array_equal(npquant.load(path)[f"{MODULE}.weight"].codes, before.codes)
    shuffled = np.random.default_rng(0).permutation(np.arange(256) // 32)
    add_g_idx(path, shuffled)  # act-order groups: column j takes the scale of group shuffled[j]
    qt = npquant.load(path)[f"{MODULE}.weight"]
    want = before.int_codes().astype(np.float32) * before.scale[:, shuffled]
    np.testing.assert_array_equal(qt.dequantize(), want)
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    for backend in npquant.available_backends():
        np.testing.assert_allclose(npquant.linear(x, qt, backend=backend), x @ want.T, rtol=1e-4, atol=1e-5)
    add_g_idx(path, np.r_[np.zeros(40, int), np.arange(40, 256) // 32])
    with pytest.raises(NpquantError, match=r"weight_g_idx gives group 0 40 columns; every group has group_size=32"):
        npquant.load(path)
    add_g_idx(path, np.arange(256) // 16)
    with pytest.raises(NpquantError, match=r"weight_g_idx holds groups 0..15; 8 groups take 0..7"):
        npquant.load(path)
    add_g_idx(path, np.arange(128))
    with pytest.raises(NpquantError, match=r"weight_g_idx must be integer \(256,\)"):
        npquant.load(path)
