"""F&O customers and products into Salesforce through the same engine, queue and controller: External ID
upserts (a re-run duplicates nothing), collections of 200, and the bad records dead-lettered with reasons."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.demo import environment
from sandbox.fno import UNMAPPED_CURRENCY, FinOpsSimulator, seed_fno
from sandbox.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SalesforceSimulator
from sandbox.server import RunningServer
from sandbox.server import TestCA as SandboxCA
from shared.bootstrap import build_services
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[tuple[FinOpsSimulator, SalesforceSimulator]]:
    ca = SandboxCA.create(tmp_path / "tls")
    fno, sf = FinOpsSimulator(), SalesforceSimulator()
    seed_fno(fno, customers=300, products=40)
    servers = [RunningServer(fno.app, ca=ca).start(), RunningServer(sf.app, ca=ca).start()]
    sf.instance_url = servers[1].url
    env = {
        "SYNCLINE_STATE_DIR": str(tmp_path / "state"), "SYNCLINE_CA_BUNDLE": str(ca.ca_path),
        "DATAVERSE__URL": "", "ARCGIS__SERVICE_URL": "",
        "FNO__ENVIRONMENT_URL": servers[0].url, "FNO__AUTHORITY_HOST": servers[0].url,
        "FNO__TENANT_ID": fno.tenant_id, "FNO__CLIENT_ID": fno.client_id, "FNO__CLIENT_SECRET": fno.client_secret,
        "SALESFORCE__MY_DOMAIN_URL": servers[1].url, "SALESFORCE__CLIENT_ID": DEFAULT_CLIENT_ID,
        "SALESFORCE__CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
    }
    try:
        with environment({**{k: v for k, v in os.environ.items() if k.startswith("SYNCLINE_")}, **env}):
            yield fno, sf
    finally:
        for server in servers:
            server.stop()
        fno.close()


def count(sf: SalesforceSimulator, sobject: str) -> int:
    return sf.count(sobject)


async def test_customers_and_products_reach_salesforce_once_with_bad_records_dead_lettered(sims):
    fno, sf = sims
    services = build_services(Settings())
    try:
        report = await services.controller.run_cycle()
        assert report.outcome == "ok", report.error
        good_customers = [c for c in fno.all("CustomersV3") if c["SalesCurrencyCode"] != UNMAPPED_CURRENCY]
        good_products = [p for p in fno.all("ReleasedProductsV2") if p["ProductName"]]
        accounts = sf.find("Account")
        assert len(accounts) == len(good_customers)
        sample = good_customers[0]
        external_id = f"{sample['dataAreaId']}|{sample['CustomerAccount']}"
        [match] = [a for a in accounts if a["Dynamics_Account__c"] == external_id]
        assert match["Name"] == sample["OrganizationName"]
        assert match["BillingCountry"] in {"US", "DE"}
        assert count(sf, "Product2") == len(good_products)
        reasons = sorted(m.dead_letter_reason or "" for m in await services.queue.peek_dead_letters())
        bad = (len(fno.all("CustomersV3")) - len(good_customers)
               + len(fno.all("ReleasedProductsV2")) - len(good_products))
        assert len(reasons) == bad
        assert set(reasons) == {"UNMAPPED_CHOICE", "REQUIRED_FIELD_MISSING"}
        # Writes go in sObject Collections of 200: with token, describe and queries the whole run stays
        # far below one call per record.
        written = len(good_customers) + len(good_products)
        assert sf.request_count <= written / 200 + 10, sf.request_count

        # Re-running with the state lost (or a replayed load) updates by External ID instead of duplicating.
        await services.aclose()
        os.environ["SYNCLINE_STATE_DIR"] = os.environ["SYNCLINE_STATE_DIR"] + "-rerun"
        services = build_services(Settings())
        again = await services.controller.run_cycle()
        assert again.outcome == "ok"
        assert again.statuses.get("written", 0) == written
        assert count(sf, "Account") == len(good_customers)
        assert count(sf, "Product2") == len(good_products)
    finally:
        await services.aclose()


async def test_business_event_delivered_twice_produces_one_write_and_own_cdc_writes_are_echoes(sims):
    import json

    import httpx

    from sandbox.funchost import build_app
    from shared.bootstrap import set_services

    fno, sf = sims
    services = build_services(Settings())
    set_services(None)
    host = RunningServer(build_app()).start()
    try:
        await services.controller.run_cycle()
        fno.register_business_event_endpoint(f"{host.url}/api/webhooks/fno")
        customer = next(c for c in fno.all("CustomersV3") if c["SalesCurrencyCode"] != UNMAPPED_CURRENCY)
        fno.apply_change("CustomersV3", (customer["dataAreaId"], customer["CustomerAccount"]),
                         {"OrganizationName": "Renamed Fabrication GmbH"})
        await fno.flush_events()
        fno.deliver_duplicate_last_event()
        await fno.flush_events()
        assert (await services.queue.depth()).active == 1  # the duplicate ControlNumber was dropped
        report = await services.controller.run_cycle(poll=False)
        assert report.statuses == {"written": 1}
        external_id = f"{customer['dataAreaId']}|{customer['CustomerAccount']}"
        [account] = sf.find("Account", Dynamics_Account__c=external_id)
        assert account["Name"] == "Renamed Fabrication GmbH"

        # Change events caused by Syncline's own writes are recognised by their origin and dropped.
        own = sf.events()
        assert own
        async with httpx.AsyncClient() as http:
            resp = await http.post(f"{host.url}/api/webhooks/salesforce", content=json.dumps(own))
            assert resp.status_code == 202, resp.text
            assert resp.json()["skipped"] == len(own)
            assert resp.json()["accepted"] == 0
            sf.ui_change("Account", account["Id"], {"Phone": "+49 711 555 0100"})
            user_events = [e for e in sf.events() if e not in own]
            resp = await http.post(f"{host.url}/api/webhooks/salesforce", content=json.dumps(user_events))
            assert resp.json()["accepted"] == 1
            again = await http.post(f"{host.url}/api/webhooks/salesforce", content=json.dumps(user_events))
            assert again.json()["accepted"] == 0  # same replay id: a duplicate
    finally:
        host.stop()
        set_services(None)
        await services.aclose()


async def test_spent_daily_allocation_pauses_salesforce_and_loses_nothing(sims, tmp_path):
    from datetime import UTC, datetime, timedelta

    from shared.runtime.embedded import SqliteQueue

    fno, sf = sims
    now = [datetime.now(UTC)]

    def clock() -> datetime:
        return now[0]

    queue = SqliteQueue(tmp_path / "queue.db", name="inbound", clock=clock)
    services = build_services(Settings(), queue=queue)
    services.controller.clock = clock
    try:
        sf.limits.daily_max = 3  # token + describe + one collection: the allocation runs out mid-load
        first = await services.controller.run_cycle()
        assert first.outcome == "ok", first.error
        assert "salesforce" in first.paused
        assert first.held > 0
        written_before = sf.count("Account") + sf.count("Product2")
        assert written_before < 200  # at most the one collection that got through
        reasons = {m.dead_letter_reason for m in await queue.peek_dead_letters()}
        assert reasons <= {"UNMAPPED_CHOICE", "REQUIRED_FIELD_MISSING"}  # only the seeds' bad records
        depth = await queue.depth()
        assert depth.active == 0
        assert depth.scheduled == first.held  # parked, not retried into the dead-letter queue

        from shared.ops import health

        status = await health(services)
        assert status["status"] == "degraded"
        assert status["systems"]["salesforce"]["paused_until"] == first.paused["salesforce"]

        # While paused, a cycle does not call Salesforce at all, however many changes wait.
        calls = sf.request_count
        fno.apply_change("CustomersV3", ("usmf", "US-001"), {"OrganizationName": "Paused Changes Inc"})
        paused = await services.controller.run_cycle()
        assert sf.request_count == calls
        assert paused.outcome == "ok"

        # After midnight UTC the allocation is back: everything parked is written, once.
        sf.reset_allocation()
        sf.limits.daily_max = 100_000
        now[0] = datetime.fromisoformat(first.paused["salesforce"]) + timedelta(seconds=1)
        for _ in range(3):
            done = await services.controller.run_cycle()
            assert done.outcome == "ok", done.error
        good_customers = [c for c in fno.all("CustomersV3") if c["SalesCurrencyCode"] != UNMAPPED_CURRENCY]
        good_products = [p for p in fno.all("ReleasedProductsV2") if p["ProductName"]]
        assert sf.count("Account") == len(good_customers)
        assert sf.count("Product2") == len(good_products)
        [renamed] = sf.find("Account", Dynamics_Account__c="usmf|US-001")
        assert renamed["Name"] == "Paused Changes Inc"
        assert (await queue.depth()).scheduled == 0
    finally:
        await services.aclose()


async def test_a_customer_made_from_an_account_whose_link_was_lost_is_linked_back_not_twinned(sims):
    """Issue 13 defect 5: F&O created the customer for a new Salesforce Account, but the answer (or the process)
    was lost before the link was stored. The F&O poll then saw a "new" customer, and customers_to_salesforce
    created a second Account for it, although the customer's SynclineSalesforceId names the Account it came
    from. It must link to that Account (link.origin_field) instead."""
    fno, sf = sims
    services = build_services(Settings())
    try:
        first = await services.controller.run_cycle()
        assert first.outcome == "ok", first.error
        accounts_before = sf.count("Account")
        origin = sf.ui_create("Account", {"Name": "Lost Answer Industries", "Legal_Entity__c": "US01",
                                          "CurrencyIsoCode": "USD", "Type": "Customer - Direct",
                                          "BillingCity": "Denver"})
        # What accounts_to_fno's create left behind when its answer was lost: the customer, no link.
        made = fno.insert("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "US-C09001",
                                          "OrganizationName": "Lost Answer Industries", "CustomerGroupId": "10",
                                          "SalesCurrencyCode": "USD", "AddressCity": "Denver",
                                          "AddressCountryRegionId": "USA", "SynclineSalesforceId": origin})
        assert await services.controller.poll(only={("fno", "CustomersV3")}) >= 1
        drained = await services.controller.run_cycle(poll=False)
        assert drained.outcome == "ok", drained.error
        assert sf.find("Account", Dynamics_Account__c=f"usmf|{made['CustomerAccount']}") == []  # no twin
        assert sf.count("Account") == accounts_before + 1
        account = sf.get("Account", origin)
        assert account is not None
        assert account["AccountNumber"] == made["CustomerAccount"]  # the customer's values reached its Account
        # The Account's own change then finds the customer (by SynclineSalesforceId): no second customer either.
        again = await services.controller.run_cycle()
        assert again.outcome == "ok", again.error
        assert [c["CustomerAccount"] for c in fno.all("CustomersV3") if c.get("SynclineSalesforceId") == origin] \
            == [made["CustomerAccount"]]
        assert sf.count("Account") == accounts_before + 1
    finally:
        await services.aclose()


def won_deals(sf: SalesforceSimulator, n: int, lines: int) -> list[str]:
    """`n` Closed Won opportunities of one US account, `lines` line items each (made open, then won, as a rep)."""
    account = next(a for a in sf.find("Account") if a.get("Legal_Entity__c") == "US01"
                   and a.get("CurrencyIsoCode") == "USD" and a.get("Dynamics_Account__c"))
    products = [p for p in sf.find("Product2") if str(p.get("Dynamics_Item__c", "")).startswith("usmf|")]
    deals = []
    for i in range(n):
        rid = sf.ui_create("Opportunity", {"Name": f"Auth fault deal {i}", "StageName": "Proposal/Price Quote",
                                           "CloseDate": "2026-03-15", "AccountId": account["Id"],
                                           "Legal_Entity__c": "US01", "CurrencyIsoCode": "USD"})
        for product in products[:lines]:
            sf.ui_create("OpportunityLineItem", {"OpportunityId": rid, "Product2Id": product["Id"],
                                                 "Quantity": 2.0, "UnitPrice": 150.0})
        sf.ui_change("Opportunity", rid, {"StageName": "Closed Won"})
        deals.append(rid)
    return deals


def fno_orders(fno: FinOpsSimulator, deal: str) -> list[tuple[str, int]]:
    """(order number, number of lines) of every F&O sales order made from the opportunity."""
    return [(h["SalesOrderNumber"], sum(1 for ln in fno.all("SalesOrderLines")
                                        if ln["SalesOrderNumber"] == h["SalesOrderNumber"]
                                        and ln["dataAreaId"] == h["dataAreaId"]))
            for h in fno.all("SalesOrderHeadersV2") if h.get("SynclineSalesforceId") == deal]


async def test_a_401_in_one_line_write_retries_the_flow_later_and_keeps_the_orders_already_written(
        sims, monkeypatch):
    """Issue 13 defect 9: a 401 that survives the token refresh in one F&O line write failed the whole write call,
    and every change of the flow in the batch failed with that error (AUTH_FAILED, another record's text),
    including the orders already written. Now the order written before it is settled as written (its key is
    written back), the refused one and those not attempted are retried later, none is dead-lettered, and the
    retry completes them without a twin header or line."""
    fno, sf = sims
    monkeypatch.setenv("FNO__MAX_CONCURRENCY", "1")  # ops one after the other: the 401 strikes the second one
    services = build_services(Settings())
    try:
        first = await services.controller.run_cycle()
        assert first.outcome == "ok", first.error
        dead_before = len(await services.queue.peek_dead_letters())
        deals = won_deals(sf, 4, lines=2)
        # The first order's two lines go in; the second order's first line is refused, refreshed, refused again.
        fno.faults.fail_next(2, 401, path_contains="SalesOrderLines", method="POST", skip=2)
        faulted = await services.controller.run_cycle()
        assert faulted.outcome == "ok", faulted.error
        assert fno.request_counts["fault401"] == 2
        assert "AUTH_FAILED" not in faulted.dead_lettered
        assert len(await services.queue.peek_dead_letters()) == dead_before
        orders = {deal: fno_orders(fno, deal) for deal in deals}
        written = [d for d in deals if (sf.get("Opportunity", d) or {}).get("Dynamics_Sales_Order__c")]
        assert len(written) == 1, orders  # settled as written: its F&O key went back to Salesforce
        [(number, lines)] = orders[written[0]]
        assert lines == 2
        assert (sf.get("Opportunity", written[0]) or {})["Dynamics_Sales_Order__c"] == f"usmf|{number}"
        assert sorted(len(o) for o in orders.values()) == [0, 0, 1, 1]  # the refused one has its header only
        assert faulted.retried >= 3
        for _ in range(3):
            again = await services.controller.run_cycle()
            assert again.outcome == "ok", again.error
        for deal in deals:
            [(number, lines)] = fno_orders(fno, deal)  # one header each, no twin
            assert lines == 2
            assert (sf.get("Opportunity", deal) or {})["Dynamics_Sales_Order__c"] == f"usmf|{number}"
        assert len(await services.queue.peek_dead_letters()) == dead_before
    finally:
        await services.aclose()


async def kill_while_f_and_o_creates_a_customer(fno: FinOpsSimulator, sf: SalesforceSimulator,
                                               lock_seconds: float) -> tuple[str, dict[str, Any]]:
    """A new ERP Account in Salesforce; the controller (a process of its own) is killed (`kill -9`) while F&O
    applies the customer create for it, so the customer lands and nobody stores the link or writes its key back.
    Returns the Account id and the customer."""
    services = build_services(Settings())
    try:
        for _ in range(2):  # the initial load, then its own writes read back by the Salesforce poll
            assert (await services.controller.run_cycle()).outcome == "ok"
        origin = sf.ui_create("Account", {"Name": "Killed Mid-Create Corp", "Legal_Entity__c": "US01",
                                          "CurrencyIsoCode": "USD", "Type": "Customer - Direct",
                                          "BillingCity": "Denver", "BillingCountry": "US"})
        assert await services.controller.poll(only={("salesforce", "Account")}) == 1
    finally:
        await services.aclose()
    fno.faults.slow_next(1, 1.5, "CustomersV3", method="POST")  # F&O applies it after the process is gone
    proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--no-poll"], cwd=ROOT,
                            env={**os.environ, "SYNCLINE_LOCK_SECONDS": str(lock_seconds)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not fno.request_counts["fault-1"]:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "controller exited early"
            assert time.monotonic() < deadline, "the controller never sent the create"
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()
    for _ in range(100):
        if customers_from(fno, origin):
            break
        await asyncio.sleep(0.05)
    [customer] = customers_from(fno, origin)  # applied although nobody heard the answer
    assert not (sf.get("Account", origin) or {}).get("Dynamics_Account__c")
    return origin, customer


def customers_from(fno: FinOpsSimulator, account_id: str) -> list[dict[str, Any]]:
    return [c for c in fno.all("CustomersV3") if c.get("SynclineSalesforceId") == account_id]


def customer_posts(fno: FinOpsSimulator) -> int:
    return sum(1 for m, p in fno.requests if m == "POST" and p.startswith("/data/CustomersV3"))


async def test_a_customer_create_applied_as_the_controller_is_killed_is_found_again_not_twinned(sims):
    """Issue 13 defect 4, after a crash: the controller is killed while F&O applies its customer create; the
    change comes back and the next attempt finds the customer by its match field (SynclineSalesforceId) before
    any create: one customer, its key written back to the Account."""
    fno, sf = sims
    origin, customer = await kill_while_f_and_o_creates_a_customer(fno, sf, lock_seconds=1)
    await asyncio.sleep(1.2)  # the killed controller's lock expires: the change is delivered again
    services = build_services(Settings())
    try:
        rerun = await services.controller.run_cycle(poll=False)
        assert rerun.outcome == "ok", rerun.error
        assert rerun.statuses.get("written") == 1, rerun.statuses
    finally:
        await services.aclose()
    assert [c["CustomerAccount"] for c in customers_from(fno, origin)] == [customer["CustomerAccount"]]  # no twin
    assert customer_posts(fno) == 1
    assert (sf.get("Account", origin) or {})["Dynamics_Account__c"] == f"usmf|{customer['CustomerAccount']}"


async def test_the_reverse_flow_links_a_customer_whose_create_was_killed_to_its_account(sims):
    """Issue 13 defect 5, end to end: the F&O poll reads the customer whose create the killed controller never
    heard about before the Account's change comes back; customers_to_salesforce must update the Account the
    customer came from (its SynclineSalesforceId), not create a second Account. The Account's own change then
    finds the customer: no second customer either."""
    fno, sf = sims
    origin, customer = await kill_while_f_and_o_creates_a_customer(fno, sf, lock_seconds=4)
    accounts = sf.count("Account")
    services = build_services(Settings())
    try:
        # The Account's message is still locked by the dead process: only the customer's change is drained.
        assert await services.controller.poll(only={("fno", "CustomersV3")}) == 1
        reverse = await services.controller.run_cycle(poll=False)
        assert reverse.outcome == "ok", reverse.error
        assert reverse.statuses.get("written") == 1, reverse.statuses
        assert sf.count("Account") == accounts  # no twin Account
        assert (sf.get("Account", origin) or {})["AccountNumber"] == customer["CustomerAccount"]
        await asyncio.sleep(4.2)  # the dead process's lock expires: the Account's change comes back
        rerun = await services.controller.run_cycle(poll=False)
        assert rerun.outcome == "ok", rerun.error
        assert rerun.received >= 1
    finally:
        await services.aclose()
    assert sf.count("Account") == accounts
    assert [c["CustomerAccount"] for c in customers_from(fno, origin)] == [customer["CustomerAccount"]]
    assert customer_posts(fno) == 1
