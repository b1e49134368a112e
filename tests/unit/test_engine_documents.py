"""Unit tests of scope conditions, composite-key lookups and document lines (header + lines in one write)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.core.engine import SyncEngine, key_parts
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import SpecError
from shared.core.ports import Link
from shared.mapping.spec import parse_spec
from shared.ops import reconcile
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem

SPEC_TEXT = """
spec_version: 1
name: l2c
systems: [fno, salesforce]
value_maps:
  legal_entity:
    - {label: US, fno: usmf, salesforce: US01}
  currency:
    - {label: USD, fno: USD, salesforce: USD}
flows:
  - name: customers_out
    entity: customer
    source: {system: fno, table: CustomersV3, key_field: CustomerAccount}
    target: {system: salesforce, table: Account, key_field: Id}
    mode: queue
    link: {target_field: Dynamics_Account__c}
    fields:
      - {source: OrganizationName, target: Name, owner: fno}
  - name: products_out
    entity: product
    source: {system: fno, table: ReleasedProductsV2, key_field: ItemNumber}
    target: {system: salesforce, table: Product2, key_field: Id}
    mode: queue
    link: {target_field: Dynamics_Item__c}
    fields:
      - {source: ProductName, target: Name, owner: fno}
  - name: accounts_in
    entity: customer
    source: {system: salesforce, table: Account, key_field: Id}
    target: {system: fno, table: CustomersV3, key_field: CustomerAccount}
    mode: queue
    operations: [create]
    link: {target_field: SynclineSalesforceId}
    fields:
      - {source: Name, target: OrganizationName, owner: fno}
  - name: deals_in
    entity: deal
    source: {system: salesforce, table: Opportunity, key_field: Id, modified_field: SystemModstamp}
    target: {system: fno, table: SalesOrderHeadersV2, key_field: SalesOrderNumber}
    mode: queue
    operations: [create, update]
    when:
      - {field: StageName, in: [Closed Won]}
      - {field: Legal_Entity__c, present: true}
    link: {target_field: SynclineSalesforceId, write_back: Dynamics_Sales_Order__c}
    fields:
      - {source: Legal_Entity__c, target: dataAreaId, transform: choice, value_map: legal_entity, required: true}
      - {source: CurrencyIsoCode, target: CurrencyCode, transform: choice, value_map: currency, required: true}
    lookups:
      - {source: AccountId, target: OrderingCustomerAccountNumber, parent_flow: accounts_in, key_part: 1}
    lines:
      source_table: OpportunityLineItem
      parent_field: OpportunityId
      target_table: SalesOrderLines
      parent_fields: {dataAreaId: dataAreaId, SalesOrderNumber: SalesOrderNumber}
      link_field: SynclineSalesforceId
      fields:
        - {source: Quantity, target: OrderedSalesQuantity, required: true}
      lookups:
        - {source: Product2Id, target: ItemNumber, parent_flow: products_out, key_part: 1}
