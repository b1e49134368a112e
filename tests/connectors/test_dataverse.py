"""DataverseClient against the Dataverse simulator over real TLS loopback (MSAL token, $batch, paging, faults)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

from sandbox.dataverse import UNMAPPED_SIGN_TYPE, DataverseSimulator, ServiceProtection, dot_schema, seed_dataverse
from sandbox.server import TestCA as SandboxCA
from shared.connectors._http import RetryPolicy
from shared.connectors.dataverse import (
    ANNOTATION_MARKER,
    AzureIdentityTokenProvider,
    DataverseClient,
    client_secret_token_provider,
)
from shared.core.errors import AmbiguousWriteError, AuthError, RejectedError, ThrottledError, TransientError
from shared.core.ports import Attachment, Bind, ChangeSource, RecordSink, WriteOp
from tests.served import Receiver, Recorder, Served, endpoint, serve, tls_context

FLOWS = Path(__file__).resolve().parents[2] / "flows" / "dot-signs.yaml"
SIGN = {"dot_mutcdcode": "R1-1", "dot_signtype": 100000000}


@dataclass
class DataverseEnv(Served[DataverseSimulator]):
    @property
    def scope(self) -> str:
        return f"{self.server.url}/.default"


@contextmanager
def served_dataverse(ca: SandboxCA) -> Iterator[DataverseEnv]:
    """A fresh Dataverse simulator over TLS until the block ends (each module gets its own)."""
    sim = DataverseSimulator()
    with closing(sim), serve(sim.app, ca) as server:
        yield DataverseEnv(sim, server, ca)


@contextmanager
def dataverse_with_hooks(ca: SandboxCA) -> Iterator[tuple[DataverseEnv, Receiver, str]]:
    """A Dataverse simulator over TLS and a webhook receiver on loopback: (env, receiver, the receiver's URL)."""
    receiver = Receiver()
    with served_dataverse(ca) as env, endpoint("/hook", receiver.endpoint) as url:
        yield env, receiver, url


@pytest.fixture(scope="module")
def dataverse_env(sandbox_ca: SandboxCA) -> Iterator[DataverseEnv]:
    with served_dataverse(sandbox_ca) as env:
        yield env


@pytest.fixture
def dataverse_sim(dataverse_env: DataverseEnv) -> DataverseSimulator:
    dataverse_env.sim.reset()
    dataverse_env.sim.clock = time.monotonic
    return dataverse_env.sim


@dataclass
class Wire:
    """Requests seen by the client's transport (method, url, body)."""

    requests: list[httpx.Request] = field(default_factory=list)

    async def hook(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def urls(self, contains: str = "") -> list[str]:
        return [str(r.url) for r in self.requests if contains in str(r.url)]


@pytest.fixture
def dataverse_wire() -> Wire:
    return Wire()


@pytest.fixture
async def dataverse_http(dataverse_env: DataverseEnv, dataverse_wire: Wire) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=tls_context(dataverse_env.ca), timeout=5.0,
                                 event_hooks={"request": [dataverse_wire.hook]}) as http:
        yield http


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@dataclass
class Factory:
    """Builds token providers and clients for one test; closes the providers' sessions afterwards."""

    env: DataverseEnv
    http: httpx.AsyncClient
    recorder: Recorder
    providers: list[AzureIdentityTokenProvider] = field(default_factory=list)

    def provider(self, secret: str | None = None, scope: str | None = None) -> AzureIdentityTokenProvider:
        sim = self.env.sim
        provider = client_secret_token_provider(
            sim.tenant_id, sim.client_id, sim.client_secret if secret is None else secret, scope or self.env.scope,
            authority_host=self.env.url, ca_bundle=str(self.env.ca.ca_path))
        self.providers.append(provider)
        return provider

    def client(self, http: httpx.AsyncClient | None = None, **kwargs: Any) -> DataverseClient:
        kwargs.setdefault("policy", RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02))
        return DataverseClient(self.env.url, http or self.http, self.provider(), sleep=self.recorder.sleep, **kwargs)


@pytest.fixture
def dataverse_factory(dataverse_env: DataverseEnv, dataverse_http: httpx.AsyncClient, recorder: Recorder,
                      dataverse_sim: DataverseSimulator) -> Iterator[Factory]:
    factory = Factory(dataverse_env, dataverse_http, recorder)
    yield factory
    for provider in factory.providers:
        provider.close()  # else MSAL's keep-alive TLS connection holds the server's shutdown


@pytest.fixture
def dv(dataverse_factory: Factory) -> DataverseClient:
    return dataverse_factory.client()


def sign_op(op_id: str, tag: str, **values: Any) -> WriteOp:
    return WriteOp(op_id, "upsert", "dot_signassets", match={"dot_assettag": tag}, values={**SIGN, **values})


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


# ============================================================================================ auth


