"""FinOpsClient writing customers and sales orders with their lines into the F&O simulator (number sequences,
replays without duplicates, line failures, validation infologs) and the fulfilment business events coming back."""

from __future__ import annotations

import asyncio
import re
import ssl
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

import httpx
import pytest

from sandbox.fno import DROP, INVOICE_EVENT, PACKING_SLIP_EVENT, FinOpsSimulator
from shared.connectors.fno import FinOpsClient, parse_business_events
from shared.core.errors import AuthError, RejectedError, RetriableError, ThrottledError, TransientError
from shared.core.ports import Lines, LineWrite, WriteOp, WriteResult
from tests.connectors import test_fno as base
from tests.connectors.test_fno import FnoEnv

# The simulator over TLS, the MSAL-authenticated client and their fixtures are the F&O connector suite's own
# (this module gets its own simulator instance: module-scoped fixtures are per module).
fno_env, fno_sim, fno_http, factory, fno = base.fno_env, base.fno_sim, base.fno_http, base.factory, base.fno

ORDER_LINES = {"dataAreaId": "dataAreaId", "SalesOrderNumber": "SalesOrderNumber"}


def customer_op(op_id: str, sf_id: str, company: str = "usmf", **values: Any) -> WriteOp:
    """The customer create the accounts_to_fno flow sends: no CustomerAccount, found again by the Salesforce Id."""
    base = {"dataAreaId": company, "OrganizationName": f"Acme {sf_id}", "SalesCurrencyCode": "USD",
            "CustomerGroupId": "10", "AddressCity": "Chicago", "AddressCountryRegionId": "USA"}
    return WriteOp(op_id, "upsert", "CustomersV3", match={"SynclineSalesforceId": sf_id}, values={**base, **values})


def line(sf_id: str, item: str, qty: float, price: float) -> LineWrite:
    return LineWrite(source_key=sf_id, values={"OrderedSalesQuantity": qty, "SalesPrice": price, "ItemNumber": item},
                     match={"SynclineSalesforceId": sf_id})


def order_op(op_id: str, sf_id: str, items: list[LineWrite], *, key: str | None = None,
             account: str = "US-001", **values: Any) -> WriteOp:
    """The sales order upsert the opportunities/orders_to_fno flows send: header values plus its lines."""
    header = {"dataAreaId": "usmf", "CurrencyCode": "USD", "CustomersOrderReference": f"Deal {sf_id}",
              "RequestedShippingDate": "2026-11-02", "OrderingCustomerAccountNumber": account, **values}
    return WriteOp(op_id, "upsert", "SalesOrderHeadersV2", key=key,
                   match=None if key else {"SynclineSalesforceId": sf_id}, values=header,
                   lines=Lines(table="SalesOrderLines", parent_fields=dict(ORDER_LINES), items=items))


def headers_of(sim: FinOpsSimulator, sf_id: str) -> list[dict[str, Any]]:
    return [r for r in sim.all("SalesOrderHeadersV2") if r["SynclineSalesforceId"] == sf_id]


def lines_of(sim: FinOpsSimulator, number: str) -> list[dict[str, Any]]:
    return sorted((r for r in sim.all("SalesOrderLines") if r["SalesOrderNumber"] == number),
                  key=lambda r: r["LineNumber"])


def number_of(result: WriteResult) -> str:
    """The order number of a sales order op's canonical key (`usmf|000012` -> `000012`)."""
    assert result.key is not None, result.error
    return result.key.split("|")[1]


def calls(sim: FinOpsSimulator, method: str, entity: str) -> list[str]:
    return [unquote_plus(p) for m, p in sim.requests if m == method and p.startswith(f"/data/{entity}")]


# ============================================================================================ customers


