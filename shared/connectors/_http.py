"""Shared HTTP plumbing for connectors: short in-call retries honouring Retry-After, error mapping, call counts."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx

from shared.core.errors import AmbiguousWriteError, RetriableError, SyncError, ThrottledError, TransientError

log = logging.getLogger(__name__)

RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
"""Transport failures before any byte of the request left: resending can never apply a request twice."""


def maybe_applied(exc: httpx.TransportError) -> bool:
    """Whether a request that failed with `exc` may have reached the server (read timeout, reset after send)."""
    return not isinstance(exc, UNSENT_ERRORS)


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


def retry_after_value(raw: str | None) -> float | None:
    """A Retry-After value given in seconds (the form Dataverse, F&O and SAP send); None when absent or a date."""
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Parse a Retry-After header given in seconds (the form Dataverse and F&O send)."""
    return retry_after_value(response.headers.get("Retry-After"))


def rewrap(exc: RetriableError, context: str) -> RetriableError:
    """The same retriable kind (and Retry-After) with `context` before its text: says which call failed."""
    detail = f"{context}: {exc.detail}"
    if isinstance(exc, ThrottledError):
        return ThrottledError(detail, retry_after=exc.retry_after)
    if isinstance(exc, AmbiguousWriteError):
        return AmbiguousWriteError(detail)
    return TransientError(detail)


async def send_with_retry(
    send: Callable[[], Awaitable[httpx.Response]],
    *,
    system: str,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    retriable_status: frozenset[int] = RETRIABLE_STATUS,
    idempotent: bool = True,
) -> httpx.Response:
    """Call `send` until it returns a non-retriable response or the attempts run out.

    Network errors and retriable statuses are retried with back-off (Retry-After wins when present).
    The final retriable failure raises ThrottledError (429) or TransientError (others, network). Any
    other response, success or error, is returned for the connector to interpret.

    A non-idempotent request (a create) is resent only after a failure that proves it never left (connect
    errors, pool timeouts); a timeout or a reset after it was sent raises AmbiguousWriteError at once, so the
    caller looks the record up before anything is sent again. Its `retriable_status` must hold only statuses
    that mean "refused before processing" (429, 503).
    """
    last_error: SyncError | None = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            response = await send()
        except httpx.TransportError as exc:
            if not idempotent and maybe_applied(exc):
                raise AmbiguousWriteError(f"{system}: no answer after the request was sent ({type(exc).__name__}); "
                                          "it may have been applied") from exc
            if isinstance(exc, httpx.TimeoutException):
                last_error = TransientError(f"{system}: request timed out ({type(exc).__name__})")
            else:
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


async def request_with_retry(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    system: str,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    retriable_status: frozenset[int],
    idempotent: bool = True,
    headers: dict[str, str],
    params: Mapping[str, str] | None = None,
    content: bytes | None = None,
) -> httpx.Response:
    """One request through `send_with_retry`; a failure that outlived the retries names the call (`what`)."""

    async def attempt() -> httpx.Response:
        return await http.request(method, url, params=params, content=content, headers=headers)

    try:
        return await send_with_retry(attempt, system=system, policy=policy, sleep=sleep,
                                     retriable_status=retriable_status, idempotent=idempotent)
    except RetriableError as exc:
        raise rewrap(exc, f"{system} {what}") from exc


def not_attempted(cause: SyncError, what: str) -> SyncError:
    """The error of a write left unsent because the system refused the call (auth, throttling) for another
    record: the same retriable kind (so the queue waits for the system), with a text about this record."""
    detail = f"{what}: the system refused another write of the same call ({cause.reason}); retried later"
    if isinstance(cause, ThrottledError):
        return ThrottledError(detail, retry_after=cause.retry_after, reason=cause.reason)
    try:
        return type(cause)(detail, reason=cause.reason)
    except TypeError:  # a subclass with its own constructor
        return TransientError(detail, reason=cause.reason)


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
