"""The Dataverse connector: one client implementing `RecordSink` and `ChangeSource` over the Web API v9.2."""

from __future__ import annotations

from shared.connectors.dataverse.changes import DataverseChanges
from shared.connectors.dataverse.metadata import DataverseMetadata
from shared.connectors.dataverse.writes import DataverseWrites


class DataverseClient(DataverseChanges, DataverseWrites, DataverseMetadata):
    """Dataverse Web API v9.2 client implementing `RecordSink` and `ChangeSource` (canonical record values).

    Canonical values (`SourceRecord.values`): logical attribute names; lookups under the logical name holding
    the lowercase GUID (`_x_value` -> `x`); choices as int; decimals as float; dates "YYYY-MM-DD"; datetimes
    "YYYY-MM-DDTHH:MM:SSZ". `SourceRecord.key` is the lowercase primary GUID, `version` the @odata.etag.
    """
