"""Test knobs of the simulated org: the daily request allocation, expired or rejected sessions, injected faults."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.responses import JSONResponse, Response


class _Org(Protocol):
    """What the knobs touch of the org (its store): the lock and the sessions it issued."""

    @property
    def _lock(self) -> AbstractContextManager[Any]: ...

    @property
    def _tokens(self) -> set[str]: ...


DROP = 0
"""`fail_next` status meaning "the connection is dropped": the client sees a reset, not an HTTP status."""


@dataclass
class Limits:
    daily_max: int = 100_000
    used: int = 0


@dataclass
class _Fault:
    status: int
    path_contains: str | None
    method: str | None
    after_apply: bool
    retry_after: float | None


@dataclass
class Faults:
    expired: set[str] = field(default_factory=set)
    sim: _Org | None = None
    reject_sessions: bool = False
    """Every API call answers 401 INVALID_SESSION_ID, even with a fresh token (e.g. the run-as user was frozen)."""
    failing: list[_Fault] = field(default_factory=list)

    def fail_next(self, n: int, status: int, path_contains: str | None = None, *, method: str | None = None,
                  after_apply: bool = False, retry_after: float | None = None) -> None:
        """The next `n` API requests (optionally whose path, relative to the API root, contains a text, or of
        one method) fail with `status` (`DROP`: the connection is dropped). `after_apply`: the request is
        applied first and only its answer is lost (a gateway 504 after the write, a reset after the commit)."""
        assert self.sim is not None
        with self.sim._lock:
            self.failing.extend(_Fault(status, path_contains, method.upper() if method else None, after_apply,
                                       retry_after) for _ in range(n))

    def take(self, method: str, path: str) -> _Fault | None:
        for i, fault in enumerate(self.failing):
            if (fault.path_contains is None or fault.path_contains in path) and \
                    (fault.method is None or fault.method == method):
                return self.failing.pop(i)
        return None

    def expire_tokens(self) -> None:
        """Every token issued so far answers 401 INVALID_SESSION_ID from now on."""
        assert self.sim is not None
        with self.sim._lock:
            self.expired.update(self.sim._tokens)


def injected_answer(fault: _Fault) -> Response:
    if fault.status == DROP:
        return _Dropped()
    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
    if fault.status == 401:
        return JSONResponse([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                            status_code=401)
    message = {503: "Server Unavailable", 502: "Bad Gateway", 504: "Gateway Timeout"}.get(
        fault.status, f"Injected fault (HTTP {fault.status})")
    return JSONResponse([{"message": message, "errorCode": "SERVER_UNAVAILABLE"}], status_code=fault.status,
                        headers=headers)


class _Dropped(Response):
    """A response that starts and never finishes: the server closes the connection mid-answer (a reset)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        raise ConnectionAbortedError("connection dropped by the simulator's fault knob")

