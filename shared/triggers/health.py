"""HTTP trigger: GET /api/health — reachability, queue depths and the last controller cycle."""

from __future__ import annotations

import azure.functions as func

from shared.bootstrap import get_services
from shared.ops import health
from shared.triggers._common import error_response, json_response

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
async def health_check(req: func.HttpRequest) -> func.HttpResponse:
    """200 when every system answers and the last cycle succeeded, 503 otherwise."""
    try:
        report = await health(get_services())
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    return json_response(report, 200 if report["status"] == "healthy" else 503)
