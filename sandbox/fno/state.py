"""The state every part of the F&O simulator shares: declared here, set by `FinOpsSimulator.__init__`."""

from __future__ import annotations

import queue
import random
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sandbox.dataverse import DataverseSimulator
from sandbox.faults import SLOW, FaultKnobs, KnobFault
from sandbox.fno.schema import Entity


@dataclass
class Throttling:
    """User-based service protection: at most `limit` requests per sliding `window_seconds` (None = off)."""

    limit: int | None = None
    window_seconds: int = 300


@dataclass
class _Delivery:
    url: str
    body: bytes


class FnoFaults(FaultKnobs):
    """The shared fault knobs, and token expiry through the composed Entra simulator."""

    def __init__(self, sim: FnoState) -> None:
        super().__init__()
        self._sim = sim

    def expire_tokens(self) -> None:
        """Invalidate every access token issued so far (the next API call gets 401)."""
        self._sim.entra.faults.expire_tokens()

    def slow_next(self, n: int, seconds: float, path_contains: str | None = None, *,
                  method: str | None = None) -> None:
        """Hold the next `n` matching requests `seconds` before applying and answering them normally: a client
        with a shorter timeout gives up, and the write still lands (late), as on an overloaded server."""
        with self._lock:
            self._fail.extend(KnobFault(SLOW, path_contains, method.upper() if method else None, after_apply=True,
                                        delay=seconds) for _ in range(n))


class FnoState:
    """Attribute declarations only: each part (store, events) is a base class of `FinOpsSimulator`."""

    entities: dict[str, Entity]
    enums: dict[str, list[tuple[str, int]]]
    """Enum type -> (member, value) as `$metadata` shows them (tests add and remove members)."""
    entra: DataverseSimulator
    tenant_id: str
    client_id: str
    client_secret: str
    page_size: int
    latency_ms: float
    clock: Callable[[], float]
    throttling: Throttling
    faults: FnoFaults
    request_counts: Counter[str]
    requests: list[tuple[str, str]]
    event_endpoints: list[str]
    events_delivered: list[bytes]
    event_failures: list[str]
    event_retry_delay: float
    currencies: dict[str, str]
    _event_verify: Any
    _lock: threading.RLock
    _tables: dict[str, dict[tuple[str, ...], dict[str, Any]]]
    _fields: dict[str, set[str]]
    _sequences: Counter[tuple[str, str]]
    _documents: Counter[tuple[str, str]]
    _row_version: int
    _last_modified: datetime
    _window: deque[float]
    _control_number: int
    _rng: random.Random
    _last_event: _Delivery | None
    _outbox: queue.Queue[_Delivery | None]
    _pending: int
    _worker: threading.Thread | None
