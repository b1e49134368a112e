"""Dataverse choice metadata: a column's option set (local or global, or a Status/State column's) from the live org."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.connectors._choices import ChoiceDomain
from shared.connectors._odata import quote_text
from shared.connectors.dataverse.client import DataverseHttp
from shared.connectors.dataverse.codecs import SYSTEM, check_ident
from shared.core.errors import RejectedError

# AttributeType -> the metadata type to cast to for its options (query-metadata-web-api.md: a cast is required).
_CHOICE_CASTS = {
    "Picklist": "Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
    "Status": "Microsoft.Dynamics.CRM.StatusAttributeMetadata",
    "State": "Microsoft.Dynamics.CRM.StateAttributeMetadata",
}


def option_label(option: Mapping[str, Any]) -> str:
    """The label of one option: the user's localized label, else the first localized label, else ""."""
    label = option.get("Label") or {}
    user = label.get("UserLocalizedLabel") or {}
    localized = label.get("LocalizedLabels") or [{}]
    return str(user.get("Label") or (localized[0] or {}).get("Label") or "")


def _options(option_set: Mapping[str, Any] | None) -> dict[Any, str]:
    return {int(o["Value"]): option_label(o) for o in (option_set or {}).get("Options") or []
            if isinstance(o, Mapping) and isinstance(o.get("Value"), int)}


class DataverseMetadata(DataverseHttp):
    """Reads of choice metadata (never cached: the drift check wants what the org has now)."""

    async def choice_domain(self, table: str, field: str) -> ChoiceDomain | None:
        """The option set of column `field` of entity set `table`; None when the column is not a choice.

        A missing table or column raises RejectedError (the flow names something the org does not have).
        """
        logical = await self.logical_name_for(table)
        check_ident(field, "column name")
        base = f"{self.api_root}EntityDefinitions(LogicalName={quote_text(logical)})/Attributes(LogicalName=" \
               f"{quote_text(field)})"
        what = f"attribute metadata of {logical}.{field}"
        response = await self._send("GET", base, what=what, params={"$select": "LogicalName,AttributeType"})
        if response.status_code == 404:
            raise RejectedError(f"{SYSTEM}: table {logical!r} has no column {field!r}")
        self._raise_for(response, what)
        cast = _CHOICE_CASTS.get(str(response.json().get("AttributeType")))
        if cast is None:
            return None
        what = f"choice metadata of {logical}.{field}"
        data = await self._get_json(f"{base}/{cast}", what=what, params={
            "$select": "LogicalName", "$expand": "OptionSet($select=Options,Name,IsGlobal),"
                                                 "GlobalOptionSet($select=Options,Name)"})
        glob = data.get("GlobalOptionSet")
        if isinstance(glob, Mapping) and glob.get("Name"):
            options = _options(glob) if glob.get("Options") is not None else \
                (await self.global_option_set(str(glob["Name"]))).values
            return ChoiceDomain(options, f"global option set {glob['Name']}")
        local = data.get("OptionSet") or {}
        return ChoiceDomain(_options(local), f"option set {local.get('Name') or f'{logical}_{field}'}")

    async def global_option_set(self, name: str) -> ChoiceDomain:
        """A global option set by name (`GlobalOptionSetDefinitions(Name='x')`)."""
        check_ident(name, "option set name")
        url = f"{self.api_root}GlobalOptionSetDefinitions(Name={quote_text(name)})"
        what = f"global option set {name}"
        response = await self._send("GET", url, what=what)
        if response.status_code == 404:
            raise RejectedError(f"{SYSTEM}: no global option set named {name!r}")
        self._raise_for(response, what)
        return ChoiceDomain(_options(response.json()), f"global option set {name}")
