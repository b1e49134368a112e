"""Test knobs: queued faults (failures, delays, applied-then-504) and service protection limits."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.faults import CountdownFault, CountdownKnobs


@dataclass
class ServiceProtection:
    """Service protection limits (per user): request budget per sliding window and a concurrency budget."""

    max_requests: int | None = None
    window_seconds: float = 300.0
    max_concurrent: int | None = None
    concurrency_retry_after: float = 1.0


class Faults(CountdownKnobs[CountdownFault]):
    """Fault knobs for tests: failures, slow responses, applied-then-504 writes (POST/PATCH/DELETE, $batch), token
    expiry (the next API call gets 401). Inside a $batch only faults aimed at a path strike a part."""

    def fail_next(self, n: int, status: int, path_contains: str | None = None,
                  retry_after: float | None = None) -> None:
        """Answer the next `n` API requests (whose path contains `path_contains`) with `status`."""
        self._arm(self._fail, CountdownFault(n, status, path_contains, retry_after))
