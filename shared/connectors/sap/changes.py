"""SAP change detection: event-mesh CloudEvents, change-time and content-hash polls -> change envelopes."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.connectors.sap.codecs import SYSTEM, _entity, _parse_sap_datetime, filter_literal
from shared.connectors.sap.reads import SapReads
from shared.core.dates import iso_z
from shared.core.errors import EnvelopeError, RejectedError
from shared.core.ports import SourceRecord
from shared.payloads import SapCloudEvent, bad_values, read_json, validate


@dataclass(frozen=True)
class SapEvent:
    """One SAP business event (event-mesh CloudEvent) and the record it is about."""

    event_type: str
    event_id: str
    source: str
    time: datetime | None
    entity_set: str
    key: str
    operation: str
    """Created, Changed, Deleted ... (the type's last but one part)."""
    data: dict[str, Any] = field(default_factory=dict)


EVENT_OBJECTS: dict[str, tuple[str, str]] = {
    "sap.s4.beh.salesorder.v1.SalesOrder": ("A_SalesOrder", "SalesOrder"),
    "sap.s4.beh.businesspartner.v1.BusinessPartner": ("A_BusinessPartner", "BusinessPartner"),
}
"""Event type prefix -> (entity set, data field holding the key)."""


def parse_event(body: bytes | str | Mapping[str, Any]) -> SapEvent:
    """Parse a CloudEvent such as `sap.s4.beh.salesorder.v1.SalesOrder.Changed.v1` (EnvelopeError when malformed)."""
    data = read_json(body, f"{SYSTEM} event: body") if isinstance(body, bytes | str) else body
    if not isinstance(data, Mapping):
        raise EnvelopeError(f"{SYSTEM} event: expected a JSON object, got {type(data).__name__}")
    validate(SapCloudEvent, data, f"{SYSTEM} event")
    with bad_values(f"{SYSTEM} event"):
        return _checked_event(dict(data))


def _checked_event(data: dict[str, Any]) -> SapEvent:
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type.count(".") < 2:
        raise EnvelopeError(f"{SYSTEM} event: 'type' is missing or malformed ({event_type!r})")
    prefix, operation, _version = event_type.rsplit(".", 2)
    known = EVENT_OBJECTS.get(prefix)
    if known is None:
        raise EnvelopeError(f"{SYSTEM} event: unknown event type {event_type!r} (known: "
                            f"{', '.join(p + '.<Operation>.v1' for p in sorted(EVENT_OBJECTS))})")
    payload = data.get("data")
    if not isinstance(payload, dict):
        raise EnvelopeError(f"{SYSTEM} event {event_type}: 'data' must be an object")
    entity_set, key_field = known
    key = payload.get(key_field)
    if not isinstance(key, str) or not key:
        raise EnvelopeError(f"{SYSTEM} event {event_type}: data.{key_field} is missing")
    event_id = data.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise EnvelopeError(f"{SYSTEM} event {event_type}: 'id' is missing")
    raw_time = data.get("time")
    when = _parse_sap_datetime(raw_time)
    if when is None and raw_time not in (None, ""):
        raise EnvelopeError(f"{SYSTEM} event {event_type}: time {str(raw_time)[:40]!r} is not a date/time in range "
                            "(years 1-9999)")
    return SapEvent(event_type, event_id, str(data.get("source") or ""), when, entity_set, key, operation,
                    dict(payload))


@dataclass
class _Checkpoint:
    at: datetime | None
    keys: set[str]

    @classmethod
    def parse(cls, text: str | None, table: str) -> _Checkpoint:
        if not text:
            return cls(None, set())
        stamp, _, keys = text.partition(";")
        at = _parse_sap_datetime(stamp)
        if at is None:
            raise EnvelopeError(f"{SYSTEM}: checkpoint {text!r} for {table} is not '<ISO time>[;keys]'")
        return cls(at, {k for k in keys.split(",") if k})

    def text(self) -> str:
        if self.at is None:
            return ""
        stamp = iso_z(self.at, millis=True)  # four-digit years: a year-500 stamp must parse back
        return stamp + (";" + ",".join(sorted(self.keys)) if self.keys else "")


_HASH_TEXT_LIMIT = 30_000
"""Longest exact content-hash checkpoint (an Azure Table string property holds 32K UTF-16 units)."""
_HASH_BUCKETS = 2048


def _bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % _HASH_BUCKETS


@dataclass
class _HashCheckpoint:
    """Content hashes of a table without change timestamps: `v1:` + base64 of zlib'd JSON.

    Exact (`hashes`: key -> hash) while that fits `_HASH_TEXT_LIMIT` (about 2,500 records); beyond that
    `buckets` holds one digest per hash bucket of keys, and every record of a bucket that changed is
    reported (the engine drops those whose mapped values did not change as echoes).
    """

    generation: int
    hashes: dict[str, str] = field(default_factory=dict)
    buckets: list[str] | None = None

    @classmethod
    def parse(cls, text: str | None, table: str) -> _HashCheckpoint:
        if not text:
            return cls(0)
        try:
            if not text.startswith("v1:"):
                raise ValueError("unknown version")
            data = json.loads(zlib.decompress(base64.b64decode(text[3:])))
            buckets = data.get("b")
            return cls(int(data["g"]), {str(k): str(v) for k, v in dict(data.get("h") or {}).items()},
                       [str(b) for b in buckets] if isinstance(buckets, list) else None)
        except (ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            raise EnvelopeError(f"{SYSTEM}: checkpoint for {table} is not a content-hash checkpoint ({exc})") from exc

    @classmethod
    def of(cls, generation: int, hashes: Mapping[str, str]) -> _HashCheckpoint:
        exact = cls(generation, dict(hashes))
        if len(exact.text()) <= _HASH_TEXT_LIMIT:
            return exact
        members: list[list[str]] = [[] for _ in range(_HASH_BUCKETS)]
        for key in sorted(hashes):
            members[_bucket(key)].append(f"{key}={hashes[key]}")
        return cls(generation, {}, [hashlib.sha256("\n".join(m).encode()).hexdigest()[:12] for m in members])

    def changed(self, hashes: Mapping[str, str], now: _HashCheckpoint) -> tuple[list[str], list[str]]:
        """(changed or new keys, keys gone) from this checkpoint to `hashes` (whose checkpoint is `now`)."""
        if self.buckets is None:
            return ([k for k, h in hashes.items() if self.hashes.get(k) != h],
                    [k for k in self.hashes if k not in hashes])
        if now.buckets is None:
            now = _HashCheckpoint(now.generation, {}, _HashCheckpoint.of(now.generation, hashes).buckets)
        moved = {n for n, (a, b) in enumerate(zip(self.buckets, now.buckets or [], strict=False)) if a != b}
        # A bucket digest cannot say which key left it: deletions go unreported in this mode.
        return [k for k in hashes if _bucket(k) in moved], []

    def text(self) -> str:
        data: dict[str, Any] = {"g": self.generation}
        if self.buckets is not None:
            data["b"] = self.buckets
        else:
            data["h"] = dict(sorted(self.hashes.items()))
        return "v1:" + base64.b64encode(zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 9)).decode()


class SapChanges(SapReads):
    """`changes_since`: change-time polls (orders, partners) and content-hash polls (ProductAvailability)."""

    def _change_filter(self, table: str, since: datetime) -> str:
        if _entity(table).changes == "order":
            return f"LastChangeDateTime ge {filter_literal(since, 'LastChangeDateTime')}"
        local = since.astimezone(self._tz)
        day = f"datetime'{local.date().isoformat()}T00:00:00'"
        clock = f"time'PT{local.hour:02d}H{local.minute:02d}M{local.second:02d}S'"
        parts = [f"{d} gt {day} or ({d} eq {day} and {t} ge {clock})"
                 for d, t in (("LastChangeDate", "LastChangeTime"), ("CreationDate", "CreationTime"))]
        return " or ".join(f"({p})" for p in parts)

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Records changed since the checkpoint ("Change detection" in `connector.py`), with it after each page."""
        kind = _entity(table).changes
        if kind is None:
            raise RejectedError(f"{SYSTEM}: {table} has no change timestamp; read its records through their parent "
                                "(A_SalesOrder / A_BusinessPartner) or scan it")
        if kind == "hash":
            async for batch in self._hash_changes(table, checkpoint):
                yield batch
            return
        previous = _Checkpoint.parse(checkpoint, table)
        params = {"$filter": self._change_filter(table, previous.at)} if previous.at is not None else {}
        newest = _Checkpoint(previous.at, set(previous.keys))
        pending: list[SourceRecord] | None = None
        async for page in self._pages(table, params, f"changes of {table}"):
            if pending is not None:
                yield pending, previous.text()
            kept: list[SourceRecord] = []
            for record in page:
                moment = record.modified
                if previous.at is not None and moment is not None and (
                        moment < previous.at or (moment == previous.at and record.key in previous.keys)):
                    continue
                kept.append(record)
                if moment is None:
                    continue
                if newest.at is None or moment > newest.at:
                    newest = _Checkpoint(moment, {record.key})
                elif moment == newest.at:
                    newest.keys.add(record.key)
            pending = kept
        yield pending or [], newest.text()

    async def _hash_changes(self, table: str, checkpoint: str | None
                            ) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """Records whose content hash differs from the checkpoint's, and deletions (keys no longer there).

        Everything is read first (the hashes of all records make the next checkpoint); the changed records
        follow in pages of `page_size`, the earlier pages with the previous checkpoint. Versions are
        `<hash>.<generation>`: a replayed poll repeats its message ids, a record that returns to an earlier
        state is still a new change.
        """
        previous = _HashCheckpoint.parse(checkpoint, table)
        unread: set[str] = set()
        records = {r.key: r async for page in self._product_pages(None, unread) for r in page}
        hashes = {k: r.version or "" for k, r in records.items()}
        # A product SAP did not answer for this time keeps its last known state.
        hashes.update((k, previous.hashes[k]) for k in unread if k in previous.hashes)
        generation = previous.generation + 1
        now = _HashCheckpoint.of(generation, hashes)
        changed, gone = previous.changed(hashes, now)
        changed = [k for k in changed if k in records]
        if not changed and not gone:
            yield [], checkpoint or now.text()
            return
        key_field = _entity(table).keys[0]
        out = [SourceRecord(k, records[k].values, None, f"{hashes[k]}.{generation}") for k in sorted(changed)]
        out += [SourceRecord(k, {key_field: k}, None, f"deleted.{generation}", deleted=True) for k in sorted(gone)]
        pages = [out[n:n + self._page_size] for n in range(0, len(out), self._page_size)]
        for page in pages[:-1]:
            yield page, checkpoint or ""
        yield pages[-1], now.text()
