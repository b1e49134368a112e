"""The circuit breaker of one target system, as pure logic: its states, transitions and failure counting."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from shared.core.errors import AmbiguousWriteError, RetriableError, SyncError, ThrottledError, TransientError

State = Literal["closed", "open", "half_open"]

BREAKER_PREFIX = "breaker:"
"""Checkpoint `breaker:<system>` holds the system's breaker (`Breaker.to_json`), moved by compare-and-set."""


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open (the SYNCLINE_BREAKER_* settings)."""

    consecutive_failures: int = 5
    """Retriable failures in a row (no answered call between them) that open the breaker."""
    error_rate: float = 0.5
    """Share of failed calls within `window_seconds` that opens the breaker (with at least `min_calls` calls)."""
    window_seconds: float = 60.0
    min_calls: int = 10
    cooldown_seconds: float = 60.0
    """How long an opened breaker stays open before one probe is sent."""
    max_cooldown_seconds: float = 900.0
    """Each failed probe multiplies the cool-down by `backoff`, up to this."""
    backoff: float = 2.0
    probe_lease_seconds: float = 60.0
    """A half-open breaker whose prober went silent this long (a crashed instance) may be probed again."""


@dataclass(frozen=True)
class Breaker:
    """One system's breaker as stored: `probe_at` is when it may be probed (open) or the probe's lease ends
    (half-open); `cooldown_seconds` is the cool-down it opened with (it grows with failed probes)."""

    state: State = "closed"
    since: datetime | None = None
    cause: str = ""
    failures: int = 0
    probe_at: datetime | None = None
    cooldown_seconds: float = 0.0

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        for name in ("since", "probe_at"):
            data[name] = data[name].isoformat() if data[name] else None
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Breaker:
        """Parse a stored breaker; anything unreadable is a closed breaker (never a reason to stop calling)."""
        try:
            data = json.loads(text)
            state = data.get("state")
            if state not in ("closed", "open", "half_open"):
                return cls()
            return cls(state=state, since=_time(data.get("since")), cause=str(data.get("cause") or ""),
                       failures=int(data.get("failures") or 0), probe_at=_time(data.get("probe_at")),
                       cooldown_seconds=float(data.get("cooldown_seconds") or 0.0))
        except (ValueError, TypeError, AttributeError):
            return cls()

    def blocked_until(self, now: datetime) -> datetime | None:
        """Until when no call may be sent (None: calls may go, or a probe is due)."""
        if self.state == "closed" or self.probe_at is None or self.probe_at <= now:
            return None
        return self.probe_at

    def probe_due(self, now: datetime) -> bool:
        """Open past its cool-down, or half-open with an expired probe lease: one caller may probe."""
        return self.state != "closed" and (self.probe_at is None or self.probe_at <= now)


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"not a time: {value!r}")
    return datetime.fromisoformat(value)


def opened(previous: Breaker | None, now: datetime, cause: str, failures: int, policy: BreakerPolicy, *,
           until: datetime | None = None) -> Breaker:
    """The breaker opened: by the system's own advice (`until`, a spent allocation) or for a cool-down.

    A re-opening after a failed probe grows the cool-down (`backoff`, capped at `max_cooldown_seconds`)."""
    if until is not None:
        seconds = max((until - now).total_seconds(), 0.0)
        return Breaker("open", now, cause, failures, until, seconds)
    cooldown = policy.cooldown_seconds
    if previous is not None and previous.state == "half_open" and previous.cooldown_seconds > 0:
        cooldown = min(max(previous.cooldown_seconds * policy.backoff, policy.cooldown_seconds),
                       policy.max_cooldown_seconds)
    return Breaker("open", now, cause, failures, now + timedelta(seconds=cooldown), cooldown)


def probing(current: Breaker, now: datetime, policy: BreakerPolicy) -> Breaker:
    """The breaker half-opened: one caller's probe is under way, leased until `probe_at`."""
    return replace(current, state="half_open", since=now, probe_at=now + timedelta(seconds=policy.probe_lease_seconds))


def closed(now: datetime, cause: str = "probe succeeded") -> Breaker:
    return Breaker("closed", now, cause, 0, None, 0.0)


def counts_against(error: SyncError) -> bool:
    """Whether a failure says the system is unwell (an outage, 5xx, a timeout, throttling), not the record.

    Permanent errors (validation, a refusal) prove the system answered; a pending parent or a busy record is no
    call at all; credentials refused are the AUTH_FAILED alert's, and a breaker would not heal them."""
    return isinstance(error, TransientError | ThrottledError | AmbiguousWriteError) or type(error) is RetriableError


@dataclass
class FailureCounter:
    """One process's count of a system's calls: consecutive failures and a sliding window (no state writes).

    Each instance counts only what it sent: with many instances each needs the threshold on its own share of
    the calls (or the window's rate, which holds per instance just as for all), the price of not writing a
    shared counter on every call of a healthy system."""

    policy: BreakerPolicy
    consecutive: int = 0
    window: deque[tuple[datetime, bool]] = field(default_factory=deque)

    def record(self, now: datetime, *, failed: bool) -> str | None:
        """Count one call; returns why the breaker must open now, or None."""
        self.window.append((now, failed))
        start = now - timedelta(seconds=self.policy.window_seconds)
        while self.window and self.window[0][0] < start:
            self.window.popleft()
        if not failed:
            self.consecutive = 0
            return None
        self.consecutive += 1
        if self.consecutive >= self.policy.consecutive_failures:
            return f"{self.consecutive} consecutive failure{'s' if self.consecutive != 1 else ''}"
        calls = len(self.window)
        bad = sum(1 for _, f in self.window if f)
        if calls >= self.policy.min_calls and bad / calls >= self.policy.error_rate:
            return (f"error rate {bad}/{calls} within {self.policy.window_seconds:g}s "
                    f"(threshold {self.policy.error_rate:.0%})")
        return None

    def failures(self) -> int:
        return max(self.consecutive, sum(1 for _, f in self.window if f))

    def reset(self) -> None:
        self.consecutive = 0
        self.window.clear()
