"""Fuzz of every HTTP endpoint through azure-functions: never a 5xx; a refused request changes nothing."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sandbox.demo import SIGNATURE_KEY, WEBHOOK_SECRET, Sandbox
from tests import payload_samples as samples
from tests.functions.harness import Harness

pytestmark = pytest.mark.integration

def fuzz(examples: int) -> settings:
    """Examples per endpoint: thousands in all, within about a minute."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


content_types = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                 "application/cloudevents+json", "application/x-www-form-urlencoded",
                                 "text/plain", "", "multipart/form-data; boundary=x"])
header_text = st.one_of(st.text(max_size=30), st.sampled_from(["\ud800", "sha256=\udfff", "é", "\x00", " " * 3]))


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


@fuzz(1200)
@given(data=st.data())
def test_dataverse_webhook_fuzz(harness: Harness, data: st.DataObject) -> None:
    seeds = [*_signs(harness.box), samples.dataverse_body()]
    _check(harness, "dataverse_webhook", _post("webhooks/dataverse", data.draw(samples.bodies(seeds)),
                                               data.draw(headers())))


@fuzz(2000)
@given(data=st.data())
def test_arcgis_webhook_fuzz(harness: Harness, data: st.DataObject) -> None:
    hdrs = data.draw(headers())
    body = data.draw(samples.bodies([samples.survey123_body(), samples.feature_service_body(),
                                     samples.feature_service_body(layer_id=3)]))
    if hdrs["content-type"] == "application/x-www-form-urlencoded" and data.draw(st.booleans()):
        body = samples.form_encoded(body)
    if data.draw(st.integers(0, 3)) == 0:  # a signed feature-service webhook instead of the shared secret
        hdrs.pop("x-syncline-key", None)
        hdrs["x-esriHook-Signature"] = "sha256=" + hmac.new(SIGNATURE_KEY.encode(), body, hashlib.sha256).hexdigest()
    _check(harness, "arcgis_webhook", _post("webhooks/arcgis", body, hdrs))


@fuzz(1200)
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


@fuzz(1200)
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


@fuzz(1200)
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