"""
SPEC = parse_spec(SPEC_TEXT)
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def deal(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"Id": "006A", "StageName": "Closed Won", "Legal_Entity__c": "US01",
                               "CurrencyIsoCode": "USD", "AccountId": "001A"}
    base.update(over)
    return base


def env(payload: dict[str, object], *, modified: datetime = T0, waits: int = 0) -> ChangeEnvelope:
    return ChangeEnvelope(flow="deals_in", operation="upsert", source_system="salesforce",
                          source_table="Opportunity", source_key=str(payload["Id"]), source_modified=modified,
                          source_version=None, payload=payload, waits=waits)


@pytest.fixture
async def world():
    sf, fno = FakeSystem("salesforce"), FakeSystem("fno")
    state = SqliteStateStore(":memory:")
    await state.put_links([Link("customer", "fno", "usmf|US-001", "salesforce", "001A"),
                           Link("product", "fno", "usmf|P-1001", "salesforce", "01tA"),
                           Link("product", "fno", "usmf|P-1002", "salesforce", "01tB")])
    sf.put("OpportunityLineItem", "00kA", {"OpportunityId": "006A", "Product2Id": "01tA", "Quantity": 2})
    sf.put("OpportunityLineItem", "00kB", {"OpportunityId": "006A", "Product2Id": "01tB", "Quantity": 5})
    sf.put("OpportunityLineItem", "00kZ", {"OpportunityId": "006OTHER", "Product2Id": "01tB", "Quantity": 9})
    sf.put("Opportunity", "006A", deal())
    engine = SyncEngine(SPEC, sinks={"salesforce": sf, "fno": fno}, sources={"salesforce": sf, "fno": fno},
                        state=state, clock=lambda: T0)
    yield engine, sf, fno, state
    await state.close()


def test_key_parts_honour_escapes() -> None:
    assert key_parts("usmf|US-001") == ["usmf", "US-001"]
    assert key_parts("usmf|A\\|B") == ["usmf", "A|B"]
    assert key_parts("plain") == ["plain"]


async def test_out_of_scope_records_are_skipped_and_say_why(world):
    engine, _sf, fno, state = world
    [outcome] = await engine.process([env(deal(StageName="Negotiation/Review"))])
    assert outcome.status == "skipped_noop"
    assert "StageName in ['Closed Won']" in outcome.detail
    [outcome] = await engine.process([env(deal(Legal_Entity__c=None))])
    assert outcome.status == "skipped_noop"
    assert "Legal_Entity__c is set" in outcome.detail
    assert not fno.writes
    assert not await state.get_links("deal", "salesforce", ["006A"], "fno")


async def test_header_and_lines_are_written_in_one_op_with_composite_key_parts(world):
    engine, sf, fno, _state = world
    [outcome] = await engine.process([env(deal())])
    assert outcome.status == "written", outcome.error
    [op] = fno.writes
    assert op.values["OrderingCustomerAccountNumber"] == "US-001"  # part 1 of usmf|US-001
    assert op.values["dataAreaId"] == "usmf"
    assert op.lines is not None
    assert op.lines.table == "SalesOrderLines"
    items = {i.source_key: i for i in op.lines.items}
    assert set(items) == {"00kA", "00kB"}  # the other opportunity's line is not taken
    assert items["00kA"].values == {"OrderedSalesQuantity": 2, "ItemNumber": "P-1001"}
    assert items["00kB"].match == {"SynclineSalesforceId": "00kB"}
    assert sf.tables["Opportunity"]["006A"]["Dynamics_Sales_Order__c"] == outcome.target_key
    assert len(fno.tables["SalesOrderLines"]) == 2


async def test_unchanged_document_is_an_echo_and_a_changed_line_rewrites_it(world):
    engine, sf, fno, _state = world
    await engine.process([env(deal())])
    [again] = await engine.process([env(deal(), modified=T0 + timedelta(seconds=5))])
    assert again.status == "skipped_echo"
    sf.tables["OpportunityLineItem"]["00kB"]["Quantity"] = 7
    [changed] = await engine.process([env(deal(), modified=T0 + timedelta(seconds=9))])
    assert changed.status == "written"
    assert not changed.created
    lines = {r["SynclineSalesforceId"]: r for r in fno.tables["SalesOrderLines"].values()}
    assert len(lines) == 2
    assert lines["00kB"]["OrderedSalesQuantity"] == 7


async def test_a_line_whose_product_is_not_synced_defers_the_whole_document(world):
    engine, sf, fno, _state = world
    sf.put("OpportunityLineItem", "00kC", {"OpportunityId": "006A", "Product2Id": "01tNEW", "Quantity": 1})
    [outcome] = await engine.process([env(deal())])
    assert outcome.status == "deferred"
    assert outcome.error is not None
    assert outcome.error.reason == "PARENT_PENDING"
    assert "00kC" in outcome.error.detail
    assert not fno.writes  # never half an order
    [late] = await engine.process([env(deal(), waits=48)])
    assert late.status == "failed"
    assert late.error is not None
    assert late.error.reason == "PARENT_MISSING"


async def test_a_bad_line_dead_letters_the_document_with_the_line_named(world):
    engine, sf, fno, _state = world
    sf.tables["OpportunityLineItem"]["00kB"]["Quantity"] = None
    [outcome] = await engine.process([env(deal())])
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert not outcome.error.retriable
    assert outcome.error.reason == "REQUIRED_FIELD_MISSING"
    assert "00kB" in outcome.error.detail
    assert not fno.writes


async def test_unmapped_legal_entity_dead_letters_with_its_reason(world):
    engine, _sf, fno, _state = world
    [outcome] = await engine.process([env(deal(Legal_Entity__c="BR01"))])
    assert outcome.error is not None
    assert outcome.error.reason == "UNMAPPED_CHOICE"
    assert "BR01" in outcome.error.detail
    assert not fno.writes


async def test_reconcile_counts_out_of_scope_records_apart_from_drift(world):
    engine, sf, _fno, state = world
    await engine.process([env(deal())])
    sf.put("Opportunity", "006B", deal(Id="006B", StageName="Prospecting"))
    report = {d.flow: d for d in await reconcile(SPEC, {"salesforce": sf, "fno": _fno}, state)}
    deals = report["deals_in"]
    assert deals.out_of_scope == 1
    assert deals.linked == 1
    assert deals.drift == 0


def test_scope_condition_needs_exactly_one_rule() -> None:
    bad = SPEC_TEXT.replace("- {field: Legal_Entity__c, present: true}",
                            "- {field: Legal_Entity__c, present: true, in: [US01]}")
    with pytest.raises(SpecError, match="exactly one of 'in' or 'present'"):
        parse_spec(bad)


def test_line_lookups_and_transforms_are_validated() -> None:
    with pytest.raises(SpecError, match="unknown parent_flow 'nope'"):
        parse_spec(SPEC_TEXT.replace("parent_flow: products_out, key_part: 1", "parent_flow: nope"))
    with pytest.raises(SpecError, match=r"lines.fields\[0\].*unknown transform"):
        parse_spec(SPEC_TEXT.replace("target: OrderedSalesQuantity, required: true",
                                     "target: OrderedSalesQuantity, transform: sparkle"))


async def test_ensure_syncs_a_never_synced_parent_first_instead_of_waiting():
    spec = parse_spec(SPEC_TEXT.replace("parent_flow: accounts_in, key_part: 1",
                                        "parent_flow: accounts_in, ensure: true"))
    sf, fno = FakeSystem("salesforce"), FakeSystem("fno")
    state = SqliteStateStore(":memory:")
    await state.put_links([Link("product", "fno", "usmf|P-1001", "salesforce", "01tA")])
    sf.put("Account", "001NEW", {"Name": "Keystone Mining"})
    sf.put("Opportunity", "006A", deal(AccountId="001NEW"))
    sf.put("OpportunityLineItem", "00kA", {"OpportunityId": "006A", "Product2Id": "01tA", "Quantity": 2})
    engine = SyncEngine(spec, sinks={"salesforce": sf, "fno": fno}, sources={"salesforce": sf, "fno": fno},
                        state=state, clock=lambda: T0)
    try:
        [outcome] = await engine.process([env(deal(AccountId="001NEW"))])
        assert outcome.status == "written", outcome.error
        [customer_key] = (await state.get_links("customer", "salesforce", ["001NEW"], "fno")).values()
        assert fno.tables["CustomersV3"][customer_key]["OrganizationName"] == "Keystone Mining"
        [order] = fno.tables["SalesOrderHeadersV2"].values()
        assert order["OrderingCustomerAccountNumber"] == customer_key
        # the parent went first: the customer write precedes the order write
        assert [op.table for op in fno.writes] == ["CustomersV3", "SalesOrderHeadersV2"]
    finally:
        await state.close()


def test_ensure_needs_a_parent_flow_in_the_same_direction() -> None:
    bad = SPEC_TEXT.replace("parent_flow: products_out, key_part: 1", "parent_flow: products_out, ensure: true")
    with pytest.raises(SpecError, match="ensure needs a parent_flow that runs in the same direction"):
        parse_spec(bad)
