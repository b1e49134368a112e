"""OData helpers shared by the Dataverse, F&O (v4) and SAP (v2) connectors: JSON bodies, paging links, literals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.core.errors import RejectedError, SyncError, TransientError


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


def quote_text(value: str) -> str:
    """An OData string literal: single quotes doubled, so a value can never close the literal."""
    return "'" + value.replace("'", "''") + "'"


def not_in_values(name: str, values: Sequence[Any], *, system: str, ident: Callable[[str, str], str]) -> list[Any]:
    """The non-null values of one `not_in` entry of a `select` (its field name checked by `ident`)."""
    ident(name, "filter field")
    if isinstance(values, str | bytes):
        raise RejectedError(f"{system}: not_in[{name!r}] must be a list of values, not a string")
    return [v for v in values if v is not None]
