"""Esri's `arcgis` package stays out of the deployed function app: an `admin` extra, imported lazily, by one module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _arcgis_imports(path: Path) -> tuple[list[int], list[int]]:
    """Line numbers of `arcgis` imports at module level and inside functions."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    module_level, lazy = [], []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "arcgis" or n.startswith("arcgis.") for n in names):
            (module_level if id(node) in top else lazy).append(node.lineno)
    return module_level, lazy


def test_requirements_never_have_arcgis_and_the_admin_extra_does() -> None:
    deployed = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not [line for line in deployed if re.match(r"arcgis\b", line, re.IGNORECASE)]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("arcgis") for req in extras["admin"])
    assert not any(req.startswith("arcgis") for req in
                   tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_only_the_provisioning_module_imports_arcgis_and_only_inside_a_function() -> None:
    found = {str(p.relative_to(ROOT)): _arcgis_imports(p) for p in (ROOT / "shared").rglob("*.py")}
    users = {name: lines for name, lines in found.items() if lines[0] or lines[1]}
    assert list(users) == ["shared/ops/provision.py"]
    module_level, lazy = users["shared/ops/provision.py"]
    assert module_level == []
    assert lazy


def test_the_function_app_loads_neither_arcgis_nor_the_provisioning_module() -> None:
    code = ("import sys, function_app; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'arcgis' or m == 'shared.ops.provision'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.strip() == "[]"
