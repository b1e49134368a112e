"""Dynamics 365 Finance & Operations OData v4 (`/data`) connector: RecordSink + ChangeSource, business events.

Addressing
    Tables are entity set names (`CustomersV3`, `ReleasedProductsV2`, `SalesOrderHeadersV2`, `SalesOrderLines`).
    Every key is fully specified, `dataAreaId` included; the key fields per entity live in `ENTITY_KEYS`.

Canonical key (`SourceRecord.key`, `WriteOp.key`, `WriteResult.key`)
    The key field values in `ENTITY_KEYS` order joined with `|`, e.g. `usmf|US-001` for
    (dataAreaId, CustomerAccount). A `|` or `\\` inside a value is escaped as `\\|` / `\\\\`, so the format is
    reversible (`format_key` / `parse_key`). `dataAreaId` is kept as F&O returns it (lower case).

Reads
    Always `cross-company=true` (a `dataAreaId` filter narrows to one company when asked); `$filter` literals
    are escaped (strings quoted with `''` doubling, numbers literal, datetimes ISO-8601 UTC, `bool` and
    `FinOpsEnum` as enum literals such as `Microsoft.Dynamics.DataEntities.NoYes'Yes'`); server-driven paging
    follows `@odata.nextLink` verbatim, rebased onto our environment host so the token never goes elsewhere.

Writes
    F&O has no upsert: `upsert` reads by key (or `match`) and PATCHes (`If-Match: *`) when found, else POSTs
    (201 returns the entity, whose key fields give the canonical key). A replayed create therefore finds the
    record and PATCHes it. `delete` -> DELETE (404 = already gone). Validation failures come back as HTTP 500
    with an `AxODataWriteException` innererror: mapped to RejectedError carrying the infolog text; any other
    5xx is TransientError. Key fields left out of a create (CustomerAccount, SalesOrderNumber, InventoryLotId)
    are assigned by F&O's number sequences and come back in the 201 body.

Document lines (`WriteOp.lines`)
    After the header is written, its lines are read with one query (the `parent_fields`, e.g. dataAreaId and
    SalesOrderNumber) and each item is matched locally by its `match` field: PATCHed when a value differs,
    POSTed (with the parent fields copied from the header row) when absent. A failed line fails the op with
    the header's key, so the retry finds the header by `match` and adds only what is missing.

Change detection (`changes_since`)
    Entities in `MODIFIED_FIELDS` are polled with `ModifiedDateTime gt <checkpoint>` ordered ascending; the
    checkpoint is the ISO timestamp of the newest change seen (deletes are not visible to this mode). Other
    entities (ReleasedProductsV2, SalesOrderLines) are compared by full scan: the checkpoint is a compressed map
    of key -> row hash, changed/new rows are yielded and vanished keys come back flagged `deleted`.
"""

from __future__ import annotations

from shared.connectors.fno.changes import FinOpsChanges
from shared.connectors.fno.codecs import SYSTEM
from shared.connectors.fno.metadata import FinOpsMetadata
from shared.connectors.fno.writes import FinOpsWrites
from shared.core.errors import RejectedError


class FinOpsClient(FinOpsChanges, FinOpsWrites, FinOpsMetadata):
    """F&O OData v4 client implementing `RecordSink` and `ChangeSource` (see the module docstring).

    `SourceRecord.values` are the entity's fields as F&O returns them (enums as member names); `version` is the
    `@odata.etag`; `modified` the `ModifiedDateTime` when the entity has it.
    """

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """F&O document attachments are not synced by Syncline."""
        raise RejectedError(f"{SYSTEM}: attachments are not supported for {table} ({key}, {attachment_id})")
