"""Dataverse (Dynamics 365 CE) Web API v9.2 connector: RecordSink + ChangeSource over async httpx, Entra ID auth."""

from shared.connectors.dataverse.auth import (
    AzureIdentityTokenProvider,
    TokenProvider,
    client_secret_token_provider,
)
from shared.connectors.dataverse.batch import parse_batch_response
from shared.connectors.dataverse.changes import DataverseWebhookChange, parse_remote_execution_context
from shared.connectors.dataverse.codecs import TableInfo
from shared.connectors.dataverse.connector import DataverseClient
from shared.connectors.dataverse.writes import ANNOTATION_MARKER

__all__ = [
    "ANNOTATION_MARKER", "AzureIdentityTokenProvider", "DataverseClient", "DataverseWebhookChange", "TableInfo",
    "TokenProvider", "client_secret_token_provider", "parse_batch_response",
    "parse_remote_execution_context",
]
