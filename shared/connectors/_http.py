"""Shared HTTP plumbing for connectors: short in-call retries honouring Retry-After, error mapping, call counts."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from shared.core.errors import RetriableError, SyncError, ThrottledError, TransientError

log = logging.getLogger(__name__)

RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """In-invocation retries only: long back-off belongs to the queue (scheduled resubmission)."""

    max_attempts: int = 4
    """Total attempts including the first."""
    initial_backoff: float = 0.25
    """Seconds before the second attempt; doubles each time (with jitter)."""
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    """A server asking us to wait longer than this makes the call fail as ThrottledError (defer to queue)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("backoff must satisfy 0 <= initial_backoff <= max_backoff")

    def backoff(self, attempt: int) -> float:
        """Delay before attempt `attempt + 1` (attempt counts from 1)."""
        base = min(self.max_backoff, self.initial_backoff * (2 ** (attempt - 1)))
        return float(base * (0.5 + random.random() / 2))


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Parse a Retry-After header given in seconds (the form Dataverse and F&O send)."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


async def send_with_retry(
    send: Callable[[], Awaitable[httpx.Response]],
    *,
    system: str,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    retriable_status: frozenset[int] = RETRIABLE_STATUS,
) -> httpx.Response:
    """Call `send` until it returns a non-retriable response or the attempts run out.

    Network errors and retriable statuses are retried with back-off (Retry-After wins when present).
    The final retriable failure raises ThrottledError (429) or TransientError (others, network). Any
    other response, success or error, is returned for the connector to interpret.
    """
    last_error: SyncError | None = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            response = await send()
        except httpx.TimeoutException as exc:
            last_error = TransientError(f"{system}: request timed out ({type(exc).__name__})")
        except httpx.TransportError as exc:
            last_error = TransientError(f"{system}: network error ({type(exc).__name__}: {exc})")
        else:
            if response.status_code not in retriable_status:
                return response
            wait = retry_after_seconds(response)
            if response.status_code == 429:
                last_error = ThrottledError(
                    f"{system}: throttled (HTTP 429){f', retry after {wait:.0f}s' if wait is not None else ''}",
                    retry_after=wait,
                )
            else:
                last_error = TransientError(f"{system}: HTTP {response.status_code} from the service")
            if wait is not None and wait > policy.max_retry_after:
                raise last_error
            if attempt < policy.max_attempts:
                delay = wait if wait is not None else policy.backoff(attempt)
                log.info("%s: HTTP %s, retrying in %.2fs (attempt %d/%d)", system, response.status_code, delay,
                         attempt, policy.max_attempts)
                await sleep(delay)
                continue
            raise last_error
        if attempt < policy.max_attempts:
            await sleep(policy.backoff(attempt))
    assert last_error is not None
    raise last_error


class CallCounter:
    """Counts HTTP requests per system (for the demo report, the benchmark and metrics).

    Attach with `httpx.AsyncClient(event_hooks={"request": [counter.hook(system)]})`.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def hook(self, system: str) -> Callable[[httpx.Request], Awaitable[None]]:
        async def _count(request: httpx.Request) -> None:
            self.counts[system] += 1

        return _count

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def is_retriable(error: BaseException) -> bool:
    """True for errors the queue should retry."""
    return isinstance(error, RetriableError)
