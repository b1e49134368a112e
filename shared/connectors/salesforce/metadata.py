"""Salesforce choice metadata: a field's picklist values from the live `sobjects/<Object>/describe`."""

from __future__ import annotations

from collections.abc import Mapping

from shared.connectors._choices import ChoiceDomain
from shared.connectors.salesforce.client import SalesforceHttp
from shared.connectors.salesforce.codecs import soql_identifier
from shared.core.errors import RejectedError

_PICKLIST_TYPES = frozenset({"picklist", "multipicklist"})


class SalesforceMetadata(SalesforceHttp):
    """Reads of picklist values (a fresh describe each time; the record reads keep their own cached field list)."""

    async def choice_domain(self, table: str, field: str) -> ChoiceDomain | None:
        """The picklist of `field` on sObject `table` (active values; inactive ones apart); None if not a picklist."""
        soql_identifier(table)
        describe = await self._ajson("GET", f"sobjects/{table}/describe", what=f"describe {table}")
        fields = {str(f.get("name", "")).lower(): f for f in (describe or {}).get("fields", [])
                  if isinstance(f, Mapping)}
        found = fields.get(field.lower())
        if found is None:
            raise RejectedError(f"salesforce: {table} has no field {field!r}")
        if found.get("type") not in _PICKLIST_TYPES:
            return None
        active: dict[object, str] = {}
        inactive: dict[object, str] = {}
        for entry in found.get("picklistValues") or []:
            if isinstance(entry, Mapping) and entry.get("value") is not None:
                (active if entry.get("active", True) else inactive)[str(entry["value"])] = \
                    str(entry.get("label") or entry["value"])
        kind = "restricted picklist" if found.get("restrictedPicklist") else "picklist"
        return ChoiceDomain(active, f"{kind} {found.get('name')}", inactive)
