"""The SQLite state store keeps any str exactly, lone surrogates included, and keeps distinct keys distinct."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.ports import Link, Snapshot
from shared.runtime.embedded import SqliteStateStore

# Surrogates are drawn on purpose: st.text() leaves them out by default.
_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_any_text, min_size=1, max_size=6, unique=True), _any_text)
def test_any_keys_and_values_round_trip_and_stay_distinct(keys: list[str], value: str) -> None:
    async def run() -> None:
        store = SqliteStateStore(":memory:")
        try:
            assert await store.remember("ns", keys[:1]) == set()
            assert await store.remember("ns", keys) == set(keys[:1])
            await store.put_links([Link("e", "a", k, "b", f"{k}|{value}") for k in keys])
            assert await store.get_links("e", "a", keys, "b") == {k: f"{k}|{value}" for k in keys}
            snaps = [Snapshot("s", "t", k, {value: [k, value]}, value, datetime(2026, 1, 1, tzinfo=UTC)) for k in keys]
            await store.put_snapshots(snaps)
            assert await store.get_snapshots("s", "t", keys) == {s.key: s for s in snaps}
        finally:
            await store.close()

    asyncio.run(run())
