"""The embedded `StateStore`: links, snapshots, checkpoints, dedup keys and audit ledger in a SQLite file."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from shared.core.ports import AuditDecision, AuditEntry, Checkpoint, CheckpointConflictError, Link, Snapshot
from shared.runtime.embedded.database import SqliteDatabase, chunked, from_iso, in_list, to_iso

_SCHEMA = """
CREATE TABLE IF NOT EXISTS links (
    entity TEXT NOT NULL,
    system TEXT NOT NULL,
    key TEXT NOT NULL,
    other_system TEXT NOT NULL,
    other_key TEXT NOT NULL,
    PRIMARY KEY (entity, system, key, other_system)
) WITHOUT ROWID;
-- finds the rows that point at a key, to drop a stale reverse row when a key is re-linked
CREATE INDEX IF NOT EXISTS links_by_target ON links (entity, system, other_system, other_key);

CREATE TABLE IF NOT EXISTS snapshots (
    system TEXT NOT NULL,
    "table" TEXT NOT NULL,
    key TEXT NOT NULL,
    "values" TEXT NOT NULL,
    hash TEXT NOT NULL,
    modified TEXT,
    PRIMARY KEY (system, "table", key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    etag TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS dedup (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    -- kept so that old keys can be pruned by age
    remembered_at TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    flow TEXT NOT NULL,
    decision TEXT NOT NULL,
    system TEXT NOT NULL,
    "table" TEXT NOT NULL,
    key TEXT NOT NULL,
    detail TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS audit_by_at ON audit (at, id);
CREATE INDEX IF NOT EXISTS audit_by_correlation ON audit (correlation_id, at, id);
CREATE INDEX IF NOT EXISTS audit_by_decision ON audit (decision, at, id);
-- one record's entries (`syncline trace`); created on older files too, so their entries are found as well
CREATE INDEX IF NOT EXISTS audit_by_record ON audit (system, key, at, id);
-- the ledger is evidence: the database refuses edits even from a hand-written UPDATE
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit ledger is append-only'); END;

-- failed attempts per message id (not deliveries: a lock lost to a crash is no failure of the record)
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS failures_by_updated ON failures (updated_at);

-- per-record leases: one writer of a record at a time across processes
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TEXT NOT NULL
) WITHOUT ROWID;
"""

_AUDIT_COLUMNS = 'at, correlation_id, flow, decision, system, "table", key, detail, reason'


def _remembered(conn: sqlite3.Connection, namespace: str, keys: Sequence[str]) -> set[str]:
    """The subset of `keys` with a dedup row in `namespace`, in chunks the SQL variable limit allows."""
    found: set[str] = set()
    for chunk in chunked(keys):
        sql = "SELECT key FROM dedup WHERE namespace = ?"
        rows = conn.execute(f"{sql} AND key IN {in_list(len(chunk))}", (namespace, *chunk))
        found.update(key for (key,) in rows)
    return found


class SqliteStateStore:
    """`StateStore` on a local SQLite file (or ":memory:"); each call is one transaction.

    Links are kept one-to-one per (entity, system pair): putting a link for a key that is already linked to
    another key replaces the old link in both directions, so a re-created target record does not leave a
    stale reverse mapping behind.
    """

    def __init__(self, path: str | Path) -> None:
        self._db = SqliteDatabase(path, _SCHEMA, text_safe=True)

    # ------------------------------------------------------------------------------------------ links

    async def get_links(
        self, entity: str, system: str, keys: Sequence[str], other_system: str
    ) -> dict[str, str]:
        """Map each of `keys` (in `system`) to its linked key in `other_system`; unknown keys are absent."""
        unique = list(dict.fromkeys(keys))

        def work(conn: sqlite3.Connection) -> dict[str, str]:
            found: dict[str, str] = {}
            for chunk in chunked(unique):
                sql = "SELECT key, other_key FROM links WHERE entity = ? AND system = ? AND other_system = ?"
                params = (entity, system, other_system, *chunk)
                rows = conn.execute(f"{sql} AND key IN {in_list(len(chunk))}", params)
                found.update(rows)
            return found

        return await self._db.read(work) if unique else {}

    async def put_links(self, links: Sequence[Link]) -> None:
        """Store links in both directions; re-putting a link is a no-op, re-linking a key replaces it."""

        def work(conn: sqlite3.Connection) -> None:
            # Statement by statement, in order: a batch that re-links the same key twice must end with the
            # last link, which set-wise executemany calls (all deletes, then all inserts) would not give.
            for link in links:
                for system, key, other_system, other_key in (
                    (link.system_a, link.key_a, link.system_b, link.key_b),
                    (link.system_b, link.key_b, link.system_a, link.key_a),
                ):
                    # drop the reverse row of a previous link of this key before it is overwritten
                    conn.execute(
                        "DELETE FROM links WHERE entity = ? AND system = ? AND other_system = ?"
                        " AND other_key = ? AND key <> ?",
                        (link.entity, other_system, system, key, other_key),
                    )
                    conn.execute(
                        "INSERT INTO links (entity, system, key, other_system, other_key)"
                        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (entity, system, key, other_system)"
                        " DO UPDATE SET other_key = excluded.other_key",
                        (link.entity, system, key, other_system, other_key),
                    )

        if links:
            await self._db.write(work)

    async def count_links(self, entity: str | None = None) -> int:
        """How many links exist (each pair counted once), for one entity or all of them."""
        # Both directions are stored; `system < other_system` picks exactly one row of each pair.
        sql = "SELECT COUNT(*) FROM links WHERE system < other_system"
        params: tuple[str, ...] = ()
        if entity is not None:
            sql += " AND entity = ?"
            params = (entity,)
        return await self._db.read(lambda conn: int(conn.execute(sql, params).fetchone()[0]))

    async def iter_links(self, entity: str, system: str, other_system: str) -> list[tuple[str, str]]:
        """Every (key in `system`, key in `other_system`) pair of an entity, ordered by the first key."""

        def work(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT key, other_key FROM links WHERE entity = ? AND system = ? AND other_system = ?"
                " ORDER BY key",
                (entity, system, other_system),
            )
            return [(str(key), str(other_key)) for key, other_key in rows]

        return await self._db.read(work)

    # -------------------------------------------------------------------------------------- snapshots

    async def get_snapshots(self, system: str, table: str, keys: Sequence[str]) -> dict[str, Snapshot]:
        """Return the snapshots that exist for `keys`."""
        unique = list(dict.fromkeys(keys))

        def work(conn: sqlite3.Connection) -> dict[str, Snapshot]:
            found: dict[str, Snapshot] = {}
            for chunk in chunked(unique):
                sql = 'SELECT key, "values", hash, modified FROM snapshots WHERE system = ? AND "table" = ?'
                rows = conn.execute(f"{sql} AND key IN {in_list(len(chunk))}", (system, table, *chunk))
                for key, values, digest, modified in rows:
                    found[key] = Snapshot(
                        system=system,
                        table=table,
                        key=key,
                        values=json.loads(values),
                        hash=digest,
                        modified=from_iso(modified) if modified is not None else None,
                    )
            return found

        return await self._db.read(work) if unique else {}

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Insert or replace snapshots (values must be JSON-serialisable, as their hash already requires)."""
        rows = [
            (
                snap.system,
                snap.table,
                snap.key,
                json.dumps(dict(snap.values), ensure_ascii=False, separators=(",", ":")),
                snap.hash,
                to_iso(snap.modified) if snap.modified is not None else None,
            )
            for snap in snapshots
        ]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                'INSERT INTO snapshots (system, "table", key, "values", hash, modified)'
                " VALUES (?, ?, ?, ?, ?, ?)"
                ' ON CONFLICT (system, "table", key) DO UPDATE SET "values" = excluded."values",'
                " hash = excluded.hash, modified = excluded.modified",
                rows,
            )

        if rows:
            await self._db.write(work)

    async def delete_snapshots(self, system: str, table: str, keys: Sequence[str]) -> None:
        """Forget snapshots (after a delete); unknown keys are ignored."""
        unique = list(dict.fromkeys(keys))

        def work(conn: sqlite3.Connection) -> None:
            for chunk in chunked(unique):
                sql = 'DELETE FROM snapshots WHERE system = ? AND "table" = ?'
                conn.execute(f"{sql} AND key IN {in_list(len(chunk))}", (system, table, *chunk))

        if unique:
            await self._db.write(work)

    async def has_snapshots(self, system: str, table: str) -> bool:
        """Whether any snapshot of (`system`, `table`) exists."""

        def work(conn: sqlite3.Connection) -> bool:
            sql = 'SELECT 1 FROM snapshots WHERE system = ? AND "table" = ? LIMIT 1'
            return conn.execute(sql, (system, table)).fetchone() is not None

        return await self._db.read(work)

    # ------------------------------------------------------------------------------------ checkpoints

    async def get_checkpoint(self, name: str) -> Checkpoint | None:
        """Read a checkpoint, or None when it was never set."""

        def work(conn: sqlite3.Connection) -> Checkpoint | None:
            row = conn.execute(
                "SELECT value, etag, updated_at FROM checkpoints WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return None
            return Checkpoint(name=name, value=row[0], etag=row[1], updated_at=from_iso(row[2]))

        return await self._db.read(work)

    async def put_checkpoint(self, name: str, value: str, *, expected_etag: str | None) -> Checkpoint:
        """Compare-and-set: `expected_etag=None` means "must not exist yet"; else CheckpointConflictError."""
        checkpoint = Checkpoint(name=name, value=value, etag=uuid.uuid4().hex, updated_at=datetime.now(UTC))
        stamp = to_iso(checkpoint.updated_at)

        def work(conn: sqlite3.Connection) -> None:
            # One statement each way, so the check and the write are atomic even across processes.
            if expected_etag is None:
                cursor = conn.execute(
                    "INSERT INTO checkpoints (name, value, etag, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (name) DO NOTHING",
                    (name, value, checkpoint.etag, stamp),
                )
            else:
                cursor = conn.execute(
                    "UPDATE checkpoints SET value = ?, etag = ?, updated_at = ? WHERE name = ? AND etag = ?",
                    (value, checkpoint.etag, stamp, name, expected_etag),
                )
            if cursor.rowcount != 1:
                expectation = "not to exist" if expected_etag is None else f"to have etag {expected_etag!r}"
                raise CheckpointConflictError(
                    f"checkpoint {name!r} was expected {expectation} but another writer moved it; re-read it"
                )

        await self._db.write(work)
        return checkpoint

    # ---------------------------------------------------------------------------------------- dedup

    async def remember(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """Record dedup keys; return the subset that had already been remembered before this call."""
        unique = list(dict.fromkeys(keys))
        stamp = to_iso(datetime.now(UTC))

        def work(conn: sqlite3.Connection) -> set[str]:
            seen = _remembered(conn, namespace, unique)
            conn.executemany(
                "INSERT INTO dedup (namespace, key, remembered_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [(namespace, key, stamp) for key in unique if key not in seen],
            )
            return seen

        return await self._db.write(work) if unique else set()

    async def seen(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace` (read-only)."""
        unique = list(dict.fromkeys(keys))

        def work(conn: sqlite3.Connection) -> set[str]:
            return _remembered(conn, namespace, unique)

        return await self._db.read(work) if unique else set()

    async def claim(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace` (a read: one local query costs what a claim would)."""
        return await self.seen(namespace, keys)

    async def confirm(self, namespace: str, keys: Sequence[str]) -> None:
        """Remember `keys`."""
        await self.remember(namespace, keys)

    async def forget_remembered(self, before: datetime) -> int:
        """Drop dedup keys remembered before `before` (retention); returns how many were dropped."""
        cutoff = to_iso(before)

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM dedup WHERE remembered_at < ?", (cutoff,)).rowcount

        return int(await self._db.write(work))

    # ---------------------------------------------------------------------------------------- audit

    async def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append decisions to the ledger (there is no API to change or remove them)."""
        rows = [
            (to_iso(e.at), e.correlation_id, e.flow, e.decision, e.system, e.table, e.key, e.detail, e.reason)
            for e in entries
        ]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany(
                'INSERT INTO audit (at, correlation_id, flow, decision, system, "table", key, detail, reason)'
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

        if rows:
            await self._db.write(work)

    async def read_audit(
        self, *, limit: int = 100, correlation_id: str | None = None, decision: str | None = None
    ) -> list[AuditEntry]:
        """Newest first (by `at`, then by insertion for equal times), optionally filtered."""
        if limit <= 0:
            return []
        conditions: list[str] = []
        params: list[str | int] = []
        if correlation_id is not None:
            conditions.append("correlation_id = ?")
            params.append(correlation_id)
        if decision is not None:
            conditions.append("decision = ?")
            params.append(decision)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        # `where` is made of the fixed fragments above; every value is bound
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit {where} ORDER BY at DESC, id DESC LIMIT ?"  # noqa: S608
        params.append(limit)

        def work(conn: sqlite3.Connection) -> list[AuditEntry]:
            return [
                AuditEntry(
                    at=from_iso(at),
                    correlation_id=corr,
                    flow=flow,
                    decision=cast(AuditDecision, dec),
                    system=system,
                    table=table,
                    key=key,
                    detail=detail,
                    reason=reason,
                )
                for at, corr, flow, dec, system, table, key, detail, reason in conn.execute(sql, params)
            ]

        return await self._db.read(work)

    async def read_audit_for(self, system: str, keys: Sequence[str], *, limit: int = 100) -> list[AuditEntry]:
        """The entries about records `keys` of `system`, newest first (by `at`, then insertion), at most `limit`."""
        unique = list(dict.fromkeys(keys))
        if limit <= 0 or not unique:
            return []

        def work(conn: sqlite3.Connection) -> list[AuditEntry]:
            found: list[tuple[str, int, AuditEntry]] = []
            for chunk in chunked(unique):
                # the index (system, key, at, id) answers this: no scan of the ledger
                sql = (f"SELECT id, {_AUDIT_COLUMNS} FROM audit WHERE system = ? AND key IN {in_list(len(chunk))}"  # noqa: S608
                       " ORDER BY at DESC, id DESC LIMIT ?")
                for row_id, at, corr, flow, dec, sys_, table, key, detail, reason in conn.execute(
                        sql, (system, *chunk, limit)):
                    entry = AuditEntry(from_iso(at), corr, flow, cast(AuditDecision, dec), sys_, table, key, detail,
                                       reason)
                    found.append((at, row_id, entry))
            found.sort(key=lambda item: (item[0], item[1]), reverse=True)
            return [entry for _, _, entry in found[:limit]]

        return await self._db.read(work)

    # -------------------------------------------------------------------------------- failed attempts

    async def record_failures(self, keys: Sequence[str]) -> dict[str, int]:
        """Count one more failed attempt of each of `keys`; returns each key's count after it."""
        unique = list(dict.fromkeys(keys))
        stamp = to_iso(datetime.now(UTC))

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            conn.executemany(
                "INSERT INTO failures (key, count, updated_at) VALUES (?, 1, ?)"
                " ON CONFLICT (key) DO UPDATE SET count = count + 1, updated_at = excluded.updated_at",
                [(key, stamp) for key in unique],
            )
            counts: dict[str, int] = {}
            for chunk in chunked(unique):
                sql = "SELECT key, count FROM failures WHERE key"
                rows = conn.execute(f"{sql} IN {in_list(len(chunk))}", chunk)
                counts.update((str(key), int(count)) for key, count in rows)
            return counts

        return await self._db.write(work) if unique else {}

    async def clear_failures(self, keys: Sequence[str]) -> None:
        """Forget the failed attempts of `keys`; unknown keys are ignored."""
        unique = list(dict.fromkeys(keys))

        def work(conn: sqlite3.Connection) -> None:
            for chunk in chunked(unique):
                sql = "DELETE FROM failures WHERE key"
                conn.execute(f"{sql} IN {in_list(len(chunk))}", chunk)

        if unique:
            await self._db.write(work)

    async def forget_failures(self, before: datetime) -> int:
        """Drop failure counts last raised before `before`; returns how many were dropped."""
        cutoff = to_iso(before)

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM failures WHERE updated_at < ?", (cutoff,)).rowcount

        return int(await self._db.write(work))

    # ------------------------------------------------------------------------------------------ leases

    async def acquire_leases(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> set[str]:
        """Take or extend the leases of `keys` for `owner` in one transaction; returns the keys it holds."""
        unique = list(dict.fromkeys(keys))
        now = datetime.now(UTC)
        until, stamp = to_iso(now + timedelta(seconds=ttl_seconds)), to_iso(now)

        def work(conn: sqlite3.Connection) -> set[str]:
            # One statement per key decides atomically: free, ours, or expired -> ours; else untouched.
            conn.executemany(
                "INSERT INTO leases (key, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                " SET owner = excluded.owner, expires_at = excluded.expires_at"
                " WHERE leases.owner = excluded.owner OR leases.expires_at <= ?",
                [(key, owner, until, stamp) for key in unique],
            )
            held: set[str] = set()
            for chunk in chunked(unique):
                sql = "SELECT key FROM leases WHERE owner = ? AND key"
                held.update(str(key) for (key,) in conn.execute(f"{sql} IN {in_list(len(chunk))}", (owner, *chunk)))
            return held

        return await self._db.write(work) if unique else set()

    async def release_leases(self, keys: Sequence[str], owner: str) -> None:
        """Release the leases of `keys` that `owner` holds."""
        unique = list(dict.fromkeys(keys))

        def work(conn: sqlite3.Connection) -> None:
            for chunk in chunked(unique):
                sql = "DELETE FROM leases WHERE owner = ? AND key"
                conn.execute(f"{sql} IN {in_list(len(chunk))}", (owner, *chunk))

        if unique:
            await self._db.write(work)

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()
