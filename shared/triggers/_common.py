"""Helpers shared by the HTTP triggers: JSON responses and error translation (no business logic)."""

from __future__ import annotations

import json
import logging
from typing import Any

import azure.functions as func

from shared.core.errors import PermanentError, SyncError
from shared.intake import Unauthorized

log = logging.getLogger("syncline.triggers")


def json_response(payload: Any, status: int = 200) -> func.HttpResponse:
    """A JSON HttpResponse."""
    return func.HttpResponse(json.dumps(payload, default=str), status_code=status, mimetype="application/json")


def error_response(exc: Exception) -> func.HttpResponse:
    """Map an exception to a clear HTTP answer; never a stack trace, never a secret."""
    if isinstance(exc, Unauthorized):
        return json_response({"error": "unauthorized", "detail": str(exc)}, 401)
    if isinstance(exc, PermanentError):
        return json_response({"error": exc.reason, "detail": exc.detail}, 400)
    if isinstance(exc, SyncError):
        # Retriable: 503 makes Dataverse retry once; the change itself was not accepted.
        return json_response({"error": exc.reason, "detail": exc.detail}, 503)
    log.error("unexpected error in trigger: %s", type(exc).__name__, exc_info=exc)
    return json_response({"error": "INTERNAL", "detail": "unexpected error; see the function logs"}, 500)
