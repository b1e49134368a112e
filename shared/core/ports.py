"""Ports (typing.Protocol) between the pure core and its adapters: state, queue, record sinks and sources."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from shared.core.envelope import QueueMessage, ReceivedMessage
from shared.core.errors import SyncError

GEOMETRY_KEY = "@geometry"
"""Reserved payload key holding a record's geometry (ArcGIS JSON geometry) next to its attributes."""
ATTACHMENTS_KEY = "@attachments"
"""Reserved payload key listing a record's attachments (see `AttachmentRef`), when the source has them."""


# --------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Link:
    """A cross-reference: record `key_a` in `system_a` is the same business record as `key_b` in `system_b`."""

    entity: str
    system_a: str
    key_a: str
    system_b: str
    key_b: str


@dataclass(frozen=True)
class Snapshot:
    """The last in-sync state Syncline knows of one record in one system (drives echo and conflicts)."""

    system: str
    table: str
    key: str
    values: Mapping[str, Any]
    """Field values in that system's own representation, as last written or read by Syncline."""
    hash: str
    """sha256 of the canonical JSON of `values`."""
    modified: datetime | None
    """Logical modification time of those values in that system (the source change's modified time)."""


@dataclass(frozen=True)
class Checkpoint:
    """A named cursor (e.g. an ArcGIS serverGen) with an opaque etag for optimistic concurrency."""

    name: str
    value: str
    etag: str
    updated_at: datetime


class CheckpointConflictError(Exception):
    """Another controller moved the checkpoint since it was read; re-read and decide again."""


AuditDecision = Literal[
    "written", "skipped_echo", "skipped_noop", "conflict_resolved", "deferred", "dead_lettered",
    "retry_scheduled", "rejected", "replayed", "id_propagated", "cascaded", "deleted", "enqueued", "duplicate_dropped",
    "cascade_triggered",
]
"""`cascaded` is a child a cascade set; `cascade_triggered` is its parent's side (the children it set, named)."""


@dataclass(frozen=True)
class AuditEntry:
    """One decision Syncline took about one record; the ledger is append-only."""

    at: datetime
    correlation_id: str
    flow: str
    decision: AuditDecision
    system: str
    table: str
    key: str
    detail: str = ""
    reason: str | None = None


