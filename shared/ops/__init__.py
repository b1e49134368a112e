"""Operator and application services: webhook intake, direct writes, initial load, health, DLQ replay, reconcile."""

from shared.ops.commands import list_dead_letters, register_arcgis, register_dataverse, replay, run_cycle, system_status
from shared.ops.dlq import replay_dead_letters
from shared.ops.intake import (
    Unauthorized,
    check_shared_secret,
    handle_arcgis_webhook,
    handle_dataverse_webhook,
    handle_fno_business_events,
    handle_salesforce_change_events,
    handle_sap_events,
)
from shared.ops.reconciliation import EntityDrift, reconcile
from shared.ops.registration import (
    DEFAULT_CHANGE_TYPES,
    DataverseAuth,
    RegistrationItem,
    RegistrationReport,
    mapped_columns,
    register_arcgis_webhook,
    register_dataverse_webhook,
)
from shared.ops.status import health
from shared.ops.writes import IntakeResult, enqueue, enqueue_new, initial_load, write_direct

__all__ = [
    "DEFAULT_CHANGE_TYPES", "DataverseAuth", "EntityDrift", "IntakeResult", "RegistrationItem", "RegistrationReport",
    "Unauthorized", "check_shared_secret", "enqueue", "enqueue_new", "handle_arcgis_webhook",
    "handle_dataverse_webhook", "handle_fno_business_events", "handle_salesforce_change_events", "handle_sap_events",
    "health", "initial_load", "list_dead_letters", "mapped_columns", "reconcile", "register_arcgis",
    "register_arcgis_webhook", "register_dataverse", "register_dataverse_webhook", "replay", "replay_dead_letters",
    "run_cycle", "system_status", "write_direct",
]
