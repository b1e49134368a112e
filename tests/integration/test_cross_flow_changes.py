"""A change that arrives through one flow continues through another (issue 13, defect 1), on the F&O, Salesforce
and Dataverse simulators: a Salesforce Account that is an F&O customer and a Customer 360 account."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.demo import Sandbox, environment, settle, start_sandbox
from sandbox.fno import seed_fno
from sandbox.salesforce import seed_new_accounts
from shared.bootstrap import build_services
from shared.core.controller import envelopes_for
from shared.settings import Settings


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path / "box", sales=True)
    try:
        with environment(sandbox.env):
            yield sandbox
    finally:
        sandbox.stop()


async def written_per_flow(services: Any) -> Counter[str]:
    return Counter(a.flow for a in await services.state.read_audit(limit=100_000, decision="written"))


def crm_account(box: Sandbox, sf_id: str) -> dict[str, Any]:
    [row] = [a for a in box.dv.all("accounts") if a.get("syn_salesforceid") == sf_id]
    return row


async def test_an_fno_rename_reaches_dynamics_through_salesforce_and_comes_back_as_echoes(box: Sandbox):
    seed_fno(box.fno, customers=2, products=2)
    new = seed_new_accounts(box.sf, n=2)
    services = build_services(Settings())
    services.controller.parent_wait_seconds = 0.2
    cycles: list[Any] = []
    try:
        await settle(services, box, cycles)
        sf_id = new["good"][0]
        account = box.sf.get("Account", sf_id)
        assert account is not None
        company, number = str(account["Dynamics_Account__c"]).split("|")  # F&O made it a customer
        assert crm_account(box, sf_id)["name"] == account["Name"]  # and Customer 360 a Dynamics account

        box.fno.apply_change("CustomersV3", (company, number), {"OrganizationName": "Keystone Holdings Inc."})
        before = await written_per_flow(services)
        await settle(services, box, cycles)
        assert box.sf.get("Account", sf_id)["Name"] == "Keystone Holdings Inc."  # type: ignore[index]
        assert crm_account(box, sf_id)["name"] == "Keystone Holdings Inc."
        # F&O -> Salesforce, then Salesforce -> Dynamics; Dynamics' change back is an echo, not a third write.
        assert await written_per_flow(services) - before == Counter(
            {"customers_to_salesforce": 1, "crm_accounts_from_salesforce": 1})

        # Quiet afterwards: another cycle polls the changes Syncline made and writes nothing.
        await settle(services, box, cycles)
        assert await written_per_flow(services) - before == Counter(
            {"customers_to_salesforce": 1, "crm_accounts_from_salesforce": 1})
        assert (await services.queue.depth()).active == 0
    finally:
        await services.aclose()


async def test_a_revert_after_a_504_that_was_applied_reaches_dynamics(box: Sandbox):
    """Issue 13, defect 6, through the real Salesforce and Dataverse connectors: Dataverse applies a write and
    answers 504; the user then reverts the Salesforce change to the last in-sync value. The revert is written."""
    seed_fno(box.fno, customers=1, products=1)
    new = seed_new_accounts(box.sf, n=1)
    services = build_services(Settings())
    services.controller.parent_wait_seconds = 0.2
    try:
        await settle(services, box, [])
        sf_id = new["good"][0]
        before = crm_account(box, sf_id)["telephone1"]
        source = services.sources["salesforce"]

        async def sync_current() -> Any:
            record = (await source.fetch("Account", [sf_id]))[sf_id]
            [env] = [e for e in envelopes_for(services.flowset, "salesforce", "Account", [record], origin="poll")
                     if e.flow == "crm_accounts_from_salesforce"]
            [outcome] = await services.engine.process([env])
            return outcome

        box.sf.ui_change("Account", sf_id, {"Phone": "+1 412 555 0199"})
        box.dv.faults.apply_then_504(1)
        failed = await sync_current()
        assert failed.status == "failed"
        assert failed.error is not None
        assert failed.error.reason == "AMBIGUOUS_WRITE"
        assert crm_account(box, sf_id)["telephone1"] == "+1 412 555 0199"  # applied, never acknowledged

        box.sf.ui_change("Account", sf_id, {"Phone": before})
        reverted = await sync_current()
        assert reverted.status == "written", reverted
        assert crm_account(box, sf_id)["telephone1"] == before
        again = await sync_current()
        assert again.status == "skipped_echo"  # in sync again: the next copy is an echo
    finally:
        await services.aclose()
