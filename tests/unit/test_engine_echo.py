"""Echo suppression per entity, write-back repair on create-only flows, and writes left unacknowledged (issue 13)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.bootstrap import load_flows
from shared.core.engine import HOLDS_DETAIL, UNCONFIRMED, SyncEngine, snapshot_table
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import AmbiguousWriteError, SyncError, ThrottledError, TransientError
from shared.core.ports import Link, Snapshot, WriteOp, WriteResult
from shared.mapping.engine import values_hash
from shared.mapping.spec import FlowSet
from shared.ops import reconcile
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem

FLOWS = Path(__file__).resolve().parents[2] / "flows"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SF_ID = "0015g00000AbCdEAAV"


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> FlowSet:
    """Lead-to-cash and Customer 360 merged as the app merges its flow directory."""
    where = tmp_path_factory.mktemp("flows")
    for name in ("fno-salesforce.yaml", "customer-360.yaml"):
        shutil.copy(FLOWS / name, where / name)
    return load_flows(where)


class FlakySystem(FakeSystem):
    """A fake whose next writes fail: `ambiguous` applies them first (a 504 after apply), `refuse` does not."""

    def __init__(self, system: str) -> None:
        super().__init__(system)
        self.plan: list[tuple[str, SyncError, bool]] = []
        """(op_id prefix, error, whole call) for the next matching write calls, in order."""

    def fail_next(self, error: SyncError, *, applied: bool, prefix: str = "", whole_call: bool = False) -> None:
        self.plan.append((prefix, error, whole_call))
        self._applied = applied

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        if self.plan and all(op.op_id.startswith(self.plan[0][0]) for op in ops):
            _prefix, error, whole_call = self.plan.pop(0)
            if self._applied:
                await super().write(ops)
            if whole_call:
                raise error
            return [WriteResult(op.op_id, False, error=error) for op in ops]
        return await super().write(ops)


def sf_account(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"Id": SF_ID, "Name": "Atlas Fabrication Inc.", "Type": "Customer - Direct",
                               "Legal_Entity__c": "US01", "CurrencyIsoCode": "USD", "BillingCity": "Pittsburgh",
                               "BillingCountry": "US", "Phone": "+1 412 555 0100", "Credit_Limit__c": 50_000.0,
                               "Payment_Terms__c": "Net 30"}
    base.update(over)
    return base


def change(flow: str, system: str, table: str, key: str, payload: dict[str, object], at: datetime,
           **extra: object) -> ChangeEnvelope:
    return ChangeEnvelope(flow=flow, operation="upsert", source_system=system, source_table=table, source_key=key,
                          source_modified=at, payload=payload, **extra)  # type: ignore[arg-type]


@pytest.fixture
async def world(spec: FlowSet):
    """A Salesforce Account that is both an F&O customer (lead-to-cash) and a Customer 360 account."""
    fno, sf, dv = FakeSystem("fno"), FlakySystem("salesforce"), FlakySystem("dataverse")
    state = SqliteStateStore(":memory:")
    systems = {"fno": fno, "salesforce": sf, "dataverse": dv}
    engine = SyncEngine(spec, sinks=systems, sources=systems, state=state, clock=lambda: T0)
    sf.put("Account", SF_ID, sf_account())
    [customer] = await engine.process([change("accounts_to_fno", "salesforce", "Account", SF_ID, sf_account(), T0)])
    assert customer.status == "written", customer.error
    [crm] = await engine.process([change("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID,
                                         dict(sf.tables["Account"][SF_ID], Id=SF_ID), T0 + timedelta(seconds=1))])
    assert crm.status == "written", crm.error
    yield engine, fno, sf, dv, state, customer.target_key, crm.target_key
    await state.close()


def sf_now(sf: FakeSystem) -> dict[str, object]:
    return dict(sf.tables["Account"][SF_ID], Id=SF_ID)


async def test_an_fno_rename_continues_from_salesforce_to_dynamics(world):
    engine, fno, sf, dv, _state, fno_key, dv_key = world
    renamed = {**fno.tables["CustomersV3"][fno_key], "CustomerAccount": "US-0042",
               "OrganizationName": "Atlas Fabrication Holdings"}
    [to_sf] = await engine.process([change("customers_to_salesforce", "fno", "CustomersV3", fno_key, renamed,
                                           T0 + timedelta(minutes=5))])
    assert to_sf.status == "written", to_sf.error
    assert sf.tables["Account"][SF_ID]["Name"] == "Atlas Fabrication Holdings"
    # The Account's change (Syncline wrote it, for the customer entity) is news for Customer 360.
    at = T0 + timedelta(minutes=6)
    outcomes = await engine.process([
        change("accounts_to_fno", "salesforce", "Account", SF_ID, sf_now(sf), at),
        change("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID, sf_now(sf), at),
    ])
    statuses = {o.envelope.flow: o.status for o in outcomes}
    assert statuses["crm_accounts_from_salesforce"] == "written", outcomes
    assert dv.tables["accounts"][dv_key]["name"] == "Atlas Fabrication Holdings"
    assert statuses["accounts_to_fno"] == "skipped_noop"  # already an F&O customer: create-only, not an update
    # ... and no ping-pong: Syncline's write to Dynamics comes back through the reverse flow as an echo.
    dv_row = {**dv.tables["accounts"][dv_key], "accountid": dv_key}
    [back] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, dv_row,
                                          T0 + timedelta(minutes=7))])
    assert back.status == "skipped_echo", back
    # The same Account change delivered again is an echo for Customer 360 now (it synced it).
    [again] = await engine.process([change("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID,
                                           sf_now(sf), T0 + timedelta(minutes=8))])
    assert again.status == "skipped_echo", again


async def test_a_snapshot_kept_per_record_by_earlier_versions_is_read_as_before(spec: FlowSet):
    sf, dv = FakeSystem("salesforce"), FakeSystem("dataverse")
    state = SqliteStateStore(":memory:")
    engine = SyncEngine(spec, sinks={"salesforce": sf, "dataverse": dv}, state=state, clock=lambda: T0)
    try:
        payload = sf_account(Dynamics_CRM_Id__c="a1b2c3d4-0000-4000-8000-000000000001")
        values = {k: payload[k] for k in ("Name", "Type", "Phone", "Credit_Limit__c", "Payment_Terms__c",
                                          "BillingCity", "BillingCountry")}
        await state.put_links([Link("crm_account", "salesforce", SF_ID, "dataverse",
                                    "a1b2c3d4-0000-4000-8000-000000000001")])
        await state.put_snapshots([Snapshot("salesforce", "Account", SF_ID, values, values_hash(values), T0)])
        [same] = await engine.process([change("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID,
                                              payload, T0 + timedelta(minutes=1))])
        assert same.status == "skipped_echo"
        assert not dv.writes
        [changed] = await engine.process([change("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID,
                                                 {**payload, "Phone": "+1 412 555 0199"}, T0 + timedelta(minutes=2))])
        assert changed.status == "written"
        # Written under the entity from now on; the old row stays as it was for the entities still reading it.
        new = await state.get_snapshots("salesforce", snapshot_table("Account", "crm_account"), [SF_ID])
        assert new[SF_ID].values["Phone"] == "+1 412 555 0199"
        old = await state.get_snapshots("salesforce", "Account", [SF_ID])
        assert old[SF_ID].values["Phone"] == "+1 412 555 0100"
    finally:
        await state.close()


async def test_a_failed_id_write_back_of_a_create_only_flow_is_repaired_on_retry(spec: FlowSet):
    fno, sf = FakeSystem("fno"), FlakySystem("salesforce")
    state = SqliteStateStore(":memory:")
    engine = SyncEngine(spec, sinks={"fno": fno, "salesforce": sf}, state=state, clock=lambda: T0)
    try:
        sf.put("Account", SF_ID, sf_account())
        sf.fail_next(TransientError("salesforce: HTTP 503"), applied=False, prefix="wb:")
        message = change("accounts_to_fno", "salesforce", "Account", SF_ID, sf_account(), T0)
        [first] = await engine.process([message])
        assert first.status == "failed"
        assert first.error is not None
        assert first.error.retriable
        [fno_key] = fno.tables["CustomersV3"]
        assert "Dynamics_Account__c" not in sf.tables["Account"][SF_ID]
        [retry] = await engine.process([message])  # the same message, delivered again
        assert retry.status == "skipped_noop"
        assert retry.target_key == fno_key
        assert sf.tables["Account"][SF_ID]["Dynamics_Account__c"] == fno_key
        assert len(fno.tables["CustomersV3"]) == 1  # repaired, not created again
        propagated = await state.read_audit(limit=10, decision="id_propagated")
        assert [a.key for a in propagated] == [SF_ID]
    finally:
        await state.close()


@pytest.mark.parametrize("whole_call", [False, True], ids=["per-record", "whole-call"])
@pytest.mark.parametrize("error", [AmbiguousWriteError("salesforce: HTTP 504 after the write was applied"),
                                   TransientError("salesforce: connection reset after the request was sent")],
                         ids=["ambiguous", "transient"])
async def test_a_revert_after_an_unacknowledged_write_reaches_the_target(world, error, whole_call):
    engine, _fno, sf, dv, state, _fno_key, dv_key = world
    dv_row = {**dv.tables["accounts"][dv_key], "accountid": dv_key}
    assert dv_row["creditlimit"] == 50_000.0
    raised = {**dv_row, "creditlimit": 80_000.0}
    sf.fail_next(error, applied=True, whole_call=whole_call)
    first = change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, raised, T0 + timedelta(minutes=5))
    [failed] = await engine.process([first])
    assert failed.status == "failed"
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 80_000.0  # applied, but never acknowledged
    # The user takes it back: the old in-sync value, which is not what Salesforce holds now.
    reverted = change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, dv_row,
                      T0 + timedelta(minutes=6))
    [revert] = await engine.process([reverted])
    assert revert.status == "written", revert
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 50_000.0
    # The failed change's retry is older than what synced since: it must not bring the old value back.
    [late] = await engine.process([first])
    assert late.status == "skipped_noop"
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 50_000.0
    snaps = await state.get_snapshots("salesforce", snapshot_table("Account", "crm_account"), [SF_ID])
    assert UNCONFIRMED not in snaps[SF_ID].values  # acknowledged again
    # And the pair is in sync again: the same state once more is an echo.
    [echo] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, dv_row,
                                          T0 + timedelta(minutes=7))])
    assert echo.status == "skipped_echo"


async def credit_limit_applied_but_unanswered(engine, sf, dv, dv_key):
    """Dynamics raises the credit limit to 80,000; Salesforce applies it and answers 504. The in-sync row."""
    dv_row = {**dv.tables["accounts"][dv_key], "accountid": dv_key}
    sf.fail_next(AmbiguousWriteError("salesforce: HTTP 504"), applied=True)
    [failed] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key,
                                            {**dv_row, "creditlimit": 80_000.0}, T0 + timedelta(minutes=5))])
    assert failed.status == "failed"
    return dv_row


async def test_a_resubmission_after_an_unacknowledged_write_is_written_again(world):
    engine, _fno, sf, dv, _state, _fno_key, dv_key = world
    dv_row = await credit_limit_applied_but_unanswered(engine, sf, dv, dv_key)
    # The revert happened before the resubmission read the record: it carries the old in-sync state.
    sf.writes.clear()
    [resubmitted] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key,
                                                 dv_row, T0 + timedelta(minutes=6), origin="resubmit")])
    assert resubmitted.status == "written"
    assert [op.values.get("Credit_Limit__c") for op in sf.writes] == [50_000.0]
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 50_000.0


@pytest.mark.parametrize("whole_call", [False, True], ids=["per-record", "whole-call"])
async def test_a_throttled_write_was_never_applied_so_the_old_state_stays_an_echo(world, whole_call):
    engine, _fno, sf, dv, state, _fno_key, dv_key = world
    dv_row = {**dv.tables["accounts"][dv_key], "accountid": dv_key}
    sf.fail_next(ThrottledError("salesforce: HTTP 429", retry_after=5), applied=False, whole_call=whole_call)
    [throttled] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key,
                                               {**dv_row, "creditlimit": 80_000.0}, T0 + timedelta(minutes=5))])
    assert throttled.status == "failed"
    snaps = await state.get_snapshots("salesforce", snapshot_table("Account", "crm_account"), [SF_ID])
    assert UNCONFIRMED not in snaps[SF_ID].values  # the mark taken before the call is undone
    sf.writes.clear()
    [revert] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, dv_row,
                                            T0 + timedelta(minutes=6))])
    assert revert.status == "skipped_echo"
    assert not sf.writes


async def test_reconcile_reports_drift_of_a_field_the_target_owns_on_the_flow_that_writes_it(world, spec: FlowSet):
    _engine, fno, sf, _dv, state, _fno_key, dv_key = world
    # What a lost revert leaves: Salesforce holds a credit limit Dynamics (its owner) no longer has.
    sf.tables["Account"][SF_ID]["Credit_Limit__c"] = 80_000.0
    sf.tables["Account"][SF_ID]["Phone"] = "+1 412 555 0199"  # and a Salesforce-owned field Dynamics lacks
    report = {d.entity: d for d in await reconcile(spec, {"fno": fno, "salesforce": sf, "dataverse": _dv}, state)}
    crm = report["crm_account"]
    assert crm.flow == "crm_accounts_from_salesforce"
    assert crm.field_drift == {SF_ID: ["telephone1: expected '+1 412 555 0199', found '+1 412 555 0100'"]}
    # Salesforce -> Dynamics never writes the credit limit on an update: the Dynamics record is the one to replay.
    assert crm.reverse_flow == "crm_accounts_to_salesforce"
    assert crm.reverse_field_drift == {
        dv_key: ["Credit_Limit__c: expected 50000.0 (dataverse creditlimit), found 80000.0"]}
    assert crm.drift == 2
    excluded = {d.entity: d for d in await reconcile(spec, {"fno": fno, "salesforce": sf, "dataverse": _dv}, state,
                                                    exclude={"crm_account": {dv_key}})}
    assert excluded["crm_account"].reverse_field_drift == {}
    assert dv_key in excluded["crm_account"].excluded


class Killed(BaseException):
    """The process dies (kill -9) between the target applying a write and Syncline reading the answer."""


async def test_a_revert_after_a_crash_mid_write_reaches_the_target(world, spec: FlowSet):
    engine, fno, sf, dv, state, _fno_key, dv_key = world
    dv_row = {**dv.tables["accounts"][dv_key], "accountid": dv_key}
    first = change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, {**dv_row, "creditlimit": 80_000.0},
                   T0 + timedelta(minutes=5))

    async def applied_then_killed(ops: Sequence[WriteOp]) -> list[WriteResult]:
        await FakeSystem.write(sf, ops)
        raise Killed

    sf.write = applied_then_killed  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await engine.process([first])
    del sf.write
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 80_000.0  # applied; no answer was ever read
    # A new process over the same state: the user's revert comes before the dead process's message is redelivered.
    systems = {"fno": fno, "salesforce": sf, "dataverse": dv}
    restarted = SyncEngine(spec, sinks=systems, sources=systems, state=state, clock=lambda: T0)
    [revert] = await restarted.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key, dv_row,
                                               T0 + timedelta(minutes=6))])
    assert revert.status == "written", revert
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 50_000.0
    [late] = await restarted.process([first])  # the redelivered message of the dead process
    assert late.status == "skipped_noop", late
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 50_000.0


async def test_a_reverse_write_of_other_fields_leaves_the_target_unknown(world):
    engine, _fno, sf, dv, _state, _fno_key, dv_key = world
    await credit_limit_applied_but_unanswered(engine, sf, dv, dv_key)
    # A Salesforce user edits the phone: Salesforce -> Dynamics writes it, but never the credit limit Dynamics owns,
    # so what Salesforce holds for that field is as unknown as before.
    sf.tables["Account"][SF_ID]["Phone"] = "+1 412 555 0199"
    [phone] = await engine.process([change("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID,
                                           sf_now(sf), T0 + timedelta(minutes=6))])
    assert phone.status == "written", phone
    assert dv.tables["accounts"][dv_key]["creditlimit"] == 50_000.0
    [revert] = await engine.process([change("crm_accounts_to_salesforce", "dataverse", "accounts", dv_key,
                                            {**dv.tables["accounts"][dv_key], "accountid": dv_key},
                                            T0 + timedelta(minutes=7))])
    assert revert.status == "written", revert
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 50_000.0


async def test_the_reverse_flow_reads_back_an_unacknowledged_write_as_an_echo_and_keeps_a_revert():
    """Dynamics -> SAP writes a shared field (the city), SAP applies it and answers 504; the user reverts the city in
    Dynamics, but SAP's change (Syncline's own write) is polled first. It must not be copied back over the revert."""
    where = FLOWS.parent / "flows"
    sap_spec = load_flows(where / "sap.yaml")
    dv, sap = FakeSystem("dataverse"), FlakySystem("sap")
    state = SqliteStateStore(":memory:")
    engine = SyncEngine(sap_spec, sinks={"dataverse": dv, "sap": sap}, state=state, clock=lambda: T0)
    acc = "7d2f5a9c-0000-4000-8000-000000000001"
    row = {"accountid": acc, "name": "Front Range Pumps", "accountnumber": "ACC-70001", "address1_city": "Denver",
           "address1_country": "US", "paymenttermscode": 1, "syn_currencycode": "USD"}
    try:
        dv.put("accounts", acc, row)
        [created] = await engine.process([change("accounts_to_sap", "dataverse", "accounts", acc, row, T0)])
        assert created.status == "written", created
        partner = str(created.target_key)
        row = {**dv.tables["accounts"][acc], "accountid": acc}  # with the partner number written back
        dv.writes.clear()

        sap.fail_next(AmbiguousWriteError("sap: HTTP 504 after the write was applied"), applied=True)
        [failed] = await engine.process([change("accounts_to_sap", "dataverse", "accounts", acc,
                                                {**row, "address1_city": "Boulder"}, T0 + timedelta(minutes=5))])
        assert failed.status == "failed"
        assert sap.tables["A_BusinessPartner"][partner]["to_BusinessPartnerAddress.CityName"] == "Boulder"
        # The user reverts in Dynamics (still Denver there); SAP's change is polled before the revert is processed.
        polled = dict(sap.tables["A_BusinessPartner"][partner], BusinessPartner=partner)
        [back] = await engine.process([change("partners_to_dynamics", "sap", "A_BusinessPartner", partner, polled,
                                              T0 + timedelta(minutes=6))])
        assert back.status == "skipped_noop", back  # nothing else changed: Dynamics already holds the rest
        assert back.detail == HOLDS_DETAIL
        assert not dv.writes  # Dynamics keeps the user's Denver
        [revert] = await engine.process([change("accounts_to_sap", "dataverse", "accounts", acc, row,
                                                T0 + timedelta(minutes=7))])
        assert revert.status == "written", revert
        assert sap.tables["A_BusinessPartner"][partner]["to_BusinessPartnerAddress.CityName"] == "Denver"
        # In sync again: SAP's change for the revert comes back and writes nothing either.
        polled = dict(sap.tables["A_BusinessPartner"][partner], BusinessPartner=partner)
        [echo] = await engine.process([change("partners_to_dynamics", "sap", "A_BusinessPartner", partner, polled,
                                              T0 + timedelta(minutes=8))])
        assert echo.status == "skipped_noop", echo
        assert not dv.writes
        assert dv.tables["accounts"][acc]["address1_city"] == "Denver"
    finally:
        await state.close()
