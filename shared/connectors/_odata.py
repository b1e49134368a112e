"""OData v4 helpers shared by the Microsoft connectors (Dataverse, F&O): JSON bodies and paging links."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.core.errors import SyncError, TransientError


def json_object(response: httpx.Response, *, system: str, what: str) -> dict[str, Any]:
    """The response's JSON object; anything else (HTML error pages from gateways, arrays) is transient."""
    try:
        data = response.json()
    except ValueError as exc:
        raise TransientError(f"{system} {what}: response is not JSON: {response.text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise TransientError(f"{system} {what}: unexpected JSON {type(data).__name__}")
    return data


def rebase_link(link: str, *, base_url: str, path_prefix: str, system: str,
                error: type[SyncError] = TransientError) -> str:
    """An @odata.nextLink/deltaLink rebased onto our own host, so the bearer token never goes elsewhere."""
    parts = urlsplit(link)
    if not parts.path.startswith(path_prefix):
        raise error(f"{system}: link {link!r} is not under {path_prefix}; cannot follow it")
    return base_url + parts.path + (f"?{parts.query}" if parts.query else "")
