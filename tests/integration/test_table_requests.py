"""Table Storage requests per change on the controller's hot path (Azurite), counted on the wire by phase."""

from __future__ import annotations

import asyncio
import math

import pytest

from sandbox.bench_tables import Phase, measure
from shared.runtime.table_state import TableStateStore
from tests.contract.adapters.azure_tables import drop_tables, fresh_prefix, tables_connection_string

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
    # one read of each source snapshot; the per-record layout of earlier versions is probed once, not read per key
    assert drain.requests.get("snapshots/read") == RECORDS, drain.requests
    assert drain.requests.get("snapshots/query", 0) <= 2, drain.requests
    assert drain.requests.get("links/read") == RECORDS, drain.requests


def test_updates_of_linked_records_do_not_put_their_links_again(phases: dict[str, Phase]) -> None:
    drain = phases["changed signs: drain"]
    assert drain.statuses == {"written": RECORDS}
    # the links the batch loaded are the ones it would store: no re-read, no transaction
    assert drain.requests.get("links/read") == RECORDS, drain.requests
    assert "links/transaction" not in drain.requests, drain.requests


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
