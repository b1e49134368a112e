"""Record-level rules the engine applies: scope conditions, blank values, canonical keys, sort order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.mapping.engine import normalize
from shared.mapping.spec import Condition


def in_scope(condition: Condition, payload: Mapping[str, Any]) -> bool:
    """Whether a record satisfies one scope condition of a flow (an absent field is empty)."""
    value = payload.get(condition.field)
    if condition.present is not None:
        return _blank(value) != condition.present
    return normalize(value) in {normalize(v) for v in condition.in_ or ()}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _canonical_key(system: str, key: str) -> str:
    """Keys as the connectors emit them: ArcGIS GlobalIDs braced upper case, Dataverse GUIDs lower case."""
    text = key.strip()
    bare = text.strip("{}")
    if len(bare) == 36 and bare.count("-") == 4:
        return "{" + bare.upper() + "}" if system == "arcgis" else bare.lower()
    return text


def _sortable(value: Any) -> tuple[int, Any]:
    """Numbers before text, each in its own order (a mix of int and str never compares)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, "" if value is None else str(value))
