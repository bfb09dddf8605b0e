"""npquant.load on broken or edited checkpoints: one-line NpquantError naming what is wrong, never a silent load."""

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import npquant
from npquant import NpquantError
from test_checkpoint import write_model

MODULE = "model.layers.0.mlp.up_proj"


@pytest.fixture
def written(tmp_path):
    """Checkpoints of each preset below, written by npquant from the test model."""
    model = tmp_path / "model"
    write_model(model)
    out = {}
    for preset in ("w4-g32", "w4-g128-asym", "fp8-channel", "nvfp4", "mxfp4", "mxfp8", "fp8-block", "w4-g32-restricted"):
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
    ("w4-g32", lambda qc: weights(qc).update(strategy="block"),
     r"group_size=32 is for strategy 'group' or 'tensor_group', not 'block'"),
    ("w4-g32", lambda qc: weights(qc).update(strategy="block", group_size=None),
     r"block_structure must be \[rows, cols\] of positive"),
    ("w4-g32", lambda qc: weights(qc).update(strategy="block", group_size=None, block_structure=[128, 128]),
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


# --- issue 34: what load must never accept, and how every failure reads ----------------------------------------
def assert_one_line(info, *names):
    """The error is one line and names each of ``names`` (files, tensors)."""
    msg = str(info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)


def codes_of(path, module=MODULE):
    return npquant.load(path)[f"{module}.weight"]


def largest_code_block(qt):
    """(row block, column block) of the block holding the largest code magnitude, and that magnitude."""
    q = np.abs(qt.int_codes().astype(np.float32))  # (O, I)
    bo, bi = qt.block_shape
    o, i = q.shape
    blocks = q.reshape(o // bo, bo, i // bi, bi).max(axis=(1, 3))  # (SO, SI)
    idx = np.unravel_index(int(np.argmax(blocks)), blocks.shape)
    return (int(idx[0]), int(idx[1])), float(blocks[idx])


@pytest.mark.parametrize("value", [3.4e38, 1e38])
def test_a_finite_float32_scale_whose_weights_overflow_is_refused(written, value):
    # w4-g32-restricted: every group holds a code of magnitude 7 (its scale is absmax / 7, float32 for this float16
    # layer: w4-g32's full grid keeps float16 scales there, as compressed-tensors), and 7e38 is past float32's 3.4e38.
    path = written["w4-g32-restricted"]
    poke_float32(path, f"{MODULE}.weight_scale", 3 * 8 + 1, value)
    with pytest.raises(NpquantError, match=rf"weight_scale\[3, 1\] = {re.escape(repr(value))} times code -?\d makes weight "
                                           rf"\[3, \d+\] -?inf in float32") as info:
        npquant.load(path)
    assert_one_line(info, path, f"{MODULE}.weight")


def test_an_fp8_scale_of_1e37_that_overflows_is_refused(written):
    path = written["fp8-channel"]
    poke_float32(path, f"{MODULE}.weight_scale", 5, 1e37)  # row 5's largest code is +-448: 4.48e39
    with pytest.raises(NpquantError, match=r"weight_scale\[5, 0\] = 1e\+37 times code -?\d+\.\d+ makes weight \[5, \d+\] "
                                           r"-?inf") as info:
        npquant.load(path)
    assert_one_line(info, path)


@pytest.mark.parametrize("byte", [0xFE, 0xFD])
def test_e8m0_scale_bytes_0xFE_and_0xFD_that_overflow_are_refused(written, byte):
    # 2**127 or 2**126 times an fp4 code of 4 or more is past float32's largest value (2**128 - 2**104).
    path = written["mxfp4"]
    (i, j), top = largest_code_block(codes_of(path))
    assert top >= 4
    n_groups = 256 // 32
    poke_bytes(path, f"{MODULE}.weight_scale", i * n_groups + j, bytes([byte]))
    with pytest.raises(NpquantError, match=rf"weight_scale\[{i}, {j}\] = e8m0 byte 0x{byte:02X} \(2\*\*{byte - 127}\) "
                                           r"times code -?\d\.\d makes weight .* -?inf") as info:
        npquant.load(path)
    assert_one_line(info, path)


def test_a_huge_scale_over_small_codes_still_loads(written):
    # The quick bound (largest scale times the format's largest code) fails here, but the block's codes are all
    # zero, so every weight is finite: the block-by-block check accepts it, and the weights are exact zeros.
    path = written["mxfp4"]
    poke_bytes(path, f"{MODULE}.weight_scale", 0, b"\xfe")  # block (0, 0): 2**127
    poke_bytes(path, f"{MODULE}.weight_packed", 0, bytes(16))  # its 32 fp4 codes: +0
    w = codes_of(path).dequantize()
    assert np.isfinite(w).all() and not w[0, :32].any()


@pytest.mark.parametrize("global_scale", [1e-45, 1e-38])
def test_an_nvfp4_global_scale_that_makes_every_scale_infinite_is_refused(written, global_scale):
    path = written["nvfp4"]
    poke_float32(path, f"{MODULE}.weight_global_scale", 0, global_scale)
    with pytest.raises(NpquantError, match=r"weight_scale\[0, 0\] = [0-9.e+-]+ over weight_global_scale "
                                           r"[0-9.e+-]+ = inf: every weight of its block would dequantize to inf") as info:
        npquant.load(path)
    assert_one_line(info, path)


def write_square_model(root, shape=(384, 384)):
    """One linear layer of ``shape`` (float32), for the packed-width cases."""
    root.mkdir(parents=True)
    w = (0.02 * np.random.default_rng(3).standard_normal(shape)).astype(np.float32)
    save_file({"layer.weight": w}, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text("{}")


def test_weight_shape_shrunk_within_the_same_word_count_is_refused(tmp_path):
    # w8-channel [384, 384] is int32 [384, 96]; [384, 381] takes ceil(381 * 8 / 32) = 96 words too, and would
    # drop the 3 last codes of every row.
    write_square_model(tmp_path / "m")
    npquant.quantize_checkpoint(tmp_path / "m", tmp_path / "q", "w8-channel")
    edit_tensors(tmp_path / "q", lambda t: t.__setitem__("layer.weight_shape", np.array([384, 381], np.int64)))
    with pytest.raises(NpquantError, match=r"weight_packed row 0 has set bits past weight_shape's 381 columns "
                                           r"\(word 95 is 0x[0-9A-F]{8}; its top 24 bits must be zero\)") as info:
        npquant.load(tmp_path / "q")
    assert_one_line(info, tmp_path / "q", "layer.weight")


def test_a_set_padding_bit_is_refused(tmp_path):
    # 381 int8 codes fill 95 words and 8 bits of the 96th: its other 24 bits are padding, written as zeros.
    write_square_model(tmp_path / "m", (384, 381))
    npquant.quantize_checkpoint(tmp_path / "m", tmp_path / "q", "w8-channel")
    assert npquant.load(tmp_path / "q")["layer.weight"].shape == (384, 381)
    poke_bytes(tmp_path / "q", "layer.weight_packed", (7 * 96 + 95) * 4 + 3, b"\x80")  # row 7, the last word's top bit
    with pytest.raises(NpquantError, match=r"weight_packed row 7 has set bits past weight_shape's 381 columns"):
        npquant.load(tmp_path / "q")


def test_a_set_padding_bit_in_zero_points_is_refused(tmp_path):
    # Asymmetric zero points are packed along the output dimension: 100 rows of 4 bits fill 12.5 words a group.
    write_square_model(tmp_path / "m", (100, 256))
    npquant.quantize_checkpoint(tmp_path / "m", tmp_path / "q", "w4-g128-asym")
    npquant.load(tmp_path / "q")
    poke_bytes(tmp_path / "q", "layer.weight_zero_point", (12 * 2 + 1) * 4 + 3, b"\x10")  # word 12 of group 1
    with pytest.raises(NpquantError, match=r"weight_zero_point row 1 has set bits past weight_shape's 100 rows"):
        npquant.load(tmp_path / "q")


def sharded_checkpoint(tmp_path, preset="w4-g32"):
    model = tmp_path / "sharded-model"
    write_model(model, sharded=True)
    out = tmp_path / "sharded-q"
    npquant.quantize_checkpoint(model, out, preset)
    return out


def edit_index(path, fn):
    f = path / "model.safetensors.index.json"
    index = json.loads(f.read_text())
    fn(index)
    f.write_text(json.dumps(index))


def test_an_index_with_an_empty_weight_map_is_refused(tmp_path):
    path = sharded_checkpoint(tmp_path)
    edit_index(path, lambda index: index.update(weight_map={}))
    with pytest.raises(NpquantError, match=r"model\.safetensors\.index\.json: weight_map is empty") as info:
        npquant.load(path)
    assert_one_line(info, path)


@pytest.mark.parametrize("edit, message", [
    (lambda wm: wm.update({"model.extra.weight": wm[next(iter(wm))]}),
     r"the index lists tensor 'model\.extra\.weight', found in no shard"),
    (lambda wm: wm.update({k: "model-00009-of-00009.safetensors" for k in list(wm)[:1]}),
     r"names shard 'model-00009-of-00009\.safetensors', which is missing"),
    (lambda wm: wm.update({k: 7 for k in list(wm)[:1]}),
     r"weight_map\['.*'\] must be a shard file name \(a string\), got a number"),
    (lambda wm: wm.update({k: "../model.safetensors" for k in list(wm)[:1]}), r"is not a file name in"),
    (lambda wm: wm.update({k: "pytorch_model.bin" for k in list(wm)[:1]}), r"pytorch_model\.bin is a pickle checkpoint"),
])
def test_an_index_naming_missing_or_odd_entries_is_refused(tmp_path, edit, message):
    path = sharded_checkpoint(tmp_path)
    edit_index(path, lambda index: edit(index["weight_map"]))
    with pytest.raises(NpquantError, match=message) as info:
        npquant.load(path)
    assert_one_line(info)


def two_groups(first_targets, second_targets):
    def edit(qc):
        g = qc["config_groups"]["group_0"]
        qc["config_groups"] = {"group_0": {**g, "targets": first_targets}, "group_1": {**g, "targets": second_targets}}
    return edit


@pytest.mark.parametrize("targets_a, targets_b, how", [
    (["Linear"], ["Linear"], "class name"),
    ([MODULE], [MODULE], "exact name"),
    (["re:.*up_proj$"], ["re:model\\.layers\\.0\\.mlp\\.up"], "re: pattern"),
])
def test_two_groups_claiming_a_module_alike_are_refused_in_either_order(written, targets_a, targets_b, how):
    path = written["w4-g32"]
    for first, second in ((targets_a, targets_b), (targets_b, targets_a)):
        edit_config(path, two_groups(first, second + ["Linear"] if how != "class name" else second))
        with pytest.raises(NpquantError, match=rf"claimed alike by config groups group_0 .* and group_1 .*, "
                                               rf"both by {how}") as info:
            npquant.load(path)
        assert_one_line(info, path / "config.json")


def test_a_more_specific_target_wins_over_linear_as_compressed_tensors_orders_them(written):
    # An exact name beats a re: pattern, which beats the class name Linear (the mixed fixtures of
    # compressed-tensors rely on it): a group naming one module by exact name and another targeting Linear load.
    path = written["w4-g32"]
    before = npquant.load(path)
    edit_config(path, two_groups([MODULE], ["Linear"]))
    after = npquant.load(path)
    assert sorted(after) == sorted(before)
    for name in before:
        np.testing.assert_array_equal(after[name].codes, before[name].codes)


def test_ignore_matches_the_class_name_linear(written):
    path = written["w4-g32"]
    edit_config(path, lambda qc: qc.update(ignore=["Linear"]))
    with pytest.raises(NpquantError, match=r"is in ignore but has quantized tensors \(ignore names it by class name: "
                                           r"'Linear'\)") as info:
        npquant.load(path)
    assert_one_line(info, path)


def test_other_class_names_match_nothing(written):
    # A checkpoint has no modules: only Linear, which every quantized module is taken for, can be matched.
    path = written["w4-g32"]
    edit_config(path, lambda qc: qc.update(ignore=["LayerNorm", "re:.*norm"]))
    assert len(npquant.load(path)) == 3
    edit_config(path, lambda qc: qc["config_groups"]["group_0"].update(targets=["QKVParallelLinear"]))
    with pytest.raises(NpquantError, match=r"has quantized tensors but no config group targets it"):
        npquant.load(path)


def test_target_patterns_are_compiled_once_per_load(written, monkeypatch):
    # 20,000 re: groups (each claiming nothing) beside the real one: every pattern is compiled once, and no
    # module-level re.match/re.search (which recompiles past re's cache of 512 patterns) is called.
    import re

    import npquant.checkpoints.config as config_module

    path = written["w4-g32"]

    def many(qc):
        g = qc["config_groups"]["group_0"]
        for k in range(20_000):
            qc["config_groups"][f"extra_{k}"] = {**g, "targets": [f"re:nothing\\.{k}\\."]}
        qc["ignore"] = ["re:nothing\\.0\\.", "re:also\\.nothing"]

    edit_config(path, many)
    compiled = []

    class CountingRe:
        error = re.error
        Pattern = re.Pattern

        @staticmethod
        def compile(pattern, flags=0):
            compiled.append(pattern)
            return re.compile(pattern, flags)

        def __getattr__(self, name):
            raise AssertionError(f"re.{name} called while matching targets")

    monkeypatch.setattr(config_module, "re", CountingRe())
    assert len(npquant.load(path)) == 3
    assert len(compiled) == len(set(compiled)) == 20_001


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "mxfp8", "fp8-channel", "fp8-block"])
def test_symmetric_false_is_refused_for_float_formats(written, preset):
    path = written[preset]
    edit_config(path, lambda qc: weights(qc).update(symmetric=False))
    with pytest.raises(NpquantError, match=r"weights: symmetric is false, but float weights \(fp8, NVFP4, MX\) are "
                                           r"stored without zero points") as info:
        npquant.load(path)
    assert_one_line(info, path / "config.json")


FIELD_EDITS = [
    (lambda qc: weights(qc).update(dynamic=True), r"weights\.dynamic is True: dynamic weights store no scales"),
    (lambda qc: weights(qc).update(dynamic="sometimes"), r"weights\.dynamic must be true, false or 'local'"),
    (lambda qc: weights(qc).update(zero_point=0),
     r"weights has field 'zero_point', which compressed-tensors does not define"),
    (lambda qc: qc["config_groups"]["group_0"].update(kv_cache=None), r"group_0 has field 'kv_cache'"),
    (lambda qc: qc["config_groups"]["group_0"].update(input_activations="int8"),
     r"input_activations must be an object or null, got a string"),
    (lambda qc: weights(qc).update(strategy="channel"),
     r"group_size=32 is for strategy 'group' or 'tensor_group', not 'channel'"),
    (lambda qc: weights(qc).update(block_structure=[128, 128]), r"block_structure is for strategy 'block', not 'group'"),
    (lambda qc: weights(qc).update(group_size=32.0), r"group_size must be an integer or null, got 32\.0"),
    (lambda qc: weights(qc).update(observer=["minmax"]), r"observer must be a string or null"),
    (lambda qc: weights(qc).update(observer_kwargs="x"), r"observer_kwargs must be an object"),
    (lambda qc: weights(qc).update(strategy="channel", group_size=None, actorder="weight"),
     r"actorder 'weight' is for group scales, not strategy 'channel'"),
    (lambda qc: qc.update(quant_method="gptq"), r"quant_method 'gptq' is not 'compressed-tensors'"),
    (lambda qc: qc.update(quantization_status="frozen"), r"quantization_status 'frozen': npquant reads 'compressed'"),
    (lambda qc: qc.update(format=4), r"quantization_config\.format must be a string, got a number"),
    (lambda qc: qc.update(ignore={"a": 1}), r"ignore must be a list of strings"),
    (lambda qc: qc.update(ignore=["re:("]), r"ignore: 're:\(' is not a valid regular expression"),
    (lambda qc: qc["config_groups"]["group_0"].update(targets=["re:[z-a]"]), r"targets: 're:\[z-a\]' is not a valid"),
]


@pytest.mark.parametrize("edit, message", FIELD_EDITS)
def test_every_field_is_checked(written, edit, message):
    path = written["w4-g32"]
    edit_config(path, edit)
    with pytest.raises(NpquantError, match=message) as info:
        npquant.load(path)
    assert_one_line(info, path / "config.json")


def test_strings_compressed_tensors_lowercases_are_read_alike(written):
    path = written["w4-g32"]
    before = npquant.load(path)[f"{MODULE}.weight"]
    edit_config(path, lambda qc: weights(qc).update(type="INT", strategy="Group"))
    np.testing.assert_array_equal(npquant.load(path)[f"{MODULE}.weight"].codes, before.codes)


# --- every reading failure is one line naming the file --------------------------------------------------------
def write_config(path, raw: bytes):
    (path / "config.json").write_bytes(raw)


@pytest.mark.parametrize("raw, message", [
    (b'{"quantization_config": "\xff\xfe"}', r"config\.json is not UTF-8 text \(byte 0xff at offset 25\)"),
    (b"[" * 100_000 + b"]" * 100_000, r"config\.json nests JSON arrays or objects too deeply to read"),
    (b"[1, 2]", r"config\.json must hold a JSON object, got a list"),
    (b'"compressed-tensors"', r"config\.json must hold a JSON object, got a string"),
    (b'{"quantization_config": [1]}', r"config\.json has no quantization_config object \(got a list\)"),
    (b"{'single': 'quotes'}", r"config\.json is not valid JSON: Expecting property name"),
    (b'{"a": 1' + b"0" * 5000 + b"}", r"config\.json is not valid JSON: Exceeds the limit"),
])
def test_a_broken_config_json_is_one_line_naming_it(written, raw, message):
    path = written["w4-g32"]
    write_config(path, raw)
    with pytest.raises(NpquantError, match=message) as info:
        npquant.load(path)
    assert_one_line(info, path / "config.json")


def test_a_source_config_json_that_is_not_an_object_is_refused_by_quantize(tmp_path):
    model = tmp_path / "model"
    write_model(model)
    for raw in (b"[]", b'"llama"'):
        write_config(model, raw)
        with pytest.raises(NpquantError, match=r"config\.json must hold a JSON object") as info:
            npquant.quantize_checkpoint(model, tmp_path / "out", "w4-g32")
        assert_one_line(info, model / "config.json")


def test_a_config_json_over_64_mib_is_refused_before_it_is_read(written):
    from npquant import safetensors_io

    path = written["w4-g32"]
    with open(path / "config.json", "r+b") as f:
        f.truncate(safetensors_io.MAX_JSON_BYTES + 1)  # sparse: no disk used
    with pytest.raises(NpquantError, match=rf"config\.json is {64 * 2**20 + 1} bytes; npquant reads JSON files of at "
                                           rf"most {64 * 2**20} bytes") as info:
        npquant.load(path)
    assert_one_line(info, path / "config.json")


def permission_denied_for(monkeypatch, target, *functions):
    """Make ``os.<function>`` raise PermissionError for ``target`` (tests run as root, where chmod denies nothing)."""
    for name in functions:
        real = getattr(os, name)

        def fake(p, *args, _real=real, **kwargs):
            if os.fspath(p) == os.fspath(target):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return _real(p, *args, **kwargs)

        monkeypatch.setattr(os, name, fake)


def test_an_unreadable_config_json_is_one_line(written, monkeypatch):
    path = written["w4-g32"]
    permission_denied_for(monkeypatch, path / "config.json", "open")
    with pytest.raises(NpquantError, match=r"config\.json cannot be read: Permission denied") as info:
        npquant.load(path)
    assert_one_line(info, path / "config.json")


def test_an_unsearchable_directory_is_one_line(written, monkeypatch):
    path = written["w4-g32"]
    permission_denied_for(monkeypatch, path / "config.json", "lstat")
    with pytest.raises(NpquantError, match=r"config\.json cannot be read: Permission denied") as info:
        npquant.load(path)
    assert_one_line(info, path)
    monkeypatch.undo()
    permission_denied_for(monkeypatch, path, "stat")
    with pytest.raises(NpquantError, match=r"cannot be read: Permission denied") as info:
        npquant.load(path)
    assert_one_line(info, path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their mode: the monkeypatched tests above stand in")
def test_unreadable_files_by_mode(written):
    path = written["w4-g32"]
    (path / "config.json").chmod(0)
    with pytest.raises(NpquantError, match=r"config\.json cannot be read: Permission denied"):
        npquant.load(path)
    (path / "config.json").chmod(0o644)
    path.chmod(0o600)  # not searchable
    try:
        with pytest.raises(NpquantError, match=r"cannot be read: Permission denied"):
            npquant.load(path)
    finally:
        path.chmod(0o755)


_UNBLOCK = r"""
import os, sys, time
fifo, marker = sys.argv[1], sys.argv[2]
while True:
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails (ENXIO) while no reader has the FIFO open
    except OSError:
        time.sleep(0.2)
        continue
    open(marker, "w").close()
    os.close(fd)  # the reader sees end of file
"""


class FifoUnblocker:
    """Should the code under test open a FIFO for reading (the bug these tests guard against), another process
    opens it for writing and closes it, so the reader gets end of file instead of hanging forever, and leaves a
    marker that :meth:`was_opened` reports. A process, not a thread: an open inside the safetensors package
    holds the GIL."""

    def __init__(self, fifo):
        import subprocess
        import sys

        self.marker = fifo.parent / f".{fifo.name}-was-opened"
        self.process = subprocess.Popen([sys.executable, "-c", _UNBLOCK, str(fifo), str(self.marker)])

    def was_opened(self) -> bool:
        return self.marker.exists()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_is_refused_before_it_is_opened(written, name, monkeypatch):
    path = written["w4-g32"]
    (path / name).unlink()
    os.mkfifo(path / name)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    with FifoUnblocker(path / name) as unblocker:
        with pytest.raises(NpquantError, match=rf"{name} is a FIFO, not a regular file") as info:
            npquant.load(path)
        assert str(path / name) not in opened and not unblocker.was_opened()
    assert_one_line(info, path / name)


def test_quantize_refuses_a_fifo_source(tmp_path):
    model = tmp_path / "model"
    write_model(model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    with FifoUnblocker(model / "model.safetensors") as unblocker:
        with pytest.raises(NpquantError, match=r"model\.safetensors is a FIFO, not a regular file"):
            npquant.quantize_checkpoint(model, tmp_path / "out", "w4-g32")
        assert not unblocker.was_opened()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(NpquantError, match=r"pipe is a FIFO, not a \.safetensors file or a model directory"):
        npquant.quantize_checkpoint(fifo, tmp_path / "out", "w4-g32")
    with pytest.raises(NpquantError, match=r"pipe is not a directory"):
        npquant.load(fifo)
