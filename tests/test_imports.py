"""The package's import graph: no cycles, and the lower layers import nothing above them.

How the graph is built (static, from the source; nothing is imported):
- Every `engram/**/*.py` is parsed with `ast`, and EVERY import statement counts: module level,
  inside functions (lazy imports), and under `if TYPE_CHECKING:`. A lazy import only hides a
  cycle from the interpreter's import order, and a type-only import is still a dependency of the
  design; both would let a lower layer grow a hold on a higher one, so neither is exempt.
- `from X import Y` is an edge to `X.Y` when that is a module, else to `X`; relative imports are
  resolved against the importing module's package; an edge to a name that is not a module of the
  package goes to its longest prefix that is.
- Importing `a.b.c` runs `a/b/__init__.py` first, so an edge to `a.b.c` also counts as an edge to
  the package `a.b` (that is how `engram.store` -> `engram.store.export` -> `engram.parallel` ->
  `engram.store.sharded` was a real cycle). Two exceptions: the importing module's own ancestors
  (Python has them initialised, partially, while it imports their submodules), and the root
  `engram` package: its `__init__` is the public facade that re-exports everything, so every
  module would otherwise sit in one cycle with it. An explicit `from engram import X` inside the
  package still counts.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "engram"
ROOT = "engram"


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of the package that `name` (a module or an attribute of one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_names(module: str, path: Path) -> Iterable[str]:
    """Every engram.* name imported anywhere in the file (top level, functions, TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for a in node.names:
                sub = f"{name}.{a.name}"
                yield sub if sub in MODULES else name


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (see the module docstring for the rules)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name in _imported_names(module, path):
            if name != ROOT and not name.startswith(ROOT + "."):
                continue
            target = _resolve(name)
            if target is None or target == module:
                continue
            graph[module].add(target)
            parent = target.rpartition(".")[0]
            while parent and parent != ROOT:
                if parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for comp in components:  # a shortest path from comp[0] back to itself, inside the component
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        v = prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    seen.discard(start)
    return seen


# What each lower layer may import from the package, directly or through what it imports.
# A name ending in ".*" allows the package and all its submodules.
STORE_LOWER = {
    "engram.store.*": "the store package itself (tiers, table files)",
    "engram.atomic": "crash-safe file writes, a leaf",
    "engram.rowadam": "the row-wise Adam update that stores without a parameter apply, a leaf",
    "engram.hashing": "row addressing, a leaf (a store may key rows by hash)",
    "engram._ext": "loads the optional C extensions with ctypes, a leaf",
}
ALLOWED_LOWER: dict[str, dict[str, str]] = {
    "engram.store.*": STORE_LOWER,
    "engram.hashing": {  # the multiplicative-XOR hash itself: numpy and torch only, and ...
        "engram._ext": "... its optional C kernel, loaded by a leaf",
    },
    "engram.compress": {"engram.atomic": "writes its lookup table crash-safely, a leaf"},
    "engram.layer": {
        **STORE_LOWER,
        "engram.config": "the EngramConfig dataclass the layer is built from",
        "engram.addressing": "the addressing modes EngramConfig validates against, a leaf",
    },
}
# Third-party packages the store layer may use (besides the standard library).
STORE_THIRD_PARTY = {"numpy", "torch", "safetensors"}


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return module == pattern


GRAPH = import_graph()


def test_the_graph_sees_the_package() -> None:
    assert {"engram.store.mmap", "engram.train", "engram.layer", "engram.rowadam"} <= set(GRAPH)
    assert "engram.store.tablefile" in GRAPH["engram.store.mmap"]
    assert "engram.store" in GRAPH["engram.layer"]  # implicit: engram.store.base runs it


def test_finds_a_cycle_when_there_is_one() -> None:
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(ALLOWED_LOWER))
def test_lower_layers_import_nothing_above_them(layer: str) -> None:
    allowed = ALLOWED_LOWER[layer]
    bad = []
    for module in sorted(m for m in GRAPH if _matches(m, layer)):
        for dep in sorted(reachable(GRAPH, module)):
            if not (_matches(dep, layer) or any(_matches(dep, a) for a in allowed)):
                bad.append(f"{module} -> {dep}")
    assert not bad, f"{layer} reaches modules above it:\n" + "\n".join(bad)


def test_the_store_uses_only_the_standard_library_numpy_torch_and_safetensors() -> None:
    bad = []
    for module, path in MODULES.items():
        if not _matches(module, "engram.store.*"):
            continue
        for name in _imported_names(module, path):
            top = name.partition(".")[0]
            known = top in sys.stdlib_module_names or top in STORE_THIRD_PARTY
            if top and top != ROOT and not known:
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


def test_train_imports_nothing_from_parallel() -> None:
    deps = {d for d in GRAPH["engram.train"] if _matches(d, "engram.parallel.*")}
    assert not deps, f"engram.train imports {sorted(deps)}"
