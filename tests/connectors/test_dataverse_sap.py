"""Dynamics 365 Sales accounts, products, orders and order lines of flows/sap.yaml through DataverseClient."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from sandbox.dataverse import (
    SAP_UNMAPPED_OPTIONS,
    UNMAPPED_CURRENCY,
    UNMAPPED_PLANT,
    UNMAPPED_SALES_ORG,
    UNMAPPED_UNIT,
    ChoiceColumn,
    DataverseSimulator,
    TableSchema,
    bulk_sap_orders,
    crm_schema,
    default_schema,
    merge_schemas,
    sap_schema,
    seed_sap_accounts,
    seed_sap_orders,
)
from sandbox.server import TestCA as SandboxCA
from shared.connectors.dataverse import parse_remote_execution_context
from shared.core.errors import RejectedError
from shared.core.ports import Bind, WriteOp
from tests.connectors.test_dataverse import DataverseEnv, dataverse_with_hooks, raw_batch
from tests.connectors.test_dataverse_crm import Crm, batch_bodies, filters, open_crm
from tests.served import Receiver

SPEC_FILE = Path(__file__).resolve().parents[2] / "flows" / "sap.yaml"
SPEC = yaml.safe_load(SPEC_FILE.read_text())
ORDER_NUMBER = re.compile(r"^ORD-(\d{5})-[A-Z0-9]{4}$")
UNITS, PLANTS = (100000000, 100000001, 100000002), (100000000, 100000001)


@pytest.fixture(scope="module")
def sap_env(sandbox_ca: SandboxCA) -> Iterator[tuple[DataverseEnv, Receiver, str]]:
    with dataverse_with_hooks(sandbox_ca) as env:
        yield env


@pytest.fixture
async def crm(sap_env: tuple[DataverseEnv, Receiver, str]) -> AsyncIterator[Crm]:
    async with open_crm(sap_env) as session:
        yield session
        await session.sim.flush_webhooks()  # a late delivery must not land in the next test's receiver


def _value_map(name: str) -> dict[int, str]:
    return {int(e["dataverse"]): e["label"] for e in SPEC["value_maps"][name]}


def _account(sim: DataverseSimulator, **values: Any) -> str:
    return sim.apply_change("accounts", {"name": "Aspen Water District", "accountnumber": "ACC-01001",
                                         "syn_currencycode": "USD", **values})


def _product(sim: DataverseSimulator, number: str = "PUMP-100", price: float = 1250.0) -> str:
    return sim.apply_change("products", {"name": f"Centrifugal pump {number}", "productnumber": number,
                                         "price": price, "syn_sapmaterial": number},
                            key=str(uuid.uuid5(uuid.NAMESPACE_URL, f"product:{number}")))


def _order(sim: DataverseSimulator, customer: str, **values: Any) -> str:
    return sim.apply_change("salesorders", {"name": "Pumps for the reservoir", "customerid": customer,
                                            "syn_salesorg": 100000000, "syn_distributionchannel": 100000000,
                                            "syn_currencycode": "USD", **values})


def _line(sim: DataverseSimulator, order: str, product: str | None = None, **values: Any) -> str:
    return sim.apply_change("salesorderdetails", {"salesorderid": order, "productid": product, "quantity": 2.0,
                                                  "priceperunit": 100.0, "syn_unit": 100000000,
                                                  "syn_plant": 100000000, **values})


def _upsert(table: str, values: dict[str, Any], binds: dict[str, Bind] | None = None) -> WriteOp:
    """A create through the primary key (a new GUID), as the engine writes a record it has no key for yet."""
    return WriteOp(str(uuid.uuid4()), "upsert", table, key=str(uuid.uuid4()), values=values, binds=binds or {})


# ============================================================================================ schema


def test_sap_schema_covers_every_dataverse_column_of_the_sap_spec() -> None:
    schema = sap_schema()
    for flow in SPEC["flows"]:
        for side in ("source", "target"):
            if flow[side]["system"] != "dataverse":
                continue
            table = schema[flow[side]["table"]]
            assert flow[side]["key_field"] == table.primary_id
            assert table.change_tracking
            assert not table.system
            for fm in flow["fields"]:
                assert fm[side] in table.columns, (flow["name"], fm[side])
            for cond in flow.get("when", []):
                assert cond["field"] in table.columns, (flow["name"], cond["field"])
            link = flow["link"]
            for col in (link.get("write_back"), link.get("match_source")) if side == "source" else (
                    link["target_field"],):
                if col:
                    assert col in table.columns, (flow["name"], col)
            key_col = link.get("write_back") if side == "source" else link["target_field"]
            if key_col:
                assert (key_col,) in table.alternate_keys, (flow["name"], key_col)
            for lookup in flow.get("lookups", []):
                assert table.columns[lookup["source"]] == "lookup"
        lines = flow.get("lines")
        if lines:
            line_table = schema[lines["source_table"]]
            assert line_table.primary_id == lines["key_field"]
            assert line_table.lookups[lines["parent_field"]].navs == {"salesorderid": "salesorders"}
            assert lines["match_source"] in line_table.columns
            for fm in lines["fields"]:
                assert fm["source"] in line_table.columns
            for lookup in lines["lookups"]:
                assert line_table.lookups[lookup["source"]].navs == {"productid": "products"}
    for name in ("products", "salesorders", "salesorderdetails"):
        assert schema[name].change_tracking
        assert not schema[name].system
    orders, lines_ = schema["salesorders"], schema["salesorderdetails"]
    assert orders.nav_index()["customerid_account"] == ("customerid", "accounts")
    assert orders.nav_index()["customerid_contact"] == ("customerid", "contacts")
    assert orders.required == {"name", "customerid"}
    assert lines_.required == {"salesorderid", "quantity"}
    assert (orders.computed, lines_.computed) == ({"totalamount"}, {"extendedamount"})
    assert schema["products"].required == {"name", "productnumber"}
    # Currency codes cross by value (text), so the column is text, not a choice.
    for table in ("accounts", "salesorders"):
        assert schema[table].columns["syn_currencycode"] == "string"
        assert schema[table].max_length["syn_currencycode"] == 3
    assert (schema["accounts"].max_length["syn_sapbusinesspartner"], schema["accounts"].max_length["accountnumber"],
            orders.max_length["syn_sapsalesorder"], schema["products"].max_length["syn_sapmaterial"],
            schema["products"].max_length["productnumber"]) == (10, 20, 10, 40, 100)
    assert schema["accounts"].columns["creditonhold"] == "bool"
    assert (schema["products"].columns["price"], schema["products"].columns["quantityonhand"]) == (
        "money", "decimal")


def test_choices_are_the_value_maps_plus_the_orgs_unmapped_options() -> None:
    schema = sap_schema()
    expected = {
        ("accounts", "paymenttermscode"): "payment_terms_sap",
        ("salesorders", "syn_salesorg"): "sales_org",
        ("salesorders", "syn_distributionchannel"): "distribution_channel",
        ("salesorders", "syn_deliverystatus"): "delivery_status",
        ("salesorders", "syn_goodsissuestatus"): "goods_issue_status",
        ("salesorders", "syn_billingstatus"): "billing_status",
        ("salesorderdetails", "syn_unit"): "unit",
        ("salesorderdetails", "syn_plant"): "plant",
    }
    for (table, col), map_name in expected.items():
        options = schema[table].choices[col].options
        mapped = _value_map(map_name)
        assert mapped.items() <= options.items(), (table, col)  # exactly the spec's labels
        extra = {v: label for v, label in options.items() if v not in mapped}
        assert extra == SAP_UNMAPPED_OPTIONS.get((table, col), {}), (table, col)
    assert SAP_UNMAPPED_OPTIONS == {("salesorders", "syn_salesorg"): {100000001: "Pumps Canada (1810)"},
                                    ("salesorderdetails", "syn_plant"): {100000002: "Monterrey (1730)"},
                                    ("salesorderdetails", "syn_unit"): {100000003: "Box"}}
    assert schema["salesorders"].choices["statecode"].options == {
        0: "Active", 1: "Submitted", 2: "Canceled", 3: "Fulfilled", 4: "Invoiced"}
    assert schema["salesorders"].defaults == {"statecode": 0, "statuscode": 1}


def test_default_schema_merges_the_accounts_of_customer_360_and_sap() -> None:
    merged, crm, sap = default_schema()["accounts"], crm_schema()["accounts"], sap_schema()["accounts"]
    assert set(crm.columns) | set(sap.columns) == set(merged.columns)
    assert merged.alternate_keys == [("syn_salesforceid",), ("syn_sapbusinesspartner",)]
    assert merged.choices["customertypecode"] == crm.choices["customertypecode"]
    # Both specs map payment terms 1-4 with the same labels, so they agree on one option set.
    assert merged.choices["paymenttermscode"].options == _value_map("payment_terms_sap") == (
        crm.choices["paymenttermscode"].options)
    assert merged.max_length["syn_salesforceid"] == 18
    assert merged.max_length["syn_sapbusinesspartner"] == 10
    assert {"products", "salesorders", "salesorderdetails", "contacts", "dot_signassets"} <= set(default_schema())


def test_merging_refuses_specs_that_disagree_about_a_table() -> None:
    base = TableSchema("things", "thing", "thingid", "name", columns={"name": "string"},
                       choices={"kind": ChoiceColumn({1: "A"})}, max_length={"name": 100})
    relabelled = TableSchema("things", "thing", "thingid", "name", choices={"kind": ChoiceColumn({1: "B"})})
    with pytest.raises(ValueError, match="options of kind"):
        merge_schemas({"things": base}, {"things": relabelled})
    retyped = TableSchema("things", "thing", "thingid", "name", columns={"name": "memo"})
    with pytest.raises(ValueError, match="type of"):
        merge_schemas({"things": base}, {"things": retyped})
    longer = TableSchema("things", "thing", "thingid", "name", columns={"name": "string"}, max_length={"name": 200})
    with pytest.raises(ValueError, match="length of"):
        merge_schemas({"things": base}, {"things": longer})
    extended = TableSchema("things", "thing", "thingid", "name", columns={"code": "string"},
                           choices={"kind": ChoiceColumn({2: "B"})}, alternate_keys=[("code",)])
    merged = merge_schemas({"things": base}, {"things": extended})["things"]
    assert merged.choices["kind"].options == {1: "A", 2: "B"}
    assert (merged.columns["name"], merged.columns["code"], merged.alternate_keys) == ("string", "string", [("code",)])


async def test_the_sales_tables_are_served_with_their_metadata(crm: Crm) -> None:
    for entity_set, logical in (("products", "product"), ("salesorders", "salesorder"),
                                ("salesorderdetails", "salesorderdetail")):
        assert await crm.client.logical_name_for(entity_set) == logical
        meta = (await crm.raw_get(f"EntityDefinitions(LogicalName='{logical}')")).json()
        assert (meta["IsCustomEntity"], meta["ChangeTrackingEnabled"]) == (False, True)
    assert await crm.client.choice_options("salesorderdetail", "syn_plant") == {
        **_value_map("plant"), UNMAPPED_PLANT: "Monterrey (1730)"}
    assert await crm.client.choice_options("salesorder", "syn_salesorg") == {
        **_value_map("sales_org"), UNMAPPED_SALES_ORG: "Pumps Canada (1810)"}
    customer = (await crm.raw_get("EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='customerid')"
                                  )).json()
    assert (customer["AttributeType"], sorted(customer["Targets"])) == ("Customer", ["account", "contact"])
    number = (await crm.raw_get("EntityDefinitions(LogicalName='salesorder')/Attributes(LogicalName='ordernumber')"
                                )).json()
    assert number["AutoNumberFormat"] == "ORD-{SEQNUM:5}-{RANDSTRING:4}"
    assert await crm.client.lookup_columns("salesorderdetails") == {
        "salesorderid", "productid", "createdby", "modifiedby", "ownerid"}


# ============================================================================================ platform behaviour


async def test_the_platform_numbers_orders_and_their_lines(crm: Crm) -> None:
    account = _account(crm.sim)
    first, second = (_upsert("salesorders", {"name": name, "syn_salesorg": 100000000},
                             {"customerid_account": Bind("accounts", account)}) for name in ("First", "Second"))
    results = await crm.client.write([first, second])
    assert all(r.ok for r in results), results
    records = await crm.client.fetch("salesorders", [str(r.key) for r in results])
    numbers = [str(records[str(r.key)].values["ordernumber"]) for r in results]
    matches = [ORDER_NUMBER.match(n) for n in numbers]
    assert all(matches), numbers
    assert [int(m.group(1)) for m in matches if m] == [1001, 1002]
    assert len(set(numbers)) == 2
    assert records[str(results[0].key)].values["statecode"] == 0  # Active until submitted
    assert records[str(results[0].key)].values["totalamount"] == 0.0
    # An order number the caller gives is kept.
    [given] = await crm.client.write([_upsert("salesorders", {"name": "Given", "ordernumber": "WEB-77"},
                                              {"customerid_account": Bind("accounts", account)})])
    assert crm.sim.get("salesorders", str(given.key))["ordernumber"] == "WEB-77"

    order = str(results[0].key)
    lines = [_upsert("salesorderdetails", {"quantity": q, "priceperunit": p, "syn_unit": 100000000,
                                           "syn_plant": 100000001, "extendedamount": 1.0},
                     {"salesorderid": Bind("salesorders", order)}) for q, p in ((3, 19.99), (1.5, 10.005), (1, 5))]
    written = await crm.client.write(lines)
    assert all(r.ok for r in written), written
    stored = [crm.sim.get("salesorderdetails", str(r.key)) for r in written]
    assert [s["lineitemnumber"] for s in stored] == [1, 2, 3]
    # extendedamount is quantity x price, rounded half-up to cents (a written value is ignored).
    assert [s["extendedamount"] for s in stored] == [59.97, 15.01, 5.0]
    assert crm.sim.get("salesorders", order)["totalamount"] == 79.98
    [numbered] = await crm.client.write([_upsert("salesorderdetails", {"quantity": 1.0, "lineitemnumber": 10},
                                                 {"salesorderid": Bind("salesorders", order)})])
    nxt = _line(crm.sim, order)
    assert crm.sim.get("salesorderdetails", str(numbered.key))["lineitemnumber"] == 10
    assert crm.sim.get("salesorderdetails", nxt)["lineitemnumber"] == 11
    other = _line(crm.sim, str(results[1].key))
    assert crm.sim.get("salesorderdetails", other)["lineitemnumber"] == 1  # numbered per order
    [no_order] = await crm.client.write([_upsert("salesorderdetails", {"quantity": 1.0})])
    assert not no_order.ok
    assert "required attribute 'salesorderid'" in str(no_order.error)


async def test_line_changes_roll_up_into_the_order_total_with_an_update_webhook(crm: Crm) -> None:
    account = _account(crm.sim)
    order = _order(crm.sim, account)
    crm.sim.register_webhook(crm.hook_url, tables={"salesorders"})
    before = crm.sim.get("salesorders", order)
    checkpoints = [cp async for _, cp in crm.client.changes_since("salesorders", None)]
    checkpoint = checkpoints[-1]

    [line] = await crm.client.write([_upsert("salesorderdetails", {"quantity": 4.0, "priceperunit": 250.0},
                                             {"salesorderid": Bind("salesorders", order)})])
    assert line.ok, line.error
    after = crm.sim.get("salesorders", order)
    assert after["totalamount"] == 1000.0
    assert after["versionnumber"] > before["versionnumber"]
    assert after["modifiedby"] == crm.sim.app_user_id  # the rollup is part of the connector's write
    await crm.sim.flush_webhooks()
    [update] = crm.receiver.bodies()
    assert (update["MessageName"], update["PrimaryEntityName"], update["PrimaryEntityId"]) == (
        "Update", "salesorder", order)
    change = parse_remote_execution_context(update)
    assert change.record.values["totalamount"] == 1000.0
    target = {a["key"] for a in update["InputParameters"][0]["value"]["Attributes"]}
    assert {"totalamount", "modifiedon"} <= target
    assert "name" not in target  # only what changed, like the platform's own update

    # Change tracking sees the order again.
    changed = [r async for page, _ in crm.client.changes_since("salesorders", checkpoint) for r in page]
    assert [(r.key, r.values["totalamount"]) for r in changed] == [(order, 1000.0)]

    # Editing and deleting a line recompute the total too; a change that leaves it alone fires nothing.
    crm.receiver.posts.clear()
    crm.sim.apply_change("salesorderdetails", {"quantity": 2.0}, key=str(line.key))
    crm.sim.apply_change("salesorderdetails", {"syn_plant": 100000001}, key=str(line.key))
    second = _line(crm.sim, order, quantity=1.0, priceperunit=99.5)
    crm.sim.apply_change("salesorderdetails", key=str(line.key), delete=True)
    await crm.sim.flush_webhooks()
    totals = sorted(parse_remote_execution_context(b).record.values["totalamount"] for b in crm.receiver.bodies())
    assert totals == sorted([500.0, 599.5, 99.5])
    assert crm.sim.get("salesorders", order)["totalamount"] == 99.5

    # Deleting the order takes its lines with it.
    crm.sim.apply_change("salesorders", key=order, delete=True)
    assert crm.sim.get("salesorderdetails", second) is None


async def test_statecode_is_written_by_patch_and_brings_its_statuscode(crm: Crm) -> None:
    account = _account(crm.sim)
    order = _order(crm.sim, account)
    crm.sim.register_webhook(crm.hook_url, tables={"salesorders"})
    [submit] = await crm.client.write([WriteOp("s", "update", "salesorders", key=order, values={"statecode": 1})])
    assert submit.ok, submit.error
    stored = crm.sim.get("salesorders", order)
    assert (stored["statecode"], stored["statuscode"]) == (1, 3)  # Submitted / In Progress
    await crm.sim.flush_webhooks()
    [update] = crm.receiver.bodies()
    assert {"statecode": 1, "statuscode": 3}.items() <= parse_remote_execution_context(update).record.values.items()

    [mismatch] = await crm.client.write([WriteOp("m", "update", "salesorders", key=order,
                                                 values={"statecode": 0, "statuscode": 3})])
    assert not mismatch.ok
    assert "3 is not a valid status code for state code Active" in str(mismatch.error)
    [fulfilled] = await crm.client.write([WriteOp("f", "update", "salesorders", key=order,
                                                  values={"statecode": 3, "statuscode": 100002})])
    assert fulfilled.ok, fulfilled.error
    assert crm.sim.get("salesorders", order)["statuscode"] == 100002
    [bad_state] = await crm.client.write([WriteOp("b", "update", "salesorders", key=order, values={"statecode": 9})])
    assert not bad_state.ok
    assert "Accepted Values: 0,1,2,3,4" in str(bad_state.error)


# ============================================================================================ connector


async def test_select_lines_of_several_orders_by_the_order_lookup(crm: Crm) -> None:
    account = _account(crm.sim)
    orders = [_order(crm.sim, account, name=f"Order {i}") for i in range(3)]
    lines = {o: [_line(crm.sim, o) for _ in range(i + 1)] for i, o in enumerate(orders)}
    metadata = crm.sim.request_counts["metadata"]

    rows = await crm.client.select("salesorderdetails", equals={"salesorderid": [orders[0].upper(), orders[2]]})
    assert {r.key for r in rows} == set(lines[orders[0]] + lines[orders[2]])
    assert {r.values["salesorderid"] for r in rows} == {orders[0], orders[2]}  # what the engine groups by
    assert "_salesorderid_value" not in rows[0].values
    sent = filters(crm.wire, "/salesorderdetails?")[-1]
    assert sent.startswith("Microsoft.Dynamics.CRM.In(PropertyName='_salesorderid_value',PropertyValues=[")
    one = await crm.client.select("salesorderdetails", equals={"salesorderid": orders[1]})
    assert {r.key for r in one} == set(lines[orders[1]])
    same = await crm.client.select("salesorderdetails", equals={"_salesorderid_value": [orders[1]]})
    assert {r.key for r in same} == set(lines[orders[1]])
    # The table's attributes are read once (entity definition + attributes), then remembered.
    assert crm.sim.request_counts["metadata"] - metadata == 2
    assert await crm.client.select("salesorderdetails", equals={"salesorderid": [], "quantity": 2.0}) == []
    numbered = await crm.client.select("salesorderdetails", equals={"lineitemnumber": [2, 3]},
                                       not_in={"salesorderid": [orders[1]]})
    assert {r.key for r in numbered} == {lines[orders[2]][1], lines[orders[2]][2]}
    assert crm.sim.request_counts["metadata"] - metadata == 2
    with pytest.raises(RejectedError, match="must be a GUID"):
        await crm.client.select("salesorderdetails", equals={"_salesorderid_value": ["ORD-01001"]})


async def test_the_polymorphic_customer_reads_as_customerid(crm: Crm) -> None:
    account = _account(crm.sim)
    contact = crm.sim.apply_change("contacts", {"firstname": "Dana", "lastname": "Reyes"})
    by_account = _order(crm.sim, account)
    [by_contact] = await crm.client.write([_upsert("salesorders", {"name": "Walk-in"},
                                                   {"customerid_contact": Bind("contacts", contact)})])
    assert by_contact.ok, by_contact.error
    records = await crm.client.fetch("salesorders", [by_account, str(by_contact.key)])
    assert records[by_account].values["customerid"] == account
    assert records[str(by_contact.key)].values["customerid"] == contact
    assert "_customerid_value" not in records[by_account].values
    raw = (await crm.raw_get(f"salesorders({by_contact.key})", annotations=True)).json()
    assert raw["_customerid_value@Microsoft.Dynamics.CRM.lookuplogicalname"] == "contact"
    assert raw["_customerid_value@Microsoft.Dynamics.CRM.associatednavigationproperty"] == "customerid_contact"
    found = await crm.client.select("salesorders", equals={"customerid": account})
    assert [r.key for r in found] == [by_account]
    # A bind through the wrong typed navigation property is refused with Dataverse's message.
    [wrong] = await crm.client.write([_upsert("salesorders", {"name": "Wrong"},
                                              {"customerid_account": Bind("contacts", contact)})])
    assert not wrong.ok
    assert "customerid_account" in str(wrong.error)

    crm.sim.register_webhook(crm.hook_url, tables={"salesorders"})
    crm.sim.apply_change("salesorders", {"statecode": 1}, key=by_account)
    await crm.sim.flush_webhooks()
    [update] = crm.receiver.bodies()
    post = {a["key"]: a["value"] for a in update["PostEntityImages"][0]["value"]["Attributes"]}
    assert post["customerid"]["LogicalName"] == "account"
    assert parse_remote_execution_context(update).record.values["customerid"] == account


async def test_upserts_through_the_sap_alternate_keys(crm: Crm) -> None:
    existing = _account(crm.sim, syn_salesforceid="001Dn00000AbCdEIAZ", creditlimit=50_000.0)
    crm.sim.apply_change("accounts", {"syn_sapbusinesspartner": "17100001"}, key=existing)
    partner = WriteOp("p", "upsert", "accounts", match={"syn_sapbusinesspartner": "17100001"},
                      values={"name": "Aspen Water District", "creditonhold": True, "paymenttermscode": 2,
                              "syn_currencycode": "CAD", "accountnumber": "17100001"})
    [first] = await crm.client.write([partner])
    [again] = await crm.client.write([partner])
    assert (first.ok, again.ok, first.created, first.key, again.key) == (True, True, False, existing, existing)
    stored = crm.sim.get("accounts", existing)
    assert (stored["creditonhold"], stored["syn_currencycode"], stored["creditlimit"], stored["syn_salesforceid"]) == (
        True, "CAD", 50_000.0, "001Dn00000AbCdEIAZ")
    [new_partner] = await crm.client.write([WriteOp(
        "n", "upsert", "accounts", match={"syn_sapbusinesspartner": "17100002"}, values={"name": "Mesa Mining"})])
    assert (new_partner.ok, new_partner.created) == (True, True)
    assert crm.sim.get("accounts", str(new_partner.key))["syn_sapbusinesspartner"] == "17100002"
    assert "PATCH /api/data/v9.2/accounts(syn_sapbusinesspartner='17100002')" in batch_bodies(crm.wire)

    material = WriteOp("m", "upsert", "products", match={"syn_sapmaterial": "FG-PUMP-01"},
                       values={"name": "Pump 3 kW", "productnumber": "FG-PUMP-01", "price": 1299.0,
                               "quantityonhand": 42.0})
    [made] = await crm.client.write([material])
    [repriced] = await crm.client.write([WriteOp("r", "upsert", "products", match={"syn_sapmaterial": "FG-PUMP-01"},
                                                 values={"price": 1350.0})])
    assert (made.created, repriced.created, repriced.key) == (True, False, made.key)
    assert [p["price"] for p in crm.sim.all("products")] == [1350.0]

    order = _order(crm.sim, existing, syn_sapsalesorder="12")
    status = WriteOp("s", "upsert", "salesorders", match={"syn_sapsalesorder": "12"},
                     values={"syn_deliverystatus": 100000002, "syn_goodsissuestatus": 100000001,
                             "syn_billingstatus": 100000000})
    [updated] = await crm.client.write([status])
    assert (updated.ok, updated.created, updated.key) == (True, False, order)
    assert crm.sim.get("salesorders", order)["syn_deliverystatus"] == 100000002
    [too_long] = await crm.client.write([WriteOp("l", "upsert", "accounts", match={"syn_sapbusinesspartner": "1" * 11},
                                                 values={"name": "Too long"})])
    assert not too_long.ok
    assert "maximum allowed length of '10'" in str(too_long.error)


# ============================================================================================ seeds


def _stable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    skip = {"createdon", "modifiedon", "versionnumber"}
    return sorted(({k: v for k, v in r.items() if k not in skip} for r in rows), key=lambda r: sorted(r.items()))


def _catalogue(sim: DataverseSimulator) -> dict[str, tuple[list[int], list[int]]]:
    """Three products: one any unit/plant, one pieces in Palo Alto only, one kilograms in Denver only."""
    return {_product(sim, "PUMP-100"): (list(UNITS), list(PLANTS)),
            _product(sim, "VALVE-20", 310.5): ([100000000], [100000000]),
            _product(sim, "SEAL-KIT", 42.0): ([100000002], [100000001])}


def test_seed_sap_accounts_is_deterministic_with_one_bad_currency() -> None:
    first, second, other = DataverseSimulator(), DataverseSimulator(), DataverseSimulator()
    try:
        ids = seed_sap_accounts(first, accounts=12, seed=21)
        assert seed_sap_accounts(second, accounts=12, seed=21) == ids
        assert _stable(first.all("accounts")) == _stable(second.all("accounts"))
        assert seed_sap_accounts(other, accounts=12, seed=22)["accounts"] != ids["accounts"]
        assert (len(ids["accounts"]), len(ids["bad_currency"])) == (12, 1)
        accounts = {a["accountid"]: a for a in first.all("accounts")}
        assert set(accounts) == set(ids["accounts"] + ids["bad_currency"])
        currencies = Counter(accounts[k]["syn_currencycode"] for k in ids["accounts"])
        assert currencies == {"USD": 10, "CAD": 2}
        assert accounts[ids["bad_currency"][0]]["syn_currencycode"] == UNMAPPED_CURRENCY
        assert UNMAPPED_CURRENCY not in {e["dataverse"] for e in SPEC["value_maps"]["currency_sap"]}
        assert len({a["accountnumber"] for a in accounts.values()}) == 13
        assert len({a["name"] for a in accounts.values()}) == 13
        for a in accounts.values():
            assert re.fullmatch(r"ACC-0\d{4}", a["accountnumber"])
            assert a["paymenttermscode"] in (1, 2, 3, 4)
            assert a["address1_country"] == "US"
            assert all(a[c] for c in ("name", "address1_line1", "address1_city", "address1_postalcode",
                                      "telephone1"))
            assert a.get("syn_sapbusinesspartner") is None  # not an SAP partner yet
            assert a["createdby"] == first.office_user_id
    finally:
        for sim in (first, second, other):
            sim.close()


def test_seed_sap_orders_is_deterministic_with_its_bad_records() -> None:
    first, second = DataverseSimulator(), DataverseSimulator()
    try:
        runs = []
        for sim in (first, second):
            accounts = seed_sap_accounts(sim, accounts=6, seed=21)["accounts"]
            runs.append(seed_sap_orders(sim, accounts=accounts, products=_catalogue(sim), orders=40, seed=22))
        ids = runs[0]
        assert runs[1] == ids
        for table in ("salesorders", "salesorderdetails"):
            assert _stable(first.all(table)) == _stable(second.all(table))  # order numbers included

        assert (len(ids["submitted"]), len(ids["draft"])) == (32, 8)
        assert [len(ids[k]) for k in ("bad_sales_org", "bad_plant", "bad_unit")] == [1, 1, 1]
        orders = {o["salesorderid"]: o for o in first.all("salesorders")}
        everything = ids["submitted"] + ids["draft"] + ids["bad_sales_org"] + ids["bad_plant"] + ids["bad_unit"]
        assert sorted(everything) == sorted(orders)
        catalogue = {p["productid"]: p for p in first.all("products")}
        lines = first.all("salesorderdetails")
        assert sorted(ids["lines"]) == sorted(ln["salesorderdetailid"] for ln in lines)
        per_order = Counter(ln["salesorderid"] for ln in lines)
        assert set(per_order) == set(orders)
        assert set(per_order.values()) <= {1, 2, 3, 4}
        assert len({o["ordernumber"] for o in orders.values()}) == len(orders)
        accounts = {a["accountid"]: a for a in first.all("accounts")}
        for key, order in orders.items():
            bad = key in ids["bad_sales_org"] + ids["bad_plant"] + ids["bad_unit"]
            assert (order["statecode"], order["statuscode"]) == ((0, 1) if key in ids["draft"] else (1, 3))
            assert order["syn_salesorg"] == (UNMAPPED_SALES_ORG if key in ids["bad_sales_org"] else 100000000)
            assert order["syn_distributionchannel"] in (100000000, 100000001)
            assert order["syn_currencycode"] == accounts[order["customerid"]]["syn_currencycode"]
            assert order["requestdeliveryby"] > "2026-04-01"
            own = sorted((ln for ln in lines if ln["salesorderid"] == key), key=lambda ln: ln["lineitemnumber"])
            assert [ln["lineitemnumber"] for ln in own] == list(range(1, len(own) + 1))
            assert order["totalamount"] == round(sum(ln["extendedamount"] for ln in own), 2)
            for ln in own:
                assert ln["priceperunit"] == catalogue[ln["productid"]]["price"]
                if not bad:
                    units, plants = _catalogue_rules()[catalogue[ln["productid"]]["productnumber"]]
                    assert ln["syn_unit"] in units
                    assert ln["syn_plant"] in plants
        assert sum(ln["syn_plant"] == UNMAPPED_PLANT for ln in lines) == 1
        assert sum(ln["syn_unit"] == UNMAPPED_UNIT for ln in lines) == 1
        assert [ln["salesorderid"] for ln in lines if ln["syn_plant"] == UNMAPPED_PLANT] == ids["bad_plant"]
        assert [ln["salesorderid"] for ln in lines if ln["syn_unit"] == UNMAPPED_UNIT] == ids["bad_unit"]
        for option, map_name in ((UNMAPPED_SALES_ORG, "sales_org"), (UNMAPPED_PLANT, "plant"), (UNMAPPED_UNIT, "unit")):
            assert option not in _value_map(map_name)
    finally:
        first.close()
        second.close()


def _catalogue_rules() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {"PUMP-100": (UNITS, PLANTS), "VALVE-20": ((100000000,), (100000000,)),
            "SEAL-KIT": ((100000002,), (100000001,))}


async def test_seeded_orders_fire_like_ui_edits(crm: Crm) -> None:
    accounts = seed_sap_accounts(crm.sim, accounts=2, seed=3)["accounts"]
    catalogue = _catalogue(crm.sim)
    crm.sim.register_webhook(crm.hook_url, tables={"salesorders", "salesorderdetails"})
    ids = seed_sap_orders(crm.sim, accounts=accounts, products=catalogue, orders=5, seed=4)
    await crm.sim.flush_webhooks()
    assert not crm.sim.webhook_failures
    bodies = crm.receiver.bodies()
    assert {b["InitiatingUserId"] for b in bodies} == {crm.sim.office_user_id}
    creates = Counter(b["PrimaryEntityName"] for b in bodies if b["MessageName"] == "Create")
    assert creates == {"salesorder": 8, "salesorderdetail": len(ids["lines"])}
    submitted = {b["PrimaryEntityId"] for b in bodies if b["MessageName"] == "Update"
                 and parse_remote_execution_context(b).record.values.get("statecode") == 1}
    assert submitted == set(ids["submitted"] + ids["bad_sales_org"] + ids["bad_plant"] + ids["bad_unit"])


def test_bulk_sap_orders_inserts_submitted_orders_without_webhooks() -> None:
    sim = DataverseSimulator()
    try:
        accounts = seed_sap_accounts(sim, accounts=4, seed=21)["accounts"]
        catalogue = _catalogue(sim)
        sim.register_webhook("https://127.0.0.1:9/never")
        ids = bulk_sap_orders(sim, accounts=accounts, products=catalogue, orders=3000, seed=23)
        assert len(ids) == len(set(ids)) == 3000
        orders = {o["salesorderid"]: o for o in sim.all("salesorders")}
        assert set(orders) == set(ids)
        lines = sim.all("salesorderdetails")
        per_order = Counter(ln["salesorderid"] for ln in lines)
        assert set(per_order) == set(ids)
        assert set(per_order.values()) == {1, 2, 3}
        totals: Counter[str] = Counter()
        for ln in lines:
            totals[ln["salesorderid"]] += ln["extendedamount"]
        for key, order in orders.items():
            assert (order["statecode"], order["statuscode"], order["syn_salesorg"]) == (1, 3, 100000000)
            assert order["totalamount"] == round(totals[key], 2)
            assert order["customerid"] in accounts
        assert len({o["ordernumber"] for o in orders.values()}) == 3000
        assert sim.webhooks_delivered == 0
        assert not sim.webhook_failures
        twin = DataverseSimulator()
        try:
            twin_accounts = seed_sap_accounts(twin, accounts=4, seed=21)["accounts"]
            assert bulk_sap_orders(twin, accounts=twin_accounts, products=_catalogue(twin), orders=3000,
                                   seed=23) == ids
            assert _stable(twin.all("salesorders")) == _stable(sim.all("salesorders"))
        finally:
            twin.close()
    finally:
        sim.close()


# ============================================================================================ $filter indexes


async def _fast_and_scan(crm: Crm, monkeypatch: pytest.MonkeyPatch, table: str, text: str,
                         extra: str = "") -> tuple[Any, Any, bool]:
    """The simulator's answer to `$filter=text` with its column indexes, the same without them (every row
    evaluated), and whether the first one was answered from an index."""
    seeks: list[bool] = []
    seek = crm.sim._filter_candidates

    def spy(*args: Any) -> set[str] | None:
        found = seek(*args)
        seeks.append(found is not None)
        return found

    path = f"{table}?$filter={quote(text, safe='')}{extra}"
    with monkeypatch.context() as patched:
        patched.setattr(crm.sim, "_filter_candidates", spy)
        fast = await crm.raw_get(path)
    with monkeypatch.context() as patched:
        patched.setattr(crm.sim, "_filter_candidates", lambda *args: None)
        scan = await crm.raw_get(path)
    assert fast.status_code == scan.status_code == 200, (text, fast.text)
    return fast.json(), scan.json(), bool(seeks) and seeks[-1]


async def test_lookup_and_alternate_key_filters_answer_from_indexes_exactly_as_a_scan(
        crm: Crm, monkeypatch: pytest.MonkeyPatch) -> None:
    account = _account(crm.sim)
    products = [_product(crm.sim, f"PUMP-{n}") for n in (100, 200)]
    orders = [_order(crm.sim, account, name=f"Order {i}", syn_sapsalesorder=f"40001{i:02d}" if i < 4 else None)
              for i in range(5)]
    lines = {o: [_line(crm.sim, o, products[j % 2], quantity=float(j + 1)) for j in range(i % 4)]
             for i, o in enumerate(orders)}
    loose = _line(crm.sim, orders[0], None)  # no product: a null lookup

    def in_filter(prop: str, values: list[str]) -> str:
        listed = ",".join(f"'{v}'" for v in values)
        return f"Microsoft.Dynamics.CRM.In(PropertyName='{prop}',PropertyValues=[{listed}])"

    missing = str(uuid.uuid4())

    async def check() -> None:
        seeking = [
            ("salesorderdetails", f"_salesorderid_value eq {orders[1]}", ""),
            ("salesorderdetails", f"_salesorderid_value eq {orders[2].upper()}", "&$orderby=quantity desc"),
            ("salesorderdetails", in_filter("_salesorderid_value", [orders[1], orders[3].upper(), missing]), ""),
            ("salesorderdetails", f"(_salesorderid_value eq {orders[1]} or _salesorderid_value eq {orders[3]})",
             "&$top=2"),
            ("salesorderdetails", f"_salesorderid_value eq {orders[1]} or _productid_value eq {products[1]}", ""),
            ("salesorderdetails", f"_salesorderid_value eq {orders[3]} and quantity gt 1", ""),
            ("salesorderdetails", "_productid_value eq null", ""),
            ("salesorderdetails", f"salesorderdetailid eq {loose}", ""),
            ("salesorders", "syn_sapsalesorder eq '4000101' or syn_sapsalesorder eq '4000103'", ""),
            ("salesorders", in_filter("syn_sapsalesorder", ["4000102", "4000199"]), ""),
            ("salesorders", "syn_sapsalesorder eq null", ""),
            ("salesorders", f"_customerid_value eq {account} and syn_sapsalesorder eq '4000100'", ""),
        ]
        scanning = [
            ("salesorderdetails", f"_salesorderid_value ne {orders[1]}", ""),
            ("salesorderdetails", f"_salesorderid_value eq {orders[1]} or quantity ge 2", ""),
            ("salesorderdetails", f"not (_salesorderid_value eq {orders[1]})", ""),
            ("salesorderdetails", in_filter("_salesorderid_value", [orders[1]]).replace(".In(", ".NotIn("), ""),
        ]
        for expect_seek, cases in ((True, seeking), (False, scanning)):
            for table, text, extra in cases:
                fast, scan, seeked = await _fast_and_scan(crm, monkeypatch, table, text, extra)
                assert fast == scan, text
                assert seeked is expect_seek, text

    await check()
    found, _, _ = await _fast_and_scan(crm, monkeypatch, "salesorderdetails",
                                       f"_salesorderid_value eq {orders[3]}")
    assert [r["salesorderdetailid"] for r in found["value"]] == sorted(lines[orders[3]])

    # Updates that move the indexed values: a line to another order, a product cleared, an SAP number changed
    # and one cleared; then deletes (an order takes its lines with it) and a bulk insert.
    moved = lines[orders[3]][0]
    crm.sim.apply_change("salesorderdetails", {"salesorderid": orders[1].upper()}, key=moved)
    crm.sim.apply_change("salesorderdetails", {"productid": None}, key=lines[orders[2]][1])
    crm.sim.apply_change("salesorders", {"syn_sapsalesorder": "4000199"}, key=orders[2])
    crm.sim.apply_change("salesorders", {"syn_sapsalesorder": None}, key=orders[1])
    await check()
    found, _, _ = await _fast_and_scan(crm, monkeypatch, "salesorderdetails",
                                       in_filter("_salesorderid_value", [orders[1]]))
    assert moved in [r["salesorderdetailid"] for r in found["value"]]

    crm.sim.apply_change("salesorderdetails", key=lines[orders[1]][0], delete=True)
    crm.sim.apply_change("salesorders", key=orders[3], delete=True)
    crm.sim.insert_many("salesorderdetails", [
        {"salesorderid": orders[3 if i == 0 else 1], "productid": products[0], "quantity": 5.0, "priceperunit": 1.0}
        for i in range(3)])  # one points at the deleted order
    await check()
    found, _, _ = await _fast_and_scan(crm, monkeypatch, "salesorderdetails",
                                       f"_salesorderid_value eq {orders[3]}")
    assert len(found["value"]) == 1  # only the bulk-inserted orphan: the order's own lines went with it

    # A change set rolled back by its failing request leaves the indexes as they were.
    token = await crm.factory.provider().get_token()
    target = lines[orders[2]][0]
    move = (f"PATCH /api/data/v9.2/salesorderdetails({target}) HTTP/1.1\r\nContent-Type: application/json; "
            f"type=entry\r\n\r\n" + json.dumps({"salesorderid@odata.bind": f"/salesorders({orders[4]})"}))
    refused = ("POST /api/data/v9.2/salesorderdetails HTTP/1.1\r\nContent-Type: application/json; type=entry"
               "\r\n\r\n" + json.dumps({"quantity": 1.0}))
    resp = await crm.http.post(f"{crm.factory.env.url}/api/data/v9.2/$batch",
                               content=raw_batch([move, refused], changeset=True),
                               headers={"Authorization": f"Bearer {token}",
                                        "Content-Type": "multipart/mixed; boundary=b"})
    assert resp.status_code == 400
    assert "required attribute 'salesorderid'" in resp.text
    assert crm.sim.get("salesorderdetails", target)["salesorderid"] == orders[2]  # type: ignore[index]
    await check()
    found, _, _ = await _fast_and_scan(crm, monkeypatch, "salesorderdetails", f"_salesorderid_value eq {orders[4]}")
    assert found["value"] == []

    # And a reset forgets them with the records.
    crm.sim.reset()
    found, scan, seeked = await _fast_and_scan(crm, monkeypatch, "salesorderdetails",
                                               f"_salesorderid_value eq {orders[1]}")
    assert found == scan
    assert found["value"] == []
    assert seeked
