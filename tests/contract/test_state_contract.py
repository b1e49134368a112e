"""Contract of `StateStore` that every state adapter must pass."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.core.ports import AuditEntry, CheckpointConflictError, Link, Snapshot
from tests.contract.conftest import StateFactory

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def snapshot(key: str, *, table: str = "parcels", system: str = "arcgis", version: int = 1) -> Snapshot:
    values = {"name": f"parcel {key}", "area": 12.5 * version, "tags": ["a", "b"], "owner": None, "ok": True}
    return Snapshot(system, table, key, values, f"hash-{key}-{version}", T0 + timedelta(minutes=version))


def audit(n: int, *, at: datetime, correlation_id: str = "corr-1", decision: str = "written") -> AuditEntry:
    return AuditEntry(
        at=at,
        correlation_id=correlation_id,
        flow="parcels",
        decision=decision,  # type: ignore[arg-type]
        system="dataverse",
        table="account",
        key=f"key-{n}",
        detail=f"entry {n}",
        reason="TARGET_REJECTED" if decision == "dead_lettered" else None,
    )


# ---------------------------------------------------------------------------------------------- links


async def test_links_resolve_in_both_directions(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_links([
        Link("parcel", "arcgis", "g-1", "dataverse", "d-1"),
        Link("parcel", "dataverse", "d-2", "arcgis", "g-2"),
    ])

    forward = await store.get_links("parcel", "arcgis", ["g-1", "g-2", "g-unknown"], "dataverse")
    backward = await store.get_links("parcel", "dataverse", ["d-1", "d-2", "d-unknown"], "arcgis")

    assert forward == {"g-1": "d-1", "g-2": "d-2"}
    assert backward == {"d-1": "g-1", "d-2": "g-2"}


async def test_links_are_scoped_by_entity_and_system_pair(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_links([
        Link("parcel", "arcgis", "k", "dataverse", "parcel-d"),
        Link("owner", "arcgis", "k", "dataverse", "owner-d"),
        Link("parcel", "arcgis", "k", "salesforce", "parcel-s"),
    ])

    assert await store.get_links("parcel", "arcgis", ["k"], "dataverse") == {"k": "parcel-d"}
    assert await store.get_links("owner", "arcgis", ["k"], "dataverse") == {"k": "owner-d"}
    assert await store.get_links("parcel", "arcgis", ["k"], "salesforce") == {"k": "parcel-s"}
    assert await store.get_links("parcel", "dataverse", ["k"], "arcgis") == {}


async def test_putting_a_link_again_is_a_no_op(state_factory: StateFactory) -> None:
    store = await state_factory()
    link = Link("parcel", "arcgis", "g-1", "dataverse", "d-1")
    await store.put_links([link])

    await store.put_links([link, link])
    await store.put_links([Link("parcel", "dataverse", "d-1", "arcgis", "g-1")])  # the same link, reversed

    assert await store.get_links("parcel", "arcgis", ["g-1"], "dataverse") == {"g-1": "d-1"}
    assert await store.get_links("parcel", "dataverse", ["d-1"], "arcgis") == {"d-1": "g-1"}


async def test_get_links_of_no_keys_is_empty(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_links([Link("parcel", "arcgis", "g-1", "dataverse", "d-1")])

    assert await store.get_links("parcel", "arcgis", [], "dataverse") == {}


async def test_many_links_in_one_batch(state_factory: StateFactory) -> None:
    store = await state_factory()
    keys = [f"g-{i}" for i in range(1000)]
    await store.put_links([Link("parcel", "arcgis", k, "dataverse", f"d-{k}") for k in keys])

    assert await store.get_links("parcel", "arcgis", keys, "dataverse") == {k: f"d-{k}" for k in keys}
    backward = await store.get_links("parcel", "dataverse", [f"d-{k}" for k in keys], "arcgis")
    assert backward == {f"d-{k}": k for k in keys}


async def test_many_keys_read_exactly_what_is_stored_now(state_factory: StateFactory) -> None:
    """A batch's reads of many keys (present, absent and in between) see every write made before them by any
    client: nothing decides on a stale or missing link or snapshot (a missed link would create a twin record)."""
    store, other = await state_factory(), await state_factory()
    keys = [f"{{{n:08X}-0000-4000-8000-{n:012X}}}" for n in range(300)]
    stored = keys[::3]
    await store.put_links([Link("parcel", "arcgis", k, "dataverse", f"d{k}") for k in stored])
    await store.put_snapshots([snapshot(k) for k in stored])
    assert await store.get_links("parcel", "arcgis", keys, "dataverse") == {k: f"d{k}" for k in stored}
    assert set(await store.get_snapshots("arcgis", "parcels", keys)) == set(stored)

    await other.put_links([Link("parcel", "arcgis", keys[1], "dataverse", "new"),  # a key that had none
                           Link("parcel", "arcgis", keys[4], "dataverse", f"d{keys[3]}")])  # takes keys[3]'s partner
    await other.put_snapshots([snapshot(keys[1]), snapshot(keys[0], version=2)])
    await other.delete_snapshots("arcgis", "parcels", [keys[6]])

    links = await store.get_links("parcel", "arcgis", keys, "dataverse")
    assert links == {**{k: f"d{k}" for k in stored if k != keys[3]}, keys[1]: "new", keys[4]: f"d{keys[3]}"}
    snaps = await store.get_snapshots("arcgis", "parcels", keys)
    assert set(snaps) == ({*stored, keys[1]} - {keys[6]})
    assert snaps[keys[0]] == snapshot(keys[0], version=2)


# ------------------------------------------------------------------------------------------ snapshots


async def test_snapshots_round_trip_in_batches(state_factory: StateFactory) -> None:
    store = await state_factory()
    snaps = [snapshot(f"k-{i}") for i in range(3)]
    await store.put_snapshots(snaps)

    got = await store.get_snapshots("arcgis", "parcels", ["k-0", "k-2", "k-missing"])

    assert set(got) == {"k-0", "k-2"}
    assert got["k-0"] == snaps[0]
    assert got["k-2"] == snaps[2]
    modified = got["k-0"].modified
    assert modified is not None
    assert modified.utcoffset() == timedelta(0)


async def test_put_snapshots_replaces(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_snapshots([snapshot("k", version=1)])

    await store.put_snapshots([snapshot("k", version=2)])

    got = (await store.get_snapshots("arcgis", "parcels", ["k"]))["k"]
    assert got == snapshot("k", version=2)


async def test_snapshots_are_scoped_by_system_and_table(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_snapshots([snapshot("k", table="parcels"), snapshot("k", table="owners", version=2)])
    await store.put_snapshots([snapshot("k", system="dataverse", version=3)])

    assert (await store.get_snapshots("arcgis", "parcels", ["k"]))["k"].hash == "hash-k-1"
    assert (await store.get_snapshots("arcgis", "owners", ["k"]))["k"].hash == "hash-k-2"
    assert (await store.get_snapshots("dataverse", "parcels", ["k"]))["k"].hash == "hash-k-3"


async def test_snapshot_modified_may_be_unknown_and_keeps_its_instant(state_factory: StateFactory) -> None:
    store = await state_factory()
    plus_two = timezone(timedelta(hours=2))
    await store.put_snapshots([
        Snapshot("arcgis", "parcels", "none", {"a": 1}, "h1", None),
        Snapshot("arcgis", "parcels", "cest", {"a": 1}, "h2", datetime(2025, 6, 1, 14, 0, tzinfo=plus_two)),
    ])

    got = await store.get_snapshots("arcgis", "parcels", ["none", "cest"])

    assert got["none"].modified is None
    assert got["cest"].modified == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


async def test_delete_snapshots_forgets_only_the_given_keys(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_snapshots([snapshot("a"), snapshot("b"), snapshot("c"), snapshot("a", table="owners")])

    await store.delete_snapshots("arcgis", "parcels", ["a", "c", "never-existed"])

    assert set(await store.get_snapshots("arcgis", "parcels", ["a", "b", "c"])) == {"b"}
    assert set(await store.get_snapshots("arcgis", "owners", ["a"])) == {"a"}


async def test_has_snapshots_tells_whether_a_system_table_holds_any(state_factory: StateFactory) -> None:
    store = await state_factory()
    assert not await store.has_snapshots("arcgis", "parcels")
    await store.put_snapshots([snapshot("a"), snapshot("b"), snapshot("k", table="parcels@parcel")])

    assert await store.has_snapshots("arcgis", "parcels")
    assert await store.has_snapshots("arcgis", "parcels@parcel")
    assert not await store.has_snapshots("arcgis", "owners")
    assert not await store.has_snapshots("dataverse", "parcels")
    assert not await store.has_snapshots("arcgis", "parcel")  # a prefix of a table is another table

    await store.delete_snapshots("arcgis", "parcels", ["a", "b"])
    assert not await store.has_snapshots("arcgis", "parcels")
    assert await store.has_snapshots("arcgis", "parcels@parcel")


# ---------------------------------------------------------------------------------------- checkpoints


async def test_a_checkpoint_never_set_reads_as_none(state_factory: StateFactory) -> None:
    store = await state_factory()

    assert await store.get_checkpoint("arcgis:parcels") is None


async def test_checkpoint_compare_and_set(state_factory: StateFactory) -> None:
    store = await state_factory()

    created = await store.put_checkpoint("arcgis:parcels", "100", expected_etag=None)
    assert await store.get_checkpoint("arcgis:parcels") == created
    assert created.value == "100"
    assert created.updated_at.utcoffset() == timedelta(0)

    moved = await store.put_checkpoint("arcgis:parcels", "200", expected_etag=created.etag)
    assert moved.etag != created.etag
    assert await store.get_checkpoint("arcgis:parcels") == moved

    with pytest.raises(CheckpointConflictError):
        await store.put_checkpoint("arcgis:parcels", "300", expected_etag=created.etag)  # stale etag
    with pytest.raises(CheckpointConflictError):
        await store.put_checkpoint("arcgis:parcels", "300", expected_etag=None)  # exists already
    assert await store.get_checkpoint("arcgis:parcels") == moved


async def test_an_etag_for_a_missing_checkpoint_conflicts(state_factory: StateFactory) -> None:
    store = await state_factory()

    with pytest.raises(CheckpointConflictError):
        await store.put_checkpoint("arcgis:parcels", "1", expected_etag="made-up")
    assert await store.get_checkpoint("arcgis:parcels") is None


async def test_concurrent_writers_of_a_checkpoint_exactly_one_wins(state_factory: StateFactory) -> None:
    first, second = await state_factory(), await state_factory()
    base = await first.put_checkpoint("arcgis:parcels", "100", expected_etag=None)
    seen = await second.get_checkpoint("arcgis:parcels")
    assert seen == base

    results = await asyncio.gather(
        first.put_checkpoint("arcgis:parcels", "from-first", expected_etag=base.etag),
        second.put_checkpoint("arcgis:parcels", "from-second", expected_etag=base.etag),
        return_exceptions=True,
    )

    conflicts = [r for r in results if isinstance(r, CheckpointConflictError)]
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(conflicts) == 1
    assert len(winners) == 1
    assert await first.get_checkpoint("arcgis:parcels") == winners[0]
    assert await second.get_checkpoint("arcgis:parcels") == winners[0]


async def test_concurrent_creators_of_a_checkpoint_exactly_one_wins(state_factory: StateFactory) -> None:
    first, second = await state_factory(), await state_factory()

    results = await asyncio.gather(
        first.put_checkpoint("arcgis:parcels", "a", expected_etag=None),
        second.put_checkpoint("arcgis:parcels", "b", expected_etag=None),
        return_exceptions=True,
    )

    assert sum(isinstance(r, CheckpointConflictError) for r in results) == 1
    stored = await first.get_checkpoint("arcgis:parcels")
    assert stored is not None
    assert stored in results


# ---------------------------------------------------------------------------------------------- dedup


async def test_remember_returns_the_keys_seen_before(state_factory: StateFactory) -> None:
    store = await state_factory()

    assert await store.remember("webhook", ["a", "b"]) == set()
    assert await store.remember("webhook", ["b", "c", "a"]) == {"a", "b"}
    assert await store.remember("webhook", ["c"]) == {"c"}


async def test_remember_namespaces_are_separate(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.remember("webhook", ["a"])

    assert await store.remember("poll", ["a"]) == set()
    assert await store.remember("webhook", ["a"]) == {"a"}


async def test_remember_a_key_twice_in_one_call_is_not_seen_before(state_factory: StateFactory) -> None:
    store = await state_factory()

    assert await store.remember("webhook", ["a", "a"]) == set()
    assert await store.remember("webhook", ["a"]) == {"a"}


async def test_claim_reports_remembered_keys_and_a_claim_is_never_remembered(state_factory: StateFactory) -> None:
    store, other = await state_factory(), await state_factory()
    await store.remember("enqueued", ["old"])

    assert await store.claim("enqueued", ["old", "new", "new"]) == {"old"}
    # claimed, then never confirmed (a send that failed, a crash): the key was not remembered
    assert await other.claim("enqueued", ["new", "old"]) == {"old"}
    assert await store.seen("enqueued", ["new", "old"]) == {"old"}
    assert await other.remember("enqueued", ["new"]) == set()  # the claim is not "remembered before"
    assert await store.remember("enqueued", ["new"]) == {"new"}
    assert await store.claim("enqueued", ["new"]) == {"new"}


async def test_confirm_remembers_claimed_and_unclaimed_keys(state_factory: StateFactory) -> None:
    store = await state_factory()
    many = [f"k-{n:03d}" for n in range(130)]  # more than one transaction
    assert await store.claim("enqueued", many[:120]) == set()

    await store.confirm("enqueued", many)

    assert await store.seen("enqueued", [*many, "other"]) == set(many)
    assert await store.claim("enqueued", [*many, "other"]) == set(many)
    assert await store.remember("enqueued", [many[0], "other"]) == {many[0]}
    assert await store.claim("poll", many[:3]) == set()  # namespaces stay separate


async def test_claim_of_a_large_mix_reports_exactly_the_remembered(state_factory: StateFactory) -> None:
    store = await state_factory()
    keys = [f"m-{n:03d}" for n in range(250)]
    remembered = set(keys[::7])
    await store.remember("enqueued", sorted(remembered))
    await store.claim("enqueued", keys[1::5])  # some claimed already, some of them remembered too

    assert await store.claim("enqueued", keys) == remembered
    assert await store.seen("enqueued", keys) == remembered


async def test_concurrent_remembers_of_a_claimed_key_exactly_one_is_first(state_factory: StateFactory) -> None:
    first, second = await state_factory(), await state_factory()
    await first.claim("enqueued", ["k"])

    results = await asyncio.gather(first.remember("enqueued", ["k"]), second.remember("enqueued", ["k"]))

    assert sorted(map(sorted, results)) == [[], ["k"]]


async def test_remember_is_shared_by_clients_of_the_same_store(state_factory: StateFactory) -> None:
    first, second = await state_factory(), await state_factory()
    await first.remember("webhook", ["a"])

    assert await second.remember("webhook", ["a", "b"]) == {"a"}


async def test_seen_reports_remembered_keys_and_remembers_nothing(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.remember("webhook", ["a"])

    assert await store.seen("webhook", ["a", "b", "a"]) == {"a"}
    assert await store.seen("poll", ["a"]) == set()
    assert await store.seen("webhook", []) == set()
    # seen() stored nothing: "b" is still new to remember()
    assert await store.remember("webhook", ["b"]) == set()


# ---------------------------------------------------------------------------------------------- audit


async def test_audit_reads_newest_first_with_every_field(state_factory: StateFactory) -> None:
    store = await state_factory()
    entries = [audit(1, at=T0), audit(2, at=T0 + timedelta(seconds=2)), audit(3, at=T0 + timedelta(seconds=1))]
    await store.append_audit(entries)

    got = await store.read_audit()

    assert got == [entries[1], entries[2], entries[0]]


async def test_audit_filters_and_limit(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.append_audit([
        audit(1, at=T0, correlation_id="c-1", decision="written"),
        audit(2, at=T0 + timedelta(seconds=1), correlation_id="c-1", decision="dead_lettered"),
        audit(3, at=T0 + timedelta(seconds=2), correlation_id="c-2", decision="written"),
        audit(4, at=T0 + timedelta(seconds=3), correlation_id="c-2", decision="skipped_echo"),
    ])

    def keys(entries: list[AuditEntry]) -> list[str]:
        return [e.key for e in entries]

    assert keys(await store.read_audit(correlation_id="c-1")) == ["key-2", "key-1"]
    assert keys(await store.read_audit(decision="written")) == ["key-3", "key-1"]
    assert keys(await store.read_audit(correlation_id="c-2", decision="written")) == ["key-3"]
    assert keys(await store.read_audit(limit=2)) == ["key-4", "key-3"]
    assert keys(await store.read_audit(correlation_id="c-3")) == []
    [dead] = await store.read_audit(decision="dead_lettered")
    assert dead.reason == "TARGET_REJECTED"


async def test_audit_appends_accumulate(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.append_audit([audit(1, at=T0)])
    await store.append_audit([audit(1, at=T0)])  # the very same decision twice is two ledger lines

    assert len(await store.read_audit()) == 2


async def test_read_audit_for_returns_one_records_entries_newest_first(state_factory: StateFactory) -> None:
    store = await state_factory()
    def entry(n: int, system: str, key: str, seconds: int) -> AuditEntry:
        return AuditEntry(T0 + timedelta(seconds=seconds), f"c-{n}", "parcels", "written", system, "t", key, f"e{n}")

    entries = [
        entry(1, "arcgis", "{AB-1}", 0), entry(2, "arcgis", "{AB-1}", 2), entry(3, "arcgis", "{AB-10}", 1),
        entry(4, "dataverse", "{AB-1}", 3), entry(5, "arcgis", "{ab-1}", 4), entry(6, "arcgis", "x|y", 5),
        entry(7, "arcgis", "{AB-1}", 2),  # the same instant as 2, appended later: newer
    ]
    await store.append_audit(entries[:4])
    await store.append_audit(entries[4:])

    def details(found: list[AuditEntry]) -> list[str]:
        return [e.detail for e in found]

    assert await store.read_audit_for("arcgis", ["{AB-1}"]) == [entries[6], entries[1], entries[0]]
    assert details(await store.read_audit_for("arcgis", ["{AB-1}", "{ab-1}"])) == ["e5", "e7", "e2", "e1"]
    assert details(await store.read_audit_for("arcgis", ["{AB-1}", "{AB-10}"], limit=3)) == ["e7", "e2", "e3"]
    assert details(await store.read_audit_for("arcgis", ["x|y"])) == ["e6"]  # no prefix of another key
    assert details(await store.read_audit_for("arcgis", ["x"])) == []
    assert details(await store.read_audit_for("dataverse", ["{AB-1}"])) == ["e4"]
    assert await store.read_audit_for("sap", ["{AB-1}"]) == []
    assert await store.read_audit_for("arcgis", []) == []
    assert await store.read_audit_for("arcgis", ["{AB-1}"], limit=0) == []


async def test_read_audit_for_finds_odd_keys_and_long_details(state_factory: StateFactory) -> None:
    store = await state_factory()
    odd = [LONE, "a/b\\c#d?e%f'g~h}", "x" * 300]
    entries = [AuditEntry(T0, "c", "f", "dead_lettered", "sap", "t", key, "detail " * 9000, "MAPPING_FAILED")
               for key in odd]
    await store.append_audit(entries)

    for key, entry in zip(odd, entries, strict=True):
        assert await store.read_audit_for("sap", [key]) == [entry]


async def test_forget_remembered_drops_only_keys_older_than_the_cutoff(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.remember("webhook", ["old-1", "old-2"])
    await store.remember("poll", ["old-3"])
    cutoff = datetime.now(UTC) + timedelta(seconds=1)
    await asyncio.sleep(1.2)
    await store.remember("webhook", ["new"])

    assert await store.forget_remembered(cutoff) == 3
    # forgotten keys count as new again; the newer key is still remembered
    assert await store.remember("webhook", ["old-1", "new"]) == {"new"}
    assert await store.remember("poll", ["old-3"]) == set()
    assert await store.forget_remembered(cutoff) == 0


# ------------------------------------------------------------------------------- lone surrogates (#12)
# A str decoded from JSON may hold a lone surrogate ("\ud800"), which strict UTF-8 cannot encode. Every
# adapter stores such a str and gives it back exactly, as a key and as a value, and keeps it distinct
# from its look-alikes (the replacement character, the escaped text).

LONE = "key-\ud800-\udfff"
LOOK_ALIKES = ["key-\ufffd-\ufffd", "key-\\ud800-\\udfff", "key--"]


async def test_lone_surrogates_round_trip_in_dedup_keys(state_factory: StateFactory) -> None:
    store = await state_factory()

    assert await store.remember("webhook\ud800", [LONE]) == set()
    assert await store.remember("webhook\ud800", [LONE, *LOOK_ALIKES]) == {LONE}
    assert await store.remember("webhook", [LONE]) == set()


async def test_lone_surrogates_round_trip_in_links(state_factory: StateFactory) -> None:
    store = await state_factory()
    await store.put_links([Link("parcel", "arcgis", LONE, "dataverse", "d-\udc00")])

    assert await store.get_links("parcel", "arcgis", [LONE, *LOOK_ALIKES], "dataverse") == {LONE: "d-\udc00"}
    assert await store.get_links("parcel", "dataverse", ["d-\udc00"], "arcgis") == {"d-\udc00": LONE}
    assert await store.iter_links("parcel", "arcgis", "dataverse") == [(LONE, "d-\udc00")]
    await store.put_links([Link("parcel", "arcgis", LONE, "dataverse", "d-2")])  # re-linking replaces
    assert await store.get_links("parcel", "dataverse", ["d-\udc00", "d-2"], "arcgis") == {"d-2": LONE}


async def test_lone_surrogates_round_trip_in_snapshots(state_factory: StateFactory) -> None:
    store = await state_factory()
    snap = Snapshot("arcgis", "parcels", LONE, {"name": "caf\udce9", "k\ud800": ["\udfff", 1]}, "h-1", T0)
    await store.put_snapshots([snap, snapshot("plain")])

    assert await store.get_snapshots("arcgis", "parcels", [LONE, *LOOK_ALIKES]) == {LONE: snap}
    await store.delete_snapshots("arcgis", "parcels", [LONE])
    assert await store.get_snapshots("arcgis", "parcels", [LONE, "plain"]) == {"plain": snapshot("plain")}


async def test_lone_surrogates_round_trip_in_checkpoints(state_factory: StateFactory) -> None:
    store = await state_factory()
    first = await store.put_checkpoint("poll:\ud800", "cursor-\udfff", expected_etag=None)
    second = await store.put_checkpoint("poll:\ud800", "cursor-\ud801", expected_etag=first.etag)

    got = await store.get_checkpoint("poll:\ud800")
    assert got is not None
    assert (got.value, got.etag) == ("cursor-\ud801", second.etag)
    assert await store.get_checkpoint("poll:\ufffd") is None


async def test_lone_surrogates_round_trip_in_the_audit_ledger(state_factory: StateFactory) -> None:
    store = await state_factory()
    entry = AuditEntry(at=T0, correlation_id="corr-\ud800", flow="parcels", decision="dead_lettered",
                       system="dataverse", table="account", key=LONE,
                       detail="field name: value 'caf\udce9' cannot be translated", reason="MAPPING_FAILED")
    await store.append_audit([entry, audit(1, at=T0 - timedelta(seconds=1))])

    assert await store.read_audit(correlation_id="corr-\ud800") == [entry]
    assert (await store.read_audit(limit=1)) == [entry]
