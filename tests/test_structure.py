"""The package's import graph has no cycle: data flows one way (see the layout in the project's style notes).

Every ``.py`` under ``src/npquant`` is read with :mod:`ast`, and every import
of an npquant module is an edge, wherever it stands: at module level, inside
a function (a lazy import still ties the two modules together), under ``if``.

- ``import npquant.a.b`` and ``from npquant.a import b`` (or ``from .a import b``
  from inside the package) import the module ``npquant.a.b`` when ``b`` is one;
  ``from .a import name`` of anything else imports ``npquant.a``.
- Importing ``npquant.a.b`` first runs the package ``npquant.a`` (its
  ``__init__``), so that is an edge too, unless the importer sits inside
  ``npquant.a`` (the package is then loaded already, or loading, and its
  submodules are its own business).
- A package's ``__init__`` that imports its submodules is an edge like any
  other; a submodule that takes a name from its parent's ``__init__``
  (``from . import name``, ``name`` no module) closes a cycle with it, and is
  reported.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is package)}`` for every ``.py`` under ``src / package``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b", "a"]``."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]


def _owning_module(name: str, modules) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (None if no prefix is)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(src: Path, package: str) -> dict[str, dict[str, tuple[Path, int]]]:
    """``{importer: {imported: (file, line of the first such import)}}`` over the modules of ``package``."""
    modules = module_files(src, package)
    graph: dict[str, dict[str, tuple[Path, int]]] = {name: {} for name in modules}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]  # the package relative imports start from
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # ``from source import x``: the submodule ``source.x`` where it is one, else ``source`` itself
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                target = _owning_module(target, modules)
                if target is None:
                    continue  # not npquant
                inside = {name, *_ancestors(name)}
                # the module itself, then each package that runs first, outside the importer's own packages
                for imported in [target] + [p for p in _ancestors(target) if p not in inside]:
                    if imported != name:
                        graph[name].setdefault(imported, (path, node.lineno))
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph`` (sorted walk, so the same one each run), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def describe(cycle: list[str], graph, src: Path) -> str:
    """The cycle on one line, then each edge with the file and line that makes it."""
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        path, line = graph[a][b]
        lines.append(f"  {a} imports {b} at {path.relative_to(src.parent)}:{line}")
    return "\n".join(lines)


def test_npquant_has_no_import_cycle():
    graph = import_graph(SRC, "npquant")
    assert len(graph) > 40 and "npquant.kernels" in graph["npquant.linear"]  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in src/npquant:\n" + describe(cycle, graph, SRC)


# --- the walker, on small packages made for the purpose -----------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_function_level_import_closes_a_cycle(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    from .a import g\n    return g\n",
    })
    graph = import_graph(src, "pkg")
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert "pkg/b.py:2" in describe(find_cycle(graph), graph, src)


def test_a_submodule_taking_a_name_from_its_parent_init_is_a_cycle(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from ._impl import run\nLIMIT = 4\n",
        "sub/_impl.py": "from . import LIMIT\n\ndef run():\n    return LIMIT\n",
    })
    graph = import_graph(src, "pkg")
    assert find_cycle(graph) == ["pkg.sub", "pkg.sub._impl", "pkg.sub"]


def test_sibling_submodules_and_from_package_import_submodule_are_no_cycle(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "from . import sub\n",
        "sub/__init__.py": "from . import _a, _b\n",
        "sub/_a.py": "from . import _b\nfrom .. import base\n",
        "sub/_b.py": "import pkg.base\n",
        "base.py": "import numpy as np\n",
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg.sub._a"].keys() == {"pkg.sub._b", "pkg.base"}
    assert find_cycle(graph) is None


def test_importing_a_submodule_runs_its_package_first(tmp_path):
    # engine imports sub._fast; sub's __init__ imports engine: a cycle through sub's __init__
    src = _package(tmp_path, {
        "__init__.py": "",
        "engine.py": "def run():\n    from .sub._fast import kernel\n",
        "sub/__init__.py": "from ..engine import run\n",
        "sub/_fast.py": "",
    })
    graph = import_graph(src, "pkg")
    assert graph["pkg.engine"].keys() == {"pkg.sub._fast", "pkg.sub"}
    assert find_cycle(graph) == ["pkg.engine", "pkg.sub", "pkg.engine"]


def test_from_package_import_a_name_is_an_import_of_the_package(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "from .enc import Encoder\n",
        "models/enc.py": "from ..calib import drive\nclass Encoder: ...\n",
        "calib.py": "from .models import Encoder\ndef drive(): ...\n",
    })
    graph = import_graph(src, "pkg")
    assert "pkg.models" in graph["pkg.calib"]
    assert find_cycle(graph) == ["pkg.calib", "pkg.models", "pkg.models.enc", "pkg.calib"]
