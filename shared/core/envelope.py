"""The canonical change envelope that crosses every boundary, and its queue-message form."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticSerializationError

from shared.core.dates import utc
from shared.core.errors import EnvelopeError

SCHEMA_VERSION = 1
_SURROGATE_IDS = uuid.UUID("6f0b5c1e-2f4d-5a8e-9c3b-5d1e7a9c0b12")

Operation = Literal["create", "update", "upsert", "delete"]
Origin = Literal["webhook", "poll", "initial", "resubmit", "replay", "cascade", "demo", "bench", "manual",
                 "reconcile"]


class ParentRef(BaseModel):
    """A reference from a child record to its parent in the source system."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: str
    """The flow that syncs the parent (its cross-reference namespace is that flow's entity)."""
    key: str
    """The parent's key in the child's source system."""


class ChangeEnvelope(BaseModel):
    """One change of one record, as Syncline carries it from a source to a target."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    flow: str
    operation: Operation
    source_system: str
    source_table: str
    source_key: str
    source_version: str | None = None
    """An opaque version from the source (ETag, serverGen, row version) when it has one."""
    source_modified: datetime | None = None
    """When the source record was last modified (UTC); drives last-writer-wins."""
    payload: dict[str, Any] = Field(default_factory=dict)
    """Source field values, in the source's own representation."""
    origin: Origin = "webhook"
    correlation_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    parent_refs: list[ParentRef] = Field(default_factory=list)
    enqueued_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    waits: int = 0
    """How many times this change was deferred because a parent was pending."""

    @field_validator("source_modified")
    @classmethod
    def _modified_in_utc(cls, value: datetime | None) -> datetime | None:
        # Every comparison and stored stamp is UTC; one that cannot be shifted to UTC is not a usable time.
        if value is None:
            return None
        moment = utc(value)
        if moment is None:
            raise ValueError(f"{value.isoformat()} is not a date in range once in UTC (years 1-9999)")
        return moment

    @property
    def record_id(self) -> str:
        """A stable id of the source record across systems and flows (used for sessions and dedup)."""
        return f"{self.source_system}:{self.source_table}:{self.source_key}"

    def to_message(self, *, session_id: str | None = None) -> QueueMessage:
        """Serialise for the inbound queue, with application properties an operator can read at a glance."""
        return QueueMessage(
            body=self.body(),
            message_id=self.message_id(),
            session_id=session_id or self.record_id,
            correlation_id=self.correlation_id,
            application_properties={
                "flow": self.flow,
                "system": self.source_system,
                "table": self.source_table,
                "key": self.source_key,
                "operation": self.operation,
                "correlation_id": self.correlation_id,
                "schema_version": self.schema_version,
            },
        )

    def body(self) -> bytes:
        """The envelope as UTF-8 JSON; a lone surrogate in a value (`\\ud800`) is escaped, and reads back exactly."""
        try:
            return self.model_dump_json().encode()
        except (PydanticSerializationError, UnicodeEncodeError):
            # Strict UTF-8 cannot hold a lone surrogate; ASCII-escaped JSON can, and json.loads restores it.
            return json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()

    def message_id(self) -> str:
        """Deterministic id: the same source change always yields the same message id (dedup-friendly)."""
        version = self.source_version or (self.source_modified.isoformat() if self.source_modified else "")
        raw = f"{self.flow}|{self.record_id}|{self.operation}|{version}|{self.waits}"
        if self.origin == "reconcile":
            # A repair re-sends a change already enqueued once: its correlation id names the drift it repairs,
            # so the same drift is enqueued once and a new drift of the same source version again.
            raw += f"|reconcile|{self.correlation_id}"
        try:
            return str(uuid.uuid5(uuid.NAMESPACE_URL, raw))
        except UnicodeEncodeError:
            # A lone surrogate: its exact code units, in a namespace of their own, so no look-alike shares the id.
            return str(uuid.uuid5(_SURROGATE_IDS, raw.encode("utf-8", "surrogatepass").hex()))

    @classmethod
    def from_body(cls, body: bytes | str) -> ChangeEnvelope:
        """Parse a queue message body; a malformed body is a permanent `EnvelopeError`."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EnvelopeError(f"message body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise EnvelopeError("message body must be a JSON object (the change envelope)")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise EnvelopeError(f"unsupported envelope schema_version {version!r} (expected {SCHEMA_VERSION})")
        try:
            return cls.model_validate(data)
        except PydanticValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
            )
            raise EnvelopeError(f"invalid change envelope: {problems}") from exc


def wire_text(text: str) -> str:
    """`text` with each lone surrogate written as `\\udXXX`: a broker carries only valid UTF-8 strings.

    For message metadata (ids, session ids, properties, dead-letter text), whose exact value is never read
    back as data: the body carries the data, exactly.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class QueueMessage(BaseModel):
    """A message as sent to the inbound queue (Service Bus shape, transport-neutral)."""

    model_config = ConfigDict(extra="forbid")

    body: bytes
    message_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    session_id: str | None = None
    correlation_id: str | None = None
    content_type: str = "application/json"
    application_properties: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("message_id", "session_id", "correlation_id", "content_type")
    @classmethod
    def _valid_text(cls, value: str | None) -> str | None:
        return wire_text(value) if value is not None else None

    @field_validator("application_properties")
    @classmethod
    def _valid_properties(cls, value: dict[str, str | int | float | bool]) -> dict[str, str | int | float | bool]:
        return {wire_text(k): wire_text(v) if isinstance(v, str) else v for k, v in value.items()}


class ReceivedMessage(BaseModel):
    """A message received under a peek-lock (or peeked from the dead-letter sub-queue)."""

    model_config = ConfigDict(extra="forbid")

    body: bytes
    message_id: str
    sequence_number: int
    lock_token: str
    delivery_count: int
    """How many times this message has been delivered, this delivery included (Service Bus semantics)."""
    enqueued_at: datetime
    locked_until: datetime | None = None
    session_id: str | None = None
    correlation_id: str | None = None
    content_type: str = "application/json"
    application_properties: dict[str, str | int | float | bool] = Field(default_factory=dict)
    dead_letter_reason: str | None = None
    dead_letter_description: str | None = None
    scheduled_at: datetime | None = None
    """Set on a peeked main-queue message that is scheduled: when it becomes deliverable."""
