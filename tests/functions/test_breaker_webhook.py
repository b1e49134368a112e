"""A direct write meets an open circuit breaker: the Dataverse webhook is answered 202, the change is scheduled on
the queue for the probe time, and ArcGIS receives no request (through the real azure-functions types)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import pytest

from tests.functions.harness import Harness
from tests.functions.test_intake_regressions import _sign_change, post

pytestmark = pytest.mark.integration


def test_with_the_breaker_open_a_webhook_is_answered_202_and_its_change_waits_scheduled(harness: Harness) -> None:
    services = harness.services
    probe_at = harness.loop.run_until_complete(services.controller.breakers.trip("arcgis", "outage (test)"))
    calls = sum(harness.box.ag.request_count.values())

    resp = harness.call("dataverse_webhook", post("dataverse_webhook", _sign_change(harness, "held by the breaker")))

    answer = json.loads(resp.get_body())
    assert resp.status_code == 202, answer
    assert (answer["accepted"], answer["written"], answer["queued"]) == (1, 0, 1)
    assert answer["statuses"] == {"held": 1}
    assert sum(harness.box.ag.request_count.values()) == calls  # ArcGIS was not called at all
    depth = harness.loop.run_until_complete(services.queue.depth())
    assert (depth.active, depth.scheduled, depth.dead_letter) == (0, 1, 0)
    with sqlite3.connect(harness.state_dir / "queue.db") as conn:
        [(visible_us,)] = conn.execute("SELECT visible_us FROM queue_messages").fetchall()
    due = datetime.fromtimestamp(visible_us / 1_000_000, UTC)
    assert abs((due - probe_at).total_seconds()) < 2  # scheduled for the probe, not the usual 30 s retry


def test_with_the_breaker_closed_the_same_webhook_writes_now(harness: Harness) -> None:
    resp = harness.call("dataverse_webhook", post("dataverse_webhook", _sign_change(harness, "breaker closed")))
    answer = json.loads(resp.get_body())
    assert resp.status_code == 200, answer
    assert (answer["written"], answer["queued"]) == (1, 0)
