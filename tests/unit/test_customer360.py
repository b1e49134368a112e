"""Customer 360 on the shipped spec: Salesforce owns the sales fields, Dynamics the credit and billing fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.core.engine import SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.mapping.spec import load_spec
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem

SPEC = load_spec(Path(__file__).resolve().parents[2] / "flows" / "customer-360.yaml")
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
SF_ID = "0015g00000AbCdEAAV"


def sf_account(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"Id": SF_ID, "Name": "Atlas Fabrication", "Type": "Customer - Direct",
                               "Phone": "+1 412 555 0100", "Website": "https://atlas.example",
                               "AnnualRevenue": 2_500_000.0, "Credit_Limit__c": 50_000.0, "Payment_Terms__c": "Net 30",
                               "BillingCity": "Pittsburgh", "BillingCountry": "US"}
    base.update(over)
    return base


def env(flow: str, system: str, table: str, key: str, payload: dict[str, object], at: datetime) -> ChangeEnvelope:
    return ChangeEnvelope(flow=flow, operation="upsert", source_system=system, source_table=table, source_key=key,
                          source_modified=at, payload=payload)


@pytest.fixture
async def world():
    sf, dv = FakeSystem("salesforce"), FakeSystem("dataverse")
    state = SqliteStateStore(":memory:")
    engine = SyncEngine(SPEC, sinks={"salesforce": sf, "dataverse": dv}, sources={"salesforce": sf, "dataverse": dv},
                        state=state, clock=lambda: T0)
    sf.put("Account", SF_ID, sf_account())
    [created] = await engine.process([env("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID,
                                          sf_account(), T0)])
    assert created.status == "written"
    yield engine, sf, dv, state, created.target_key
    await state.close()


async def test_a_new_salesforce_account_seeds_every_field_and_gets_the_dynamics_id_back(world):
    _engine, sf, dv, _state, dv_id = world
    row = dv.tables["accounts"][dv_id]
    assert row["name"] == "Atlas Fabrication"
    assert row["creditlimit"] == 50_000.0  # Dynamics-owned, but a create seeds it
    assert row["paymenttermscode"] == 1
    assert row["customertypecode"] == 3
    assert sf.tables["Account"][SF_ID]["Dynamics_CRM_Id__c"] == dv_id


async def test_dynamics_enriches_credit_but_cannot_overwrite_salesforce_owned_fields(world):
    engine, sf, dv, _state, dv_id = world
    dv_row = {**dv.tables["accounts"][dv_id], "accountid": dv_id, "name": "Renamed In Dynamics",
              "creditlimit": 80_000.0, "paymenttermscode": 3}
    dv.put("accounts", dv_id, dv_row)
    sf.writes.clear()
    [outcome] = await engine.process([env("crm_accounts_to_salesforce", "dataverse", "accounts", dv_id, dv_row,
                                          T0 + timedelta(minutes=5))])
    assert outcome.status == "written"
    [op] = sf.writes
    # Only the Dynamics-owned fields go out; Salesforce owns name, type, phone, website and revenue.
    assert set(op.values) == {"Credit_Limit__c", "Payment_Terms__c", "BillingCity", "BillingCountry"}
    assert op.values["Payment_Terms__c"] == "Net 45"
    assert sf.tables["Account"][SF_ID]["Name"] == "Atlas Fabrication"
    assert sf.tables["Account"][SF_ID]["Credit_Limit__c"] == 80_000.0


async def test_salesforce_cannot_overwrite_dynamics_owned_credit_and_its_own_write_is_an_echo(world):
    engine, _sf, dv, _state, dv_id = world
    changed = sf_account(Phone="+1 412 555 0199", Credit_Limit__c=1.0, Dynamics_CRM_Id__c=dv_id)
    [outcome] = await engine.process([env("crm_accounts_from_salesforce", "salesforce", "Account", SF_ID, changed,
                                          T0 + timedelta(minutes=7))])
    assert outcome.status == "written"
    row = dv.tables["accounts"][dv_id]
    assert row["telephone1"] == "+1 412 555 0199"
    assert row["creditlimit"] == 50_000.0  # Dynamics owns the credit limit: the Salesforce value is not taken
    # Syncline's write to Dynamics comes back as a Dynamics change: equal to the in-sync state, so dropped.
    echo = {**row, "accountid": dv_id}
    [back] = await engine.process([env("crm_accounts_to_salesforce", "dataverse", "accounts", dv_id, echo,
                                       T0 + timedelta(minutes=8))])
    assert back.status in ("skipped_echo", "skipped_noop")


async def test_accounts_outside_the_scope_stay_out(world):
    engine, _sf, dv, _state, _dv_id = world
    erp_only = sf_account(Id="0015g00000ZzZzZAAV", Type=None, Name="ERP-only customer")
    [outcome] = await engine.process([env("crm_accounts_from_salesforce", "salesforce", "Account",
                                          "0015g00000ZzZzZAAV", erp_only, T0)])
    assert outcome.status == "skipped_noop"
    assert "out of scope" in outcome.detail
    assert len(dv.tables["accounts"]) == 1
