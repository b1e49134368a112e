"""`syncline trace`: every hop and decision for one record, its place on the queue now and its cross-references."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from shared.core.envelope import ReceivedMessage
from shared.core.ports import AuditEntry, InboundQueue, StateStore
from shared.mapping.spec import FlowSet

#: Records one trace follows through links at most (a record is linked to a handful, never to hundreds).
MAX_RECORDS = 32
#: Messages browsed on the queue and on the dead-letter queue to find the record's (a peek never locks).
QUEUE_SCAN = 1000

_GUID = re.compile(r"^\{?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})\}?$")
_ORIGIN = re.compile(r"\borigin (\w+)")


class TraceInputError(Exception):
    """The question cannot be asked (an unknown system name); the CLI prints it as one line, exit code 2."""


@dataclass(frozen=True)
class Hop:
    """One ledger entry on the record's path, with where its change came from (webhook, poll, replay...)."""

    at: datetime
    decision: str
    flow: str
    system: str
    table: str
    key: str
    correlation_id: str
    origin: str | None
    detail: str
    reason: str | None


@dataclass(frozen=True)
class QueuePlace:
    """A message about the record that is still on the queue (active or scheduled) or dead-lettered."""

    where: str
    """"active", "scheduled" or "dead_letter"."""
    message_id: str
    flow: str
    system: str
    key: str
    correlation_id: str | None
    enqueued_at: datetime
    delivery_count: int
    scheduled_at: datetime | None = None
    reason: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class TraceLink:
    """A cross-reference of the record: `system`/`key` is the same business record as `other_system`/`other_key`."""

    entity: str
    system: str
    key: str
    other_system: str
    other_key: str


