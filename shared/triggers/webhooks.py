"""HTTP triggers for inbound webhooks: Dataverse (outbound direct writes) and ArcGIS/Survey123 (enqueue)."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import get_services
from shared.intake import (
    check_shared_secret,
    handle_arcgis_webhook,
    handle_dataverse_webhook,
    handle_fno_business_events,
    handle_salesforce_change_events,
)
from shared.triggers._common import error_response, json_response

log = logging.getLogger("syncline.triggers.webhooks")

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("dataverse_webhook")
@bp.route(route="webhooks/dataverse", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def dataverse_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """Dataverse service-endpoint webhook (RemoteExecutionContext): translate and write to ArcGIS now."""
    try:
        services = get_services()
        check_shared_secret(services, req.headers.get("x-syncline-key"))
        result = await handle_dataverse_webhook(services, req.get_body())
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    log.info("dataverse webhook: correlation_id=%s written=%d queued=%d", result.correlation_id, result.written,
             result.queued)
    return json_response(result.as_dict(), 200)


@bp.function_name("arcgis_webhook")
@bp.route(route="webhooks/arcgis", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def arcgis_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """ArcGIS feature-service and Survey123 webhooks: authenticate, validate, enqueue."""
    try:
        services = get_services()
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
    try:
        services = get_services()
        # F&O's HTTPS endpoint carries no custom headers: the secret may ride in the (Key Vault-held) URL.
        check_shared_secret(services, req.headers.get("x-syncline-key") or req.params.get("syncline-key"))
        result = await handle_fno_business_events(services, req.get_body())
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    log.info("fno business events: accepted=%d duplicates=%d queued=%d", result.accepted, result.skipped,
             result.queued)
    return json_response(result.as_dict(), 202)


@bp.function_name("salesforce_webhook")
@bp.route(route="webhooks/salesforce", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
async def salesforce_webhook(req: func.HttpRequest) -> func.HttpResponse:
    """Salesforce Change Data Capture events relayed as JSON: drop echoes and duplicates, enqueue."""
    try:
        services = get_services()
        check_shared_secret(services, req.headers.get("x-syncline-key"))
        result = await handle_salesforce_change_events(services, req.get_body())
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    log.info("salesforce change events: accepted=%d skipped=%d queued=%d", result.accepted, result.skipped,
             result.queued)
    return json_response(result.as_dict(), 202)
