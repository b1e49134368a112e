"""The Azure `StateStore`: links, snapshots, checkpoints, dedup keys and audit ledger in Azure Table Storage.

Same semantics as `shared.runtime.sqlite_state.SqliteStateStore`, on seven tables named `{prefix}links`,
`{prefix}snapshots`, `{prefix}checkpoints`, `{prefix}dedup`, `{prefix}audit`, `{prefix}failures` and
`{prefix}leases` (created on first use).
Every key component is escaped with `escape_key` and composite keys are joined with "|" (see below);
docs/state-tables.md shows the same design with examples.

    table        PartitionKey                         RowKey                                 properties
    links        {entity}|{system_lo}|{system_hi}     {system}|{key}                         other_key
    snapshots    {system}|{table}                     {key}                                  values, hash, modified
    checkpoints  checkpoint                           {name}                                 value, updated_at
    dedup        {namespace}                          {key}                                  remembered_at, claimed
    failures     {message id}                         count                                  count, updated_at
    leases       lease{crc32(row) % P:02d} (P=16)       {record id}                            owner, expires
    audit        {99999999-yyyymmdd}_{yyyy-mm-dd}     {inverted ticks}_{inverted seq}_{id}   the AuditEntry

- links: both directions of a link live in ONE partition per (entity, unordered system pair), so a link, its
  reverse row and the removal of the rows it replaces commit in one entity group transaction (a batch of
  more than 50 links spans several: each link is atomic, the batch is not). New links are inserted blind;
  a batch that meets existing rows is read, replayed in memory with SqliteStateStore's statements, and its
  difference written with ETag / insert conditions; losing a race to another writer means re-read, re-plan.
- snapshots: `values` is the JSON text, spread over `values`, `values_1`, ... when it is longer than one string
  property holds (32K UTF-16 units); above 480,000 units (the 1 MiB entity limit) put_snapshots raises
  ValueError. Audit `detail` is spread the same way.
- checkpoints: compare-and-set with the service's own ETag (`update_entity(REPLACE, IfNotModified)`;
  "must not exist" is `create_entity`); 409, 412 and 404 become CheckpointConflictError.
- dedup: `create_entity` is the atomic "first one wins"; a 409 means the key was remembered before. `claim`
  checks a batch of keys with insert transactions of rows marked `claimed` (which no read counts as remembered),
  `confirm` remembers them with blind upserts: enqueueing new changes costs no read per key.
- failures: one row per message id, raised by read + ETag-conditional replace (insert for the first failure).
- leases: insert when free (409 when taken); an expired or own lease is replaced under its ETag; release
  deletes under the ETag the store wrote, so a lease that expired and was taken over is never deleted.
- audit: partition and row keys both count down, so the service's natural (PartitionKey, RowKey) order is
  newest first, with appends of the same instant ordered by a per-process sequence, newest first.

Transactions hold at most 100 operations of ONE partition and stay under 4 MiB: `plan_transactions` does the
split in our code (Azurite answers a 101-operation batch with a malformed response instead of an error).
Many keys of one partition are read with range queries when they are dense in it, else with concurrent point
reads (`_read_rows`); at most `concurrency` requests at a time per store.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import re
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from typing import Any, Final, Literal, TypeVar, cast

from azure.core import MatchConditions
from azure.core.async_paging import AsyncPageIterator
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.transport import AsyncHttpTransport
from azure.data.tables import TableEntity, TableTransactionError, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.core.ports import AuditDecision, AuditEntry, Checkpoint, CheckpointConflictError, Link, Snapshot
from shared.runtime.sqlite_state import to_utc

T = TypeVar("T")
R = TypeVar("R")

# ------------------------------------------------------------------------------------------ limits

#: Operations per entity group transaction (service limit).
MAX_TRANSACTION_OPS: Final = 100
#: Estimated payload per transaction: the service caps a batch at 4 MiB; the margin covers multipart framing.
MAX_TRANSACTION_BYTES: Final = 3 * 1024 * 1024
#: PartitionKey / RowKey size: 1 KiB of UTF-16, i.e. 512 code units (Azurite 3.35 rejects the 513th too).
MAX_KEY_UNITS: Final = 512
#: UTF-16 units per string property part: the service allows 32,768 (64 KiB); the rest is margin.
PART_UNITS: Final = 32_000
#: UTF-16 units of one long string across its parts: 960,000 bytes, under the 1 MiB entity limit with the rest.
MAX_STRING_UNITS: Final = 480_000
#: Default bound on concurrent requests of one store.
DEFAULT_CONCURRENCY: Final = 32
#: Entities per query page (service limit).
QUERY_PAGE: Final = 1000
#: Keys of one partition read together: from this many on, range queries replace point reads (see `_read_rows`).
RANGE_MIN_KEYS: Final = 8
#: A page of a range read must settle at least this many wanted keys per 1,000 rows (and at least one) to be
#: worth its request and its rows; fewer, and the rest are point reads, as are the partition's for a while. At 20,
#: a key read by range costs at most 50 entities of the partition's throughput (about 2,000 a second) where a
#: point read costs one (docs/state-tables.md, "Reads").
RANGE_MIN_HITS: Final = 20
#: Wanted keys per range query: a batch's keys are cut into runs of about this many, read concurrently.
RANGE_RUN_KEYS: Final = 128
#: How long a partition found sparse (too few wanted keys per page) is read by point reads only, by calls of fewer
#: than twice the keys of the call that found it so.
RANGE_SPARSE_SECONDS: Final = 600.0

AZURITE_ACCOUNT: Final = "devstoreaccount1"
#: Azurite's documented, public development key (not a secret: every emulator install ships it).
AZURITE_KEY: Final = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_TABLE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{0,51}")
_CHECKPOINT_PARTITION = "checkpoint"
_LINK_RETRIES = 5
_FAILURE_ROW = "count"
_CLAIMED = "claimed"
"""Dedup row property: the key is only claimed (`claim`), not remembered."""
#: Partitions of the leases table. Every client of one account must use the same number (it addresses each lease
#: row), so it changes only with every instance stopped; fewer partitions mean fewer transactions per batch.
LEASE_PARTITIONS: Final = 16
_MAX_TICKS = 3_155_378_975_999_999_999  # .NET DateTime.MaxValue.Ticks: inverted ticks stay positive
_EPOCH_0001 = datetime(1, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_SEQUENCE = 10**19 - 1


def azurite_connection_string(port: int, host: str = "127.0.0.1") -> str:
    """An explicit Azurite connection string: `UseDevelopmentStorage=true` cannot carry a custom port."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"TableEndpoint=http://{host}:{port}/{AZURITE_ACCOUNT};"
    )


# ---------------------------------------------------------------------------------------- key escaping

ESCAPE: Final = "~"
SEPARATOR: Final = "|"
# Allow-list rather than the documented deny-list (/ \ # ? and control characters): punctuation that is
# legal still breaks somewhere: "%" is a known cause of failing point operations on the service, "'" of
# Azurite and Storage Explorer bugs, and ":", "@", "=", "!" and other sub-delimiters fail SharedKey signing
# through azure-core's requests transport (checked on Azurite 3.35). Letters, digits, "-", "." and "_",
# and every character from U+00A0 on, worked through every operation with both transports.
_KEEP = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._")
_ESCAPES: dict[int, str] = {
    **{code: f"{ESCAPE}{code:02X}" for code in range(0xA0) if chr(code) not in _KEEP},
    # lone surrogates cannot be sent as UTF-8 at all; a valid str holds none, but a decoded one might
    **{code: f"{ESCAPE}u{code:04X}" for code in range(0xD800, 0xE000)},
}
_UNESCAPE = re.compile(r"~(?:([0-9A-F]{2})|u([0-9A-F]{4}))")


