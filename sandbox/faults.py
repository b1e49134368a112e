"""Fault injection for the simulators: the random middleware, and the knobs tests aim at the next requests.

The middleware (`FaultPlan`) fails a fraction of all calls (429, 5xx, resets, timeouts, 504 after the write);
the knobs fail or stall chosen requests, each simulator answering in its own protocol's shape: `FaultKnobs`
(a queue of single faults: SAP, F&O, Salesforce) or `CountdownKnobs` (a fault striking the next N matching
requests: ArcGIS, Dataverse)."""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from starlette.responses import Response

KINDS = ("throttle", "error500", "unavailable503", "reset", "reset_after_apply", "timeout", "gateway504_after_apply")
"""Every fault the middleware can inject; `FaultPlan.kinds` picks the ones in play (uniformly)."""

# Token and discovery endpoints stay healthy: with them faulted nothing could work at all, and token loss is
# exercised separately (the simulators' `expire_tokens` knobs, which make the next API call answer 401).
_EXEMPT = re.compile(r"(oauth2|/token|openid|well-known|discovery|/sharing/rest/info)", re.IGNORECASE)

Scope = dict[str, Any]
Receive = Any
Send = Any


@dataclass
class FaultPlan:
    """What to inject, shared by every wrapped simulator; counters are per simulator name and fault kind."""

    rate: float = 0.0
    """Fraction of API calls that fail (0 switches the injector off)."""
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    timeout_seconds: float = 3.0
    """How long a `timeout` fault holds the request: longer than the client's timeout (then the write applies)."""
    retry_after_seconds: int = 1
    calls: Counter[str] = field(default_factory=Counter)
    injected: Counter[tuple[str, str]] = field(default_factory=Counter)
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)} (known: {', '.join(KINDS)})")
        self._rng = random.Random(self.seed)

    def wrap(self, app: Any, name: str) -> FaultInjector:
        """The simulator's ASGI app behind the injector."""
        return FaultInjector(app, name, self)

    def pick(self, name: str, path: str) -> str | None:
        """Count one call and decide its fault (None: served normally)."""
        with self._lock:
            self.calls[name] += 1
            if self.rate <= 0 or not self.kinds or _EXEMPT.search(path):
                return None
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.injected[(name, kind)] += 1
            return kind

    def total_calls(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def per_kind(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        with self._lock:
            for (_name, kind), n in self.injected.items():
                out[kind] += n
        return dict(out)

    def per_system(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for name, n in self.calls.items():
                out[name] = {"calls": n, "faults": sum(v for (s, _k), v in self.injected.items() if s == name)}
        return out


class _Drop(Exception):
    """Raised after the response has started: uvicorn then closes the connection mid-response (a reset)."""


class FaultInjector:
    """ASGI middleware: passes calls to the simulator, or fails a fraction of them as the plan says."""

    def __init__(self, app: Any, name: str, plan: FaultPlan) -> None:
        self.app = app
        self.name = name
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        kind = self.plan.pick(self.name, str(scope.get("path", "")))
        if kind is None:
            await self.app(scope, receive, send)
        elif kind == "throttle":
            await _respond(send, 429, b'{"error":"throttled by the fault injector"}',
                           [(b"retry-after", str(self.plan.retry_after_seconds).encode())])
        elif kind == "error500":
            await _respond(send, 500, b'{"error":"internal error (injected)"}')
        elif kind == "unavailable503":
            await _respond(send, 503, b'{"error":"service unavailable (injected)"}')
        elif kind == "reset":
            await _reset(send)
        elif kind == "reset_after_apply":
            await self.app(scope, receive, _discard)
            await _reset(send)
        elif kind == "timeout":
            # The client gives up first; the server still applies the request late, as real services do.
            await asyncio.sleep(self.plan.timeout_seconds)
            await self.app(scope, receive, _discard)
            await _respond(send, 504, b"")
        elif kind == "gateway504_after_apply":
            await self.app(scope, receive, _discard)
            await _respond(send, 504, b'{"error":"gateway timeout (injected after the request was applied)"}')
        else:  # pragma: no cover - kinds are validated by the plan
            raise ValueError(kind)


async def _discard(message: Any) -> None:
    return None


async def _respond(send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def _reset(send: Send) -> None:
    # A started response that promises a body and never sends it: the client sees the connection dropped.
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
    raise _Drop("connection dropped by the fault injector")


def expire_all_tokens(sims: Iterable[Any]) -> int:
    """Invalidate every access token (and SAP CSRF token) the simulators issued; returns how many sims did."""
    done = 0
    for sim in sims:
        if sim is None:
            continue
        faults = getattr(sim, "faults", None)
        for fn in (getattr(faults, "expire_tokens", None), getattr(sim, "expire_oauth_tokens", None),
                   getattr(sim, "expire_csrf_tokens", None)):
            if callable(fn):
                fn()
                done += 1
    return done


# ------------------------------------------------------------------------------------ per-simulator knobs

DROP = 0
"""`fail_next` status meaning "the connection is dropped": the client sees a reset, not an HTTP status."""
SLOW = -1
"""Status of a `slow_next` fault (F&O's knobs): answered normally, only late."""


@dataclass
class KnobFault:
    """One armed fault: which request it strikes and how it answers."""

    status: int
    path_contains: str | None = None
    method: str | None = None
    retry_after: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    after_apply: bool = False
    delay: float = 0.0
    skip: int = 0
    """Matching requests let through untouched before this fault strikes."""


class FaultKnobs:
    """Fault knobs of one simulator: the next N API requests (optionally by path text / method) fail or stall.

    The simulator asks `take` on each request and shapes the answer in its own protocol's error format."""

    def __init__(self) -> None:
        self._fail: list[KnobFault] = []
        self._lock = threading.Lock()

    def fail_next(self, n: int, status: int, path_contains: str | None = None, *, method: str | None = None,
                  retry_after: float | None = None, headers: Mapping[str, str] | None = None,
                  after_apply: bool = False, skip: int = 0) -> None:
        """Fail the next `n` matching API requests with `status` (`DROP`: the connection is dropped; 429/503
        carry `Retry-After` when given).

        `headers` go on the response, e.g. `{"x-csrf-token": "Required"}` with 403 for a CSRF rejection that
        survives a fresh token. `after_apply`: the request is served (applied) first and only its answer is
        lost: `status` replaces it (a gateway 504 after the write; `DROP`: a reset after the commit). `skip`:
        that many matching requests go through first (the fault strikes in the middle of a call).
        """
        with self._lock:
            self._fail.extend(KnobFault(status, path_contains, method.upper() if method else None, retry_after,
                                        dict(headers or {}), after_apply, skip=skip if i == 0 else 0)
                              for i in range(n))

    def throttle_next(self, n: int, *, status: int = 429, retry_after: float = 1.0, method: str | None = None) -> None:
        """Answer the next `n` API requests with 429 (or 503) and `Retry-After: retry_after`."""
        self.fail_next(n, status, method=method, retry_after=retry_after)

    def clear(self) -> None:
        with self._lock:
            self._fail.clear()

    def take(self, method: str, path: str, *, after_apply: bool | None = None) -> KnobFault | None:
        """The first armed fault matching this request, disarmed (None: serve it normally). `after_apply`
        None matches faults of either timing."""
        with self._lock:
            for i, fault in enumerate(self._fail):
                if (fault.path_contains is None or fault.path_contains in path) and \
                        (fault.method is None or fault.method == method) and \
                        (after_apply is None or fault.after_apply == after_apply):
                    if fault.skip:
                        fault.skip -= 1
                        return None
                    return self._fail.pop(i)
        return None


class Dropped(Response):
    """A response that starts and never finishes: the server closes the connection mid-answer (a reset)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        raise ConnectionAbortedError("connection dropped by the simulator's fault knob")


@dataclass
class CountdownFault:
    """One armed countdown fault: it strikes the next `remaining` matching requests."""

    remaining: int
    status: int = 0
    path_contains: str | None = None
    retry_after: float | None = None
    seconds: float = 0.0


F = TypeVar("F", bound=CountdownFault)
"""The simulator's failure fault (a subclass carries what its protocol's answer needs)."""
T = TypeVar("T", bound=CountdownFault)


class CountdownKnobs(Generic[F]):
    """Fault knobs that count down: each armed fault strikes the next N requests whose path contains a text.

    Here are slow answers, applied-then-504 writes and token expiry; failures (`fail_next`) are each simulator's
    own, their answer being its protocol's. Which requests are writes, and what an expired token answers, each
    simulator says."""

    def __init__(self, expire_tokens: Callable[[], None]) -> None:
        self._expire_tokens = expire_tokens
        self._lock = threading.Lock()
        self._fail: list[F] = []
        self._timeouts: list[CountdownFault] = []
        self._ambiguous: list[CountdownFault] = []

    def timeout_next(self, n: int, seconds: float, path_contains: str | None = None) -> None:
        """Hold the next `n` matching requests for `seconds` before processing them (they still apply)."""
        self._arm(self._timeouts, CountdownFault(n, path_contains=path_contains, seconds=seconds))

    def apply_then_504(self, n: int, path_contains: str | None = None) -> None:
        """Apply the next `n` matching write requests, then answer 504 Gateway Timeout."""
        self._arm(self._ambiguous, CountdownFault(n, 504, path_contains))

    def expire_tokens(self) -> None:
        """Invalidate every access token issued so far (the next API call is refused)."""
        self._expire_tokens()

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._fail.clear()
            self._timeouts.clear()
            self._ambiguous.clear()

    def _arm(self, bucket: list[T], fault: T) -> None:
        with self._lock:
            bucket.append(fault)

    def _take(self, bucket: list[T], path: str, *, aimed_only: bool = False) -> T | None:
        # `aimed_only`: a request only faults aimed at its path strike (a token request, a $batch part): the
        # unaimed ones are for the API's own requests.
        with self._lock:
            for fault in bucket:
                aimed = not aimed_only if fault.path_contains is None else fault.path_contains in path
                if fault.remaining > 0 and aimed:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        bucket.remove(fault)
                    return fault
        return None
