"""Size plans: the budget solver against brute force, plan.json, mixed checkpoints, and the CLI."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import npquant
from npquant import NpquantError
from npquant.cli import main
from npquant.plan import read_plan, solve_budget, write_plan


# --- the solver ------------------------------------------------------------------------------
def brute_force(costs, sizes, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        b = sum(sizes[layer][k] for layer, k in enumerate(choice))
        if b > budget:
            continue
        c = sum(costs[layer][k] for layer, k in enumerate(choice))
        if best is None or c < best:
            best = c
    return best


@st.composite
def instances(draw):
    layers = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    sizes = [draw(st.lists(st.integers(0, 30), min_size=k, max_size=k)) for _ in range(layers)]
    costs = [draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k)) for _ in range(layers)]
    budget = draw(st.integers(0, 30 * layers))
    return costs, sizes, budget


@settings(max_examples=400, deadline=None)
@given(instances())
def test_solver_finds_the_brute_force_optimum_within_the_budget(case):
    costs, sizes, budget = case
    best = brute_force(costs, sizes, budget)
    if best is None:
        with pytest.raises(NpquantError, match=r"below the smallest choice for every layer"):
            solve_budget(costs, sizes, budget)
        return
    chosen = solve_budget(costs, sizes, budget)
    assert len(chosen) == len(costs)
    assert sum(sizes[layer][k] for layer, k in enumerate(chosen)) <= budget
    assert sum(costs[layer][k] for layer, k in enumerate(chosen)) == pytest.approx(best, abs=1e-9)


def dp_over_bytes(costs, sizes, budget):
    """Independent exact optimum: the textbook table over budgets, in units of the sizes' gcd."""
    import math

    g = 0
    for s in sizes:
        for v in s:
            g = math.gcd(g, int(v))
    g = g or 1
    cap = budget // g
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for c, s in zip(costs, sizes):
        nxt = np.full(cap + 1, np.inf)
        for ck, sk in zip(c, s):
            u = int(sk) // g
            if u <= cap:
                nxt[u:] = np.minimum(nxt[u:], best[: cap + 1 - u] + ck)
        best = nxt
    return float(best.min())


def test_solver_on_a_realistic_instance_matches_an_independent_table():
    # 40 layers of 3 shapes, 4 options each (MiniLM-like byte counts): the frontier stays small because sizes repeat.
    rng = np.random.default_rng(0)
    shapes = [(384, 384), (1536, 384), (384, 1536), (384, 384)] * 10
    bits = [4.25, 5.0, 8.0625, 8.0625]
    sizes = [[int(o * i * b / 8) for b in bits] for o, i in shapes]
    costs = [list(np.sort(rng.uniform(0, 1, 4))[::-1] * np.array([1, 0.6, 0.01, 0.05])) for _ in shapes]
    for per_weight in (4.5, 5.0, 6.0):
        budget = int(sum(o * i for o, i in shapes) * per_weight / 8)
        chosen = solve_budget(costs, sizes, budget)
        assert sum(sizes[layer][k] for layer, k in enumerate(chosen)) <= budget
        total = sum(costs[layer][k] for layer, k in enumerate(chosen))
        assert total == pytest.approx(dp_over_bytes(costs, sizes, budget), abs=1e-9)


def test_solver_bad_input():
    with pytest.raises(NpquantError, match=r"costs has 2 layers but sizes has 1"):
        solve_budget([[1.0], [1.0]], [[1]], 5)
    with pytest.raises(NpquantError, match=r"layer 0: costs must be finite"):
        solve_budget([[float("nan")]], [[1]], 5)
    with pytest.raises(NpquantError, match=r"budget must be a non-negative int"):
        solve_budget([[1.0]], [[1]], -1)
    with pytest.raises(NpquantError, match=r"the budget of 3 bytes is below the smallest choice for every layer \(4 bytes\)"):
        solve_budget([[1.0, 2.0], [0.0]], [[2, 3], [2]], 3)


