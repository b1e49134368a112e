"""One record the engine cannot read around (its lines refused, a bug hit while processing) fails alone."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from shared.core.engine import SyncEngine, isolate
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import RejectedError, TransientError
from shared.core.ports import Link, SourceRecord, WriteOp, WriteResult
from shared.mapping.spec import parse_spec
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem
from tests.unit.test_engine_documents import SPEC, SPEC_TEXT, T0, deal, env


class RefusingSalesforce(FakeSystem):
    """Salesforce that refuses any query naming one malformed id (a 400 MALFORMED_ID on the whole query)."""

    bad = "006BAD"

    async def select(self, table: str, *, equals: Mapping[str, Any],
                     not_in: Mapping[str, Sequence[Any]] | None = None) -> list[SourceRecord]:
        if any(self.bad in (v if isinstance(v, list | tuple) else [v]) for v in equals.values()):
            raise RejectedError(f"salesforce: MALFORMED_ID in query of {table}")
        return await super().select(table, equals=equals, not_in=not_in)


class CrashingFno(FakeSystem):
    """F&O whose sales-order writes hit a bug of ours (not a SyncError)."""

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if any(op.table == "SalesOrderHeadersV2" for op in ops):
            raise RuntimeError("boom: a bug in the sales-order path")
        return await super().write(ops)


@pytest.fixture
async def state():
    store = SqliteStateStore(":memory:")
    await store.put_links([Link("customer", "fno", "usmf|US-001", "salesforce", "001A"),
                           Link("product", "fno", "usmf|P-1001", "salesforce", "01tA")])
    yield store
    await store.close()


def salesforce(cls: type[FakeSystem] = FakeSystem) -> FakeSystem:
    sf = cls("salesforce")
    sf.put("OpportunityLineItem", "00kA", {"OpportunityId": "006A", "Product2Id": "01tA", "Quantity": 2})
    sf.put("OpportunityLineItem", "00kC", {"OpportunityId": "006C", "Product2Id": "01tA", "Quantity": 3})
    for key in ("006A", "006BAD", "006C"):
        sf.put("Opportunity", key, deal(Id=key))
    return sf


async def test_a_document_whose_lines_cannot_be_read_fails_alone(state):
    sf, fno = salesforce(RefusingSalesforce), FakeSystem("fno")
    engine = SyncEngine(SPEC, sinks={"salesforce": sf, "fno": fno}, sources={"salesforce": sf, "fno": fno},
                        state=state, clock=lambda: T0)
    outcomes = await engine.process([env(deal(Id="006A")), env(deal(Id="006BAD")), env(deal(Id="006C"))])
    by_key = {o.envelope.source_key: o for o in outcomes}
    assert by_key["006A"].status == "written", by_key["006A"].error
    assert by_key["006C"].status == "written", by_key["006C"].error
    bad = by_key["006BAD"]
    assert bad.status == "failed"
    assert bad.error is not None
    assert not bad.error.retriable
    assert bad.error.reason == "TARGET_REJECTED"
    assert "006BAD" in bad.error.detail
    assert "lines" in bad.error.detail
    written = {op.match["SynclineSalesforceId"] for op in fno.writes if op.match}
    assert written == {"006A", "006C"}


async def test_an_unexpected_exception_fails_its_flow_group_as_retriable_and_is_logged(state, caplog):
    sf, fno = salesforce(), CrashingFno("fno")
    fno.put("CustomersV3", "usmf|US-002", {"OrganizationName": "Contoso"})
    engine = SyncEngine(SPEC, sinks={"salesforce": sf, "fno": fno}, sources={"salesforce": sf, "fno": fno},
                        state=state, clock=lambda: T0)
    customer = ChangeEnvelope(flow="customers_out", operation="upsert", source_system="fno",
                              source_table="CustomersV3", source_key="usmf|US-002", source_modified=T0,
                              payload={"OrganizationName": "Contoso"})
    with caplog.at_level(logging.ERROR, logger="shared.core.engine"):
        outcomes = await engine.process([env(deal(Id="006A")), customer])
    by_flow = {o.envelope.flow: o for o in outcomes}
    assert by_flow["customers_out"].status == "written"  # the other flow of the batch went on
    failed = by_flow["deals_in"]
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.retriable
    assert "RuntimeError" in failed.error.detail
    [record] = [r for r in caplog.records if "unexpected RuntimeError" in r.getMessage()]
    assert record.exc_info is not None  # the bug is logged in full, not hidden
    assert failed.envelope.correlation_id in record.getMessage()


ENSURE_SPEC = parse_spec(SPEC_TEXT.replace(
    "parent_flow: accounts_in, key_part: 1}", "parent_flow: accounts_in, key_part: 1, ensure: true}"))


class RefusingAccounts(FakeSystem):
    """Salesforce that refuses any read by id naming one malformed account id."""

    bad = "001BAD"

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        if self.bad in keys:
            raise RejectedError(f"salesforce: MALFORMED_ID in read of {table}")
        return await super().fetch(table, keys)


class Fno(FakeSystem):
    """F&O with its composite keys (legal entity | account)."""

    def new_key(self) -> str:
        return f"usmf|US-{100 + next(self._counter)}"


async def test_a_record_whose_parent_cannot_be_read_fails_alone(state):
    assert any(lk.ensure for f in ENSURE_SPEC.flows for lk in f.lookups)
    sf, fno = salesforce(RefusingAccounts), Fno("fno")
    sf.put("Account", "001B", {"Name": "Fabrikam"})
    sf.put("Opportunity", "006B", deal(Id="006B", AccountId="001B"))
    sf.put("Opportunity", "006X", deal(Id="006X", AccountId="001BAD"))
    sf.put("OpportunityLineItem", "00kB", {"OpportunityId": "006B", "Product2Id": "01tA", "Quantity": 1})
    sf.put("OpportunityLineItem", "00kX", {"OpportunityId": "006X", "Product2Id": "01tA", "Quantity": 1})
    engine = SyncEngine(ENSURE_SPEC, sinks={"salesforce": sf, "fno": fno}, sources={"salesforce": sf, "fno": fno},
                        state=state, clock=lambda: T0)
    outcomes = await engine.process([env(deal(Id="006A")), env(deal(Id="006X", AccountId="001BAD")),
                                     env(deal(Id="006B", AccountId="001B"))])
    by_key = {o.envelope.source_key: o for o in outcomes}
    assert by_key["006A"].status == "written", by_key["006A"].error
    assert by_key["006B"].status == "written", by_key["006B"].error  # its parent was synced first
    bad = by_key["006X"]
    assert bad.status == "failed"
    assert bad.error is not None
    assert bad.error.reason == "TARGET_REJECTED"
    assert "001BAD" in bad.error.detail
    assert "parent" in bad.error.detail


class Reader:
    """A batched read by keys that fails for some keys (permanent, or retriable), or for every call (an outage)."""

    def __init__(self, *, refused: frozenset[str] = frozenset(), flaky: frozenset[str] = frozenset(),
                 down: bool = False) -> None:
        self.refused, self.flaky, self.down = refused, flaky, down
        self.calls = 0

    async def __call__(self, keys: list[str]) -> list[str]:
        self.calls += 1
        if self.down:
            raise TransientError("HTTP 503")
        if self.refused & set(keys):
            raise RejectedError("HTTP 400 malformed key")
        if self.flaky & set(keys):
            raise TransientError("HTTP 500 from that record's plug-in")
        return list(keys)


KEYS = [f"k{i:02d}" for i in range(16)]


async def test_isolate_reads_around_refused_keys():
    read = Reader(refused=frozenset({"k03", "k12"}))
    rows, failed = await isolate(read, KEYS)
    assert sorted(rows) == sorted(set(KEYS) - {"k03", "k12"})
    assert set(failed) == {"k03", "k12"}
    assert all(e.reason == "TARGET_REJECTED" for e in failed.values())


async def test_isolate_fails_only_a_key_whose_retriable_failure_is_its_own():
    read = Reader(flaky=frozenset({"k07"}))
    rows, failed = await isolate(read, KEYS)
    assert set(failed) == {"k07"}
    assert failed["k07"].retriable
    assert len(rows) == 15


async def test_isolate_does_not_split_an_outage_key_by_key():
    read = Reader(down=True)
    rows, failed = await isolate(read, KEYS)
    assert rows == []
    assert set(failed) == set(KEYS)
    assert all(e.retriable for e in failed.values())
    assert read.calls == 3  # the batch, then its two halves: a struggling system is not called once per key
