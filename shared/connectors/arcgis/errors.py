"""How the service reports failures (mostly HTTP 200 `{"error": ...}` bodies), mapped onto the error tree."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, SyncError, ThrottledError, TransientError

_TOKEN_ERRORS = frozenset({498, 499})


def _json_body(response: httpx.Response) -> Any:
    content = response.content.lstrip()
    if content[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def _body_error_code(response: httpx.Response) -> int | None:
    # Only error bodies are parsed here: they open with an "error" key, big result pages never do.
    head = response.content.lstrip()[:64]
    if response.status_code != 200 or not head.startswith(b"{") or b'"error"' not in head:
        return None
    body = _json_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, Mapping) else None
    return int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else None


def _token_problem(response: httpx.Response) -> str | None:
    if response.status_code in (401, *_TOKEN_ERRORS):
        return f"HTTP {response.status_code}"
    code = _body_error_code(response)
    if code in _TOKEN_ERRORS:
        body = _json_body(response)
        return f"{code} {body['error'].get('message') or ''}".strip()
    return None


def _error_text(error: Mapping[str, Any]) -> str:
    message = str(error.get("message") or error.get("error_description") or error.get("error") or "")
    details = [str(d) for d in error.get("details") or [] if d and str(d) != message]
    return f"{error.get('code')} {message}".strip() + (f" ({'; '.join(details)})" if details else "")


def _edit_error_text(error: Any) -> str:
    if not isinstance(error, Mapping):
        return "no error description"
    return f"error {error.get('code')}: {error.get('description') or error.get('message') or ''}".strip()


def _error_from_body(error: Mapping[str, Any], what: str, write: bool) -> SyncError:
    raw = error.get("code")
    code = int(raw) if isinstance(raw, int) or (isinstance(raw, str) and raw.isdigit()) else 0
    text = f"arcgis: {what}: error {_error_text(error)}"
    if code in _TOKEN_ERRORS:
        return AuthError(text)
    if code == 403:
        return AuthError(f"{text}; the app or API key lacks privileges on this service")
    if code == 429:
        return ThrottledError(text)
    if code == 504 and write:
        return AmbiguousWriteError(f"{text}; the edits may have been applied and are re-checked on retry")
    if 500 <= code < 600:
        return TransientError(text)
    return RejectedError(text)
