"""Mixed precision under a size budget: one scheme per layer, least summed cost, bytes within the budget.

The problem is a multiple-choice knapsack: layer ``l`` takes exactly one
option ``k`` of ``bytes[l][k]`` bytes and predicted cost ``cost[l][k]``;
minimise the summed cost with the summed bytes at most ``budget``.
:func:`solve_budget` solves it exactly by dynamic programming over the
Pareto frontier of ``(bytes, cost)`` of the layers seen so far: a partial
choice survives only if no other uses at most its bytes for less cost, so
the optimum is never dropped, and the frontier stays small because layers
of the same shape share byte counts. Nothing here prints; :func:`read_plan`
and :func:`write_plan` handle ``plan.json`` (schema in the README).

Everything that can be refused without measuring is refused first, from
shapes alone: :func:`layer_bytes` gives each option's exact bytes,
:func:`budget_bytes` turns ``bits`` or ``size`` into bytes, and
:func:`check_budget` refuses a budget below the smallest plan (every layer
at its cheapest candidate) before any layer is measured;
:func:`check_plan_path` refuses an output path that cannot be written.

>>> solve_budget([[0.0, 1.0], [0.0, 5.0]], [[8, 4], [8, 4]], 12)
[1, 0]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import NpquantError
from .schemes import Scheme, get_scheme

__all__ = ["solve_budget", "layer_bytes", "budget_bytes", "check_budget", "fused_units", "PLAN_VERSION", "PLAN_METHODS",
           "DEFAULT_CANDIDATES", "DECODER_CANDIDATES", "DEFAULT_COST_TOKENS", "read_plan", "write_plan", "check_plan_path", "plan_schemes"]

#: Candidate presets of ``npquant plan``: w4-g128, w4-g32, w8-channel and fp8-channel, plus the two
#: 4-bit steps between them (w4-g128-asym at 4.31 bits, w4-g64 at 4.5). With them the 5-bit MiniLM
#: plan keeps 0.9947 mean cosine on held-out text, 0.9929 without.
DEFAULT_CANDIDATES = ("w4-g128", "w4-g128-asym", "w4-g64", "w4-g32", "w8-channel", "fp8-channel")
#: Candidate presets of ``npquant plan`` on a decoder, from 4.06 to 8.06 bits per weight (w4-g128 only where
#: 128 divides ``in_features``; SmolLM2's 576 does not). fp8-channel, as large as w8-channel, is left to
#: ``--schemes``: each candidate costs a run of the model from every unit's layer on.
DECODER_CANDIDATES = ("w4-channel", "mxfp4", "w4-g128", "w4-g64", "nvfp4", "w4-g32", "w8-channel")
#: Calibration tokens a decoder's costs are measured on, by default (:mod:`npquant.models.sensitivity_lm`).
DEFAULT_COST_TOKENS = 128
#: The ``version`` of the plan.json schema this module writes and reads.
PLAN_VERSION = 1
#: The methods a plan may record: what ``quantize --plan`` and ``eval --plan`` run (its ``cost_method``: how the
#: costs were measured, RTN or GPTQ).
PLAN_METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# A plan.json larger than this is not one of npquant's (a large model's is a few hundred KiB).
_PLAN_MAX_BYTES = 64 << 20
# Shards vLLM fuses into one module (a leaf module name -> the fused module's name): Llama-family q/k/v and
# gate/up, BERT's query/key/value. vLLM requires the shards of one fused module to share one scheme.
_FUSED_SHARDS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                 "query": "qkv_proj", "key": "qkv_proj", "value": "qkv_proj"}
# Partial choices kept per layer at most: past this the frontier is thinned evenly (never the cheapest end).
_MAX_FRONTIER = 1 << 20


def solve_budget(costs, sizes, budget: int) -> list[int]:
    """The option per layer of least summed cost whose summed bytes are at most ``budget``.

    Parameters
    ----------
    costs : L lists of floats, ``costs[l][k]`` the predicted cost of option ``k`` for layer ``l``
    sizes : L lists of non-negative ints, the bytes of the same options
    budget : int, bytes

    Returns
    -------
    list of L ints: the chosen option of each layer. Among optima, the one
    with fewer bytes. Raises :class:`NpquantError` when even the smallest
    options exceed the budget.
    """
    if len(costs) != len(sizes):
        raise NpquantError(f"costs has {len(costs)} layers but sizes has {len(sizes)}")
    if not costs:
        return []
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise NpquantError(f"budget must be a non-negative int of bytes, got {budget!r}")
    smallest = 0
    for layer, (c, s) in enumerate(zip(costs, sizes)):
        if len(c) != len(s) or not c:
            raise NpquantError(f"layer {layer}: {len(c)} costs and {len(s)} sizes; each layer needs one of each per option")
        if not all(math.isfinite(float(v)) for v in c):
            raise NpquantError(f"layer {layer}: costs must be finite, got {list(c)}")
        if any(int(v) != v or v < 0 for v in s):
            raise NpquantError(f"layer {layer}: sizes must be non-negative integers of bytes, got {list(s)}")
        smallest += min(int(v) for v in s)
    if smallest > budget:
        raise NpquantError(f"the budget of {budget:,} bytes is below the smallest choice for every layer ({smallest:,} bytes)")

    # Frontier: arrays sorted by bytes, cost strictly decreasing; parent index and option per stage.
    f_bytes = np.zeros(1, np.int64)
    f_cost = np.zeros(1, np.float64)
    parents, options = [], []
    rest_min = np.cumsum([min(int(v) for v in s) for s in sizes][::-1])[::-1].tolist() + [0]
    for layer, (c, s) in enumerate(zip(costs, sizes)):
        cand_bytes = (f_bytes[:, None] + np.asarray(s, np.int64)[None, :]).ravel()  # (F * K,)
        cand_cost = (f_cost[:, None] + np.asarray(c, np.float64)[None, :]).ravel()
        k = len(c)
        cand_parent = np.repeat(np.arange(f_bytes.size), k)
        cand_option = np.tile(np.arange(k), f_bytes.size)
        fits = cand_bytes + rest_min[layer + 1] <= budget  # the later layers' smallest options must still fit
        cand_bytes, cand_cost, cand_parent, cand_option = (a[fits] for a in (cand_bytes, cand_cost, cand_parent, cand_option))
        order = np.lexsort((cand_cost, cand_bytes))  # by bytes, then cost
        cand_bytes, cand_cost, cand_parent, cand_option = (a[order] for a in (cand_bytes, cand_cost, cand_parent, cand_option))
        # Keep a candidate only if it is strictly cheaper than every candidate with fewer or equal bytes.
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], cand_cost[:-1]]))
        keep = cand_cost < best_before
        f_bytes, f_cost = cand_bytes[keep], cand_cost[keep]
        parent, option = cand_parent[keep], cand_option[keep]
        if f_bytes.size > _MAX_FRONTIER:  # pathological instances only; stays feasible, may lose exactness
            pick = np.unique(np.linspace(0, f_bytes.size - 1, _MAX_FRONTIER).astype(np.int64))
            f_bytes, f_cost, parent, option = f_bytes[pick], f_cost[pick], parent[pick], option[pick]
        parents.append(parent)
        options.append(option)
    best = int(np.argmin(f_cost))  # first minimum: the fewest bytes among equal costs
    chosen = []
    for layer in range(len(costs) - 1, -1, -1):
        chosen.append(int(options[layer][best]))
        best = int(parents[layer][best])
    return chosen[::-1]


def fused_units(names) -> dict[str, list[str]]:
    """``{unit: [weight names]}``: the weights that must share one scheme, as vLLM fuses them; others alone.

    vLLM runs a Llama-family layer's ``q_proj``, ``k_proj``, ``v_proj`` as one
    ``qkv_proj`` and ``gate_proj``, ``up_proj`` as one ``gate_up_proj`` (BERT's
    ``query``, ``key``, ``value`` as one ``qkv_proj``), and refuses a
    checkpoint whose fused shards carry different schemes. A plan therefore
    chooses one scheme per unit. Units keep the order of their first weight.

    >>> fused_units(["l.0.self_attn.q_proj.weight", "l.0.self_attn.k_proj.weight", "l.0.self_attn.o_proj.weight"])
    {'l.0.self_attn.qkv_proj': ['l.0.self_attn.q_proj.weight', 'l.0.self_attn.k_proj.weight'], 'l.0.self_attn.o_proj': ['l.0.self_attn.o_proj.weight']}
    """
    units: dict[str, list[str]] = {}
    for name in names:
        module = name.removesuffix(".weight")
        parent, _, leaf = module.rpartition(".")
        fused = _FUSED_SHARDS.get(leaf)
        units.setdefault(f"{parent}.{fused}" if fused and parent else module, []).append(name)
    return units


# --- before measuring: bytes from shapes ----------------------------------------------------
def layer_bytes(shape: tuple[int, int], scheme: Scheme | str) -> int | None:
    """Exact bytes of a ``shape (O, I)`` weight under ``scheme``, from the shape alone; None if it does not fit.

    Codes ``O * ceil(I * bits / 8)``, scales ``n_blocks * scale bytes``, a
    zero point byte per block when asymmetric, 4 for NVFP4's global scale:
    what :attr:`QuantizedTensor.nbytes` counts (a test checks every preset).
    None when the scheme's group size does not divide ``I``.

    >>> layer_bytes((384, 1536), "w4-g128"), layer_bytes((384, 1536), "w8-channel"), layer_bytes((8, 96), "w4-g64")
    (313344, 591360, None)
    """
    from .tensor import scale_numpy_dtype

    scheme = get_scheme(scheme)
    out_features, in_features = (int(d) for d in shape)
    if scheme.granularity == "group" and in_features % scheme.group_size:
        return None
    n_blocks = math.prod(scheme.scale_shape((out_features, in_features)))
    total = out_features * -(-in_features * scheme.bits // 8) + n_blocks * scale_numpy_dtype(scheme).itemsize
    total += 0 if scheme.symmetric else n_blocks
    total += 4 if scheme.global_scale else 0
    return total


def budget_bytes(layers, *, bits: float | None = None, size: int | None = None) -> int:
    """A budget in bytes from ``bits`` per weight over ``layers`` (``{name: (O, I)}``) or ``size`` bytes.

    Exactly one of ``bits`` (a positive finite number) or ``size`` (a
    positive int) is given. ``bits`` gives ``floor(bits * weights / 8)``.

    >>> budget_bytes({"a": (384, 1536)}, bits=4.5), budget_bytes({}, size=1000)
    (331776, 1000)
    """
    if (bits is None) == (size is None):
        raise NpquantError("give the budget as bits per weight or as a size in bytes, exactly one of them")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise NpquantError(f"size must be a positive number of bytes, got {size!r}")
        return int(size)
    if isinstance(bits, bool) or not isinstance(bits, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(bits) and bits > 0):
        raise NpquantError(f"bits must be a positive number of bits per weight, got {bits!r}")
    weights = sum(int(o) * int(i) for o, i in layers.values())
    return int(math.floor(bits * weights / 8))


def check_budget(layers, candidates, budget: int, units=None) -> dict[str, dict[str, int]]:
    """Each layer's bytes per fitting candidate; refuses a budget no plan meets, before anything is measured.

    Parameters
    ----------
    layers : ``{name: (O, I)}`` the layers to plan
    candidates : ``{label: Scheme or preset name}``
    budget : int, bytes (see :func:`budget_bytes`)
    units : ``{unit: [names]}`` (e.g. :func:`fused_units`) whose layers share one scheme, or None (each alone)

    Returns
    -------
    ``{name: {label: bytes}}`` for the candidates that fit each layer (with
    ``units``, that fit every layer of its unit).
    Raises :class:`NpquantError` when a layer fits no candidate, or when
    even the smallest plan (every layer at its cheapest candidate) exceeds
    ``budget``, saying how small the budget may be.

    >>> check_budget({"a": (384, 1536)}, {"w4-g128": "w4-g128"}, 1000)
    Traceback (most recent call last):
    ...
    npquant.errors.NpquantError: the budget of 1,000 bytes (0.01 bits per weight) is below the smallest plan, 313,344 bytes (4.25 bits per weight, every layer at its smallest candidate): raise the budget to at least 4.25 bits per weight, or add smaller schemes to the candidates
    """
    if not candidates:
        raise NpquantError("give at least one candidate scheme")
    schemes = {label: get_scheme(s) for label, s in candidates.items()}
    if not layers:
        raise NpquantError("there are no layers to plan")
    sizes: dict[str, dict[str, int]] = {}
    for name, shape in layers.items():
        fits = {label: layer_bytes(shape, sch) for label, sch in schemes.items()}
        sizes[name] = {label: n for label, n in fits.items() if n is not None}
        if not sizes[name]:
            raise NpquantError(f"no candidate scheme fits layer {name!r} {tuple(shape)} (no group size divides "
                               f"{shape[1]}); add a channel scheme to the candidates")
    grouped = {unit: list(members) for unit, members in (units or {}).items()}
    covered = [n for members in grouped.values() for n in members]
    stray = [n for n in covered if n not in layers]
    if stray or len(covered) != len(set(covered)) or any(not m for m in grouped.values()):
        what = f"names {stray[0]!r}, not a layer to plan" if stray else "lists a layer twice, or a unit with none"
        raise NpquantError(f"units {what}: each layer belongs to one unit at most")
    covered = set(covered)
    grouped.update({n: [n] for n in layers if n not in covered})
    for unit, members in grouped.items():
        common = set.intersection(*(set(sizes[n]) for n in members))
        if not common:
            raise NpquantError(f"no candidate scheme fits every layer of {unit!r} ({', '.join(members)}), which "
                               f"share one scheme; add a channel scheme to the candidates")
        for n in members:
            sizes[n] = {label: b for label, b in sizes[n].items() if label in common}
    weights = sum(int(o) * int(i) for o, i in layers.values())
    smallest = sum(min(sum(sizes[n][label] for n in members) for label in sizes[members[0]])
                   for members in grouped.values())
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise NpquantError(f"budget must be a non-negative int of bytes, got {budget!r}")
    if smallest > budget:
        need = math.ceil(8 * smallest / weights * 100) / 100  # rounded up, so that the figure given is enough
        raise NpquantError(
            f"the budget of {budget:,} bytes ({8 * budget / weights:.2f} bits per weight) is below the smallest plan, "
            f"{smallest:,} bytes ({8 * smallest / weights:.2f} bits per weight, every layer at its smallest "
            f"candidate): raise the budget to at least {need:.2f} bits per weight, or add smaller schemes to the "
            f"candidates"
        )
    return sizes


# --- plan.json ------------------------------------------------------------------------------
def check_plan_path(path) -> Path:
    """Refuse a plan output path that cannot be written, before any work: return it as a Path.

    Refused: a parent folder that is missing, a file, or read-only; a path
    that is a directory, a link or any other non-regular file; an existing
    file that is not an npquant plan (only a plan is replaced).
    """
    import stat

    from .checkpoints.output_dir import check_parent

    path = Path(path)
    check_parent(path, "plan")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise NpquantError(f"cannot write plan {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "a link" if stat.S_ISLNK(st.st_mode) else "not a file"
        raise NpquantError(f"cannot write plan {path}: it is {what}; give a file name such as plan.json")
    try:
        if st.st_size > _PLAN_MAX_BYTES:
            raise ValueError
        old = json.loads(path.read_bytes().decode("utf-8"))
        if not (isinstance(old, dict) and "version" in old and isinstance(old.get("layers"), dict)):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise NpquantError(f"cannot write plan {path}: a file that is not an npquant plan is there; npquant "
                           f"replaces only its own plans: remove it or choose another name") from None
    return path


def write_plan(path, plan: dict) -> None:
    """Write ``plan`` as JSON to ``path`` atomically (a temporary name beside it, then a rename).

    ``path`` is checked first (:func:`check_plan_path`); a failed write
    raises :class:`NpquantError` naming ``path`` and leaves neither a
    partial plan nor the temporary file.
    """
    path = check_plan_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise NpquantError(f"cannot write plan {path}: {exc.strerror or exc}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a plan reads like any new file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(plan, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise NpquantError(f"cannot write plan {path}: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_plan(path) -> dict:
    """Read and check a plan.json: ``version``, ``layers`` with a known scheme each, numbers where numbers go."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NpquantError(f"--plan {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NpquantError(f"--plan {path} is not a JSON file: {exc}") from None
    if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
        got = plan.get("version") if isinstance(plan, dict) else type(plan).__name__
        raise NpquantError(f"--plan {path} is not an npquant plan (version {PLAN_VERSION} expected, got {got!r})")
    layers = plan.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise NpquantError(f"--plan {path}: 'layers' must map layer names to their scheme")
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("scheme"), str):
            raise NpquantError(f"--plan {path}: layer {name!r} needs a 'scheme' string, got {entry!r}")
        try:
            get_scheme(entry["scheme"])
        except NpquantError as exc:
            raise NpquantError(f"--plan {path}: layer {name!r}: {exc}") from None
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise NpquantError(f"--plan {path}: layer {name!r} needs 'shape' [out, in] of positive ints, got {shape!r}")
    if plan.get("method", "rtn") not in PLAN_METHODS:
        raise NpquantError(f"--plan {path}: method must be one of {', '.join(map(repr, PLAN_METHODS))}, got "
                           f"{plan.get('method')!r}")
    return plan


def plan_schemes(plan: dict) -> dict[str, Scheme]:
    """``{layer name: Scheme}`` of a plan read by :func:`read_plan`."""
    return {name: get_scheme(entry["scheme"]) for name, entry in plan["layers"].items()}