@runtime_checkable
class StateStore(Protocol):
    """Cross-references, record snapshots, checkpoints, dedup keys and the audit ledger."""

    async def get_links(self, entity: str, system: str, keys: Sequence[str], other_system: str) -> dict[str, str]:
        """Map each of `keys` (in `system`) to its linked key in `other_system`; unknown keys are absent."""
        ...

    async def put_links(self, links: Sequence[Link]) -> None:
        """Store links (both directions are resolvable afterwards); re-putting a link is a no-op."""
        ...

    async def get_snapshots(self, system: str, table: str, keys: Sequence[str]) -> dict[str, Snapshot]:
        """Return the snapshots that exist for `keys`."""
        ...

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Insert or replace snapshots."""
        ...

    async def delete_snapshots(self, system: str, table: str, keys: Sequence[str]) -> None:
        """Forget snapshots (after a delete)."""
        ...

    async def has_snapshots(self, system: str, table: str) -> bool:
        """Whether any snapshot of (`system`, `table`) exists: one request, where reading keys costs one per key
        on Table Storage (the engine probes the per-record layout of earlier versions before reading it)."""
        ...

    async def get_checkpoint(self, name: str) -> Checkpoint | None:
        """Read a checkpoint, or None when it was never set."""
        ...

    async def put_checkpoint(self, name: str, value: str, *, expected_etag: str | None) -> Checkpoint:
        """Compare-and-set: `expected_etag=None` means "must not exist yet"; raises CheckpointConflictError."""
        ...

    async def remember(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """Record dedup keys; return the subset that had already been remembered before this call."""
        ...

    async def seen(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace` (read-only: remembers nothing)."""
        ...

    async def claim(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace`, as `seen` reports it; remembers nothing.

        It may leave a claim on the other keys (Table Storage checks a batch of new keys with one insert per 100
        instead of a read per key). A claim is not remembered: `seen`, `claim` and `remember` all ignore it, so a
        caller that fails before `confirm` loses nothing.
        """
        ...

    async def confirm(self, namespace: str, keys: Sequence[str]) -> None:
        """Remember `keys` (claimed or not) without reporting which were known: a blind batch of writes."""
        ...

    async def forget_remembered(self, before: datetime) -> int:
        """Drop dedup keys remembered before `before` (retention); returns how many were dropped."""
        ...

    async def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append decisions to the ledger."""
        ...

    async def read_audit(
        self, *, limit: int = 100, correlation_id: str | None = None, decision: str | None = None
    ) -> list[AuditEntry]:
        """Newest first."""
        ...

    async def read_audit_for(self, system: str, keys: Sequence[str], *, limit: int = 100) -> list[AuditEntry]:
        """The ledger entries about records `keys` of `system` (matched exactly), newest first, at most `limit`.

        An indexed lookup on both runtimes (never a scan of the ledger). Entries appended before this method
        existed may be missing on Table Storage, which indexes entries by record only from then on.
        """
        ...

    # Failed attempts: a message is dead-lettered for its own failures, never for the locks that crashed
    # processes lost (those raise the broker's delivery count only).

    async def record_failures(self, keys: Sequence[str]) -> dict[str, int]:
        """Count one more failed attempt of each of `keys` (message ids); returns each key's count after it."""
        ...

    async def clear_failures(self, keys: Sequence[str]) -> None:
        """Forget the failed attempts of `keys` (their messages were settled); unknown keys are ignored."""
        ...

    async def forget_failures(self, before: datetime) -> int:
        """Drop failure counts last raised before `before` (retention); returns how many were dropped."""
        ...

    # Leases: one writer per record across processes (webhook invocations, scaled-out controllers).

    async def acquire_leases(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> set[str]:
        """Take, or extend when `owner` holds it, the lease of each key until now + `ttl_seconds`.

        Returns the keys `owner` holds afterwards; a key leased to another owner and not expired is left alone.
        """
        ...

    async def release_leases(self, keys: Sequence[str], owner: str) -> None:
        """Release the leases of `keys` that `owner` holds (a lease taken over since is left alone)."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...


# --------------------------------------------------------------------------------------------- queue


@dataclass(frozen=True)
class QueueDepth:
    """Message counts of the inbound queue and its dead-letter sub-queue."""

    active: int
    scheduled: int
    dead_letter: int


@runtime_checkable
class InboundQueue(Protocol):
    """The inbound queue with Azure Service Bus semantics (peek-lock, delivery count, DLQ, scheduling).

    A message is delivered under a lock; `complete` removes it, `abandon` releases it for redelivery (its
    delivery count already went up when it was received), and when a received message's delivery count
    would exceed `max_delivery_count` it is moved to the dead-letter sub-queue with reason
    `MAX_DELIVERY_EXCEEDED` instead of being delivered. A lock that expires counts as an abandon. While a
    message of a session is locked, later messages of the same session are not delivered (per-record order).
    """

    max_delivery_count: int

    async def send(self, messages: Sequence[QueueMessage], *, scheduled_at: datetime | None = None) -> None:
        """Enqueue messages, visible now or at `scheduled_at`."""
        ...

    async def receive(self, max_messages: int, *, max_wait_seconds: float = 0.0) -> list[ReceivedMessage]:
        """Peek-lock up to `max_messages` deliverable messages in sequence order."""
        ...

    async def complete(self, message: ReceivedMessage) -> None:
        """Settle: done, remove the message. Raises `LockLostError` if the lock expired."""
        ...

    async def abandon(self, message: ReceivedMessage) -> None:
        """Settle: release the lock so the message is delivered again."""
        ...

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        """Settle: move to the dead-letter sub-queue with `DeadLetterReason` / `DeadLetterErrorDescription`."""
        ...

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        """Extend the lock; returns the new `locked_until`."""
        ...

    async def peek_dead_letters(self, max_messages: int = 100) -> list[ReceivedMessage]:
        """Browse the dead-letter sub-queue without locking."""
        ...

    async def peek_messages(self, max_messages: int = 100) -> list[ReceivedMessage]:
        """Browse the main queue (active, locked and scheduled messages) in sequence order without locking; a
        message not deliverable before a later time has `scheduled_at` set. May raise where the broker refuses
        to browse (Service Bus: a session-enabled queue without a session)."""
        ...

    async def receive_dead_letters(self, max_messages: int) -> list[ReceivedMessage]:
        """Peek-lock messages from the dead-letter sub-queue (to replay them: send a copy, then complete)."""
        ...

    async def depth(self) -> QueueDepth:
        """Counts of active, scheduled and dead-lettered messages."""
        ...

    async def close(self) -> None:
        """Release resources."""
        ...


class LockLostError(Exception):
    """The message lock expired (or the message was settled already) before settlement."""


# ---------------------------------------------------------------------------------------- connectors


@dataclass(frozen=True)
class AttachmentRef:
    """An attachment of a source record (an ArcGIS attachment, a Dataverse note)."""

    id: str
    name: str
    content_type: str
    size: int


@dataclass
class Attachment:
    """Attachment content to write to a target record."""

    name: str
    content_type: str
    data: bytes
    source_id: str
    """The attachment's id in the source system (makes re-sending idempotent)."""


@dataclass
class SourceRecord:
    """A record as read from a system: key, values (geometry under GEOMETRY_KEY) and change metadata."""

    key: str
    values: dict[str, Any]
    modified: datetime | None = None
    version: str | None = None
    deleted: bool = False
    attachments: list[AttachmentRef] = field(default_factory=list)


@dataclass(frozen=True)
class Bind:
    """A Dataverse lookup binding: navigation property -> /entityset(id)."""

    entity_set: str
    key: str


WriteAction = Literal["upsert", "update", "delete"]


def join_key(parts: Iterable[str]) -> str:
    """A composite key (F&O `company|number`, SAP `order|item`): parts joined by `|`, `|` and `\\` escaped."""
    return "|".join(p.replace("\\", "\\\\").replace("|", "\\|") for p in parts)


def split_key(key: str) -> list[str]:
    """Inverse of `join_key`; ValueError on a dangling escape (a `\\` not before `\\` or `|`)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(key)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, None)
            if nxt not in ("\\", "|"):
                raise ValueError(f"key {key!r} has a dangling escape")
            current.append(nxt)
        elif ch == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


LINES_KEY = "@lines"
"""Payload/snapshot key of a document's lines (read with the header, written with it)."""


@dataclass
class LineWrite:
    """One line of a document written with its header (an F&O sales order line, an SAP `to_Item` entry)."""

    source_key: str
    values: dict[str, Any]
    """Target line field values (without the header key fields, which the sink fills in)."""
    match: dict[str, str]
    """{target line field: source line key}: finds the line again, so a replay never duplicates it."""


@dataclass
class Lines:
    """The lines of a header WriteOp. Sinks write the header, then make each item exist exactly once under it
    (create, or update the one found by `match`); target lines without an item are left alone."""

    table: str
    """Target entity set of the lines (F&O `SalesOrderLines`) or navigation property (SAP `to_Item`)."""
    parent_fields: dict[str, str]
    """{line field: header field}: header values (e.g. the new order number) copied onto every line."""
    items: list[LineWrite] = field(default_factory=list)


@dataclass
class WriteOp:
    """One write to one target record. The sink decides how (batch, changeset, applyEdits)."""

    op_id: str
    action: WriteAction
    table: str
    key: str | None = None
    """The target's primary key (Dataverse GUID, ArcGIS GlobalID) when Syncline knows it."""
    match: dict[str, str] | None = None
    """How to find the record when `key` is unknown: {field: value} (Dataverse alternate key / ArcGIS field)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Target field values in the target's representation (geometry under GEOMETRY_KEY)."""
    binds: dict[str, Bind] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    correlation_id: str = ""
    lines: Lines | None = None
    """Document lines written with this header (only on upserts of flows with `lines`)."""


@dataclass
class WriteResult:
    """The outcome of one WriteOp: the target key on success, or the error that failed only this op."""

    op_id: str
    ok: bool
    key: str | None = None
    created: bool = False
    error: SyncError | None = None


@runtime_checkable
class RecordSink(Protocol):
    """Writes records into one system."""

    system: str

    async def write(self, ops: Sequence[WriteOp]) -> list[WriteResult]:
        """Apply ops (in batches); one result per op, in order. One bad record fails only itself.

        Raises a `SyncError` only when the whole call failed (e.g. auth, throttling that outlived the
        short in-call retry); per-record failures come back as results with `ok=False`.
        """
        ...

    async def select(
        self,
        table: str,
        *,
        equals: Mapping[str, Any],
        not_in: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[SourceRecord]:
        """Records whose fields equal `equals` and are not in `not_in` (every value escaped by the sink).

        A list or tuple value in `equals` matches any of its values (`IN`); the caller keeps such lists short
        (at most 100 values) so every query fits a URL.
        """
        ...

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """Read records by primary key (missing keys are absent)."""
        ...


@runtime_checkable
class ChangeSource(Protocol):
    """Reads changes of one system since a checkpoint, and the records themselves."""

    system: str

    def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Yield pages of changed records (deletes flagged), each with the checkpoint valid after it."""
        ...

    def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        """Yield every record of a table, page by page (for reconciliation and initial loads)."""
        ...

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """The current records of `keys` (absent keys are missing from the result)."""
        ...

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """Download one attachment's content."""
        ...
