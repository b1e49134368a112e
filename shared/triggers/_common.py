"""Helpers shared by the HTTP triggers: JSON responses and error translation (no business logic)."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import azure.functions as func

from shared.core.errors import AuthError, PermanentError, SyncError
from shared.ops import Unauthorized

log = logging.getLogger("syncline.triggers")


def json_response(payload: Any, status: int = 200) -> func.HttpResponse:
    """A JSON HttpResponse."""
    return func.HttpResponse(json.dumps(payload, default=str), status_code=status, mimetype="application/json")


def _short(detail: str, limit: int = 1000) -> str:
    # Details may quote the sender's values; a huge value is not echoed back in full.
    return detail if len(detail) <= limit else detail[:limit] + "..."


def error_response(exc: Exception) -> func.HttpResponse:
    """Map an exception to a clear HTTP answer; never a stack trace, never a secret."""
    if isinstance(exc, Unauthorized):
        return json_response({"error": "unauthorized", "detail": str(exc)}, 401)
    if isinstance(exc, AuthError):
        # Our credentials were refused by a system we read from: not the sender's fault, it should try again.
        return json_response({"error": exc.reason, "detail": _short(exc.detail)}, 503)
    if isinstance(exc, PermanentError):
        return json_response({"error": exc.reason, "detail": _short(exc.detail)}, 400)
    if isinstance(exc, SyncError):
        # Retriable: 503 makes the sender retry; the change itself was not accepted.
        return json_response({"error": exc.reason, "detail": _short(exc.detail)}, 503)
    # A fault of ours: the caller gets an id to quote, the log line carries the same id and the stack.
    correlation_id = str(uuid.uuid4())
    log.error("unexpected error in trigger (correlation_id=%s): %s", correlation_id, type(exc).__name__,
              exc_info=exc)
    return json_response({"error": "INTERNAL", "detail": "unexpected error; see the function logs",
                          "correlation_id": correlation_id}, 500)
