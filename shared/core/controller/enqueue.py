"""Changes onto the queue: envelopes per flow, dropped duplicates, sessions by root parent."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from shared.core.engine import read_snapshots
from shared.core.envelope import ChangeEnvelope, Origin, QueueMessage
from shared.core.errors import SyncError
from shared.core.ports import ATTACHMENTS_KEY, AuditEntry, SourceRecord, StateStore
from shared.mapping.spec import FlowSet

ENQUEUED = "enqueued"
"""Dedup namespace of enqueued changes' message ids (the poll path and the webhook intake share it)."""

POLL_HINT = "poll-hint"
"""Application property `kind` of a queue message that asks the controller to read a change feed."""


def envelopes_for(
    flowset: FlowSet,
    system: str,
    table: str,
    records: Iterable[SourceRecord],
    *,
    origin: Origin,
    mode: str | None = None,
    operation: str | None = None,
    correlation_id: str | None = None,
) -> list[ChangeEnvelope]:
    """One envelope per (record, flow reading that table), optionally only flows of one mode."""
    flows = [f for f in flowset.flows_from(system, table) if mode is None or f.mode == mode]
    out: list[ChangeEnvelope] = []
    for record in records:
        payload = dict(record.values)
        if record.attachments:
            payload[ATTACHMENTS_KEY] = [asdict(a) for a in record.attachments]
        for flow in flows:
            op = "delete" if record.deleted else (operation or "upsert")
            kwargs: dict[str, Any] = {}
            if correlation_id:
                kwargs["correlation_id"] = correlation_id
            out.append(ChangeEnvelope(
                flow=flow.name, operation=op,
                source_system=system, source_table=table, source_key=record.key,
                source_version=record.version, source_modified=record.modified,
                payload=payload, origin=origin, **kwargs,
            ))
    return out


def split_duplicates(envelopes: Sequence[ChangeEnvelope], known: Collection[str],
                     now: datetime) -> tuple[list[ChangeEnvelope], list[AuditEntry]]:
    """The envelopes to send (message id neither `known` nor earlier in the batch), and the audit entries of the
    others; the caller decides when to write those (before or after its send)."""
    fresh: list[ChangeEnvelope] = []
    batch_ids: set[str] = set()
    dropped: list[AuditEntry] = []
    for env in envelopes:
        mid = env.message_id()
        if mid in known or mid in batch_ids:
            dropped.append(AuditEntry(now, env.correlation_id, env.flow, "duplicate_dropped", env.source_system,
                                      env.source_table, env.source_key, f"change already enqueued as {mid}"))
            continue
        batch_ids.add(mid)
        fresh.append(env)
    return fresh, dropped


async def drop_duplicates(
    state: StateStore, envelopes: Sequence[ChangeEnvelope], now: datetime
) -> list[ChangeEnvelope]:
    """Keep envelopes whose message id was never enqueued before (a webhook and a poll can report one change).

    Message ids are derived from the record, operation and source version, so the same change seen twice
    has the same id; a later change of the record has a new version and passes. The lookup remembers nothing
    (a claim, which costs Table Storage one insert per 100 new keys where a read costs one per key, is not a
    remembered key): the caller calls `remember_enqueued` once the messages are durably on the queue, so a failed
    send (or a crash before it) leaves no key behind that would drop the change when it is read again.
    """
    if not envelopes:
        return []
    seen = await state.claim(ENQUEUED, [e.message_id() for e in envelopes])
    fresh, dropped = split_duplicates(envelopes, seen, now)
    if dropped:
        await state.append_audit(dropped)
    return fresh


async def remember_enqueued(state: StateStore, envelopes: Sequence[ChangeEnvelope]) -> None:
    """Record the message ids of envelopes now durably on the queue (see `drop_duplicates`)."""
    if envelopes:
        await state.confirm(ENQUEUED, [e.message_id() for e in envelopes])


async def to_messages(flowset: FlowSet, state: StateStore, envelopes: Sequence[ChangeEnvelope]) -> list[QueueMessage]:
    """Queue messages whose session id is the record's root parent, so a parent is processed before its
    children and one family's changes keep their order (Service Bus sessions).

    The chain is walked through each flow's first lookup, reading the parents' lookup values from the
    snapshots Syncline keeps; a parent it has never seen ends the walk (that parent is the session).
    """
    out: list[QueueMessage] = []
    cache: dict[tuple[str, str, str], dict[str, Any]] = {}
    for env in envelopes:
        root = env.record_id
        try:
            flow = flowset.flow(env.flow)
        except SyncError:
            out.append(env.to_message())
            continue
        payload: Mapping[str, Any] = env.payload
        for _ in range(8):  # specs are acyclic (validated); the bound is a guard, not a rule
            if not flow.lookups:
                break
            lookup = flow.lookups[0]
            parent_key = payload.get(lookup.source)
            if parent_key in (None, ""):
                break
            flow = flowset.flow(lookup.parent_flow)
            root = f"{env.source_system}:{flow.source.table}:{parent_key}"
            if not flow.lookups:
                break  # the parent has no parent: its snapshot would not be read further
            where = (env.source_system, flow.source.table, str(parent_key))
            if where not in cache:
                snaps = await read_snapshots(state, flow.entity, *where[:2], [where[2]])
                cache[where] = dict(snaps[where[2]].values) if where[2] in snaps else {}
            payload = cache[where]
        out.append(env.to_message(session_id=root))
    return out
