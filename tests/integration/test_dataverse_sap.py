"""Dynamics 365 <-> SAP S/4HANA through the real engine, connectors and simulators: deep inserts, replays without
duplicates, unmapped codes dead-lettered with their reason, status back through SAP events."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.demo import Sandbox, environment, start_sandbox
from sandbox.sap import seed_sap
from shared.bootstrap import build_services
from shared.ops import initial_load
from shared.settings import Settings

UNITS = {"PC": 100000000, "EA": 100000001, "KG": 100000002}
PLANTS = {"1710": 100000000, "1720": 100000001}


@contextmanager
def sap_box(directory: Path, *, partners: int, orders: int, runtime: str = "embedded") -> Iterator[Sandbox]:
    """The sandbox with SAP, seeded, and Syncline's environment pointing at it with the SAP flows."""
    sandbox = start_sandbox(directory, sap=True, runtime=runtime)
    assert sandbox.sap is not None
    seed_sap(sandbox.sap, partners=partners, orders=orders)
    try:
        env = {**{k: v for k, v in os.environ.items() if k.startswith("SYNCLINE_")}, **sandbox.env,
               "SYNCLINE_FLOWS": str(Path(__file__).resolve().parents[2] / "flows" / "sap.yaml")}
        with environment(env):
            yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    with sap_box(tmp_path / "box", partners=4, orders=2) as sandbox:
        yield sandbox


def account(box: Sandbox, number: str, **over: Any) -> str:
    values = {"name": f"Customer {number}", "accountnumber": number, "address1_city": "Denver",
              "address1_country": "US", "paymenttermscode": 1, "syn_currencycode": "USD", **over}
    return str(box.dv.insert("accounts", values))


def order(box: Sandbox, customer: str, product: str, *, unit: str = "PC", plant: str = "1710",
          unit_code: int | None = None, lines: int = 2) -> str:
    order_id = str(box.dv.insert("salesorders", {
        "name": "Pump order", "customerid": customer, "syn_salesorg": 100000000, "syn_distributionchannel": 100000000,
        "syn_currencycode": "USD", "requestdeliveryby": "2026-12-18", "statecode": 1}))
    for n in range(lines):
        box.dv.insert("salesorderdetails", {
            "salesorderid": order_id, "productid": product, "quantity": float(n + 2), "priceperunit": 1250.0,
            "syn_unit": unit_code if unit_code is not None else UNITS[unit], "syn_plant": PLANTS[plant]})
    return order_id


def sap_orders_for(box: Sandbox, order_number: str) -> list[dict[str, Any]]:
    return [o for o in box.sap.all("A_SalesOrder") if o.get("PurchaseOrderByCustomer") == order_number]


async def test_order_goes_in_one_deep_insert_after_its_partner_and_a_rerun_duplicates_nothing(box, tmp_path):
    services = build_services(Settings())
    try:
        assert (await services.controller.run_cycle()).outcome == "ok"  # SAP materials -> Dynamics products
        products = {p["productnumber"]: p["productid"] for p in box.dv.all("products")}
        customer = account(box, "ACC-70001")
        order_id = order(box, customer, products["PV-PUMP-100"])
        posts_before = box.sap.request_counts["POST"]
        load = await initial_load(services)
        assert load.statuses.get("written", 0) >= 2, load.as_dict()  # the partner, then the order
        number = box.dv.get("salesorders", order_id)["ordernumber"]
        [sap_order] = sap_orders_for(box, number)
        assert box.dv.get("salesorders", order_id)["syn_sapsalesorder"] == sap_order["SalesOrder"]
        partner = box.dv.get("accounts", customer)["syn_sapbusinesspartner"]
        assert sap_order["SoldToParty"] == partner
        items = box.sap.items_of(sap_order["SalesOrder"])
        by_item = sorted(items, key=lambda i: int(i["SalesOrderItem"]))
        assert [float(i["RequestedQuantity"]) for i in by_item] == [2.0, 3.0]  # in Dynamics line-number order
        # the partner lookup and create, then one POST for the order with both items (a deep insert)
        order_posts = [p for m, p in box.sap.requests if m == "POST" and "A_SalesOrder" in p]
        assert len(order_posts) == 1
        assert box.sap.request_counts["POST"] - posts_before == 2

        # The same changes again with Syncline's state lost (a replay, a redeployed app): SAP finds the
        # partner by BusinessPartnerIDByExtSystem and the order by PurchaseOrderByCustomer; nothing doubles.
        await services.aclose()
        os.environ["SYNCLINE_STATE_DIR"] = str(tmp_path / "state-rerun")
        services = build_services(Settings())
        partners_before = len(box.sap.all("A_BusinessPartner"))
        again = await initial_load(services)
        assert again.statuses.get("failed", 0) == 0, again.as_dict()
        assert len(box.sap.all("A_BusinessPartner")) == partners_before
        assert len(sap_orders_for(box, number)) == 1
        assert len(box.sap.items_of(sap_order["SalesOrder"])) == 2
    finally:
        await services.aclose()


