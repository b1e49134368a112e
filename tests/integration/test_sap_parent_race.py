"""A new Dynamics account and its first order synced at the same moment make one SAP business partner: the order's
ensure of its customer takes the account's lock (in the process and across processes) and finds before it creates,
as SAP numbers partners itself and has no upsert."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.demo import Sandbox
from shared.bootstrap import Services, build_services
from shared.core.controller import envelopes_for
from shared.core.engine import Outcome
from shared.core.envelope import ChangeEnvelope
from shared.settings import Settings
from tests.integration.test_dataverse_sap import account, order, sap_box, sap_orders_for

SAP_LATENCY_MS = 300  # each side's find-then-create takes >= 0.6 s in SAP: the two windows overlap
RETRIES = 100


@pytest.fixture(params=["embedded", "azure"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    with sap_box(tmp_path / "box", partners=2, orders=0, runtime=request.param) as sandbox:
        yield sandbox


async def change(services: Services, flow: str, table: str, key: str) -> ChangeEnvelope:
    record = (await services.sources["dataverse"].fetch(table, [key]))[key]
    [envelope] = [e for e in envelopes_for(services.flowset, "dataverse", table, [record], origin="webhook")
                  if e.flow == flow]
    return envelope


async def sync(services: Services, envelope: ChangeEnvelope) -> list[Outcome]:
    """Process as a webhook's direct write would, then as the queue's retries would until the change settles."""
    history: list[Outcome] = []
    for _ in range(RETRIES):
        [outcome] = await services.engine.process([envelope])
        history.append(outcome)
        if outcome.status not in ("failed", "deferred") or outcome.error is None or not outcome.error.retriable:
            break
        await asyncio.sleep(0.2)
    return history


def partners_for(box: Sandbox, number: str) -> list[dict[str, Any]]:
    assert box.sap is not None
    return [p for p in box.sap.all("A_BusinessPartner") if p.get("BusinessPartnerIDByExtSystem") == number]


@pytest.mark.parametrize("processes", [1, 2], ids=["one process", "two processes"])
async def test_a_new_account_and_its_first_order_at_once_make_one_sap_partner(box: Sandbox, processes: int):
    assert box.sap is not None
    first = build_services(Settings())
    # A second process: its own engine (own in-process locks), connectors and state client on the same stores.
    second = build_services(Settings()) if processes == 2 else first
    try:
        assert (await first.controller.run_cycle()).outcome == "ok"  # SAP materials -> Dynamics products
        products = {p["productnumber"]: p["productid"] for p in box.dv.all("products")}
        number = "ACC-ENSURE-1"
        customer = account(box, number)
        order_id = order(box, customer, products["PV-PUMP-100"])
        account_change = await change(first, "accounts_to_sap", "accounts", customer)
        order_change = await change(second, "orders_to_sap", "salesorders", order_id)
        box.sap.latency_ms = SAP_LATENCY_MS

        account_history, order_history = await asyncio.gather(sync(first, account_change),
                                                              sync(second, order_change))

        partners = partners_for(box, number)
        assert len(partners) == 1, [(o.envelope.flow, o.status, o.created, o.target_key)
                                    for o in (*account_history, *order_history)]
        [partner] = partners
        assert account_history[-1].status in ("written", "skipped_echo", "skipped_noop"), account_history
        assert order_history[-1].status == "written", order_history
        # Whichever side lost the race was told the record is busy and was not let near SAP meanwhile (in one
        # process the order's ensure waits for the account's write instead, and finds the partner linked).
        lost = [o.error.reason if o.error else o.status for o in (*account_history[:-1], *order_history[:-1])]
        assert set(lost) <= {"RECORD_BUSY"}, (account_history, order_history)
        assert bool(lost) == (processes == 2), (account_history, order_history)
        assert box.dv.get("accounts", customer)["syn_sapbusinesspartner"] == partner["BusinessPartner"]
        [sap_order] = sap_orders_for(box, box.dv.get("salesorders", order_id)["ordernumber"])
        assert sap_order["SoldToParty"] == partner["BusinessPartner"]
    finally:
        if second is not first:
            await second.aclose()
        await first.aclose()
