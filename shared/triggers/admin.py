"""HTTP trigger: POST /api/admin/load/{flow} (admin key) — one time-boxed step of a flow's resumable initial load."""

from __future__ import annotations

import azure.functions as func

from shared.bootstrap import get_services
from shared.core.errors import SpecError
from shared.ops.load import LoadBusyError, LoadRequest, load_flow
from shared.triggers._common import _short, error_response, json_response

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("admin_load")
@bp.route(route="admin/load/{flow}", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
async def admin_load(req: func.HttpRequest) -> func.HttpResponse:
    """200 when the flow is loaded (or there was nothing to load), 202 when a call again must continue it (time
    budget spent, or a system paused: the checkpoint is saved either way), 400 bad body, 404 unknown flow,
    409 another load of the flow is running."""
    flow = req.route_params.get("flow") or ""
    try:
        options = LoadRequest.parse(req.get_body())
        report = await load_flow(get_services(), flow, since=options.since, restart=options.restart,
                                 max_seconds=options.max_seconds)
    except LoadBusyError as exc:
        return json_response({"error": "LOAD_RUNNING", "detail": str(exc), "started_at": exc.started_at,
                              "updated_at": exc.updated_at}, 409)
    except SpecError as exc:
        if exc.reason == "UNKNOWN_FLOW":
            return json_response({"error": "UNKNOWN_FLOW", "detail": _short(exc.detail)}, 404)
        return error_response(exc)
    except ValueError as exc:
        return json_response({"error": "BAD_REQUEST", "detail": _short(str(exc))}, 400)
    except Exception as exc:  # translated into a clear HTTP answer
        return error_response(exc)
    body = report.as_dict()
    if report.paused and not report.complete:
        body["next"] = "call again after " + max(report.paused.values())
    return json_response(body, 200 if report.complete else 202)
