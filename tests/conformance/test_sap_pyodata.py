"""The SAP simulator driven by SAP's own OData v2 client, pyodata, which reads $metadata and builds every request."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from pyodata.exceptions import HttpError, PyODataException

from sandbox.sap.schema import ENTITIES, SERVICE_SETS, SERVICES
from tests.conformance import _sap_fixtures
from tests.conformance._sap_fixtures import BP_ROOT, SO_ROOT, SapGateway

sap_gateway = _sap_fixtures.sap_gateway
pyodata_client = _sap_fixtures.pyodata_client

Client = Callable[[str], Any]


@pytest.mark.parametrize("service", SERVICES)
def test_client_starts_from_the_served_metadata(pyodata_client: Client, service: str) -> None:
    # pyodata.Client GETs <root>$metadata and refuses anything but an XML EDMX it can build a model from.
    client = pyodata_client(service)
    assert sorted(s.name for s in client.schema.entity_sets) == SERVICE_SETS[service]
    for name in SERVICE_SETS[service]:
        entity_type = client.schema.entity_set(name).entity_type
        assert [p.name for p in entity_type.key_proprties] == list(ENTITIES[name].keys)
        assert {p.name for p in entity_type.proprties()} == set(ENTITIES[name].fields)
        assert {n.name for n in entity_type.nav_proprties} == set(ENTITIES[name].navs)


def test_read_by_key_with_expand_and_etag(pyodata_client: Client, sap_gateway: SapGateway) -> None:
    client = pyodata_client(BP_ROOT)
    partner = client.entity_sets.A_BusinessPartner.get_entity("17100001") \
        .expand("to_BusinessPartnerAddress").execute()
    stored = sap_gateway.sim.get("A_BusinessPartner", "17100001")
    assert partner.OrganizationBPName1 == stored["OrganizationBPName1"]
    assert partner.CreationDate == stored["CreationDate"]  # Edm.DateTime decoded from /Date(ms)/ by the client
    assert partner.etag == f"W/\"'{stored['ETag']}'\""
    assert [a.CityName for a in partner.to_BusinessPartnerAddress] == ["Detroit"]
    addresses = partner.nav("to_BusinessPartnerAddress").get_entities().execute()
    assert [a.AddressID for a in addresses] == [a.AddressID for a in partner.to_BusinessPartnerAddress]


def test_filter_top_and_counts(pyodata_client: Client, sap_gateway: SapGateway) -> None:
    client = pyodata_client(SO_ROOT)
    orders = client.entity_sets.A_SalesOrder
    wanted = sorted(o["SalesOrder"] for o in sap_gateway.sim.all("A_SalesOrder") if o["SoldToParty"] == "17100001")
    found = orders.get_entities().filter("SoldToParty eq '17100001'").execute()
    assert sorted(o.SalesOrder for o in found) == wanted
    assert orders.get_entities().count().execute() == len(sap_gateway.sim.all("A_SalesOrder"))  # GET .../$count
    inline = orders.get_entities().filter("SoldToParty eq '17100001'").top(1).count(inline=True).execute()
    assert len(inline) == 1
    assert inline.total_count == len(wanted)
    items = orders.get_entity("4000001").nav("to_Item").get_entities().execute()
    assert sorted(i.SalesOrderItem for i in items) == sorted(r["SalesOrderItem"]
                                                            for r in sap_gateway.sim.items_of("4000001"))


def test_deep_create_then_update_with_if_match(pyodata_client: Client, sap_gateway: SapGateway) -> None:
    client = pyodata_client(BP_ROOT)
    request = client.entity_sets.A_BusinessPartner.create_entity()
    request.set(BusinessPartnerCategory="2", OrganizationBPName1="Conformance Pumps Inc",
                BusinessPartnerGrouping="BP02",
                to_BusinessPartnerAddress=[{"Country": "US", "CityName": "Tulsa", "PostalCode": "74103"}])
    created = request.execute()
    stored = sap_gateway.sim.get("A_BusinessPartner", created.BusinessPartner)
    assert stored is not None
    assert stored["BusinessPartnerFullName"] == "Conformance Pumps Inc"
    assert [a["CityName"] for a in sap_gateway.sim.all("A_BusinessPartnerAddress")
            if a["BusinessPartner"] == created.BusinessPartner] == ["Tulsa"]
    update = client.entity_sets.A_BusinessPartner.update_entity(BusinessPartner=created.BusinessPartner)
    update.set(SearchTerm1="CONFPUMPS")
    update.add_headers({"If-Match": created.etag})
    update.execute()
    assert sap_gateway.sim.get("A_BusinessPartner", created.BusinessPartner)["SearchTerm1"] == "CONFPUMPS"
    stale = client.entity_sets.A_BusinessPartner.update_entity(BusinessPartner=created.BusinessPartner)
    stale.set(SearchTerm1="LOST")
    stale.add_headers({"If-Match": created.etag})
    with pytest.raises(HttpError) as refused:
        stale.execute()
    assert refused.value.response.status_code == 412
    assert sap_gateway.sim.get("A_BusinessPartner", created.BusinessPartner)["SearchTerm1"] == "CONFPUMPS"


def test_client_refuses_a_property_the_metadata_does_not_declare(pyodata_client: Client) -> None:
    # The model built from $metadata is what a metadata-driven client checks writes against.
    client = pyodata_client(BP_ROOT)
    with pytest.raises(PyODataException, match="NoSuchField"):
        client.entity_sets.A_BusinessPartner.create_entity().set(OrganizationBPName1="x", NoSuchField="y")


def test_batch_with_encoded_paths_reads_and_changes(pyodata_client: Client, sap_gateway: SapGateway) -> None:
    # pyodata writes batch request lines percent-encoded (A_SalesOrder%28%274000002%27%29): the regression of
    # issue 16, seen through an independent client.
    client = pyodata_client(SO_ROOT)
    orders = client.entity_sets.A_SalesOrder
    current = orders.get_entity("4000002").execute()
    batch = client.create_batch()
    batch.add_request(orders.get_entity("4000001"))
    changeset = client.create_changeset()
    update = orders.update_entity(SalesOrder="4000002")
    update.set(PurchaseOrderByCustomer="PO-PYODATA-BATCH")
    update.add_headers({"If-Match": current.etag})
    changeset.add_request(update)
    batch.add_request(changeset)
    read, changed = batch.execute()
    assert read.SalesOrder == "4000001"
    assert changed == [None]  # one 204 in the changeset
    assert sap_gateway.sim.get("A_SalesOrder", "4000002")["PurchaseOrderByCustomer"] == "PO-PYODATA-BATCH"


def test_function_import_from_metadata(pyodata_client: Client, sap_gateway: SapGateway) -> None:
    client = pyodata_client("API_PRODUCT_AVAILY_INFO_BASIC")
    sap_gateway.sim.set_stock("PV-PUMP-100", "1710", 37)
    answer = client.functions.DetermineAvailabilityAt \
        .parameter("SupplyingPlant", "1710").parameter("Material", "PV-PUMP-100") \
        .parameter("RequestedUTCDateTime", datetime(2026, 1, 1, tzinfo=UTC)).execute()
    record = answer["DetermineAvailabilityAt"]
    assert record["AvailableQuantityInBaseUnit"] == "37.000"
    assert record["BaseUnit"] == "PC"


def test_read_only_services_read_through_the_client(pyodata_client: Client) -> None:
    products = pyodata_client("API_PRODUCT_SRV").entity_sets.A_Product
    pump = products.get_entities().filter("Product eq 'PV-PUMP-100'").expand("to_Description").execute()
    assert [p.BaseUnit for p in pump] == ["PC"]
    assert {d.Language for d in pump[0].to_Description} == {"EN", "DE"}
    prices = pyodata_client("API_SLSPRICINGCONDITIONRECORD_SRV").entity_sets.A_SlsPrcgCndnRecdValidity
    valid = prices.get_entities().filter("Material eq 'PV-PUMP-100' and DistributionChannel eq '10'").execute()
    assert len(valid) == 1
    assert valid[0].ConditionType == "PR00"
