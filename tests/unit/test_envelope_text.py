"""The change envelope carries lone surrogates exactly, and only times it can compare in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.envelope import ChangeEnvelope, QueueMessage, wire_text
from shared.core.errors import EnvelopeError


def change(**over: object) -> ChangeEnvelope:
    fields: dict[str, object] = {"flow": "parcels", "operation": "upsert", "source_system": "dataverse",
                                 "source_table": "account", "source_key": "k-1", "payload": {"name": "x"}}
    fields.update(over)
    return ChangeEnvelope.model_validate(fields)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(), st.dictionaries(st.text(max_size=5), st.text() | st.integers() | st.none(), max_size=4))
def test_any_text_round_trips_through_the_queue_body(key: str, payload: dict[str, object]) -> None:
    env = change(source_key=key, payload=payload)
    message = env.to_message()
    assert ChangeEnvelope.from_body(message.body) == env
    message.body.decode("utf-8")  # strict: a broker can carry it
    for text in (message.message_id, message.session_id or "", *map(str, message.application_properties.values())):
        text.encode("utf-8")


def test_a_lone_surrogate_keeps_its_message_id_apart_from_its_look_alikes() -> None:
    ids = {change(source_key=key).message_id() for key in ("k-\ud800", "k-\\ud800", "k-\ufffd", "k-")}
    assert len(ids) == 4
    assert change(source_key="k-\ud800").message_id() == change(source_key="k-\ud800").message_id()


def test_plain_text_bodies_and_metadata_are_unchanged() -> None:
    env = change(payload={"name": "café"})
    assert env.to_message().body == env.model_dump_json().encode()
    assert wire_text("café|k-1") == "café|k-1"
    assert QueueMessage(body=b"{}", session_id="s\ud800").session_id == "s\\ud800"


def test_source_modified_is_kept_in_utc_and_refused_when_it_leaves_the_range() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert change(source_modified=datetime(2026, 1, 1, 2, tzinfo=plus_two)).source_modified == datetime(
        2026, 1, 1, tzinfo=UTC)
    assert change(source_modified=datetime(2026, 1, 1)).source_modified == datetime(2026, 1, 1, tzinfo=UTC)
    body = change().model_dump_json().replace('"source_modified":null', '"source_modified":"0001-01-01T00:00:00+01:00"')
    with pytest.raises(EnvelopeError, match="source_modified"):
        ChangeEnvelope.from_body(body)  # an OverflowError in the engine's ordering before, failing the batch
