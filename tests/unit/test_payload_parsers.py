"""Every webhook payload parser, fed any JSON: it parses or raises EnvelopeError, nothing else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.connectors.arcgis import parse_webhook
from shared.connectors.dataverse import parse_remote_execution_context
from shared.connectors.fno import parse_business_events
from shared.connectors.salesforce import parse_cdc_event
from shared.connectors.sap import parse_event
from shared.core.errors import EnvelopeError
from shared.payloads import json_depth, read_json
from tests import payload_samples as samples

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decoded(body: bytes) -> Any:
    """The body as the intake hands it to a parser (bounded JSON), or None when the intake refuses it."""
    try:
        return read_json(body, "body")
    except EnvelopeError:
        return None


def _parses_or_envelope_error(parse: Any, value: Any) -> None:
    problem: EnvelopeError | None = None
    try:
        parse(value)
    except EnvelopeError as exc:
        problem = exc
    assert problem is None or (problem.reason == "ENVELOPE_INVALID" and problem.detail)


@FAST
@given(samples.bodies([samples.dataverse_body(), samples.dataverse_body(message="Delete")]))
def test_dataverse_parser(body: bytes) -> None:
    value = _decoded(body)
    if value is not None:
        _parses_or_envelope_error(lambda v: parse_remote_execution_context(v, date_only={"dot_installdate"}), value)


@FAST
@given(samples.bodies([samples.fno_event(), [samples.fno_event(), samples.fno_event(control=7)]]))
def test_fno_parser(body: bytes) -> None:
    value = _decoded(body)
    if value is not None:
        _parses_or_envelope_error(parse_business_events, value)
    _parses_or_envelope_error(parse_business_events, body)


@FAST
@given(samples.bodies([samples.salesforce_event()]))
def test_salesforce_parser(body: bytes) -> None:
    value = _decoded(body)
    if value is not None:
        _parses_or_envelope_error(parse_cdc_event, value)
    _parses_or_envelope_error(parse_cdc_event, body)


@FAST
@given(samples.bodies([samples.sap_event(), samples.sap_event(operation="Deleted")]))
def test_sap_parser(body: bytes) -> None:
    value = _decoded(body)
    if value is not None:
        _parses_or_envelope_error(parse_event, value)
    _parses_or_envelope_error(parse_event, body)


@FAST
@given(samples.bodies([samples.survey123_body(), samples.feature_service_body()]),
       st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", ""]))
def test_arcgis_parser(body: bytes, content_type: str) -> None:
    if content_type == "application/x-www-form-urlencoded":
        body = samples.form_encoded(body)
    _parses_or_envelope_error(lambda b: parse_webhook(b, content_type), body)


@FAST
@given(samples.json_values)
def test_json_depth_matches_the_parsed_depth(value: Any) -> None:
    def depth(node: Any) -> int:
        if isinstance(node, dict):
            return 1 + max((depth(v) for v in node.values()), default=0)
        if isinstance(node, list):
            return 1 + max((depth(v) for v in node), default=0)
        return 0

    assert json_depth(json.dumps(value).encode(), 1000) == depth(value)


@pytest.mark.parametrize("body", [
    b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'["' + b"[" * 100 + b'"]',
])
def test_read_json_bounds_nesting_without_recursion(body: bytes) -> None:
    if body.startswith(b'["'):
        assert read_json(body, "body") == ["[" * 100]  # brackets inside a string do not nest
        return
    with pytest.raises(EnvelopeError, match="deeper than 64 levels"):
        read_json(body, "body")


@pytest.mark.parametrize(("body", "problem"), [
    (b"x" * (4 * 1024 * 1024 + 1), "too large"),
    (b"[NaN]", "not valid JSON"),
    (b'{"a": Infinity}', "not valid JSON"),
    (b"[1e400]", "not valid JSON"),
    (b'["\\ud800"]', "lone UTF-16 surrogate"),
    (b'["\xed\xa0\x80"]', "not UTF-8"),
    (b"[" + b"1" * 5000 + b"]", "not valid JSON"),
])
def test_read_json_refuses_what_cannot_be_carried(body: bytes, problem: str) -> None:
    with pytest.raises(EnvelopeError, match=problem):
        read_json(body, "body")


def test_read_json_keeps_valid_surrogate_pairs() -> None:
    assert read_json(b'["\\ud83d\\ude00"]', "body") == ["\U0001f600"]
