"""Table Storage requests per change: the controller drains N changes with state on Azurite (prints figures).

The queue is the embedded SQLite one and the systems are in-memory fakes, so every request counted is one the
state store (`TableStateStore`) sent; `TableRequestCounter` counts them on the wire, by table and kind. Phases:
N new sign assets enqueued (the poll path: dedup, snapshot walk, audit) and drained; the same N changed (updates:
write-ahead marks, links re-put, snapshots); the same N again unchanged (echoes); N new work orders under those
signs (children: parent links, the session walk); then both changed again, mixed in every batch (two flow
groups). Run: `python -m sandbox.bench_tables [--records 1000] [--latency-ms 20]` (with a latency, the seconds of
a phase are what its state requests cost at a cloud round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

WRITE_KINDS = frozenset({"insert", "upsert", "merge", "delete", "transaction"})
READ_KINDS = frozenset({"read", "query"})


@dataclass
class Phase:
    """Requests one phase sent, per change."""

    name: str
    changes: int
    seconds: float
    kinds: dict[str, int]
    tables: dict[str, int]
    statuses: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    """`{table}/{kind}` (table without the store's prefix) -> requests."""

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    @property
    def writes(self) -> int:
        return sum(n for k, n in self.kinds.items() if k in WRITE_KINDS)

    @property
    def reads(self) -> int:
        return sum(n for k, n in self.kinds.items() if k in READ_KINDS)

    def row(self) -> dict[str, Any]:
        per = max(self.changes, 1)
        return {
            "phase": self.name, "changes": self.changes, "requests": self.total,
            "per_change": round(self.total / per, 3), "writes_per_change": round(self.writes / per, 3),
            "reads_per_change": round(self.reads / per, 3), "seconds": round(self.seconds, 2),
            "requests_by_table_and_kind": self.requests, "statuses": self.statuses,
        }


async def measure(conn_str: str, records: int, *, batch_size: int = 500, prefix: str | None = None,
                  lease_partitions: int | None = None) -> list[Phase]:
    """Run the phases against the Azurite (or account) of `conn_str`; returns one `Phase` per step."""
    import uuid

    from shared.core.controller import Controller, remember_enqueued, to_messages
    from shared.core.engine import SyncEngine
    from shared.core.envelope import ChangeEnvelope
    from shared.runtime.azure import TableStateStore
    from shared.runtime.embedded import SqliteQueue
    from tests.fakes import FakeSystem
    from tests.unit.test_engine import SPEC, T0, sign_payload

    prefix = prefix or f"bench{uuid.uuid4().hex[:12]}"
    from shared.runtime.azure import LEASE_PARTITIONS

    state = TableStateStore.from_connection_string(conn_str, table_prefix=prefix,
                                                   lease_partitions=lease_partitions or LEASE_PARTITIONS)
    counter = state.requests
    dv, ag = FakeSystem("dataverse"), FakeSystem("arcgis", key_style="globalid")
    systems = {"dataverse": dv, "arcgis": ag}
    signs = [str(uuid.UUID(int=0x5160 << 96 | n)) for n in range(records)]
    orders = [str(uuid.UUID(int=0x0DE0 << 96 | n)) for n in range(records)]
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory() as tmp:
        queue = SqliteQueue(Path(tmp) / "queue.db", lock_duration_seconds=300)
        engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state)
        controller = Controller(SPEC, engine=engine, queue=queue, state=state, sources=systems,
                                batch_size=batch_size)
        try:
            # tables are created once per store: not a per-change cost
            for name in state.TABLES:
                await state._table(name)

            def sign(key: str, n: int, step: int) -> ChangeEnvelope:
                payload = sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}",
                                       dot_milepost=round(n / 1000 + step, 3))
                dv.put("dot_signassets", key, payload)
                return ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                                      source_table="dot_signassets", source_key=key,
                                      source_modified=T0 + timedelta(minutes=step), payload=payload, origin="poll")

            def order(key: str, n: int, step: int = 0) -> ChangeEnvelope:
                payload = {"dot_workorderid": key, "dot_name": f"WO-{n:06d}-{step}", "dot_worktype": 100000001,
                           "dot_status": 100000000, "dot_signassetid": signs[n], "dot_latitude": 38.0,
                           "dot_longitude": -78.0}
                dv.put("dot_workorders", key, payload)
                return ChangeEnvelope(flow="work_orders_to_field", operation="upsert", source_system="dataverse",
                                      source_table="dot_workorders", source_key=key,
                                      source_modified=T0 + timedelta(minutes=step), payload=payload, origin="poll")

            def detail() -> dict[str, int]:
                return {f"{table.removeprefix(prefix)}/{kind}": n for (table, kind), n in counter.counts.items()}

            async def phase(name: str, envelopes: Sequence[ChangeEnvelope]) -> None:
                # The poll path's state work (dedup, the session walk, the enqueued audit), then the drain.
                counter.reset()
                started = time.perf_counter()
                from shared.core.controller import drop_duplicates
                from shared.core.ports import AuditEntry

                fresh = await drop_duplicates(state, envelopes, T0)
                await queue.send(await to_messages(SPEC, state, fresh))
                await remember_enqueued(state, fresh)
                await state.append_audit([AuditEntry(T0, e.correlation_id, e.flow, "enqueued", e.source_system,
                                                     e.source_table, e.source_key, "bench") for e in fresh])
                phases.append(Phase(f"{name}: enqueue", len(envelopes), time.perf_counter() - started,
                                    counter.by_kind(), counter.by_table(), requests=detail()))
                counter.reset()
                started = time.perf_counter()
                report = await controller.drain()
                phases.append(Phase(f"{name}: drain", len(envelopes), time.perf_counter() - started,
                                    counter.by_kind(), counter.by_table(), dict(report.statuses), detail()))

            await phase("new signs", [sign(k, n, 0) for n, k in enumerate(signs)])
            await phase("changed signs", [sign(k, n, 1) for n, k in enumerate(signs)])
            # the same state again under a newer version: an echo of the last in-sync state
            again = [sign(k, n, 1).model_copy(update={"source_version": "2"}) for n, k in enumerate(signs)]
            await phase("unchanged signs", again)
            await phase("new work orders", [order(k, n) for n, k in enumerate(orders)])
            # both flows in every batch: the batch's leases are taken once, not per flow group
            mixed = [change for n in range(records) for change in (sign(signs[n], n, 2), order(orders[n], n, 2))]
            await phase("signs + work orders", mixed)
        finally:
            await queue.close()
            names = state.table_names
            await state.close()
            from tests.contract.adapters.azure_tables import drop_tables

            await drop_tables(conn_str, names)
    return phases


