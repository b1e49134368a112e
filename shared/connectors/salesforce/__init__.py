"""Salesforce REST API v63.0 connector: RecordSink + ChangeSource on simple-salesforce (run in worker threads)."""

from shared.connectors.salesforce.changes import SalesforceChange, parse_cdc_event
from shared.connectors.salesforce.codecs import parse_sf_datetime, soql_identifier, soql_quote
from shared.connectors.salesforce.connector import SalesforceClient
from shared.connectors.salesforce.errors import seconds_until_utc_midnight

__all__ = [
    "SalesforceChange", "SalesforceClient", "parse_cdc_event", "parse_sf_datetime", "seconds_until_utc_midnight",
    "soql_identifier", "soql_quote",
]
