"""Table Storage requests per change on the controller's hot path (Azurite), counted on the wire by phase."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path

import pytest

from sandbox.bench_tables import Phase, measure
from shared.core.controller import Controller
from shared.core.engine import SyncEngine, snapshot_table
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import RejectedError
from shared.core.ports import Snapshot
from shared.runtime.azure import TableStateStore
from shared.runtime.embedded import SqliteQueue
from tests.contract.adapters.azure_tables import drop_tables, fresh_prefix, tables_connection_string
from tests.fakes import FakeSystem
from tests.unit.test_engine import SPEC, T0, sign_payload

pytestmark = pytest.mark.integration

RECORDS = 60


@pytest.fixture(scope="module")
def phases(request: pytest.FixtureRequest) -> dict[str, Phase]:
    conn_str = tables_connection_string(request)
    measured = asyncio.run(measure(conn_str, RECORDS, batch_size=RECORDS, lease_partitions=1))
    for phase in measured:
        print(phase.row())
    return {p.name: p for p in measured}


def test_new_records_cost_no_read_of_the_old_snapshot_layout(phases: dict[str, Phase]) -> None:
    drain = phases["new signs: drain"]
    assert drain.statuses == {"written": RECORDS}
    # one range query of the source snapshots; the per-record layout of earlier versions is probed once, not read
    # per key
    assert "snapshots/read" not in drain.requests, drain.requests
    assert drain.requests.get("snapshots/query", 0) <= 2, drain.requests


def test_updates_of_linked_records_do_not_put_their_links_again(phases: dict[str, Phase]) -> None:
    drain = phases["changed signs: drain"]
    assert drain.statuses == {"written": RECORDS}
    # the links the batch loaded are the ones it would store: no re-read, no transaction
    assert "links/read" not in drain.requests, drain.requests
    assert "links/transaction" not in drain.requests, drain.requests


@pytest.mark.parametrize("name", ["new signs: drain", "changed signs: drain", "unchanged signs: drain",
                                  "new work orders: drain", "signs + work orders: drain"])
def test_a_batch_reads_its_links_and_snapshots_with_range_queries_not_a_read_per_key(
        phases: dict[str, Phase], name: str) -> None:
    drain = phases[name]
    assert drain.statuses in ({"written": drain.changes}, {"skipped_echo": drain.changes}), drain.statuses
    # point reads were one per record for its link, one per snapshot (source, target) and one per parent link
    assert "links/read" not in drain.requests, drain.requests
    assert "snapshots/read" not in drain.requests, drain.requests
    batches = math.ceil(drain.changes / RECORDS)
    # per batch and flow group: the links, the parents' links, the source and target snapshots, the old-layout probe
    assert drain.requests.get("links/query", 0) <= 2 * 2 * batches, drain.requests
    assert drain.requests.get("snapshots/query", 0) <= 3 * 2 * batches, drain.requests
    flow_groups = 2 if name.startswith("signs + work orders") else 1
    assert drain.reads / drain.changes <= 0.1 * flow_groups, drain.requests  # it was 2-3.5 per change


def test_writes_do_not_grow_per_record(phases: dict[str, Phase]) -> None:
    for name in ("new signs: drain", "changed signs: drain", "unchanged signs: drain", "new work orders: drain"):
        drain = phases[name]
        transactions = {k: n for k, n in drain.requests.items() if k.endswith("/transaction")}
        single = {k: n for k, n in drain.requests.items()
                  if k.split("/")[1] in ("insert", "upsert", "merge", "delete") and not k.startswith("checkpoints/")}
        assert not single, (name, single)  # every row write of the batch went in a transaction
        # one batch: a transaction per 100 rows and partition (links hold 2 rows each), leases in one partition
        assert transactions.get("leases/transaction", 0) <= 2, (name, transactions)
        assert transactions.get("links/transaction", 0) <= math.ceil(RECORDS / 50), (name, transactions)
        assert transactions.get("snapshots/transaction", 0) <= 3 * math.ceil(RECORDS / 100), (name, transactions)
        assert transactions.get("audit/transaction", 0) <= 2 * math.ceil(RECORDS / 100), (name, transactions)


async def test_the_counter_sees_reads_queries_single_writes_and_transactions(request: pytest.FixtureRequest) -> None:
    conn_str = tables_connection_string(request)
    store = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix(), lease_partitions=2)
    try:
        await store.remember("ns", ["warm-up"])  # creates the dedup table
        store.requests.reset()
        await store.remember("ns", [f"k{n}" for n in range(150)])  # 2 transactions (100 + 50)
        await store.seen("ns", ["k1", "k2", "nope"])  # 3 point reads
        assert not await store.has_snapshots("arcgis", "x")  # creates the table, then one query
        await store.put_checkpoint("c", "v", expected_etag=None)  # creates the table, then one insert
        prefix_len = len(store.table_names[0]) - len("links")
        counts = {(table[prefix_len:], kind): n for (table, kind), n in store.requests.counts.items()}
        assert counts == {("dedup", "transaction"): 2, ("dedup", "read"): 3, ("", "table"): 2,
                          ("snapshots", "query"): 1, ("checkpoints", "insert"): 1}, counts
        assert store.requests.ops[store.table_names[3]] == 150
        assert store.requests.total == 9
    finally:
        names = store.table_names
        await store.close()
        await drop_tables(conn_str, names)


def test_enqueueing_new_changes_reads_no_dedup_key(phases: dict[str, Phase]) -> None:
    enqueue = phases["new signs: enqueue"]
    # the keys are claimed with one insert per 100 (a read each before); sent, they are confirmed the same way
    assert "dedup/read" not in enqueue.requests, enqueue.requests
    assert enqueue.requests.get("dedup/transaction", 0) <= 2 * math.ceil(RECORDS / 100), enqueue.requests


def test_the_session_walk_reads_no_snapshot_of_a_parent_without_parents(phases: dict[str, Phase]) -> None:
    enqueue = phases["new work orders: enqueue"]
    # a work order's session is its sign's; the sign has no parent, so the sign's snapshot is not read
    assert "snapshots/read" not in enqueue.requests, enqueue.requests


async def test_dead_letters_of_a_batch_are_recorded_in_one_ledger_call(request: pytest.FixtureRequest,
                                                                       tmp_path: Path) -> None:
    conn_str = tables_connection_string(request)
    state = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix())
    queue = SqliteQueue(tmp_path / "queue.db", lock_duration_seconds=300)
    dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
    systems = {"dataverse": dv, "arcgis": ag}
    keys = [str(uuid.UUID(int=0xBAD << 96 | n)) for n in range(30)]
    for key in keys:
        ag.fail_match[key] = RejectedError("arcgis refused the feature")
    try:
        await queue.send([ChangeEnvelope(
            flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
            source_table="dot_signassets", source_key=key, source_modified=T0,
            payload=sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}")).to_message()
            for n, key in enumerate(keys)])
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state)
        controller = Controller(SPEC, engine=engine, queue=queue, state=state, sources=systems, batch_size=100)
        for name in state.TABLES:
            await state._table(name)
        state.requests.reset()

        report = await controller.drain()

        assert report.dead_lettered == {"TARGET_REJECTED": len(keys)}, report
        audit = {kind: n for (table, kind), n in state.requests.counts.items() if table.endswith("audit")}
        # the engine's ledger of the failed outcomes, then the controller's dead letters: one call each
        assert audit == {"transaction": 2}, audit
        # The engine's decision (the attempt rejected), then the controller's settlement (the message dead-lettered).
        assert len(await state.read_audit(limit=100, decision="rejected")) == len(keys)
        assert len(await state.read_audit(limit=100, decision="dead_lettered")) == len(keys)
    finally:
        await queue.close()
        names = state.table_names
        await state.close()
        await drop_tables(conn_str, names)


def test_a_batch_of_two_flows_takes_its_leases_once(phases: dict[str, Phase]) -> None:
    drain = phases["signs + work orders: drain"]
    assert drain.statuses == {"written": 2 * RECORDS}, drain.statuses
    batches = math.ceil(2 * RECORDS / RECORDS)
    # one partition: take and release once per batch (per flow group, it was twice that)
    assert drain.requests.get("leases/transaction") == 2 * batches, drain.requests


async def test_state_an_earlier_version_wrote_is_read_by_range_and_found_in_sync(
        request: pytest.FixtureRequest) -> None:
    """Upgrade: links and per-record snapshots (the layout before snapshots per entity) that an earlier version
    wrote are read by the batch's range queries, and a change equal to them is an echo, not a write."""
    conn_str = tables_connection_string(request)
    state = TableStateStore.from_connection_string(conn_str, table_prefix=fresh_prefix())
    dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
    systems = {"dataverse": dv, "arcgis": ag}
    engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state, clock=lambda: T0)
    flow = SPEC.flow("sign_assets_to_field")
    keys = [str(uuid.UUID(int=0x01D << 96 | n)) for n in range(40)]

    def changes(version: str) -> list[ChangeEnvelope]:
        out = []
        for n, key in enumerate(keys):
            payload = sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}")
            dv.put("dot_signassets", key, dict(payload))
            out.append(ChangeEnvelope(flow=flow.name, operation="upsert", source_system="dataverse",
                                      source_table="dot_signassets", source_key=key, source_modified=T0,
                                      source_version=version, payload=payload))
        return out

    try:
        assert {o.status for o in await engine.process(changes("1"))} == {"written"}
        links = await state.get_links(flow.entity, "dataverse", keys, "arcgis")
        # move every snapshot to the per-record layout, as an earlier version kept them
        for side, table, side_keys in (("dataverse", flow.source.table, keys),
                                       ("arcgis", flow.target.table, list(links.values()))):
            current = await state.get_snapshots(side, snapshot_table(table, flow.entity), side_keys)
            assert len(current) == len(keys)
            await state.put_snapshots([Snapshot(side, table, s.key, s.values, s.hash, s.modified)
                                       for s in current.values()])
            await state.delete_snapshots(side, snapshot_table(table, flow.entity), side_keys)
        upgraded = SyncEngine(SPEC, sinks=systems, sources=systems, state=state, clock=lambda: T0)
        state.requests.reset()

        outcomes = await upgraded.process(changes("2"))

        assert {o.status for o in outcomes} == {"skipped_echo"}, [o.detail for o in outcomes][:3]
        reads = {(table.removeprefix(state.table_names[0][:-len("links")]), kind): n
                 for (table, kind), n in state.requests.counts.items() if kind in ("read", "query")}
        assert ("links", "read") not in reads, reads
        assert ("snapshots", "read") not in reads, reads
    finally:
        names = state.table_names
        await state.close()
        await drop_tables(conn_str, names)
