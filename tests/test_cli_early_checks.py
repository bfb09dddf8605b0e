"""What the commands refuse before their long work: plan's budget before measuring, quantize's OUT and an
already-quantized input before GPTQ's calibration, and a quantized directory given to SentenceEncoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

import npquant
from npquant import NpquantError
from npquant.cli import main


@pytest.fixture
def model(tmp_path):
    """A float checkpoint of three linear layers (a llama-like name, no model to run)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    root = tmp_path / "m"
    root.mkdir()
    tensors = {f"model.layers.0.mlp.{n}.weight": (0.02 * rng.standard_normal(s)).astype(np.float32)
               for n, s in (("gate_proj", (256, 128)), ("up_proj", (256, 128)), ("down_proj", (128, 256)))}
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def _never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the refusal")
    return fail


# --- plan ------------------------------------------------------------------------------------------------
def test_plan_bits_1_on_the_default_model_is_refused_from_shapes_before_measuring(tmp_path, capsys, monkeypatch):
    # Fuzz finding: 'npquant plan --bits 1' measured every layer for minutes before saying the budget was impossible.
    import npquant.cli.plan

    monkeypatch.setattr(npquant.cli.plan, "_encoder_costs", _never("measuring the encoder's layers"))
    monkeypatch.setattr(npquant.cli.plan, "_proxy_costs", _never("measuring the layers"))
    out = tmp_path / "plan.json"
    assert main(["plan", "--bits", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    # The library's line (npquant.plan.check_budget), as it is: w4-g128 everywhere is the smallest plan.
    assert err.startswith("npquant plan: error: the budget of 1,345,536 bytes (1.00 bits per weight) is below the "
                          "smallest plan, 5,718,528 bytes (4.25 bits per weight, every layer at its smallest "
                          "candidate): raise the budget to at least 4.25 bits per weight"), err
    assert not out.exists()


def test_plan_byte_counts_come_from_shapes(model, tmp_path, capsys):
    from npquant.plan import layer_bytes

    assert main(["plan", str(model), "--bits", "6", "--schemes", "w4-g128,w4-g32,w8-channel",
                 "-o", str(tmp_path / "plan.json"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for name, entry in plan["layers"].items():
        shape = tuple(entry["shape"])
        assert entry["bytes"] == layer_bytes(shape, entry["scheme"])
    assert plan["budget"]["bytes"] == int(6 * sum(np.prod(e["shape"]) for e in plan["layers"].values()) / 8)


# --- quantize --------------------------------------------------------------------------------------------
def test_quantize_refuses_a_bad_out_or_a_quantized_input_before_gptq_runs(model, tmp_path, capsys, monkeypatch):
    # GPTQ's calibration takes minutes; an OUT the writer refuses, or an input already quantized, used to wait
    # for it (about 45 s on MiniLM) before failing.
    import npquant.cli._gptq

    npquant.quantize_checkpoint(model, tmp_path / "fp8", "fp8-channel")  # npquant's own output: quantized
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(npquant.cli._gptq, "calibrate_checkpoint", _never("GPTQ's calibration"))
    cases = [
        ([model, "-o", tmp_path / "taken"], "already exists; pass --force"),
        ([model, "-o", tmp_path / "taken", "--force"], "is a directory npquant did not write"),
        ([model, "-o", tmp_path / "file", "--force"], "is a file, not a directory npquant wrote"),
        ([model, "-o", model, "--force"], "is the input model"),
        ([model, "-o", model / "q"], "is inside the input model"),
        ([tmp_path / "fp8", "-o", tmp_path / "q"], "is already quantized: its config.json has a quantization_config"),
    ]
    for argv, want in cases:
        assert main(["quantize", *map(str, argv), "--method", "gptq"]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err, (argv, err)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "q").exists()


def test_quantize_force_help_says_what_it_replaces(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "replaces only a directory npquant wrote" in help_text


# --- SentenceEncoder -------------------------------------------------------------------------------------
def test_sentence_encoder_refuses_a_quantized_directory(tmp_path):
    # An fp8 compressed-tensors directory used to load its fp8 codes as float weights: it ran, silently wrong.
    from npquant.checkpoints import default_model_path
    from npquant.models import SentenceEncoder

    out = tmp_path / "fp8"
    npquant.quantize_checkpoint(default_model_path(), out, "fp8-channel")
    with pytest.raises(NpquantError, match=r"fp8 is already quantized: its config\.json has a quantization_config "
                                           r"\(quant_method 'compressed-tensors', format 'float-quantized'\)"):
        SentenceEncoder.from_pretrained(out)
    # Without the config, the fp8 weights themselves give it away.
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(NpquantError, match=r"is already quantized: tensor '.*\.weight' in model\.safetensors is "
                                           r"fp8 e4m3"):
        SentenceEncoder.from_pretrained(out)
