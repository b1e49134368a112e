"""A local stand-in for the Functions host: serves the app's HTTP triggers over loopback via azure-functions types.

The real host cannot run on this machine; this shim routes `/api/<route>` to the registered user function
with a real `func.HttpRequest`, so simulators can deliver webhooks to Syncline over HTTP.
"""

from __future__ import annotations

import functools
from typing import Any

import azure.functions as func
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@functools.cache
def registered_functions() -> dict[str, Any]:
    """name -> azure.functions Function of function_app.app (get_functions may be called once per app)."""
    import function_app

    return {str(f.get_function_name()): f for f in function_app.app.get_functions()}


def http_routes() -> dict[str, tuple[Any, list[str]]]:
    """route -> (user function, methods) for every HTTP trigger."""
    routes: dict[str, tuple[Any, list[str]]] = {}
    for fn in registered_functions().values():
        trigger = fn.get_trigger().get_dict_repr()
        if trigger.get("type") == "httpTrigger":
            methods = [str(getattr(m, "value", m)).upper() for m in trigger.get("methods") or ["GET", "POST"]]
            routes[trigger["route"]] = (fn.get_user_function(), methods)
    return routes


def _match_template(table: dict[str, tuple[Any, list[str]]], route: str
                    ) -> tuple[tuple[Any, list[str]] | None, dict[str, str]]:
    """A route with parameters (`admin/load/{flow}`): the entry and the values of its parameters, as the host has."""
    parts = route.split("/")
    for template, entry in table.items():
        names = template.split("/")
        if "{" in template and len(names) == len(parts) and all(
                n == p or (n.startswith("{") and n.endswith("}") and p) for n, p in zip(names, parts, strict=True)):
            return entry, {n[1:-1]: p for n, p in zip(names, parts, strict=True) if n.startswith("{")}
    return None, {}


def build_app(function_key: str | None = None) -> Starlette:
    """An ASGI app exposing every HTTP trigger under /api; `function_key` emulates auth level FUNCTION."""
    table = http_routes()

    async def dispatch(request: Request) -> Response:
        route = request.path_params["route"]
        entry, route_params = table.get(route), {}
        if entry is None:
            entry, route_params = _match_template(table, route)
        if entry is None:
            return Response(status_code=404)
        user_fn, methods = entry
        if request.method not in methods:
            return Response(status_code=405)
        if function_key is not None:
            presented = request.query_params.get("code") or request.headers.get("x-functions-key")
            if presented != function_key:
                return Response(status_code=401)
        req = func.HttpRequest(
            method=request.method,
            url=str(request.url),
            headers=dict(request.headers),
            params=dict(request.query_params),
            route_params=route_params,
            body=await request.body(),
        )
        resp = await user_fn(req)
        return Response(content=resp.get_body(), status_code=resp.status_code,
                        media_type=resp.mimetype or "application/json")

    return Starlette(routes=[Route("/api/{route:path}", dispatch, methods=["GET", "POST"])])
