"""Fault knobs of the ArcGIS simulator: error answers, slow answers, applied-then-504 writes, expired tokens."""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.faults import CountdownFault, CountdownKnobs


@dataclass
class _Fault(CountdownFault):
    as_http_200: bool = True
    """The error is an HTTP 200 `{"error": ...}` body with `status` as its code (what the service usually does)."""


class Faults(CountdownKnobs[_Fault]):
    """Fault knobs: failures (HTTP-200 error bodies or real statuses), slow answers, applied-then-504 writes
    (applyEdits, attachments), expired OAuth tokens (the next calls get `498 Invalid token`; API keys stay valid)."""

    def fail_next(self, n: int, status_or_error_code: int, path_contains: str | None = None,
                  as_http_200_error: bool = True, retry_after: float | None = None) -> None:
        """Answer the next `n` service requests (whose path contains `path_contains`) with an error.

        `as_http_200_error=True` answers HTTP 200 with `{"error": {"code": <code>, ...}}` (what the service
        usually does); False answers with that HTTP status. Token requests are hit only when named by path.
        """
        self._arm(self._fail, _Fault(n, status_or_error_code, path_contains, retry_after,
                                     as_http_200=as_http_200_error))
