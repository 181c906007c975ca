"""The package's import graph: no cycles, and no import from a lower layer to a higher one.

Every ``import`` statement in ``slim_kernels/`` is read from the source (the ones inside
functions too, so a lazy import cannot hide an upward arrow) and resolved to a module of the
package. Layers, bottom to top (a module may import its own layer or lower ones):

0. config, routing, cluster_sync, provenance, reference, _version, _build   (and ``_C``)
1. ops (the op boundary, dispatch, the backends)
2. layer, and its parts: base_layers, clusters, tracking
3. integrations
4. demo, bench, quickstart, peft (a re-export of integrations.peft)
5. cli, and the package's ``__init__`` (the public API)
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "slim_kernels"

LAYERS = [
    {"config", "routing", "cluster_sync", "provenance", "reference", "_version", "_build", "_C"},
    {"ops"},
    {"layer", "base_layers", "clusters", "tracking"},
    {"integrations"},
    {"demo", "bench", "quickstart", "peft"},
    {"cli", "__init__"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known) -> set:
    """Modules of the package that ``name`` imports (resolved against ``known``)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule; ``from mod import func``, mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        for t in targets:
            if t == "slim_kernels" or t.startswith("slim_kernels."):
                # the longest known module that t names (``from .x import func`` -> .x)
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                # a module's own parent packages are imported before it by Python itself
                if t in known and t != name and not name.startswith(t + "."):
                    out.add(t)
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    key = "__init__" if len(parts) == 1 else parts[1]
    for i, group in enumerate(LAYERS):
        if key in group:
            return i
    raise AssertionError(f"module {name} is in no layer of tests/test_architecture.py: "
                         f"place it in LAYERS")


def _graph():
    mods = _modules()
    return {n: _imports(n, p, mods) for n, p in mods.items()}


def test_every_module_has_a_layer():
    for name in _graph():
        _layer(name)


def test_no_upward_imports():
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            # a package's __init__ importing its own submodules is how packages work; a
            # submodule importing its package's __init__ back would be the cycle
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_planted_cycle_and_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import is found."""
    fake = tmp_path / "slim_kernels"
    (fake / "ops").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "ops" / "__init__.py").write_text("from ..layer import X\n")
    (fake / "layer.py").write_text("from .ops import Y\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake, raising=False)
    global PKG
    old, PKG = PKG, fake
    try:
        g = _graph()
        assert "slim_kernels.layer" in g["slim_kernels.ops"]
        assert "slim_kernels.ops" in g["slim_kernels.layer"]
        up = [(a, b) for a, d in g.items() for b in d if _layer(b) > _layer(a)]
        assert ("slim_kernels.ops", "slim_kernels.layer") in up
    finally:
        PKG = old
