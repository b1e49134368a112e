"""Salesforce error bodies -> the error tree (the spent daily allocation is throttling until UTC midnight)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from shared.connectors.salesforce.codecs import SYSTEM
from shared.core.errors import AuthError, RejectedError, SyncError, ThrottledError, TransientError


def seconds_until_utc_midnight(now: datetime | None = None) -> float:
    moment = now or datetime.now(UTC)
    tomorrow = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - moment).total_seconds()


def first_error(content: Any) -> tuple[str, str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        first = content[0]
        return str(first.get("errorCode") or first.get("statusCode") or ""), str(first.get("message") or "")
    if isinstance(content, dict):
        return str(content.get("error") or content.get("errorCode") or ""), str(
            content.get("error_description") or content.get("message") or "")
    return "", str(content)[:300]


def map_error(status: int, content: Any, what: str, *, retry_after: float | None = None) -> SyncError:
    code, message = first_error(content)
    text = f"{SYSTEM}: {what}: HTTP {status} {code}: {message}".rstrip(": ")
    if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
        return ThrottledError(
            f"{SYSTEM}: the org's API request allocation is spent ({message or code}); changes stay queued and "
            "are retried after the allocation recovers (rolling 24 h)", retry_after=seconds_until_utc_midnight())
    if status == 401:
        return AuthError(f"{text} (session still rejected after re-authenticating)")
    if status == 429:
        return ThrottledError(text, retry_after=retry_after)
    if status in (408, 429) or status >= 500:
        return TransientError(text)
    return RejectedError(text)


def record_error(errors: Any, context: str) -> SyncError:
    code, message = "UNKNOWN_ERROR", "no error detail"
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = str(errors[0].get("statusCode") or errors[0].get("errorCode") or code)
        message = str(errors[0].get("message") or message)
    detail = f"{SYSTEM}: {context} rejected: {code}: {message}"
    return RejectedError(detail, reason="REQUIRED_FIELD_MISSING" if code == "REQUIRED_FIELD_MISSING" else None)
