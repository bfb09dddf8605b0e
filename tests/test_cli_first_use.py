"""What a new user met on a first try of the command line, each guarded by a test.

Tables readable at 80 columns, ``--version``, no ml_dtypes before a missing
path is refused, the layers a group size leaves in float named with a
preset that fits them, plan.json's permissions, eval's plan labels, the
NVFP4 rule in ``schemes``, every preset in ``quantize --help``, and a first
README command that installs what every documented command needs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import npquant
from npquant.cli import main
from npquant.cli.eval import plan_labels
from npquant.cli.quantize import fallback_presets

ROOT = Path(__file__).resolve().parents[1]

#: Layer names as long as a BERT's, and one layer 96 inputs wide that a group of 64 does not divide.
LAYERS = {
    "model.encoder.layer.0.attention.self.query.weight": (384, 384),
    "model.encoder.layer.0.intermediate.dense.weight": (1536, 384),
    "model.encoder.layer.0.adapter.down.weight": (64, 96),
}


@pytest.fixture
def model(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    root = tmp_path / "m"
    root.mkdir()
    tensors = {name: (0.02 * rng.standard_normal(shape)).astype(np.float32) for name, shape in LAYERS.items()}
    tensors["model.norm.weight"] = np.ones(384, np.float32)
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def _printed_at(width: int, argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(argv) == 0
    return capsys.readouterr().out


def _assert_whole(out: str, width: int, texts) -> None:
    """Every line within ``width``, nothing cut with an ellipsis, and each of ``texts`` on one line, whole."""
    lines = out.splitlines()
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, f"lines over {width} columns: {too_wide[:2]}"
    assert "…" not in out and "..." not in out
    for text in texts:
        assert any(text in line for line in lines), f"{text!r} is not printed whole:\n{out}"


def test_report_at_80_columns_keeps_layer_names_and_numbers_whole(model, capsys, monkeypatch):
    argv = ["report", str(model), "--scheme", "w8-channel", "--scheme", "fp8-channel"]
    assert main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    out = _printed_at(80, argv, capsys, monkeypatch)
    numbers = [f"{r[k]:,}" for r in rows for k in ("bytes_before", "bytes_after")]
    assert "589,824" in numbers and "2,359,296" in numbers  # what the first try showed as '589,8...'
    names = [n.removesuffix(".weight") for n in LAYERS]
    _assert_whole(out, 80, names + numbers + [f"{r['rel_error']:.2e}" for r in rows])
    # Where the table fits, it is the rich table it always was, names in their column.
    wide = _printed_at(160, argv, capsys, monkeypatch)
    assert "┃ layer" in wide and any(names[0] in line and "589,824" in line for line in wide.splitlines())


def test_quantize_and_demo_at_80_columns_keep_everything_whole(model, tmp_path, capsys, monkeypatch):
    out = _printed_at(80, ["quantize", str(model), "-o", str(tmp_path / "q"), "--scheme", "w8-channel"],
                      capsys, monkeypatch)
    _assert_whole(out, 80, [n.removesuffix(".weight") for n in LAYERS] + ["589,824", "2,359,296"])
    assert main(["demo", "--shape", "512", "1024", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    out = _printed_at(80, ["demo", "--shape", "512", "1024"], capsys, monkeypatch)
    _assert_whole(out, 80, [r["scheme"] for r in rows] + [f"{r['bytes']:,}" for r in rows])


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"npquant {version}\n" and npquant.__version__ == version


def test_a_missing_model_is_refused_before_ml_dtypes_is_imported(tmp_path):
    # ml_dtypes costs about half a second to import: a wrong path should not wait for it.
    missing = str(tmp_path / "nope")
    code = ("import sys; from npquant.cli import main\n"
            f"codes = [main(['report', {missing!r}]), main(['quantize', {missing!r}, '-o', {missing + '-q'!r}]),\n"
            f"         main(['plan', {missing!r}, '--bits', '5', '-o', {missing + '.json'!r}])]\n"
            "print(codes, 'ml_dtypes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[2, 2, 2] False"
    assert done.stderr.count(f"MODEL {missing} does not exist") == 3


def test_layers_a_group_size_leaves_in_float_are_named_with_a_preset_that_fits(model, tmp_path, capsys):
    assert main(["quantize", str(model), "-o", str(tmp_path / "q64"), "--scheme", "w4-g64"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "kept in float" in line]
    assert len(warning) == 1, err
    assert warning[0].startswith("npquant quantize: warning: 1 linear layer kept in float, unquantized: "
                                 "group_size=64 does not divide in_features=96: "
                                 "model.encoder.layer.0.adapter.down (64x96); --scheme w4-g32 or w4-channel fits it")
    assert "'npquant plan --schemes w4-g64,w4-g32'" in warning[0]
    assert "model.encoder.layer.0.adapter.down.weight" not in npquant.load(tmp_path / "q64")
    # The suggested preset does quantize it.
    assert main(["quantize", str(model), "-o", str(tmp_path / "q32"), "--scheme", "w4-g32"]) == 0
    assert "kept in float" not in capsys.readouterr().err
    assert npquant.load(tmp_path / "q32")["model.encoder.layer.0.adapter.down.weight"].scheme.group_size == 32


@pytest.mark.parametrize("preset, widths, fits", [
    ("w4-g128", [96], ["w4-g32", "w4-channel"]),
    ("w4-g128", [64, 320], ["w4-g64", "w4-channel"]),
    ("w8-g128", [96], ["w8-channel"]),
    ("w4-g128-restricted", [96], ["w4-g32-restricted"]),
    ("w4-g128-asym", [96], ["w4-channel"]),
    ("w3-g128", [96], ["w4-channel"]),
    ("mxfp4", [48], ["nvfp4"]),
    ("nvfp4", [24], ["fp8-channel"]),
    ("mxfp8", [48], ["fp8-channel"]),
])
def test_fallback_presets_fit_every_width_and_keep_the_codes_where_they_can(preset, widths, fits):
    assert fallback_presets(npquant.get_scheme(preset), widths) == fits
    for name in fits:
        s = npquant.get_scheme(name)
        assert s.granularity != "group" or all(w % s.group_size == 0 for w in widths)


def test_plan_json_gets_the_umask_permissions_as_checkpoints_do(model, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert main(["plan", str(model), "--bits", "6", "--schemes", "w4-g32,w8-channel",
                     "-o", str(tmp_path / "plan.json")]) == 0
        assert main(["quantize", str(model), "-o", str(tmp_path / "q"), "--plan", str(tmp_path / "plan.json")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert (tmp_path / "plan.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "q" / "config.json").stat().st_mode & 0o777 == 0o640


def test_plan_refuses_an_output_it_cannot_write_before_measuring(model, tmp_path, capsys, monkeypatch):
    import npquant.cli.plan

    def measured(*args, **kwargs):
        raise AssertionError("measured the layers before refusing -o")

    monkeypatch.setattr(npquant.cli.plan, "_proxy_costs", measured)
    assert main(["plan", str(model), "--bits", "6", "-o", str(tmp_path)]) == 2
    assert "cannot write plan" in capsys.readouterr().err


def test_eval_plan_rows_are_labelled_by_the_plan_file():
    assert plan_labels(["plan.json"]) == ["plan.json"]  # was "plan plan"
    assert plan_labels(["runs/w5.json", "runs/w4.json"]) == ["w5.json", "w4.json"]
    assert plan_labels(["a/plan.json", "b/plan.json"]) == ["a/plan.json", "b/plan.json"]


def test_schemes_states_nvfp4s_global_scale_as_a_reciprocal_then_a_product(capsys):
    assert main(["schemes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("nvfp4 "))
    assert "(1 / absmax(w)) * 2688" in line and "2688 / absmax" not in line


def test_quantize_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    listed = set(re.findall(r"(?<![\w-])([a-z0-9]+(?:-[a-z0-9]+)*)(?![\w-])", out))
    assert set(npquant.schemes()) <= listed, sorted(set(npquant.schemes()) - listed)
    assert re.search(r"refused\s+w8-tensor, w4-tensor \(per-tensor int", out)


def test_readme_first_command_installs_what_every_documented_command_needs():
    first = re.search(r"```bash\n(.*)\n", (ROOT / "README.md").read_text()).group(1)
    install = re.match(r"pip install -e (\S+) &&", first)
    assert install, first
    extras = re.fullmatch(r"\"?\.(?:\[([\w,]+)\])?\"?", install.group(1)).group(1) or ""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        installed += project["optional-dependencies"][extra]
    # eval, plan and quantize --method gptq read the model's tokenizer.json with tokenizers
    assert any(re.match(r"tokenizers\b", dep) for dep in installed), (first, installed)


def test_readme_api_snippet_gets_the_bundled_model_path():
    python = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert "from npquant.checkpoints import default_model_path" in python
    assert "quantize_checkpoint(default_model_path()" in python
    code = "\n".join(line.split("#")[0] for line in python.splitlines())  # comments may show <module>
    assert not re.search(r"path/to|<[a-z_ ]+>|\.\.\./", code), "a placeholder path in the README's API snippet"


def test_cli_modules_stay_short():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "src/npquant/cli").glob("*.py")}
    assert {"__init__.py", "_common.py", "demo.py", "schemes.py", "report.py", "quantize.py", "eval.py",
            "plan.py", "inspect.py", "convert.py"} <= set(sizes)
    assert max(sizes.values()) <= 300, sizes
