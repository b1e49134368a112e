"""The Azure `StateStore`: links, snapshots, checkpoints, dedup keys and audit ledger in Azure Table Storage.

Same semantics as `shared.runtime.embedded.SqliteStateStore`, on eight tables named `{prefix}links`,
`{prefix}snapshots`, `{prefix}checkpoints`, `{prefix}dedup`, `{prefix}audit`, `{prefix}failures`,
`{prefix}leases` and `{prefix}auditkeys` (created on first use).
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
    auditkeys    audit|{system}                       {key}|{the audit RowKey}               a copy of it

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
- auditkeys: each audit row's copy, indexed by record: one range query reads a record's entries newest first
  (`read_audit_for`); rows appended before the index existed are not in it.

Transactions hold at most 100 operations of ONE partition and stay under 4 MiB: `plan_transactions` does the
split in our code (Azurite answers a 101-operation batch with a malformed response instead of an error).
Many keys of one partition are read with range queries when they are dense in it, else with concurrent point
reads (`_read_rows`); at most `concurrency` requests at a time per store.
"""

from __future__ import annotations

from azure.core.credentials_async import AsyncTokenCredential
from azure.data.tables.aio import TableServiceClient

from shared.runtime.azure.tables.audit import AuditTables
from shared.runtime.azure.tables.checkpoints import CheckpointTables
from shared.runtime.azure.tables.client import DEFAULT_CONCURRENCY, LEASE_PARTITIONS, QUERY_PAGE
from shared.runtime.azure.tables.connection import default_transport
from shared.runtime.azure.tables.dedup import DedupTables
from shared.runtime.azure.tables.leases import LeaseTables
from shared.runtime.azure.tables.links import LinkTables
from shared.runtime.azure.tables.requests import TableRequestCounter
from shared.runtime.azure.tables.snapshots import SnapshotTables


class TableStateStore(LinkTables, SnapshotTables, CheckpointTables, DedupTables, AuditTables, LeaseTables):
    """`StateStore` on Azure Table Storage (or Azurite); safe for many concurrent clients of one account.

    Links are one-to-one per (entity, system pair) exactly as in `SqliteStateStore`: putting a link for a key
    that is already linked elsewhere removes the old link in both directions, in the same transaction.
    """

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

    async def close(self) -> None:
        """Close the HTTP transport (and the credential the store created itself)."""
        await self._service.close()
        if self._credential is not None:
            await self._credential.close()
