"""FinOpsClient against the F&O simulator over real TLS loopback (MSAL token, keys, paging, writes, events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from sandbox.fno import (
    CUSTOMER_EVENT,
    UNMAPPED_CURRENCY,
    FilterParser,
    FinOpsSimulator,
    ODataError,
    evaluate,
    seed_fno,
)
from sandbox.server import TestCA as SandboxCA
from shared.connectors._http import RetryPolicy
from shared.connectors.dataverse import AzureIdentityTokenProvider, client_secret_token_provider
from shared.connectors.fno import (
    ENTITY_KEYS,
    FinOpsClient,
    FinOpsEnum,
    filter_literal,
    format_key,
    key_path,
    parse_business_event,
    parse_business_events,
    parse_key,
)
from shared.core.errors import AuthError, EnvelopeError, RejectedError, ThrottledError, TransientError
from shared.core.ports import ChangeSource, RecordSink, WriteOp
from tests.served import Recorder, Served, endpoint, serve, tls_context

CUSTOMERS = 12
HEXALITH_EVENT = {
    "Account": "6043", "BusinessEventId": "FFYCustomerChangedBusinessEvent", "BusinessEventLegalEntity": "0031",
    "ContextRecordSubject": "", "ControlNumber": 5637985363, "EventId": "9C091AF1-5BAF-4CA9-B0A4-94D6E59A0D1C",
    "EventTime": "/Date(1697470966000)/", "EventTimeIso8601": "2023-10-16T15:42:46.3440655Z",
    "InitiatingUserAADObjectId": "{C600136F-6814-41D9-8642-40CA0EC4EDD4}", "LegalEntity": "0031",
    "MajorVersion": 0, "MinorVersion": 0, "Name": "Bloomingdale's 0001-NY", "ParentContextRecordSubjects": [],
    "WarehouseId": "3199-DD"}


@dataclass
class Inbox:
    """A plain-HTTP business event endpoint that records every body it receives."""

    bodies: list[bytes] = field(default_factory=list)

    async def receive(self, request: Request) -> Response:
        self.bodies.append(await request.body())
        return Response(status_code=200)


@dataclass
class FnoEnv(Served[FinOpsSimulator]):
    inbox: Inbox


@pytest.fixture(scope="module")
def fno_env(sandbox_ca: SandboxCA) -> Iterator[FnoEnv]:
    sim = FinOpsSimulator(event_retry_delay=0.01)
    seed_fno(sim, customers=CUSTOMERS, products=8)
    inbox = Inbox()
    with closing(sim), serve(sim.app, sandbox_ca) as server, endpoint("/events", inbox.receive) as events:
        sim.register_business_event_endpoint(events)
        yield FnoEnv(sim, server, sandbox_ca, inbox)


@pytest.fixture
def fno_sim(fno_env: FnoEnv) -> FinOpsSimulator:
    sim = fno_env.sim
    sim.faults.clear()
    sim.throttling.limit = None
    sim.page_size = 10000
    sim.requests.clear()
    return sim


@dataclass
class Factory:
    env: FnoEnv
    http: httpx.AsyncClient
    recorder: Recorder
    providers: list[AzureIdentityTokenProvider] = field(default_factory=list)

    def client(self, **kwargs: Any) -> FinOpsClient:
        sim = self.env.sim
        provider = client_secret_token_provider(
            sim.tenant_id, sim.client_id, sim.client_secret, f"{self.env.url}/.default",
            authority_host=self.env.url, ca_bundle=str(self.env.ca.ca_path))
        self.providers.append(provider)
        kwargs.setdefault("policy", RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02))
        return FinOpsClient(self.env.url, self.http, provider, sleep=self.recorder.sleep, **kwargs)


@pytest.fixture
async def fno_http(fno_env: FnoEnv) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=tls_context(fno_env.ca), timeout=5.0) as http:
        yield http


@pytest.fixture
def factory(fno_env: FnoEnv, fno_http: httpx.AsyncClient, fno_sim: FinOpsSimulator) -> Iterator[Factory]:
    made = Factory(fno_env, fno_http, Recorder())
    yield made
    for provider in made.providers:
        provider.close()


@pytest.fixture
def fno(factory: Factory) -> FinOpsClient:
    return factory.client()


def customer_op(op_id: str, key: str, **values: Any) -> WriteOp:
    base = {"OrganizationName": f"Syncline {key}", "CustomerGroupId": "10", "SalesCurrencyCode": "USD"}
    return WriteOp(op_id, "upsert", "CustomersV3", key=key, values={**base, **values})


async def raw_get(env: FnoEnv, http: httpx.AsyncClient, fno: FinOpsClient, path: str) -> httpx.Response:
    token = await fno._tokens.get_token()
    return await http.get(f"{env.url}/data/{path}", headers={"Authorization": f"Bearer {token}"})


# ============================================================================================ pure


def test_key_format_is_reversible_and_key_urls_are_escaped() -> None:
    key = format_key("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "A|B\\C"})
    assert key == "usmf|A\\|B\\\\C"
    assert parse_key("CustomersV3", key) == {"dataAreaId": "usmf", "CustomerAccount": "A|B\\C"}
    assert parse_key("SalesOrderLines", "demf|L000001") == {"dataAreaId": "demf", "InventoryLotId": "L000001"}
    with pytest.raises(RejectedError, match="dataAreaId"):
        parse_key("CustomersV3", "US-001")
    path = key_path("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "O'Neil/#1 & Co"})
    assert path == "CustomersV3(dataAreaId='usmf',CustomerAccount='O''Neil%2F%231%20%26%20Co')"
    with pytest.raises(RejectedError, match="dataAreaId"):
        key_path("CustomersV3", {"CustomerAccount": "US-001"})
    assert set(ENTITY_KEYS) == {"CustomersV3", "ReleasedProductsV2", "SalesOrderHeadersV2", "SalesOrderLines"}


def test_filter_literals() -> None:
    assert filter_literal("O'Neil & Sons' or 1 eq 1") == "'O''Neil & Sons'' or 1 eq 1'"
    assert filter_literal(True) == "Microsoft.Dynamics.DataEntities.NoYes'Yes'"
    enum = filter_literal(FinOpsEnum("SalesStatus", "Backorder"))
    assert enum == "Microsoft.Dynamics.DataEntities.SalesStatus'Backorder'"
    assert filter_literal(42) == "42"
    with pytest.raises(RejectedError):
        filter_literal(FinOpsEnum("NoYes", "Yes' or 1 eq 1"))
    assert FinOpsClient.build_filter({"dataAreaId": "usmf"}, {"CustomerGroupId": ["10", "2'0"]}) == \
        "dataAreaId eq 'usmf' and (CustomerGroupId ne '10' and CustomerGroupId ne '2''0')"


def test_parse_business_event_reference_payload_and_array() -> None:
    event = parse_business_event(json.dumps(HEXALITH_EVENT).encode())
    assert event.control_number == 5637985363
    assert event.entity_set == "CustomersV3"
    assert event.key == {"dataAreaId": "0031", "CustomerAccount": "6043"}
    assert event.record_key == "0031|6043"
    assert int(event.event_time.timestamp() * 1000) == 1697470966000
    assert event.fields == {"Account": "6043", "Name": "Bloomingdale's 0001-NY", "WarehouseId": "3199-DD"}
    second = {**HEXALITH_EVENT, "ControlNumber": 5637985370, "Account": "6044"}
    events = parse_business_events([HEXALITH_EVENT, second])
    assert [e.record_key for e in events] == ["0031|6043", "0031|6044"]


@pytest.mark.parametrize(("change", "problem"), [
    ({"BusinessEventId": "SomethingElseBusinessEvent"}, "unknown BusinessEventId"),
    ({"ControlNumber": "12"}, "ControlNumber"),
    ({"Account": ""}, "Account"),
    ({"EventTime": "yesterday", "EventTimeIso8601": "no"}, "EventTime"),
    ({"LegalEntity": None, "BusinessEventLegalEntity": None}, "LegalEntity"),
])
def test_parse_business_event_rejects_malformed(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem):
        parse_business_event({**HEXALITH_EVENT, **change})
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        parse_business_event(b"{nope")


# ============================================================================================ over TLS


async def test_token_via_azure_identity_and_keys_always_fully_specified(
        fno: FinOpsClient, fno_env: FnoEnv, fno_http: httpx.AsyncClient, fno_sim: FinOpsSimulator) -> None:
    assert isinstance(fno, RecordSink)
    assert isinstance(fno, ChangeSource)
    found = await fno.fetch("CustomersV3", ["usmf|US-001", "demf|DE-002", "usmf|NOPE"])
    assert set(found) == {"usmf|US-001", "demf|DE-002"}
    assert found["demf|DE-002"].values["SalesCurrencyCode"] == "EUR"
    assert found["usmf|US-001"].version
    assert found["usmf|US-001"].modified is not None
    results = await fno.write([customer_op("k1", "usmf|SYN-K1"), WriteOp("k2", "delete", "CustomersV3",
                                                                         key="usmf|SYN-K1")])
    assert [r.ok for r in results] == [True, True]
    key_urls = [unquote(p) for _, p in fno_sim.requests if "(" in p]
    assert key_urls
    assert all("dataAreaId=" in p for p in key_urls)
    refused = await raw_get(fno_env, fno_http, fno, "CustomersV3(CustomerAccount='US-001')")
    assert refused.status_code == 400
    assert "dataAreaId" in refused.json()["error"]["message"]


async def test_cross_company_reads_and_paging_across_next_links(
        fno: FinOpsClient, fno_env: FnoEnv, fno_http: httpx.AsyncClient, fno_sim: FinOpsSimulator) -> None:
    fno_sim.page_size = 5
    pages = [page async for page in fno.scan("CustomersV3")]
    records = [r for page in pages for r in page]
    assert {r.values["dataAreaId"] for r in records} == {"usmf", "demf"}
    assert len({r.key for r in records}) == len(records) >= 2 * (CUSTOMERS + 1)
    assert len(pages) == -(-len(records) // 5)
    assert sum("$skip=" in unquote(p) for _, p in fno_sim.requests) == len(pages) - 1
    assert all("cross-company=true" in p for _, p in fno_sim.requests)
    demf = await fno.select("CustomersV3", equals={"dataAreaId": "demf", "CustomerGroupId": "10"})
    assert demf
    assert {r.values["dataAreaId"] for r in demf} == {"demf"}
    default_only = await raw_get(fno_env, fno_http, fno, "CustomersV3?$top=500")
    assert {row["dataAreaId"] for row in default_only.json()["value"]} == {"usmf"}


async def test_extension_not_deployed_fails_the_write_naming_the_property(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    """Without Syncline's F&O extension the real /data refuses SynclineSalesforceId (400, ODataLib's "does not exist
    on type"): the op fails alone, permanently, with a message that names the property, and nothing is written."""
    fno_sim.extensions = False
    try:
        results = await fno.write([customer_op("x1", "usmf|SYN-NOEXT", SynclineSalesforceId="001000000000009AAA")])
    finally:
        fno_sim.extensions = True
    assert not results[0].ok
    assert isinstance(results[0].error, RejectedError)
    assert "The property 'SynclineSalesforceId' does not exist on type" in results[0].error.detail
    assert fno_sim.get("CustomersV3", "usmf", "SYN-NOEXT") is None


