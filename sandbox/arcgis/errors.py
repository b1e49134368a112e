"""How the simulated service answers failures: operation errors (HTTP 200 bodies) and per-feature edit errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_MESSAGES = {
    400: "Unable to complete operation.",
    403: "You do not have permissions to access this resource or perform this operation.",
    404: "Not found.",
    429: "Too many requests. Please try again later.",
    498: "Invalid token.",
    499: "Token Required",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
}


class RestError(Exception):
    """An operation error, answered as `{"error": {code, message, details}}` (with HTTP 200, like the service)."""

    def __init__(self, code: int, message: str | None = None, details: Sequence[str] = (), *,
                 message_code: str | None = None) -> None:
        super().__init__(message or _MESSAGES.get(code, "Error"))
        self.code = code
        self.message = message or _MESSAGES.get(code, "Error")
        self.details = list(details)
        self.message_code = message_code

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "details": self.details}
        if self.message_code:
            err["messageCode"] = self.message_code
        return {"error": err}


def _bad_request(*details: str) -> RestError:
    return RestError(400, "Unable to complete operation.", details)


class EditError(Exception):
    """A per-feature edit failure, reported inside add/update/deleteResults as `{code, description}`."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