async def test_unmapped_unit_or_plant_dead_letters_with_its_reason_and_sends_nothing(box):
    services = build_services(Settings())
    try:
        assert (await services.controller.run_cycle()).outcome == "ok"
        products = {p["productnumber"]: p["productid"] for p in box.dv.all("products")}
        customer = account(box, "ACC-70002")
        bad_unit = order(box, customer, products["PV-PUMP-100"], unit_code=100000003)  # "Box": no SAP unit mapped
        await initial_load(services)
        report = await services.controller.run_cycle()
        assert report.outcome == "ok"
        [dead] = [m for m in await services.queue.peek_dead_letters() if m.application_properties["key"] == bad_unit]
        assert dead.dead_letter_reason == "UNMAPPED_CHOICE"
        assert "syn_unit" in (dead.dead_letter_description or "")
        assert "100000003" in (dead.dead_letter_description or "")
        number = box.dv.get("salesorders", bad_unit)["ordernumber"]
        assert sap_orders_for(box, number) == []  # never half an order
    finally:
        await services.aclose()


async def test_sap_status_events_reach_the_dynamics_order_once(box):
    from sandbox.funchost import build_app
    from sandbox.server import RunningServer
    from shared.bootstrap import set_services

    services = build_services(Settings())
    set_services(None)
    host = RunningServer(build_app()).start()
    try:
        assert (await services.controller.run_cycle()).outcome == "ok"
        products = {p["productnumber"]: p["productid"] for p in box.dv.all("products")}
        order_id = order(box, account(box, "ACC-70003"), products["PV-VALVE-50"], unit="EA")
        await initial_load(services)
        sap_number = box.dv.get("salesorders", order_id)["syn_sapsalesorder"]
        box.sap.register_event_endpoint(f"{host.url}/api/webhooks/sap",
                                        headers={"x-syncline-key": box.env["SYNCLINE_WEBHOOK_SECRET"]})
        box.sap.advance_order(sap_number, "delivered")
        await box.sap.flush_events()
        [event] = [e for e in box.sap.events if e["data"].get("SalesOrder") == sap_number][-1:]
        async with httpx.AsyncClient() as http:  # Event Mesh delivers at least once: the same event again
            again = await http.post(f"{host.url}/api/webhooks/sap", content=json.dumps(event),
                                    headers={"x-syncline-key": box.env["SYNCLINE_WEBHOOK_SECRET"]})
        assert again.status_code == 202
        assert again.json()["skipped"] == 1
        report = await services.controller.run_cycle(poll=False)
        assert report.statuses.get("written") == 1, report.statuses
        assert box.dv.get("salesorders", order_id)["syn_deliverystatus"] == 100000002  # Delivered
    finally:
        host.stop()
        set_services(None)
        await services.aclose()
