"""ArcGIS choice metadata: a field's coded-value domain, and its subtypes' domains, from the live layer resource."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.connectors._choices import ChoiceDomain
from shared.connectors.arcgis.client import ArcGISServiceClient
from shared.core.errors import RejectedError


def _coded(domain: Any) -> dict[Any, str] | None:
    if not isinstance(domain, Mapping) or domain.get("type") != "codedValue":
        return None
    return {c.get("code"): str(c.get("name")) for c in domain.get("codedValues") or [] if isinstance(c, Mapping)}


class ArcGISMetadata(ArcGISServiceClient):
    """Reads of coded-value domains (the layer resource is read again each time: drift is what changed since)."""

    async def choice_domain(self, table: str, field: str) -> ChoiceDomain | None:
        """The coded values of `field` in layer `table` (its own domain plus any subtype's); None without a coded
        domain. A missing layer or field raises (SpecError / RejectedError)."""
        svc = await self.service_info(fresh=True)
        text = str(table).strip()
        layer_id = int(text) if text.isdigit() and int(text) in svc.names else svc.layer_ids.get(text.lower())
        if layer_id is None:
            raise RejectedError(f"arcgis: no layer or table named {table!r} in {self.service_url}")
        body = await self._request("GET", f"{self.service_url}/{layer_id}", params={"f": "json"},
                                   what=f"read the definition of layer {table}")
        fields = {str(f.get("name", "")).lower(): f for f in body.get("fields") or [] if isinstance(f, Mapping)}
        found = fields.get(field.lower())
        if found is None:
            raise RejectedError(f"arcgis: layer {table!r} has no field {field!r}")
        values = _coded(found.get("domain"))
        names = [str(found["domain"].get("name"))] if values is not None else []
        # Subtypes (`types[]`) may each narrow the field to a domain of their own: a record of that type carries
        # one of its codes, so all of them are values the flow must map.
        for subtype in body.get("types") or []:
            sub_domain = ((subtype or {}).get("domains") or {}).get(found.get("name"))
            sub = _coded(sub_domain)
            if sub is not None and isinstance(sub_domain, Mapping):
                values = {**(values or {}), **sub}
                names.append(f"{sub_domain.get('name')} (subtype {subtype.get('name')})")
        if values is None:
            return None
        return ChoiceDomain(values, "domain " + ", ".join(names))
