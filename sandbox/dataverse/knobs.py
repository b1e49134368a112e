"""Test knobs: queued faults (failures, delays, applied-then-504) and service protection limits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


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
