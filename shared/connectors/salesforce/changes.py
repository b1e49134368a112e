"""Salesforce changes: SOQL polls on SystemModstamp and full scans; CDC events -> change envelopes (echoes told)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.connectors.salesforce.client import SalesforceHttp
from shared.connectors.salesforce.codecs import SYSTEM, parse_sf_datetime, soql_quote, soql_select
from shared.core.errors import EnvelopeError, RejectedError
from shared.core.ports import SourceRecord
from shared.payloads import SalesforceChangeEvent, bad_values, read_json, validate


class SalesforceChanges(SalesforceHttp):
    """The `ChangeSource` reads: SystemModstamp polls (backfill behind CDC) and scans."""

    async def changes_since(self, table: str, checkpoint: str | None) -> AsyncIterator[tuple[list[SourceRecord], str]]:
        """SOQL poll on SystemModstamp (backfill; CDC keeps 72 h). The checkpoint is the last SystemModstamp seen."""
        since = parse_sf_datetime(checkpoint) if checkpoint else None
        if checkpoint and since is None:
            raise EnvelopeError(f"{SYSTEM}: checkpoint {checkpoint!r} is not a timestamp")
        # SOQL datetime literals have second precision: ask from the checkpoint's second, drop what was seen
        where = f" WHERE SystemModstamp >= {soql_quote(since)}" if since else ""
        soql = soql_select(await self._field_list(table), table, where + " ORDER BY SystemModstamp ASC")
        current = checkpoint or ""
        async for page in self._query_pages(soql):
            fresh = [r for r in page if since is None or (r.modified is not None and r.modified > since)]
            if fresh:
                current = str(fresh[-1].values.get("SystemModstamp") or current)
                yield fresh, current

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        soql = soql_select(await self._field_list(table), table, " ORDER BY Id")
        async for page in self._query_pages(soql):
            yield page

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        raise RejectedError(f"{SYSTEM}: attachments (ContentVersion) are not synced by this connector")


@dataclass(frozen=True)
class SalesforceChange:
    """A Change Data Capture event relayed as JSON (Pub/Sub-shaped or CometD envelope)."""

    entity: str
    record_ids: list[str]
    change_type: str
    changed_fields: list[str]
    commit_timestamp: datetime | None
    transaction_key: str
    replay_id: int | None
    change_origin: str
    commit_user: str | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def is_own_write(self, client: str) -> bool:
        """True when the change was made by a request that sent `Sforce-Call-Options: client=<client>`."""
        for part in self.change_origin.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "client" and value.strip().rstrip("/") == client:
                return True
        return False


def parse_cdc_event(body: Any) -> SalesforceChange:
    """Parse one CDC event (bytes, str or decoded JSON); malformed input raises EnvelopeError."""
    data = read_json(body, f"{SYSTEM}: CDC event") if isinstance(body, bytes | str) else body
    if not isinstance(data, dict):
        raise EnvelopeError(f"{SYSTEM}: CDC event must be a JSON object")
    validate(SalesforceChangeEvent, data, f"{SYSTEM}: CDC event")
    with bad_values(f"{SYSTEM}: CDC event"):
        return _checked_cdc_event(data)


def _checked_cdc_event(data: dict[str, Any]) -> SalesforceChange:
    replay: Any = data.get("replayId")
    if isinstance(data.get("data"), dict):  # CometD envelope
        inner = data["data"]
        payload = inner.get("payload")
        event = inner.get("event")
        replay = event.get("replayId") if isinstance(event, dict) else None
    else:
        payload = data.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("ChangeEventHeader"), dict):
        raise EnvelopeError(f"{SYSTEM}: CDC event has no payload.ChangeEventHeader")
    header = payload["ChangeEventHeader"]
    entity, ids, change_type = header.get("entityName"), header.get("recordIds"), header.get("changeType")
    if not isinstance(entity, str) or not entity:
        raise EnvelopeError(f"{SYSTEM}: CDC event header has no entityName")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise EnvelopeError(f"{SYSTEM}: CDC event header recordIds must be a list of ids")
    if not isinstance(change_type, str) or not change_type:
        raise EnvelopeError(f"{SYSTEM}: CDC event header has no changeType")
    changed = header.get("changedFields") or []
    if not isinstance(changed, list):
        raise EnvelopeError(f"{SYSTEM}: CDC event changedFields must be a list")
    if replay is not None and not isinstance(replay, int | str):
        raise EnvelopeError(f"{SYSTEM}: CDC replayId must be a number")
    try:
        replay_id = int(replay) if replay is not None else None
    except ValueError as exc:
        raise EnvelopeError(f"{SYSTEM}: CDC replayId {replay!r} is not a number") from exc
    values = {k: v for k, v in payload.items() if k != "ChangeEventHeader"}
    raw_commit = header.get("commitTimestamp")
    commit_timestamp = parse_sf_datetime(raw_commit)
    if commit_timestamp is None and raw_commit not in (None, ""):
        # The sender's own metadata, not record data: a value we cannot read refuses the event.
        raise EnvelopeError(f"{SYSTEM}: CDC event header commitTimestamp {str(raw_commit)[:40]!r} is not a date/time "
                            "in range (years 1-9999)")
    return SalesforceChange(
        entity=entity, record_ids=list(ids), change_type=change_type, changed_fields=[str(f) for f in changed],
        commit_timestamp=commit_timestamp,
        transaction_key=str(header.get("transactionKey") or ""), replay_id=replay_id,
        change_origin=str(header.get("changeOrigin") or ""), commit_user=header.get("commitUser"), values=values,
    )

