"""Salesforce simulator behaviour Syncline relies on, through the real connector over TLS: line roll-ups, the
External ID index, order activation, the new objects in SOQL polls, and the deterministic seeds."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.salesforce import (
    LEGAL_ENTITY_COMPANY,
    PAYMENT_TERMS,
    UNMAPPED_CURRENCY,
    UNMAPPED_LEGAL_ENTITY,
    UNMAPPED_PAYMENT_TERMS,
    SalesforceSimulator,
    parse_soql,
    seed_customer360,
    seed_new_accounts,
    seed_sales_pipeline,
)
from shared.connectors.salesforce import SalesforceClient, parse_cdc_event
from shared.core.errors import RejectedError
from shared.core.ports import WriteOp
from tests.connectors import test_salesforce as base

pytestmark = pytest.mark.integration

# the TLS simulator, its reset per test and the connector, shared with test_salesforce.py
sf_env, sim, client = base.sf_env, base.sim, base.client


async def create(client: SalesforceClient, table: str, **values: Any) -> str:
    [result] = await client.write([WriteOp(op_id=f"new-{table}", action="create", table=table, values=values)])
    assert result.ok, result.error
    assert result.key
    return result.key


async def update(client: SalesforceClient, table: str, key: str, **values: Any) -> None:
    [result] = await client.write([WriteOp(op_id=f"upd-{key}", action="update", table=table, key=key, values=values)])
    assert result.ok, result.error


async def header_with_product(client: SalesforceClient) -> tuple[str, str, str]:
    account = await create(client, "Account", Name="Allegheny Tooling Inc.", Legal_Entity__c="US01",
                           CurrencyIsoCode="USD")
    product = await create(client, "Product2", Name="Hydraulic press HP-200", Dynamics_Item__c="usmf|P-1001")
    opportunity = await create(client, "Opportunity", Name="Press line", StageName="Prospecting",
                               CloseDate="2026-03-31", AccountId=account, Legal_Entity__c="US01",
                               CurrencyIsoCode="USD")
    return account, product, opportunity


def changes(sim: SalesforceSimulator, entity: str) -> list[Any]:
    return [c for c in map(parse_cdc_event, sim.events()) if c.entity == entity]


# ----------------------------------------------------------------------------------------- roll-ups


async def test_line_items_roll_up_into_opportunity_amount_with_change_event(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    _, product, opportunity = await header_with_product(client)
    lines = await client.write([
        WriteOp(op_id=f"l{i}", action="create", table="OpportunityLineItem",
                values={"OpportunityId": opportunity, "Product2Id": product, "Quantity": q, "UnitPrice": p})
        for i, (q, p) in enumerate([(2, 1250.5), (3, 99.99)])])
    assert all(r.ok for r in lines)
    fetched = await client.fetch("Opportunity", [opportunity])
    assert fetched[opportunity].values["Amount"] == 2800.97
    items = await client.fetch("OpportunityLineItem", [r.key or "" for r in lines])
    assert sorted(r.values["TotalPrice"] for r in items.values()) == [299.97, 2501.0]

    opp_events = changes(sim, "Opportunity")
    line_events = changes(sim, "OpportunityLineItem")
    assert [e.change_type for e in opp_events] == ["CREATE", "UPDATE", "UPDATE"]
    rollup = opp_events[-1]
    assert rollup.record_ids == [opportunity]
    assert "Amount" in rollup.changed_fields
    assert rollup.values["Amount"] == 2800.97
    # attributed to the line's writer, in the line's transaction: Syncline recognises it as its own write
    assert rollup.is_own_write("syncline")
    assert rollup.transaction_key == line_events[-1].transaction_key
    before = fetched[opportunity].values["SystemModstamp"]

    # a sales rep edits a line in the UI: the header changes again, attributed to the rep
    sim.ui_change("OpportunityLineItem", lines[1].key or "", {"Quantity": 1})
    last = changes(sim, "Opportunity")[-1]
    assert last.values["Amount"] == 2600.99
    assert not last.is_own_write("syncline")
    assert last.commit_user == changes(sim, "OpportunityLineItem")[-1].commit_user
    after = (await client.fetch("Opportunity", [opportunity]))[opportunity]
    assert after.values["SystemModstamp"] > before

    [deleted] = await client.write([WriteOp(op_id="d", action="delete", table="OpportunityLineItem",
                                            key=lines[0].key)])
    assert deleted.ok
    assert (sim.get("Opportunity", opportunity) or {})["Amount"] == 99.99
    assert changes(sim, "Opportunity")[-1].is_own_write("syncline")


async def test_line_change_that_keeps_the_total_does_not_touch_the_header(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    _, product, opportunity = await header_with_product(client)
    line = await create(client, "OpportunityLineItem", OpportunityId=opportunity, Product2Id=product, Quantity=1,
                        UnitPrice=10)
    count = len(changes(sim, "Opportunity"))
    await update(client, "OpportunityLineItem", line, Dynamics_Line__c="usmf|SO-1|1")
    assert len(changes(sim, "Opportunity")) == count


async def test_computed_and_lookup_fields_are_enforced(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    _, product, opportunity = await header_with_product(client)
    results = await client.write([
        WriteOp(op_id="total", action="create", table="OpportunityLineItem",
                values={"OpportunityId": opportunity, "Quantity": 1, "UnitPrice": 5, "TotalPrice": 5}),
        WriteOp(op_id="orphan", action="create", table="OpportunityLineItem",
                values={"OpportunityId": "0065g00000ZZZZZAAA", "Quantity": 1, "UnitPrice": 5}),
        WriteOp(op_id="wrong-type", action="create", table="OpportunityLineItem",
                values={"OpportunityId": product, "Quantity": 1, "UnitPrice": 5}),
        WriteOp(op_id="no-qty", action="create", table="OpportunityLineItem",
                values={"OpportunityId": opportunity, "UnitPrice": 5}),
        WriteOp(op_id="ok", action="create", table="OpportunityLineItem",
                values={"OpportunityId": opportunity[:15], "Product2Id": product, "Quantity": 1, "UnitPrice": 5}),
    ])
    errors = {r.op_id: str(r.error) for r in results if not r.ok}
    assert set(errors) == {"total", "orphan", "wrong-type", "no-qty"}
    assert "INVALID_FIELD_FOR_INSERT_UPDATE" in errors["total"]
    assert "INVALID_CROSS_REFERENCE_KEY" in errors["orphan"]
    assert "MALFORMED_ID" in errors["wrong-type"]
    assert "REQUIRED_FIELD_MISSING" in errors["no-qty"]
    # a 15-character id is accepted and stored as the 18-character one
    assert (sim.get("OpportunityLineItem", results[-1].key or "") or {})["OpportunityId"] == opportunity
    other = await create(client, "Opportunity", Name="Other", StageName="Prospecting", CloseDate="2026-05-01")
    [moved, same] = await client.write([
        WriteOp(op_id="move", action="update", table="OpportunityLineItem", key=results[-1].key,
                values={"OpportunityId": other}),
        WriteOp(op_id="same", action="update", table="OpportunityLineItem", key=results[-1].key,
                values={"OpportunityId": opportunity[:15], "Quantity": 2})])
    assert "INVALID_FIELD_FOR_INSERT_UPDATE" in str(moved.error)
    assert same.ok
    assert (sim.get("Opportunity", opportunity) or {})["Amount"] == 10
    assert sim.count("OpportunityLineItem") == 1


async def test_deleting_an_opportunity_deletes_its_lines(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    _, product, opportunity = await header_with_product(client)
    line = await create(client, "OpportunityLineItem", OpportunityId=opportunity, Product2Id=product, Quantity=1,
                        UnitPrice=10)
    [result] = await client.write([WriteOp(op_id="d", action="delete", table="Opportunity", key=opportunity)])
    assert result.ok
    assert sim.get("OpportunityLineItem", line) is None
    deletes = [c for c in map(parse_cdc_event, sim.events()) if c.change_type == "DELETE"]
    assert [(c.entity, c.record_ids) for c in deletes] == [("OpportunityLineItem", [line]),
                                                            ("Opportunity", [opportunity])]
    assert deletes[0].transaction_key == deletes[1].transaction_key


# ----------------------------------------------------------------------------------------- orders


async def test_order_activation_flow(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    account, product, _ = await header_with_product(client)
    order = await create(client, "Order", AccountId=account, Status="Draft", EffectiveDate="2026-04-01",
                         Legal_Entity__c="US01", CurrencyIsoCode="USD", OrderReferenceNumber="PO-1")
    [early, born_active] = await client.write([
        WriteOp(op_id="early", action="update", table="Order", key=order, values={"Status": "Activated"}),
        WriteOp(op_id="born", action="create", table="Order",
                values={"AccountId": account, "Status": "Activated", "EffectiveDate": "2026-04-01"})])
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in str(early.error)
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in str(born_active.error)

    items = await client.write([
        WriteOp(op_id=f"i{i}", action="create", table="OrderItem",
                values={"OrderId": order, "Product2Id": product, "Quantity": q, "UnitPrice": 400.0})
        for i, q in enumerate((1, 2.5))])
    assert all(r.ok for r in items)
    await update(client, "Order", order, Status="Activated")
    polled = [r for page, _ in [p async for p in client.changes_since("Order", None)] for r in page]
    assert [(r.key, r.values["Status"], r.values["TotalAmount"]) for r in polled] == [(order, "Activated", 1400.0)]
    order_events = changes(sim, "Order")
    assert [e.change_type for e in order_events] == ["CREATE", "UPDATE", "UPDATE", "UPDATE"]
    assert [("TotalAmount" in e.changed_fields, "Status" in e.changed_fields) for e in order_events[1:]] == [
        (True, False), (True, False), (False, True)]

    # an activated order's products are locked, but its sync fields are not
    [late, price, tag] = await client.write([
        WriteOp(op_id="late", action="create", table="OrderItem",
                values={"OrderId": order, "Product2Id": product, "Quantity": 1, "UnitPrice": 1}),
        WriteOp(op_id="price", action="update", table="OrderItem", key=items[0].key, values={"UnitPrice": 1}),
        WriteOp(op_id="tag", action="update", table="OrderItem", key=items[0].key,
                values={"Dynamics_Line__c": "usmf|SO-1|1"})])
    assert "FIELD_INTEGRITY_EXCEPTION" in str(late.error)
    assert "FIELD_INTEGRITY_EXCEPTION" in str(price.error)
    assert tag.ok
    [bad_status] = await client.write([WriteOp(op_id="s", action="update", table="Order", key=order,
                                               values={"Status": "Shipped"})])
    assert "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST" in str(bad_status.error)
    assert (sim.get("Order", order) or {})["TotalAmount"] == 1400.0
    await update(client, "Order", order, Fulfillment_Status__c="Shipped", Dynamics_Sales_Order__c="usmf|SO-1")
    found = await client.select("Order", equals={"Dynamics_Sales_Order__c": "USMF|so-1"})
    assert [r.key for r in found] == [order]


async def test_describe_marks_computed_fields(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    fields = {f["name"]: f for f in (await client._ajson("GET", "sobjects/OrderItem/describe", what="d"))["fields"]}
    assert fields["TotalPrice"]["calculated"] is True
    assert fields["TotalPrice"]["createable"] is False
    assert fields["OrderId"]["referenceTo"] == ["Order"]
    assert fields["OrderId"]["updateable"] is False
    assert fields["Quantity"]["nillable"] is False


# ----------------------------------------------------------------------------------------- External ID index


async def test_upsert_by_external_id_uses_an_index_kept_in_step(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    def upsert(op_id: str, ext: str, **values: Any) -> WriteOp:
        return WriteOp(op_id=op_id, action="upsert", table="Account", match={"Dynamics_CRM_Id__c": ext},
                       values={"Name": "Northfield Tooling", **values})

    [first] = await client.write([upsert("a", "crm-1")])
    [second] = await client.write([upsert("b", "CRM-1", Phone="+1 412 555 0100")])
    assert first.created
    assert not second.created
    assert second.key == first.key
    assert sim.count("Account") == 1

    # the id changes through an update by Id: the old value no longer finds the record, the new one does
    await update(client, "Account", first.key or "", Dynamics_CRM_Id__c="crm-2")
    assert [r.key for r in await client.select("Account", equals={"Dynamics_CRM_Id__c": "crm-2"})] == [first.key]
    assert await client.select("Account", equals={"Dynamics_CRM_Id__c": "crm-1"}) == []
    [fresh] = await client.write([upsert("c1", "crm-1")])
    assert fresh.created
    assert fresh.key != first.key
    [third] = await client.write([upsert("c2", "crm-2")])
    assert (third.key, third.created) == (first.key, False)

    [gone] = await client.write([WriteOp(op_id="d", action="delete", table="Account", key=first.key)])
    assert gone.ok
    [again] = await client.write([upsert("e", "crm-2")])
    assert again.ok
    assert again.created
    assert again.key not in (first.key, fresh.key)
    assert sim.count("Account") == 2

    # a user copies the value onto a second record: the upsert is ambiguous, exactly as in the org
    other = await create(client, "Account", Name="Copy")
    sim.ui_change("Account", other, {"Dynamics_CRM_Id__c": "crm-2"})
    [dup] = await client.write([upsert("f", "crm-2")])
    assert "DUPLICATE_EXTERNAL_ID" in str(dup.error)
    found = await client.select("Account", equals={"Dynamics_CRM_Id__c": ["crm-2"]})
    assert sorted(r.key for r in found) == sorted([again.key, other])


def test_soql_where_hints_only_for_conjunctions() -> None:
    parsed = parse_soql("SELECT Id FROM Order WHERE Dynamics_Sales_Order__c IN ('a', 'b') AND Status = 'Draft' "
                        "ORDER BY SystemModstamp ASC")
    assert parsed.sobject == "Order"
    assert parsed.hints == [("Dynamics_Sales_Order__c", ("a", "b")), ("Status", ("Draft",))]
    assert parsed.order == ("SystemModstamp", False)
    assert parse_soql("SELECT Id FROM Account WHERE Name = 'a' OR Name = 'b'").hints == []
    assert parse_soql("SELECT Id FROM Account WHERE Name NOT IN ('a')").hints == []
    assert parse_soql("SELECT Id FROM Account WHERE (Name = 'a')").hints == []


async def test_indexed_query_matches_a_full_scan(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    made = seed_new_accounts(sim, 6)
    for i, rid in enumerate(made["good"]):
        sim.ui_change("Account", rid, {"Dynamics_CRM_Id__c": f"crm-{i % 3}"})
    indexed = await client.select("Account", equals={"Dynamics_CRM_Id__c": ["CRM-0", "crm-2"],
                                                     "Legal_Entity__c": "US01"})
    scanned = [r async for page in client.scan("Account") for r in page
               if str(r.values["Dynamics_CRM_Id__c"]).lower() in {"crm-0", "crm-2"}
               and r.values["Legal_Entity__c"] == "US01"]
    assert indexed
    assert [r.key for r in indexed] == sorted((r.key for r in scanned), key=made["good"].index)


# ----------------------------------------------------------------------------------------- seeds


def snapshot(sim: SalesforceSimulator) -> dict[str, dict[str, dict[str, Any]]]:
    stamps = {"CreatedDate", "LastModifiedDate", "SystemModstamp"}
    return {table: {rid: {k: v for k, v in rec.items() if k not in stamps} for rid, rec in records.items()}
            for table, records in sim.records.items()}


def seed_all(sim: SalesforceSimulator, **pipeline: Any) -> tuple[dict[str, list[str]], ...]:
    accounts = seed_new_accounts(sim)
    products = [sim.get("Product2", sim.ui_create("Product2", {"Name": f"Item {c} {i}",
                                                               "Dynamics_Item__c": f"{c}|P-{1000 + i}"}))
                for c in ("usmf", "demf") for i in range(8)]
    rows = [sim.get("Account", rid) for rid in accounts["good"] + accounts["bad_currency"]]
    pipe = seed_sales_pipeline(sim, accounts=[r for r in rows if r], products=[p for p in products if p],
                               **pipeline)
    return accounts, pipe, seed_customer360(sim)


def test_seeds_are_deterministic() -> None:
    first, second = SalesforceSimulator(), SalesforceSimulator()
    assert seed_all(first) == seed_all(second)
    assert snapshot(first) == snapshot(second)
    other = SalesforceSimulator()
    seed_all(other, seed=8)
    assert snapshot(other) != snapshot(first)


async def test_seed_categories_and_bad_records(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    accounts, pipe, crm = seed_all(sim)
    assert {k: len(v) for k, v in accounts.items()} == {"good": 20, "bad_currency": 1}
    assert len(pipe["won"]) == 120
    assert len(pipe["won"]) + len(pipe["open"]) + len(pipe["lost"]) == 300
    assert (len(pipe["activated"]), len(pipe["draft"])) == (48, 12)
    assert len(crm["accounts"]) == 40
    assert len(crm["contacts"]) == 80

    new = {r.key: r.values for r in await client.select("Account", equals={"Id": accounts["good"]})}
    assert len(new) == 20
    assert {(v["Legal_Entity__c"], v["CurrencyIsoCode"], v["BillingCountry"]) for v in new.values()} == {
        ("US01", "USD", "US"), ("DE01", "EUR", "DE")}
    assert {v["Type"] for v in new.values()} == {"Customer - Direct", "Customer - Channel"}
    assert all(v["Dynamics_Account__c"] is None for v in new.values())
    [bad_account] = (await client.fetch("Account", accounts["bad_currency"])).values()
    assert (bad_account.values["Legal_Entity__c"], bad_account.values["CurrencyIsoCode"]) == ("US01",
                                                                                             UNMAPPED_CURRENCY)

    won = await client.select("Opportunity", equals={"StageName": "Closed Won"})
    bad_ids = pipe["bad_legal_entity"] + pipe["bad_currency"]
    assert sorted(r.key for r in won) == sorted(pipe["won"] + bad_ids)
    by_id = {r.key: r.values for r in won}
    assert by_id[pipe["bad_legal_entity"][0]]["Legal_Entity__c"] == UNMAPPED_LEGAL_ENTITY
    assert by_id[pipe["bad_currency"][0]]["CurrencyIsoCode"] == UNMAPPED_CURRENCY
    good_accounts = {r.key: r.values for r in await client.select("Account", equals={"Id": list(
        {v["AccountId"] for k, v in by_id.items() if k not in bad_ids})})}
    for key in pipe["won"]:
        account = good_accounts[by_id[key]["AccountId"]]
        assert (by_id[key]["Legal_Entity__c"], by_id[key]["CurrencyIsoCode"]) == (
            account["Legal_Entity__c"], account["CurrencyIsoCode"])

    lines = [r async for page in client.scan("OpportunityLineItem") for r in page]
    assert len(lines) == len(pipe["opportunity_line_items"])
    products = {r.key: r.values for r in await client.select("Product2", equals={"Id": list(
        {r.values["Product2Id"] for r in lines})})}
    opportunities = {r.key: r.values for page in [p async for p in client.scan("Opportunity")] for r in page}
    totals: dict[str, float] = {}
    for line in lines:
        header = opportunities[line.values["OpportunityId"]]
        totals[header["Id"]] = totals.get(header["Id"], 0.0) + line.values["TotalPrice"]
        if line.values["OpportunityId"] in bad_ids:
            continue
        company = products[line.values["Product2Id"]]["Dynamics_Item__c"].split("|")[0]
        assert company == LEGAL_ENTITY_COMPANY[header["Legal_Entity__c"]]
    assert all(1 <= sum(1 for x in lines if x.values["OpportunityId"] == k) <= 4 for k in pipe["won"])
    assert all(opportunities[k]["Amount"] == pytest.approx(total) for k, total in totals.items())

    orders = {r.key: r.values for r in await client.select("Order", equals={"Status": "Activated"})}
    assert set(orders) == set(pipe["activated"] + pipe["bad_order_legal_entity"])
    assert orders[pipe["bad_order_legal_entity"][0]]["Legal_Entity__c"] == UNMAPPED_LEGAL_ENTITY
    assert all(orders[k]["TotalAmount"] > 0 for k in orders)
    drafts = await client.select("Order", equals={"Status": ["Draft"]})
    assert sorted(r.key for r in drafts) == sorted(pipe["draft"])

    crm_accounts = {r.key: r.values for r in await client.select("Account", equals={"Id": crm["accounts"]})}
    assert all(v["Legal_Entity__c"] is None and v["Payment_Terms__c"] in PAYMENT_TERMS
               for v in crm_accounts.values())
    assert {v["Type"] for v in crm_accounts.values()} == {"Prospect", "Customer - Direct", "Customer - Channel"}
    [bad_terms] = (await client.fetch("Account", crm["bad_payment_terms"])).values()
    assert bad_terms.values["Payment_Terms__c"] == UNMAPPED_PAYMENT_TERMS
    assert await client.select("Contact", equals={"AccountId": crm["bad_payment_terms"][0]}) == []
    contacts = await client.select("Contact", equals={"AccountId": crm["accounts"][:5]})
    assert len(contacts) == 10
    assert [r.values["LastName"] for r in await client.select("Contact", equals={"LastName": "O'Connor"})] == [
        "O'Connor"]

    # made like a person in the UI: every change event says so
    assert not any(c.is_own_write("syncline") for c in map(parse_cdc_event, sim.events()))


async def test_seed_pipeline_polls_like_the_flows_do(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    _, pipe, _ = seed_all(sim, opportunities=30, orders=10)
    pages = [p async for p in client.changes_since("Opportunity", None)]
    assert sum(len(records) for records, _ in pages) == 32
    checkpoint = pages[-1][1]
    # a rep edits one line of a won deal: the poll on Opportunity sees the header again (Amount rolled up)
    line = (await client.select("OpportunityLineItem", equals={"OpportunityId": pipe["won"][0]}))[0]
    sim.ui_change("OpportunityLineItem", line.key, {"Quantity": float(line.values["Quantity"]) + 1})
    later = [r for page, _ in [p async for p in client.changes_since("Opportunity", checkpoint)] for r in page]
    assert [r.key for r in later] == [pipe["won"][0]]
    items = [r async for page in client.scan("OrderItem") for r in page]
    assert len(items) == sim.count("OrderItem")
    assert all(r.values["TotalPrice"] == round(r.values["Quantity"] * r.values["UnitPrice"], 2) for r in items)
    fetched = await client.fetch("OrderItem", [r.key for r in items[:3]])
    assert set(fetched) == {r.key for r in items[:3]}


def test_pipeline_needs_usable_accounts() -> None:
    org = SalesforceSimulator()
    rid = org.ui_create("Account", {"Name": "Yen only", "Legal_Entity__c": "US01", "CurrencyIsoCode": "JPY"})
    with pytest.raises(ValueError, match="mapped legal entity"):
        seed_sales_pipeline(org, accounts=[org.get("Account", rid) or {}],
                            products=[{"Id": "01t5g0000000001AAA", "Dynamics_Item__c": "usmf|P-1"}])


async def test_connector_rejects_lines_on_unknown_header(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    [result] = await client.write([WriteOp(op_id="x", action="create", table="OrderItem",
                                           values={"OrderId": "8015g0000000999AAA", "Quantity": 1, "UnitPrice": 1})])
    assert isinstance(result.error, RejectedError)
    assert "INVALID_CROSS_REFERENCE_KEY" in str(result.error)
