"""The Salesforce connector: one client implementing `RecordSink` and `ChangeSource` over REST v63.0."""

from __future__ import annotations

from shared.connectors.salesforce.changes import SalesforceChanges
from shared.connectors.salesforce.metadata import SalesforceMetadata
from shared.connectors.salesforce.writes import SalesforceWrites


class SalesforceClient(SalesforceChanges, SalesforceWrites, SalesforceMetadata):
    """RecordSink + ChangeSource for one Salesforce org (simple-salesforce, calls run via asyncio.to_thread)."""
