"""Checkpoints in Table Storage: compare-and-set on the service's own ETag."""

from __future__ import annotations

from datetime import UTC, datetime

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.core.ports import Checkpoint, CheckpointConflictError
from shared.runtime.azure.tables.client import TablesBase, _plain_utc
from shared.runtime.azure.tables.keys import table_key

_CHECKPOINT_PARTITION = "checkpoint"


class CheckpointTables(TablesBase):
    """Checkpoints: named values written under an expected ETag."""

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
