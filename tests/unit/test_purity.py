"""The core stays pure: no I/O library is imported by shared/core or shared/mapping (an AST walk)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = sorted((ROOT / "shared" / "core").rglob("*.py")) + sorted((ROOT / "shared" / "mapping").glob("*.py"))
FORBIDDEN = ("azure", "httpx", "requests", "sqlite3", "socket", "aiohttp", "simple_salesforce", "urllib")


@pytest.mark.parametrize("path", PURE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_module_imports_no_io_library_and_reads_no_environment(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
            raise AssertionError(f"{path.name} reads the environment (line {node.lineno})")
