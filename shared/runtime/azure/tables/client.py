"""The store's plumbing: table clients, the request bound, point and range reads, transaction submits."""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast

from azure.core.async_paging import AsyncPageIterator
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableEntity, TableTransactionError
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.runtime.azure.tables.requests import TableRequestCounter
from shared.runtime.azure.tables.transactions import TableOp
from shared.runtime.common import to_utc

T = TypeVar("T")
R = TypeVar("R")

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

_TABLE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{0,51}")
_LINK_RETRIES = 5
#: Partitions of the leases table. Every client of one account must use the same number (it addresses each lease
#: row), so it changes only with every instance stopped; fewer partitions mean fewer transactions per batch.
LEASE_PARTITIONS: Final = 16


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


class TablesBase:
    """What every part of `TableStateStore` stands on: its tables, its request bound, reads and submits."""

    TABLES: Final = ("links", "snapshots", "checkpoints", "dedup", "audit", "failures", "leases", "auditkeys")

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
        """(table, partition) -> until when (monotonic) its reads are point reads, and how many keys the call that
        found it sparse read (see `_read_rows`). Advice on cost only: whichever way a key is read, it is read now."""

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
