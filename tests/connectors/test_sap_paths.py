"""SapClient against the SAP simulator: dotted paths, phone numbers, the ProductAvailability read model, $batch."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from sandbox.sap import DROP, SapSimulator, seed_sap
from sandbox.server import TestCA as SandboxCA
from shared.connectors._http import RetryPolicy
from shared.connectors.sap import (
    ITEM_MATCH_FIELD,
    PARTNER_MATCH_FIELD,
    PRODUCT_AVAILABILITY,
    BasicAuth,
    SapClient,
    flatten_nested,
    nest_dotted,
)
from shared.connectors.sap.changes import _HashCheckpoint
from shared.core.errors import MappingError, RejectedError
from shared.core.ports import Lines, LineWrite, SourceRecord, WriteOp
from shared.mapping.engine import same
from tests.connectors.test_sap import Hooked
from tests.served import Recorder, Served, serve, tls_context

BP = "/sap/opu/odata/sap/API_BUSINESS_PARTNER/"
SO = "/sap/opu/odata/sap/API_SALES_ORDER_SRV/"
AVAILABILITY = "/sap/opu/odata/sap/API_PRODUCT_AVAILY_INFO_BASIC/"


class Env(Served[SapSimulator]):
    pass


@pytest.fixture(scope="module")
def env(sandbox_ca: SandboxCA) -> Iterator[Env]:
    sim = SapSimulator()
    seed_sap(sim)
    with closing(sim), serve(sim.app, sandbox_ca) as server:
        yield Env(sim, server, sandbox_ca)


@pytest.fixture
def sim(env: Env) -> SapSimulator:
    env.sim.faults.clear()
    env.sim.requests.clear()
    env.sim.batch_requests.clear()
    return env.sim


@dataclass
class Clients:
    env: Env
    made: list[SapClient] = field(default_factory=list)

    def transport(self) -> Hooked:
        return Hooked(httpx.AsyncHTTPTransport(verify=tls_context(self.env.ca)))

    def client(self, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> SapClient:
        kwargs.setdefault("policy", RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02))
        client = SapClient(self.env.server.url, BasicAuth(self.env.sim.user, self.env.sim.password),
                           transport=transport or self.transport(), sleep=Recorder().sleep, **kwargs)
        self.made.append(client)
        return client


@pytest.fixture
async def clients(env: Env, sim: SapSimulator) -> AsyncIterator[Clients]:
    made = Clients(env)
    yield made
    for client in made.made:
        await client.aclose()


def partner_values(city: str = "Denver", phone: str | None = "+1 303 555 0100", **extra: Any) -> dict[str, Any]:
    """The values accounts_to_sap sends on create (flow defaults included), flat with dotted names."""
    return {
        "BusinessPartnerCategory": "2", "BusinessPartnerGrouping": "BP02", "OrganizationBPName1": "Front Range Water",
        "to_BusinessPartnerAddress.CityName": city, "to_BusinessPartnerAddress.StreetName": "Blake St",
        "to_BusinessPartnerAddress.PostalCode": "80202", "to_BusinessPartnerAddress.Country": "US",
        "to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber": phone,
        "to_Customer.to_CustomerSalesArea.SalesOrganization": "1710",
        "to_Customer.to_CustomerSalesArea.DistributionChannel": "10",
        "to_Customer.to_CustomerSalesArea.Division": "00",
        "to_Customer.to_CustomerSalesArea.CustomerPaymentTerms": "NT30",
        "to_Customer.to_CustomerSalesArea.Currency": "USD", **extra}


def partner(op_id: str, account: str, values: dict[str, Any], *, key: str | None = None) -> WriteOp:
    return WriteOp(op_id, "upsert", "A_BusinessPartner", key=key, match=None if key else {PARTNER_MATCH_FIELD: account},
                   values=values)


def order(op_id: str, reference: str, *, sold_to: str = "17100002", material: str = "PV-PUMP-100",
          quantity: float = 4.0, **header: Any) -> WriteOp:
    """An order as orders_to_sap sends it: flat header values, one line matched by its source line number."""
    values = {"SalesOrderType": "OR", "OrganizationDivision": "00", "SalesOrganization": "1710",
              "DistributionChannel": "10", "TransactionCurrency": "USD", "RequestedDeliveryDate": "2026-12-15",
              "SoldToParty": sold_to, **header}
    line = LineWrite(f"{reference}-guid-1", {"RequestedQuantity": quantity, "RequestedQuantityUnit": "PC",
                                             "ProductionPlant": "1710", "Material": material},
                     {ITEM_MATCH_FIELD: "1"})
    return WriteOp(op_id, "upsert", "A_SalesOrder", match={"PurchaseOrderByCustomer": reference}, values=values,
                   lines=Lines("to_Item", {}, [line]))


def writes(sim: SapSimulator) -> list[tuple[str, str]]:
    return [(m, unquote(p)) for m, p in sim.requests if m != "GET"]


def orders_with(sim: SapSimulator, reference: str) -> list[dict[str, Any]]:
    return [r for r in sim.all("A_SalesOrder") if r["PurchaseOrderByCustomer"] == reference]


# ============================================================================================ pure


def test_nest_dotted_builds_first_entries_and_keeps_given_nesting() -> None:
    nested = nest_dotted({
        "OrganizationBPName1": "Acme",
        "to_BusinessPartnerAddress": [{"HouseNumber": "7"}, {"CityName": "Second"}],
        "to_BusinessPartnerAddress.CityName": "Denver",
        "to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber": "+1 303 555 0100",
        "to_Customer.to_CustomerSalesArea.Currency": "USD",
        "to_Customer.OrderIsBlockedForCustomer": False})
    assert nested == {
        "OrganizationBPName1": "Acme",
        "to_BusinessPartnerAddress": [
            {"HouseNumber": "7", "CityName": "Denver", "to_PhoneNumber": [{"PhoneNumber": "+1 303 555 0100"}]},
            {"CityName": "Second"}],
        "to_Customer": {"to_CustomerSalesArea": [{"Currency": "USD"}], "OrderIsBlockedForCustomer": False}}
    with pytest.raises(MappingError, match="not a navigation property"):
        nest_dotted({"Address.CityName": "x"})
    original = {"to_BusinessPartnerAddress": [{"CityName": "A"}], "to_BusinessPartnerAddress.CityName": "B"}
    nest_dotted(original)
    assert original["to_BusinessPartnerAddress"] == [{"CityName": "A"}]  # the op's values stay as they were


def test_flatten_nested_takes_the_first_entry_of_every_navigation() -> None:
    flat = flatten_nested({
        "BusinessPartner": "1", "to_BusinessPartnerAddress": [
            {"CityName": "Denver", "to_PhoneNumber": [{"PhoneNumber": "1"}, {"PhoneNumber": "2"}],
             "to_EmailAddress": []},
            {"CityName": "Boulder"}],
        "to_Customer": {"OrderIsBlockedForCustomer": True, "to_CustomerSalesArea": [{"Currency": "USD"}]}})
    assert flat == {"to_BusinessPartnerAddress.CityName": "Denver",
                    "to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber": "1",
                    "to_Customer.OrderIsBlockedForCustomer": True,
                    "to_Customer.to_CustomerSalesArea.Currency": "USD"}


def test_hash_checkpoint_is_exact_when_small_and_bucketed_when_large() -> None:
    small = {f"M-{n}": f"{n:010x}" for n in range(100)}
    exact = _HashCheckpoint.of(3, small)
    assert exact.buckets is None
    again = _HashCheckpoint.parse(exact.text(), "t")
    assert (again.generation, again.hashes) == (3, small)
    moved = {**small, "M-7": "changed000"}
    del moved["M-9"]
    assert again.changed(moved, _HashCheckpoint.of(4, moved)) == (["M-7"], ["M-9"])
    large = {f"{n:018d}": f"{n * 7919:010x}" for n in range(8000)}
    bucketed = _HashCheckpoint.of(1, large)
    assert bucketed.buckets is not None
    assert len(bucketed.text()) <= 30_000
    changed_large = {**large, f"{1234:018d}": "changed000"}
    found, gone = _HashCheckpoint.parse(bucketed.text(), "t").changed(
        changed_large, _HashCheckpoint.of(2, changed_large))
    assert f"{1234:018d}" in found
    assert len(found) < 20  # only the changed key's bucket-mates, not the catalogue
    assert gone == []


# ============================================================================================ dotted paths


async def test_dotted_partner_write_creates_nested_entities_and_reads_back_flat(
        clients: Clients, sim: SapSimulator) -> None:
    transport = clients.transport()
    sap = clients.client(transport=transport)
    values = partner_values()
    made = await sap.write([partner("d1", "ACC-00042", values)])
    assert made[0].ok, made[0].error
    assert made[0].created
    number = made[0].key
    assert number is not None
    assert writes(sim) == [("POST", f"{BP}A_BusinessPartner")]  # one deep insert
    body = json.loads(next(r for r in transport.sent if r.method == "POST").content)
    assert body["to_BusinessPartnerAddress"]["results"][0]["to_PhoneNumber"] == {
        "results": [{"PhoneNumber": "+1 303 555 0100"}]}
    [address] = [a for a in sim.all("A_BusinessPartnerAddress") if a["BusinessPartner"] == number]
    assert (address["CityName"], address["Country"]) == ("Denver", "US")
    [phone] = [p for p in sim.all("A_AddressPhoneNumber") if p["AddressID"] == address["AddressID"]]
    assert (phone["PhoneNumber"], phone["DestinationLocationCountry"], phone["IsDefaultPhoneNumber"]) == (
        "+1 303 555 0100", "US", True)
    area = sim.get("A_CustomerSalesArea", number, "1710", "10", "00")
    assert area is not None
    assert (area["CustomerPaymentTerms"], area["Currency"]) == ("NT30", "USD")

    fetched = (await sap.fetch("A_BusinessPartner", [number]))[number]
    scanned = next(r for page in [p async for p in sap.scan("A_BusinessPartner")] for r in page if r.key == number)
    [selected] = await sap.select("A_BusinessPartner", equals={PARTNER_MATCH_FIELD: "ACC-00042"})
    for record in (fetched, scanned, selected):
        differing = [k for k, v in values.items() if not same(v, record.values.get(k))]
        assert differing == []
        assert record.values["to_Customer.OrderIsBlockedForCustomer"] is False
        assert record.values["to_BusinessPartnerAddress"][0]["CityName"] == "Denver"  # nested values stay too
    changes = [r for batch, _ in [c async for c in sap.changes_since("A_BusinessPartner", None)] for r in batch]
    changed = next(r for r in changes if r.key == number)
    assert changed.values["to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber"] == "+1 303 555 0100"
    seeded = (await sap.fetch("A_BusinessPartner", ["17100003"]))["17100003"]
    assert seeded.values["to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber"].startswith("+1 ")
    assert seeded.values["to_BusinessPartnerAddress.to_EmailAddress.EmailAddress"].startswith("purchasing@")


async def test_update_of_one_dotted_field_patches_only_that_entity(clients: Clients, sim: SapSimulator) -> None:
    transport = clients.transport()
    sap = clients.client(transport=transport)
    made = await sap.write([partner("u1", "ACC-00043", partner_values())])
    number = made[0].key
    assert number is not None
    sim.requests.clear()
    same_again = await sap.write([partner("u2", "ACC-00043", partner_values(), key=number)])
    assert (same_again[0].ok, same_again[0].created) == (True, False)
    assert writes(sim) == []  # nothing differs, nothing written

    transport.sent.clear()
    phone_changed = await sap.write([partner("u3", "ACC-00043", partner_values(phone="+1 303 555 0199"), key=number)])
    assert phone_changed[0].ok
    [address] = [a for a in sim.all("A_BusinessPartnerAddress") if a["BusinessPartner"] == number]
    assert writes(sim) == [("PATCH", f"{BP}A_AddressPhoneNumber(AddressID='{address['AddressID']}',Person='',"
                                     "OrdinalNumber='1')")]
    [patch] = [r for r in transport.sent if r.method == "PATCH"]
    assert json.loads(patch.content) == {"PhoneNumber": "+1 303 555 0199"}
    assert patch.headers["If-Match"]
    assert sim.get("A_AddressPhoneNumber", address["AddressID"], "", "1")["PhoneNumber"] == "+1 303 555 0199"

    sim.requests.clear()
    moved = await sap.write([partner("u4", "ACC-00043", {"to_BusinessPartnerAddress.CityName": "Boulder"},
                                     key=number)])
    assert moved[0].ok
    assert writes(sim) == [("PATCH", f"{BP}A_BusinessPartnerAddress(BusinessPartner='{number}',"
                                     f"AddressID='{address['AddressID']}')")]

    sim.requests.clear()
    terms = await sap.write([partner("u5", "ACC-00043", {"to_Customer.to_CustomerSalesArea.CustomerPaymentTerms":
                                                         "NT45"}, key=number)])
    assert terms[0].ok
    assert writes(sim) == [("PATCH", f"{BP}A_CustomerSalesArea(Customer='{number}',SalesOrganization='1710',"
                                     "DistributionChannel='10',Division='00')")]
    assert sim.get("A_CustomerSalesArea", number, "1710", "10", "00")["CustomerPaymentTerms"] == "NT45"


async def test_phone_number_created_by_deep_insert_or_on_update_and_validated(
        clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client()
    without = await sap.write([partner("p1", "ACC-00044", partner_values(phone=None))])
    number = without[0].key
    assert number is not None
    [address] = [a for a in sim.all("A_BusinessPartnerAddress") if a["BusinessPartner"] == number]
    assert [p for p in sim.all("A_AddressPhoneNumber") if p["AddressID"] == address["AddressID"]] == []
    sim.requests.clear()
    added = await sap.write([partner("p2", "ACC-00044", {
        "to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber": "+1 720 555 0142",
        "to_BusinessPartnerAddress.to_EmailAddress.EmailAddress": "orders@frontrange.example"}, key=number)])
    assert added[0].ok, added[0].error
    path = f"{BP}A_BusinessPartnerAddress(BusinessPartner='{number}',AddressID='{address['AddressID']}')"
    assert writes(sim) == [("POST", f"{path}/to_PhoneNumber"), ("POST", f"{path}/to_EmailAddress")]
    record = (await sap.fetch("A_BusinessPartner", [number]))[number]
    assert record.values["to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber"] == "+1 720 555 0142"
    assert record.values["to_BusinessPartnerAddress.to_PhoneNumber.InternationalPhoneNumber"] == "+17205550142"
    assert record.values["to_BusinessPartnerAddress.to_EmailAddress.EmailAddress"] == "orders@frontrange.example"
    refused = await sap.write([partner("p3", "ACC-00045", partner_values(phone="call me maybe"))])
    assert isinstance(refused[0].error, RejectedError)
    assert "AM/172: Telephone number call me maybe contains invalid characters" in refused[0].error.detail
    assert [p for p in sim.all("A_BusinessPartner") if p[PARTNER_MATCH_FIELD] == "ACC-00045"] == []


async def test_order_values_round_trip_through_the_engine_normalisation(clients: Clients, sim: SapSimulator) -> None:
    transport = clients.transport()
    sap = clients.client(transport=transport)
    op = order("o1", "ORD-01001-K3L8")
    made = await sap.write([op])
    assert made[0].ok, made[0].error
    number = made[0].key
    assert number is not None
    body = json.loads(next(r for r in transport.sent if r.method == "POST").content)
    assert body["RequestedDeliveryDate"] == "/Date(1797292800000)/"
    assert body["to_Item"]["results"][0]["RequestedQuantity"] == "4.0"
    record = (await sap.fetch("A_SalesOrder", [number]))[number]
    assert [k for k, v in op.values.items() if not same(v, record.values.get(k))] == []
    assert record.values["RequestedDeliveryDate"] == "2026-12-15"
    [item] = record.values["to_Item"]
    assert item["RequestedQuantity"] == 4.0
    assert isinstance(record.values["TotalNetAmount"], float)
    assert (record.values["OverallDeliveryStatus"], record.values["OverallTotalDeliveryStatus"],
            record.values["OverallOrdReltdBillgStatus"]) == ("A", "A", "A")
    sim.requests.clear()
    replay = await sap.write([order("o2", "ORD-01001-K3L8")])
    assert (replay[0].key, replay[0].created) == (number, False)
    assert writes(sim) == []


# ============================================================================================ products


def calls(sim: SapSimulator) -> list[str]:
    return [f"{m} {unquote(p).split('?')[0]}" for m, p in sim.requests]


async def test_product_availability_scan_joins_product_price_and_stock(clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client()
    records = {r.key: r for page in [p async for p in sap.scan(PRODUCT_AVAILABILITY)] for r in page}
    assert set(records) == set(sim.customizing.materials)
    pump = records["PV-PUMP-100"]
    assert pump.values == {"Product": "PV-PUMP-100", "ProductDescription": "Centrifugal pump CP-100",
                           "BaseUnit": "PC", "NetPrice": 1250.0, "Currency": "USD", "AvailableQuantity": 40.0}
    assert records["PV-GREASE"].values["AvailableQuantity"] == 0.0  # only maintained in plant 1720
    assert records["PV-VALVE-50"].values["NetPrice"] == 185.5  # channel 10, not the dealers' price
    # one product page, one price page, the availability of all products in one $batch (after its CSRF fetch)
    assert calls(sim) == [
        "GET /sap/opu/odata/sap/API_SLSPRICINGCONDITIONRECORD_SRV/A_SlsPrcgCndnRecdValidity",
        "GET /sap/opu/odata/sap/API_PRODUCT_SRV/A_Product", f"GET {AVAILABILITY}", f"POST {AVAILABILITY}$batch"]
    assert len([m for m, p in sim.batch_requests if "DetermineAvailabilityAt" in p]) == 5  # products in 1710

    sim.requests.clear()
    both = clients.client(availability_plants=("1710", "1720"), batch_size=1, price_distribution_channel="20")
    fetched = await both.fetch(PRODUCT_AVAILABILITY, ["PV-PUMP-100", "PV-GREASE", "NO-SUCH"])
    assert set(fetched) == {"PV-PUMP-100", "PV-GREASE"}
    assert fetched["PV-PUMP-100"].values["AvailableQuantity"] == 52.0  # 40 in 1710 + 12 in 1720
    assert fetched["PV-PUMP-100"].values["NetPrice"] == 1150.0  # 1250 less the dealers' 8 %
    assert fetched["PV-GREASE"].values["AvailableQuantity"] == 28.0
    # batch_size=1: each plant's availability is its own call
    assert sum(1 for c in calls(sim) if c == f"GET {AVAILABILITY}DetermineAvailabilityAt") == 3
    selected = await sap.select(PRODUCT_AVAILABILITY, equals={"BaseUnit": "EA"})
    assert {r.key for r in selected} == {"PV-VALVE-50", "PV-MOTOR-7K5"}


@pytest.mark.parametrize("status", [500, 502, 504, DROP], ids=["500", "502", "504", "connection-dropped"])
async def test_the_read_only_availability_batch_is_retried_like_a_read(
        clients: Clients, sim: SapSimulator, status: int) -> None:
    """Issue 13 defect 2 (SAP side): the availability $batch holds only retrieve parts, yet it was retried as a
    write (429/503 only), so one 5xx or reset failed the whole read model poll."""
    sap = clients.client()
    sim.faults.fail_next(1, status, path_contains="$batch", method="POST")
    records = {r.key: r for page in [p async for p in sap.scan(PRODUCT_AVAILABILITY)] for r in page}
    assert records["PV-PUMP-100"].values["AvailableQuantity"] == 40.0
    assert sum(1 for c in calls(sim) if c == f"POST {AVAILABILITY}$batch") == 2


async def test_product_availability_changes_report_only_changed_products(
        clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client()

    async def poll(checkpoint: str | None) -> tuple[list[SourceRecord], str]:
        batches = [b async for b in sap.changes_since(PRODUCT_AVAILABILITY, checkpoint)]
        return [r for b, _ in batches for r in b], batches[-1][1]

    first, checkpoint = await poll(None)
    assert {r.key for r in first} == set(sim.customizing.materials)
    nothing, same_checkpoint = await poll(checkpoint)
    assert (nothing, same_checkpoint) == ([], checkpoint)
    sim.set_stock("PV-SEALKIT", "1710", 3)
    sim.set_price("PV-VALVE-50", "199.90")
    changed, after = await poll(checkpoint)
    assert sorted((r.key, r.values["AvailableQuantity"], r.values["NetPrice"]) for r in changed) == [
        ("PV-SEALKIT", 3.0, 42.0), ("PV-VALVE-50", 70.0, 199.9)]
    replayed, _ = await poll(checkpoint)  # a crash before the checkpoint was saved: the same changes again
    assert [r.version for r in replayed] == [r.version for r in changed]
    sim.set_stock("PV-SEALKIT", "1710", 85)  # back to where it was: still a change
    back, latest = await poll(after)
    assert [r.key for r in back] == ["PV-SEALKIT"]
    assert back[0].version != first[[r.key for r in first].index("PV-SEALKIT")].version
    assert (await poll(latest))[0] == []


# ============================================================================================ $batch


async def test_fifty_new_orders_go_in_one_batch_call(clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client(batch_size=100)
    await sap.fetch("A_SalesOrder", ["4000001"])
    sim.requests.clear()
    before = sim.request_count
    ops = [order(f"b{n}", f"ORD-B50-{n:03d}", quantity=float(n % 5 + 1)) for n in range(50)]
    results = await sap.write(ops)
    assert all(r.ok and r.created for r in results), [r.error for r in results if not r.ok]
    # the two match look-ups (40 + 10 references) in one $batch, the 50 deep inserts in another, one CSRF fetch
    assert calls(sim) == [f"GET {SO}", f"POST {SO}$batch", f"POST {SO}$batch"]
    assert sim.request_count - before == 3
    inserts = [p for m, p in sim.batch_requests if m == "POST"]
    assert inserts == [f"{SO}A_SalesOrder"] * 50
    for n, result in enumerate(results):
        [made] = orders_with(sim, f"ORD-B50-{n:03d}")
        assert made["SalesOrder"] == result.key
        [item] = sim.items_of(made["SalesOrder"])
        assert (item["Material"], item["RequestedQuantity"]) == ("PV-PUMP-100", f"{n % 5 + 1}.000")

    sim.requests.clear()
    sim.batch_requests.clear()
    replay = await sap.write(ops)
    assert [(r.ok, r.created, r.key) for r in replay] == [(True, False, r.key) for r in results]
    assert calls(sim) == [f"POST {SO}$batch"]  # the look-ups only: nothing differs, nothing written
    assert all(len(orders_with(sim, f"ORD-B50-{n:03d}")) == 1 for n in range(50))

    naive = clients.client(batch_size=1)
    sim.requests.clear()
    alone = await naive.write([order(f"n{n}", f"ORD-N-{n:03d}") for n in range(3)])
    assert all(r.created for r in alone)
    assert sorted(c for c in calls(sim) if c.startswith("POST")) == [f"POST {SO}A_SalesOrder"] * 3


async def test_one_bad_order_in_a_batch_fails_only_itself(clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client(batch_size=100)
    failed_before = sim.request_counts["batch_changesets_failed"]
    ops = [order(f"x{n}", f"ORD-BAD-{n}") for n in range(6)]
    ops[3] = order("x3", "ORD-BAD-3", material="NO-SUCH-PART")
    results = await sap.write(ops)
    assert [r.ok for r in results] == [True, True, True, False, True, True]
    error = results[3].error
    assert isinstance(error, RejectedError)
    assert error.detail == ("SAP rejected A_SalesOrder create (op x3): M3/305: Material NO-SUCH-PART does not exist "
                            "(item 10) (field Material)")
    assert orders_with(sim, "ORD-BAD-3") == []
    assert all(len(orders_with(sim, f"ORD-BAD-{n}")) == 1 for n in (0, 1, 2, 4, 5))
    assert sim.request_counts["batch_changesets_failed"] == failed_before + 1


async def test_csrf_expiry_during_a_batch_is_refreshed_once(clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client(batch_size=100)
    assert all(r.ok for r in await sap.write([order("c0", "ORD-CSRF-0"), order("c1", "ORD-CSRF-1")]))
    assert sap.csrf_fetches == 1
    sim.expire_csrf_tokens()
    rejected = sim.request_counts["csrf_rejected"]
    results = await sap.write([order(f"c{n}", f"ORD-CSRF-{n}") for n in range(2, 6)])
    assert all(r.ok and r.created for r in results)
    assert sap.csrf_fetches == 2
    assert sim.request_counts["csrf_rejected"] == rejected + 1
    assert all(len(orders_with(sim, f"ORD-CSRF-{n}")) == 1 for n in range(6))


async def test_batch_update_with_a_stale_etag_is_redone_alone(clients: Clients, sim: SapSimulator) -> None:
    transport = clients.transport()
    sap = clients.client(transport=transport, batch_size=100)
    made = await sap.write([order("s0", "ORD-STALE-0"), order("s1", "ORD-STALE-1")])
    number = made[0].key
    assert number is not None
    edited: list[bool] = []

    def edit_before_the_batch(request: httpx.Request) -> None:
        if request.url.path.endswith("$batch") and b"PATCH" in request.content and not edited:
            edited.append(True)
            sim.apply_change("A_SalesOrder", (number,), {"DeliveryBlockReason": "01"})

    transport.before = edit_before_the_batch
    sim.requests.clear()
    updated = await sap.write([order("s2", "ORD-STALE-0", ShippingCondition="02"),
                               order("s3", "ORD-STALE-1", ShippingCondition="02")])
    assert [r.ok for r in updated] == [True, True]
    stored = sim.get("A_SalesOrder", number)
    assert stored is not None
    assert (stored["ShippingCondition"], stored["DeliveryBlockReason"]) == ("02", "01")
    assert orders_with(sim, "ORD-STALE-1")[0]["ShippingCondition"] == "02"
    # the stale changeset failed alone; its op was re-read and PATCHed on its own
    assert [c for c in calls(sim) if not c.startswith("GET")] == [
        f"POST {SO}$batch", f"PATCH {SO}A_SalesOrder('{number}')"]


async def test_lost_batch_answer_finds_the_created_orders(clients: Clients, sim: SapSimulator) -> None:
    transport = clients.transport()
    sap = clients.client(transport=transport, batch_size=100)

    def lose_answer(request: httpx.Request, response: httpx.Response) -> None:
        if request.url.path.endswith("$batch") and b"POST A_SalesOrder" in request.content:
            transport.after = None
            raise httpx.ReadTimeout("no answer", request=request)

    transport.after = lose_answer
    results = await sap.write([order(f"l{n}", f"ORD-LOST-{n}") for n in range(3)])
    assert [(r.ok, r.created) for r in results] == [(True, True)] * 3
    assert [len(orders_with(sim, f"ORD-LOST-{n}")) for n in range(3)] == [1, 1, 1]
    assert [r.key for r in results] == [orders_with(sim, f"ORD-LOST-{n}")[0]["SalesOrder"] for n in range(3)]


async def test_partners_in_a_batch_get_their_customer_role_then_sales_area(
        clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client(batch_size=100)
    bare = {"BusinessPartnerCategory": "2", "BusinessPartnerGrouping": "BP02", "OrganizationBPName1": "Plain Co",
            "to_BusinessPartnerAddress.Country": "US", "to_BusinessPartnerAddress.CityName": "Austin"}
    made = await sap.write([partner(f"r{n}", f"ACC-ROLE-{n}", bare) for n in range(2)])
    assert all(r.created for r in made)
    assert all(sim.get("A_Customer", r.key or "") is None for r in made)
    area = {f"to_Customer.to_CustomerSalesArea.{k}": v for k, v in
            {"SalesOrganization": "1710", "DistributionChannel": "10", "Division": "00", "Currency": "USD"}.items()}
    renamed = {**bare, "OrganizationBPName1": "Plain Co Renamed"}
    results = await sap.write([partner("r2", "ACC-ROLE-0", {**bare, **area}, key=made[0].key),
                               partner("r3", "ACC-ROLE-1", renamed, key=made[1].key)])
    assert [r.ok for r in results] == [True, True], [r.error for r in results]
    assert sim.get("A_CustomerSalesArea", made[0].key or "", "1710", "10", "00") is not None
    partner_1 = sim.get("A_BusinessPartner", made[1].key or "")
    assert partner_1 is not None
    assert partner_1["OrganizationBPName1"] == "Plain Co Renamed"


async def test_sim_batch_changesets_are_atomic_and_resolve_content_ids(clients: Clients, env: Env,
                                                                       sim: SapSimulator) -> None:
    def part(method: str, url: str, body: dict[str, Any] | None = None, content_id: str | None = None) -> str:
        mime = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n" + \
            (f"Content-ID: {content_id}\r\n" if content_id else "") + "\r\n"
        text = json.dumps(body) if body is not None else ""
        headers = "Accept: application/json\r\n" + (f"Content-Type: application/json\r\nContent-Length: {len(text)}\r\n"
                                                      if text else "")
        return f"{mime}{method} {url} HTTP/1.1\r\n{headers}\r\n{text}"

    header = {"SalesOrderType": "OR", "SalesOrganization": "1710", "DistributionChannel": "10",
              "OrganizationDivision": "00", "SoldToParty": "17100002", "PurchaseOrderByCustomer": "ORD-RAW-1",
              "to_Item": {"results": [{"Material": "PV-PUMP-100", "RequestedQuantity": "1"}]}}
    good = "--cs1\r\n" + part("POST", "A_SalesOrder", header, "1") + "\r\n--cs1\r\n" + \
        part("POST", "$1/to_Item", {"Material": "PV-SEALKIT", "RequestedQuantity": "2"}, "2") + "\r\n--cs1--"
    rolled_back = "--cs2\r\n" + part("POST", "A_SalesOrder", {**header, "PurchaseOrderByCustomer": "ORD-RAW-2"},
                                     "1") + "\r\n--cs2\r\n" + \
        part("POST", "$1/to_Item", {"Material": "NO-SUCH-PART", "RequestedQuantity": "2"}, "2") + "\r\n--cs2--"
    body = ("--b\r\nContent-Type: multipart/mixed; boundary=cs1\r\n\r\n" + good +
            "\r\n--b\r\nContent-Type: multipart/mixed; boundary=cs2\r\n\r\n" + rolled_back +
            "\r\n--b\r\n" + part("GET", "A_SalesOrder('4000001')") +
            "\r\n--b\r\n" + part("DELETE", "A_SalesOrder('4000001')") + "\r\n--b--\r\n")
    context = ssl.create_default_context(cafile=str(env.ca.ca_path))
    async with httpx.AsyncClient(verify=context, auth=(sim.user, sim.password),
                                 headers={"Accept": "application/json"}) as raw:
        url = f"{env.server.url}{SO}$batch"
        refused = await raw.post(url, content=body, headers={"Content-Type": "multipart/mixed; boundary=b"})
        assert (refused.status_code, refused.headers["x-csrf-token"]) == (403, "Required")
        token = (await raw.get(f"{env.server.url}{SO}", headers={"x-csrf-token": "Fetch"})).headers["x-csrf-token"]
        answer = await raw.post(url, content=body, headers={"Content-Type": "multipart/mixed; boundary=b",
                                                            "x-csrf-token": token})
    assert answer.status_code == 202
    text = answer.text
    assert text.count("HTTP/1.1 201 Created") == 2
    assert "M3/305" in text
    assert "HTTP/1.1 200 OK" in text
    assert "DELETE is only allowed inside a changeset" in text
    [kept] = orders_with(sim, "ORD-RAW-1")
    assert [i["Material"] for i in sim.items_of(kept["SalesOrder"])] == ["PV-PUMP-100", "PV-SEALKIT"]
    assert orders_with(sim, "ORD-RAW-2") == []  # its order was created, then rolled back with the failing item
    assert sim.get("A_SalesOrder", "4000001") is not None


async def test_ops_on_the_same_record_in_one_batched_write_run_in_order(clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client(batch_size=100)
    results = await sap.write([order("q1", "ORD-SEQ-1"), order("q2", "ORD-SEQ-2"),
                               order("q3", "ORD-SEQ-1", quantity=7.0, ShippingCondition="02")])
    assert [r.ok for r in results] == [True, True, True], [r.error for r in results]
    assert (results[0].created, results[2].created, results[2].key) == (True, False, results[0].key)
    [made] = orders_with(sim, "ORD-SEQ-1")  # the second op found the order the first one created
    assert made["ShippingCondition"] == "02"
    assert [i["RequestedQuantity"] for i in sim.items_of(made["SalesOrder"])] == ["7.000"]


async def test_a_failed_batched_look_up_fails_its_ops_not_the_call(clients: Clients, sim: SapSimulator) -> None:
    sap = clients.client(batch_size=100)
    await sap.write([order("f0", "ORD-LOOKUP-0"), order("f1", "ORD-LOOKUP-1")])  # session and token in place
    sim.faults.fail_next(3, 500, path_contains="$batch")
    results = await sap.write([order(f"f{n}", f"ORD-LOOKUP-{n}") for n in range(2, 45)])
    assert not any(r.ok for r in results)
    assert all(r.error is not None and r.error.retriable and "HTTP 500" in r.error.detail for r in results)
    assert all(orders_with(sim, f"ORD-LOOKUP-{n}") == [] for n in range(2, 45))
