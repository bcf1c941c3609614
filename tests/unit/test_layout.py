"""The floor plan, checked on the source: which modules may import which.

* no import cycle between modules (imports inside functions count too);
* the SDK (``cnnkit_client``) imports no ``cnnkit`` module;
* nothing under ``cnnkit.serving`` reaches ``cnnkit.training``, directly or through the shared layer;
* the shared layer imports neither side.
(That importing the server front ends loads no TensorFlow is checked in a subprocess, in
tests/service/test_serving_imports.py.)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"cnnkit": ROOT / "cnnkit", "cnnkit_client": ROOT / "clients" / "cnnkit_client"}
SHARED = {"cnnkit.errors", "cnnkit.io", "cnnkit.images", "cnnkit.pictures", "cnnkit.repository", "cnnkit.explain",
          "cnnkit.bento", "cnnkit.settings"}


def module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            if "protos" in relative.parts:
                continue  # generated protobuf code
            parts = [package, *relative.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(module: str, path: Path) -> Iterator[str]:
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            yield from (f"{target}.{alias.name}" for alias in node.names)


def graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from package import module`` counts as the module)."""
    edges: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges[module] = {name for name in imported_names(module, path) if name in MODULES and name != module}
    return edges


GRAPH = graph()


def reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_the_analysis_sees_the_package():
    assert {"cnnkit.cli", "cnnkit.serving.core", "cnnkit.training.train", "cnnkit_client._http"} <= set(MODULES)
    assert "cnnkit.serving.core" in GRAPH["cnnkit.serving.http.service"]
    assert "cnnkit.errors" in reachable("cnnkit.serving.grpc.server")


def test_no_import_cycles():
    assert cycles() == []


def test_the_sdk_imports_nothing_from_cnnkit():
    for module in (name for name in MODULES if name.startswith("cnnkit_client")):
        assert not [name for name in reachable(module) if name.split(".")[0] == "cnnkit"], module


def test_serving_never_reaches_training():
    for module in (name for name in MODULES if name.startswith("cnnkit.serving")):
        leaks = sorted(name for name in reachable(module) if name.startswith("cnnkit.training"))
        assert leaks == [], f"{module} reaches {leaks}"


def test_the_shared_layer_imports_neither_side():
    for module in SHARED:
        sides = sorted(name for name in reachable(module)
                       if name.startswith(("cnnkit.training", "cnnkit.serving", "cnnkit.cli")))
        assert sides == [], f"{module} reaches {sides}"
