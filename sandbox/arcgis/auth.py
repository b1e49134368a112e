"""Tokens and the portal: generateToken-style client credentials, API keys, `info` and `portals/self`."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandbox.arcgis.errors import RestError
from sandbox.arcgis.store import FeatureStore

TOKEN_PATH = "/sharing/rest/oauth2/token"
SHARING_PATH = "/sharing/rest"
"""The portal (sharing) API root: the simulator serves `info`, `portals/self` and `oauth2/token` under it."""
PORTAL_VERSION = "2025.3"
APP_PRIVILEGES = ("features:user:edit", "portal:user:viewOrgItems")
"""What the default app's item is granted in `appInfo.privileges` (feature editing, reading org items)."""


class SimAuth(FeatureStore):
    """OAuth2 client credentials, API keys, and the portal resources a portal-first client reads."""

    APP_ITEM_ID: str
    org_id: str
    token_lifetime_seconds: int
    request_count: Counter[str]
    _apps: dict[str, tuple[str, str]]
    _api_keys: dict[str, str]
    _tokens: dict[str, tuple[str, float]]
    _token_apps: dict[str, str]

    def _expire_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()
            self._token_apps.clear()

    def _authenticate(self, params: Mapping[str, str], headers: Mapping[str, str]) -> str:
        token = _request_token(params, headers)
        if not token:
            raise RestError(499, "Token Required", ["Token Required"], message_code="GWM_0003")
        with self._lock:
            entry = self._tokens.get(token)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        if token in self._api_keys:
            return self._api_keys[token]
        raise RestError(498, "Invalid token.", [])

    def _token(self, params: Mapping[str, str]) -> dict[str, Any]:
        def fail(error: str, description: str) -> dict[str, Any]:
            return {"error": {"code": 400, "error": error, "error_description": description,
                              "message": description, "details": []}}

        if params.get("grant_type") != "client_credentials":
            return fail("unsupported_grant_type", "Unsupported grant type")
        client_id = params.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None:
            return fail("invalid_request", "Invalid client_id")
        if not hmac.compare_digest(app[0], params.get("client_secret", "")):
            return fail("invalid_request", "Invalid client_secret")
        lifetime = self.token_lifetime_seconds
        raw = params.get("expiration", "")
        if raw.isdigit():
            lifetime = min(int(raw) * 60, 14 * 24 * 3600)
        token = secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[token] = (app[1], time.monotonic() + lifetime)
            self._token_apps[token] = client_id
        return {"access_token": token, "expires_in": lifetime}

    # ------------------------------------------------------------------------------------ portal (sharing API)

    def _portal_endpoint(self, request: Request, path: str, params: Mapping[str, str]) -> Response:
        """The few portal resources a portal-first client (the `arcgis` package) reads before it opens a layer."""
        resource = "/".join(p for p in path[len(SHARING_PATH):].split("/") if p).lower()
        self.request_count["portal." + (resource or "root")] += 1
        if params.get("f", "html").lower() not in ("json", "pjson"):
            return Response("<html><body>ArcGIS Portal Directory (use f=json)</body></html>", media_type="text/html")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            if resource == "":
                return JSONResponse({"currentVersion": PORTAL_VERSION})
            if resource == "info":
                return JSONResponse(self._portal_info())
            if resource == "portals/self":
                return JSONResponse(self._portal_self(self._portal_caller(params, headers)))
        except RestError as err:
            return JSONResponse(err.body())
        return JSONResponse(RestError(400, "Invalid URL", ["Invalid URL"]).body())

    def _portal_caller(self, params: Mapping[str, str], headers: Mapping[str, str]) -> tuple[str, str, str] | None:
        """(kind "app" | "apikey", client id or key, username) of the request's token; None when anonymous."""
        token = _request_token(params, headers)
        if not token:
            return None
        user = self._authenticate({"token": token}, {})
        with self._lock:
            client_id = self._token_apps.get(token)
        return ("app", client_id, user) if client_id is not None else ("apikey", token, user)

    def _portal_info(self) -> dict[str, Any]:
        # ArcGIS Online's `/sharing/rest/info` (the portal "Info" resource): token-based security, generateToken.
        base = self._public_base()
        return {"owningSystemUrl": base,
                "authInfo": {"tokenServicesUrl": f"{base}{SHARING_PATH}/generateToken", "isTokenBasedSecurity": True}}

    def _portal_self(self, caller: tuple[str, str, str] | None) -> dict[str, Any]:
        """`portals/self`: the organisation as the caller sees it; an app token adds `appInfo`, no `user`."""
        host = self._public_base().split("://", 1)[-1]
        out: dict[str, Any] = {
            "access": "private", "allSSL": True, "canSearchPublic": True, "canSharePublic": True,
            "created": 1392336986000, "culture": "en", "currentVersion": PORTAL_VERSION,
            "customBaseUrl": host, "id": self.org_id, "isPortal": False, "name": "Syncline DOT (simulated)",
            "portalHostname": host, "portalMode": "multitenant", "portalName": "ArcGIS Online",
            "region": "WO", "supportsHostedServices": True, "supportsOAuth": True, "units": "english",
            "urlKey": "syncline-dot", "useStandardizedQuery": True, "httpPort": 80, "httpsPort": 443,
            "maxTokenExpirationMinutes": -1, "helperServices": {}, "portalProperties": {},
        }
        if caller is None:
            return {key: out[key] for key in ("access", "allSSL", "currentVersion", "isPortal", "portalHostname",
                                              "portalMode", "portalName", "supportsOAuth", "culture", "region",
                                              "helperServices", "httpPort", "httpsPort")}
        kind, ident, user = caller
        out["appInfo"] = {"appId": ident if kind == "app" else "", "itemId": self.APP_ITEM_ID,
                          "appOwner": user, "orgId": self.org_id, "appTitle": "Syncline",
                          "privileges": list(APP_PRIVILEGES)}
        return out


def _request_token(params: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The request's token: the `token` parameter, else a bearer in `X-Esri-Authorization` or `Authorization`."""
    token = params.get("token") or ""
    for header in ("x-esri-authorization", "authorization"):
        value = headers.get(header, "")
        if not token and value.lower().startswith("bearer "):
            token = value[7:].strip()
    return token
