"""The command line, run in-process and as a console script."""

import json
import subprocess
import sys

import pytest

import npquant
from npquant.cli import main


def test_demo_json_has_one_row_per_scheme(capsys):
    assert main(["demo", "--shape", "256", "256", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in rows] == ["float32", *npquant.schemes()]
    by = {r["scheme"]: r for r in rows}
    assert by["float32"]["sqnr_db"] == "inf" and by["float32"]["bytes"] == 256 * 256 * 4
    assert by["w8-channel"]["bytes"] == 256 * 256 + 256 * 4
    # The outlier row: per-channel beats per-tensor (~sqrt(255) ~ 16x here, see
    # the lab tests), per-group beats per-channel.
    assert by["w8-channel"]["rel_error"] * 10 < by["w8-tensor"]["rel_error"]
    assert by["w4-g128"]["rel_error"] < by["w4-channel"]["rel_error"]


def test_demo_table_with_chosen_schemes(capsys):
    assert main(["demo", "--shape", "32", "128", "--scheme", "w8-tensor", "--scheme", "w8-channel"]) == 0
    out = capsys.readouterr().out
    for word in ("float32", "w8-tensor", "w8-channel", "SQNR dB", "saving"):
        assert word in out
    assert "w4-g128" not in out


def test_demo_help_explains_columns(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key in ("bits_per_weight", "saving", "sqnr_db", "output_rel_error"):
        assert key in out


def test_user_errors_are_one_line_and_exit_2(capsys):
    assert main(["demo", "--scheme", "w5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npquant demo: error: scheme='w5' is not a preset") and "\n" not in err
    assert main(["demo", "--shape", "0", "8"]) == 2
    assert "shape must be positive" in capsys.readouterr().err


def test_schemes_lists_every_preset(capsys):
    assert main(["schemes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["preset", "bits/w"]
    assert [line.split()[0] for line in lines[1:]] == list(npquant.schemes())
    bits = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    # codes + scales of 4096 x 4096: nvfp4 4 + 8/16 (+ a global float32), mxfp4 4 + 8/32, fp8 blocks 8 + 32/128**2
    assert bits["nvfp4"] == 4.5 and bits["mxfp4"] == 4.25 and bits["mxfp6"] == 6.25 and bits["mxfp8"] == 8.25
    assert bits["fp8-block"] == 8.002 and bits["w4-g128"] == 4.25
    assert main(["schemes", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert presets["w4-g128"]["group_size"] == 128 and presets["fp8-block"]["block_size"] == [128, 128]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "npquant", "schemes"], capture_output=True, text=True, check=True)
    assert "w4-g128" in done.stdout


def test_import_is_light():
    code = "import sys, npquant; print(any(m in sys.modules for m in ('numba', 'rich', 'ml_dtypes', 'tokenizers')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