@dataclass
class Trace:
    """What `trace_record` found; `found` is False when nothing at all is known of the key."""

    system: str
    key: str
    records: list[tuple[str, str]] = field(default_factory=list)
    """(system, key) of the record on every side, the asked one first (as stored: braces and case resolved)."""
    hops: list[Hop] = field(default_factory=list)
    """Oldest first."""
    now: list[QueuePlace] = field(default_factory=list)
    links: list[TraceLink] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the trace could not look at (e.g. a queue the service does not let it browse)."""

    @property
    def found(self) -> bool:
        return bool(self.hops or self.now or self.links)

    @property
    def flows(self) -> list[str]:
        return list(dict.fromkeys(h.flow for h in self.hops))

    def to_json(self) -> dict[str, Any]:
        """The stable JSON shape of `syncline trace --json` (README, "syncline trace")."""

        def plain(value: Any) -> Any:
            if isinstance(value, datetime):
                return value.isoformat()
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {
            "system": self.system,
            "key": self.key,
            "found": self.found,
            "records": [{"system": s, "key": k} for s, k in self.records],
            "flows": self.flows,
            "hops": [plain(asdict(h)) for h in self.hops],
            "now": [plain(asdict(p)) for p in self.now],
            "links": [asdict(link) for link in self.links],
            "notes": self.notes,
        }


def key_variants(system: str, key: str) -> list[str]:
    """The spellings under which `key` may be stored: as typed, and for a GUID the ArcGIS GlobalID form
    (`{UPPER}`) and the Dataverse form (lower case, no braces), whichever `system` it was typed for."""
    key = key.strip()
    variants = [key]
    m = _GUID.match(key)
    if m:
        guid = m.group(1)
        variants += ["{" + guid.upper() + "}", guid.lower(), guid.upper(), "{" + guid.lower() + "}"]
    return list(dict.fromkeys(variants))


def systems_of(flowset: FlowSet) -> list[str]:
    """The systems a trace can start from: every system a flow reads or writes."""
    return sorted({side.system for f in flowset.flows for side in (f.source, f.target)})


async def trace_record(state: StateStore, queue: InboundQueue, flowset: FlowSet, system: str, key: str, *,
                       limit: int = 200, queue_scan: int = QUEUE_SCAN) -> Trace:
    """Trace one record from any side's key: resolve it to its keys on every linked side (links of every flow's
    entity and system pair, followed transitively), read the ledger entries of all of them (`read_audit_for`:
    an index lookup per system, never a scan; the cascades a parent's writes triggered are entries of the parent
    too), and the queue and dead-letter messages about it now. `limit` caps the hops (the newest `limit`, shown
    oldest first)."""
    known = systems_of(flowset)
    if system not in known:
        raise TraceInputError(f"unknown system {system!r}: one of {', '.join(known)}")
    if not key.strip():
        raise TraceInputError("the key is empty")
    trace = Trace(system, key)
    pairs = sorted({(f.entity, a, b) for f in flowset.flows
                    for a, b in ((f.source.system, f.target.system), (f.target.system, f.source.system))})

    # 1. the record's keys on every side: the asked key in every spelling, then whatever links reach
    keys: dict[str, list[str]] = {system: key_variants(system, key)}
    frontier = [(system, k) for k in keys[system]]
    links: dict[tuple[str, str, str, str, str], TraceLink] = {}
    while frontier and sum(len(v) for v in keys.values()) <= MAX_RECORDS:
        found_now: list[tuple[str, str]] = []
        by_system: dict[str, list[str]] = {}
        for s, k in frontier:
            by_system.setdefault(s, []).append(k)
        for entity, a, b in pairs:
            asked = by_system.get(a)
            if not asked:
                continue
            for mine, theirs in (await state.get_links(entity, a, asked, b)).items():
                lo, hi = sorted([(a, mine), (b, theirs)])
                links.setdefault((entity, *lo, *hi), TraceLink(entity, a, mine, b, theirs))
                if theirs not in keys.setdefault(b, []):
                    keys[b].append(theirs)
                    found_now.append((b, theirs))
        frontier = found_now
    trace.links = list(links.values())

    # 2. the ledger: one indexed read per system, newest first, merged and shown oldest first
    entries: list[AuditEntry] = []
    for s, ks in keys.items():
        entries += await state.read_audit_for(s, ks, limit=limit)
    entries = _oldest_first(entries)[-limit:]
    stored = {(e.system, e.key) for e in entries} | {(link.system, link.key) for link in trace.links} | {
        (link.other_system, link.other_key) for link in trace.links}

    # 3. where it is now: the queue and the dead-letter queue, matched on the message's system and key
    wanted = {(s, k) for s, ks in keys.items() for k in ks}
    try:
        peeked = await queue.peek_messages(queue_scan)
    except Exception as exc:  # Service Bus refuses to browse a session-enabled queue without a session
        trace.notes.append(f"the queue could not be browsed ({type(exc).__name__}): messages waiting on it for "
                           "this record are not shown; the dead-letter queue was browsed")
        peeked = []
    for message in peeked:
        place = _place(message, wanted, "scheduled" if message.scheduled_at is not None else "active")
        if place is not None:
            trace.now.append(place)
    for message in await queue.peek_dead_letters(queue_scan):
        place = _place(message, wanted, "dead_letter")
        if place is not None:
            trace.now.append(place)
    stored |= {(p.system, p.key) for p in trace.now}

    trace.hops = [Hop(e.at, e.decision, e.flow, e.system, e.table, e.key, e.correlation_id, origin, e.detail, e.reason)
                  for e, origin in zip(entries, _origins(entries), strict=True)]
    # the record as stored on each side (the spellings of the asked key that nothing knows are left out)
    trace.records = [(s, k) for s, ks in keys.items() for k in ks if (s, k) in stored] or [(system, key.strip())]
    return trace


# The order of a change's decisions, for entries of equal time read from different systems (the engine stamps a
# batch's entries with one time; one system's read keeps its own append order, which the stable sort keeps).
_STEP = {decision: n for n, decision in enumerate((
    "enqueued", "duplicate_dropped", "deferred", "skipped_echo", "skipped_noop", "written", "deleted",
    "conflict_resolved", "id_propagated", "cascade_triggered", "cascaded", "retry_scheduled", "rejected",
    "dead_lettered", "replayed"))}


def _oldest_first(entries: list[AuditEntry]) -> list[AuditEntry]:
    """`entries` made of newest-first reads, oldest first: by time, then by the step of a change."""
    oldest = list(reversed(entries))  # first, since the sort is stable: equal keys keep the reads' append order
    oldest.sort(key=lambda e: (e.at, _STEP.get(e.decision, len(_STEP))))
    return oldest


def _origins(entries: list[AuditEntry]) -> list[str | None]:
    """Where each entry's change came from: `origin X` in its own detail (`enqueued`, a direct `written`), "replay"
    for `replayed`, else the latest such of its correlation id before it (a replay keeps the correlation id)."""
    latest: dict[str, str] = {}
    found: list[str | None] = []
    for e in entries:
        own = _own_origin(e)
        if own is not None:
            latest[e.correlation_id] = own
        found.append(own or latest.get(e.correlation_id))
    return found


def _own_origin(entry: AuditEntry) -> str | None:
    if entry.decision == "replayed":
        return "replay"
    if entry.decision in ("enqueued", "written"):
        m = _ORIGIN.search(entry.detail)
        if m:
            return m.group(1)
    return None


def _place(message: ReceivedMessage, wanted: set[tuple[str, str]], where: str) -> QueuePlace | None:
    props = message.application_properties
    system, key = str(props.get("system", "")), str(props.get("key", ""))
    if (system, key) not in wanted:
        return None
    return QueuePlace(where, message.message_id, str(props.get("flow", "")), system, key, message.correlation_id,
                      message.enqueued_at, message.delivery_count, message.scheduled_at,
                      message.dead_letter_reason, message.dead_letter_description)


async def trace_command(system: str, key: str, *, limit: int) -> Trace:
    """`syncline trace`: build the services from the settings, trace one record, close them."""
    from shared.bootstrap import build_services

    services = build_services()
    try:
        return await trace_record(services.state, services.queue, services.flowset, system, key, limit=limit)
    finally:
        await services.aclose()
