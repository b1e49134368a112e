"""OData helpers shared by the Dataverse, F&O (v4) and SAP (v2) connectors: JSON bodies, paging links, literals."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.core.dates import iso_z
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


def not_in_clauses(not_in: Mapping[str, Sequence[Any]] | None, *, system: str, ident: Callable[[str, str], str],
                   literal: Callable[[Any, str], str]) -> list[str]:
    """`(F ne a and F ne b)` per `not_in` entry of a `select` (OData has no `not in`); all-null entries are left out."""
    clauses: list[str] = []
    for name, values in (not_in or {}).items():
        items = not_in_values(name, values, system=system, ident=ident)
        if items:
            clauses.append("(" + " and ".join(f"{name} ne {literal(v, name)}" for v in items) + ")")
    return clauses


def v4_literal(value: Any, field_name: str, *, system: str) -> str:
    """The OData v4 literal of a datetime (ISO-8601 UTC), a date or a string; any other type is refused."""
    if isinstance(value, datetime):
        return iso_z(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return quote_text(value)
    raise RejectedError(f"{system}: cannot filter {field_name} on a {type(value).__name__} value")
