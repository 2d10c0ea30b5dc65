"""The code's layout: imports go jobs -> pipeline -> schemas, and no module imports itself back
through others (an import inside a function counts: it is a dependency all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "pipeline", "schemas")
LAYER = {"schemas": 0, "pipeline": 1, "jobs": 2}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(REPO).with_suffix("").parts): path
            for package in PACKAGES for path in sorted((REPO / package).glob("*.py"))
            if path.name != "__init__.py"}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline import storage` imports the module pipeline.storage
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_imports_go_one_way():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
             if LAYER[target.split(".")[0]] > LAYER[module.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_cycle():
    graph = _graph()
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_check_sees_imports():
    """The walk finds what it is meant to (else the tests above could pass on nothing)."""
    graph = _graph()
    assert "pipeline.provenance" in graph["jobs.embed"] and "jobs.options" in graph["jobs.cli"]
    assert "pipeline.storage" in graph["pipeline.fetch"]  # `from pipeline import storage`