def print_table(phases: Sequence[Phase]) -> None:
    print(f"{'phase':<26}{'changes':>8}{'requests':>10}{'per change':>12}{'writes/ch':>11}{'reads/ch':>10}"
          f"{'seconds':>9}")
    for p in phases:
        r = p.row()
        print(f"{p.name:<26}{p.changes:>8}{p.total:>10}{r['per_change']:>12.3f}{r['writes_per_change']:>11.3f}"
              f"{r['reads_per_change']:>10.3f}{p.seconds:>9.2f}")
    for p in phases:
        print(f"  {p.name}: {json.dumps(p.requests, sort_keys=True)} {json.dumps(p.statuses, sort_keys=True)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--lease-partitions", type=int, default=None,
                        help="partitions of the leases table (default: the store's, 16)")
    parser.add_argument("--connection-string", help="a storage account to measure instead of a fresh Azurite")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay each Table Storage request this much (sandbox.latency_proxy in front of Azurite),"
                             " so the seconds per phase model a cloud round trip (default 0)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.azurite import running_azurite

    def run(conn_str: str) -> list[Phase]:
        return asyncio.run(measure(conn_str, args.records, batch_size=args.batch_size,
                                   lease_partitions=args.lease_partitions))

    if args.connection_string:
        phases = run(args.connection_string)
    else:
        from sandbox.latency_proxy import LatencyProxy
        from shared.runtime.azure import azurite_connection_string

        with running_azurite() as azurite:
            if args.latency_ms:
                proxy = LatencyProxy(azurite.port, latency_ms=args.latency_ms).start()
                try:
                    phases = run(azurite_connection_string(proxy.port))
                finally:
                    proxy.stop()
            else:
                phases = run(azurite.connection_string)
    print_table(phases)
    if args.json:
        print(json.dumps([p.row() for p in phases], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
