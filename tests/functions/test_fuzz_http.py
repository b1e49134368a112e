"""Hypothesis fuzz of every HTTP endpoint through azure-functions against the simulators: never a 5xx, and a
refused request changes nothing (queue, state store, simulators' writes)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sandbox.dataverse_seed import seed_dataverse
from sandbox.demo import WEBHOOK_SECRET, Sandbox, environment, start_sandbox
from sandbox.fno_sim import seed_fno
from sandbox.salesforce_sim import seed_salesforce
from sandbox.sap_sim import seed_sap
from shared.bootstrap import Services, build_services, set_services
from shared.settings import Settings
from tests import payload_samples as samples

pytestmark = pytest.mark.integration

def fuzz(examples: int) -> settings:
    """Examples per endpoint: thousands in all, within about a minute."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, dict[str, Any]]]:
    """Every simulator, seeded small; module-scoped (starting them is the slow part)."""
    sandbox = start_sandbox(tmp_path_factory.mktemp("fuzz") / "sandbox", sales=True, sap=True)
    try:
        with environment(sandbox.env):
            seed_dataverse(sandbox.dv, signs=3, work_orders=1)
            seed_fno(sandbox.fno, customers=2, products=2)
            seed_sap(sandbox.sap, partners=2, orders=1)
            made = {"salesforce": seed_salesforce(sandbox.sf, accounts=2, opportunities=1)}
            yield sandbox, made
    finally:
        sandbox.stop()


class Harness:
    """Services on a private event loop (hypothesis drives a sync test), plus the means to fingerprint them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, services: Services, state_dir: Path, box: Sandbox,
                 functions: dict[str, Any]) -> None:
        self.loop, self.services, self.state_dir, self.box, self.functions = loop, services, state_dir, box, functions

    def __repr__(self) -> str:
        return "Harness()"

    def call(self, name: str, req: func.HttpRequest) -> func.HttpResponse:
        response: func.HttpResponse = self.loop.run_until_complete(
            self.functions[name].get_user_function()(req))
        return response

    def fingerprint(self) -> dict[str, Any]:
        """Queue (depth + message ids), every state table (links, snapshots, checkpoints, dedup, audit), and
        the simulators' write counters."""
        out: dict[str, Any] = {}
        with sqlite3.connect(self.state_dir / "state.db") as conn:
            for table in ("links", "snapshots", "checkpoints", "dedup", "audit"):
                digest = hashlib.sha256()
                for row in sorted(repr(r) for r in conn.execute(f"SELECT * FROM {table}")):  # noqa: S608
                    digest.update(row.encode("utf-8", "surrogatepass"))
                out[table] = digest.hexdigest()
        with sqlite3.connect(self.state_dir / "queue.db") as conn:
            out["queue"] = sorted(conn.execute("SELECT message_id, visible_us FROM queue_messages"))
        box = self.box
        out["arcgis.serverGen"] = box.ag.server_gen
        out["dataverse.version"] = box.dv._version
        writes = ("POST", "PATCH", "PUT", "DELETE", "MERGE")
        out["fno.writes"] = sum(1 for m, p in box.fno.requests if m in writes and "token" not in p.lower())
        out["sap.writes"] = sum(1 for m, p in [*box.sap.requests, *box.sap.batch_requests] if m in writes)
        out["salesforce.writes"] = sum(1 for m, p, _ in box.sf.requests if m in writes and "token" not in p.lower())
        return out


@pytest.fixture
def harness(box: tuple[Sandbox, dict[str, Any]], tmp_path: Path, functions: dict[str, Any]) -> Iterator[Harness]:
    """One services object per test on its own state directory, reused by every example of the test."""
    sandbox, _ = box
    loop = asyncio.new_event_loop()
    state_dir = tmp_path / "state"
    services = build_services(Settings(syncline_state_dir=str(state_dir)))  # type: ignore[call-arg]
    set_services(services)
    try:
        yield Harness(loop, services, state_dir, sandbox, functions)
    finally:
        set_services(None)
        loop.run_until_complete(services.aclose())
        loop.close()


content_types = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                 "application/cloudevents+json", "application/x-www-form-urlencoded",
                                 "text/plain", "", "multipart/form-data; boundary=x"])
