"""The runbook (docs/operations.md) has an entry for every reason code the code base can produce.

Codes are collected two ways: the `REASONS` table, and an AST walk of shared/ that finds every string literal
used as a reason: `reason=` / `default_reason=` arguments, assignments to `reason` / `default_reason`,
comparisons with `.reason`, and self-named code constants such as `MAX_DELIVERY_EXCEEDED = "MAX_DELIVERY_EXCEEDED"`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from shared.core.errors import REASONS

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / "shared"
RUNBOOK = ROOT / "docs" / "operations.md"
CODES_SECTION = "## Dead-letter reason codes"
REASON_NAMES = {"reason", "default_reason"}
CODE = re.compile(r"^[A-Z][A-Z0-9_]+$")


def _strings(node: ast.AST) -> list[str]:
    """String constants an expression can evaluate to (through `a if c else b` and `a or b`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [s for value in node.values for s in _strings(value)]
    return []


def _target_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def codes_in_source(source: str) -> set[str]:
    """Every reason code literal in one module."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in REASON_NAMES:
            found.update(_strings(node.value))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {_target_name(t) for t in targets}
            if names & REASON_NAMES:
                found.update(_strings(node.value))
            # A module constant named after the code it holds: MAX_DELIVERY_EXCEEDED = "MAX_DELIVERY_EXCEEDED".
            found.update(s for s in _strings(node.value) if s in names and CODE.match(s))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_target_name(s) in REASON_NAMES for s in sides):
                found.update(s for side in sides for s in _strings(side))
    return found


def produced_codes() -> dict[str, set[str]]:
    """Code -> the modules under shared/ that use it."""
    out: dict[str, set[str]] = {}
    for path in sorted(SHARED.rglob("*.py")):
        for code in codes_in_source(path.read_text()):
            out.setdefault(code, set()).add(path.relative_to(ROOT).as_posix())
    return out


def runbook_sections() -> dict[str, str]:
    """`### CODE` heading -> its text, within the reason-codes section of the runbook."""
    text = RUNBOOK.read_text()
    assert CODES_SECTION in text, f"docs/operations.md has no '{CODES_SECTION}' section"
    section = text.split(CODES_SECTION, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.MULTILINE)[0]
    parts = re.split(r"^### (.+)$", section, flags=re.MULTILINE)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_the_ast_walk_finds_codes_in_every_form():
    source = (
        "class E(Base):\n    default_reason = 'ALPHA'\n"
        "raise SpecError('x', reason='BETA')\n"
        "reason = 'GAMMA' if exhausted else error.reason\n"
        "if exc.reason == 'DELTA': pass\n"
        "EPSILON = 'EPSILON'\n"
        "row = {'reason': r}\n"          # a dict key is not a code
        "x = f(reason=str(row['zeta']) if row.get('zeta') else None)\n"  # neither are subscripts or tests
        "LAST_CYCLE = 'controller:last_cycle'\n"
    )
    assert codes_in_source(source) == {"ALPHA", "BETA", "GAMMA", "DELTA", "EPSILON"}


def test_the_walk_sees_the_codes_raised_outside_errors_py():
    produced = produced_codes()
    # Spot checks: one code per form, so a walk that silently finds nothing fails here.
    assert "shared/mapping/spec.py" in produced["UNKNOWN_FLOW"]
    assert "shared/mapping/engine.py" in produced["UNMAPPED_CHOICE"]
    assert "shared/core/controller/settlement.py" in produced["MAX_DELIVERY_EXCEEDED"]
    assert "shared/runtime/common.py" in produced["MAX_DELIVERY_EXCEEDED"]
    assert "shared/core/errors.py" in produced["PARENT_MISSING"]


def test_every_produced_code_is_in_reasons():
    unknown = {code: sorted(where) for code, where in produced_codes().items() if code not in REASONS}
    assert not unknown, f"reason codes used in shared/ but missing from REASONS: {unknown}"


def test_every_reason_has_a_runbook_entry():
    sections = runbook_sections()
    codes = set(REASONS) | set(produced_codes())
    missing = sorted(codes - set(sections))
    assert not missing, f"docs/operations.md lacks a '### CODE' entry for: {missing}"
    stale = sorted(set(sections) - codes)
    assert not stale, f"runbook entries for codes the code cannot produce: {stale}"


@pytest.mark.parametrize("code", sorted(REASONS))
def test_each_runbook_entry_says_what_it_means_how_to_fix_and_how_to_replay(code: str):
    body = runbook_sections().get(code, "")
    for label in ("**Meaning**", "**Fix**", "**Replay**"):
        assert label in body, f"### {code}: no {label}"


def test_the_replay_commands_the_runbook_names_exist():
    text = RUNBOOK.read_text()
    cli = ast.parse((SHARED / "cli.py").read_text())
    commands = {ast.literal_eval(dec.args[0]) for node in ast.walk(cli)
                if isinstance(node, ast.FunctionDef) for dec in node.decorator_list
                if isinstance(dec, ast.Call) and dec.args and isinstance(dec.args[0], ast.Constant)}
    assert {"list", "replay"} <= commands
    assert "syncline dlq list" in text
    assert "syncline dlq replay <message-id>" in text
    assert "syncline dlq replay --all" in text
    assert "Service Bus Explorer" in text
    assert "Re-send" in text