async def test_client_implements_the_ports(dv: DataverseClient) -> None:
    assert isinstance(dv, RecordSink)
    assert isinstance(dv, ChangeSource)
    assert dv.system == "dataverse"


async def test_msal_fetches_token_from_simulated_entra_over_tls(
    dataverse_factory: Factory, dataverse_env: DataverseEnv, dataverse_sim: DataverseSimulator
) -> None:
    provider = dataverse_factory.provider()
    token = await provider.get_token()
    claims = jwt_claims(token)
    assert claims["appid"] == dataverse_sim.client_id
    assert claims["aud"] == dataverse_env.url
    # MSAL did OpenID discovery on the custom authority (no instance discovery) and one token call.
    assert dataverse_sim.request_counts["openid"] == 1
    assert dataverse_sim.request_counts["token"] == 1
    assert await provider.get_token() == token  # cached
    assert dataverse_sim.request_counts["token"] == 1
    fresh = await provider.get_token(force_refresh=True)
    assert fresh != token
    assert dataverse_sim.request_counts["token"] == 2  # bypassed our cache *and* MSAL's


async def test_bad_secret_and_bad_scope_are_auth_errors_with_the_entra_reason(
    dataverse_factory: Factory,
) -> None:
    with pytest.raises(AuthError) as bad_secret:
        await dataverse_factory.provider(secret="wrong-secret").get_token()
    assert "AADSTS7000215" in bad_secret.value.detail
    with pytest.raises(AuthError) as bad_scope:
        await dataverse_factory.provider(scope="https://other.crm.dynamics.com/.default").get_token()
    assert "AADSTS70011" in bad_scope.value.detail


