"""SAP Gateway error bodies -> the Syncline error tree."""

from __future__ import annotations

import json
import re

import httpx

from shared.connectors._http import retry_after_value
from shared.connectors.sap.codecs import LOCK_MESSAGES, SYSTEM
from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, SyncError, ThrottledError, TransientError


def gateway_error(body: bytes) -> tuple[str, str, list[tuple[str, str, str]]]:
    """(code, message, [(code, message, target)]) of an SAP Gateway error body (text bodies: message only)."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return "", re.sub(r"<[^>]+>", " ", text).strip()[:300], []
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return "", text.strip()[:300], []
    message = err.get("message")
    value = message.get("value") if isinstance(message, dict) else message
    inner = err.get("innererror") if isinstance(err.get("innererror"), dict) else {}
    details: list[tuple[str, str, str]] = []
    for item in (inner or {}).get("errordetails") or []:
        if isinstance(item, dict) and str(item.get("severity") or "error").lower() == "error":
            details.append((str(item.get("code") or ""), str(item.get("message") or ""), str(item.get("target") or "")))
    return str(err.get("code") or ""), str(value or "").strip(), details


def error_for(response: httpx.Response, what: str, *, write: bool = False) -> SyncError:
    """The Syncline error for a failed SAP response, quoting SAP's message code and text."""
    status = response.status_code
    code, message, details = gateway_error(response.content)
    target = next((t for c, m, t in details if c == code and t), "")
    text = f"{code}: {message}" if code else (message or f"HTTP {status}")
    if target:
        text += f" (field {target})"
    extra = [f"{c}: {m}" + (f" (field {t})" if t else "") for c, m, t in details if m and m != message]
    if extra:
        text += "; " + "; ".join(extra)
    codes = {code, *(c for c, _, _ in details)}
    if status == 429 or (status == 503 and response.headers.get("Retry-After")):
        return ThrottledError(f"{SYSTEM} {what}: throttled (HTTP {status}): {text}",
                              retry_after=retry_after_value(response.headers.get("Retry-After")))
    if codes & LOCK_MESSAGES:
        return TransientError(f"{SYSTEM} {what}: the record is locked in SAP, retrying later: {text}")
    if status == 401:
        return AuthError(f"{SYSTEM} {what}: HTTP 401: {text}; check the communication user's password or the OAuth "
                         "client")
    if status == 403:
        return AuthError(f"{SYSTEM} {what}: not authorized (HTTP 403): {text}; check that the communication "
                         "arrangement grants this service to the communication user")
    if status == 504 and write:
        return AmbiguousWriteError(f"{SYSTEM} {what}: HTTP 504 (the write may have been applied): {text}")
    if status >= 500 or status == 408:
        return TransientError(f"{SYSTEM} {what}: HTTP {status}: {text}")
    return RejectedError(f"SAP rejected {what}: {text}")
