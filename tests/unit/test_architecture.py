"""The layout holds: no import circle, dependencies point one way, no file in shared/ or sandbox/ over 800 lines."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "sandbox")
MAX_LINES = 800

# Which of our own packages each layer may import (docs/architecture.md, "Dependencies point one way"). The core
# and mapping are one layer (the engine runs flow specs; specs raise the core's errors) and know nothing of the
# rest; connectors and runtime adapters implement core ports (the telemetry adapter is configured from settings);
# operations use them through ports; the composition root, the triggers and the CLI sit on top.
ALLOWED: dict[str, set[str]] = {
    "shared.core": {"shared.core", "shared.mapping"},
    "shared.mapping": {"shared.core", "shared.mapping"},
    "shared.payloads": {"shared.core"},
    "shared.settings": set(),
    "shared.connectors": {"shared.core", "shared.mapping", "shared.connectors", "shared.payloads"},
    "shared.runtime": {"shared.core", "shared.mapping", "shared.runtime", "shared.payloads", "shared.settings"},
    "shared.ops": {"shared.core", "shared.mapping", "shared.connectors", "shared.runtime", "shared.payloads",
                   "shared.settings", "shared.bootstrap", "shared.ops"},
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, path: Path) -> Iterator[str]:
    """Every module of ours that `module` imports, at any depth of its code (lazy and TYPE_CHECKING ones too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


GRAPH: dict[str, set[str]] = defaultdict(set)
for _module, _path in MODULES.items():
    GRAPH[_module].update(_imported(_module, _path))


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(MODULES):
        if start in index:
            continue
        work = [(start, iter(sorted(GRAPH[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(GRAPH[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_project_has_no_import_circle():
    assert _cycles() == []


def test_the_circle_finder_finds_a_circle():
    GRAPH["shared.core.errors"].add("shared.core.ports")
    GRAPH["shared.core.ports"].add("shared.core.errors")
    try:
        assert any({"shared.core.errors", "shared.core.ports"} <= set(c) for c in _cycles())
    finally:
        GRAPH["shared.core.errors"] = set(_imported("shared.core.errors", MODULES["shared.core.errors"]))
        GRAPH["shared.core.ports"] = set(_imported("shared.core.ports", MODULES["shared.core.ports"]))


def test_nothing_in_shared_imports_the_sandbox():
    offenders = sorted((m, t) for m, targets in GRAPH.items() if m.startswith("shared") for t in targets
                       if t.startswith("sandbox"))
    assert offenders == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    offenders = sorted(
        (module, target)
        for module, targets in GRAPH.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if target.startswith("shared") and not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer])
    )
    assert offenders == []


def test_no_file_in_shared_or_the_sandbox_is_over_800_lines():
    sizes = {str(path.relative_to(ROOT)): path.read_text().count("\n") for path in MODULES.values()}
    long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert long == {}
