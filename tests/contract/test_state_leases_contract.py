"""Contract of the `StateStore` failed-attempt counters and per-record leases, on every state adapter."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.contract.conftest import StateFactory

# ---------------------------------------------------------------------------------------- failed attempts


async def test_failures_count_per_key_and_clear(state_factory: StateFactory) -> None:
    store = await state_factory()
    assert await store.record_failures(["m-1", "m-2"]) == {"m-1": 1, "m-2": 1}
    assert await store.record_failures(["m-1"]) == {"m-1": 2}
    assert await store.record_failures(["m-1", "m-1", "m-3"]) == {"m-1": 3, "m-3": 1}  # a key counts once a call

    await store.clear_failures(["m-1", "never-failed"])
    assert await store.record_failures(["m-1", "m-2"]) == {"m-1": 1, "m-2": 2}
    assert await store.record_failures([]) == {}
    await store.clear_failures([])


async def test_failures_raised_by_two_clients_at_once_are_all_counted(state_factory: StateFactory) -> None:
    first, second = await state_factory(), await state_factory()
    await asyncio.gather(*(client.record_failures(["m-1"]) for _ in range(5) for client in (first, second)))
    assert await first.record_failures(["m-1"]) == {"m-1": 11}


async def test_failures_past_the_retention_are_forgotten(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.record_failures(["old"])
    assert await store.forget_failures(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.forget_failures(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.record_failures(["old"]) == {"old": 1}


# ------------------------------------------------------------------------------------------------ leases


async def test_a_lease_is_held_by_one_owner_until_released(state_factory: StateFactory) -> None:
    store = await state_factory()
    keys = ["fno:CustomersV3:C-1", "sap:A_BusinessPartner:17100001"]
    assert await store.acquire_leases(keys, "owner-a", 60) == set(keys)
    assert await store.acquire_leases([*keys, "free"], "owner-b", 60) == {"free"}
    assert await store.acquire_leases(keys, "owner-a", 60) == set(keys)  # renewal by the holder

    await store.release_leases(keys, "owner-b")  # not b's: nothing happens
    assert await store.acquire_leases(keys, "owner-c", 60) == set()
    await store.release_leases(keys[:1], "owner-a")
    assert await store.acquire_leases(keys, "owner-c", 60) == {keys[0]}
    assert await store.acquire_leases([], "owner-c", 60) == set()


async def test_leases_are_seen_by_every_client(state_factory: StateFactory) -> None:
    one, other = await state_factory(), await state_factory()
    assert await one.acquire_leases(["k"], "a", 60) == {"k"}
    assert await other.acquire_leases(["k"], "b", 60) == set()
    await other.release_leases(["k"], "a")  # a release by owner, from another client of the store
    assert await other.acquire_leases(["k"], "b", 60) == {"k"}
    assert await one.acquire_leases(["k"], "a", 60) == set()


async def test_an_expired_lease_is_taken_over_and_the_old_owner_cannot_release_it(state_factory: StateFactory) -> None:
    store, other = await state_factory(), await state_factory()
    assert await store.acquire_leases(["k", "j"], "crashed", 0.5) == {"k", "j"}
    assert await other.acquire_leases(["k"], "next", 60) == set()
    await asyncio.sleep(1.0)
    assert await other.acquire_leases(["k"], "next", 60) == {"k"}
    await store.release_leases(["k", "j"], "crashed")  # too late for k: it is next's now
    assert await store.acquire_leases(["k", "j"], "third", 60) == {"j"}
    # renewal by the old owner after a takeover fails too
    assert await store.acquire_leases(["k"], "crashed", 60) == set()


async def test_concurrent_acquirers_never_share_a_lease(state_factory: StateFactory) -> None:
    clients = [await state_factory() for _ in range(3)]
    keys = [f"sap:A_SalesOrder:{n}" for n in range(250)]  # several transactions per partition
    results = await asyncio.gather(*(c.acquire_leases(keys, f"owner-{i}", 60) for i, c in enumerate(clients)))
    for i, mine in enumerate(results):
        for j, theirs in enumerate(results):
            if i != j:
                assert not mine & theirs
    assert set().union(*results) == set(keys)
    for i, (client, mine) in enumerate(zip(clients, results, strict=True)):
        await client.release_leases(sorted(mine), f"owner-{i}")
    assert await clients[0].acquire_leases(keys, "after", 60) == set(keys)
