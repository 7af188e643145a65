"""The package's import graph keeps its layers (LAYERS): imports only go down, so there is no import circle, the
leaves import nothing of the package and the measuring tools (tools/) are imported by the command line alone.
Every import counts, function-level ones too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "parallel_yolo"
LAYERS = {
    "errors": 0, "_internals": 0,
    "urls": 1, "_torch_internals": 1, "_ultralytics_internals": 1,
    "config": 2, "monitor": 2,
    "launch": 3, "optim": 3,
    "data": 4, "tasks": 4,
    "checkpoint": 5,
    "strategies": 6,
    "engine": 7,
    "tools": 8,
    "cli": 9,
    "__main__": 10, "": 10,
}
"""The package's layers, lowest first (parallel_yolo/__init__.py says what each holds): a module imports from its
own subpackage or from a lower layer, never from its own layer's other subpackages or from above."""


def layer(module: str) -> str:
    """The top-level name under the package a module belongs to ("" for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (resolved to the nearest module that exists)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for module, path in modules.items():
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                start = node.module or ""
                if node.level:
                    up = base.split(".")[: len(base.split(".")) - node.level + 1]
                    start = ".".join(up + ([node.module] if node.module else []))
                names = [start, *(f"{start}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                if name.split(".")[0] == package.name and (found := resolve(name)) and found != module \
                        and not module.startswith(found + "."):  # a package's own __init__ above it is fine
                    targets.add(found)
        edges[module] = targets
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or not (Tarjan's strongly connected components)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return groups


def test_no_import_circle():
    assert circles(graph()) == []


def test_every_module_has_a_layer():
    assert {layer(m) for m in graph()} - LAYERS.keys() == set(), "a new subpackage: give it a layer in LAYERS"


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets
                  if layer(m) != layer(t) and LAYERS[layer(t)] >= LAYERS[layer(m)])


def test_imports_only_go_down():
    assert upward(graph()) == []


def test_the_checks_fail_on_an_upward_import_and_a_circle(tmp_path):
    """The same checks on a copy of the package with one upward import added: a leaf importing the config, which
    imports the leaf (a circle too)."""
    import shutil

    copy = shutil.copytree(PACKAGE, tmp_path / "parallel_yolo", ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from .config import TrainConfig\n")
    edges = graph(copy)
    assert upward(edges) == ["parallel_yolo.errors -> parallel_yolo.config"]
    assert any("parallel_yolo.errors" in group and "parallel_yolo.config" in group for group in circles(edges))
    trainer = copy / "engine" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\nfrom ..tools import compare\n")
    assert "parallel_yolo.engine.trainer -> parallel_yolo.tools.compare" in upward(graph(copy))