async def test_create_then_replay_patches_no_duplicate(fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    first = await fno.write([customer_op("c1", "demf|SYN-100", CreditLimit=1000.0)])
    assert first[0].ok
    assert first[0].created
    assert first[0].key == "demf|SYN-100"
    replay = await fno.write([customer_op("c1", "demf|SYN-100", CreditLimit=2500.0)])
    assert replay[0].ok
    assert not replay[0].created
    rows = [r for r in fno_sim.all("CustomersV3") if r["CustomerAccount"] == "SYN-100"]
    assert len(rows) == 1
    assert rows[0]["CreditLimit"] == 2500.0
    assert rows[0]["dataAreaId"] == "demf"
    assert ("PATCH" in {m for m, p in fno_sim.requests if "SYN-100" in p})
    match = {"dataAreaId": "usmf", "PrimaryContactEmail": "x@syn.example"}
    by_match = WriteOp("m1", "upsert", "CustomersV3", match=match,
                       values={"CustomerAccount": "SYN-M1", "OrganizationName": "Match Co", "CustomerGroupId": "20"})
    made = await fno.write([by_match])
    again = await fno.write([by_match])
    assert made[0].created
    assert made[0].key == "usmf|SYN-M1"
    assert again[0].key == "usmf|SYN-M1"
    assert not again[0].created
    assert sum(r["CustomerAccount"] == "SYN-M1" for r in fno_sim.all("CustomersV3")) == 1
    gone = await fno.write([WriteOp("d1", "delete", "CustomersV3", key="demf|SYN-100")] * 1)
    gone_again = await fno.write([WriteOp("d2", "delete", "CustomersV3", key="demf|SYN-100")])
    assert gone[0].ok
    assert gone_again[0].ok
    assert fno_sim.get("CustomersV3", "demf", "SYN-100") is None
    missing = await fno.write([WriteOp("u1", "update", "CustomersV3", key="usmf|NOPE-1", values={"CreditLimit": 1})])
    assert not missing[0].ok
    assert isinstance(missing[0].error, RejectedError)


async def test_validation_failure_is_rejected_with_infolog_and_fails_only_its_op(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    before = fno_sim.request_counts["api"]
    results = await fno.write([customer_op("v1", "usmf|SYN-V1"),
                               customer_op("v2", "usmf|SYN-V2", CustomerGroupId="Local"),
                               customer_op("v3", "usmf|SYN-V3")])
    assert [r.ok for r in results] == [True, False, True]
    error = results[1].error
    assert isinstance(error, RejectedError)
    assert error.reason == "TARGET_REJECTED"
    infolog = "The value 'Local' in field 'Customer group' is not found in the related table 'Customer groups'"
    assert infolog in error.detail
    assert fno_sim.get("CustomersV3", "usmf", "SYN-V2") is None
    # the 500 validation failure was not retried: GET + POST for each op, nothing more
    assert fno_sim.request_counts["api"] - before == 6


async def test_throttling_honours_retry_after_with_injected_sleep(
        factory: Factory, fno_env: FnoEnv, fno_http: httpx.AsyncClient, fno_sim: FinOpsSimulator) -> None:
    fno = factory.client()
    fno_sim.clock = factory.recorder.clock
    try:
        await fno.fetch("CustomersV3", ["usmf|US-001"])  # token first
        fno_sim.throttling.window_seconds = 7
        fno_sim.throttling.limit = 2
        records = {}
        for key in ("usmf|US-001", "usmf|US-002", "usmf|US-003"):  # three requests: past the limit of 2
            records |= await fno.fetch("CustomersV3", [key])
        assert len(records) == 3
        assert 7.0 in factory.recorder.delays
        assert fno_sim.request_counts["429"] >= 1
        limited = await raw_get(fno_env, fno_http, fno, "CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')")
        limited = limited if limited.status_code == 429 else await raw_get(
            fno_env, fno_http, fno, "CustomersV3(dataAreaId='usmf',CustomerAccount='US-001')")
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "7"
        assert limited.json()["error"]["message"] == \
            "Number of requests exeeded the limit of 2 over the time window of 7 seconds."
        fno_sim.throttling.window_seconds = 300
        with pytest.raises(ThrottledError) as caught:
            await fno.fetch("CustomersV3", ["usmf|US-004"])
        assert caught.value.retry_after is not None
        assert caught.value.retry_after > 30
    finally:
        fno_sim.throttling.limit = None
        fno_sim.throttling.window_seconds = 300
        import time

        fno_sim.clock = time.monotonic


async def test_token_refresh_on_401_then_auth_error(fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    await fno.fetch("CustomersV3", ["usmf|US-001"])
    fno_sim.faults.expire_tokens()
    before = fno_sim.request_counts["401"]
    found = await fno.fetch("CustomersV3", ["usmf|US-002"])
    assert "usmf|US-002" in found
    assert fno_sim.request_counts["401"] == before + 1
    fno_sim.faults.fail_next(2, 401)
    with pytest.raises(AuthError, match="even after a token refresh"):
        await fno.fetch("CustomersV3", ["usmf|US-003"])
    fno_sim.faults.fail_next(5, 503)
    with pytest.raises(TransientError):
        await fno.select("CustomersV3", equals={"CustomerAccount": "US-001"})


async def test_filter_escaping_cannot_inject(fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    nasty = "O'Neil & Sons' or 1 eq 1"
    assert await fno.select("CustomersV3", equals={"OrganizationName": nasty}) == []
    fno_sim.insert("CustomersV3", {"dataAreaId": "demf", "CustomerAccount": "SYN-ONEIL", "OrganizationName": nasty,
                                   "CustomerGroupId": "10", "IsCustomerOnHold": "No"})
    found = await fno.select("CustomersV3", equals={"OrganizationName": nasty})
    assert [r.key for r in found] == ["demf|SYN-ONEIL"]
    on_hold = await fno.select("CustomersV3", equals={"IsCustomerOnHold": True})
    assert {r.key for r in on_hold} == {"usmf|US-BAD1", "demf|DE-BAD1"}
    assert {r.values["SalesCurrencyCode"] for r in on_hold} == {UNMAPPED_CURRENCY}
    fetched = await fno.fetch("CustomersV3", ["demf|SYN-ONEIL"])
    assert fetched["demf|SYN-ONEIL"].values["OrganizationName"] == nasty


async def test_changes_since_poll_and_scan_compare(fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    fno_sim.page_size = 7
    batches = [b async for b in fno.changes_since("CustomersV3", None)]
    fno_sim.page_size = 10000
    checkpoint = batches[-1][1]
    assert len(batches) > 1
    assert [cp for _, cp in batches[:-1]] == [""] * (len(batches) - 1)  # a crash mid-read replays, never skips
    assert sum(len(b[0]) for b in batches) >= 2 * CUSTOMERS
    fno_sim.apply_change("CustomersV3", ("demf", "DE-003"), {"CreditLimit": 123.0})
    again = [b async for b in fno.changes_since("CustomersV3", checkpoint)]
    assert [r.key for b in again for r in b[0]] == ["demf|DE-003"]
    assert again[-1][1] > checkpoint
    assert [r for b in [x async for x in fno.changes_since("CustomersV3", again[-1][1])] for r in b[0]] == []
    [(first, scan_cp)] = [b async for b in fno.changes_since("ReleasedProductsV2", None)]
    assert len(first) == 2 * 9
    fno_sim.apply_change("ReleasedProductsV2", ("usmf", "P-1002"), {"SalesPrice": 1.5})
    fno_sim._tables["ReleasedProductsV2"].pop(("demf", "p-1003"))
    [(delta, _)] = [b async for b in fno.changes_since("ReleasedProductsV2", scan_cp)]
    assert {(r.key, r.deleted) for r in delta} == {("usmf|P-1002", False), ("demf|P-1003", True)}


async def test_business_events_carry_control_numbers_and_fetch_the_record(
        fno: FinOpsClient, fno_env: FnoEnv, fno_sim: FinOpsSimulator) -> None:
    await fno_sim.flush_events()
    fno_env.inbox.bodies.clear()
    result = await fno.write([customer_op("e1", "usmf|US-004", OrganizationName="Renamed Works 004")])
    assert result[0].ok
    await fno_sim.flush_events()
    fno_sim.deliver_duplicate_last_event()
    fno_sim.apply_change("SalesOrderHeadersV2", ("demf", "DESO-00001"), {"SalesOrderStatus": "Delivered"})
    await fno_sim.flush_events()
    events = [parse_business_event(body) for body in fno_env.inbox.bodies]
    assert [e.business_event_id for e in events][:2] == [CUSTOMER_EVENT, CUSTOMER_EVENT]
    assert events[0].control_number == events[1].control_number
    assert events[0].event_id == events[1].event_id
    assert events[2].control_number > events[0].control_number
    assert events[2].entity_set == "SalesOrderHeadersV2"
    assert events[2].record_key == "demf|DESO-00001"
    record = await fno.read_event_record(events[0])
    assert record.key == "usmf|US-004"
    assert record.values["OrganizationName"] == "Renamed Works 004"
    order = await fno.read_event_record(events[2])
    assert order.values["SalesOrderStatus"] == "Delivered"


# ============================================================================================ wire-level (mock)


class StaticToken:
    def __init__(self) -> None:
        self.refreshes = 0

    async def get_token(self, *, force_refresh: bool = False) -> str:
        self.refreshes += force_refresh
        return "static-token"


def mock_client(handler: Any, recorder: Recorder | None = None) -> tuple[FinOpsClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)  # type: ignore[no-any-return]

    http = httpx.AsyncClient(transport=httpx.MockTransport(record))
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.0, max_backoff=0.0)
    client = FinOpsClient("https://contoso.operations.dynamics.com", http, StaticToken(), policy=policy,
                          sleep=(recorder or Recorder()).sleep)
    return client, seen


async def test_next_link_is_rebased_onto_the_environment_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if "skip" not in str(request.url):
            return httpx.Response(200, json={"value": [{"dataAreaId": "usmf", "CustomerAccount": "A"}],
                                             "@odata.nextLink": "https://evil.example/data/CustomersV3?"
                                                                "cross-company=true&%24skip=1"})
        return httpx.Response(200, json={"value": [{"dataAreaId": "demf", "CustomerAccount": "B"}]})

    client, seen = mock_client(handler)
    pages = [p async for p in client.scan("CustomersV3")]
    assert [r.key for p in pages for r in p] == ["usmf|A", "demf|B"]
    assert {r.url.host for r in seen} == {"contoso.operations.dynamics.com"}
    assert all(r.headers["Authorization"] == "Bearer static-token" for r in seen)


async def test_write_500_without_write_exception_is_transient_and_timeouts_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404, json={"error": {"code": "", "message": "Resource not found"}})
        return httpx.Response(500, json={"error": {"code": "", "message": "An error has occurred.",
                                                   "innererror": {"type": "System.Data.SqlClient.SqlException",
                                                                  "message": "deadlock victim"}}})

    client, seen = mock_client(handler)
    [result] = await client.write([customer_op("t1", "usmf|T-1")])
    assert not result.ok
    assert isinstance(result.error, TransientError)
    assert "deadlock" in result.error.detail
    assert [r.method for r in seen] == ["GET", "POST"]

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    slow, _ = mock_client(timeout)
    with pytest.raises(TransientError, match="timed out"):
        await slow.fetch("CustomersV3", ["usmf|US-001"])


async def test_create_race_already_exists_falls_back_to_patch() -> None:
    state = {"exists": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            if state["exists"]:
                return httpx.Response(200, json={"dataAreaId": "usmf", "CustomerAccount": "R-1"})
            return httpx.Response(404, json={"error": {"code": "", "message": "not found"}})
        if request.method == "POST":
            state["exists"] = True  # somebody else created it in between
            return httpx.Response(500, json={"error": {"code": "", "message": "An error has occurred.", "innererror": {
                "type": "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException",
                "message": "Cannot create a record in Customers. The record already exists."}}})
        return httpx.Response(204)

    client, seen = mock_client(handler)
    [result] = await client.write([customer_op("r1", "usmf|R-1")])
    assert result.ok
    assert not result.created
    assert result.key == "usmf|R-1"
    assert [r.method for r in seen] == ["GET", "POST", "GET", "PATCH"]
    assert seen[-1].headers["If-Match"] == "*"


def test_simulator_filter_parser_is_a_real_parser() -> None:
    fields = ["Name", "Qty", "When", "OnHold"]
    row = {"Name": "O'Neil", "Qty": 5, "When": "2026-01-02T03:04:05.123Z", "OnHold": "Yes"}

    def check(text: str) -> bool:
        return evaluate(FilterParser(text, fields, "T").parse(), row)

    assert check("Name eq 'o''neil'")
    assert check("not (Qty lt 5) and (Qty le 5 or Name eq 'x')")
    assert not check("not (Qty ge 5)")
    assert check("When gt 2026-01-02T03:04:05Z and When lt 2026-01-02T03:04:05.200Z")
    assert check("OnHold eq Microsoft.Dynamics.DataEntities.NoYes'Yes'")
    assert check("Name eq 'O*'")
    for bad in ("Name eq", "Qty eq 1)", "__import__('os') eq 1", "Nope eq 1", "Name eq 'unterminated"):
        with pytest.raises(ODataError) as caught:
            check(bad)
        assert caught.value.status == 400


async def test_fetch_reads_25_keys_of_one_legal_entity_per_request_and_escapes_them(
        fno: FinOpsClient, fno_sim: FinOpsSimulator) -> None:
    # A reconciliation page of 60 customers in two legal entities: 3 + 1 filtered reads, not 60 key reads.
    for i in range(50):
        fno_sim.insert("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": f"BATCH-{i:03d}",
                                       "OrganizationName": f"Batch {i}", "CustomerGroupId": "10",
                                       "SalesCurrencyCode": "USD"})
    fno_sim.insert("CustomersV3", {"dataAreaId": "usmf", "CustomerAccount": "O'BRIEN", "OrganizationName": "O'Brien",
                                   "CustomerGroupId": "10", "SalesCurrencyCode": "USD"})
    keys = ([f"usmf|BATCH-{i:03d}" for i in range(50)] + ["usmf|O'BRIEN", "usmf|NOPE-404"]
            + [f"demf|DE-{i:03d}" for i in range(1, 9)])
    singly = {}
    for key in keys:
        singly |= await fno.fetch("CustomersV3", [key])
    before = fno_sim.request_counts["api"]
    together = await fno.fetch("CustomersV3", keys)
    assert fno_sim.request_counts["api"] - before == 4  # usmf: 52 keys, 25 a read (3); demf: 8 keys (1)
    assert together.keys() == singly.keys()
    assert "usmf|O'BRIEN" in together  # the quote escaped in the $filter, not a broken query
    assert "usmf|NOPE-404" not in together
    assert sum(k.startswith("demf|") for k in together) == 8
    assert {k: r.values for k, r in together.items()} == {k: r.values for k, r in singly.items()}