async def test_expired_token_is_refreshed_once_and_the_call_replayed(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    await dv.ping()
    assert dataverse_sim.request_counts["token"] == 1
    dataverse_sim.faults.expire_tokens()
    await dv.ping()  # 401 -> force refresh -> replay
    assert dataverse_sim.request_counts["401"] == 1
    assert dataverse_sim.request_counts["token"] == 2
    assert dataverse_sim.request_counts["whoami"] == 2


async def test_second_401_is_an_auth_error(
    dataverse_env: DataverseEnv, dataverse_http: httpx.AsyncClient, dataverse_sim: DataverseSimulator
) -> None:
    calls: list[bool] = []

    class Revoked:
        async def get_token(self, *, force_refresh: bool = False) -> str:
            calls.append(force_refresh)
            return "revoked-token"

    client = DataverseClient(dataverse_env.url, dataverse_http, Revoked())
    with pytest.raises(AuthError) as err:
        await client.ping()
    assert calls == [False, True]
    assert "401 even after a token refresh" in err.value.detail
    assert dataverse_sim.request_counts["401"] == 2


# ============================================================================================ reads


async def test_scan_pages_across_next_links_and_returns_canonical_values(
    dataverse_factory: Factory, dataverse_sim: DataverseSimulator, dataverse_wire: Wire,
) -> None:
    signs = [dataverse_sim.insert("dot_signassets", {"dot_assettag": f"SGN-{i:06d}", **SIGN}) for i in range(120)]
    wo = dataverse_sim.insert("dot_workorders", {"dot_name": "WO-1", "dot_signassetid": signs[0],
                                                 "dot_duedate": "2026-04-01", "dot_worktype": 100000001})
    client = dataverse_factory.client(page_size=50)
    pages = [page async for page in client.scan("dot_signassets")]
    assert [len(p) for p in pages] == [50, 50, 20]
    assert sorted(r.key for p in pages for r in p) == sorted(signs)
    follow_ups = [u for u in dataverse_wire.urls("/dot_signassets?") if "$skiptoken" in u]
    assert len(follow_ups) == 2
    assert dataverse_sim.request_counts["collection"] == 3

    [wo_page] = [page async for page in client.scan("dot_workorders")]
    record = wo_page[0]
    assert record.key == wo
    assert record.values["dot_signassetid"] == signs[0]  # _x_value -> x
    assert "_dot_signassetid_value" not in record.values
    assert record.values["dot_duedate"] == "2026-04-01"
    assert record.modified is not None
    assert record.modified.tzinfo is not None
    assert record.version is not None
    assert record.version.startswith('W/"')


async def test_fetch_reads_by_primary_key_in_chunks(dv: DataverseClient, dataverse_sim: DataverseSimulator) -> None:
    keys = [dataverse_sim.insert("dot_signassets", {"dot_assettag": f"SGN-{i:06d}", **SIGN}) for i in range(250)]
    unknown = str(uuid.uuid4())
    wanted = [k.upper() for k in keys[:230]] + [unknown]
    found = await dv.fetch("dot_signassets", wanted)
    assert set(found) == set(keys[:230])
    assert dataverse_sim.request_counts["collection"] == 3  # 231 keys in chunks of 100
    assert found[keys[5]].values["dot_assettag"] == "SGN-000005"
    with pytest.raises(RejectedError, match="must be a GUID"):
        await dv.fetch("dot_signassets", ["1 or 1 eq 1"])


async def test_select_escapes_an_injection_attempt(
    dv: DataverseClient, dataverse_sim: DataverseSimulator, dataverse_env: DataverseEnv,
    dataverse_http: httpx.AsyncClient, dataverse_wire: Wire,
) -> None:
    payload = "x' or 1 eq 1 or dot_name eq 'y"
    for i in range(3):
        dataverse_sim.insert("dot_signassets", {"dot_assettag": f"SGN-{i}", "dot_name": f"sign {i}", **SIGN})
    assert await dv.select("dot_signassets", equals={"dot_name": payload}) == []
    sent = parse_qs(urlsplit(dataverse_wire.urls("filter=")[-1]).query)["$filter"][0]
    assert sent == "dot_name eq 'x'' or 1 eq 1 or dot_name eq ''y'"

    exact = dataverse_sim.insert("dot_signassets", {"dot_assettag": "SGN-X", "dot_name": payload, **SIGN})
    found = await dv.select("dot_signassets", equals={"dot_name": payload})
    assert [r.key for r in found] == [exact]

    # Control: the same text pasted unescaped really does change the query (the simulator parses `or 1 eq 1`).
    token = await dv._tokens.get_token()
    raw = await dataverse_http.get(f"{dataverse_env.url}/api/data/v9.2/dot_signassets",
                                   params={"$filter": f"dot_name eq '{payload}'"},
                                   headers={"Authorization": f"Bearer {token}"})
    assert len(raw.json()["value"]) == 4


async def test_select_validates_guids_and_names_before_any_query(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    with pytest.raises(RejectedError, match="must be a GUID"):
        await dv.select("dot_workorders", equals={"_dot_signassetid_value": "00000000' or 1 eq 1"})
    with pytest.raises(RejectedError, match="must be a GUID"):
        await dv.select("dot_workorders", equals={"dot_workorderid": "WO-1"})
    with pytest.raises(RejectedError, match="not a valid Dataverse name"):
        await dv.select("dot_workorders", equals={"dot_name eq 'a' or dot_name": "x"})
    with pytest.raises(RejectedError, match="cannot filter"):
        await dv.select("dot_workorders", equals={"dot_name": object()})
    assert dataverse_sim.request_counts["collection"] == 0


async def test_select_with_lookup_guid_and_not_in(dv: DataverseClient, dataverse_sim: DataverseSimulator) -> None:
    sign = dataverse_sim.insert("dot_signassets", {"dot_assettag": "SGN-1", **SIGN})
    other = dataverse_sim.insert("dot_signassets", {"dot_assettag": "SGN-2", **SIGN})
    wo = {}
    for name, status in (("open", 100000000), ("done", 100000002), ("closed", 100000003), ("unset", None)):
        wo[name] = dataverse_sim.insert("dot_workorders", {"dot_name": name, "dot_signassetid": sign,
                                                           "dot_status": status})
    dataverse_sim.insert("dot_workorders", {"dot_name": "elsewhere", "dot_signassetid": other,
                                            "dot_status": 100000000})
    found = await dv.select("dot_workorders", equals={"_dot_signassetid_value": sign.upper()},
                            not_in={"dot_status": [100000002, 100000003]})
    assert {r.key for r in found} == {wo["open"], wo["unset"]}
    assert all(r.values["dot_signassetid"] == sign for r in found)


async def test_choice_metadata_matches_the_flow_value_maps(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    maps = yaml.safe_load(FLOWS.read_text())["value_maps"]
    expected = {int(e["dataverse"]): e["label"] for e in maps["sign_type"]}
    assert await dv.choice_options("dot_signasset", "dot_signtype") == expected
    assignment = {int(e["dataverse"]): e["label"] for e in maps["assignment_status"]}
    assert await dv.choice_options("dot_fieldassignment", "dot_status") == assignment
    with pytest.raises(RejectedError):
        await dv.choice_options("dot_signasset", "dot_assettag")  # not a picklist


async def test_entity_metadata_is_read_once(dv: DataverseClient, dataverse_sim: DataverseSimulator) -> None:
    assert await dv.entity_set_for("dot_workordertask") == "dot_workordertasks"
    assert await dv.logical_name_for("dot_workordertasks") == "dot_workordertask"
    assert await dv.primary_id_for("dot_inspections") == "dot_inspectionid"
    calls = dataverse_sim.request_counts["metadata"]
    assert await dv.entity_set_for("dot_workordertask") == "dot_workordertasks"
    assert await dv.logical_name_for("dot_inspections") == "dot_inspection"
    assert dataverse_sim.request_counts["metadata"] == calls
    with pytest.raises(RejectedError, match="no table"):
        await dv.entity_set_for("dot_nosuchtable")


# ============================================================================================ writes


async def test_alternate_key_upsert_creates_then_updates_without_duplicates(
    dv: DataverseClient, dataverse_sim: DataverseSimulator, dataverse_wire: Wire
) -> None:
    tag = "O'Brien's 1"
    first = await dv.write([sign_op("a", tag, dot_assettag=tag, dot_route="VA-7")])
    assert first[0].ok
    assert first[0].created
    batch = [r for r in dataverse_wire.requests if r.url.path.endswith("$batch")][-1].content.decode()
    assert "PATCH /api/data/v9.2/dot_signassets(dot_assettag='O%27%27Brien%27%27s%201')" in batch
    assert '"dot_assettag"' not in batch  # alternate-key columns never go in the body
    again = await dv.write([sign_op("a", tag, dot_route="US-29")])
    assert again[0].ok
    assert not again[0].created
    assert again[0].key == first[0].key
    rows = [r for r in dataverse_sim.all("dot_signassets") if r["dot_assettag"] == tag]
    assert len(rows) == 1
    assert rows[0]["dot_route"] == "US-29"


async def test_alternate_key_with_url_reserved_characters_is_written_by_guid(
    dv: DataverseClient, dataverse_sim: DataverseSimulator, dataverse_wire: Wire
) -> None:
    tag = "A/B&C:1?"
    first = await dv.write([sign_op("a", tag, dot_route="VA-7")])
    assert first[0].ok
    assert first[0].created
    batch = [r for r in dataverse_wire.requests if r.url.path.endswith("$batch")][-1].content.decode()
    assert f"dot_signassets({first[0].key})" in batch  # not the alternate-key URL the service would refuse
    again = await dv.write([sign_op("a", tag, dot_route="US-29")])
    assert again[0].ok
    assert not again[0].created
    assert again[0].key == first[0].key
    rows = dataverse_sim.all("dot_signassets")
    assert len(rows) == 1
    assert rows[0]["dot_assettag"] == tag
    assert rows[0]["dot_route"] == "US-29"
    gone = await dv.write([WriteOp("u", "update", "dot_signassets", match={"dot_assettag": "X/none"},
                                   values={"dot_route": "I-64"})])
    assert not gone[0].ok
    assert isinstance(gone[0].error, RejectedError)
    assert "no longer exists" in gone[0].error.detail


async def test_upsert_by_primary_key_reports_created_then_updated(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    key = str(uuid.uuid4())
    op = WriteOp("k", "upsert", "dot_signassets", key=key, values={"dot_assettag": "SGN-K", **SIGN})
    created = await dv.write([op])
    assert (created[0].ok, created[0].created, created[0].key) == (True, True, key)
    op.values["dot_condition"] = 100000003
    updated = await dv.write([op])
    assert (updated[0].ok, updated[0].created, updated[0].key) == (True, False, key)
    assert dataverse_sim.get("dot_signassets", key)["dot_condition"] == 100000003  # type: ignore[index]
    assert len(dataverse_sim.all("dot_signassets")) == 1


async def test_odata_bind_sets_the_lookup_and_a_missing_parent_fails_only_that_op(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    sign = dataverse_sim.insert("dot_signassets", {"dot_assettag": "SGN-1", **SIGN})
    missing = str(uuid.uuid4())
    wo = {"dot_worktype": 100000001, "dot_status": 100000000}
    results = await dv.write([
        WriteOp("good", "upsert", "dot_workorders", match={"dot_arcgisglobalid": "{G-1}"},
                values={"dot_name": "WO-1", **wo}, binds={"dot_SignAssetId": Bind("dot_signassets", sign)}),
        WriteOp("orphan", "upsert", "dot_workorders", match={"dot_arcgisglobalid": "{G-2}"},
                values={"dot_name": "WO-2", **wo}, binds={"dot_SignAssetId": Bind("dot_signassets", missing)}),
    ])
    assert results[0].ok
    assert results[0].key is not None
    assert dataverse_sim.get("dot_workorders", results[0].key)["dot_signassetid"] == sign  # type: ignore[index]
    fetched = await dv.fetch("dot_workorders", [results[0].key])
    assert fetched[results[0].key].values["dot_signassetid"] == sign
    assert not results[1].ok
    assert isinstance(results[1].error, RejectedError)
    assert missing in results[1].error.detail
    assert "does not exist" in results[1].error.detail


async def test_one_bad_record_in_a_batch_fails_only_itself(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    results = await dv.write([
        sign_op("1", "SGN-A"),
        sign_op("2", "SGN-B", dot_signtype=UNMAPPED_SIGN_TYPE),
        sign_op("3", "SGN-C"),
        WriteOp("4", "upsert", "dot_signassets", match={"dot_assettag": "SGN-D"},
                values={**SIGN, "dot_signassetid_typo": 1}),
    ])
    assert [r.ok for r in results] == [True, False, True, False]
    assert [r.op_id for r in results] == ["1", "2", "3", "4"]
    error = results[1].error
    assert isinstance(error, RejectedError)
    assert error.reason == "TARGET_REJECTED"
    assert "0x8004431A" in error.detail
    assert "SGN-B" in error.detail
    assert "[op 2]" in error.detail
    assert "does not exist on type" in results[3].error.detail  # type: ignore[union-attr]
    assert sorted(r["dot_assettag"] for r in dataverse_sim.all("dot_signassets")) == ["SGN-A", "SGN-C"]
    assert dataverse_sim.request_counts["batch"] == 1


async def test_batch_size_is_validated_and_ops_are_chunked(
    dataverse_factory: Factory, dataverse_sim: DataverseSimulator
) -> None:
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="batch_size"):
            dataverse_factory.client(batch_size=bad)
    client = dataverse_factory.client(batch_size=2, max_concurrency=2)
    results = await client.write([sign_op(str(i), f"SGN-{i}") for i in range(5)])
    assert all(r.ok and r.created for r in results)
    assert [r.op_id for r in results] == ["0", "1", "2", "3", "4"]
    assert dataverse_sim.request_counts["batch"] == 3
    assert dataverse_sim.request_counts["batch_op"] == 5


async def test_simulator_refuses_a_batch_of_more_than_1000_requests(
    dv: DataverseClient, dataverse_env: DataverseEnv, dataverse_http: httpx.AsyncClient
) -> None:
    token = await dv._tokens.get_token()
    part = ("--batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            "GET /api/data/v9.2/WhoAmI HTTP/1.1\r\n\r\n\r\n")
    body = (part * 1001 + "--batch_x--\r\n").encode()
    resp = await dataverse_http.post(f"{dataverse_env.url}/api/data/v9.2/$batch", content=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": 'multipart/mixed; boundary="batch_x"'})
    assert resp.status_code == 400
    assert "exceeds the maximum of 1000" in resp.json()["error"]["message"]


async def test_update_of_a_missing_record_is_rejected_and_delete_of_one_succeeds(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    existing = dataverse_sim.insert("dot_signassets", {"dot_assettag": "SGN-1", **SIGN})
    gone = str(uuid.uuid4())
    results = await dv.write([
        WriteOp("u", "update", "dot_signassets", key=gone, values={"dot_route": "I-81"}),
        WriteOp("d-gone", "delete", "dot_signassets", key=gone),
        WriteOp("d", "delete", "dot_signassets", key=existing),
    ])
    assert not results[0].ok
    assert isinstance(results[0].error, RejectedError)
    assert "no longer exists" in results[0].error.detail
    assert dataverse_sim.all("dot_signassets") == []  # the update did not create a record
    assert results[1].ok
    assert results[2].ok


async def test_invalid_ops_fail_without_a_request(dv: DataverseClient, dataverse_sim: DataverseSimulator) -> None:
    results = await dv.write([
        WriteOp("nokey", "update", "dot_signassets", values={"dot_route": "x"}),
        WriteOp("badkey", "upsert", "dot_signassets", key="SGN-1", values=SIGN),
        WriteOp("badbind", "upsert", "dot_workorders", key=str(uuid.uuid4()),
                binds={"dot_SignAssetId": Bind("dot_signassets", "not-a-guid")}),
    ])
    assert [r.ok for r in results] == [False, False, False]
    assert all(isinstance(r.error, RejectedError) for r in results)
    assert dataverse_sim.request_counts["batch"] == 0


# ============================================================================================ faults


async def test_429_retry_after_is_honoured(dv: DataverseClient, dataverse_sim: DataverseSimulator,
                                           recorder: Recorder) -> None:
    dataverse_sim.faults.fail_next(1, 429, path_contains="$batch", retry_after=7)
    results = await dv.write([sign_op("1", "SGN-1")])
    assert results[0].ok
    assert recorder.delays == [7.0]
    assert dataverse_sim.status_counts[429] == 1


async def test_service_protection_window_is_waited_out(
    dataverse_factory: Factory, recorder: Recorder, dataverse_sim: DataverseSimulator
) -> None:
    dataverse_sim.clock = recorder.clock  # the recorder's sleeps move the simulator's clock
    dataverse_sim.limits = ServiceProtection(max_requests=2, window_seconds=60)
    client = dataverse_factory.client(policy=RetryPolicy(max_retry_after=120))
    for _ in range(3):
        await client.ping()
    assert dataverse_sim.request_counts["429"] == 1
    assert recorder.delays == [60.0]
    assert dataverse_sim.request_counts["whoami"] == 3


async def test_retry_after_beyond_the_policy_defers_to_the_queue(
    dv: DataverseClient, dataverse_sim: DataverseSimulator, recorder: Recorder
) -> None:
    dataverse_sim.faults.fail_next(1, 429, retry_after=600)
    with pytest.raises(ThrottledError) as err:
        await dv.ping()
    assert err.value.retry_after == 600
    assert recorder.delays == []


async def test_5xx_is_retried_then_becomes_transient(
    dv: DataverseClient, dataverse_sim: DataverseSimulator, recorder: Recorder
) -> None:
    dataverse_sim.faults.fail_next(1, 500, path_contains="$batch")
    assert (await dv.write([sign_op("1", "SGN-1")]))[0].ok
    assert len(recorder.delays) == 1

    dataverse_sim.faults.fail_next(10, 503, path_contains="$batch")
    batches = dataverse_sim.request_counts["batch"]
    with pytest.raises(TransientError) as err:
        await dv.write([sign_op("2", "SGN-2")])
    assert "503" in err.value.detail
    assert dataverse_sim.status_counts[503] == 3  # max_attempts of the policy
    assert dataverse_sim.request_counts["batch"] == batches  # never reached the batch handler


async def test_timeouts_become_transient(
    dataverse_factory: Factory, dataverse_env: DataverseEnv, dataverse_sim: DataverseSimulator
) -> None:
    async with httpx.AsyncClient(verify=tls_context(dataverse_env.ca), timeout=0.25) as http:
        client = dataverse_factory.client(http, policy=RetryPolicy(max_attempts=2, initial_backoff=0))
        await client.ping()  # token + warm connection
        dataverse_sim.faults.timeout_next(2, 0.6, path_contains="WhoAmI")
        with pytest.raises(TransientError, match="timed out"):
            await client.ping()
    deadline = time.monotonic() + 3
    while dataverse_sim.in_flight and time.monotonic() < deadline:  # let the slowed handlers finish
        await asyncio.sleep(0.02)
    assert dataverse_sim.in_flight == 0


async def test_504_after_apply_is_ambiguous_and_the_replay_creates_no_duplicate(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    dataverse_sim.faults.apply_then_504(1, path_contains="$batch")
    op = sign_op("1", "SGN-AMBIG", dot_route="I-95")
    with pytest.raises(AmbiguousWriteError) as err:
        await dv.write([op])
    assert err.value.retriable
    assert err.value.reason == "AMBIGUOUS_WRITE"
    assert [r["dot_assettag"] for r in dataverse_sim.all("dot_signassets")] == ["SGN-AMBIG"]  # it was applied
    replay = await dv.write([op])
    assert replay[0].ok
    assert not replay[0].created
    assert len(dataverse_sim.all("dot_signassets")) == 1


# ============================================================================================ change tracking


async def test_change_tracking_pages_then_delta_with_update_create_and_delete(
    dataverse_factory: Factory, dataverse_sim: DataverseSimulator
) -> None:
    keys = [dataverse_sim.insert("dot_signassets", {"dot_assettag": f"SGN-{i}", **SIGN}) for i in range(5)]
    client = dataverse_factory.client(page_size=2)
    first = [(records, cp) async for records, cp in client.changes_since("dot_signassets", None)]
    assert [len(r) for r, _ in first] == [2, 2, 1]
    assert "$skiptoken" in first[0][1]
    assert "$deltatoken" in first[-1][1]
    assert sorted(r.key for records, _ in first for r in records) == sorted(keys)
    delta = first[-1][1]

    results = await client.write([
        WriteOp("upd", "update", "dot_signassets", key=keys[0], values={"dot_condition": 100000002}),
        sign_op("new", "SGN-NEW"),
        WriteOp("del", "delete", "dot_signassets", key=keys[1]),
    ])
    assert all(r.ok for r in results)
    second = [(records, cp) async for records, cp in client.changes_since("dot_signassets", delta)]
    changed = [r for records, _ in second for r in records]
    live = {r.key: r for r in changed if not r.deleted}
    assert set(live) == {keys[0], results[1].key}
    assert live[keys[0]].values["dot_condition"] == 100000002
    assert [r.key for r in changed if r.deleted] == [keys[1]]
    assert second[-1][1] != delta

    third = [(records, cp) async for records, cp in client.changes_since("dot_signassets", second[-1][1])]
    assert [len(r) for r, _ in third] == [0]


# ============================================================================================ attachments


async def test_attachments_become_notes_once(dv: DataverseClient, dataverse_sim: DataverseSimulator) -> None:
    photos = [Attachment("front.jpg", "image/jpeg", b"\xff\xd8front", "att-1"),
              Attachment("back.png", "image/png", b"\x89PNGback", "att-2")]
    op = WriteOp("i", "upsert", "dot_inspections", match={"dot_arcgisglobalid": "{INSP-1}"},
                 values={"dot_inspectedon": "2026-03-01T10:00:00Z", "dot_inspector": "C. Ruiz",
                         "dot_condition": 100000001}, attachments=photos)
    [first] = await dv.write([op])
    assert first.ok
    assert first.key is not None
    notes = dataverse_sim.all("annotations")
    assert len(notes) == 2
    assert {n["objectid"] for n in notes} == {first.key}
    assert {n["objecttypecode"] for n in notes} == {"dot_inspection"}
    assert {n["notetext"] for n in notes} == {f"{ANNOTATION_MARKER}att-1", f"{ANNOTATION_MARKER}att-2"}

    batches = dataverse_sim.request_counts["batch"]
    [again] = await dv.write([op])
    assert again.ok
    assert again.key == first.key
    assert len(dataverse_sim.all("annotations")) == 2
    assert dataverse_sim.request_counts["batch"] == batches + 1  # the record only; no note was re-sent

    front = next(n for n in notes if n["filename"] == "front.jpg")
    assert await dv.fetch_attachment("dot_inspections", first.key, front["annotationid"]) == b"\xff\xd8front"
    with pytest.raises(RejectedError, match="belongs to record"):
        await dv.fetch_attachment("dot_inspections", str(uuid.uuid4()), front["annotationid"])


# ============================================================================================ simulator fixtures


def test_dot_schema_covers_every_dataverse_column_of_the_flows() -> None:
    schema = dot_schema()
    spec = yaml.safe_load(FLOWS.read_text())
    for flow in spec["flows"]:
        for side, column_key in (("source", "source"), ("target", "target")):
            if flow[side]["system"] != "dataverse":
                continue
            table = schema[flow[side]["table"]]
            for fm in flow["fields"]:
                assert fm[column_key] in table.columns, (flow["name"], fm[column_key])
            for lookup in flow.get("lookups", []):
                if side == "target":
                    assert lookup["target"] in table.nav_index(), (flow["name"], lookup["target"])
                else:
                    assert table.columns.get(lookup["source"]) == "lookup", (flow["name"], lookup["source"])
            assert ("dot_arcgisglobalid",) in table.alternate_keys
    assert ("dot_assettag",) in schema["dot_signassets"].alternate_keys
    assert set(schema["annotations"].nav_index()) >= {"objectid_dot_inspection"}


def test_seed_builds_a_sign_program_with_exactly_two_bad_signs() -> None:
    sim = DataverseSimulator()
    summary = seed_dataverse(sim, signs=60, work_orders=15, seed=3)
    signs = {s["dot_signassetid"]: s for s in sim.all("dot_signassets")}
    assert len(signs) == summary["dot_signassets"] == 62
    bad = summary["bad_signs"]
    assert signs[bad["unmapped_sign_type"]]["dot_signtype"] == 100000009
    assert signs[bad["missing_mutcd_code"]]["dot_mutcdcode"] is None
    valid_types = set(dot_schema()["dot_signassets"].choices["dot_signtype"].options)
    good = [s for k, s in signs.items() if k not in summary["bad_sign_ids"]]
    assert all(s["dot_signtype"] in valid_types and s["dot_mutcdcode"] for s in good)
    assert all(s["dot_assettag"].startswith("SGN-") and 36 < s["dot_latitude"] < 40 for s in good)
    wos = sim.all("dot_workorders")
    assert sorted(w["dot_name"] for w in wos)[:2] == ["WO-2026-00001", "WO-2026-00002"]
    assert all(w["dot_signassetid"] in signs and w["dot_signassetid"] not in summary["bad_sign_ids"] for w in wos)
    tasks = sim.all("dot_workordertasks")
    per_wo = {w["dot_workorderid"]: sum(t["dot_workorderid"] == w["dot_workorderid"] for t in tasks) for w in wos}
    assert all(1 <= n <= 4 for n in per_wo.values())
    assert len(tasks) == summary["dot_workordertasks"]
    assignments = sim.all("dot_fieldassignments")
    assert len(assignments) == 15
    by_wo = {w["dot_workorderid"]: w for w in wos}
    for a in assignments:
        assert a["dot_crew"] in {f"CREW-{n:02d}" for n in range(1, 13)}
        assert a["dot_latitude"] == signs[by_wo[a["dot_workorderid"]]["dot_signassetid"]]["dot_latitude"]
    assert seed_dataverse(DataverseSimulator(), signs=60, work_orders=15, seed=3)["bad_signs"] == bad  # determinism


# ============================================================================================ more protocol detail


async def test_a_5xx_inside_one_batch_part_fails_only_that_op_as_transient(
    dv: DataverseClient, dataverse_sim: DataverseSimulator
) -> None:
    await dv.write([sign_op("warm", "SGN-0")])
    dataverse_sim.faults.fail_next(1, 503, path_contains="dot_assettag='SGN-2'")
    results = await dv.write([sign_op("1", "SGN-1"), sign_op("2", "SGN-2"), sign_op("3", "SGN-3")])
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, TransientError)
    assert results[1].error.retriable


async def test_composition_root_helper_builds_a_working_provider(
    dataverse_env: DataverseEnv, dataverse_http: httpx.AsyncClient, dataverse_sim: DataverseSimulator
) -> None:
    from pydantic import SecretStr

    from shared.bootstrap import dataverse_token_provider
    from shared.settings import DataverseSettings

    settings = DataverseSettings(url=dataverse_env.url, tenant_id=dataverse_sim.tenant_id,
                                 client_id=dataverse_sim.client_id,
                                 client_secret=SecretStr(dataverse_sim.client_secret),
                                 authority_host=dataverse_env.url)
    provider = dataverse_token_provider(settings, ca_bundle=str(dataverse_env.ca.ca_path))
    try:
        client = DataverseClient(settings.url, dataverse_http, provider)
        await client.ping()
        assert jwt_claims(await provider.get_token())["aud"] == dataverse_env.url
    finally:
        provider.close()


def raw_batch(parts: list[str], *, changeset: bool) -> bytes:
    """A hand-written $batch body (one change set holding `parts`, or one top-level part each)."""
    def part(text: str, cid: int) -> str:
        return (f"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {cid}\r\n\r\n"
                f"{text}\r\n")

    if changeset:
        inner = "".join(f"--cs\r\n{part(p, i)}" for i, p in enumerate(parts, start=1)) + "--cs--\r\n"
        return f"--b\r\nContent-Type: multipart/mixed; boundary=cs\r\n\r\n{inner}--b--\r\n".encode()
    return ("".join(f"--b\r\n{part(p, i)}" for i, p in enumerate(parts, start=1)) + "--b--\r\n").encode()


def post(body: dict[str, Any], url: str = "/api/data/v9.2/dot_signassets") -> str:
    return f"POST {url} HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n{json.dumps(body)}"


async def test_simulated_change_sets_are_atomic_and_resolve_content_id_references(
    dv: DataverseClient, dataverse_env: DataverseEnv, dataverse_http: httpx.AsyncClient,
    dataverse_sim: DataverseSimulator,
) -> None:
    from shared.connectors.dataverse import parse_batch_response

    headers = {"Authorization": f"Bearer {await dv._tokens.get_token()}",
               "Content-Type": "multipart/mixed; boundary=b"}
    url = f"{dataverse_env.url}/api/data/v9.2/$batch"
    wo = {"dot_name": "WO-1", "dot_worktype": 100000000, "dot_status": 100000000, "dot_SignAssetId@odata.bind": "$1"}
    good = raw_batch([post({"dot_assettag": "SGN-1", **SIGN}), post(wo, "/api/data/v9.2/dot_workorders")],
                     changeset=True)
    resp = await dataverse_http.post(url, content=good, headers=headers)
    assert resp.status_code == 200
    [group] = parse_batch_response(resp.content, resp.headers["Content-Type"])
    assert [p.status for p in group] == [204, 204]
    [sign] = dataverse_sim.all("dot_signassets")
    assert dataverse_sim.all("dot_workorders")[0]["dot_signassetid"] == sign["dot_signassetid"]

    bad = raw_batch([post({"dot_assettag": "SGN-2", **SIGN}), post({"dot_assettag": "SGN-3"})], changeset=True)
    resp = await dataverse_http.post(url, content=bad, headers=headers)
    [group] = parse_batch_response(resp.content, resp.headers["Content-Type"])
    assert [p.status for p in group] == [400]  # a failed change set answers with its failing request only
    assert len(dataverse_sim.all("dot_signassets")) == 1  # SGN-2 was rolled back

    stop = raw_batch([post({"dot_assettag": "SGN-4"}), post({"dot_assettag": "SGN-5", **SIGN})], changeset=False)
    resp = await dataverse_http.post(url, content=stop, headers=headers)
    assert resp.status_code == 400  # no continue-on-error: the batch stops at the first failure
    assert len(parse_batch_response(resp.content, resp.headers["Content-Type"])) == 1
    assert len(dataverse_sim.all("dot_signassets")) == 1


async def test_simulated_concurrency_limit_answers_429_with_its_code(
    dv: DataverseClient, dataverse_env: DataverseEnv, dataverse_http: httpx.AsyncClient,
    dataverse_sim: DataverseSimulator,
) -> None:
    headers = {"Authorization": f"Bearer {await dv._tokens.get_token()}"}
    dataverse_sim.limits = ServiceProtection(max_concurrent=1)
    dataverse_sim.latency_ms = 150
    url = f"{dataverse_env.url}/api/data/v9.2/WhoAmI"
    first, second = await asyncio.gather(dataverse_http.get(url, headers=headers),
                                         dataverse_http.get(url, headers=headers))
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 429]
    throttled = first if first.status_code == 429 else second
    assert throttled.json()["error"]["code"] == "0x80072326"
    assert throttled.headers["Retry-After"] == "1"
