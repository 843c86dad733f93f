"""The package's layers depend in one direction, and no edgecompile module imports another in a cycle.

Every import of an edgecompile module counts, at module level or inside a function."""

import ast
from pathlib import Path

import pytest

import edgecompile

ROOT = Path(edgecompile.__file__).parent

# lowest first: a module may import its own layer and the layers below it, never one above
LAYERS = [
    {"edgecompile", "errors", "atomic", "metrics", "jsonutil", "digest", "choices"},
    {"coremltools_loader"},  # the one module that imports coremltools
    {"model"},
    {"deploy"},  # with the package's I/O contract and the text-layout helpers
    {"compress"},
    {"coreai"},  # the Core AI target: conversion to .aimodel and Apple's runtime (read by coreml's package views)
    {"coreml"},  # the targets: conversion, package I/O, verification
    {"export_report"},
    {"bench"},
    {"commands", "export"},  # one module per command; export.py: the public Python API in one import
    {"cli", "cli_params", "__main__"},  # __main__: the command, which imports the CLI after taking over signals
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "edgecompile"
    return next(i for i, names in enumerate(LAYERS) if key in names)


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "edgecompile":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "edgecompile")
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_every_module_has_a_layer():
    for module in imports():
        layer_of(module)


def test_imports_go_down_the_layers():
    wrong = [f"{a} imports {b}" for a, targets in imports().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not wrong, "imports against the layers: " + "; ".join(sorted(wrong))


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_only_the_loader_imports_coremltools():
    importers = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "coremltools" for n in names):
                importers.append(module_name(path))
    assert set(importers) == {"edgecompile.coremltools_loader"}, importers


def test_the_checker_sees_a_cycle_and_an_upward_import(monkeypatch):
    """The tests above can fail: a synthetic graph with a cycle and an upward import is caught."""
    graph = {"edgecompile.model.a": {"edgecompile.export"}, "edgecompile.export": {"edgecompile.model.a"}}
    monkeypatch.setitem(globals(), "imports", lambda: graph)
    with pytest.raises(AssertionError, match="edgecompile.model.a imports edgecompile.export"):
        test_imports_go_down_the_layers()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
