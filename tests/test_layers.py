"""The package's import graph keeps its layers: no import circle, the leaves import nothing of the package, and the
measuring tools are imported by the command line alone. Every import counts, function-level ones too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "parallel_yolo"
LEAVES = {"parallel_yolo.errors", "parallel_yolo.urls", "parallel_yolo._internals"}
"""Modules everything may import, that import nothing of the package (beyond other leaves)."""
TOOLS = {"parallel_yolo.compare": {"parallel_yolo.cli"}}
"""Measuring tools, and the only modules that may import them: the runtime never does."""


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


def test_leaves_import_nothing_of_the_package():
    edges = graph()
    assert LEAVES <= edges.keys()
    assert {m: edges[m] - LEAVES for m in LEAVES if edges[m] - LEAVES} == {}


def test_the_runtime_never_imports_the_measuring_tools():
    edges = graph()
    for tool, allowed in TOOLS.items():
        importers = {m for m, targets in edges.items() if tool in targets}
        assert importers <= allowed, importers - allowed


def test_the_checks_fail_on_an_upward_import_and_a_circle(tmp_path):
    """The same checks on a copy of the package with one upward import added: a leaf importing the config, which
    imports the leaf (a circle too)."""
    import shutil

    copy = shutil.copytree(PACKAGE, tmp_path / "parallel_yolo", ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from .config import TrainConfig\n")
    edges = graph(copy)
    assert "parallel_yolo.config" in edges["parallel_yolo.errors"]
    assert any("parallel_yolo.errors" in group and "parallel_yolo.config" in group for group in circles(edges))
    (copy / "trainer.py").write_text((copy / "trainer.py").read_text() + "\nfrom . import compare\n")
    assert "parallel_yolo.compare" in graph(copy)["parallel_yolo.trainer"]
