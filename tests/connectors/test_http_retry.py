"""`send_with_retry`: reads and idempotent writes are retried; a create is never resent once it may have been sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest

from shared.connectors._http import RetryPolicy, send_with_retry
from shared.core.errors import AmbiguousWriteError, ThrottledError, TransientError

POLICY = RetryPolicy(max_attempts=3, initial_backoff=0.0, max_backoff=0.0)
REQUEST = httpx.Request("POST", "https://erp.example/data/CustomersV3")


def answers(*steps: Exception | int) -> tuple[Callable[[], Awaitable[httpx.Response]], list[int]]:
    """A `send` that raises or answers each step in turn, and the list counting its calls."""
    sent: list[int] = []

    async def send() -> httpx.Response:
        step = steps[len(sent)]
        sent.append(1)
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, request=REQUEST)

    return send, sent


async def no_sleep(_: float) -> None:
    return None


@pytest.mark.parametrize("failure", [
    httpx.ReadTimeout("read timed out", request=REQUEST),
    httpx.WriteTimeout("write timed out", request=REQUEST),
    httpx.ReadError("connection reset by peer", request=REQUEST),
    httpx.RemoteProtocolError("server disconnected without sending a response", request=REQUEST),
], ids=lambda e: type(e).__name__)
async def test_a_create_that_may_have_been_sent_is_never_resent(failure: Exception) -> None:
    """Issue 13 defect 4: timeouts and resets after sending were retried for POSTs (twin F&O records)."""
    send, sent = answers(failure, 201)
    with pytest.raises(AmbiguousWriteError, match="may have been applied"):
        await send_with_retry(send, system="fno", policy=POLICY, sleep=no_sleep,
                              retriable_status=frozenset({429, 503}), idempotent=False)
    assert len(sent) == 1


@pytest.mark.parametrize("failure", [
    httpx.ConnectError("connection refused", request=REQUEST),
    httpx.ConnectTimeout("connect timed out", request=REQUEST),
    httpx.PoolTimeout("no free connection", request=REQUEST),
], ids=lambda e: type(e).__name__)
async def test_a_create_that_never_left_is_resent(failure: Exception) -> None:
    send, sent = answers(failure, 503, 201)
    response = await send_with_retry(send, system="fno", policy=POLICY, sleep=no_sleep,
                                     retriable_status=frozenset({429, 503}), idempotent=False)
    assert response.status_code == 201
    assert len(sent) == 3


async def test_a_read_is_retried_after_a_timeout_and_a_reset() -> None:
    send, sent = answers(httpx.ReadTimeout("slow", request=REQUEST), httpx.ReadError("reset", request=REQUEST), 200)
    response = await send_with_retry(send, system="fno", policy=POLICY, sleep=no_sleep)
    assert response.status_code == 200
    assert len(sent) == 3


async def test_the_last_retriable_failure_is_raised_with_its_kind() -> None:
    send, _ = answers(httpx.ReadTimeout("slow", request=REQUEST), 503, 504)
    with pytest.raises(TransientError, match="HTTP 504"):
        await send_with_retry(send, system="fno", policy=POLICY, sleep=no_sleep)
    send, _ = answers(429, 429, 429)
    with pytest.raises(ThrottledError):
        await send_with_retry(send, system="fno", policy=POLICY, sleep=no_sleep)