def escape_key(text: str) -> str:
    """Reversibly map `text` onto characters that are safe in a PartitionKey / RowKey, keeping it readable.

    Every character outside [A-Za-z0-9-._] below U+00A0 (so all of / \\ # ? % ' | ~ and every control
    character) becomes `~XX` (two uppercase hex digits); a lone surrogate becomes `~uXXXX`.
    """
    return text.translate(_ESCAPES)


def unescape_key(text: str) -> str:
    """Invert `escape_key`; raises ValueError on text `escape_key` cannot have produced."""

    def replace(match: re.Match[str]) -> str:
        return chr(int(match.group(1) or match.group(2), 16))

    decoded = _UNESCAPE.sub(replace, text)
    if escape_key(decoded) != text:
        raise ValueError(f"{text!r} is not an escaped table key")
    return decoded


def _utf8(text: str) -> bool:
    """Whether `text` can be sent as UTF-8 (a lone surrogate cannot: it can be stored, not put in a URL)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _units(text: str) -> int:
    """Length in UTF-16 code units, the measure of the service's key and string limits."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le", "surrogatepass")) // 2


def table_key(*parts: str) -> str:
    """Escape each part and join them with "|" (which `escape_key` never emits); ValueError when too long."""
    key = SEPARATOR.join(escape_key(part) for part in parts)
    if _units(key) > MAX_KEY_UNITS:
        raise ValueError(
            f"table key {key[:80]!r}... is {_units(key)} UTF-16 units once escaped; Azure Table keys hold at"
            f" most {MAX_KEY_UNITS} (1 KiB). Shorten the key, entity, system, table or namespace name."
        )
    return key


def split_key(key: str) -> list[str]:
    """Invert `table_key`: the unescaped parts."""
    return [unescape_key(part) for part in key.split(SEPARATOR)]


def prefix_range(*parts: str) -> tuple[str, str]:
    """[low, high) bounds of every key that starts with `table_key(*parts)` followed by the separator."""
    low = table_key(*parts) + SEPARATOR
    return low, low[:-1] + chr(ord(SEPARATOR) + 1)


# ------------------------------------------------------------------------------- long string properties


def split_string(name: str, text: str, *, what: str) -> dict[str, str]:
    """Spread a string over properties `name`, `name_1`, ... that each stay within the service's limit.

    Raises ValueError when the whole would not fit in one entity (`MAX_STRING_UNITS` UTF-16 units).
    """
    units = _units(text)
    if units > MAX_STRING_UNITS:
        raise ValueError(
            f"{what} is {units:,} UTF-16 units of text; an Azure Table entity holds at most"
            f" {MAX_STRING_UNITS:,} (1 MiB per entity, 64 KiB per property). Keep large content, such as"
            " attachments or very detailed geometry, out of the state store."
        )
    # A code point is one or two UTF-16 units: halving the step for non-ASCII text keeps every part legal.
    step = PART_UNITS if units == len(text) else PART_UNITS // 2
    parts = [text[start : start + step] for start in range(0, len(text), step)] or [""]
    return {name if index == 0 else f"{name}_{index}": part for index, part in enumerate(parts)}


def join_string(entity: Mapping[str, Any], name: str) -> str:
    """Reassemble what `split_string` spread over `name`, `name_1`, ..."""
    parts = [str(entity[name])]
    index = 1
    while f"{name}_{index}" in entity:
        parts.append(str(entity[f"{name}_{index}"]))
        index += 1
    return "".join(parts)


# ---------------------------------------------------------------------------------------- transactions

OpKind = Literal["create", "upsert", "update", "delete"]


@dataclass(frozen=True)
class TableOp:
    """One operation of an entity group transaction; `etag` makes an update or delete conditional."""

    kind: OpKind
    entity: Mapping[str, Any]
    etag: str | None = None

    @property
    def partition(self) -> str:
        return str(self.entity["PartitionKey"])

    @property
    def row(self) -> str:
        return str(self.entity["RowKey"])

    @cached_property
    def size(self) -> int:
        """Upper bound of the operation's bytes in a batch body: its ASCII-escaped JSON plus the part headers."""
        return 1024 + len(json.dumps({name: str(value) for name, value in self.entity.items()}))

    def to_sdk(self) -> tuple[str, Mapping[str, Any], dict[str, Any]]:
        """The (operation, entity, kwargs) tuple of `TableClient.submit_transaction`."""
        kwargs: dict[str, Any] = {}
        if self.kind in ("upsert", "update"):
            kwargs["mode"] = UpdateMode.REPLACE
        if self.etag is not None:
            kwargs["etag"] = self.etag
            kwargs["match_condition"] = MatchConditions.IfNotModified
        return self.kind, self.entity, kwargs


def plan_transactions(
    groups: Iterable[Sequence[TableOp]],
    *,
    max_ops: int = MAX_TRANSACTION_OPS,
    max_bytes: int = MAX_TRANSACTION_BYTES,
) -> list[list[TableOp]]:
    """Pack operations into transactions of one partition, at most `max_ops` operations and `max_bytes`.

    A group (operations that belong together, such as both rows of one link) is kept in one transaction
    whenever it fits in one; only a group larger than a transaction is split. A transaction never names
    the same row twice (the service rejects that with InvalidDuplicateRow). The order of operations within
    a partition is kept; transactions come partition by partition in order of first appearance, and the
    transactions of one partition must be submitted one after the other.
    """
    if max_ops < 1 or max_bytes < 1:
        raise ValueError("a transaction must allow at least one operation and one byte")
    planned: dict[str, list[list[TableOp]]] = {}
    open_rows: dict[str, set[str]] = {}
    open_bytes: dict[str, int] = {}

    def fits_alone(ops: Sequence[TableOp]) -> bool:
        return (
            len(ops) <= max_ops
            and sum(op.size for op in ops) <= max_bytes
            and len({op.row for op in ops}) == len(ops)
        )

    def fits(partition: str, ops: Sequence[TableOp]) -> bool:
        chunk = planned[partition][-1]
        return (
            len(chunk) + len(ops) <= max_ops
            and open_bytes[partition] + sum(op.size for op in ops) <= max_bytes
            and not {op.row for op in ops} & open_rows[partition]
        )

    def start(partition: str) -> None:
        planned.setdefault(partition, []).append([])
        open_rows[partition] = set()
        open_bytes[partition] = 0

    def add(partition: str, op: TableOp) -> None:
        if planned[partition][-1] and not fits(partition, [op]):
            start(partition)
        planned[partition][-1].append(op)
        open_rows[partition].add(op.row)
        open_bytes[partition] += op.size

    for group in groups:
        if not group:
            continue
        partitions = {op.partition for op in group}
        if len(partitions) != 1:
            raise ValueError(f"a transaction group must stay within one partition, got {sorted(partitions)}")
        partition = group[0].partition
        if partition not in planned:
            start(partition)
        if fits_alone(group):
            if not fits(partition, group):
                start(partition)
            for op in group:
                add(partition, op)
        else:
            # Larger than any one transaction: keep the order, cut wherever a limit would be broken.
            for op in group:
                add(partition, op)
    return [chunk for chunks in planned.values() for chunk in chunks if chunk]


# ------------------------------------------------------------------------------------ request counting

