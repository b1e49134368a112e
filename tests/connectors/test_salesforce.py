"""SalesforceClient (simple-salesforce) against the Salesforce simulator over real TLS loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import requests

from sandbox.salesforce import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DROP,
    SalesforceSimulator,
    parse_soql,
    seed_salesforce,
)
from sandbox.server import RunningServer
from sandbox.server import TestCA as SandboxCA
from shared.connectors._http import RetryPolicy
from shared.connectors.salesforce import SalesforceClient, parse_cdc_event, soql_quote
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    EnvelopeError,
    RejectedError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import ChangeSource, RecordSink, WriteOp
from tests.served import Served, serve

EXT = "Dynamics_Account__c"


@dataclass
class SalesforceEnv(Served[SalesforceSimulator]):
    api_server: RunningServer


@pytest.fixture(scope="module")
def sf_env(sandbox_ca: SandboxCA) -> Iterator[SalesforceEnv]:
    sim = SalesforceSimulator()
    with serve(sim.app, sandbox_ca) as server, serve(sim.app, sandbox_ca) as api_server:
        # `server` is "My Domain" (the token endpoint), `api_server` the instance the token response points to
        yield SalesforceEnv(sim, server, sandbox_ca, api_server)


@pytest.fixture
def sim(sf_env: SalesforceEnv) -> SalesforceSimulator:
    sf_env.sim.reset()
    sf_env.sim.reset_allocation()
    sf_env.sim.limits.daily_max = 100_000
    sf_env.sim.instance_url = sf_env.api_server.url
    return sf_env.sim


def make_session(env: SalesforceEnv) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise override verify
    session.verify = str(env.ca.ca_path)
    return session


@pytest.fixture
def client(sf_env: SalesforceEnv, sim: SalesforceSimulator) -> Iterator[SalesforceClient]:
    session = make_session(sf_env)
    yield SalesforceClient(sf_env.server.url, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, session=session,
                           bulk_poll_interval=0.01)
    session.close()


def account_op(i: int, **values: object) -> WriteOp:
    return WriteOp(op_id=f"op-{i}", action="upsert", table="Account", match={EXT: f"D365-{i:05d}"},
                   values={"Name": f"Customer {i}", "BillingCity": "Lyon", **values})


def paths(sim: SalesforceSimulator, method: str, prefix: str) -> list[str]:
    return [p for m, p, _ in sim.requests if m == method and p.startswith(prefix)]


# ----------------------------------------------------------------------------------------- auth


async def test_token_from_my_domain_and_api_calls_on_instance_url(
        client: SalesforceClient, sim: SalesforceSimulator, sf_env: SalesforceEnv) -> None:
    assert isinstance(client, RecordSink)
    assert isinstance(client, ChangeSource)
    results = await client.write([account_op(1)])
    assert results[0].ok
    assert results[0].created
    assert client.token_fetches == 1
    assert client.instance_url == sf_env.api_server.url != sf_env.server.url
    hosts = {headers["host"] for _, _, headers in sim.requests}
    assert hosts == {f"127.0.0.1:{sf_env.api_server.port}"}
    options = {headers.get("sforce-call-options") for _, _, headers in sim.requests}
    assert options == {"client=syncline"}


async def test_expired_session_reauthenticates_once_and_replays(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    await client.write([account_op(1)])
    sim.faults.expire_tokens()
    results = await client.write([account_op(2)])
    assert results[0].ok
    assert results[0].created
    assert client.token_fetches == 2
    assert sim.count("Account") == 2


async def test_rotated_secret_after_expiry_is_auth_error(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    await client.write([account_op(1)])
    sim.client_secret = "rotated-secret"
    sim.faults.expire_tokens()
    try:
        [refused] = await client.write([account_op(2)])
        assert isinstance(refused.error, AuthError)
        assert "token request refused" in refused.error.detail
    finally:
        sim.client_secret = DEFAULT_CLIENT_SECRET
    assert client.token_fetches == 2
    assert sim.count("Account") == 1


async def test_session_rejected_after_reauth_is_auth_error(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    await client.write([account_op(1)])
    sim.faults.reject_sessions = True
    before = sim.request_count
    [refused] = await client.write([account_op(2)])
    assert isinstance(refused.error, AuthError)
    assert "INVALID_SESSION_ID" in refused.error.detail
    assert client.token_fetches == 2
    assert sim.request_count == before + 3  # call, token, replay: re-authenticated once only


async def test_bad_secret_is_auth_error(sf_env: SalesforceEnv, sim: SalesforceSimulator) -> None:
    bad = SalesforceClient(sf_env.server.url, DEFAULT_CLIENT_ID, "wrong", session=make_session(sf_env))
    [refused] = await bad.write([account_op(1)])
    assert isinstance(refused.error, AuthError)
    assert "invalid_client" in refused.error.detail
    assert sim.count("Account") == 0


# ----------------------------------------------------------------------------------------- writes


async def test_collections_upsert_chunks_and_per_record_failures(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    ops = [account_op(i, AnnualRevenue=Decimal("1250000.50")) for i in range(450)]
    ops[7] = account_op(7, Name="")  # required field missing
    ops[301] = account_op(301, Bogus__c="x")  # unknown field
    results = await client.write(ops)
    assert len(paths(sim, "PATCH", f"composite/sobjects/Account/{EXT}")) == 3
    assert [r.op_id for r in results] == [op.op_id for op in ops]
    failed = {r.op_id: r.error for r in results if not r.ok}
    assert set(failed) == {"op-7", "op-301"}
    assert isinstance(failed["op-7"], RejectedError)
    assert failed["op-7"].reason == "REQUIRED_FIELD_MISSING"
    assert "REQUIRED_FIELD_MISSING" in str(failed["op-7"])
    assert "D365-00007" in str(failed["op-7"])
    assert isinstance(failed["op-301"], RejectedError)
    assert "INVALID_FIELD" in str(failed["op-301"])
    assert all(r.created and r.key and len(r.key) == 18 for r in results if r.ok)
    assert sim.count("Account") == 448
    assert (sim.get("Account", results[0].key or "") or {})["AnnualRevenue"] == 1250000.5

    again = await client.write([account_op(i) for i in range(10) if i != 7])
    assert all(r.ok and not r.created for r in again)
    assert [r.key for r in again] == [r.key for r in results[:10] if r.op_id != "op-7"]
    assert sim.count("Account") == 448
    assert (sim.get("Account", results[0].key or "") or {})["AnnualRevenue"] == 1250000.5


async def test_bulk_api_above_threshold(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    ops = [account_op(i, NumberOfEmployees=i, AnnualRevenue=None) for i in range(2500)]
    ops[1234] = account_op(1234, Name="")
    results = await client.write(ops)
    assert not paths(sim, "PATCH", "composite/")
    assert len(paths(sim, "POST", "jobs/ingest")) == 1
    assert len(paths(sim, "PUT", "jobs/ingest/")) == 1
    assert len(paths(sim, "GET", "jobs/ingest/")) >= 2 + 2  # polls until JobComplete, then both result CSVs
    failed = [r for r in results if not r.ok]
    assert [r.op_id for r in failed] == ["op-1234"]
    assert "REQUIRED_FIELD_MISSING" in str(failed[0].error)
    assert sum(1 for r in results if r.ok and r.created) == 2499
    record = sim.get("Account", results[42].key or "")
    assert record is not None
    assert record["NumberOfEmployees"] == 42
    assert record[EXT] == "D365-00042"
    assert sim.count("Account") == 2499


async def test_update_by_id_and_delete(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    created = await client.write([account_op(1), account_op(2)])
    key1, key2 = created[0].key, created[1].key
    assert key1
    assert key2
    results = await client.write([
        WriteOp(op_id="u", action="update", table="Account", key=key1, values={"BillingCity": "Porto"}),
        WriteOp(op_id="d", action="delete", table="Account", key=key2),
        WriteOp(op_id="bad", action="delete", table="Account", key="001000000000000AAA"),
    ])
    assert [r.ok for r in results] == [True, True, False]
    assert (sim.get("Account", key1) or {})["BillingCity"] == "Porto"
    assert sim.get("Account", key2) is None
    fetched = await client.fetch("Account", [key1, key2])
    assert set(fetched) == {key1}
    assert fetched[key1].values["BillingCity"] == "Porto"
    assert "attributes" not in fetched[key1].values
    assert fetched[key1].modified is not None


async def test_request_limit_exceeded_is_throttled_and_not_retried(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    await client.write([account_op(1)])
    sim.limits.daily_max = sim.limits.used
    before = sim.request_count
    results = await client.write([account_op(2), account_op(3)])
    for result in results:
        error = result.error
        assert isinstance(error, ThrottledError)
        assert error.reason == "THROTTLED"
        assert "queued" in error.detail
        assert error.retry_after is not None
        assert 0 < error.retry_after <= 86400
    assert sim.request_count == before + 1
    assert sim.count("Account") == 1
    sim.reset_allocation()
    assert (await client.write([account_op(2)]))[0].ok


async def test_limit_info_header_is_parsed(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    sim.limits.daily_max = 15000
    await client.write([account_op(1)])
    await client.select("Account", equals={EXT: "D365-00001"})
    assert client.api_usage == (sim.limits.used, 15000)
    assert sim.limits.used == 3  # upsert, describe, query


# ----------------------------------------------------------------------------------------- SOQL


def test_soql_quote_escapes() -> None:
    assert soql_quote("x' OR Name != '") == "'x\\' OR Name != \\''"
    assert soql_quote("a\\b\n\t\"c") == "'a\\\\b\\n\\t\\\"c'"
    assert soql_quote(None) == "null"
    assert soql_quote(True) == "true"
    assert soql_quote(3) == "3"
    assert soql_quote(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    # the simulator's parser reads the literal back unchanged
    literal = soql_quote("a\\b'c")
    where = parse_soql("SELECT Id FROM Account WHERE Name = " + literal).where
    assert where is not None
    assert where({"Name": "a\\b'c"})
    assert not where({"Name": "a\\b"})


async def test_select_escapes_values(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    tricky = "x' OR Name != '"
    await client.write([account_op(1, Name=tricky), account_op(2), account_op(3, Name="back\\slash\nline")])
    found = await client.select("Account", equals={"Name": tricky})
    assert [r.values["Name"] for r in found] == [tricky]
    found = await client.select("Account", equals={"Name": "back\\slash\nline"})
    assert [r.values[EXT] for r in found] == ["D365-00003"]
    rest = await client.select("Account", equals={"BillingCity": "Lyon"}, not_in={EXT: ["D365-00001", "x'y"]})
    assert sorted(r.values[EXT] for r in rest) == ["D365-00002", "D365-00003"]
    with pytest.raises(RejectedError, match="not a valid Salesforce API name"):
        await client.select("Account", equals={"Name = 'x' OR Id": "1"})


async def test_select_with_a_list_is_an_escaped_in(
        client: SalesforceClient, sim: SalesforceSimulator, monkeypatch: pytest.MonkeyPatch) -> None:
    tricky = "x' OR Name != '"
    await client.write([account_op(i) for i in range(450)] + [account_op(900, Name=tricky)])
    sent: list[str] = []
    query_pages = client._query_pages

    def spy(soql: str) -> object:
        sent.append(soql)
        return query_pages(soql)

    monkeypatch.setattr(client, "_query_pages", spy)
    found = await client.select("Account", equals={"Name": [tricky, "Customer 3", "nobody"]})
    assert sorted(r.values["Name"] for r in found) == sorted([tricky, "Customer 3"])
    assert sent[-1].endswith(" WHERE Name IN ('x\\' OR Name != \\'', 'Customer 3', 'nobody')")

    before = sim.request_count
    assert await client.select("Account", equals={"Name": []}) == []
    assert await client.select("Account", equals={"BillingCity": "Lyon", EXT: ()}) == []
    assert sim.request_count == before

    # more values than one IN list takes: several queries, results merged once each
    sent.clear()
    keys = [f"D365-{i:05d}" for i in range(450)]
    found = await client.select("Account", equals={EXT: [*keys, *keys[:5]], "BillingCity": "Lyon"},
                                not_in={"Name": [tricky]})
    assert len(sent) == 3
    assert [s.count("'D365-") for s in sent] == [200, 200, 50]
    assert sorted(r.values[EXT] for r in found) == keys

    # null in the list matches records without a value
    sim.ui_change("Account", found[0].key, {"Phone": "+1 412 555 0100"})
    with_phone = await client.select("Account", equals={"Phone": ["+1 412 555 0100", None], EXT: keys[:3]})
    assert sorted(r.values[EXT] for r in with_phone) == keys[:3]
    assert "(Phone IN ('+1 412 555 0100') OR Phone = null)" in sent[-1]
    assert [r.key for r in await client.select("Account", equals={"Phone": ("+1 412 555 0100",)})] == [
        found[0].key]


async def test_scan_pages_through_next_records_url(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    seed_salesforce(sim, accounts=4500, opportunities=0)
    pages = [page async for page in client.scan("Account")]
    assert [len(p) for p in pages] == [2000, 2000, 500]
    assert len({r.key for p in pages for r in p}) == 4500
    more = [p for p in paths(sim, "GET", "query/") if p != "query"]
    assert len(more) == 2
    assert more[0].endswith("-2000")
    assert more[1].endswith("-4000")


async def test_changes_since_polls_system_modstamp(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    made = seed_salesforce(sim, accounts=5, opportunities=2)
    pages = [page async for page in client.changes_since("Account", None)]
    assert sum(len(records) for records, _ in pages) == 5
    assert [r.values["Name"] for r in await client.select("Account", equals={"Name": "O'Brien Machining"})] == [
        "O'Brien Machining"]
    opportunities = [r async for page in client.scan("Opportunity") for r in page]
    assert sorted(r.values["Amount"] is None for r in opportunities) == [False, True]
    checkpoint = pages[-1][1]
    sim.ui_change("Account", made["Account"][2], {"BillingCity": "Gent"})
    later = [page async for page in client.changes_since("Account", checkpoint)]
    assert [[r.key for r in records] for records, _ in later] == [[made["Account"][2]]]
    assert later[0][1] > checkpoint
    assert [page async for page in client.changes_since("Account", later[0][1])] == []


# ----------------------------------------------------------------------------------------- CDC


async def test_cdc_origin_recognises_own_writes(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    result = (await client.write([account_op(1)]))[0]
    assert result.key
    sim.ui_change("Account", result.key, {"BillingCity": "Gent"})
    events = sim.events()
    ours, theirs = parse_cdc_event(events[0]), parse_cdc_event(json.dumps(events[1]))
    assert ours.change_type == "CREATE"
    assert ours.record_ids == [result.key]
    assert ours.entity == "Account"
    assert ours.is_own_write("syncline")
    assert not ours.is_own_write("other")
    assert theirs.change_type == "UPDATE"
    assert "BillingCity" in theirs.changed_fields
    assert not theirs.is_own_write("syncline")
    assert theirs.replay_id is not None
    assert ours.replay_id is not None
    assert theirs.replay_id > ours.replay_id
    assert theirs.commit_timestamp is not None
    assert theirs.transaction_key


def test_parse_cdc_event_cometd_envelope_and_malformed() -> None:
    header = {"entityName": "Account", "recordIds": ["0014H00002LbR7QQAV"], "changeType": "UPDATE",
              "changeOrigin": "com/salesforce/api/rest/63.0;client=syncline", "transactionKey": "t-1",
              "commitTimestamp": 1696444513000, "changedFields": ["Name"]}
    change = parse_cdc_event({"data": {"schema": "s", "payload": {"ChangeEventHeader": header, "Name": "A"},
                                       "event": {"replayId": 18098167}}, "channel": "/data/AccountChangeEvent"})
    assert change.replay_id == 18098167
    assert change.values == {"Name": "A"}
    assert change.is_own_write("syncline")
    assert change.commit_timestamp == datetime(2023, 10, 4, 18, 35, 13, tzinfo=UTC)
    for bad in (b"not json", "[]", {"payload": {}}, {"payload": {"ChangeEventHeader": {"entityName": "A"}}}):
        with pytest.raises(EnvelopeError):
            parse_cdc_event(bad)


async def test_duplicate_external_id_fails_only_that_record(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    first = await client.write([account_op(1), account_op(2)])
    assert first[1].key
    sim.ui_change("Account", first[1].key, {EXT: "D365-00001"})  # a user copies the external id
    results = await client.write([account_op(1), account_op(3)])
    assert [r.ok for r in results] == [False, True]
    assert "DUPLICATE_EXTERNAL_ID" in str(results[0].error)
    assert sim.count("Account") == 3


async def test_cdc_events_delivered_to_registered_webhook(
        client: SalesforceClient, sim: SalesforceSimulator, sf_env: SalesforceEnv) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    received: list[tuple[dict[str, object], str | None]] = []

    async def hook(request: Request) -> Response:
        received.append((await request.json(), request.headers.get("x-relay-key")))
        return Response(status_code=202)

    relay = RunningServer(Starlette(routes=[Route("/cdc", hook, methods=["POST"])])).start()
    try:
        sim.register_cdc_webhook(f"{relay.url}/cdc", {"x-relay-key": "k1"})
        result = (await client.write([account_op(1)]))[0]
        assert result.key
        sim.ui_change("Account", result.key, {"BillingCity": "Gent"})
        assert sim.flush_events() == 2
        assert sim.flush_events() == 0
    finally:
        relay.stop()
    assert [key for _, key in received] == ["k1", "k1"]
    changes = [parse_cdc_event(body) for body, _ in received]
    assert [c.is_own_write("syncline") for c in changes] == [True, False]


# ----------------------------------------------------------------------------------------- retries (issue 13)


@pytest.fixture
def patient(sf_env: SalesforceEnv, sim: SalesforceSimulator) -> Iterator[tuple[SalesforceClient, list[float]]]:
    """A client whose in-call back-off is recorded instead of slept."""
    delays: list[float] = []
    session = make_session(sf_env)
    yield (SalesforceClient(sf_env.server.url, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, session=session,
                            collection_size=1, policy=RetryPolicy(max_attempts=3, initial_backoff=0.01,
                                                                  max_backoff=0.02),
                            blocking_sleep=delays.append), delays)
    session.close()


async def test_a_poll_read_failing_once_is_retried_in_call(client: SalesforceClient, sim: SalesforceSimulator) -> None:
    """Issue 13 defect 2: `SalesforceClient._call` made one attempt per read, so one 503 or reset on a SOQL query
    failed the poll of the table (the default client, default retry policy)."""
    [made] = await client.write([account_op(1)])
    sim.faults.fail_next(1, 503, "query", method="GET")
    assert [r.key async for page, _ in client.changes_since("Account", None) for r in page] == [made.key]
    sim.faults.fail_next(1, DROP, "query", method="GET")
    assert [r.key for r in await client.select("Account", equals={EXT: "D365-00001"})] == [made.key]
    assert len(paths(sim, "GET", "query")) == 4


async def test_a_read_answered_503_then_429_is_retried_honouring_retry_after(
        patient: tuple[SalesforceClient, list[float]], sim: SalesforceSimulator) -> None:
    """Issue 13 defect 2: a Salesforce read made one attempt; a 503 failed the poll."""
    client, delays = patient
    made = await client.write([account_op(1)])
    sim.faults.fail_next(1, 503, "query", method="GET")
    sim.faults.fail_next(1, 429, "query", method="GET", retry_after=2)
    found = await client.select("Account", equals={EXT: "D365-00001"})
    assert [r.key for r in found] == [made[0].key]
    assert len(delays) == 2
    assert delays[1] == 2.0
    assert len(paths(sim, "GET", "query")) == 3
    sim.faults.fail_next(1, DROP, "query", method="GET")
    assert [r.key async for page in client.scan("Account") for r in page] == [made[0].key]
    sim.faults.fail_next(3, 503, "query", method="GET")
    with pytest.raises(TransientError, match="HTTP 503"):
        await client.select("Account", equals={EXT: "D365-00001"})


async def test_an_upsert_whose_answer_is_lost_is_replayed_safely(
        patient: tuple[SalesforceClient, list[float]], sim: SalesforceSimulator) -> None:
    client, _ = patient
    sim.faults.fail_next(1, DROP, f"composite/sobjects/Account/{EXT}", method="PATCH", after_apply=True)
    sim.faults.fail_next(1, 504, f"composite/sobjects/Account/{EXT}", method="PATCH", after_apply=True)
    [result] = await client.write([account_op(5)])
    assert result.ok, result.error
    assert len(sim.find("Account", **{EXT: "D365-00005"})) == 1
    assert len(paths(sim, "PATCH", f"composite/sobjects/Account/{EXT}")) == 3


@pytest.mark.parametrize("status", [504, DROP], ids=["gateway-504", "connection-dropped"])
async def test_a_plain_create_whose_answer_is_lost_is_never_resent(
        client: SalesforceClient, sim: SalesforceSimulator, status: int) -> None:
    sim.faults.fail_next(1, status, "composite/sobjects", method="POST", after_apply=True)
    [result] = await client.write([WriteOp("c1", "upsert", "Account", values={"Name": "Lost answer"})])
    assert isinstance(result.error, AmbiguousWriteError)
    assert len(sim.find("Account", Name="Lost answer")) == 1
    assert len(paths(sim, "POST", "composite/sobjects")) == 1
    sim.faults.fail_next(1, 503, "composite/sobjects", method="POST")  # refused unprocessed: resent
    [retried] = await client.write([WriteOp("c2", "upsert", "Account", values={"Name": "Refused first"})])
    assert retried.ok, retried.error
    assert len(sim.find("Account", Name="Refused first")) == 1


async def test_an_auth_failure_keeps_the_written_records_and_leaves_the_rest_unattempted(
        client: SalesforceClient, sim: SalesforceSimulator) -> None:
    """Issue 13 defect 9 (Salesforce side): an auth failure in one call used to discard the results of the calls
    already made (the whole write raised); now they stand and the later calls are not attempted."""
    [seed] = await client.write([account_op(0)])
    assert seed.key is not None
    ops = [account_op(1),
           WriteOp("op-contact", "upsert", "Contact", match={"Dynamics_Contact__c": "D365-C-1"},
                   values={"LastName": "Refused"}),
           WriteOp("op-update", "update", "Account", key=seed.key, values={"BillingCity": "Never"})]
    sim.faults.fail_next(2, 401, "composite/sobjects/Contact")  # rejected, re-authenticated, rejected again
    written, refused, untried = await client.write(ops)
    assert written.ok, written.error
    assert isinstance(refused.error, AuthError)
    assert isinstance(untried.error, AuthError)
    assert untried.error.retriable
    assert "(op op-update) was not attempted" in untried.error.detail
    assert len(sim.find("Account", **{EXT: "D365-00001"})) == 1
    assert (sim.get("Account", seed.key) or {})["BillingCity"] == "Lyon"
