"""Snapshots of the last in-sync state: markers, per-entity tables, the earlier per-record layout."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from shared.core.envelope import ChangeEnvelope
from shared.core.ports import LINES_KEY, Snapshot, StateStore, WriteOp
from shared.mapping.engine import same

SEEN_MODIFIED = "@seen_modified"
"""Snapshot key: modified time of the newest change that came *from* this record's own system."""

CASCADED = "@cascaded"
"""Snapshot key: set once every cascade the record's current state triggers has completed (cleared on a write)."""

UNCONFIRMED = "@unconfirmed"
"""Snapshot key: a write to this record may have been applied without an acknowledgement (a 504, a timeout, a
kill before the answer was stored), so what it holds is unknown until that flow writes it again. The value maps
the fields the write would change to what it carried: the record holds either those or the snapshot's values."""

OLD_LAYOUT_RECHECK_SECONDS = 600.0
"""How long the per-record snapshot layout of earlier versions, once found empty for a table, is taken to stay empty
(nothing writes it any more; probed again now and then for instances of an earlier version still running)."""


class OldLayout:
    """Which system tables hold no snapshot in the per-record layout of earlier versions: one probe per table and
    `OLD_LAYOUT_RECHECK_SECONDS`, where a batch would otherwise probe (or read every missing key) each time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._empty_until: dict[tuple[str, str], float] = {}

    async def holds(self, state: StateStore, system: str, table: str) -> bool:
        """Whether (`system`, `table`) may hold snapshots in the old layout."""
        now = self._clock()
        if self._empty_until.get((system, table), now) > now:
            return False
        if await state.has_snapshots(system, table):
            self._empty_until.pop((system, table), None)
            return True
        self._empty_until[(system, table)] = now + OLD_LAYOUT_RECHECK_SECONDS
        return False


def snapshot_table(table: str, entity: str) -> str:
    """Where a record's snapshot is kept for one entity (one pair of flows): per entity, not per record.

    A value one entity's flow wrote is an echo for that entity's reverse flow only. A record in two entities
    (a Salesforce Account that is an F&O customer and a Customer 360 account) has one snapshot for each, so a
    change that arrives through one entity's flow still continues through the other's.
    """
    return f"{table}@{entity}"


async def read_snapshots(state: StateStore, entity: str, system: str, table: str,
                         keys: Sequence[str], layout: OldLayout | None = None) -> dict[str, Snapshot]:
    """The records' snapshots for `entity`; a record with none yet is read from the per-record snapshot that
    earlier versions kept (returned as the entity's, so the next write stores it in the new place)."""
    found = await state.get_snapshots(system, snapshot_table(table, entity), keys)
    missing = [k for k in keys if k not in found]
    # Nothing writes the old layout any more: once it is empty (or was never used), one probe replaces a read per key.
    if missing and await _old_layout_holds(state, system, table, layout):
        for key, old in (await state.get_snapshots(system, table, missing)).items():
            found[key] = Snapshot(system, snapshot_table(table, entity), key, old.values, old.hash, old.modified)
    return found


async def _old_layout_holds(state: StateStore, system: str, table: str, layout: OldLayout | None) -> bool:
    if layout is None:
        return await state.has_snapshots(system, table)
    return await layout.holds(state, system, table)


async def forget_snapshots(state: StateStore, entity: str, system: str, table: str, keys: Sequence[str],
                           layout: OldLayout | None = None) -> None:
    """Forget deleted records' snapshots for `entity`, and the per-record ones of earlier versions (a key reused
    later must not inherit them)."""
    await state.delete_snapshots(system, snapshot_table(table, entity), keys)
    if keys and await _old_layout_holds(state, system, table, layout):
        await state.delete_snapshots(system, table, keys)


def _written(op: WriteOp) -> dict[str, Any]:
    """What a target record holds once `op` is applied, in its snapshot's terms (values, bound keys, lines)."""
    values = dict(op.values)
    for nav, bind in op.binds.items():
        values[nav] = bind.key
    if op.lines is not None:
        values[LINES_KEY] = [{"key": i.source_key, **i.values} for i in op.lines.items]
    return values


def _covers(snapshot: Mapping[str, Any], projection: Mapping[str, Any]) -> bool:
    # A field absent from the snapshot is empty there (Dataverse images omit null columns).
    return all(same(snapshot.get(k), v) for k, v in projection.items())


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _seen_token(env: ChangeEnvelope) -> str | None:
    """Orderable "when" of a change: modified time, then the source's row version as a tie-breaker.

    Dataverse's modifiedon has one-second resolution, so two edits in one second are ordered by version.
    """
    if env.source_modified is None:
        return None
    digits = "".join(ch for ch in (env.source_version or "") if ch.isdigit())
    return f"{_iso(env.source_modified)}|{digits.zfill(20) if digits else ''}"


def _iso(moment: datetime) -> str:
    """UTC ISO-8601 text, so comparisons of stored times are plain string comparisons."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat()