_ENTITY_PATH = re.compile(r"/([A-Za-z][A-Za-z0-9]*)\((.*)\)$")
_KIND_BY_METHOD: Final = {"PUT": "upsert", "MERGE": "merge", "PATCH": "merge", "DELETE": "delete"}


class TableRequestCounter:
    """Counts the HTTP requests a Table client sends, by (table, kind), retries included.

    It is the client's `raw_request_hook` (azure-core's CustomHookPolicy, which runs after the retry policy, so
    once per attempt: the Tables SDK takes no `per_retry_policies`).

    Kinds: `read` (point read), `query` (filtered or listing GET), `insert`, `upsert` / `merge` (PUT / MERGE on
    an entity: replace or conditional update), `delete`, `transaction` (one `$batch`, counted once; `ops` counts
    its operations) and `table` (table creation). Tests and benchmarks read `counts`, `total` and `ops`.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.ops: Counter[str] = Counter()
        """Entity operations carried inside transactions, per table."""

    @property
    def total(self) -> int:
        """Every request sent so far."""
        return sum(self.counts.values())

    def by_kind(self) -> dict[str, int]:
        """Totals per kind (all tables)."""
        out: Counter[str] = Counter()
        for (_, kind), count in self.counts.items():
            out[kind] += count
        return dict(out)

    def by_table(self) -> dict[str, int]:
        """Totals per table (as named on the wire, prefix included; `$batch` ones by the table they write)."""
        out: Counter[str] = Counter()
        for (table, _), count in self.counts.items():
            out[table] += count
        return dict(out)

    def reset(self) -> None:
        self.counts.clear()
        self.ops.clear()

    def __call__(self, request: PipelineRequest[Any]) -> None:
        table, kind = self.classify(request.http_request)
        self.counts[(table, kind)] += 1

    def classify(self, http: Any) -> tuple[str, str]:
        """(table, kind) of one outgoing request."""
        path = str(http.url).split("?", 1)[0]
        method = str(http.method).upper()
        if path.endswith("/$batch"):
            table, ops = _batch_contents(http)
            self.ops[table] += ops
            return table, "transaction"
        if path.endswith("/Tables") or "/Tables(" in path:
            return "", "table"
        match = _ENTITY_PATH.search(path)
        if match is None:
            return path.rsplit("/", 1)[-1], "insert" if method == "POST" else "query"
        table, address = match.groups()
        if method == "GET":
            return table, "read" if address else "query"
        if method == "POST":
            return table, "insert"
        return table, _KIND_BY_METHOD.get(method, method.lower())


def _batch_contents(http: Any) -> tuple[str, int]:
    """The table a `$batch` request writes and how many operations it carries (from the SDK's multipart parts)."""
    try:
        changeset = http.multipart_mixed_info[0][0]
        parts = changeset.multipart_mixed_info[0]
        first = str(parts[0].url).split("?", 1)[0]
        match = _ENTITY_PATH.search(first)
        table = match.group(1) if match else first.rsplit("/", 1)[-1]
        return table, len(parts)
    except (AttributeError, IndexError, TypeError):
        return "$batch", 0


# ------------------------------------------------------------------------------------------ helpers


def default_transport() -> AsyncHttpTransport[Any, Any]:
    """aiohttp when installed (azure-core's default), else azure-core's requests-on-threads transport."""
    try:
        from azure.core.pipeline.transport import AioHttpTransport

        return cast(AsyncHttpTransport[Any, Any], AioHttpTransport())
    except ImportError:
        from azure.core.pipeline.transport import AsyncioRequestsTransport

        return cast(AsyncHttpTransport[Any, Any], AsyncioRequestsTransport())


async def _settle(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Like `asyncio.gather`, but every call finishes before the first failure is raised: a caller that
    re-reads and retries after a failed batch must not race writes of that batch still in flight."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)


def _plain_utc(value: datetime) -> datetime:
    """A plain `datetime` in UTC (the SDK returns its own subclass, which carries the service's text)."""
    value = to_utc(value)
    return datetime.combine(value.date(), value.time(), tzinfo=UTC)


_sequence_lock = threading.Lock()
_last_sequence = 0


def _next_sequence(count: int) -> int:
    """First of `count` strictly increasing numbers (nanosecond clock, never repeating within a process)."""
    global _last_sequence
    with _sequence_lock:
        first = max(_last_sequence + 1, time.time_ns())
        _last_sequence = first + count - 1
        return first


def audit_keys(at: datetime, sequence: int) -> tuple[str, str]:
    """(PartitionKey, RowKey) of an audit entry: both count down, so a plain scan reads newest first."""
    at = to_utc(at)
    day: date = at.date()
    partition = f"{99_999_999 - int(day.strftime('%Y%m%d')):08d}_{day.isoformat()}"
    ticks = (at - _EPOCH_0001) // _MICROSECOND * 10  # .NET ticks are 100 ns
    row = f"{_MAX_TICKS - ticks:019d}_{_MAX_SEQUENCE - sequence:019d}_{uuid.uuid4().hex[:12]}"
    return partition, row


# ------------------------------------------------------------------------------------------- the store

_Row = tuple[str, str, str, str]
"""A link row: (entity, system, key, other_system); its value is the other key."""


@dataclass
class _Loaded:
    other_key: str
    etag: str


class TableStateStore:
    """`StateStore` on Azure Table Storage (or Azurite); safe for many concurrent clients of one account.

    Links are one-to-one per (entity, system pair) exactly as in `SqliteStateStore`: putting a link for a key
    that is already linked elsewhere removes the old link in both directions, in the same transaction.
    """

    TABLES: Final = ("links", "snapshots", "checkpoints", "dedup", "audit", "failures", "leases")

    def __init__(
        self,
        service: TableServiceClient,
        *,
        table_prefix: str = "syncline",
        concurrency: int = DEFAULT_CONCURRENCY,
        owned_credential: AsyncTokenCredential | None = None,
        requests: TableRequestCounter | None = None,
        lease_partitions: int = LEASE_PARTITIONS,
        query_page: int = QUERY_PAGE,
    ) -> None:
        if not _TABLE_PREFIX.fullmatch(table_prefix):
            raise ValueError(
                f"table_prefix {table_prefix!r} must be 1-52 letters or digits starting with a letter"
                " (Azure table names are 3-63 alphanumerics)"
            )
        self._service = service
        self._prefix = table_prefix
        self._limit = asyncio.Semaphore(concurrency)
        self._credential = owned_credential
        self._tables: dict[str, TableClient] = {}
        self._create_lock = asyncio.Lock()
        if not 1 <= lease_partitions <= 100:
            raise ValueError(f"lease_partitions must be 1-100, got {lease_partitions}")
        self._lease_partitions = lease_partitions
        self.requests = requests or TableRequestCounter()
        """What this store sent, by table and kind (attached to the client by `from_connection_string` and
        `from_endpoint`; a store built on a client of its own counts only if that client has the policy)."""
        self._lease_etags: dict[tuple[str, str], str] = {}
        """(row key, owner) -> the ETag of the lease row this store last wrote for that owner."""
        if not 1 <= query_page <= QUERY_PAGE:
            raise ValueError(f"query_page must be 1-{QUERY_PAGE}, got {query_page}")
        self._query_page = query_page
        self._min_hits = max(1, RANGE_MIN_HITS * query_page // QUERY_PAGE)
        self._sparse: dict[tuple[str, str], tuple[float, int]] = {}
        """Partitions found sparse: until when, and how many keys the call that found it read (see `_read_rows`)."""
        """(table, partition) -> until when (monotonic) its reads are point reads: a range read found it sparse.
        Advice on cost only: whichever way a key is read, it is read from the service now."""

    @classmethod
    def from_connection_string(
        cls,
        conn_str: str,
        *,
        table_prefix: str = "syncline",
        concurrency: int = DEFAULT_CONCURRENCY,
        lease_partitions: int = LEASE_PARTITIONS,
        query_page: int = QUERY_PAGE,
    ) -> TableStateStore:
        """Shared-key access: a storage account connection string, or `azurite_connection_string(port)`."""
        counter = TableRequestCounter()
        service = TableServiceClient.from_connection_string(conn_str, transport=default_transport(),
                                                            raw_request_hook=counter)
        return cls(service, table_prefix=table_prefix, concurrency=concurrency, requests=counter,
                   lease_partitions=lease_partitions, query_page=query_page)

    @classmethod
    def from_endpoint(
        cls,
        endpoint: str,
        credential: AsyncTokenCredential | None = None,
        *,
        table_prefix: str = "syncline",
        concurrency: int = DEFAULT_CONCURRENCY,
        lease_partitions: int = LEASE_PARTITIONS,
    ) -> TableStateStore:
        """Identity-based access to `https://<account>.table.core.windows.net`.

        Without `credential`, an `azure.identity.aio.DefaultAzureCredential` (managed identity in Azure,
        developer sign-in locally) is created and closed with the store; a given credential stays the
        caller's to close. The identity needs the "Storage Table Data Contributor" role on the account.
        """
        owned: AsyncTokenCredential | None = None
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential

            # Its own transport, so that it too works when aiohttp is not installed.
            credential = owned = DefaultAzureCredential(transport=default_transport())
        counter = TableRequestCounter()
        service = TableServiceClient(endpoint, credential=credential, transport=default_transport(),
                                     raw_request_hook=counter)
        return cls(service, table_prefix=table_prefix, concurrency=concurrency, owned_credential=owned,
                   requests=counter, lease_partitions=lease_partitions)

    @property
    def table_names(self) -> list[str]:
        """The names of the tables this store uses (they exist once a call has touched them)."""
        return [f"{self._prefix}{name}" for name in self.TABLES]

    # --------------------------------------------------------------------------------------- plumbing

    async def _table(self, name: str) -> TableClient:
        """The client of one of our tables, creating the table on first use (idempotent across clients)."""
        client = self._tables.get(name)
        if client is not None:
            return client
        async with self._create_lock:
            client = self._tables.get(name)
            if client is None:
                async with self._limit:
                    client = await self._service.create_table_if_not_exists(f"{self._prefix}{name}")
                self._tables[name] = client
            return client

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self._limit:
            return await call()

    async def _each(self, items: Iterable[T], call: Callable[[T], Awaitable[R]]) -> list[R]:
        """`call` on every item, at most `concurrency` requests in flight (each call acquires the bound)."""

        async def one(item: T) -> R:
            async with self._limit:
                return await call(item)

        return await _settle(one(item) for item in items)

    async def _read_many(
        self, table: TableClient, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], TableEntity]:
        """Concurrent point reads; absent entities are left out."""

        async def read(key: tuple[str, str]) -> TableEntity | None:
            try:
                return await table.get_entity(key[0], key[1])
            except ResourceNotFoundError:
                return None

        unique = list(dict.fromkeys(keys))
        found = await self._each(unique, read)
        return {key: entity for key, entity in zip(unique, found, strict=True) if entity is not None}

    async def _read_rows(self, table: TableClient, partition: str, row_keys: Iterable[str]) -> dict[str, TableEntity]:
        """The stored rows of `row_keys` in one partition (absent ones left out), in as few requests as it takes.

        The service has no multi-key read. A range query (`RowKey ge first and RowKey le last`, no OR: the service
        walks exactly the rows it returns) returns every row between two wanted keys, up to a page at a time; a
        key it passes over is absent *at that moment*, as a point read would have found it. So a batch whose keys
        are dense in their partition (at least `RANGE_MIN_HITS` per 1,000 rows between them) costs one request per
        page instead of one per key, and a sparse one falls back to point reads after one page. Nothing is kept
        between calls but that cost advice: every key is read from the service on every call.

        Only ASCII row keys take the range path: the service orders keys by UTF-16 code units and Python by code
        points, which agree on ASCII (every escaped GUID and plain id), so "passed over" means the same to both.
        """
        unique = sorted(set(row_keys))
        ranged = [key for key in unique if key.isascii()]
        point = [key for key in unique if not key.isascii()]
        where = (table.table_name, partition)
        now = time.monotonic()
        until, keys_then = self._sparse.get(where, (now, 0))
        # Sparse for a call of that many keys: a call with at least twice as many is twice as dense in the same
        # rows and tries the range again (a small batch at the end of a drain must not condemn the big ones).
        if (until > now and len(ranged) < 2 * keys_then) or len(ranged) < RANGE_MIN_KEYS:
            point, ranged = unique, []
        found: dict[str, TableEntity] = {}
        if ranged:
            runs = -(-len(ranged) // RANGE_RUN_KEYS)
            size = -(-len(ranged) // runs)
            results = await _settle(self._read_range(table, partition, ranged[i:i + size])
                                    for i in range(0, len(ranged), size))
            for rows, unsettled in results:
                found.update(rows)
                point += unsettled
            # One sparse run among dense ones is a local gap in the keys, not a sparse partition.
            if 2 * sum(1 for _, unsettled in results if unsettled) > len(results):
                self._sparse[where] = (time.monotonic() + RANGE_SPARSE_SECONDS, len(ranged))
            else:
                self._sparse.pop(where, None)
        if point:
            singles = await self._read_many(table, ((partition, key) for key in point))
            found.update((address[1], entity) for address, entity in singles.items())
        return found

    async def _read_range(self, table: TableClient, partition: str,
                          wanted: list[str]) -> tuple[dict[str, TableEntity], list[str]]:
        """Read the sorted ASCII row keys `wanted` with one range query, page by page; returns the rows found and
        the keys it left unsettled (a page that settled too few of them stops it: point-read those)."""
        pages = cast(AsyncPageIterator[TableEntity], table.query_entities(
            "PartitionKey eq @pk and RowKey ge @low and RowKey le @high",
            parameters={"pk": partition, "low": wanted[0], "high": wanted[-1]},
            results_per_page=self._query_page,
        ).by_page())
        want = set(wanted)
        found: dict[str, TableEntity] = {}
        settled = 0  # wanted[:settled] were found or passed over
        while True:
            async with self._limit:
                try:
                    page = await anext(pages)
                except StopAsyncIteration:
                    return found, []
                rows = [row async for row in page]
            for row in rows:
                key = str(row["RowKey"])
                if key in want:
                    found[key] = row
            if pages.continuation_token is None:  # the service walked the whole range
                return found, []
            if not rows:
                return found, wanted[settled:]
            # The next page starts after this one's last row: every wanted key up to it is settled.
            now_settled = bisect.bisect_right(wanted, str(rows[-1]["RowKey"]))
            hits, settled = now_settled - settled, now_settled
            if hits < self._min_hits:
                return found, wanted[settled:]

    async def _submit(self, table: TableClient, chunks: Sequence[Sequence[TableOp]], *, ordered: bool = True) -> None:
        """Submit planned transactions: one partition's in order, different partitions concurrently.

        `ordered=False` when no row is in two chunks (the caller deduplicated them): then a partition's chunks go
        concurrently too, since no order between them can matter (a batch of snapshots in one partition is
        several round trips at once rather than one after another)."""
        by_partition: dict[str, list[Sequence[TableOp]]] = {}
        for chunk in chunks:
            by_partition.setdefault(chunk[0].partition if ordered else str(id(chunk)), []).append(chunk)

        async def run(partition_chunks: list[Sequence[TableOp]]) -> None:
            for chunk in partition_chunks:
                async with self._limit:
                    await table.submit_transaction([op.to_sdk() for op in chunk])

        await _settle(run(chunks) for chunks in by_partition.values())

    async def _query(
        self,
        table: TableClient,
        query_filter: str | None,
        parameters: dict[str, Any],
        *,
        page: int = 1000,
        select: list[str] | None = None,
    ) -> AsyncIterator[TableEntity]:
        """Entities in (PartitionKey, RowKey) order; values reach the filter as parameters, never as text."""
        if query_filter is None:
            pages = table.list_entities(results_per_page=page, select=select)
        else:
            pages = table.query_entities(query_filter, parameters=parameters, results_per_page=page, select=select)
        async for entity in pages:
            yield entity

    # ------------------------------------------------------------------------------------------ links

    @staticmethod
    def _link_partition(entity: str, system: str, other_system: str) -> str:
        low, high = sorted((system, other_system))
        return table_key(entity, low, high)

    @classmethod
    def _link_address(cls, row: _Row) -> tuple[str, str]:
        entity, system, key, other_system = row
        return cls._link_partition(entity, system, other_system), table_key(system, key)

    async def get_links(self, entity: str, system: str, keys: Sequence[str], other_system: str) -> dict[str, str]:
        """Map each of `keys` (in `system`) to its linked key in `other_system`; unknown keys are absent."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        table = await self._table("links")
        partition = self._link_partition(entity, system, other_system)
        rows = {table_key(system, key): key for key in unique}
        found = await self._read_rows(table, partition, rows)
        return {rows[row_key]: str(row["other_key"]) for row_key, row in found.items()}

    async def put_links(self, links: Sequence[Link]) -> None:
        """Store links in both directions; re-putting a link is a no-op, re-linking a key replaces it."""
        if not links:
            return
        table = await self._table("links")
        rows = [row for link in links for row in self._link_rows(link)]
        if len(set(rows)) == len(rows):
            # Fast path for the common case, links between keys that have none yet: insert both rows of
            # each link, no reads. Under the one-to-one invariant, two missing rows mean that nothing points
            # at either key, so there is nothing to remove. A transaction that meets an existing row fails
            # whole (409) and only its links take the read-and-diff path.
            leftovers: list[Link] = []
            by_row = {row: link for link in links for row in self._link_rows(link)}
            groups = [
                [self._link_op("create", row, other_key) for row, other_key in self._link_rows(link).items()]
                for link in links
            ]

            async def fallback(chunk: Sequence[TableOp]) -> None:
                leftovers.extend(dict.fromkeys(by_row[self._link_row(op)] for op in chunk))

            await self._all_or_each(table, plan_transactions(groups), 409, fallback)
            if not leftovers:
                return
            # The engine re-puts the link of every record it updates: one read per link finds those that
            # are stored already (a -> b present means b -> a is too), and only the rest is replayed.
            forward = {
                self._link_address((link.entity, link.system_a, link.key_a, link.system_b)): link for link in leftovers
            }
            found = await self._read_many(table, forward)
            present = {link for address, link in forward.items() if address in found
                       and found[address]["other_key"] == link.key_b}
            # keep the caller's order: re-linking semantics are "in order, the last link wins"
            wanted = set(leftovers) - present
            links = [link for link in links if link in wanted]
            if not links:
                return
        await self._put_links_read_and_diff(table, links)

    async def _put_links_read_and_diff(self, table: TableClient, links: Sequence[Link]) -> None:
        """Read every row the links touch, replay them in memory, write the difference with conditions."""
        for attempt in range(_LINK_RETRIES):
            loaded = await self._load_link_rows(table, links)
            groups = self._plan_links(links, loaded)
            try:
                await self._submit(table, plan_transactions(groups))
                return
            except TableTransactionError as error:
                # 409 / 412 / 404: another writer changed a row between our read and our write; re-read.
                if error.status_code not in (404, 409, 412) or attempt == _LINK_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))

    @staticmethod
    def _link_rows(link: Link) -> dict[_Row, str]:
        """The two rows of a link (one when a key is linked to itself), each with the key it points at."""
        return {
            (link.entity, link.system_a, link.key_a, link.system_b): link.key_b,
            (link.entity, link.system_b, link.key_b, link.system_a): link.key_a,
        }

    @classmethod
    def _link_op(cls, kind: OpKind, row: _Row, other_key: str | None, etag: str | None = None) -> TableOp:
        partition, row_key = cls._link_address(row)
        entity: dict[str, Any] = {"PartitionKey": partition, "RowKey": row_key}
        if other_key is not None:
            entity["other_key"] = other_key
        return TableOp(kind, entity, etag=etag)

    @staticmethod
    def _link_row(op: TableOp) -> _Row:
        """Invert `_link_op`: the row an operation writes."""
        entity, low, high = split_key(op.partition)
        system, key = split_key(op.row)
        return entity, system, key, high if system == low else low

    async def _load_link_rows(self, table: TableClient, links: Sequence[Link]) -> dict[_Row, _Loaded]:
        """The stored rows of every key of `links`, plus the rows of their current partners."""

        async def load(rows: Iterable[_Row]) -> dict[_Row, _Loaded]:
            wanted = {self._link_address(row): row for row in rows}
            found = await self._read_many(table, wanted)
            return {
                wanted[address]: _Loaded(str(entity["other_key"]), str(entity.metadata["etag"]))
                for address, entity in found.items()
            }

        first = {row for link in links for row in self._link_rows(link)}
        loaded = await load(first)
        # A partner's reverse row is what re-linking removes; under the one-to-one invariant it is the only
        # row that points at a key, so this second read replaces SQL's "DELETE ... WHERE other_key = ?".
        partners = {(row[0], row[3], got.other_key, row[1]) for row, got in loaded.items()} - first
        loaded.update(await load(partners))
        return loaded

    def _plan_links(self, links: Sequence[Link], loaded: Mapping[_Row, _Loaded]) -> list[list[TableOp]]:
        """Apply the links one by one to an in-memory copy, then diff it into groups of conditional ops."""
        model: dict[_Row, str] = {row: got.other_key for row, got in loaded.items()}
        # (entity, system, other_system, other_key) -> keys whose row points at other_key
        pointing: dict[tuple[str, str, str, str], set[str]] = {}
        for (entity, system, key, other_system), other_key in model.items():
            pointing.setdefault((entity, system, other_system, other_key), set()).add(key)

        parent: dict[_Row, _Row] = {}

        def find(row: _Row) -> _Row:
            parent.setdefault(row, row)
            while parent[row] != row:
                parent[row] = parent[parent[row]]
                row = parent[row]
            return row

        def set_row(row: _Row, other_key: str | None) -> None:
            entity, system, key, other_system = row
            old = model.pop(row, None)
            if old is not None:
                pointing[(entity, system, other_system, old)].discard(key)
            if other_key is not None:
                model[row] = other_key
                pointing.setdefault((entity, system, other_system, other_key), set()).add(key)

        for link in links:
            touched: list[_Row] = []
            for system, key, other_system, other_key in (
                (link.system_a, link.key_a, link.system_b, link.key_b),
                (link.system_b, link.key_b, link.system_a, link.key_a),
            ):
                # Same statements as SqliteStateStore.put_links: drop rows of `other_system` that point at
                # `key` from any key but `other_key`, then point `key` at `other_key`.
                stale = pointing.get((link.entity, other_system, system, key), set()) - {other_key}
                for stale_key in sorted(stale):
                    row = (link.entity, other_system, stale_key, system)
                    set_row(row, None)
                    touched.append(row)
                row = (link.entity, system, key, other_system)
                set_row(row, other_key)
                touched.append(row)
            for row in touched[1:]:
                parent[find(row)] = find(touched[0])

        groups: dict[_Row, list[TableOp]] = {}
        for row in sorted(set(model) | set(loaded)):
            before, after = loaded.get(row), model.get(row)
            if before is None and after is not None:
                op = self._link_op("create", row, after)
            elif before is not None and after is None:
                op = self._link_op("delete", row, None, before.etag)
            elif before is not None and after is not None and before.other_key != after:
                op = self._link_op("update", row, after, before.etag)
            else:
                continue
            groups.setdefault(find(row), []).append(op)
        return list(groups.values())

    async def count_links(self, entity: str | None = None) -> int:
        """How many links exist (each pair counted once), for one entity or all of them."""
        table = await self._table("links")
        query_filter: str | None = None
        parameters: dict[str, Any] = {}
        if entity is not None:
            query_filter = "PartitionKey ge @low and PartitionKey lt @high"
            parameters["low"], parameters["high"] = prefix_range(entity)
        count = 0
        async for row in self._query(table, query_filter, parameters, select=["PartitionKey", "RowKey"]):
            _, low, high = split_key(str(row["PartitionKey"]))
            # Both directions are stored; the row of the lower system picks exactly one of each pair (and,
            # as in SQL's `system < other_system`, a link within one system is not counted).
            if low < high and split_key(str(row["RowKey"]))[0] == low:
                count += 1
        return count

    async def iter_links(self, entity: str, system: str, other_system: str) -> list[tuple[str, str]]:
        """Every (key in `system`, key in `other_system`) pair of an entity, ordered by the first key."""
        table = await self._table("links")
        low, high = prefix_range(system)
        parameters = {"pk": self._link_partition(entity, system, other_system), "low": low, "high": high}
        query_filter = "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high"
        pairs = [
            (split_key(str(row["RowKey"]))[1], str(row["other_key"]))
            async for row in self._query(table, query_filter, parameters)
        ]
        return sorted(pairs)

    # -------------------------------------------------------------------------------------- snapshots

    async def get_snapshots(self, system: str, table: str, keys: Sequence[str]) -> dict[str, Snapshot]:
        """Return the snapshots that exist for `keys`."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        client = await self._table("snapshots")
        partition = table_key(system, table)
        rows = {table_key(key): key for key in unique}
        found = await self._read_rows(client, partition, rows)
        result: dict[str, Snapshot] = {}
        for row_key, row in found.items():
            key = rows[row_key]
            modified = row.get("modified")
            result[key] = Snapshot(
                system=system,
                table=table,
                key=key,
                values=json.loads(join_string(row, "values")),
                hash=str(row["hash"]),
                modified=_plain_utc(modified) if isinstance(modified, datetime) else None,
            )
        return result

    async def put_snapshots(self, snapshots: Sequence[Snapshot]) -> None:
        """Insert or replace snapshots (values must be JSON-serialisable, as their hash already requires)."""
        latest: dict[tuple[str, str], TableOp] = {}
        for snap in snapshots:
            partition, row = table_key(snap.system, snap.table), table_key(snap.key)
            values = json.dumps(dict(snap.values), ensure_ascii=False, separators=(",", ":"))
            entity: dict[str, Any] = {
                "PartitionKey": partition,
                "RowKey": row,
                **split_string("values", values, what=f"snapshot {snap.system}/{snap.table}/{snap.key}"),
                "hash": snap.hash,
            }
            if snap.modified is not None:
                entity["modified"] = to_utc(snap.modified)
            # A batch may name a record twice: the last one wins, as with sequential SQL upserts.
            latest.pop((partition, row), None)
            latest[(partition, row)] = TableOp("upsert", entity)
        if latest:
            client = await self._table("snapshots")
            await self._submit(client, plan_transactions([op] for op in latest.values()), ordered=False)

    async def delete_snapshots(self, system: str, table: str, keys: Sequence[str]) -> None:
        """Forget snapshots (after a delete); unknown keys are ignored."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        client = await self._table("snapshots")
        partition = table_key(system, table)
        ops = [TableOp("delete", {"PartitionKey": partition, "RowKey": table_key(key)}) for key in unique]

        async def delete_each(chunk: Sequence[TableOp]) -> None:
            # delete_entity ignores a missing entity, which a transaction would reject as a whole
            await self._each(chunk, lambda op: client.delete_entity(op.partition, op.row))

        await self._all_or_each(client, plan_transactions([op] for op in ops), 404, delete_each)

    async def has_snapshots(self, system: str, table: str) -> bool:
        """Whether any snapshot of (`system`, `table`) exists: a query of one row of its partition."""
        client = await self._table("snapshots")
        parameters = {"pk": table_key(system, table)}
        rows = client.query_entities("PartitionKey eq @pk", parameters=parameters, results_per_page=1,
                                     select=["RowKey"])
        async with self._limit:
            async for _ in rows:
                return True
        return False

    async def _all_or_each(
        self,
        client: TableClient,
        chunks: Sequence[Sequence[TableOp]],
        status: int,
        fallback: Callable[[Sequence[TableOp]], Awaitable[None]],
    ) -> None:
        """Each chunk as one transaction; a chunk rejected with `status` is redone op by op by `fallback`."""

        async def run(chunk: Sequence[TableOp]) -> None:
            try:
                async with self._limit:
                    await client.submit_transaction([op.to_sdk() for op in chunk])
            except TableTransactionError as error:
                if error.status_code != status:
                    raise
                await fallback(chunk)

        await _settle(run(chunk) for chunk in chunks)

    # ------------------------------------------------------------------------------------ checkpoints

    async def get_checkpoint(self, name: str) -> Checkpoint | None:
        """Read a checkpoint, or None when it was never set."""
        table = await self._table("checkpoints")
        try:
            row = await self._bounded(lambda: table.get_entity(_CHECKPOINT_PARTITION, table_key(name)))
        except ResourceNotFoundError:
            return None
        return Checkpoint(
            name=name,
            value=str(row["value"]),
            etag=str(row.metadata["etag"]),
            updated_at=_plain_utc(row["updated_at"]),
        )

    async def put_checkpoint(self, name: str, value: str, *, expected_etag: str | None) -> Checkpoint:
        """Compare-and-set: `expected_etag=None` means "must not exist yet"; else CheckpointConflictError."""
        table = await self._table("checkpoints")
        updated_at = _plain_utc(datetime.now(UTC))
        entity = {
            "PartitionKey": _CHECKPOINT_PARTITION,
            "RowKey": table_key(name),
            "value": value,
            "updated_at": updated_at,
        }
        try:
            if expected_etag is None:
                written = await self._bounded(lambda: table.create_entity(entity))
            else:
                written = await self._bounded(
                    lambda: table.update_entity(
                        entity,
                        mode=UpdateMode.REPLACE,
                        etag=expected_etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                )
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError) as error:
            raise self._checkpoint_conflict(name, expected_etag) from error
        except HttpResponseError as error:
            # Azurite answers 400 InvalidInput to an If-Match that is not shaped like one of its etags; an
            # etag that is not the stored one is a conflict, whatever its shape, so compare and decide.
            if error.status_code != 400 or expected_etag is None:
                raise
            current = await self.get_checkpoint(name)
            if current is not None and current.etag == expected_etag:
                raise
            raise self._checkpoint_conflict(name, expected_etag) from error
        return Checkpoint(name=name, value=value, etag=str(written["etag"]), updated_at=updated_at)

    @staticmethod
    def _checkpoint_conflict(name: str, expected_etag: str | None) -> CheckpointConflictError:
        expectation = "not to exist" if expected_etag is None else f"to have etag {expected_etag!r}"
        return CheckpointConflictError(
            f"checkpoint {name!r} was expected {expectation} but another writer moved it; re-read it"
        )

    # ---------------------------------------------------------------------------------------- dedup

    @staticmethod
    def _dedup_rows(namespace: str, keys: Sequence[str], *, claimed: bool) -> tuple[dict[str, str], list[TableOp]]:
        """Row key -> dedup key, and one insert per distinct key (a claim when `claimed`)."""
        partition = table_key(namespace)
        stamp = _plain_utc(datetime.now(UTC))
        by_row = {table_key(key): key for key in dict.fromkeys(keys)}
        extra = {_CLAIMED: True} if claimed else {}
        ops = [TableOp("create", {"PartitionKey": partition, "RowKey": row, "remembered_at": stamp, **extra})
               for row in by_row]
        return by_row, ops

    async def remember(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """Record dedup keys; return the subset that had already been remembered before this call."""
        by_row, ops = self._dedup_rows(namespace, keys, claimed=False)
        if not ops:
            return set()
        table = await self._table("dedup")
        seen: set[str] = set()

        async def create_each(chunk: Sequence[TableOp]) -> None:
            # Insert is the atomic "first one wins": whoever gets 409 saw the key before (or concurrently), unless
            # the row is only a claim: then this call remembers it (replace under the claim's ETag).
            async def create(op: TableOp) -> None:
                for _ in range(_LINK_RETRIES):
                    try:
                        await table.create_entity(op.entity)
                        return
                    except ResourceExistsError:
                        pass
                    try:
                        current = await table.get_entity(op.partition, op.row)
                    except ResourceNotFoundError:
                        continue  # forgotten meanwhile: insert again
                    if not current.get(_CLAIMED):
                        seen.add(by_row[op.row])
                        return
                    try:
                        await table.update_entity(op.entity, mode=UpdateMode.REPLACE, etag=current.metadata["etag"],
                                                  match_condition=MatchConditions.IfNotModified)
                        return
                    except (ResourceModifiedError, ResourceNotFoundError):
                        continue  # remembered or forgotten concurrently: look again
                raise RuntimeError(f"dedup key {by_row[op.row]!r} kept changing under concurrent writers")

            await self._each(chunk, create)

        # The common case, all keys new, is one transaction per 100 keys; a chunk with a known key fails
        # as a whole (409) and is redone key by key.
        await self._all_or_each(table, plan_transactions([op] for op in ops), 409, create_each)
        return seen

    async def seen(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace` (concurrent point reads; read-only)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        table = await self._table("dedup")
        partition = table_key(namespace)
        addresses = {(partition, table_key(key)): key for key in unique}
        found = await self._read_many(table, addresses)
        return {addresses[address] for address, row in found.items() if not row.get(_CLAIMED)}

    async def claim(self, namespace: str, keys: Sequence[str]) -> set[str]:
        """The subset of `keys` remembered in `namespace`, leaving a claim on the others where it costs nothing.

        Keys that are all new (the common case) cost one insert transaction per 100, not a read each. A
        transaction that meets an existing row (remembered, or claimed by an earlier call) fails whole and its
        keys are read instead: remembered ones are reported, claims are not.
        """
        by_row, ops = self._dedup_rows(namespace, keys, claimed=True)
        if not ops:
            return set()
        table = await self._table("dedup")
        remembered: set[str] = set()

        async def read_each(chunk: Sequence[TableOp]) -> None:
            # The keys of this chunk stay unclaimed: a claim only makes the check cheaper, it is never needed.
            found = await self._read_many(table, [(op.partition, op.row) for op in chunk])
            remembered.update(by_row[row] for (_, row), entity in found.items() if not entity.get(_CLAIMED))

        await self._all_or_each(table, plan_transactions([op] for op in ops), 409, read_each)
        return remembered

    async def confirm(self, namespace: str, keys: Sequence[str]) -> None:
        """Remember `keys` (claimed or not): blind upserts, one transaction per 100 keys."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        table = await self._table("dedup")
        partition = table_key(namespace)
        stamp = _plain_utc(datetime.now(UTC))
        ops = [TableOp("upsert", {"PartitionKey": partition, "RowKey": table_key(key), "remembered_at": stamp})
               for key in unique]
        await self._submit(table, plan_transactions([op] for op in ops), ordered=False)

    async def forget_remembered(self, before: datetime) -> int:
        """Drop dedup keys remembered before `before` (retention); returns how many were dropped.

        A filtered scan of the dedup table (run daily by the controller), then deletes grouped by partition.
        """
        table = await self._table("dedup")
        ops = [TableOp("delete", {"PartitionKey": e["PartitionKey"], "RowKey": e["RowKey"]})
               async for e in self._query(table, "remembered_at lt @cutoff", {"cutoff": _plain_utc(before)},
                                          select=["PartitionKey", "RowKey"])]
        if not ops:
            return 0

        async def delete_each(chunk: Sequence[TableOp]) -> None:
            await self._each(chunk, lambda op: table.delete_entity(op.partition, op.row))

        await self._all_or_each(table, plan_transactions([op] for op in ops), 404, delete_each)
        return len(ops)

    # ---------------------------------------------------------------------------------------- audit

    async def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Append decisions to the ledger (there is no API to change or remove them)."""
        if not entries:
            return
        table = await self._table("audit")
        first = _next_sequence(len(entries))
        ops: list[TableOp] = []
        for index, entry in enumerate(entries):
            partition, row = audit_keys(entry.at, first + index)
            entity: dict[str, Any] = {
                "PartitionKey": partition,
                "RowKey": row,
                "at": to_utc(entry.at),
                "correlation_id": entry.correlation_id,
                "flow": entry.flow,
                "decision": entry.decision,
                "system": entry.system,
                "table": entry.table,
                "key": entry.key,
                # free text of any length (an error body, say): spread over parts like snapshot values
                **split_string("detail", entry.detail, what=f"the audit detail of {entry.key!r}"),
            }
            if entry.reason is not None:
                entity["reason"] = entry.reason
            ops.append(TableOp("create", entity))
        await self._submit(table, plan_transactions([op] for op in ops), ordered=False)

    async def read_audit(
        self, *, limit: int = 100, correlation_id: str | None = None, decision: str | None = None
    ) -> list[AuditEntry]:
        """Newest first (by `at`, then by append order for equal times), optionally filtered."""
        if limit <= 0:
            return []
        table = await self._table("audit")
        conditions: list[str] = []
        parameters: dict[str, Any] = {}
        if correlation_id is not None and _utf8(correlation_id):
            conditions.append("correlation_id eq @correlation_id")
            parameters["correlation_id"] = correlation_id
        if decision is not None:
            conditions.append("decision eq @decision")
            parameters["decision"] = decision
        query_filter = " and ".join(conditions) or None
        found: list[AuditEntry] = []
        async for row in self._query(table, query_filter, parameters, page=min(limit, 1000)):
            if correlation_id is not None and str(row["correlation_id"]) != correlation_id:
                continue  # one with a lone surrogate cannot travel in the URL's $filter: matched here instead
            found.append(
                AuditEntry(
                    at=_plain_utc(row["at"]),
                    correlation_id=str(row["correlation_id"]),
                    flow=str(row["flow"]),
                    decision=cast(AuditDecision, row["decision"]),
                    system=str(row["system"]),
                    table=str(row["table"]),
                    key=str(row["key"]),
                    detail=join_string(row, "detail"),
                    reason=str(row["reason"]) if row.get("reason") is not None else None,
                )
            )
            if len(found) >= limit:
                break
        return found

    # -------------------------------------------------------------------------------- failed attempts

    async def record_failures(self, keys: Sequence[str]) -> dict[str, int]:
        """Count one more failed attempt of each of `keys` (a row per key, raised with optimistic concurrency)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        table = await self._table("failures")

        async def raise_one(key: str) -> int:
            partition = table_key(key)
            for _ in range(_LINK_RETRIES * 4):
                stamp = _plain_utc(datetime.now(UTC))
                try:
                    row = await table.get_entity(partition, _FAILURE_ROW)
                except ResourceNotFoundError:
                    entity = {"PartitionKey": partition, "RowKey": _FAILURE_ROW, "count": 1, "updated_at": stamp}
                    try:
                        await table.create_entity(entity)
                    except ResourceExistsError:
                        continue  # raised concurrently: read again
                    return 1
                count = int(row["count"]) + 1
                entity = {"PartitionKey": partition, "RowKey": _FAILURE_ROW, "count": count, "updated_at": stamp}
                try:
                    await table.update_entity(entity, mode=UpdateMode.REPLACE, etag=row.metadata["etag"],
                                              match_condition=MatchConditions.IfNotModified)
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
                return count
            raise RuntimeError(f"the failure count of {key!r} kept changing under concurrent writers")

        counts = await self._each(unique, raise_one)
        return dict(zip(unique, counts, strict=True))

    async def clear_failures(self, keys: Sequence[str]) -> None:
        """Forget the failed attempts of `keys`; unknown keys are ignored."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        table = await self._table("failures")
        # delete_entity ignores a missing entity: one request per key, concurrently
        await self._each(unique, lambda key: table.delete_entity(table_key(key), _FAILURE_ROW))

    async def forget_failures(self, before: datetime) -> int:
        """Drop failure counts last raised before `before` (a filtered scan, run daily by the controller)."""
        table = await self._table("failures")
        rows = [(str(e["PartitionKey"]), str(e["RowKey"]))
                async for e in self._query(table, "updated_at lt @cutoff", {"cutoff": _plain_utc(before)},
                                           select=["PartitionKey", "RowKey"])]
        await self._each(rows, lambda row: table.delete_entity(row[0], row[1]))
        return len(rows)

    # ------------------------------------------------------------------------------------------ leases

    def _lease_address(self, key: str) -> tuple[str, str]:
        # A few partitions, so that a batch's leases go in entity group transactions (100 per request).
        row = table_key(key)
        return f"lease{zlib.crc32(row.encode('utf-8', 'surrogatepass')) % self._lease_partitions:02d}", row

    async def acquire_leases(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> set[str]:
        """Take or extend the leases of `keys` for `owner`; returns the keys it holds afterwards.

        The common cases cost one transaction per 100 keys: an insert of a free lease, or an ETag-conditional
        replace of one this store wrote for `owner`. A transaction that meets a taken, expired or concurrently
        changed lease fails whole, and only its keys go key by key: insert (409 when taken), else read and,
        when ours or expired, replace under the read ETag (412 when someone was faster: read again).
        """
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        table = await self._table("leases")
        now = datetime.now(UTC)
        expires = _plain_utc(now + timedelta(seconds=ttl_seconds))
        by_row = {self._lease_address(key)[1]: key for key in unique}
        held: set[str] = set()

        def entity(key: str) -> dict[str, Any]:
            partition, row = self._lease_address(key)
            return {"PartitionKey": partition, "RowKey": row, "owner": owner, "expires": expires}

        ops = []
        for key in unique:
            known = self._lease_etags.get((self._lease_address(key)[1], owner))
            ops.append(TableOp("update", entity(key), known) if known else TableOp("create", entity(key)))

        async def one(key: str) -> None:
            partition, row = self._lease_address(key)
            for _ in range(_LINK_RETRIES):
                try:
                    written = await table.create_entity(entity(key))
                except ResourceExistsError:
                    pass
                else:
                    self._lease_etags[(row, owner)] = str(written["etag"])
                    held.add(key)
                    return
                try:
                    current = await table.get_entity(partition, row)
                except ResourceNotFoundError:
                    continue  # released meanwhile: insert again
                if current.get("owner") != owner and _plain_utc(current["expires"]) > now:
                    self._lease_etags.pop((row, owner), None)
                    return  # held elsewhere
                try:
                    written = await table.update_entity(entity(key), mode=UpdateMode.REPLACE,
                                                        etag=current.metadata["etag"],
                                                        match_condition=MatchConditions.IfNotModified)
                except (ResourceModifiedError, ResourceNotFoundError):
                    continue
                self._lease_etags[(row, owner)] = str(written["etag"])
                held.add(key)
                return

        async def run(chunk: Sequence[TableOp]) -> None:
            try:
                async with self._limit:
                    results = await table.submit_transaction([op.to_sdk() for op in chunk])
            except (TableTransactionError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                await self._each([by_row[op.row] for op in chunk], one)
                return
            for op, result in zip(chunk, results, strict=True):
                self._lease_etags[(op.row, owner)] = str(result["etag"])
                held.add(by_row[op.row])

        await _settle(run(chunk) for chunk in plan_transactions([op] for op in ops))
        return held

    async def release_leases(self, keys: Sequence[str], owner: str) -> None:
        """Release the leases of `keys` that `owner` holds: deletes under the ETag of the lease as last written,
        in transactions of 100 (a lease that expired and was taken over since has another ETag: left alone)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return
        table = await self._table("leases")
        by_row = {self._lease_address(key)[1]: key for key in unique}

        async def one(key: str) -> None:
            partition, row = self._lease_address(key)
            etag = self._lease_etags.pop((row, owner), None)
            if etag is None:
                try:
                    current = await table.get_entity(partition, row)
                except ResourceNotFoundError:
                    return
                if current.get("owner") != owner:
                    return
                etag = str(current.metadata["etag"])
            with contextlib.suppress(ResourceModifiedError, ResourceNotFoundError):
                await table.delete_entity(partition, row, etag=etag, match_condition=MatchConditions.IfNotModified)

        known = [TableOp("delete", dict(zip(("PartitionKey", "RowKey"), self._lease_address(key), strict=True)),
                         self._lease_etags[(self._lease_address(key)[1], owner)])
                 for key in unique if (self._lease_address(key)[1], owner) in self._lease_etags]
        unknown = [key for key in unique if (self._lease_address(key)[1], owner) not in self._lease_etags]

        async def run(chunk: Sequence[TableOp]) -> None:
            try:
                async with self._limit:
                    await table.submit_transaction([op.to_sdk() for op in chunk])
            except (TableTransactionError, ResourceModifiedError, ResourceNotFoundError):
                await self._each([by_row[op.row] for op in chunk], one)
                return
            for op in chunk:
                self._lease_etags.pop((op.row, owner), None)

        await _settle([*(run(chunk) for chunk in plan_transactions([op] for op in known)),
                       *(one(key) for key in unknown)])

    async def close(self) -> None:
        """Close the HTTP transport (and the credential the store created itself)."""
        await self._service.close()
        if self._credential is not None:
            await self._credential.close()
