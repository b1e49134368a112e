"""ArcGIS connector against the feature-service simulator over real loopback HTTP (no mocks, no `arcgis` package)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from sandbox.arcgis import (
    DEFAULT_API_KEY,
    DEFAULT_API_KEY_USERNAME,
    DEFAULT_APP_USERNAME,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    ArcGISSimulator,
    lonlat_to_mercator,
)
from sandbox.server import RunningServer
from shared.connectors._http import RetryPolicy
from shared.connectors.arcgis import (
    ApiKeyAuth,
    AppCredentialsAuth,
    ArcGISFeatureServiceClient,
    canonical_guid,
)
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    MappingError,
    RejectedError,
    SpecError,
    ThrottledError,
    TransientError,
)
from shared.core.ports import GEOMETRY_KEY, Attachment, ChangeSource, RecordSink, WriteOp

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
LON, LAT = -93.0936, 44.9537
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ArcGISSandbox:
    sim: ArcGISSimulator
    server: RunningServer

    @property
    def token_url(self) -> str:
        return self.sim.token_url(self.server.url)

    @property
    def service_url(self) -> str:
        return self.sim.service_url(self.server.url)


def _start(sim: ArcGISSimulator) -> Iterator[ArcGISSandbox]:
    server = RunningServer(sim.app).start()
    sim.base_url = server.url
    try:
        yield ArcGISSandbox(sim, server)
    finally:
        server.stop()
        sim.close()


@pytest.fixture
def arcgis_env() -> Iterator[ArcGISSandbox]:
    yield from _start(ArcGISSimulator())


@pytest.fixture
async def arcgis_http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        yield client


def app_client(env: ArcGISSandbox, http: httpx.AsyncClient, **kw: Any) -> ArcGISFeatureServiceClient:
    auth = AppCredentialsAuth(env.token_url, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, http, policy=FAST)
    return ArcGISFeatureServiceClient(env.service_url, http, auth, policy=FAST, **kw)


def sign(tag: str, dv_id: str | None = None, **extra: Any) -> dict[str, Any]:
    values = {"ASSET_TAG": tag, "MUTCD_CODE": "R1-1", "SIGN_TYPE": "REG", "CONDITION": "GOOD",
              GEOMETRY_KEY: {"x": -10362000.0, "y": 5612000.0, "spatialReference": {"wkid": 102100}}}
    if dv_id is not None:
        values["DV_ID"] = dv_id
    values.update(extra)
    return values


def upsert(i: int, **extra: Any) -> WriteOp:
    dv_id = f"0f8fad5b-d9cb-469f-a165-70867728{i:04d}"
    return WriteOp(f"op{i}", "upsert", "SignAssets", match={"DV_ID": dv_id}, values=sign(f"T-{i}", **extra))


# ------------------------------------------------------------------------------------------ auth


async def test_app_token_is_cached_and_refreshed_once_after_expiry(arcgis_env, arcgis_http):
    client = app_client(arcgis_env, arcgis_http)
    assert isinstance(client, RecordSink)
    assert isinstance(client, ChangeSource)
    await client.write([upsert(1)])
    assert await client.select("SignAssets", equals={"ASSET_TAG": "T-1"})
    assert arcgis_env.sim.request_count["token"] == 1

    arcgis_env.sim.faults.expire_tokens()
    # Concurrent calls all see 498 with the same stale token: exactly one refresh serves them all.
    pages = await asyncio.gather(*(client.select("SignAssets", equals={"ASSET_TAG": "T-1"}) for _ in range(4)))
    assert all(len(p) == 1 for p in pages)
    assert arcgis_env.sim.request_count["token"] == 2
    # Edits made with the app token are recorded under the app's user (how Syncline recognises its echoes).
    assert pages[0][0].values["Editor"] == DEFAULT_APP_USERNAME


async def test_rejected_client_secret_is_auth_error(arcgis_env, arcgis_http):
    auth = AppCredentialsAuth(arcgis_env.token_url, DEFAULT_CLIENT_ID, "wrong", arcgis_http, policy=FAST)
    client = ArcGISFeatureServiceClient(arcgis_env.service_url, arcgis_http, auth, policy=FAST)
    with pytest.raises(AuthError) as err:
        await client.ping()
    assert "Invalid client_secret" in err.value.detail
    assert err.value.reason == "AUTH_FAILED"


async def test_token_that_stays_invalid_after_refresh_is_auth_error(arcgis_env, arcgis_http):
    client = app_client(arcgis_env, arcgis_http)
    await client.ping()
    arcgis_env.sim.faults.fail_next(2, 498, path_contains="/FeatureServer")
    with pytest.raises(AuthError, match="even after a refresh"):
        await client.select("SignAssets", equals={"ASSET_TAG": "x"})
    assert arcgis_env.sim.request_count["token"] == 2


async def test_api_key_mode(arcgis_env, arcgis_http):
    client = ArcGISFeatureServiceClient(arcgis_env.service_url, arcgis_http, ApiKeyAuth(DEFAULT_API_KEY), policy=FAST)
    [result] = await client.write([upsert(1)])
    assert result.ok
    assert result.created
    assert arcgis_env.sim.get("SignAssets", result.key)["Editor"] == DEFAULT_API_KEY_USERNAME
    assert arcgis_env.sim.request_count["token"] == 0

    bad = ArcGISFeatureServiceClient(arcgis_env.service_url, arcgis_http, ApiKeyAuth("AAPK-revoked"), policy=FAST)
    before = arcgis_env.sim.request_count["service"]
    with pytest.raises(AuthError, match="cannot be refreshed"):
        await bad.ping()
    assert arcgis_env.sim.request_count["service"] == before + 1  # no refresh loop for a key


# ------------------------------------------------------------------------------------------ reads


async def test_query_paging_across_max_record_count(arcgis_http):
    for env in _start(ArcGISSimulator(max_record_count=5)):
        for i in range(12):
            env.sim.field_add("SignAssets", {"ASSET_TAG": f"P-{i:02d}", "ROUTE": "I-94"})
        client = app_client(env, arcgis_http, include_attachments=False)
        pages = [page async for page in client.scan("SignAssets")]
        assert [len(p) for p in pages] == [5, 5, 2]
        assert env.sim.request_count["query"] == 3
        tags = [r.values["ASSET_TAG"] for p in pages for r in p]
        assert tags == [f"P-{i:02d}" for i in range(12)]  # ordered by OBJECTID, nothing skipped or repeated

        selected = await client.select("SignAssets", equals={"ROUTE": "I-94"}, not_in={"ASSET_TAG": ["P-03"]})
        assert len(selected) == 11
        assert "P-03" not in {r.values["ASSET_TAG"] for r in selected}


async def test_records_follow_the_canonical_convention(arcgis_http):
    for env in _start(ArcGISSimulator(guid_case="mixed")):
        attrs = {"WO_NUMBER": "WO-1", "ASSET_GUID": "{a1b2c3d4-0000-4000-8000-00000000abcd}", "DUE_DATE": 1767225600000}
        gid = env.sim.field_add("WorkOrders", attrs, {"x": LON, "y": LAT, "spatialReference": {"wkid": 4326}})
        client = app_client(env, arcgis_http)
        found = await client.fetch("WorkOrders", [gid.lower()])
        record = found[gid.lower()]
        assert record.key == gid.upper()
        assert record.key.startswith("{")
        assert record.values["ASSET_GUID"] == "{A1B2C3D4-0000-4000-8000-00000000ABCD}"
        assert record.values["DUE_DATE"] == 1767225600000
        assert record.version == str(record.values["EditDate"])
        assert record.modified is not None
        assert record.modified.tzinfo is not None
        assert (record.modified - EPOCH) // timedelta(milliseconds=1) == record.values["EditDate"]
        geometry = record.values[GEOMETRY_KEY]
        assert geometry["spatialReference"]["wkid"] == 102100
        assert geometry["x"] == pytest.approx(lonlat_to_mercator(LON, LAT)[0])
        env.sim.field_add("WorkOrderTasks", {"TASK_NAME": "Mount sign", "WO_GUID": gid, "SEQ": 1})
        [[task]] = [page async for page in client.scan("WorkOrderTasks")]
        assert task.values[GEOMETRY_KEY] is None
        assert task.values["WO_GUID"] == gid.upper()
        assert await client.coded_values("WorkOrders", "PRIORITY") == {1: "Low", 2: "Normal", 3: "High", 4: "Emergency"}


async def test_reprojection_between_4326_and_102100(arcgis_env, arcgis_http):
    client = app_client(arcgis_env, arcgis_http)
    op = WriteOp("g", "upsert", "SignAssets", match={"DV_ID": "dv-geo"},
                 values=sign("GEO", **{GEOMETRY_KEY: {"x": LON, "y": LAT, "spatialReference": {"wkid": 4326}}}))
    [result] = await client.write([op])
    stored = arcgis_env.sim.get("SignAssets", result.key)[GEOMETRY_KEY]
    x, y = lonlat_to_mercator(LON, LAT)
    assert stored["x"] == pytest.approx(x)
    assert stored["y"] == pytest.approx(y)

    lonlat = app_client(arcgis_env, arcgis_http, out_sr=4326)
    [record] = (await lonlat.fetch("SignAssets", [result.key])).values()
    geometry = record.values[GEOMETRY_KEY]
    assert geometry["spatialReference"]["wkid"] == 4326
    assert geometry["x"] == pytest.approx(LON, abs=1e-9)
    assert geometry["y"] == pytest.approx(LAT, abs=1e-9)


async def test_where_values_are_escaped_and_cannot_inject(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    hostile = "x' OR '1'='1"
    sim.field_add("SignAssets", {"ASSET_TAG": "literal", "ROUTE": hostile})
    sim.field_add("SignAssets", {"ASSET_TAG": "other", "ROUTE": "US-52"})
    sim.field_add("SignAssets", {"ASSET_TAG": "third", "ROUTE": "MN-5; DROP TABLE"})
    client = app_client(arcgis_env, arcgis_http)

    hit = await client.select("SignAssets", equals={"ROUTE": hostile})
    assert [r.values["ASSET_TAG"] for r in hit] == ["literal"]  # matched literally, not as OR 1=1
    assert await client.select("SignAssets", equals={"ROUTE": "nope' OR '1'='1"}) == []
    assert await client.select("SignAssets", equals={"ROUTE": "') OR (1=1"}) == []
    rest = await client.select("SignAssets", equals={}, not_in={"ROUTE": [hostile, "x') OR ('1'='1"]})
    assert sorted(r.values["ASSET_TAG"] for r in rest) == ["other", "third"]

    queries = sim.request_count["query"]
    with pytest.raises(SpecError, match="does not exist"):
        await client.select("SignAssets", equals={"ROUTE = ROUTE OR 1": 1})
    with pytest.raises(SpecError, match="no layer or table"):
        await client.select("Parcels", equals={"X": 1})
    assert sim.request_count["query"] == queries  # rejected before anything was sent


# ------------------------------------------------------------------------------------------ writes


async def test_apply_edits_batches_adds_updates_deletes_and_isolates_a_bad_feature(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    client = app_client(arcgis_env, arcgis_http, batch_size=3)
    ops = [upsert(i) for i in range(7)]
    ops[4] = upsert(4, SIGN_TYPE="XYZ")  # not a code of the SignType domain
    results = await client.write(ops)
    assert sim.request_count["applyEdits"] == 2  # the 6 sendable ops in batches of 3
    assert [r.ok for r in results] == [True, True, True, True, False, True, True]
    # The hosted layer would store 'XYZ' (applyEdits does not enforce coded-value domains, see
    # tests/conformance/test_arcgis_rest.py), so the connector refuses it before sending, naming the domain.
    bad = results[4].error
    assert isinstance(bad, MappingError)
    assert "SignType" in bad.detail
    assert "'XYZ'" in bad.detail
    assert all(r.created and canonical_guid(r.key) == r.key for r in results if r.ok)
    assert len(sim.all("SignAssets")) == 6

    keep, drop = results[0].key, results[1].key
    follow_up = [
        WriteOp("u", "update", "SignAssets", key=keep, values={"CONDITION": "POOR", "RETRO_READING": 41.5}),
        WriteOp("d", "delete", "SignAssets", key=drop),
        WriteOp("gone", "delete", "SignAssets", key="{00000000-1111-2222-3333-444444444444}"),
        WriteOp("m", "update", "SignAssets", key="{00000000-1111-2222-3333-555555555555}", values={"ROUTE": "x"}),
    ]
    before = sim.request_count["applyEdits"]
    updated, deleted, already_gone, missing = await client.write(follow_up)
    assert sim.request_count["applyEdits"] == before + 2  # updates and deletes share batches (of 3)
    assert updated.ok
    assert sim.get("SignAssets", keep)["CONDITION"] == "POOR"
    assert deleted.ok
    assert sim.get("SignAssets", drop) is None
    assert already_gone.ok  # deleting what is not there holds the goal
    assert not missing.ok
    assert isinstance(missing.error, RejectedError)
    assert "object is missing" in missing.error.detail.lower()


async def test_upsert_by_match_is_idempotent(arcgis_env, arcgis_http):
    client = app_client(arcgis_env, arcgis_http)
    ops = [upsert(i) for i in range(4)]
    first = await client.write(ops)
    second = await client.write([upsert(i, ROUTE="I-35") for i in range(4)])
    assert all(r.ok and r.created for r in first)
    assert all(r.ok and not r.created for r in second)
    assert [r.key for r in first] == [r.key for r in second]
    rows = arcgis_env.sim.all("SignAssets")
    assert len(rows) == 4
    assert {r["ROUTE"] for r in rows} == {"I-35"}
    # The match value is written on add, so the feature is findable by it (DV_ID link).
    assert sorted(r["DV_ID"] for r in rows) == sorted(op.match["DV_ID"] for op in ops)


async def test_two_processes_creating_the_same_record_at_once_make_one_feature(arcgis_env, arcgis_http):
    # Two clients (a webhook invocation and the controller, say) both look the record up, find nothing and
    # add it: the GlobalID derives from the match, so the second add is a duplicate (1022) and becomes an update.
    one, two = app_client(arcgis_env, arcgis_http), app_client(arcgis_env, arcgis_http)
    first, second = await asyncio.gather(one.write([upsert(7)]), two.write([upsert(7, ROUTE="US-29")]))
    assert first[0].ok
    assert second[0].ok
    assert first[0].key == second[0].key
    [row] = arcgis_env.sim.all("SignAssets")
    assert row["GlobalID"] == first[0].key
    assert row["DV_ID"] == upsert(7).match["DV_ID"]


async def test_same_record_twice_in_one_write_is_applied_in_order(arcgis_env, arcgis_http):
    client = app_client(arcgis_env, arcgis_http)
    results = await client.write([upsert(1, ROUTE="first"), upsert(1, ROUTE="second")])
    assert [r.created for r in results] == [True, False]
    assert results[0].key == results[1].key
    [row] = arcgis_env.sim.all("SignAssets")
    assert row["ROUTE"] == "second"


async def test_applied_then_504_is_ambiguous_and_the_replay_writes_exactly_once(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    client = app_client(arcgis_env, arcgis_http)
    sim.faults.apply_then_504(1, path_contains="applyEdits")
    [lost] = await client.write([upsert(9)])
    assert not lost.ok
    assert isinstance(lost.error, AmbiguousWriteError)
    assert lost.error.retriable
    assert len(sim.all("SignAssets")) == 1  # it was applied all the same

    [replay] = await client.write([upsert(9, ROUTE="after-504")])
    assert replay.ok
    assert not replay.created
    [row] = sim.all("SignAssets")
    assert row["ROUTE"] == "after-504"
    assert canonical_guid(row["GlobalID"]) == replay.key


async def test_http_200_error_bodies_are_errors(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    client = app_client(arcgis_env, arcgis_http)
    await client.ping()

    sim.faults.fail_next(1, 400, path_contains="/query")
    with pytest.raises(RejectedError) as rejected:
        await client.select("SignAssets", equals={"ASSET_TAG": "a"})
    assert "400" in rejected.value.detail

    sim.faults.fail_next(2, 500, path_contains="/query")  # in the body of an HTTP 200: still retried
    queries = sim.request_count["query"]
    assert await client.select("SignAssets", equals={"ASSET_TAG": "a"}) == []
    assert sim.request_count["query"] == queries + 3

    sim.faults.fail_next(3, 503, path_contains="/query")
    with pytest.raises(TransientError):
        await client.select("SignAssets", equals={"ASSET_TAG": "a"})

    sim.faults.fail_next(3, 429, path_contains="/applyEdits", as_http_200_error=False, retry_after=0)
    with pytest.raises(ThrottledError):
        await client.write([upsert(1)])

    sim.faults.fail_next(1, 403, path_contains="/query")
    with pytest.raises(AuthError, match="privileges"):
        await client.select("SignAssets", equals={"ASSET_TAG": "a"})


async def test_network_timeouts_are_transient(arcgis_env):
    sim = arcgis_env.sim
    async with httpx.AsyncClient(trust_env=False, timeout=0.25) as http:
        client = app_client(arcgis_env, http)
        await client.ping()
        sim.faults.timeout_next(3, 0.6, path_contains="/query")
        with pytest.raises(TransientError, match="timed out"):
            await client.select("SignAssets", equals={"ASSET_TAG": "a"})


# ------------------------------------------------------------------------------------------ changes


async def test_extract_changes_reports_inserts_updates_and_deletes_since_a_server_gen(arcgis_http):
    for env in _start(ArcGISSimulator(max_record_count=2)):
        sim = env.sim
        existing = [sim.field_add("SignAssets", {"ASSET_TAG": f"E-{i}"}) for i in range(3)]
        client = app_client(env, arcgis_http)

        first = [page async for page in client.changes_since("SignAssets", None)]
        assert [len(records) for records, _ in first] == [2, 1]
        assert first[0][1].startswith("scan:")  # resumable mid-scan
        checkpoint = first[-1][1]
        assert checkpoint == str(sim.server_gen)

        added = sim.field_add("SignAssets", {"ASSET_TAG": "NEW"}, user="crew7")
        sim.field_edit("SignAssets", existing[0], {"CONDITION": "DAMAGED"}, user="crew7")
        sim.field_delete("SignAssets", existing[1], user="crew7")
        extracts = sim.request_count["extractChanges"]
        pages = [page async for page in client.changes_since("SignAssets", checkpoint)]
        assert sim.request_count["extractChanges"] == extracts + 1
        records = [r for page, _ in pages for r in page]
        by_key = {r.key: r for r in records}
        assert set(by_key) == {added, existing[0], existing[1]}
        assert by_key[existing[0]].values["CONDITION"] == "DAMAGED"
        assert by_key[existing[0]].values["Editor"] == "crew7"
        assert by_key[existing[1]].deleted
        assert not by_key[added].deleted
        assert pages[-1][1] == str(sim.server_gen)
        assert [len(p) for p, _ in pages] == [2, 1]
        assert pages[0][1] == checkpoint

        assert [page async for page in client.changes_since("SignAssets", pages[-1][1])] == []


async def test_edit_date_fallback_does_not_lose_equal_timestamps(arcgis_http):
    now = [1_767_225_600_000]
    for env in _start(ArcGISSimulator(change_tracking=False, clock=lambda: now[0])):
        sim = env.sim
        gids = [sim.field_add("Inspections", {"INSPECTOR": f"i{i}"}) for i in range(3)]  # all at the same ms
        client = app_client(env, arcgis_http, page_size=2)
        pages = [page async for page in client.changes_since("Inspections", None)]
        assert sorted(r.key for page, _ in pages for r in page) == sorted(gids)
        assert sim.request_count["extractChanges"] == 0
        checkpoint = pages[-1][1]
        assert checkpoint == f"editdate:{now[0]}:1,2,3"

        late = sim.field_add("Inspections", {"INSPECTOR": "late"})  # same millisecond as the watermark
        pages = [page async for page in client.changes_since("Inspections", checkpoint)]
        assert [r.key for page, _ in pages for r in page] == [late]  # boundary rows not re-sent, the new one kept
        checkpoint = pages[-1][1]

        now[0] += 1500
        sim.field_edit("Inspections", gids[0], {"NOTES": "re-inspected"})
        pages = [page async for page in client.changes_since("Inspections", checkpoint)]
        [[record]] = [page for page, _ in pages]
        assert record.key == gids[0]
        assert record.values["NOTES"] == "re-inspected"
        assert pages[-1][1] == f"editdate:{now[0]}:1"


# ------------------------------------------------------------------------------------------ attachments


async def test_attachments_are_uploaded_once_listed_and_downloaded(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    client = app_client(arcgis_env, arcgis_http)
    photo = Attachment("photo.jpg", "image/jpeg", b"\xff\xd8\xff\xe0 jpeg bytes", source_id="a1b2")
    op = WriteOp("i", "upsert", "Inspections", match={"DV_ID": "dv-insp-1"},
                 values={"INSPECTOR": "Kim", "CONDITION": "FAIR", GEOMETRY_KEY: None}, attachments=[photo])
    [first] = await client.write([op])
    [again] = await client.write([op])
    assert first.ok
    assert again.ok
    assert first.key == again.key
    assert sim.request_count["addAttachment"] == 1  # the replay saw a1b2__photo.jpg already there

    [ref] = await client.list_attachments("Inspections", first.key)
    assert ref.name == "a1b2__photo.jpg"
    assert ref.content_type == "image/jpeg"
    assert ref.size == len(photo.data)
    assert await client.fetch_attachment("Inspections", first.key, ref.id) == photo.data

    [record] = (await client.fetch("Inspections", [first.key])).values()
    assert [a.id for a in record.attachments] == [ref.id]  # attachments listed on records read

    sim.field_attach("Inspections", first.key, "later.png", "image/png", b"\x89PNG")
    checkpoint = str(sim.server_gen - 1)
    pages = [page async for page in client.changes_since("Inspections", checkpoint)]
    [[changed]] = [page for page, _ in pages]
    assert changed.key == first.key
    assert {a.name for a in changed.attachments} == {"a1b2__photo.jpg", "later.png"}

    with pytest.raises(RejectedError, match="no feature"):
        await client.fetch_attachment("Inspections", "{00000000-0000-0000-0000-00000000dead}", "1")


async def test_attachments_on_a_layer_without_them_fail_only_that_op(arcgis_env, arcgis_http):
    client = app_client(arcgis_env, arcgis_http)
    op = WriteOp("w", "upsert", "WorkOrders", match={"DV_ID": "dv-wo"}, values={"WO_NUMBER": "WO-9"},
                 attachments=[Attachment("x.pdf", "application/pdf", b"%PDF", source_id="n1")])
    result, other = await client.write([op, upsert(1)])
    assert not result.ok
    assert isinstance(result.error, RejectedError)
    assert "attachments disabled" in result.error.detail
    assert "x.pdf" in result.error.detail
    assert other.ok


async def test_batches_run_with_bounded_concurrency(arcgis_env, arcgis_http):
    arcgis_env.sim.latency_ms = 40
    client = app_client(arcgis_env, arcgis_http, batch_size=1, max_concurrency=2)
    results = await client.write([upsert(i) for i in range(6)])
    assert all(r.ok for r in results)
    assert arcgis_env.sim.request_count["applyEdits"] == 6
    assert arcgis_env.sim.peak_in_flight["applyEdits"] == 2  # parallel, but never more than allowed


# ------------------------------------------------------------------------------------------ simulator


@pytest.mark.parametrize(("where", "count"), [
    ("1=1", 4),
    ("ROUTE = 'I-94'", 2),
    ("route = 'i-94'", 2),  # identifiers and text compare case-insensitively, as hosted data does
    ("ROUTE <> 'I-94'", 1),  # NULL is neither equal nor unequal
    ("ROUTE IS NULL", 1),
    ("NOT (ROUTE IS NOT NULL)", 1),
    ("MILEPOST >= 2 AND MILEPOST < 11", 2),
    ("MILEPOST BETWEEN -1 AND 2.5", 2),
    ("ASSET_TAG IN ('A', 'C', 'Z')", 2),
    ("ASSET_TAG NOT IN ('A')", 3),
    ("ASSET_TAG LIKE 'b%' OR (ROUTE = 'US-52' AND MILEPOST > 100)", 1),
    ("ASSET_TAG = 'It''s'", 1),
    ("INSTALL_DATE > TIMESTAMP '2024-01-01 00:00:00'", 1),
    ("INSTALL_DATE = DATE '2024-06-01'", 1),
    ("GlobalID IS NOT NULL AND DV_ID IS NULL", 4),
])
async def test_simulator_where_grammar(arcgis_env, arcgis_http, where, count):
    sim = arcgis_env.sim
    sim.field_add("SignAssets", {"ASSET_TAG": "A", "ROUTE": "I-94", "MILEPOST": 1.5})
    sim.field_add("SignAssets", {"ASSET_TAG": "B", "ROUTE": "I-94", "MILEPOST": 2.0})
    sim.field_add("SignAssets", {"ASSET_TAG": "C", "ROUTE": "US-52", "MILEPOST": 10.5})
    sim.field_add("SignAssets", {"ASSET_TAG": "It's", "INSTALL_DATE": 1717200000000})
    token = ApiKeyAuth(DEFAULT_API_KEY)
    body = (await arcgis_http.post(f"{arcgis_env.service_url}/0/query", data={
        "f": "json", "where": where, "returnCountOnly": "true", "token": await token.token()})).json()
    assert body == {"count": count}


@pytest.mark.parametrize("where", [
    "ASSET_TAG = 'A'; DROP TABLE SignAssets", "ASSET_TAG = 'unterminated", "UPPER(ASSET_TAG) = 'A'",
    "ASSET_TAG = A", "MILEPOST = 'two'", "INSTALL_DATE > 1717200000000", "ASSET_TAG = \"A\"", "__import__('os')",
    "ASSET_TAG = 'A' OR", "GlobalID = 'not-a-guid'",
])
async def test_simulator_rejects_what_the_grammar_does_not_cover(arcgis_env, arcgis_http, where):
    arcgis_env.sim.field_add("SignAssets", {"ASSET_TAG": "A"})
    body = (await arcgis_http.post(f"{arcgis_env.service_url}/0/query", data={
        "f": "json", "where": where, "outFields": "*", "token": DEFAULT_API_KEY})).json()
    assert body["error"]["code"] == 400
    assert body["error"]["message"] == "Unable to complete operation."


async def test_simulator_ids_counts_and_rollback(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    gids = [sim.field_add("SignAssets", {"ASSET_TAG": t}) for t in ("A", "B", "C")]
    url = f"{arcgis_env.service_url}/0"
    auth = {"f": "json", "token": DEFAULT_API_KEY}
    ids = (await arcgis_http.post(f"{url}/query", data={**auth, "where": "1=1", "returnIdsOnly": "true"})).json()
    assert ids == {"objectIdFieldName": "OBJECTID", "objectIds": [1, 2, 3]}
    picked = (await arcgis_http.get(f"{url}/query", params={**auth, "objectIds": "1,3", "outFields": "ASSET_TAG",
                                                            "orderByFields": "ASSET_TAG DESC"})).json()
    assert [f["attributes"] for f in picked["features"]] == [{"ASSET_TAG": "C"}, {"ASSET_TAG": "A"}]

    updates = [{"attributes": {"GlobalID": gids[0], "ROUTE": "X"}},
               {"attributes": {"GlobalID": gids[1], "SIGN_TYPE": "TOO LONG"}}]  # 3 characters at most
    edits = {**auth, "useGlobalIds": "true", "updates": json.dumps(updates)}
    rolled_back = (await arcgis_http.post(f"{url}/applyEdits", data=edits)).json()  # rollbackOnFailure default
    assert rolled_back["error"]["code"] == 400
    assert sim.get("SignAssets", gids[0])["ROUTE"] is None  # nothing applied
    partial = (await arcgis_http.post(f"{url}/applyEdits", data={**edits, "rollbackOnFailure": "false"})).json()
    assert [r["success"] for r in partial["updateResults"]] == [True, False]
    assert sim.get("SignAssets", gids[0])["ROUTE"] == "X"
    html = await arcgis_http.get(url, params={"token": DEFAULT_API_KEY})
    assert html.headers["content-type"].startswith("text/html")  # f=json is not optional


async def test_asynchronous_extract_changes_jobs_are_followed(arcgis_env, arcgis_http):
    sim = arcgis_env.sim
    since = sim.server_gen
    gid = sim.field_add("WorkOrders", {"WO_NUMBER": "WO-ASYNC"})
    client = app_client(arcgis_env, arcgis_http)
    form = {"f": "json", "token": DEFAULT_API_KEY, "layers": "[1]", "async": "true",
            "layerServerGens": json.dumps([{"id": 1, "serverGen": since}])}
    accepted = (await arcgis_http.post(f"{arcgis_env.service_url}/extractChanges", data=form)).json()
    assert set(accepted) == {"statusUrl"}
    result = await client._await_job(accepted["statusUrl"], "extractChanges (async)")
    assert result["layerServerGens"] == [{"id": 1, "serverGen": sim.server_gen}]
    [added] = result["edits"][0]["features"]["adds"]
    assert canonical_guid(added["attributes"]["GlobalID"]) == gid


async def test_an_apply_edits_retried_after_a_timeout_does_not_duplicate(arcgis_env):
    sim = arcgis_env.sim
    # The first attempt times out on the client but lands on the server; the retry then re-sends the same
    # client-made GlobalID, which the service refuses as a duplicate (1022): that means "already added".
    slow_retry = RetryPolicy(max_attempts=2, initial_backoff=0.8, max_backoff=0.8)
    async with httpx.AsyncClient(trust_env=False, timeout=0.15) as http:
        auth = AppCredentialsAuth(arcgis_env.token_url, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, http, policy=FAST)
        client = ArcGISFeatureServiceClient(arcgis_env.service_url, http, auth, policy=slow_retry)
        await client.ping()
        sim.faults.timeout_next(1, 0.3, path_contains="applyEdits")
        [result] = await client.write([upsert(5)])
    assert result.ok
    assert result.created
    assert sim.request_count["applyEdits"] == 2
    [row] = sim.all("SignAssets")
    assert canonical_guid(row["GlobalID"]) == result.key


async def test_a_code_added_to_a_domain_while_the_app_runs_is_accepted_once_the_definition_expires(
        arcgis_env, arcgis_http):
    # An administrator provisions a new code (syncline arcgis provision) while instances run: each trusts the layer
    # definition it read for layer_ttl_seconds only, then reads it again.
    client = app_client(arcgis_env, arcgis_http, layer_ttl_seconds=0.3)
    [refused] = await client.write([upsert(1, SIGN_TYPE="TMP")])
    assert isinstance(refused.error, MappingError)
    arcgis_env.sim.set_coded_value("SignAssets", "SIGN_TYPE", "TMP", "Temporary")
    [still] = await client.write([upsert(1, SIGN_TYPE="TMP")])
    assert isinstance(still.error, MappingError)  # within the TTL the definition read before holds
    await asyncio.sleep(0.35)
    [accepted] = await client.write([upsert(1, SIGN_TYPE="TMP")])
    assert accepted.ok, accepted.error
    assert [f["SIGN_TYPE"] for f in arcgis_env.sim.all("SignAssets")] == ["TMP"]
