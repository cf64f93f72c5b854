"""The package's layering, read from its own imports (ast; imports inside functions included):
core imports no layer above it and no MLX, torch, click or rich; the torch backend never reaches MLX and
the MLX backend never reaches torch; only cli/ imports click; no module imports a layer above its own;
and there is no import loop."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PKG = Path(importlib.util.find_spec("mlx_mistral").origin).parent

# Layers, bottom up, and the package prefixes each may import (besides itself and the layers below it).
LAYERS = [
    ("core", ["mlx_mistral.core"]),
    ("backends", ["mlx_mistral.backends"]),
    ("ui", ["mlx_mistral.ui"]),
    ("export", ["mlx_mistral.export"]),
    ("recipes", ["mlx_mistral.recipes"]),
    ("cli", ["mlx_mistral.cli"]),
]
MAY_IMPORT = {  # layer -> internal layers it may import
    "core": {"core"},
    "backends": {"core", "backends"},
    "ui": {"ui"},
    "export": {"core", "backends", "export"},
    "recipes": {"core", "backends", "export", "ui", "recipes"},
    "cli": {"core", "backends", "export", "ui", "recipes", "cli", "top"},
    "top": set(),  # mlx_mistral/__init__.py: names are imported lazily, by module path (checked below)
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def layer(mod: str) -> str:
    if mod == "mlx_mistral":
        return "top"
    return mod.split(".")[1]


def imports(mod: str) -> set[str]:
    """Every module `mod` imports, anywhere in its body: package modules by full name, others by their
    top-level name."""
    path = MODULES[mod]
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.add(a.name if a.name.startswith("mlx_mistral") else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if not target.startswith("mlx_mistral"):
                out.add(target.split(".")[0])
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in MODULES else target)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def reach(mod: str) -> set[str]:
    """Everything `mod` imports, directly or through other modules of the package."""
    seen, todo = set(), [mod]
    while todo:
        for t in GRAPH.get(todo.pop(), ()):
            if t not in seen:
                seen.add(t)
                if t in MODULES:
                    todo.append(t)
    return seen


def test_the_graph_is_read():
    assert len(MODULES) > 40
    assert "mlx_mistral.core.weights" in GRAPH["mlx_mistral.backends.mlx.loader"]
    assert "mlx" in GRAPH["mlx_mistral.backends.mlx.model"] and "click" in GRAPH["mlx_mistral.cli.train"]
    assert "mlx_mistral.recipes.finetune" in GRAPH["mlx_mistral.cli.train"]  # a function-level import


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_imports_a_layer_it_may_not(mod):
    bad = sorted(t for t in GRAPH[mod] if t in MODULES and layer(t) not in MAY_IMPORT[layer(mod)] | {layer(mod)})
    assert not bad, f"{mod} ({layer(mod)}) imports {bad}"


def test_only_cli_imports_click():
    assert sorted(m for m, ts in GRAPH.items() if "click" in ts and layer(m) != "cli") == []


def test_core_reaches_no_backend_library_nor_ui():
    for mod in (m for m in MODULES if layer(m) == "core"):
        assert not reach(mod) & {"mlx", "torch", "click", "rich"}, mod


def test_torch_backend_never_reaches_mlx():
    for mod in (m for m in MODULES if m.startswith("mlx_mistral.backends.torch")):
        got = reach(mod)
        assert "mlx" not in got and not any(t.startswith("mlx_mistral.backends.mlx") for t in got), mod


def test_mlx_backend_reaches_torch_only_through_the_blas_preload():
    """backends/_blas.py imports torch before OpenBLAS on purpose (see its docstring); nothing else does."""
    for mod in (m for m in MODULES if m.startswith("mlx_mistral.backends.mlx")):
        reached = {m for m in reach(mod) | {mod} if m in MODULES} - {"mlx_mistral.backends._blas"}
        assert [m for m in reached if "torch" in GRAPH[m]] == [], mod


def test_the_top_level_imports_nothing_eagerly():
    tree = ast.parse(MODULES["mlx_mistral"].read_text())
    eager = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert eager == ["from __future__ import annotations", "import importlib"]


def test_no_import_loops():
    """Tarjan's strongly connected components over the package's modules: each one alone."""
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in MODULES or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert loops == []
    assert not [m for m in GRAPH if m in GRAPH[m]]
