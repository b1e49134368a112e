"""ArcGIS Online feature-service connector over the REST API (httpx): query, edits, changes, attachments, webhooks."""

from shared.connectors.arcgis.auth import DEFAULT_POLICY, ApiKeyAuth, AppCredentialsAuth, ArcGISAuth
from shared.connectors.arcgis.codecs import SYSTEM, attachment_file_name, canonical_guid, epoch_ms_to_datetime
from shared.connectors.arcgis.connector import ArcGISFeatureServiceClient
from shared.connectors.arcgis.schema import FieldInfo, LayerInfo, ServiceInfo
from shared.connectors.arcgis.webhooks import ArcGISWebhook, LayerChange, parse_webhook, verify_signature

__all__ = [
    "DEFAULT_POLICY",
    "SYSTEM",
    "ApiKeyAuth",
    "AppCredentialsAuth",
    "ArcGISAuth",
    "ArcGISFeatureServiceClient",
    "ArcGISWebhook",
    "FieldInfo",
    "LayerChange",
    "LayerInfo",
    "ServiceInfo",
    "attachment_file_name",
    "canonical_guid",
    "epoch_ms_to_datetime",
    "parse_webhook",
    "verify_signature",
]
