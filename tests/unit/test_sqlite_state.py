"""Tests of what `SqliteStateStore` adds to the state contract: storage, chunking, re-linking, helpers."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.core.ports import AuditEntry, Link, Snapshot, StateStore
from shared.runtime.embedded import SqliteStateStore
from tests.link_cases import (  # noqa: F401 - collected here, against this module's `store`
    test_count_and_iter_links,
    test_relinking_a_key_replaces_the_old_link_in_both_directions,
    test_relinking_across_two_links_keeps_the_mapping_one_to_one,
    test_the_last_link_of_a_key_in_one_batch_wins,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "syncline.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStateStore]:
    opened = SqliteStateStore(db_path)
    yield opened
    await opened.close()


def raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def test_it_implements_the_protocol_and_creates_the_parent_folder(
    store: SqliteStateStore, db_path: Path
) -> None:
    assert isinstance(store, StateStore)
    assert db_path.is_file()
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_in_memory_database_works() -> None:
    store = SqliteStateStore(":memory:")
    await store.put_links([Link("parcel", "arcgis", "g", "dataverse", "d")])

    assert await store.get_links("parcel", "dataverse", ["d"], "arcgis") == {"d": "g"}
    await store.close()


async def test_state_survives_reopening(db_path: Path) -> None:
    first = SqliteStateStore(db_path)
    await first.put_links([Link("parcel", "arcgis", "g", "dataverse", "d")])
    cp = await first.put_checkpoint("c", "1", expected_etag=None)
    await first.close()

    second = SqliteStateStore(db_path)
    assert await second.get_links("parcel", "arcgis", ["g"], "dataverse") == {"g": "d"}
    assert await second.get_checkpoint("c") == cp
    await second.close()


async def test_a_closed_store_refuses_work(db_path: Path) -> None:
    store = SqliteStateStore(db_path)
    await store.close()

    with pytest.raises(sqlite3.ProgrammingError):
        await store.get_checkpoint("c")


# ---------------------------------------------------------------------------------------------- links


async def test_lookups_beyond_one_in_chunk(store: SqliteStateStore) -> None:
    keys = [f"g-{i:05}" for i in range(2500)]
    await store.put_links([Link("parcel", "arcgis", k, "dataverse", f"d-{k}") for k in keys])
    await store.put_snapshots([Snapshot("arcgis", "parcels", k, {"k": k}, "h", None) for k in keys])

    asked = [*keys, "missing", keys[0]]  # a duplicate and an unknown key on top
    assert await store.get_links("parcel", "arcgis", asked, "dataverse") == {k: f"d-{k}" for k in keys}
    assert set(await store.get_snapshots("arcgis", "parcels", asked)) == set(keys)
    assert await store.remember("ns", keys[:1500]) == set()
    assert await store.remember("ns", keys) == set(keys[:1500])

    await store.delete_snapshots("arcgis", "parcels", keys[:2000])
    assert set(await store.get_snapshots("arcgis", "parcels", keys)) == set(keys[2000:])


# ------------------------------------------------------------------------------------------ snapshots


async def test_datetimes_are_stored_as_iso_utc_and_naive_ones_count_as_utc(
    store: SqliteStateStore, db_path: Path
) -> None:
    plus_two = timezone(timedelta(hours=2))
    await store.put_snapshots([
        Snapshot("arcgis", "parcels", "aware", {}, "h", datetime(2025, 6, 1, 14, 0, tzinfo=plus_two)),
        Snapshot("arcgis", "parcels", "naive", {}, "h", datetime(2025, 6, 1, 12, 0)),
    ])

    stored = raw(db_path, "SELECT key, modified FROM snapshots ORDER BY key")
    got = await store.get_snapshots("arcgis", "parcels", ["aware", "naive"])

    assert stored == [
        ("aware", "2025-06-01T12:00:00.000000+00:00"),
        ("naive", "2025-06-01T12:00:00.000000+00:00"),
    ]
    assert got["naive"].modified == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert got["aware"].modified == got["naive"].modified


async def test_values_that_are_not_json_are_refused_and_nothing_is_written(store: SqliteStateStore) -> None:
    with pytest.raises(TypeError):
        await store.put_snapshots([
            Snapshot("arcgis", "parcels", "ok", {"a": 1}, "h", None),
            Snapshot("arcgis", "parcels", "bad", {"a": object()}, "h", None),
        ])

    assert await store.get_snapshots("arcgis", "parcels", ["ok", "bad"]) == {}


async def test_snapshot_values_keep_unicode_and_nesting(store: SqliteStateStore) -> None:
    values = {"name": "Zürich Süd ✓", "nested": {"list": [1, 2.5, None, True]}, "@geometry": {"x": 8.5}}
    await store.put_snapshots([Snapshot("arcgis", "parcels", "k", values, "h", None)])

    assert (await store.get_snapshots("arcgis", "parcels", ["k"]))["k"].values == values


# ---------------------------------------------------------------------------------------------- audit


async def test_the_audit_ledger_refuses_updates_and_deletes_even_in_raw_sql(
    store: SqliteStateStore, db_path: Path
) -> None:
    await store.append_audit([AuditEntry(T0, "c", "parcels", "written", "arcgis", "parcels", "k")])

    with sqlite3.connect(db_path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET detail = 'edited'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit")

    assert [e.detail for e in await store.read_audit()] == [""]


async def test_audit_entries_with_equal_times_read_newest_appended_first(store: SqliteStateStore) -> None:
    await store.append_audit([AuditEntry(T0, "c", "parcels", "written", "arcgis", "parcels", "first")])
    await store.append_audit([AuditEntry(T0, "c", "parcels", "written", "arcgis", "parcels", "second")])

    assert [e.key for e in await store.read_audit()] == ["second", "first"]
    assert await store.read_audit(limit=0) == []


async def test_audit_times_in_other_zones_sort_by_instant(store: SqliteStateStore) -> None:
    minus_five = timezone(timedelta(hours=-5))
    # 08:30 at -05:00 is 13:30 UTC: later than 13:00 UTC although its wall-clock text is smaller
    await store.append_audit([
        AuditEntry(datetime(2025, 3, 1, 8, 30, tzinfo=minus_five), "c", "f", "written", "s", "t", "later"),
        AuditEntry(datetime(2025, 3, 1, 13, 0, tzinfo=UTC), "c", "f", "written", "s", "t", "earlier"),
    ])

    got = await store.read_audit()

    assert [e.key for e in got] == ["later", "earlier"]
    assert got[0].at == datetime(2025, 3, 1, 13, 30, tzinfo=UTC)
    assert got[0].at.tzinfo == UTC


# ------------------------------------------------------------------------------------- empty batches


async def test_empty_batches_are_no_ops(store: SqliteStateStore) -> None:
    await store.put_links([])
    await store.put_snapshots([])
    await store.delete_snapshots("arcgis", "parcels", [])
    await store.append_audit([])

    assert await store.get_snapshots("arcgis", "parcels", []) == {}
    assert await store.remember("ns", []) == set()
    assert await store.count_links() == 0
    assert await store.read_audit() == []
