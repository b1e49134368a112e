"""`TableStateStore` on Azurite beyond the shared contract: re-linking against SQLite, odd keys, big values."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.ports import AuditEntry, Link, Snapshot
from shared.runtime.azure import TableStateStore
from shared.runtime.embedded import SqliteStateStore
from tests.contract.adapters.azure_tables import drop_tables, fresh_prefix, tables_connection_string
from tests.link_cases import (  # noqa: F401 - collected here, against this module's `store`
    test_count_and_iter_links,
    test_relinking_a_key_replaces_the_old_link_in_both_directions,
    test_relinking_across_two_links_keeps_the_mapping_one_to_one,
    test_the_last_link_of_a_key_in_one_batch_wins,
)

pytestmark = pytest.mark.integration
AnyStore = SqliteStateStore | TableStateStore

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
#: Every ASCII character, the characters Azure Table keys forbid, and what our escaping uses itself.
ODD_KEYS = [
    "".join(map(chr, range(0x20, 0x7F))),
    "a/b\\c#d?e%2F'~7E|",
    "\x00\x01\t\n\x1f\x7f\x80\x9f",
    "Zürich Süd ✓ 😀",
    "",
]


@asynccontextmanager
async def open_tables(request: pytest.FixtureRequest) -> AsyncIterator[TableStateStore]:
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix())
    try:
        yield store
    finally:
        await store.close()
        await drop_tables(conn_str, store.table_names)


@pytest.fixture
async def tables(request: pytest.FixtureRequest) -> AsyncIterator[TableStateStore]:
    async with open_tables(request) as store:
        yield store


@pytest.fixture(params=["sqlite", "azure-tables"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[AnyStore]:
    """The same scenario against the reference (SQLite) and against Table Storage."""
    if request.param == "sqlite":
        reference = SqliteStateStore(":memory:")
        yield reference
        await reference.close()
    else:
        async with open_tables(request) as store:
            yield store


# --------------------------------------------------------------- re-linking: the same as SqliteStateStore


async def snapshot_of_links(store: AnyStore, systems: list[str]) -> dict[str, object]:
    state: dict[str, object] = {"count": await store.count_links(), "count-e1": await store.count_links("e1")}
    for entity in ("e1", "e2"):
        for system in systems:
            for other in systems:
                state[f"{entity}:{system}->{other}"] = await store.iter_links(entity, system, other)
    return state


async def test_random_link_batches_end_exactly_as_in_sqlite(tables: TableStateStore) -> None:
    reference = SqliteStateStore(":memory:")
    rng = random.Random(7)
    systems = ["arcgis", "dataverse", "sap"]
    for _ in range(25):
        batch = []
        for _ in range(rng.randint(1, 12)):
            system_a, system_b = rng.choice(systems), rng.choice(systems)
            if system_a == system_b and rng.random() < 0.8:  # a few links within one system too
                continue
            batch.append(Link(rng.choice(["e1", "e2"]), system_a, f"k{rng.randint(0, 5)}", system_b,
                              f"k{rng.randint(0, 5)}"))
        await reference.put_links(batch)
        await tables.put_links(batch)

        assert await snapshot_of_links(tables, systems) == await snapshot_of_links(reference, systems)
    await reference.close()


async def test_racing_relinks_leave_a_consistent_one_to_one_mapping(request: pytest.FixtureRequest) -> None:
    conn_str = tables_connection_string(request)
    prefix = fresh_prefix()
    first = TableStateStore.from_connection_string(conn_str, table_prefix=prefix)
    second = TableStateStore.from_connection_string(conn_str, table_prefix=prefix)
    try:
        for round_ in range(8):
            await asyncio.gather(
                first.put_links([Link("p", "arcgis", "g", "dataverse", f"d-{round_}-a")]),
                second.put_links([Link("p", "arcgis", "g", "dataverse", f"d-{round_}-b")]),
            )
            pairs = await first.iter_links("p", "arcgis", "dataverse")
            assert len(pairs) == 1
            assert await first.iter_links("p", "dataverse", "arcgis") == [(pairs[0][1], "g")]
    finally:
        await first.close()
        await second.close()
        await drop_tables(conn_str, first.table_names)


# ------------------------------------------------------------------------------------- keys and names


async def test_odd_keys_and_names_round_trip_through_every_operation(tables: TableStateStore) -> None:
    for odd in ODD_KEYS:
        await tables.put_links([Link(f"e{odd}", f"s{odd}", odd, "other", f"o{odd}")])
        assert await tables.get_links(f"e{odd}", f"s{odd}", [odd], "other") == {odd: f"o{odd}"}
        assert await tables.iter_links(f"e{odd}", "other", f"s{odd}") == [(f"o{odd}", odd)]

        snap = Snapshot(f"sys{odd}", f"t{odd}", odd, {odd: odd}, "h", None)
        await tables.put_snapshots([snap])
        assert await tables.get_snapshots(f"sys{odd}", f"t{odd}", [odd]) == {odd: snap}
        await tables.delete_snapshots(f"sys{odd}", f"t{odd}", [odd])
        assert await tables.get_snapshots(f"sys{odd}", f"t{odd}", [odd]) == {}

        created = await tables.put_checkpoint(f"cp{odd}", odd, expected_etag=None)
        assert await tables.get_checkpoint(f"cp{odd}") == created

        assert await tables.remember(f"ns{odd}", [odd]) == set()
        assert await tables.remember(f"ns{odd}", [odd, "x"]) == {odd}

    entries = [AuditEntry(T0, odd, "f", "written", odd, odd, odd, detail=odd) for odd in ODD_KEYS]
    await tables.append_audit(entries)
    assert {e.key for e in await tables.read_audit()} == set(ODD_KEYS)
    assert await tables.read_audit(correlation_id=ODD_KEYS[1]) == [entries[1]]
    assert await tables.count_links() == len(ODD_KEYS)


async def test_a_key_too_long_for_the_service_is_refused_before_anything_is_written(
    tables: TableStateStore,
) -> None:
    with pytest.raises(ValueError, match="at most 512"):
        await tables.put_snapshots([
            Snapshot("arcgis", "parcels", "ok", {}, "h", None),
            Snapshot("arcgis", "parcels", "k" * 600, {}, "h", None),
        ])

    assert await tables.get_snapshots("arcgis", "parcels", ["ok"]) == {}


def test_a_bad_table_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="table_prefix"):
        TableStateStore.from_connection_string("UseDevelopmentStorage=true", table_prefix="bad-prefix")


async def test_identity_based_construction_needs_no_network() -> None:
    store = TableStateStore.from_endpoint("https://example.table.core.windows.net")

    assert store.table_names[0] == "synclinelinks"
    await store.close()  # closes the DefaultAzureCredential it made


# ----------------------------------------------------------------------------------------- big values


async def test_large_values_span_several_properties(tables: TableStateStore) -> None:
    rings = [[[round(i * 0.001, 3), round(i * 0.002, 3)] for i in range(9000)]]
    snaps = [
        Snapshot("arcgis", "parcels", "polygon", {"@geometry": {"rings": rings}}, "h", T0),  # ~180 KB
        Snapshot("arcgis", "parcels", "unicode", {"note": "Zürich ✓ 😀 " * 8000}, "h", None),
    ]

    await tables.put_snapshots(snaps)

    assert await tables.get_snapshots("arcgis", "parcels", ["polygon", "unicode"]) == {s.key: s for s in snaps}


async def test_a_batch_of_large_values_is_cut_below_the_transaction_size_limit(tables: TableStateStore) -> None:
    snaps = [Snapshot("arcgis", "parcels", f"k{i}", {"blob": f"{i}:" + "x" * 300_000}, "h", None) for i in range(16)]

    await tables.put_snapshots(snaps)  # ~4.8 MB: one 4 MiB transaction could not carry it

    got = await tables.get_snapshots("arcgis", "parcels", [s.key for s in snaps])
    assert [got[s.key].values for s in snaps] == [s.values for s in snaps]


async def test_values_beyond_one_entity_are_refused_with_a_clear_error(tables: TableStateStore) -> None:
    with pytest.raises(ValueError, match=r"snapshot arcgis/parcels/huge is 500,011 UTF-16 units .*1 MiB per entity"):
        await tables.put_snapshots([Snapshot("arcgis", "parcels", "huge", {"blob": "x" * 500_000}, "h", None)])


# ---------------------------------------------------------------------------------------------- audit


async def test_audit_order_for_equal_times_zones_and_many_entries(tables: TableStateStore) -> None:
    minus_five = timezone(timedelta(hours=-5))
    await tables.append_audit([AuditEntry(T0, "c", "f", "written", "s", "t", "first")])
    await tables.append_audit([AuditEntry(T0, "c", "f", "written", "s", "t", "second")])
    await tables.append_audit([
        AuditEntry(datetime(2025, 3, 1, 8, 30, tzinfo=minus_five), "c", "f", "written", "s", "t", "later"),
    ])
    many = [AuditEntry(T0 - timedelta(days=1, seconds=i), "bulk", "f", "written", "s", "t", f"b{i}")
            for i in range(250)]
    await tables.append_audit(many)

    got = await tables.read_audit(limit=1000)

    assert [e.key for e in got[:3]] == ["later", "second", "first"]
    assert got[0].at == datetime(2025, 3, 1, 13, 30, tzinfo=UTC)
    assert [e.key for e in got[3:]] == [f"b{i}" for i in range(250)]
    assert [e.key for e in await tables.read_audit(limit=2, correlation_id="bulk")] == ["b0", "b1"]


async def test_a_long_audit_detail_is_kept_whole(tables: TableStateStore) -> None:
    entry = AuditEntry(T0, "c", "f", "dead_lettered", "s", "t", "k", detail="é" * 50_000, reason="TARGET_REJECTED")

    await tables.append_audit([entry])

    assert await tables.read_audit() == [entry]


# --------------------------------------------------------------------- reading many keys: range queries

#: Keys that sort differently by code point (Python) and by UTF-16 unit (the service), escape to `~XX`, or mix case.
RANGE_ALPHABET = "AZaz09-_.~|/ %'AZaz09é\u00a0\uffef😀"


def _kinds(store: TableStateStore) -> dict[str, int]:
    return {kind: n for (table, kind), n in store.requests.counts.items() if table.endswith(("links", "snapshots"))}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    universe=st.lists(st.text(RANGE_ALPHABET, max_size=4), min_size=10, max_size=60, unique=True),
    data=st.data(),
    page=st.sampled_from([1, 3, 7, 1000]),
)
def test_many_keys_read_exactly_what_is_stored_across_pages_and_odd_keys(
        request: pytest.FixtureRequest, universe: list[str], data: st.DataObject, page: int) -> None:
    """Whatever the keys and the page size, a key is found iff it is stored: a key passed over by a range query is
    absent, never a stored key missed (that would create a twin record in the target)."""
    stored = data.draw(st.lists(st.sampled_from(universe), unique=True), label="stored")
    # from 8 keys on, a partition's keys are read with range queries
    wanted = data.draw(st.lists(st.sampled_from(universe), min_size=8, unique=True), label="wanted")
    conn_str = tables_connection_string(request)

    async def scenario() -> None:
        store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), query_page=page)
        try:
            snaps = [Snapshot("arcgis", "parcels", key, {"k": key}, f"h{key}", None) for key in stored]
            await store.put_snapshots(snaps)
            await store.put_links([Link("parcel", "arcgis", key, "dataverse", f"d{key}") for key in stored])
            assert await store.get_snapshots("arcgis", "parcels", wanted) == {s.key: s for s in snaps
                                                                              if s.key in wanted}
            assert await store.get_links("parcel", "arcgis", wanted, "dataverse") == {
                key: f"d{key}" for key in stored if key in wanted}
            assert await store.get_links("parcel", "dataverse", [f"d{key}" for key in wanted], "arcgis") == {
                f"d{key}": key for key in stored if key in wanted}
        finally:
            names = store.table_names
            await store.close()
            await drop_tables(conn_str, names)

    asyncio.run(scenario())


async def test_a_dense_batch_costs_a_query_per_page_not_a_read_per_key(request: pytest.FixtureRequest) -> None:
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), query_page=100)
    try:
        keys = [f"{{{n:08X}-0000-4000-8000-{n:012X}}}" for n in range(1000)]
        await store.put_snapshots([Snapshot("arcgis", "parcels", k, {"n": n}, "h", None) for n, k in enumerate(keys)])
        wanted = [*keys[::4], "{absent}", "{zzz}"]  # every fourth row: 25 wanted per page of 100
        store.requests.reset()

        found = await store.get_snapshots("arcgis", "parcels", wanted)

        assert sorted(found) == sorted(keys[::4])
        kinds = _kinds(store)
        assert "read" not in kinds, kinds
        assert kinds["query"] <= 1000 // 100 + 2, kinds  # the pages of the range, plus a partial one per run
    finally:
        names = store.table_names
        await store.close()
        await drop_tables(conn_str, names)


async def test_a_sparse_batch_falls_back_to_point_reads_after_one_page(request: pytest.FixtureRequest) -> None:
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), query_page=200)
    try:
        keys = [f"k{n:05d}" for n in range(3000)]
        await store.put_snapshots([Snapshot("arcgis", "parcels", k, {"n": n}, "h", None) for n, k in enumerate(keys)])
        wanted = [*keys[::300], "k99999"]  # a page of 200 rows settles one wanted key: under 10 per 1,000 rows
        store.requests.reset()

        assert sorted(await store.get_snapshots("arcgis", "parcels", wanted)) == keys[::300]
        first = _kinds(store)
        # one page, then a point read for each key the page did not reach (not 12 pages of mostly other rows)
        assert first.get("query") == 1, first
        assert first.get("read", 0) >= len(wanted) - 2, first

        store.requests.reset()
        assert sorted(await store.get_snapshots("arcgis", "parcels", wanted)) == keys[::300]
        # the partition is known to be sparse for a while: straight to point reads, no wasted page
        assert _kinds(store) == {"read": len(wanted)}, _kinds(store)
    finally:
        names = store.table_names
        await store.close()
        await drop_tables(conn_str, names)


async def test_a_partition_found_sparse_by_a_small_batch_is_read_by_range_for_a_big_dense_one(
        request: pytest.FixtureRequest) -> None:
    """A small batch (the tail of a drain) finding a partition sparse must not send the big batches that follow,
    dense in the same rows, to a point read per key for the next ten minutes (issue 14's 10,000-record bench)."""
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), query_page=200)
    try:
        keys = [f"k{n:05d}" for n in range(3000)]
        await store.put_snapshots([Snapshot("arcgis", "parcels", k, {"n": n}, "h", None) for n, k in enumerate(keys)])
        sparse = keys[::300]
        assert sorted(await store.get_snapshots("arcgis", "parcels", sparse)) == sparse
        store.requests.reset()

        dense = keys[1000:1400:2]  # 200 keys, one row in two: twice the keys of the sparse call, and dense
        assert sorted(await store.get_snapshots("arcgis", "parcels", dense)) == dense
        kinds = _kinds(store)
        assert kinds.get("read", 0) == 0, kinds
        assert 2 <= kinds.get("query", 0) <= 6, kinds

        store.requests.reset()
        assert sorted(await store.get_snapshots("arcgis", "parcels", sparse)) == sparse
        assert _kinds(store) == {"query": 1, "read": len(sparse) - 1}  # dense again: the small one probes again
    finally:
        names = store.table_names
        await store.close()
        await drop_tables(conn_str, names)