# --- a synthetic model where the best plan is known --------------------------------------------
def write_model(root, config=None):
    """Four linear layers: two smooth (4-bit is nearly free) and two with wild rows (4-bit hurts)."""
    rng = np.random.default_rng(0)
    smooth = lambda: (0.02 * rng.standard_normal((64, 256))).astype(np.float32)  # noqa: E731

    def wild():
        w = 0.02 * rng.standard_normal((64, 256))
        w[:, ::16] *= 40  # one large input per group of 16: 4-bit scales crush the rest
        return w.astype(np.float32)

    root.mkdir(parents=True, exist_ok=True)
    tensors = {"model.layers.0.a.weight": smooth(), "model.layers.0.b.weight": wild(),
               "model.layers.1.a.weight": smooth(), "model.layers.1.b.weight": wild(),
               "model.norm.weight": np.ones(256, np.float32)}
    save_file(tensors, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return tensors


def test_proxy_plan_keeps_the_hard_layers_at_8_bits(tmp_path, capsys):
    model = tmp_path / "m"
    write_model(model)
    out = tmp_path / "plan.json"
    # Budget: two layers at w8-channel (8.125 bits at 256 columns) and two at w4-g128 (4.25): 6.19 bits.
    assert main(["plan", str(model), "--bits", "6.2", "--schemes", "w4-g128,w8-channel", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weight-only proxy" in printed
    plan = read_plan(out)
    picked = {n: e["scheme"] for n, e in plan["layers"].items()}
    assert picked == {"model.layers.0.a.weight": "w4-g128", "model.layers.0.b.weight": "w8-channel",
                      "model.layers.1.a.weight": "w4-g128", "model.layers.1.b.weight": "w8-channel"}
    assert plan["total_bytes"] <= plan["budget"]["bytes"] and plan["bits_per_weight"] <= 6.2
    assert plan["method"] == "rtn" and "proxy" in plan["cost"]


def test_mixed_checkpoint_decodes_each_module_with_its_own_scheme(tmp_path, capsys):
    model = tmp_path / "m"
    tensors = write_model(model)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(model), "--bits", "6.2", "--schemes", "w4-g128,w8-channel,fp8-channel",
                 "-o", str(plan_path)]) == 0
    plan = read_plan(plan_path)
    # Force three formats into one checkpoint: pack-quantized (4 and 8 bit) and float-quantized.
    plan["layers"]["model.layers.1.a.weight"]["scheme"] = "fp8-channel"
    write_plan(plan_path, plan)
    out = tmp_path / "out"
    assert main(["quantize", str(model), "-o", str(out), "--plan", str(plan_path)]) == 0
    capsys.readouterr()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    targets = {t: g for g in qc["config_groups"].values() for t in g["targets"]}
    assert sorted(targets) == sorted(n[: -len(".weight")] for n in plan["layers"])  # exactly the planned modules
    assert len(targets) == sum(len(g["targets"]) for g in qc["config_groups"].values())  # disjoint groups
    loaded = npquant.load(out)
    for name, entry in plan["layers"].items():
        want = npquant.quantize(tensors[name], entry["scheme"])
        got = loaded[name]
        assert got.scheme == npquant.get_scheme(entry["scheme"])
        assert targets[name[: -len(".weight")]]["format"] == ("float-quantized" if got.scheme.is_float else "pack-quantized")
        np.testing.assert_array_equal(got.codes.view(np.uint8), want.codes.view(np.uint8))
        np.testing.assert_array_equal(got.scale, want.scale)


def test_a_single_scheme_plan_is_one_group_with_its_own_format(tmp_path, capsys):
    model = tmp_path / "m"
    write_model(model)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(model), "--bits", "4.3", "--schemes", "w4-g128,w8-channel", "-o", str(plan_path)]) == 0
    out = tmp_path / "out"
    assert main(["quantize", str(model), "-o", str(out), "--plan", str(plan_path)]) == 0
    capsys.readouterr()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 1


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"].update({"model.layers.9.a.weight": {"scheme": "w4-g128", "shape": [64, 256]}}),
     "names layer 'model.layers.9.a.weight', which"),
    (lambda p: p["layers"]["model.layers.0.a.weight"].update(shape=[32, 256]), "the plan is for another model"),
    (lambda p: p["layers"]["model.layers.0.a.weight"].update(scheme="w5-g7"), "'w5-g7' is not a preset"),
    (lambda p: p.update(version=99), "is not an npquant plan"),
    (lambda p: p.update(layers={}), "'layers' must map layer names"),
    (lambda p: p["layers"]["model.layers.0.a.weight"].update(scheme="w8-tensor"), "per-tensor int"),
])
def test_bad_plans_are_one_line_and_write_nothing(tmp_path, capsys, edit, message):
    model = tmp_path / "m"
    write_model(model)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(model), "--bits", "6", "--schemes", "w4-g128,w8-channel", "-o", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    edit(plan)
    plan_path.write_text(json.dumps(plan))
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["quantize", str(model), "-o", str(out), "--plan", str(plan_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_plan_bad_input(tmp_path, capsys):
    model = tmp_path / "m"
    write_model(model)
    out = tmp_path / "plan.json"
    cases = [
        (["--bits", "1.0"], "below the smallest plan"),  # check_budget's line, from shapes, before measuring
        (["--bits", "5", "--schemes", "w4-g128,nope"], "scheme='nope' is not a preset"),
        (["--bits", "-1"], "--bits must be a positive number"),
        (["--size", "0"], "--size must be a positive number of bytes"),
        (["--bits", "5", "--method", "gptq"], "npquant runs BERT sentence encoders and Llama-family decoders"),
        (["--bits", "5", "--schemes", "w8-tensor"], "per-tensor int"),
    ]
    for argv, message in cases:
        assert main(["plan", str(model), "-o", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert not out.exists()
    assert main(["quantize", str(model), "-o", str(tmp_path / "q"), "--plan", str(tmp_path / "none.json")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_size_budget_in_bytes(tmp_path, capsys):
    model = tmp_path / "m"
    write_model(model)
    out = tmp_path / "plan.json"
    w4 = npquant.quantize(np.zeros((64, 256), np.float32), "w4-g128").nbytes
    w8 = npquant.quantize(np.zeros((64, 256), np.float32), "w8-channel").nbytes
    assert main(["plan", str(model), "--size", str(3 * w4 + w8), "--schemes", "w4-g128,w8-channel", "-o", str(out),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total_bytes"] == 3 * w4 + w8
    assert sum(e["scheme"] == "w8-channel" for e in plan["layers"].values()) == 1
