"""Telemetry on the real OpenTelemetry SDK: metric names and dimensions, correlation headers, log redaction."""

from __future__ import annotations

import logging
import uuid
from io import StringIO
from pathlib import Path

import httpx
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from shared.bootstrap import _client
from shared.connectors._http import CallCounter
from shared.core.controller import CycleReport
from shared.core.engine import Outcome
from shared.core.envelope import ChangeEnvelope
from shared.core.errors import TransientError, ValidationError
from shared.core.observe import correlated, current_correlation_id
from shared.mapping.spec import load_spec
from shared.runtime.telemetry import (
    CLIENT_REQUEST_ID_HEADER,
    Metrics,
    RedactingFilter,
    configure_logging,
    configure_telemetry,
)
from shared.settings import Settings

SPEC = load_spec(Path(__file__).resolve().parents[2] / "flows" / "dot-signs.yaml")


def _env(flow: str, key: str, correlation_id: str | None = None) -> ChangeEnvelope:
    extra = {"correlation_id": correlation_id} if correlation_id else {}
    return ChangeEnvelope(flow=flow, operation="upsert", source_system="dataverse", source_table="dot_signassets",
                          source_key=key, payload={}, **extra)


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, str], object]]]:
    """metric name -> [(attributes, value)], value being the sum, gauge value or (count, sum, max) of a histogram."""
    out: dict[str, list[tuple[dict[str, str], object]]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "syncline"
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    value = (p.count, p.sum, p.max) if hasattr(p, "bucket_counts") else p.value
                    out.setdefault(metric.name, []).append(({k: str(v) for k, v in p.attributes.items()}, value))
    return out


def _metrics() -> tuple[Metrics, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return Metrics(MeterProvider(metric_readers=[reader])), reader


def test_outcomes_become_records_synced_by_flow_and_direction_and_failures_by_reason():
    metrics, reader = _metrics()
    outcomes = [
        Outcome(_env("sign_assets_to_field", "a"), "written"),
        Outcome(_env("sign_assets_to_field", "b"), "written", created=True),
        Outcome(_env("sign_assets_to_field", "c"), "deleted"),
        Outcome(_env("sign_assets_to_field", "d"), "skipped_echo"),
        Outcome(_env("sign_assets_to_field", "e"), "deferred"),
        Outcome(_env("inspections_from_field", "f"), "written"),
        Outcome(_env("inspections_from_field", "g"), "failed", error=ValidationError("bad", reason="UNMAPPED_CHOICE")),
        Outcome(_env("inspections_from_field", "h"), "failed", error=ValidationError("bad", reason="UNMAPPED_CHOICE")),
        Outcome(_env("inspections_from_field", "i"), "failed", error=TransientError("down")),
    ]
    metrics.record_outcomes(outcomes, SPEC)
    metrics.record_failures({"ENVELOPE_INVALID": 1})
    points = _points(reader)
    assert sorted(points["syncline.records_synced"], key=str) == sorted([
        ({"flow": "sign_assets_to_field", "direction": "dataverse->arcgis"}, 3),
        ({"flow": "inspections_from_field", "direction": "arcgis->dataverse"}, 1),
    ], key=str)
    assert sorted(points["syncline.failures"], key=str) == sorted([
        ({"reason": "UNMAPPED_CHOICE"}, 2), ({"reason": "TRANSIENT"}, 1), ({"reason": "ENVELOPE_INVALID"}, 1),
    ], key=str)


def test_breaker_transitions_are_counted_and_the_open_gauge_follows_each_system():
    metrics, reader = _metrics()
    for system, state in [("arcgis", "open"), ("salesforce", "open"), ("arcgis", "half_open"), ("arcgis", "closed")]:
        metrics.record_breaker(system, state)
    points = _points(reader)
    assert sorted(points["syncline.breaker_transitions"], key=str) == sorted([
        ({"system": "arcgis", "state": "open"}, 1), ({"system": "arcgis", "state": "half_open"}, 1),
        ({"system": "arcgis", "state": "closed"}, 1), ({"system": "salesforce", "state": "open"}, 1)], key=str)
    assert sorted(points["syncline.breaker_open"], key=str) == sorted(
        [({"system": "arcgis"}, 0), ({"system": "salesforce"}, 1)], key=str)


def test_a_cycle_records_duration_dead_letter_depth_and_api_call_deltas():
    metrics, reader = _metrics()
    metrics.record_cycle(CycleReport(started_at="t", duration_seconds=1.5, outcome="ok"), 3)
    metrics.record_cycle(CycleReport(started_at="t", duration_seconds=2.5, outcome="ok"), 4)
    metrics.record_cycle(CycleReport(started_at="t", duration_seconds=0.5, outcome="failed"), None)
    metrics.record_api_call_totals({"dataverse": 5})
    metrics.record_api_call_totals({"dataverse": 8, "arcgis": 2})
    metrics.record_api_call_totals({"dataverse": 8, "arcgis": 2})  # nothing new: nothing added
    points = _points(reader)
    assert points["syncline.cycle_duration"] == [({}, (3, 4.5, 2.5))]
    assert points["syncline.dead_letter_depth"] == [({}, 4)]  # the last known depth
    assert sorted(points["syncline.api_calls"], key=str) == sorted(
        [({"system": "dataverse"}, 8), ({"system": "arcgis"}, 2)], key=str)
    assert "syncline.failures" not in points


def test_drift_per_flow_is_a_gauge_and_the_log_line_the_drift_alert_parses(caplog):
    metrics, reader = _metrics()
    with caplog.at_level(logging.INFO, logger="shared.runtime.telemetry"):
        metrics.record_drift("sign_assets_to_field", 3)
        metrics.record_drift("work_orders_to_field", 0)
    points = _points(reader)
    assert sorted(points["syncline.reconcile_drift"], key=str) == sorted(
        [({"flow": "sign_assets_to_field"}, 3), ({"flow": "work_orders_to_field"}, 0)], key=str)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("reconciliation drift")]
    assert lines == [("INFO", "reconciliation drift 3 in flow sign_assets_to_field"),
                     ("INFO", "reconciliation drift 0 in flow work_orders_to_field")]


def test_without_a_connection_string_telemetry_stays_off_and_metrics_are_no_ops():
    assert configure_telemetry(Settings()) is False
    metrics = Metrics()  # the API's global (no-op) provider: recording must simply work
    metrics.record_outcomes([Outcome(_env("sign_assets_to_field", "a"), "written")], SPEC)
    metrics.record_cycle(CycleReport(started_at="t", duration_seconds=1.0), 0)


def test_correlation_scope_applies_only_when_one_id_is_shared():
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert current_correlation_id() is None
    with correlated([a, a, None]):
        assert current_correlation_id() == a
        with correlated([a, b]):  # a mixed batch keeps the outer id
            assert current_correlation_id() == a
    assert current_correlation_id() is None


async def test_dataverse_requests_carry_the_correlation_id_and_arcgis_requests_do_not():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    transports = {"dataverse": httpx.MockTransport(handler), "arcgis": httpx.MockTransport(handler)}
    counter = CallCounter()
    dv = _client("dataverse", counter, Settings(), transports)
    ag = _client("arcgis", counter, Settings(), transports)
    cid = str(uuid.uuid4())
    try:
        with correlated([cid]):
            await dv.get("https://org.example/api/data/v9.2/WhoAmI")
            await ag.get("https://services.example/arcgis/rest/services/x/FeatureServer")
        await dv.get("https://org.example/api/data/v9.2/WhoAmI")
        with correlated(["not-a-guid"]):  # the header is a GUID: anything else is not sent
            await dv.get("https://org.example/api/data/v9.2/WhoAmI")
    finally:
        await dv.aclose()
        await ag.aclose()
    assert [r.headers.get(CLIENT_REQUEST_ID_HEADER) for r in seen] == [cid, None, None, None]
    assert counter.snapshot() == {"dataverse": 3, "arcgis": 1}


def test_redaction_of_secrets_tokens_and_keys_in_messages_args_and_tracebacks():
    redactor = RedactingFilter(["s3cret/value+1"])
    cases = {
        "posting client_secret=%s": ("s3cret/value+1",),
        "form body client_secret=s3cret%2Fvalue%2B1&grant_type=client_credentials": (),
        "headers %s": ({"Authorization": "Bearer eyJ0eXAi.eyJzdWIi.sig-_x"},),
        "GET https://svc.example/query?f=json&token=abcDEF123&where=1=1": (),
        'token response {"access_token": "tok-123", "expires_in": 3600}': (),
        "conn Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=KEY123=": (),
        "POST /api/webhooks/dataverse?code=fnkey-42 200": (),
    }
    for msg, args in cases.items():
        record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
        assert redactor.filter(record)
        text = record.getMessage()
        for leaked in ("s3cret", "eyJ0eXAi", "abcDEF123", "tok-123", "KEY123", "fnkey-42"):
            assert leaked not in text, text
        assert "***" in text
    assert "where=1=1" in redactor.redact("token=abc&where=1=1")  # neighbours survive
    try:
        raise RuntimeError("refused s3cret/value+1")
    except RuntimeError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    redactor.filter(record)
    formatted = logging.Formatter().format(record)
    assert "refused ***" in formatted
    assert "s3cret" not in formatted


def test_configure_logging_redacts_every_handler_and_tags_correlation_ids(monkeypatch):
    monkeypatch.setenv("SYNCLINE_WEBHOOK_SECRET", "unit-hook-secret-987")
    configure_logging(Settings())
    configure_logging(Settings())  # idempotent
    buffer = StringIO()
    handler = logging.StreamHandler(buffer)  # added after configure_logging: still sees redacted records
    handler.setFormatter(logging.Formatter("%(correlation_id)s|%(message)s"))
    logger = logging.getLogger("syncline.test.telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    cid = str(uuid.uuid4())
    try:
        logger.debug("key %s", "unit-hook-secret-987")
        with correlated([cid]):
            logger.info("writing")
    finally:
        logger.removeHandler(handler)
    first, second = buffer.getvalue().splitlines()
    assert first == "|key ***"
    assert second == f"{cid}|writing [correlation_id={cid}]"
