"""A seeded fuzz of npquant.load: mutated compressed-tensors checkpoints either raise NpquantError or decode finite.

Small checkpoints are written with :func:`npquant.quantize_checkpoint` for seven schemes (two of them also
sharded with an index), then 405 mutants are made from them with one RNG: bytes flipped in the safetensors
header and data, scales set to the edges of their formats, config.json fields replaced by values of other
types and other values, config files that are not JSON objects, tensors rewritten with other shapes and
dtypes, files removed, truncated or replaced by directories, index entries broken. For each mutant, ``load``

- raises NpquantError (one line), or
- returns tensors that all dequantize to finite float32, and, where the mutation is harmless, the same
  tensors as the unmutated checkpoint: codes, scales, zero points and dequantized values alike.

What a mutation must do is decided from what it touches, never from what load returns:

- harmless (must load, equal): a byte flipped in a tensor that is no part of a quantized module (an
  embedding, a norm, a bias: load never decodes them); a header byte flip after which every tensor's
  name, dtype, shape and offsets parse the same (a space turned into a tab, a metadata value); config.json
  keys outside ``quantization_config``, an ``observer`` name, ``ignore`` entries matching no module, the
  JSON reformatted; removing or replacing a file load does not read (the tokenizer, npquant's output
  marker, the index of a checkpoint whose shards hold exactly what the index says);
- must fail: a truncated safetensors file, a missing or unreadable config.json or shard, a broken index,
  a config.json that is not a JSON object, a module claimed by two groups alike or ignored (by ``Linear``
  or a pattern), ``symmetric`` flipped, dynamic weights, a field compressed-tensors does not define,
  another ``quant_method``, a ``weight_shape`` shrunk in a symmetric checkpoint (its dropped codes have set
  bits: npquant never stores a symmetric code as 0);
- either (then only finiteness is checked): flips in codes, scales, zero points, global scales and
  shapes, extreme scales, header flips that change an entry, and the other config edits. A flipped code is
  a valid code of another value, so values may differ; an extreme scale may still keep every weight finite.
"""

import json
import shutil
import warnings

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import npquant
from npquant import NpquantError
from npquant.safetensors_io import Checkpoint, TensorPlan, write_safetensors

SEED = 34
SCHEMES = ["w8-channel", "w4-g128", "w4-g128-asym", "fp8-block", "nvfp4", "mxfp4", "w3-g128"]
SHARDED = ["w4-g128", "nvfp4"]
MUTANTS_PER_CHECKPOINT = 45  # 9 checkpoints: 405 mutants


