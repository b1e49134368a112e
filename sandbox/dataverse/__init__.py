"""Protocol-faithful simulator of Dataverse (Web API v9.2, Entra ID tokens, webhooks), its schemas and seed data."""

from sandbox.dataverse.app import DataverseSimulator
from sandbox.dataverse.knobs import Faults, ServiceProtection
from sandbox.dataverse.metadata import entity_metadata_id
from sandbox.dataverse.platform import WebhookFailure, WebhookRegistration
from sandbox.dataverse.protocol import (
    API_PREFIX,
    APP_USER_ID,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT_ID,
    OFFICE_USER_ID,
    ODataError,
)
from sandbox.dataverse.query import parse_filter
from sandbox.dataverse.rows import Row
from sandbox.dataverse.schema import (
    EDM,
    SAP_UNMAPPED_OPTIONS,
    ChoiceColumn,
    LookupColumn,
    Rollup,
    TableSchema,
    crm_schema,
    default_schema,
    dot_schema,
    merge_schemas,
    sap_schema,
)
from sandbox.dataverse.seed import (
    UNMAPPED_CURRENCY,
    UNMAPPED_PLANT,
    UNMAPPED_SALES_ORG,
    UNMAPPED_SIGN_TYPE,
    UNMAPPED_UNIT,
    bulk_sap_orders,
    seed_crm,
    seed_dataverse,
    seed_sap_accounts,
    seed_sap_orders,
)

__all__ = [
    "API_PREFIX", "APP_USER_ID", "DEFAULT_CLIENT_ID", "DEFAULT_CLIENT_SECRET", "DEFAULT_TENANT_ID", "EDM",
    "OFFICE_USER_ID", "SAP_UNMAPPED_OPTIONS", "UNMAPPED_CURRENCY", "UNMAPPED_PLANT", "UNMAPPED_SALES_ORG",
    "UNMAPPED_SIGN_TYPE", "UNMAPPED_UNIT",
    "ChoiceColumn", "DataverseSimulator", "Faults", "LookupColumn", "ODataError", "Rollup", "Row",
    "ServiceProtection", "TableSchema", "WebhookFailure", "WebhookRegistration",
    "bulk_sap_orders", "crm_schema", "default_schema", "dot_schema", "entity_metadata_id", "merge_schemas",
    "parse_filter", "sap_schema", "seed_crm", "seed_dataverse", "seed_sap_accounts", "seed_sap_orders",
]