async def test_customer_create_gets_the_next_number_of_its_company_and_a_replay_finds_it(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    [made] = await fno.write([customer_op("c1", "001SEQ000000001")])
    assert made.ok, made.error
    assert made.created
    assert made.key is not None
    assert re.fullmatch(r"usmf\|US-C\d{5}", made.key), made.key
    account = made.key.split("|")[1]
    row = fno_sim.get("CustomersV3", "usmf", account)
    assert row is not None
    assert row["SynclineSalesforceId"] == "001SEQ000000001"
    assert row["ModifiedDateTime"]
    # The number came back in the 201 body: no read after the create.
    assert calls(fno_sim, "GET", "CustomersV3(") == []

    [again] = await fno.write([customer_op("c1", "001SEQ000000001", OrganizationName="Acme renamed")])
    assert again.ok
    assert not again.created
    assert again.key == made.key
    assert [r["CustomerAccount"] for r in fno_sim.all("CustomersV3")
            if r["SynclineSalesforceId"] == "001SEQ000000001"] == [account]
    renamed = fno_sim.get("CustomersV3", "usmf", account)
    assert renamed is not None
    assert renamed["OrganizationName"] == "Acme renamed"

    # A number already taken (entered by hand in F&O) is skipped, never collided with.
    taken = f"US-C{int(account[4:]) + 1:05d}"
    fno_sim.insert("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": taken, "OrganizationName": "Manual",
                                   "CustomerGroupId": "10"})
    [next_one] = await fno.write([customer_op("c2", "001SEQ000000002")])
    assert next_one.key == f"usmf|US-C{int(account[4:]) + 2:05d}"
    [german] = await fno.write([customer_op("c3", "001SEQ000000003", company="demf", SalesCurrencyCode="EUR")])
    assert german.key is not None
    assert re.fullmatch(r"demf\|DE-C\d{5}", german.key), german.key


@pytest.mark.parametrize(("sf_id", "values", "infolog"), [
    ("001BAD000000001", {"SalesCurrencyCode": "XYZ"},
     "The value 'XYZ' in field 'Currency' is not found in the related table 'Currency'"),
    ("001BAD000000002", {"CustomerGroupId": "77"},
     "The value '77' in field 'Customer group' is not found in the related table 'Customer groups'"),
    ("001BAD000000003", {"CustomerGroupId": None}, "Field 'Customer group' must be filled in"),
])
async def test_customer_validation_is_rejected_with_the_infolog(
        fno: FinOpsClient, fno_sim: FinOpsSimulator, sf_id: str, values: dict[str, Any], infolog: str) -> None:
    [result] = await fno.write([customer_op("v1", sf_id, **values)])
    assert not result.ok
    assert isinstance(result.error, RejectedError)
    assert infolog in result.error.detail
    assert "CustCustomerV3Entity" in result.error.detail
    assert not [r for r in fno_sim.all("CustomersV3") if r["SynclineSalesforceId"] == sf_id]


async def test_gold_is_a_currency_f_and_o_knows(fno: FinOpsClient) -> None:
    # The seed's deliberately bad customer is only bad for Salesforce (no currency map entry), not for F&O.
    [result] = await fno.write([customer_op("g1", "001GOLD00000001", SalesCurrencyCode="XAU")])
    assert result.ok, result.error


# ============================================================================================ sales orders