header_text = st.text(max_size=30)


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    """Mostly authenticated; sometimes a wrong or missing secret, odd signatures, random headers."""
    out: dict[str, str] = {"content-type": draw(content_types)}
    auth = draw(st.sampled_from(["secret"] * 17 + ["wrong", "none", "random"]))
    if auth == "secret":
        out["x-syncline-key"] = WEBHOOK_SECRET
    elif auth == "wrong":
        out["x-syncline-key"] = draw(header_text)
    elif auth == "random":
        out.update(draw(st.dictionaries(st.sampled_from(["x-syncline-key", "x-esrihook-signature", "content-type",
                                                         "x-other", "content-length"]), header_text, max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        out["x-esriHook-Signature"] = draw(st.one_of(header_text, st.just("sha256=" + "0" * 64)))
    return out


def _post(route: str, body: bytes, hdrs: dict[str, str], params: dict[str, str] | None = None) -> func.HttpRequest:
    return func.HttpRequest(method="POST", url=f"http://localhost/api/{route}", headers=hdrs, params=params or {},
                            route_params={}, body=body)


def _check(h: Harness, name: str, req: func.HttpRequest, fault: Callable[[], Any] | None = None) -> int:
    """One request; with `fault`, the source system refuses the read-back (armed just before, cleared after)."""
    before = h.fingerprint()
    if fault is not None:
        fault()
    try:
        resp = h.call(name, req)
    finally:
        h.box.fno.faults.clear()
        h.box.sap.faults.clear()
        h.box.sf.faults.reject_sessions = False
    body = resp.get_body()[:500]
    # Only a source system's refusal (an injected fault, not the sender's doing) may be a 503: "try again".
    allowed = {503} if fault is not None else set()
    assert resp.status_code < 500 or resp.status_code in allowed, f"{name} answered {resp.status_code}: {body!r}"
    event(f"HTTP {resp.status_code}")
    if resp.status_code >= 400:
        assert h.fingerprint() == before, f"{name} refused ({resp.status_code}: {body!r}) but changed state"
    return resp.status_code


def _signs(box: Sandbox) -> list[dict[str, Any]]:
    return [samples.dataverse_body(key=row["dot_signassetid"], values=samples.sign_values(row))
            for row in box.dv.all("dot_signassets")[:2]]


@fuzz(800)
@given(data=st.data())
def test_dataverse_webhook_fuzz(harness: Harness, data: st.DataObject) -> None:
    seeds = [*_signs(harness.box), samples.dataverse_body()]
    _check(harness, "dataverse_webhook", _post("webhooks/dataverse", data.draw(samples.bodies(seeds)),
                                               data.draw(headers())))


@fuzz(1200)
@given(data=st.data())
def test_arcgis_webhook_fuzz(harness: Harness, data: st.DataObject) -> None:
    hdrs = data.draw(headers())
    body = data.draw(samples.bodies([samples.survey123_body(), samples.feature_service_body(),
                                     samples.feature_service_body(layer_id=3)]))
    if hdrs["content-type"] == "application/x-www-form-urlencoded" and data.draw(st.booleans()):
        body = samples.form_encoded(body)
    _check(harness, "arcgis_webhook", _post("webhooks/arcgis", body, hdrs))


@fuzz(800)
@given(data=st.data())
def test_fno_webhook_fuzz(harness: Harness, data: st.DataObject) -> None:
    seeds: list[Any] = [samples.fno_event(control=data.draw(st.integers(1, 10**6))),
                        [samples.fno_event(), samples.fno_event("US-002", control=12)]]
    hdrs = data.draw(headers())
    params = {}
    if "x-syncline-key" in hdrs and data.draw(st.booleans()):
        params["syncline-key"] = hdrs.pop("x-syncline-key")  # F&O's endpoint carries the secret in the URL
    fault = data.draw(st.sampled_from([None] * 4 + [404, 403, 400]))
    _check(harness, "fno_webhook", _post("webhooks/fno", data.draw(samples.bodies(seeds)), hdrs, params),
           (lambda: harness.box.fno.faults.fail_next(1, fault, "CustomersV3")) if fault else None)


@fuzz(800)
@given(data=st.data())
def test_salesforce_webhook_fuzz(harness: Harness, box: tuple[Sandbox, dict[str, Any]], data: st.DataObject) -> None:
    accounts = box[1]["salesforce"]["Account"]
    seeds: list[Any] = [samples.salesforce_event(accounts[0], replay=data.draw(st.integers(1, 10**6))),
                        [samples.salesforce_event(accounts[1], replay=7)]]
    refuse = data.draw(st.integers(0, 5)) == 0

    def reject_sessions() -> None:
        harness.box.sf.faults.reject_sessions = True  # our credentials refused even after a refresh

    _check(harness, "salesforce_webhook", _post("webhooks/salesforce", data.draw(samples.bodies(seeds)),
                                                 data.draw(headers())), reject_sessions if refuse else None)


@fuzz(800)
@given(data=st.data())
def test_sap_webhook_fuzz(harness: Harness, data: st.DataObject) -> None:
    seeds: list[Any] = [samples.sap_event("4000001"), [samples.sap_event("4000001"), samples.sap_event(
        "4000099", operation="Deleted")]]
    fault = data.draw(st.sampled_from([None] * 4 + [404, 403, 400]))
    _check(harness, "sap_webhook", _post("webhooks/sap", data.draw(samples.bodies(seeds)), data.draw(headers())),
           (lambda: harness.box.sap.faults.fail_next(1, fault, path_contains="A_SalesOrder")) if fault else None)


@fuzz(50)
@given(hdrs=headers(), body=st.binary(max_size=100), params=st.dictionaries(header_text, header_text, max_size=2))
def test_health_fuzz(harness: Harness, hdrs: dict[str, str], body: bytes, params: dict[str, str]) -> None:
    req = func.HttpRequest(method="GET", url="http://localhost/api/health", headers=hdrs, params=params,
                           route_params={}, body=body)
    resp = harness.call("health", req)
    assert resp.status_code == 200, resp.get_body()[:500]
