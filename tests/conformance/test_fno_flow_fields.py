"""Every F&O property a flow spec reads or writes is one the F&O schema declares (a typo fails here, not in prod).

The F&O simulator refuses undeclared properties like the real `/data` endpoint; this test finds a mistyped
mapping before any request is made, and names the flow and the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox.fno.schema import ENTITIES, EXTENSION_FIELD

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def _fno_fields(flow: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(entity set, property) pairs a flow reads from or writes to F&O."""
    source, target = flow["source"], flow["target"]
    for side, column in ((source, "source"), (target, "target")):
        if side["system"] != "fno":
            continue
        table = side["table"]
        for name in (side.get("key_field"), side.get("modified_field")):
            if name:
                yield table, name
        for fm in flow.get("fields", []):
            yield table, fm[column]
        if column == "target":
            for lookup in flow.get("lookups", []):
                yield table, lookup["target"]
        link = flow.get("link") or {}
        if column == "target" and link.get("target_field"):
            yield table, link["target_field"]
        if column == "source" and link.get("origin_field"):
            yield table, link["origin_field"]
    lines = flow.get("lines")
    if lines and target["system"] == "fno":
        table = lines["target_table"]
        for fm in lines.get("fields", []):
            yield table, fm["target"]
        for lookup in lines.get("lookups", []):
            yield table, lookup["target"]
        yield from ((table, name) for name in lines.get("parent_fields", {}))
        if lines.get("link_field"):
            yield table, lines["link_field"]


def _all_fno_fields() -> list[tuple[str, str, str, str]]:
    out = []
    for path in sorted(FLOWS.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        for flow in spec.get("flows", []):
            out.extend((path.name, flow["name"], t, f) for t, f in _fno_fields(flow))
    return out


FIELDS = _all_fno_fields()


def test_the_flows_touch_f_and_o_at_all() -> None:
    assert len(FIELDS) > 20
    assert any(f == EXTENSION_FIELD for *_, f in FIELDS)


@pytest.mark.parametrize(("spec", "flow", "table", "name"), FIELDS, ids=[f"{s}:{f}:{t}.{n}" for s, f, t, n in FIELDS])
def test_flow_field_is_declared_by_the_entity(spec: str, flow: str, table: str, name: str) -> None:
    assert table in ENTITIES, f"{spec} flow {flow}: F&O entity set {table!r} is not declared"
    assert name in ENTITIES[table].fields, (
        f"{spec} flow {flow}: {table}.{name} is not a property of "
        f"Microsoft.Dynamics.DataEntities.{ENTITIES[table].type_name}: F&O would refuse every request naming it")