async def test_header_and_lines_are_created_by_one_op(fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    op = order_op("o1", "006ORD000000001", [line("00kORD000000001", "P-1003", 2.0, 450.0),
                                            line("00kORD000000002", "P-1005", 1.0, 99.5)])
    [result] = await fno.write([op])
    assert result.ok, result.error
    assert result.created
    assert result.key is not None
    assert re.fullmatch(r"usmf\|\d{6}", result.key), result.key
    number = result.key.split("|")[1]
    [header] = headers_of(fno_sim, "006ORD000000001")
    assert header["SalesOrderNumber"] == number
    assert header["SalesOrderStatus"] == "Backorder"
    assert header["InvoiceCustomerAccountNumber"] == "US-001"
    assert header["CustomersOrderReference"] == "Deal 006ORD000000001"
    assert header["RequestedShippingDate"] == "2026-11-02"
    lines = lines_of(fno_sim, number)
    assert [(r["SynclineSalesforceId"], r["ItemNumber"], r["LineNumber"], r["LineAmount"]) for r in lines] == [
        ("00kORD000000001", "P-1003", 1, 900.0), ("00kORD000000002", "P-1005", 2, 99.5)]
    assert all(r["dataAreaId"] == "usmf" and r["InventoryLotId"] for r in lines)
    assert len({r["InventoryLotId"] for r in lines}) == 2
    # A header created by this op cannot have lines yet: no read of lines, one POST per line.
    assert calls(fno_sim, "GET", "SalesOrderLines") == []
    assert len(calls(fno_sim, "POST", "SalesOrderLines")) == 2


async def test_replayed_op_creates_no_second_header_and_no_duplicate_lines(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    items = [line("00kRPL000000001", "P-1002", 3.0, 10.0), line("00kRPL000000002", "P-1004", 1.0, 20.0)]
    [first] = await fno.write([order_op("r1", "006RPL000000001", items)])
    assert first.ok, first.error
    fno_sim.requests.clear()
    [replay] = await fno.write([order_op("r1", "006RPL000000001", items)])
    assert replay.ok, replay.error
    assert not replay.created
    assert replay.key == first.key
    assert len(headers_of(fno_sim, "006RPL000000001")) == 1
    assert len(lines_of(fno_sim, number_of(replay))) == 2
    # One query reads the order's lines (company and order number, cross-company); nothing differs, so
    # no line is written.
    [query] = calls(fno_sim, "GET", "SalesOrderLines")
    number = number_of(first)
    assert f"dataAreaId eq 'usmf' and SalesOrderNumber eq '{number}'" in query
    assert "cross-company=true" in query
    assert calls(fno_sim, "POST", "SalesOrderLines") == []
    assert calls(fno_sim, "PATCH", "SalesOrderLines") == []


async def test_changed_quantity_is_patched_and_a_new_line_added_by_key(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    items = [line("00kCHG000000001", "P-1001", 1.0, 100.0), line("00kCHG000000002", "P-1002", 5.0, 7.0)]
    [first] = await fno.write([order_op("q1", "006CHG000000001", items)])
    assert first.ok, first.error
    number = number_of(first)
    lot = lines_of(fno_sim, number)[0]["InventoryLotId"]
    fno_sim.requests.clear()
    changed = [line("00kCHG000000001", "P-1001", 4.0, 100.0), line("00kCHG000000002", "P-1002", 5.0, 7.0),
               line("00kCHG000000003", "P-1006", 2.0, 1.25)]
    [linked] = await fno.write([order_op("q2", "006CHG000000001", changed, key=first.key)])
    assert linked.ok, linked.error
    assert linked.key == first.key
    [patch] = calls(fno_sim, "PATCH", "SalesOrderLines")
    assert f"InventoryLotId='{lot}'" in patch
    assert len(calls(fno_sim, "POST", "SalesOrderLines")) == 1
    rows = lines_of(fno_sim, number)
    assert [(r["SynclineSalesforceId"], r["OrderedSalesQuantity"], r["LineAmount"], r["LineNumber"])
            for r in rows] == [("00kCHG000000001", 4.0, 400.0, 1), ("00kCHG000000002", 5.0, 35.0, 2),
                               ("00kCHG000000003", 2.0, 2.5, 3)]
    assert len(headers_of(fno_sim, "006CHG000000001")) == 1


async def test_a_bad_line_fails_the_op_with_the_header_key_and_a_retry_completes_it(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    good = line("00kBAD000000001", "P-1001", 1.0, 10.0)
    bad = line("00kBAD000000002", "P-9999", 2.0, 10.0)
    [failed] = await fno.write([order_op("b1", "006BAD000000001", [good, bad])])
    assert not failed.ok
    assert isinstance(failed.error, RejectedError)
    assert failed.key is not None
    [header] = headers_of(fno_sim, "006BAD000000001")
    assert failed.key == f"usmf|{header['SalesOrderNumber']}"
    detail = failed.error.detail
    assert "00kBAD000000002" in detail
    assert "The value 'P-9999' in field 'Item number' is not found in the related table 'Released products'" in detail
    assert failed.key in detail
    assert "00kBAD000000001" not in detail  # the good line went in
    assert [r["SynclineSalesforceId"] for r in lines_of(fno_sim, header["SalesOrderNumber"])] == ["00kBAD000000001"]

    fixed = line("00kBAD000000002", "P-1003", 2.0, 10.0)
    [retry] = await fno.write([order_op("b1", "006BAD000000001", [good, fixed])])
    assert retry.ok, retry.error
    assert retry.key == failed.key
    assert not retry.created
    assert len(headers_of(fno_sim, "006BAD000000001")) == 1
    assert [(r["SynclineSalesforceId"], r["ItemNumber"]) for r in lines_of(fno_sim, header["SalesOrderNumber"])] == [
        ("00kBAD000000001", "P-1001"), ("00kBAD000000002", "P-1003")]


async def test_a_line_failing_transiently_keeps_the_error_retriable(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    items = [line("00kTRN000000001", "P-1001", 1.0, 10.0), line("00kTRN000000002", "P-1002", 1.0, 10.0)]
    fno_sim.faults.fail_next(3, 503, path_contains="SalesOrderLines")  # every attempt of the first line
    [failed] = await fno.write([order_op("t1", "006TRN000000001", items)])
    assert not failed.ok
    assert isinstance(failed.error, TransientError)
    assert failed.error.retriable
    assert "00kTRN000000001" in failed.error.detail
    number = number_of(failed)
    assert [r["SynclineSalesforceId"] for r in lines_of(fno_sim, number)] == ["00kTRN000000002"]
    [retry] = await fno.write([order_op("t1", "006TRN000000001", items)])
    assert retry.ok, retry.error
    assert sorted(r["SynclineSalesforceId"] for r in lines_of(fno_sim, number)) == [
        "00kTRN000000001", "00kTRN000000002"]


async def test_throttling_while_writing_lines_fails_only_that_op_and_leaves_the_rest_unattempted(
        factory: base.Factory, fno_sim: FinOpsSimulator) -> None:
    fno = factory.client(max_concurrency=1)
    items = [line("00kTHR000000001", "P-1001", 1.0, 10.0)]
    fno_sim.faults.fail_next(3, 429, path_contains="SalesOrderLines")
    [throttled, waiting] = await fno.write([order_op("h1", "006THR000000001", items),
                                            order_op("h2", "006THR000000002", items)])
    assert isinstance(throttled.error, ThrottledError)
    assert throttled.key is not None  # the header is written: the retry finds it and adds the line
    assert isinstance(waiting.error, ThrottledError)
    assert "was not attempted" in waiting.error.detail
    assert headers_of(fno_sim, "006THR000000002") == []
    [retry] = await fno.write([order_op("h1", "006THR000000001", items)])
    assert retry.ok, retry.error
    assert len(headers_of(fno_sim, "006THR000000001")) == 1
    assert len(lines_of(fno_sim, number_of(retry))) == 1


async def test_a_401_on_one_line_never_fails_the_records_written_before_it(
        factory: base.Factory, fno_sim: FinOpsSimulator) -> None:
    """Issue 13 defect 9: a 401 surviving the token refresh fails its own op and leaves the rest unattempted;
    the record written before it keeps ok=True (it used to fail the whole call, every op with its text)."""
    fno = factory.client(max_concurrency=1)
    ops = [customer_op("a1", "001AUT000000001"),
           order_op("a2", "006AUT000000002", [line("00kAUT000000002", "P-1002", 1.0, 10.0)]),
           order_op("a3", "006AUT000000003", [line("00kAUT000000003", "P-1001", 1.0, 10.0)])]
    # a2's header goes in, its line is refused: 401, token refresh, 401 again.
    fno_sim.faults.fail_next(2, 401, path_contains="SalesOrderLines", method="POST")
    customer, order, untried = await fno.write(ops)
    assert customer.ok, customer.error
    assert customer.created
    assert isinstance(order.error, AuthError)
    assert order.error.retriable
    assert "00kAUT000000002" in order.error.detail
    assert order.key is not None  # header written: the retry finds it and adds only the line
    assert isinstance(untried.error, AuthError)
    assert untried.error.retriable
    assert "(op a3) was not attempted" in untried.error.detail
    assert "00kAUT000000002" not in untried.error.detail
    assert headers_of(fno_sim, "006AUT000000003") == []
    retry = await fno.write(ops[1:])
    assert all(r.ok for r in retry), [r.error for r in retry]
    assert len(headers_of(fno_sim, "006AUT000000002")) == 1
    assert len(lines_of(fno_sim, number_of(retry[0]))) == 1
    assert [r for r in fno_sim.all("CustomersV3") if r["SynclineSalesforceId"] == "001AUT000000001"]


# ============================================================================================ lost answers


def customers_of(sim: FinOpsSimulator, sf_id: str) -> list[dict[str, Any]]:
    return [r for r in sim.all("CustomersV3") if r["SynclineSalesforceId"] == sf_id]


@pytest.mark.parametrize("status", [504, DROP], ids=["gateway-504", "connection-dropped"])
async def test_a_customer_create_applied_but_unanswered_is_found_again_not_reposted(
        fno: FinOpsClient, fno_sim: FinOpsSimulator, status: int) -> None:
    """Issue 13 defect 4: a create whose answer is lost was re-POSTed (twin customers)."""
    sf_id = f"001LOST{status:08d}"
    fno_sim.faults.fail_next(1, status, path_contains="CustomersV3", method="POST", after_apply=True)
    [result] = await fno.write([customer_op("l1", sf_id)])
    assert len(customers_of(fno_sim, sf_id)) == 1
    assert len(calls(fno_sim, "POST", "CustomersV3")) == 1
    assert result.ok, result.error
    assert result.key == f"usmf|{customers_of(fno_sim, sf_id)[0]['CustomerAccount']}"


@pytest.mark.parametrize("status", [504, DROP], ids=["gateway-504", "connection-dropped"])
async def test_an_order_and_its_lines_applied_but_unanswered_are_never_twinned(
        fno: FinOpsClient, fno_sim: FinOpsSimulator, status: int) -> None:
    sf_id = f"006LOST{status:08d}"
    items = [line(f"00kLOST{status:04d}0001", "P-1001", 1.0, 10.0),
             line(f"00kLOST{status:04d}0002", "P-1002", 2.0, 20.0)]
    fno_sim.faults.fail_next(1, status, path_contains="SalesOrderHeadersV2", method="POST", after_apply=True)
    fno_sim.faults.fail_next(1, status, path_contains="SalesOrderLines", method="POST", after_apply=True)
    [result] = await fno.write([order_op("o1", sf_id, items)])
    assert len(headers_of(fno_sim, sf_id)) == 1
    number = headers_of(fno_sim, sf_id)[0]["SalesOrderNumber"]
    assert [r["SynclineSalesforceId"] for r in lines_of(fno_sim, number)] == [i.source_key for i in items]
    assert len(calls(fno_sim, "POST", "SalesOrderHeadersV2")) == 1
    assert len(calls(fno_sim, "POST", "SalesOrderLines")) == 2
    assert result.ok, result.error
    assert result.key == f"usmf|{number}"


async def test_a_create_timing_out_is_not_resent_and_the_retry_finds_it(
        factory: base.Factory, fno_env: FnoEnv, fno_sim: FinOpsSimulator) -> None:
    """A timed-out create that F&O applies late: the call reports it ambiguous (never resends it), and the
    next attempt finds it by its match field instead of creating a twin."""
    sf_id = "001SLOW00000001"
    ctx = ssl.create_default_context(cafile=str(fno_env.ca.ca_path))
    async with httpx.AsyncClient(verify=ctx, timeout=0.5) as impatient:
        slow = base.Factory(fno_env, impatient, factory.recorder, factory.providers).client()
        await slow.fetch("CustomersV3", ["usmf|US-001"])  # token first
        fno_sim.faults.slow_next(1, 1.5, "CustomersV3", method="POST")
        [result] = await slow.write([customer_op("s1", sf_id)])
        assert not result.ok
        assert isinstance(result.error, RetriableError)
        for _ in range(50):
            if customers_of(fno_sim, sf_id):
                break
            await asyncio.sleep(0.1)
        assert len(calls(fno_sim, "POST", "CustomersV3")) == 1
        [retry] = await slow.write([customer_op("s1", sf_id)])
    assert retry.ok, retry.error
    assert not retry.created
    assert len(customers_of(fno_sim, sf_id)) == 1
    assert len(calls(fno_sim, "POST", "CustomersV3")) == 1


@pytest.mark.parametrize(("sf_id", "change", "infolog"), [
    ("006HDR000000001", {"CurrencyCode": "ABC"},
     "The value 'ABC' in field 'Currency' is not found in the related table 'Currency'"),
    ("006HDR000000002", {"OrderingCustomerAccountNumber": "DE-001"}, "Customer DE-001 does not exist"),
])
async def test_header_validation_is_rejected_and_no_line_is_attempted(
        fno: FinOpsClient, fno_sim: FinOpsSimulator, sf_id: str, change: dict[str, Any], infolog: str) -> None:
    [result] = await fno.write([order_op("x1", sf_id, [line("00kHDR000000001", "P-1001", 1.0, 1.0)], **change)])
    assert not result.ok
    assert isinstance(result.error, RejectedError)
    assert infolog in result.error.detail
    assert headers_of(fno_sim, sf_id) == []
    assert calls(fno_sim, "POST", "SalesOrderLines") == []


@pytest.mark.parametrize(("values", "infolog"), [
    ({"SalesOrderNumber": "NOPE-1", "ItemNumber": "P-1001", "OrderedSalesQuantity": 1.0},
     "The value 'NOPE-1' in field 'Sales order' is not found in the related table 'Sales orders'"),
    ({"SalesOrderNumber": "USSO-00001", "ItemNumber": "P-1001", "OrderedSalesQuantity": 0},
     "the ordered quantity must be greater than zero"),
    ({"SalesOrderNumber": "USSO-00001", "OrderedSalesQuantity": 1.0}, "Field 'Item number' must be filled in"),
])
async def test_line_validation(fno: FinOpsClient, values: dict[str, Any], infolog: str) -> None:
    op = WriteOp("l1", "upsert", "SalesOrderLines", match={"SynclineSalesforceId": "00kVAL000000001"},
                 values={"dataAreaId": "usmf", **values})
    [result] = await fno.write([op])
    assert not result.ok
    assert isinstance(result.error, RejectedError)
    assert infolog in result.error.detail
    assert "SalesOrderLineEntity" in result.error.detail


# ============================================================================================ select


def test_list_values_become_or_groups_with_escaped_literals() -> None:
    text = FinOpsClient.build_filter({"dataAreaId": "usmf", "CustomerAccount": ["US-001", "O'Brien", "US-001"]})
    assert text == "dataAreaId eq 'usmf' and (CustomerAccount eq 'US-001' or CustomerAccount eq 'O''Brien')"
    with pytest.raises(RejectedError):
        FinOpsClient.build_filter({"CustomerAccount": ["x') or (1 eq 1"], "Bad field": ["a"]})


async def test_select_any_of_a_list_with_a_quote_in_a_value(fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    fno_sim.insert("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "O'BRIEN-1", "OrganizationName": "x",
                                   "CustomerGroupId": "10"})
    found = await fno.select("CustomersV3", equals={"dataAreaId": "usmf",
                                                    "CustomerAccount": ["US-001", "O'BRIEN-1", "US-NOPE"]})
    assert sorted(r.key for r in found) == ["usmf|O'BRIEN-1", "usmf|US-001"]
    [query] = calls(fno_sim, "GET", "CustomersV3")
    assert "(CustomerAccount eq 'US-001' or CustomerAccount eq 'O''BRIEN-1' or CustomerAccount eq 'US-NOPE')" \
        in query
    fno_sim.requests.clear()
    assert await fno.select("CustomersV3", equals={"CustomerAccount": []}) == []
    assert fno_sim.requests == []


# ============================================================================================ fulfilment events


async def test_ship_and_invoice_emit_events_the_intake_reads_back_as_the_order(
        fno: FinOpsClient, fno_env: FnoEnv, fno_sim: FinOpsSimulator) -> None:
    items = [line("00kFUL000000001", "P-1001", 2.0, 100.0), line("00kFUL000000002", "P-1002", 1.0, 50.25)]
    [made] = await fno.write([order_op("f1", "006FUL000000001", items)])
    assert made.ok, made.error
    company, number = "usmf", number_of(made)
    header = fno_sim.get("SalesOrderHeadersV2", company, number)
    assert header is not None
    created_at = header["ModifiedDateTime"]
    checkpoint = [b async for b in fno.changes_since("SalesOrderHeadersV2", None)][-1][1]
    await fno_sim.flush_events()
    fno_env.inbox.bodies.clear()

    shipped = fno_sim.ship_order(company, number)
    await fno_sim.flush_events()
    assert shipped["SalesOrderStatus"] == "Delivered"
    assert shipped["ModifiedDateTime"] > created_at
    [event] = parse_business_events(fno_env.inbox.bodies[-1])
    assert event.business_event_id == PACKING_SLIP_EVENT
    assert event.entity_set == "SalesOrderHeadersV2"
    assert event.record_key == made.key
    assert event.fields["PackingSlipId"]
    record = await fno.read_event_record(event)
    assert record.key == made.key
    assert record.values["SalesOrderStatus"] == "Delivered"
    assert record.values["SynclineSalesforceId"] == "006FUL000000001"
    polled = [r for b in [x async for x in fno.changes_since("SalesOrderHeadersV2", checkpoint)] for r in b[0]]
    assert [(r.key, r.values["SalesOrderStatus"]) for r in polled] == [(made.key, "Delivered")]

    invoiced = fno_sim.invoice_order(company, number)
    await fno_sim.flush_events()
    assert invoiced["ModifiedDateTime"] > shipped["ModifiedDateTime"]
    [invoice] = parse_business_events(fno_env.inbox.bodies[-1])
    assert invoice.business_event_id == INVOICE_EVENT
    assert invoice.control_number > event.control_number
    assert invoice.fields["InvoiceAmountInAccountingCurrency"] == 250.25
    assert invoice.fields["InvoiceAccount"] == "US-001"
    assert isinstance(invoice.event_time, datetime)
    record = await fno.read_event_record(invoice)
    assert record.values["SalesOrderStatus"] == "Invoiced"
    with pytest.raises(ValueError, match="Invoiced"):
        fno_sim.ship_order(company, number)
    with pytest.raises(KeyError):
        fno_sim.invoice_order(company, "NOPE-1")
