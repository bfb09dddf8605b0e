"""Checkpoints that compressed-tensors itself wrote, read by npquant.load to its own decompression, bit for bit.

tests/data/make_ct_fixtures.py made them with compressed-tensors 0.20.1 on
torch 2.13.0 (scales from its calculate_qparams, codes from each format's
compressor, the reference from the same compressor's decompress), so these
tests need neither. compressed-tensors decompresses to the model's dtype;
npquant's float32 weight rounded to that dtype must equal it exactly.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import npquant
from npquant.safetensors_io import Checkpoint
from test_linear import sum_bound

FIXTURES = sorted((Path(__file__).parent / "data" / "ct_fixtures").iterdir())
FIXTURES_BY_NAME = {p.name: p for p in FIXTURES}


def reference(path):
    with Checkpoint(path / "reference" / "dense.safetensors") as ckpt:
        return {name: src.read() for name, src in ckpt.tensors.items()}


# The formats whose rules npquant follows as compressed-tensors computes them: its writer must give the same bytes.
WRITTEN_ALIKE = {"nvfp4": "nvfp4", "mxfp4": "mxfp4", "mxfp6": "mxfp6", "mxfp8": "mxfp8", "fp8-block": "fp8-block",
                 "fp8-block-a16": "fp8-block", "w8a8-int": "w8a8-int8"}


def test_every_fixture_is_here():
    assert len(FIXTURES) == 40, [p.name for p in FIXTURES]


def read_all(path):
    with Checkpoint(path) as ckpt:
        return {name: src.read() for name, src in ckpt.tensors.items()}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_load_equals_compressed_tensors_decompression(path):
    loaded = npquant.load(path)
    want = reference(path)
    ignored = {f"{m}.weight" for m in json.loads((path / "config.json").read_text())["quantization_config"]["ignore"]}
    assert sorted(loaded) == sorted(set(want) - ignored)
    for name in ignored:  # a dense weight stays in the checkpoint as it was
        assert name in read_all(path / "model.safetensors")
    for name, dense in want.items():
        if name in ignored:
            continue
        qt = loaded[name]
        got = qt.dequantize().astype(dense.dtype)  # one rounding to the model dtype
        np.testing.assert_array_equal(got.view(np.uint8), dense.view(np.uint8), err_msg=name)
        if not qt.scheme.is_float and qt.scheme.symmetric and "actorder-group" not in path.name:
            # compressed-tensors uses the full signed range: -8 for int4, -128 for int8 (its exact negative maximum)
            assert int(qt.int_codes().min()) == -(2 ** (qt.scheme.bits - 1)), name


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_loaded_tensors_run_on_every_backend(path):
    x = np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32)
    for name, qt in npquant.load(path).items():
        xi = x[:, : qt.shape[1]]
        if qt.scheme.activations is not None:  # W8A8: x quantized per token, the reference on both backends
            want = npquant.linear(xi, qt, backend="numpy")
            for backend in npquant.available_backends():
                for weights in (qt, npquant.prepare(qt)):
                    assert np.array_equal(npquant.linear(xi, weights, backend=backend), want), (name, backend)
            continue
        exact = xi.astype(np.float64) @ qt.dequantize().astype(np.float64).T
        bound = sum_bound(xi, qt.dequantize(), qt.shape[1] + 2) + 1e-30
        for backend in npquant.available_backends():
            for weights in (qt, npquant.prepare(qt)):
                y = npquant.linear(xi, weights, backend=backend)
                assert np.all(np.abs(y - exact) <= bound), (name, backend, type(weights).__name__)


def test_act_order_fixture_is_permuted_and_matches_the_spec_semantics():
    """0.18's g_idx: column j dequantizes with its group's scale, W[:, j] = q[:, j] * s[:, g_idx[j]]."""
    path = FIXTURES_BY_NAME["w4-g32-actorder-group-v0.18-float32"]
    raw = read_all(path / "model.safetensors")
    for name, qt in npquant.load(path).items():
        m = name[: -len(".weight")]
        g_idx = raw[f"{m}.weight_g_idx"].astype(np.int64)
        assert qt.perm is not None and np.array_equal(np.sort(g_idx[qt.perm]), g_idx[qt.perm])
        words = raw[f"{m}.weight_packed"].view(np.uint32)
        rows, cols = qt.shape
        q = np.array([[(int(words[r, j // 8]) >> (4 * (j % 8)) & 0xF) - 8 for j in range(cols)] for r in range(rows)])
        w = q * raw[f"{m}.weight_scale"][:, g_idx]
        np.testing.assert_array_equal(qt.dequantize(), w.astype(np.float32))


@pytest.mark.parametrize("path", [p for p in FIXTURES if p.name.rsplit("-", 1)[0] in WRITTEN_ALIKE], ids=lambda p: p.name)
def test_quantize_checkpoint_writes_what_compressed_tensors_wrote(path, tmp_path):
    """The same source weights through npquant's writer: every tensor byte-equal, the config naming the same format."""
    preset = WRITTEN_ALIKE[path.name.rsplit("-", 1)[0]]
    out = tmp_path / "out"
    npquant.quantize_checkpoint(path / "source" / "model.safetensors", out, preset)
    got, want = read_all(out / "model.safetensors"), read_all(path / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert got[name].tobytes() == tensor.tobytes(), name
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    theirs = json.loads((path / "config.json").read_text())["quantization_config"]
    for args in ("weights", "input_activations"):
        ours_w, theirs_w = ours["config_groups"]["group_0"][args], theirs["config_groups"]["group_0"][args]
        if args == "input_activations" and theirs_w is not None and theirs_w["strategy"] == "group":
            continue  # FP8_BLOCK's per-group activations: npquant writes fp8-block weight-only
        ours_w, theirs_w = ours_w or {}, theirs_w or {}
        assert {k: v for k, v in theirs_w.items() if v is not None} == {k: v for k, v in ours_w.items() if v is not None}
    if theirs["format"] != "naive-quantized":  # weight-only fp8 blocks: npquant writes float-quantized, as for fp8-channel
        assert ours["format"] == theirs["format"]
