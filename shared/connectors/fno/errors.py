"""F&O OData error bodies (AxODataWriteException infologs included) -> the Syncline error tree."""

from __future__ import annotations

import json

import httpx

from shared.connectors._http import retry_after_value
from shared.connectors.fno.codecs import SYSTEM, WRITE_EXCEPTION
from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, SyncError, ThrottledError, TransientError


def _error_parts(body: bytes) -> tuple[str, str, str]:
    """(message, innererror type, innererror message) of an F&O OData error body."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500], "", ""
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return text.strip()[:500], "", ""
    inner = err.get("innererror") if isinstance(err.get("innererror"), dict) else {}
    assert isinstance(inner, dict)
    return str(err.get("message") or "").strip(), str(inner.get("type") or ""), str(inner.get("message") or "")


def _error_for(response: httpx.Response, what: str) -> SyncError:
    status = response.status_code
    message, inner_type, inner_message = _error_parts(response.content)
    if status == 500 and inner_type.endswith(WRITE_EXCEPTION):
        return RejectedError(f"{SYSTEM} {what}: F&O refused the write: {inner_message or message}")
    detail = f"{SYSTEM} {what}: HTTP {status}: {inner_message or message}"
    if status == 429:
        return ThrottledError(detail, retry_after=retry_after_value(response.headers.get("Retry-After")))
    if status == 504:
        return AmbiguousWriteError(detail)
    if status >= 500 or status == 408:
        return TransientError(detail)
    if status in (401, 403):
        return AuthError(detail)
    return RejectedError(detail)


def _with_detail(exc: SyncError, detail: str) -> SyncError:
    """The same kind of error (class, reason, Retry-After) with a fuller message."""
    if isinstance(exc, ThrottledError):
        return ThrottledError(detail, retry_after=exc.retry_after, reason=exc.reason)
    return type(exc)(detail, reason=exc.reason)
