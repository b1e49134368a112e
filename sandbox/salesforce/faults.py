"""Test knobs of the simulated org: the daily request allocation, expired or rejected sessions, injected faults."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import JSONResponse, Response

from sandbox.faults import DROP, Dropped, FaultKnobs, KnobFault


class _Org(Protocol):
    """What the knobs touch of the org (its store): the lock and the sessions it issued."""

    @property
    def _lock(self) -> AbstractContextManager[Any]: ...

    @property
    def _tokens(self) -> set[str]: ...


@dataclass
class Limits:
    daily_max: int = 100_000
    used: int = 0


class Faults(FaultKnobs):
    """The shared fault knobs (`fail_next` paths are relative to the API root, `/services/data/vXX.X/`), and
    the org's session knobs: expired tokens and sessions rejected outright."""

    def __init__(self, sim: _Org | None = None) -> None:
        super().__init__()
        self.sim = sim
        self.expired: set[str] = set()
        self.reject_sessions = False
        """Every API call answers 401 INVALID_SESSION_ID, even with a fresh token (e.g. the run-as user was frozen)."""

    def expire_tokens(self) -> None:
        """Every token issued so far answers 401 INVALID_SESSION_ID from now on."""
        assert self.sim is not None
        with self.sim._lock:
            self.expired.update(self.sim._tokens)


def injected_answer(fault: KnobFault) -> Response:
    if fault.status == DROP:
        return Dropped()
    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
    if fault.status == 401:
        return JSONResponse([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                            status_code=401)
    message = {503: "Server Unavailable", 502: "Bad Gateway", 504: "Gateway Timeout"}.get(
        fault.status, f"Injected fault (HTTP {fault.status})")
    return JSONResponse([{"message": message, "errorCode": "SERVER_UNAVAILABLE"}], status_code=fault.status,
                        headers=headers)
