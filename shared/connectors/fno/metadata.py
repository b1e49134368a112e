"""F&O choice metadata: the members of the enum type of an entity's property, from the live CSDL `$metadata`."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from shared.connectors._choices import ChoiceDomain
from shared.connectors.fno.client import FinOpsHttp
from shared.connectors.fno.codecs import SYSTEM
from shared.connectors.fno.errors import _error_for
from shared.core.errors import RejectedError, TransientError

_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
METADATA_TTL_SECONDS = 30.0
"""How long one `$metadata` read serves further fields (one check reads every F&O field within seconds)."""


def _parse(text: str) -> ET.Element:
    # A CSDL document never declares a DTD; refusing one rules out entity-expansion attacks on the parser.
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise TransientError(f"{SYSTEM}: $metadata declares a DTD, which CSDL never does; refused")
    try:
        return ET.fromstring(text)  # noqa: S314 - no DTD (checked above)
    except ET.ParseError as exc:
        raise TransientError(f"{SYSTEM}: $metadata is not well-formed XML: {exc}") from exc


def enum_domains(csdl: str | ET.Element, entity_set: str) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
    """From a CSDL document (text or parsed): {property: type} of the entity type behind `entity_set`, and {enum
    type: [(member, value)]} of every enum type (both by simple name)."""
    root = _parse(csdl) if isinstance(csdl, str) else csdl
    types = {et.get("Name"): et for et in root.iter(f"{_EDM}EntityType")}
    sets = {es.get("Name"): str(es.get("EntityType", "")).rsplit(".", 1)[-1] for es in root.iter(f"{_EDM}EntitySet")}
    if entity_set not in sets or sets[entity_set] not in types:
        raise RejectedError(f"{SYSTEM}: no data entity with the public collection name {entity_set!r}")
    props = {str(p.get("Name")): str(p.get("Type", "")).rsplit(".", 1)[-1]
             for p in types[sets[entity_set]].iter(f"{_EDM}Property")}
    enums = {str(e.get("Name")): [(str(m.get("Name")), str(m.get("Value"))) for m in e.iter(f"{_EDM}Member")]
             for e in root.iter(f"{_EDM}EnumType")}
    return props, enums


class FinOpsMetadata(FinOpsHttp):
    """Reads of enum types from `$metadata`, which is large in a real environment (every public entity): it is
    read once for the fields one check asks about in a row, and again after `METADATA_TTL_SECONDS`."""

    _csdl: tuple[float, ET.Element] | None = None

    def refresh_metadata(self) -> None:
        """Read `$metadata` again on the next call (a new check begins)."""
        self._csdl = None

    async def _metadata_root(self) -> ET.Element:
        cached = self._csdl
        if cached is not None and time.monotonic() - cached[0] < METADATA_TTL_SECONDS:
            return cached[1]
        what = "read $metadata"
        response = await self._send("GET", f"{self.data_root}$metadata", what=what,
                                    headers={"Accept": "application/xml"})
        if not response.is_success:
            raise _error_for(response, what)
        root = _parse(response.text)
        self._csdl = (time.monotonic(), root)
        return root

    async def choice_domain(self, table: str, field: str) -> ChoiceDomain | None:
        """The members of the enum type of property `field` of entity set `table` (records carry member names);
        None when the property is not an enum (a string code such as a currency or a customer group)."""
        props, enums = enum_domains(await self._metadata_root(), table)
        if field not in props:
            raise RejectedError(f"{SYSTEM}: entity {table!r} has no property {field!r}")
        members = enums.get(props[field])
        if members is None:
            return None
        return ChoiceDomain({name: name for name, _ in members}, f"enum {props[field]}")
