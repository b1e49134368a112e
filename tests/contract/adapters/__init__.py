"""Registry of contract-suite backends: every adapter module adds its queue and/or state builder here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from shared.core.ports import StateStore

Builder = Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[Any]]

QUEUE_BUILDERS: dict[str, Builder] = {}
STATE_BUILDERS: dict[str, Builder] = {}

RUNTIMES = {"embedded": ("embedded", "embedded"), "azure": ("servicebus", "azure-tables")}
"""Each runtime's (queue builder, state builder): SQLite queue + state, Service Bus + Table Storage."""


@asynccontextmanager
async def runtime_adapters(request: pytest.FixtureRequest, tmp_path: Path, *, lock_duration_seconds: float,
                           max_delivery_count: int) -> AsyncIterator[tuple[Any, StateStore]]:
    """The queue harness and a state store of the runtime `request.param` names (a RUNTIMES key)."""
    queue_kind, state_kind = RUNTIMES[request.param]
    async with QUEUE_BUILDERS[queue_kind](request, tmp_path) as make_queue, \
            STATE_BUILDERS[state_kind](request, tmp_path) as make_state:
        harness = await make_queue(lock_duration_seconds=lock_duration_seconds,
                                   max_delivery_count=max_delivery_count)
        yield harness, await make_state()


@asynccontextmanager
async def opened_states(
    open_store: Callable[[], StateStore],
    after: Callable[[list[StateStore]], Awaitable[None]] | None = None,
) -> AsyncIterator[Callable[[], Awaitable[StateStore]]]:
    """A state builder's `make()`: each store it opens is closed at the end, then `after` sees them all."""
    opened: list[StateStore] = []

    async def make() -> StateStore:
        store = open_store()
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.close()
        if after is not None:
            await after(opened)


def _load() -> None:
    # Import order is the registration order; each module registers itself on import.
    from tests.contract.adapters import azure_tables, embedded, servicebus  # noqa: F401


_load()
__all__ = ["QUEUE_BUILDERS", "RUNTIMES", "STATE_BUILDERS", "AsyncIterator", "Builder", "opened_states",
           "runtime_adapters"]
