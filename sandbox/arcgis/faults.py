"""Fault knobs of the ArcGIS simulator: error answers, slow answers, applied-then-504 writes, expired tokens."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sandbox.arcgis.auth import SimAuth


@dataclass
class _Fault:
    remaining: int
    code: int = 0
    path_contains: str | None = None
    as_http_200: bool = True
    seconds: float = 0.0
    retry_after: float | None = None


class Faults:
    """Fault knobs: failures (HTTP-200 error bodies or real statuses), slow answers, applied-then-504 writes."""

    def __init__(self, sim: SimAuth) -> None:
        self._sim = sim
        self._lock = threading.Lock()
        self._fail: list[_Fault] = []
        self._timeouts: list[_Fault] = []
        self._ambiguous: list[_Fault] = []

    def fail_next(self, n: int, status_or_error_code: int, path_contains: str | None = None,
                  as_http_200_error: bool = True, retry_after: float | None = None) -> None:
        """Answer the next `n` service requests (whose path contains `path_contains`) with an error.

        `as_http_200_error=True` answers HTTP 200 with `{"error": {"code": <code>, ...}}` (what the service
        usually does); False answers with that HTTP status. Token requests are hit only when named by path.
        """
        with self._lock:
            self._fail.append(_Fault(n, status_or_error_code, path_contains, as_http_200_error,
                                     retry_after=retry_after))

    def timeout_next(self, n: int, seconds: float, path_contains: str | None = None) -> None:
        """Hold the next `n` matching requests for `seconds` before processing them (they still apply)."""
        with self._lock:
            self._timeouts.append(_Fault(n, path_contains=path_contains, seconds=seconds))

    def apply_then_504(self, n: int, path_contains: str | None = None) -> None:
        """Apply the next `n` matching write requests (applyEdits, attachments), then answer 504 Gateway Timeout."""
        with self._lock:
            self._ambiguous.append(_Fault(n, 504, path_contains))

    def expire_tokens(self) -> None:
        """Invalidate every OAuth token issued so far: the next calls get `498 Invalid token` (API keys stay valid)."""
        self._sim._expire_tokens()

    def clear(self) -> None:
        with self._lock:
            self._fail.clear()
            self._timeouts.clear()
            self._ambiguous.clear()

    def _take(self, bucket: list[_Fault], path: str, *, token_endpoint: bool = False) -> _Fault | None:
        with self._lock:
            for fault in bucket:
                wanted = fault.path_contains in path if fault.path_contains is not None else not token_endpoint
                if fault.remaining > 0 and wanted:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        bucket.remove(fault)
                    return fault
        return None
