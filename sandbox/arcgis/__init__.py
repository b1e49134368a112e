"""Simulator of an ArcGIS Online org: one hosted feature service, its portal and token endpoint, webhooks, faults."""

from sandbox.arcgis.app import (
    DEFAULT_API_KEY,
    DEFAULT_API_KEY_USERNAME,
    DEFAULT_APP_USERNAME,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_ORG_ID,
    DEFAULT_SERVICE_NAME,
    ArcGISSimulator,
)
from sandbox.arcgis.auth import SHARING_PATH, TOKEN_PATH
from sandbox.arcgis.codecs import lonlat_to_mercator, mercator_to_lonlat
from sandbox.arcgis.errors import EditError, RestError
from sandbox.arcgis.faults import Faults
from sandbox.arcgis.schema import FieldDef, LayerDef, coded_domain, dot_layers
from sandbox.arcgis.webhooks import MAX_WEBHOOKS, WebhookDelivery, WebhookRegistration

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_API_KEY_USERNAME",
    "DEFAULT_APP_USERNAME",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_ORG_ID",
    "DEFAULT_SERVICE_NAME",
    "MAX_WEBHOOKS",
    "SHARING_PATH",
    "TOKEN_PATH",
    "ArcGISSimulator",
    "EditError",
    "Faults",
    "FieldDef",
    "LayerDef",
    "RestError",
    "WebhookDelivery",
    "WebhookRegistration",
    "coded_domain",
    "dot_layers",
    "lonlat_to_mercator",
    "mercator_to_lonlat",
]
