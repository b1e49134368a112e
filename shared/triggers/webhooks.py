"""HTTP triggers for inbound webhooks: Dataverse (outbound direct writes); ArcGIS, F&O, Salesforce, SAP (enqueue)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import azure.functions as func

from shared.bootstrap import Services, get_services
from shared.ops import (
    IntakeResult,
    check_shared_secret,
    handle_arcgis_webhook,
    handle_dataverse_webhook,
    handle_fno_business_events,
    handle_salesforce_change_events,
    handle_sap_events,
)
from shared.triggers._common import error_response, json_response

log = logging.getLogger("syncline.triggers.webhooks")

bp = func.Blueprint()  # type: ignore[no-untyped-call]


async def _intake(
    req: func.HttpRequest,
    handle: Callable[[Services, bytes], Awaitable[IntakeResult]],
    *,
    label: str,
    status: int,
    secret_in_query: bool = False,
) -> func.HttpResponse:
    """Shared-secret check, one application service, and the outcome as JSON (errors as clear answers)."""
    try:
        services = get_services()
        presented = req.headers.get("x-syncline-key")
        if presented is None and secret_in_query:
            presented = req.params.get("syncline-key")
        check_shared_secret(services, presented)
        result = await handle(services, req.get_body())
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    log.info("%s: correlation_id=%s accepted=%d written=%d skipped=%d queued=%d", label, result.correlation_id,
             result.accepted, result.written, result.skipped, result.queued)
    # A change held for an open circuit breaker is accepted, not done: 202 (it is scheduled on the queue).
    held = result.statuses.get("held", 0) and not result.written
    return json_response(result.as_dict(), 202 if held else status)


@bp.function_name("dataverse_webhook")
@bp.route(route="webhooks/dataverse", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def dataverse_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """Dataverse service-endpoint webhook (RemoteExecutionContext): translate and write to ArcGIS now."""
    return await _intake(req, handle_dataverse_webhook, label="dataverse webhook", status=200)


@bp.function_name("arcgis_webhook")
@bp.route(route="webhooks/arcgis", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def arcgis_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """ArcGIS feature-service and Survey123 webhooks: authenticate, validate, enqueue."""
    try:
        services = get_services()
        # Authentication happens inside: a signed feature-service webhook needs no shared secret.
        result = await handle_arcgis_webhook(
            services,
            req.get_body(),
            req.headers.get("content-type", "application/json"),
            req.headers.get("x-esriHook-Signature"),
            req.headers.get("x-syncline-key"),
        )
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    log.info("arcgis webhook: queued=%d", result.queued)
    return json_response(result.as_dict(), 202)


@bp.function_name("fno_webhook")
@bp.route(route="webhooks/fno", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def fno_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """F&O business events (HTTPS endpoint): deduplicate, read the full record back, enqueue."""
    # F&O's HTTPS endpoint carries no custom headers: the secret may ride in the (Key Vault-held) URL.
    return await _intake(req, handle_fno_business_events, label="fno business events", status=202,
                         secret_in_query=True)


@bp.function_name("salesforce_webhook")
@bp.route(route="webhooks/salesforce", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def salesforce_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """Salesforce Change Data Capture events relayed as JSON: drop echoes and duplicates, enqueue."""
    return await _intake(req, handle_salesforce_change_events, label="salesforce change events", status=202)


@bp.function_name("sap_webhook")
@bp.route(route="webhooks/sap", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def sap_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """SAP business events (Event Mesh webhook subscription, CloudEvents JSON): deduplicate, read back, enqueue."""
    return await _intake(req, handle_sap_events, label="sap events", status=202)
