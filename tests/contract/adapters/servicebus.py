"""Contract-suite builder for the Service Bus queue adapter: the local test broker, or a real namespace."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.runtime.azure import ServiceBusQueue
from tests.contract.adapters import QUEUE_BUILDERS
from tests.sbbroker import BrokerHandle, start_broker

REAL_NAMESPACE_VARIABLE = "SYNCLINE_TEST_SERVICEBUS_CONNECTION_STRING"
_SESSION_WAIT_SECONDS = 0.1  # loopback: a free session is offered within milliseconds
_broker: BrokerHandle | None = None


def _shared_broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """One broker for the whole test session (each test still gets queues of its own)."""
    global _broker
    if _broker is None:
        _broker = start_broker()
        request.config.add_cleanup(_stop_broker)
    return _broker


def _stop_broker() -> None:
    global _broker
    if _broker is not None:
        broker, _broker = _broker, None
        broker.stop()


@asynccontextmanager
async def servicebus_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    """Session-enabled queues, as Syncline runs them (its messages carry the record id as session id).

    On the local broker, `advance` moves the broker's clock, so lock expiry and schedules cost no waiting.
    With `SYNCLINE_TEST_SERVICEBUS_CONNECTION_STRING` set (the connection needs the Manage right), each test
    creates a queue in that namespace and deletes it afterwards, and `advance` really sleeps: expect minutes.
    """
    from tests.contract.conftest import QueueHarness

    real = os.environ.get(REAL_NAMESPACE_VARIABLE)
    opened: list[ServiceBusQueue] = []
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(*, lock_duration_seconds: float = 30.0, max_delivery_count: int = 3) -> QueueHarness:
        name = f"contract-{uuid.uuid4().hex[:12]}"
        if real:
            lock_duration_seconds = max(lock_duration_seconds, 5.0)  # the least Service Bus allows
            await _create_real_queue(real, name, lock_duration_seconds, max_delivery_count, cleanups)
            queue = ServiceBusQueue.from_connection_string(
                real, name, max_delivery_count=max_delivery_count, sessions=True
            )
            now: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731
            advance: Callable[[float], Awaitable[None]] = asyncio.sleep
        else:
            broker = _shared_broker(request)
            broker.create_queue(name, lock_duration=lock_duration_seconds, max_delivery_count=max_delivery_count,
                                requires_session=True)
            queue = ServiceBusQueue.from_connection_string(
                broker.connection_string, name, max_delivery_count=max_delivery_count, sessions=True,
                session_wait_seconds=_SESSION_WAIT_SECONDS,
            )
            clock = broker.clock

            def now() -> datetime:
                return datetime.fromtimestamp(clock.now(), UTC)

            async def advance(seconds: float) -> None:
                await asyncio.to_thread(broker.advance, seconds)

        opened.append(queue)
        return QueueHarness(queue, lock_duration_seconds, now, advance)

    try:
        yield make
    finally:
        for queue in opened:
            await asyncio.wait_for(queue.close(), 30)
        for cleanup in cleanups:
            await cleanup()


async def _create_real_queue(
    conn_str: str, name: str, lock_seconds: float, max_delivery_count: int,
    cleanups: list[Callable[[], Awaitable[None]]],
) -> None:
    from azure.servicebus.aio.management import ServiceBusAdministrationClient

    admin = ServiceBusAdministrationClient.from_connection_string(conn_str)
    await admin.create_queue(name, requires_session=True, lock_duration=timedelta(seconds=lock_seconds),
                             max_delivery_count=max_delivery_count)

    async def delete() -> None:
        async with admin:
            await admin.delete_queue(name)

    cleanups.append(delete)


QUEUE_BUILDERS["servicebus"] = servicebus_queue
