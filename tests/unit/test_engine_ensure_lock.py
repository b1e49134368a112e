"""Ensuring a parent holds the parent's record as processing it would: leased elsewhere, the child is busy and the
parent untouched; held by the same call (its own change in the batch), the ensure never waits for itself."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import TransientError
from shared.core.ports import Link, WriteOp, WriteResult
from shared.mapping.spec import parse_spec
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem
from tests.unit.test_engine_documents import SPEC_TEXT, T0, deal, env

SPEC = parse_spec(SPEC_TEXT.replace("parent_flow: accounts_in, key_part: 1", "parent_flow: accounts_in, ensure: true"))
PARENT = "salesforce:Account:001NEW"


class FailsOnce(FakeSystem):
    """F&O whose first customer write fails (the parent's own change, earlier in the same batch)."""

    def __init__(self) -> None:
        super().__init__("fno")
        self.failed = False

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if not self.failed and any(op.table == "CustomersV3" for op in ops):
            self.failed = True
            return [WriteResult(op.op_id, False, error=TransientError("fno answered 503")) for op in ops]
        return await super().write(ops)


async def world(fno: FakeSystem) -> tuple[SyncEngine, SqliteStateStore, FakeSystem]:
    sf = FakeSystem("salesforce")
    state = SqliteStateStore(":memory:")
    await state.put_links([Link("product", "fno", "usmf|P-1001", "salesforce", "01tA")])
    sf.put("Account", "001NEW", {"Name": "Keystone Mining"})
    sf.put("Opportunity", "006A", deal(AccountId="001NEW"))
    sf.put("OpportunityLineItem", "00kA", {"OpportunityId": "006A", "Product2Id": "01tA", "Quantity": 2})
    engine = SyncEngine(SPEC, sinks={"salesforce": sf, "fno": fno}, sources={"salesforce": sf, "fno": fno},
                        state=state, clock=lambda: T0)
    return engine, state, fno


async def test_a_parent_leased_by_another_process_is_not_ensured_and_its_child_is_busy():
    engine, state, fno = await world(FakeSystem("fno"))
    try:
        # the account's own change is being written by another process (a webhook, another instance)
        assert await state.acquire_leases([PARENT], "other-process", 60) == {PARENT}

        [outcome] = await engine.process([env(deal(AccountId="001NEW"))])

        assert outcome.status == "failed", outcome
        assert outcome.error is not None
        assert outcome.error.reason == "RECORD_BUSY", outcome.error
        assert "001NEW" in outcome.error.detail
        assert fno.writes == []  # neither a second customer nor an order without its customer
        assert await state.acquire_leases([PARENT], "other-process", 60) == {PARENT}  # its lease left alone

        await state.release_leases([PARENT], "other-process")
        [outcome] = await engine.process([env(deal(AccountId="001NEW"))])

        assert outcome.status == "written", outcome.error
        assert len(fno.tables["CustomersV3"]) == 1
    finally:
        await state.close()


async def test_the_parents_own_change_in_the_same_batch_never_makes_the_ensure_wait_for_itself():
    engine, state, fno = await world(FailsOnce())
    account = ChangeEnvelope(flow="accounts_in", operation="upsert", source_system="salesforce",
                             source_table="Account", source_key="001NEW", source_modified=T0,
                             payload={"Id": "001NEW", "Name": "Keystone Mining"})
    try:
        async with asyncio.timeout(5):  # well inside the wait for a lock held by another call
            first, second = await engine.process([account, env(deal(AccountId="001NEW"))])

        assert first.status == "failed", first  # the account's own write failed: its message is retried
        assert second.status == "written", second.error  # the ensure tried the parent again, under this call's lease
        [customer] = fno.tables["CustomersV3"]
        assert fno.tables["SalesOrderHeadersV2"][second.target_key or ""]["OrderingCustomerAccountNumber"] == customer
    finally:
        await state.close()
