"""POST /api/admin/load/{flow} through the real azure-functions types: each answer, and a fuzz of the body and the
route that never gets a 5xx."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime
from typing import Any

import azure.functions as func
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.ops.load import LOAD_PREFIX, LoadState
from tests.functions.harness import Harness

pytestmark = pytest.mark.integration
FLOW = "sign_assets_to_field"


def post(flow: str, body: bytes = b"") -> func.HttpRequest:
    return func.HttpRequest(method="POST", url=f"http://localhost/api/admin/load/{flow}", headers={},
                            params={}, route_params={"flow": flow}, body=body)


def call(h: Harness, flow: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    response = h.call("admin_load", post(flow, raw))
    assert response.mimetype == "application/json"
    return response.status_code, json.loads(response.get_body())


def test_the_function_is_registered_with_the_admin_key(functions):
    trigger = functions["admin_load"].get_trigger().get_dict_repr()
    assert trigger["route"] == "admin/load/{flow}"
    assert str(trigger["authLevel"]).lower().endswith("admin")
    assert [str(getattr(m, "value", m)).upper() for m in trigger["methods"]] == ["POST"]


def test_load_steps_until_complete_then_nothing_to_do(harness: Harness):
    status, body = call(harness, FLOW, {"max_seconds": 1e-9})  # the budget is spent before the first batch
    assert status == 202
    assert (body["outcome"], body["complete"], body["next"]) == ("partial", False, "call again to continue")
    assert body["message"] == f"flow {FLOW}: stopped at record 0 (time budget spent); call again to continue"

    status, body = call(harness, FLOW)
    assert status == 200
    assert (body["outcome"], body["complete"], body["next"], body["loaded"], body["written"]) == \
        ("complete", True, None, 5, 3)  # 3 signs and the 2 bad ones of the seed (queued)
    assert body["resumed"] is False

    status, body = call(harness, FLOW, {"since": "2020-01-01"})
    assert (status, body["outcome"]) == (200, "already_complete")
    assert "use --restart" in body["message"]
    status, body = call(harness, FLOW, {"restart": True, "since": "2099-01-01T00:00:00Z"})
    assert (status, body["outcome"]) == (200, "nothing")
    assert body["message"] == f"flow {FLOW}: nothing to load (0 records since 2099-01-01T00:00:00+00:00)"


def test_unknown_flow_bad_body_and_a_running_load(harness: Harness):
    status, body = call(harness, "no_such_flow")
    assert (status, body["error"]) == (404, "UNKNOWN_FLOW")
    assert body["detail"].startswith("no flow named 'no_such_flow'")

    for bad, detail in [(b"{", "the body is not JSON"), (b"[1]", "the body must be a JSON object"),
                        ({"restart": "yes"}, "restart: Input should be a valid boolean"),
                        ({"max_seconds": 0}, "max_seconds: Input should be greater than 0"),
                        ({"max_seconds": 201}, "max_seconds: Input should be less than or equal to 200"),
                        ({"since": "soon"}, "--since 'soon' is not a date"),
                        ({"sinse": "2020-01-01"}, "sinse: Extra inputs are not permitted")]:
        status, body = call(harness, FLOW, bad)
        assert (status, body["error"]) == (400, "BAD_REQUEST"), bad
        assert body["detail"].startswith(detail), body

    now = datetime.now(UTC).isoformat()
    running = LoadState(FLOW, None, position=2, last_key="k", status="running",
                        owner=f"{socket.gethostname()}-elsewhere:7:abc", started_at=now, updated_at=now)
    harness.loop.run_until_complete(
        harness.services.state.put_checkpoint(LOAD_PREFIX + FLOW, running.to_json(), expected_etag=None))
    status, body = call(harness, FLOW)
    assert (status, body["error"], body["started_at"], body["updated_at"]) == (409, "LOAD_RUNNING", now, now)
    assert body["detail"].startswith(f"a load of flow {FLOW} is already running (started at {now}")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=6)
bodies = st.one_of(
    st.binary(max_size=60),
    st.fixed_dictionaries({}, optional={"since": st.one_of(st.none(), st.text(max_size=25),
                                                           st.dates().map(str), st.datetimes().map(str)),
                                        "restart": st.one_of(st.booleans(), json_values),
                                        "max_seconds": st.one_of(st.floats(), st.integers(), json_values)}
                           ).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
)
flows = st.one_of(st.sampled_from([FLOW, "work_orders_to_field", "crm_accounts_to_salesforce"]), st.text(max_size=20))


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flow=flows, body=bodies)
def test_fuzz_never_a_5xx(harness: Harness, flow: str, body: bytes):
    response = harness.call("admin_load", post(flow, body))
    assert response.status_code in (200, 202, 400, 404, 409), response.get_body()[:500]
    json.loads(response.get_body())
