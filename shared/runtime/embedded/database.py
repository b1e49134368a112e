"""The SQLite connection both embedded adapters share: WAL set-up, one lock, transactions on a worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from shared.runtime.common import to_utc

T = TypeVar("T")

#: Keys per `IN (...)` query: well below SQLITE_MAX_VARIABLE_NUMBER on every build (999 on old ones),
#: leaving room for the few fixed parameters each query adds.
IN_CHUNK = 900


def to_iso(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC text, so that string order in SQL is time order."""
    return to_utc(value).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    """Parse what `to_iso` wrote back into an aware UTC datetime."""
    return to_utc(datetime.fromisoformat(text))


def chunked(items: Sequence[T], size: int = IN_CHUNK) -> Iterator[Sequence[T]]:
    """Yield consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def in_list(count: int) -> str:
    """`(?, ?, ...)` with `count` placeholders: SQL built at run time that never holds a value."""
    return f"({', '.join('?' * count)})"


def _bindable(value: object) -> object:
    """A str strict UTF-8 cannot encode (it holds a lone surrogate) as its `surrogatepass` bytes, a BLOB."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass")
    return value


def _bind(params: Any) -> Any:
    if isinstance(params, Mapping):
        return {name: _bindable(value) for name, value in params.items()}
    return tuple(_bindable(value) for value in params)


def _readable(row: Sequence[object]) -> tuple[Any, ...]:
    return tuple(value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value for value in row)


class _TextSafeCursor:
    """The part of a cursor the state store uses, with `_TextSafeConnection`'s BLOBs read back as str."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else _readable(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [_readable(row) for row in self._cursor.fetchall()]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return (_readable(row) for row in self._cursor)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)  # lastrowid, description, ...: unchanged


class _TextSafeConnection:
    """A connection whose str values survive lone surrogates (`"\\ud800"`, from JSON a SaaS or a webhook sent).

    Python binds str as strict UTF-8, which refuses them; such a str is stored as its `surrogatepass` bytes
    (a BLOB) instead, and every BLOB read comes back as that str: an exact round trip. Every other str is
    stored as TEXT exactly as before, and no str of one kind can equal one of the other, so keys stay
    distinct. Only for tables without BLOB columns (all the state tables).
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = ()) -> _TextSafeCursor:
        return _TextSafeCursor(self._conn.execute(sql, _bind(params)))

    def executemany(self, sql: str, rows: Iterable[Any]) -> _TextSafeCursor:
        return _TextSafeCursor(self._conn.executemany(sql, (_bind(row) for row in rows)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)  # total_changes, executescript, ...: unchanged


#: How long a new connection retries setting up a file another process is setting up at the same moment.
_SETUP_SECONDS = 30.0


class SqliteDatabase:
    """One SQLite connection in WAL mode, shared by the embedded adapters and serialised by a lock.

    Every call runs on a worker thread (`asyncio.to_thread`) so that an fsync never stalls the event loop;
    callers batch their work so that the thread hop is paid once per batch, not once per record. With
    `text_safe`, work gets a connection that stores str values holding lone surrogates (see
    `_TextSafeConnection`); the database must then have no BLOB columns.
    """

    def __init__(self, path: str | Path, schema: str, *, text_safe: bool = False) -> None:
        self._text_safe = text_safe
        target = str(path)
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None hands transaction control to us: writes use BEGIN IMMEDIATE so that a second
        # process on the same file waits up front (busy timeout) instead of failing on a lock upgrade.
        self._conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._lock = threading.Lock()
        self._set_up(schema)

    def _set_up(self, schema: str) -> None:
        """WAL mode and the schema, retried while another process sets up the same new file.

        Switching a new file to WAL needs its exclusive lock, and SQLite answers "database is locked" at once,
        without the busy timeout, when two connections collide on it (a webhook and the controller starting
        together on a fresh state directory did: tests/integration/test_record_race.py, 1 run in ~10 here). Both
        statements are idempotent (the mode is stored in the file; the schema says IF NOT EXISTS)."""
        deadline = time.monotonic() + _SETUP_SECONDS
        delay = 0.01
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit survives power loss too; a lost link would make the next sync create a duplicate.
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.executescript(schema)
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)  # the constructor is synchronous: called once per process at start
                delay = min(delay * 2, 0.5)

    def _run(self, begin: str, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            self._conn.execute(begin)
            conn = cast(sqlite3.Connection, _TextSafeConnection(self._conn)) if self._text_safe else self._conn
            try:
                result = work(conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction (all or nothing)."""
        return await asyncio.to_thread(self._run, "BEGIN IMMEDIATE", work)

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one read transaction (a consistent snapshot across chunked queries)."""
        return await asyncio.to_thread(self._run, "BEGIN", work)

    async def close(self) -> None:
        """Close the connection; later calls raise `sqlite3.ProgrammingError`."""
        with self._lock:
            self._conn.close()

