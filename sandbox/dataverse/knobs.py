"""Test knobs: queued faults (failures, delays, applied-then-504) and service protection limits."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sandbox.dataverse.protocol import ODataError, _ApiResponse, _error_response


@dataclass
class ServiceProtection:
    """Service protection limits (per user): request budget per sliding window and a concurrency budget."""

    max_requests: int | None = None
    window_seconds: float = 300.0
    max_concurrent: int | None = None
    concurrency_retry_after: float = 1.0


@dataclass
class _Fault:
    remaining: int
    status: int = 0
    path_contains: str | None = None
    retry_after: float | None = None
    seconds: float = 0.0


class Faults:
    """Fault knobs for tests: failures, slow responses, applied-then-504 writes, token expiry."""

    def __init__(self, expire_tokens: Callable[[], None]) -> None:
        self._expire_tokens = expire_tokens
        self._lock = threading.Lock()
        self._fail: list[_Fault] = []
        self._timeouts: list[_Fault] = []
        self._ambiguous: list[_Fault] = []

    def fail_next(self, n: int, status: int, path_contains: str | None = None,
                  retry_after: float | None = None) -> None:
        """Answer the next `n` API requests (whose path contains `path_contains`) with `status`."""
        with self._lock:
            self._fail.append(_Fault(n, status, path_contains, retry_after))

    def timeout_next(self, n: int, seconds: float, path_contains: str | None = None) -> None:
        """Delay the next `n` API requests by `seconds` before they are processed."""
        with self._lock:
            self._timeouts.append(_Fault(n, path_contains=path_contains, seconds=seconds))

    def apply_then_504(self, n: int, path_contains: str | None = None) -> None:
        """Apply the next `n` write requests (POST/PATCH/DELETE, $batch), then answer 504 Gateway Timeout."""
        with self._lock:
            self._ambiguous.append(_Fault(n, 504, path_contains))

    def expire_tokens(self) -> None:
        """Make every access token issued so far invalid (the next API call gets 401)."""
        self._expire_tokens()

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._fail.clear()
            self._timeouts.clear()
            self._ambiguous.clear()

    def _take(self, bucket: list[_Fault], path: str, *, in_batch: bool = False) -> _Fault | None:
        # Inside a $batch only faults aimed at a path apply (unscoped ones hit the outer request).
        with self._lock:
            for fault in bucket:
                aimed = not in_batch if fault.path_contains is None else fault.path_contains in path
                if fault.remaining > 0 and aimed:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        bucket.remove(fault)
                    return fault
        return None


class _Protection:
    """Service protection (429 by request budget and concurrency) and the answers of queued faults.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def _check_limits(self) -> ODataError | None:
        limits = self.limits
        if limits.max_concurrent is not None and self._in_flight >= limits.max_concurrent:
            return ODataError(429, "0x80072326",
                              f"Number of concurrent requests exceeded the limit of {limits.max_concurrent}.",
                              {"Retry-After": str(math.ceil(limits.concurrency_retry_after))})
        if limits.max_requests is not None:
            now = self.clock()
            with self._lock:
                while self._window and self._window[0] <= now - limits.window_seconds:
                    self._window.popleft()
                if len(self._window) >= limits.max_requests:
                    wait = max(1, math.ceil(self._window[0] + limits.window_seconds - now))
                    return ODataError(
                        429, "0x80072322",
                        f"Number of requests exceeded the limit of {limits.max_requests} over time window of "
                        f"{int(limits.window_seconds)} seconds.", {"Retry-After": str(wait)})
                self._window.append(now)
        return None

    def _fault_response(self, fault: _Fault) -> _ApiResponse:
        status = fault.status
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
        if status == 429:
            err = ODataError(429, "0x80072322", "Number of requests exceeded the limit of 6000 over time window of "
                             "300 seconds.", headers)
        elif status == 401:
            return _ApiResponse(401, {"WWW-Authenticate": "Bearer error=invalid_token", **headers})
        elif status >= 500:
            message = {503: "Service Unavailable", 504: "The request timed out at the gateway.",
                       502: "Bad Gateway"}.get(status, "An unexpected error occurred.")
            err = ODataError(status, "0x80040216", message, headers)
        else:
            err = ODataError(status, "0x80040265", f"Simulated failure (HTTP {status}).", headers)
        return _error_response(err)