async def test_a_read_sees_every_write_before_it(request: pytest.FixtureRequest) -> None:
    """Nothing is cached between calls: a link or snapshot written, replaced or removed between two reads of a
    batch's keys shows in the second read (each read goes to the service)."""
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), query_page=5)
    other = TableStateStore.from_connection_string(conn_str, table_prefix=store.table_names[0][:-len("links")])
    try:
        keys = [f"g{n:03d}" for n in range(40)]
        await store.put_links([Link("parcel", "arcgis", k, "dataverse", f"d{k}") for k in keys[::2]])
        assert len(await store.get_links("parcel", "arcgis", keys, "dataverse")) == 20

        await other.put_links([Link("parcel", "arcgis", keys[1], "dataverse", "new"),
                               Link("parcel", "arcgis", "x", "dataverse", f"d{keys[0]}")])  # re-links g000's partner

        found = await store.get_links("parcel", "arcgis", keys, "dataverse")
        assert found[keys[1]] == "new"
        assert keys[0] not in found
        assert len(found) == 20
    finally:
        names = store.table_names
        await other.close()
        await store.close()
        await drop_tables(conn_str, names)


async def test_keys_the_service_orders_otherwise_than_python_are_never_passed_over(
        request: pytest.FixtureRequest) -> None:
    """By UTF-16 unit (the service) an astral character sorts before U+FFEF, by code point (Python) after it: a
    range query bounded by Python's order would pass over a stored key and report it absent."""
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), query_page=3)
    try:
        keys = [*(f"k{n}" for n in range(8)), "\uffefx", "😀x", "\uffef", "😀", "é"]
        await store.put_links([Link("parcel", "arcgis", k, "dataverse", f"d{n}") for n, k in enumerate(keys)])
        await store.put_snapshots([Snapshot("arcgis", "parcels", k, {"n": n}, "h", None) for n, k in enumerate(keys)])

        assert await store.get_links("parcel", "arcgis", keys, "dataverse") == {k: f"d{n}" for n, k in enumerate(keys)}
        assert sorted(await store.get_snapshots("arcgis", "parcels", keys)) == sorted(keys)
    finally:
        names = store.table_names
        await store.close()
        await drop_tables(conn_str, names)
