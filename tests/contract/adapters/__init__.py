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
__all__ = ["QUEUE_BUILDERS", "STATE_BUILDERS", "AsyncIterator", "Builder", "opened_states"]