def model_tensors():
    """A small model: linear weights in float32, bfloat16 and float16 (one 381 wide, which the group schemes
    leave in float and the others pad), and tensors load never decodes."""
    rng = np.random.default_rng(SEED)
    w = lambda o, i, dt: (0.02 * rng.standard_normal((o, i))).astype(dt)  # noqa: E731
    return {
        "model.embed_tokens.weight": w(50, 128, ml_dtypes.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": w(64, 256, np.float32),
        "model.layers.0.self_attn.q_proj.bias": w(1, 64, np.float32)[0],
        "model.layers.0.self_attn.o_proj.weight": w(64, 381, np.float32),
        "model.layers.0.mlp.up_proj.weight": w(96, 256, ml_dtypes.bfloat16),
        "model.layers.0.mlp.down_proj.weight": w(100, 384, np.float16),
        "model.norm.weight": np.ones(256, np.float32),
    }


def write_source(root, sharded):
    root.mkdir(parents=True)
    ts = model_tensors()
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


# --- reading a safetensors file's layout ------------------------------------------------------------------------
def header_of(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def entries(header: dict) -> dict:
    return {k: v for k, v in header.items() if k != "__metadata__"}


def quantized_modules(names) -> set[str]:
    """Modules with quantized tensors, as load finds them (names only: a checkpoint npquant wrote)."""
    out = set()
    for name in names:
        for suffix in (".weight_packed", ".weight_scale"):
            if name.endswith(suffix):
                out.add(name[: -len(suffix)])
    return out


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


# --- the mutations: each returns "harmless", "fails" or "either" ------------------------------------------------
def safetensors_files(path):
    return sorted(path.glob("*.safetensors"))


def flip_header_byte(path, rng):
    f = safetensors_files(path)[rng.integers(len(safetensors_files(path)))]
    data = bytearray(f.read_bytes())
    n, before = header_of(data)
    at = 8 + int(rng.integers(n))
    data[at] ^= int(rng.integers(1, 256))
    f.write_bytes(bytes(data))
    try:
        after = json.loads(bytes(data[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError):
        return "either"  # safetensors' own parser may read what Python's does not, or not
    same = isinstance(after, dict) and entries(after) == entries(before)
    return "harmless" if same else "either"


def flip_data_byte(path, rng):
    files = safetensors_files(path)
    f = files[rng.integers(len(files))]
    data = bytearray(f.read_bytes())
    n, header = header_of(data)
    names = sorted(entries(header), key=lambda k: header[k]["data_offsets"][0])
    name = names[rng.integers(len(names))]
    start, stop = header[name]["data_offsets"]
    if stop == start:
        return "harmless"
    at = 8 + n + start + int(rng.integers(stop - start))
    data[at] ^= int(rng.integers(1, 256))
    f.write_bytes(bytes(data))
    all_names = set().union(*(entries(header_of(g.read_bytes())[1]) for g in files))
    return "either" if module_of(name) in quantized_modules(all_names) else "harmless"


# Stored scale values at the edges of their formats: float32's largest and values whose products with the
# largest codes overflow, the smallest subnormals (an NVFP4 global scale there makes every scale infinite),
# e8m0's 2**127 and 2**126, fp8's 448.
EXTREMES = {
    "F32": [3.4e38, 1e38, 6e37, 1e37, 1e-38, 1e-45, 0.0],
    "F16": [65504.0, 6e-08, 0.0],
    "BF16": [3.3e38, 1e38, 1e-38, 0.0],
    "F8_E4M3": [0x7E, 0x01, 0x00],
    "U8": [0xFE, 0xFD, 0xFC, 0x80, 0x00],
}


def set_extreme_scale(path, rng):
    files = safetensors_files(path)
    found = []
    for f in files:
        n, header = header_of(f.read_bytes())
        found += [(f, n, name, meta) for name, meta in entries(header).items()
                  if name.endswith(("weight_scale", "weight_global_scale")) and meta["dtype"] in EXTREMES]
    f, n, _, meta = found[rng.integers(len(found))]
    values = EXTREMES[meta["dtype"]]
    value = values[rng.integers(len(values))]
    raw = {"F32": lambda v: np.float32(v).tobytes(), "F16": lambda v: np.float16(v).tobytes(),
           "BF16": lambda v: np.array(v, ml_dtypes.bfloat16).tobytes()}.get(meta["dtype"], lambda v: bytes([v]))(value)
    start, stop = meta["data_offsets"]
    at = start + int(rng.integers((stop - start) // len(raw))) * len(raw)
    data = bytearray(f.read_bytes())
    data[8 + n + at : 8 + n + at + len(raw)] = raw
    f.write_bytes(bytes(data))
    return "either"


def truncate_file(path, rng):
    f = safetensors_files(path)[rng.integers(len(safetensors_files(path)))]
    data = f.read_bytes()
    f.write_bytes(data[: int(rng.integers(len(data)))])
    return "fails"


def remove_file(path, rng):
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    name = names[rng.integers(len(names))]
    (path / name).unlink()
    if name == "model.safetensors.index.json":
        return "harmless"  # the shards are found by name and hold exactly what the index said
    if name.endswith(".safetensors") or name == "config.json":
        return "fails"
    return "harmless"  # the tokenizer, npquant's output marker


def replace_with_directory(path, rng):
    names = sorted(p.name for p in path.iterdir() if p.name.endswith((".json", ".safetensors")))
    name = names[rng.integers(len(names))]
    (path / name).unlink()
    (path / name).mkdir()
    read = name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json")
    return "fails" if read else "harmless"


# Values of every JSON type, and some near the valid ones.
ODD_VALUES = [None, True, False, 0, -1, 1, 2, 3, 4, 7, 8, 16, 32, 64, 127, 128, 1e300, -0.5, 4.0, "4", "", "int",
              "float", "group", "channel", "tensor", "block", "tensor_group", "torch.uint8", "torch.float8_e4m3fn",
              "re:.*", "Linear", "mixed-precision", "pack-quantized", "nvfp4-pack-quantized", [], [128, 128], [1],
              ["Linear"], {}, {"a": 1}]


def config_paths(value, prefix=()):
    """Every (path) to a value inside ``value``, a parsed JSON tree."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from config_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from config_paths(v, prefix + (i,))


def edit_config_field(path, rng):
    cfg = json.loads((path / "config.json").read_text())
    paths = [p for p in config_paths(cfg["quantization_config"]) if p]
    where = paths[rng.integers(len(paths))]
    node = cfg["quantization_config"]
    for key in where[:-1]:
        node = node[key]
    old = node[where[-1]]
    choice = rng.integers(3)
    if choice == 0 and isinstance(node, dict):
        del node[where[-1]]
    else:
        new = ODD_VALUES[rng.integers(len(ODD_VALUES))]
        if new == old and type(new) is type(old):
            return "harmless"  # nothing changed: must load as before
        node[where[-1]] = new
    (path / "config.json").write_text(json.dumps(cfg))
    return "either"


def edit_config_harmlessly(path, rng):
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    kind = rng.integers(5)
    if kind == 0:
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["hidden_size"] = int(rng.integers(1, 10_000))
    elif kind == 1:
        for g in qc["config_groups"].values():
            g["weights"]["observer"] = "mse"
    elif kind == 2:
        qc["ignore"] = [*qc["ignore"], "lm_head", "re:^nothing\\.", "LayerNorm"]
    elif kind == 3:
        qc["global_compression_ratio"] = None
        qc["version"] = "0.20.1"
    (path / "config.json").write_text(json.dumps(cfg, indent=int(rng.integers(0, 4)), sort_keys=bool(kind % 2)))
    return "harmless"


def edit_config_known(path, rng):
    """Edits load must refuse: a module claimed twice alike, ignored by class or pattern, symmetric flipped,
    dynamic weights, a field compressed-tensors does not define, another quant_method."""
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    gname = sorted(qc["config_groups"])[0]
    group = qc["config_groups"][gname]
    kind = rng.integers(7)
    if kind == 0:
        qc["config_groups"] = {"copy": json.loads(json.dumps(group)), **qc["config_groups"]}
    elif kind == 1:
        qc["ignore"] = [*qc["ignore"], "Linear"]
    elif kind == 2:
        qc["ignore"] = [*qc["ignore"], "re:model\\.layers\\.0\\."]
    elif kind == 3:
        group["weights"]["symmetric"] = not group["weights"].get("symmetric", True)
    elif kind == 4:
        group["weights"]["dynamic"] = True
    elif kind == 5:
        group["weights"]["zero_point"] = 0
    else:
        qc["quant_method"] = "gptq"
    (path / "config.json").write_text(json.dumps(cfg))
    return "fails"


BROKEN_CONFIGS = [b"", b"[]", b'"config"', b"null", b"{\xff}", b"[" * 50_000 + b"]" * 50_000, b'{"quantization_config": 1',
                  b'{"quantization_config": {"config_groups": {"g": {"weights": {"num_bits": 1' + b"0" * 5000 + b"}}}}}"]


def break_config_file(path, rng):
    (path / "config.json").write_bytes(BROKEN_CONFIGS[rng.integers(len(BROKEN_CONFIGS))])
    return "fails"


def rewrite_tensors(path, fn):
    for f in safetensors_files(path):
        with Checkpoint(f) as ckpt:
            tensors = {name: src.read() for name, src in ckpt.tensors.items()}
            metadata = ckpt.metadata[f]
        if fn(tensors) is False:
            continue
        plans = [TensorPlan(n, a.dtype, a.shape) for n, a in tensors.items()]
        f.unlink()
        write_safetensors(f, plans, iter([tensors]), metadata)


def quantized_names(path):
    names = set()
    for f in safetensors_files(path):
        names |= set(entries(header_of(f.read_bytes())[1]))
    modules = quantized_modules(names)
    return sorted(n for n in names if module_of(n) in modules)


def change_shape(path, rng):
    names = quantized_names(path)
    target = names[rng.integers(len(names))]
    how = rng.integers(4)
    delta = int(rng.choice([-3, -1, 1, 2, 1000]))

    def edit(tensors):
        if target not in tensors:
            return False
        a = tensors[target]
        if a.ndim == 0 or a.size == 0:
            b = np.zeros((2,), a.dtype)
        elif target.endswith("weight_shape"):
            b = a.copy()
            b[rng.integers(a.size)] += delta
        elif how == 0:
            b = a[:-1]  # a row less
        elif how == 1 and a.ndim == 2:
            b = a[:, :-1]  # a column less
        elif how == 2:
            b = a.reshape(-1)  # flattened
        else:
            b = np.concatenate([a, a[:1]])  # a row more
        tensors[target] = np.ascontiguousarray(b)

    rewrite_tensors(path, edit)
    # npquant's symmetric codes are never stored as 0 (that is q = -2**(bits-1)): a weight_shape shrunk drops
    # codes with set bits, or leaves words over, and is always refused.
    shrunk = target.endswith("weight_shape") and delta < 0 and "asym" not in path.name
    return "fails" if shrunk else "either"


def shrink_weight_shape(path, rng):
    """in_features less by 1 to 3: the codes dropped have set bits (npquant's symmetric codes are never stored as
    0, that is q = -2**(bits-1)), or the words or scales no longer fit; asymmetric codes of 0 may be dropped."""
    names = [n for n in quantized_names(path) if n.endswith(".weight_shape")]
    if not names:
        return flip_data_byte(path, rng)
    target = names[rng.integers(len(names))]
    delta = int(rng.integers(1, 4))

    def edit(tensors):
        if target not in tensors:
            return False
        tensors[target] = tensors[target] - np.array([0, delta], tensors[target].dtype)

    rewrite_tensors(path, edit)
    return "either" if "asym" in path.name else "fails"


def change_dtype(path, rng):
    names = quantized_names(path)
    target = names[rng.integers(len(names))]
    dtypes = [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64, np.uint8, np.int8,
              ml_dtypes.float8_e4m3fn]

    def edit(tensors):
        if target not in tensors:
            return False
        a = tensors[target]
        dt = np.dtype(dtypes[rng.integers(len(dtypes))])
        if rng.integers(2):  # the values converted (inf where they overflow float16), the shape kept
            with np.errstate(all="ignore"):
                tensors[target] = a.astype(dt)
        else:  # the same bytes read as another dtype, flattened
            raw = a.reshape(-1).view(np.uint8)
            tensors[target] = raw[: raw.size // dt.itemsize * dt.itemsize].view(dt)

    rewrite_tensors(path, edit)
    return "either"


def edit_index(path, rng):
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    names = sorted(wm)
    kind = rng.integers(4)
    if kind == 0:
        index["weight_map"] = {}
        outcome = "fails"
    elif kind == 1:
        wm[names[rng.integers(len(names))]] = int(rng.integers(10))
        outcome = "fails"
    elif kind == 2:
        wm[f"model.extra{rng.integers(10)}.weight"] = wm[names[0]]
        outcome = "fails"
    else:
        name = names[rng.integers(len(names))]
        other = sorted(set(wm.values()) - {wm[name]})
        wm[name] = other[0]
        outcome = "fails"  # the tensor is in the other shard
    index_path.write_text(json.dumps(index))
    return outcome


MUTATIONS = [flip_header_byte, flip_data_byte, flip_data_byte, flip_data_byte, set_extreme_scale, set_extreme_scale,
             truncate_file, remove_file, replace_with_directory, edit_config_field, edit_config_field,
             edit_config_field, edit_config_harmlessly, edit_config_known, edit_config_known, edit_config_known,
             break_config_file, change_shape, change_shape, shrink_weight_shape, change_dtype]


# --- the check --------------------------------------------------------------------------------------------------
def decoded(tensors):
    """Everything a loaded checkpoint holds, for exact comparison, and each tensor's dequantized weight."""
    out = {}
    for name, qt in tensors.items():
        with np.errstate(all="ignore"):
            w = qt.dequantize()
        parts = [qt.codes, qt.scale, qt.zero_point, qt.global_scale, qt.perm]
        out[name] = (qt.shape, qt.scheme, [None if p is None else p.view(np.uint8).tobytes() for p in parts], w)
    return out


def check_mutant(path, expect, baseline, what):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # an overflow inside load is a check that was missed
            got = npquant.load(path)
    except NpquantError as exc:
        assert "\n" not in str(exc), (what, str(exc))
        assert expect != "harmless", f"{what}: a harmless mutation was refused: {exc}"
        return "refused"
    assert expect != "fails", f"{what}: loaded, but should have been refused"
    mine = decoded(got)
    for name, (_, _, _, w) in mine.items():
        assert w.dtype == np.float32 and np.isfinite(w).all(), f"{what}: {name} dequantizes to non-finite values"
    if expect == "harmless":
        assert sorted(mine) == sorted(baseline), what
        for name, (shape, scheme, parts, w) in mine.items():
            b_shape, b_scheme, b_parts, b_w = baseline[name]
            assert (shape, scheme, parts) == (b_shape, b_scheme, b_parts), f"{what}: {name} changed"
            np.testing.assert_array_equal(w, b_w, err_msg=what)
    return "loaded"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    out = {}
    for sharded in (False, True):
        source = root / ("source-sharded" if sharded else "source")
        write_source(source, sharded)
        for scheme in SHARDED if sharded else SCHEMES:
            name = f"{scheme}{'-sharded' if sharded else ''}"
            npquant.quantize_checkpoint(source, root / name, scheme)
            out[name] = root / name
    return out


def test_mutated_checkpoints_raise_or_load_finite(checkpoints, tmp_path):
    rng = np.random.default_rng(SEED)
    outcomes = {"refused": 0, "loaded": 0}
    expected = {"harmless": 0, "fails": 0, "either": 0}
    for name, base in checkpoints.items():
        baseline = decoded(npquant.load(base))
        assert baseline and all(np.isfinite(w).all() for *_, w in baseline.values())
        mutations = MUTATIONS + ([edit_index] * 4 if "sharded" in name else [])
        for k in range(MUTANTS_PER_CHECKPOINT):
            mutant = tmp_path / f"{name}-{k}"
            shutil.copytree(base, mutant)
            mutation = mutations[rng.integers(len(mutations))]
            expect = mutation(mutant, rng)
            expected[expect] += 1
            outcomes[check_mutant(mutant, expect, baseline, f"{name} mutant {k} ({mutation.__name__})")] += 1
            shutil.rmtree(mutant)
    # The mutants exercise both outcomes and every kind of expectation (fixed by the seed).
    assert min(outcomes.values()) > 20 and min(expected.values()) > 20, (outcomes, expected)
