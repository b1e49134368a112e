"""Entra ID for the simulator: OpenID discovery, client-credentials tokens, bearer checks, expiry."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandbox.dataverse.state import _State


class _EntraId(_State):
    """The tenant's token endpoint and the Web API's bearer-token check.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def _expire_tokens(self) -> None:
        with self._lock:
            for token, (client, _exp) in list(self._tokens.items()):
                self._tokens[token] = (client, 0.0)

    async def _openid_configuration(self, request: Request) -> Response:
        self.request_counts["openid"] += 1
        tenant = request.path_params["tenant"]
        if tenant not in (self.tenant_id, "organizations", "common"):
            return JSONResponse(self._aad_error("invalid_tenant", 90002, f"Tenant '{tenant}' not found. Check to "
                                "make sure you have the correct tenant ID and are signing into the correct cloud."),
                                status_code=400)
        base = str(request.base_url).rstrip("/")
        root = f"{base}/{self.tenant_id}"
        return JSONResponse({
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/{self.tenant_id}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{root}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "tid", "ver"],
            "kerberos_endpoint": f"{root}/kerberos",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        })

    def _aad_error(self, error: str, code: int, description: str) -> dict[str, Any]:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        return {"error": error,
                "error_description": f"AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} "
                                     f"Timestamp: {stamp}",
                "error_codes": [code], "timestamp": stamp, "trace_id": trace, "correlation_id": corr}

    async def _token(self, request: Request) -> Response:
        self.request_counts["token"] += 1
        tenant = request.path_params["tenant"]
        form = dict(parse_qsl((await request.body()).decode()))
        if tenant != self.tenant_id:
            return JSONResponse(self._aad_error("invalid_request", 90002, f"Tenant '{tenant}' not found."),
                                status_code=400)
        if form.get("grant_type") != "client_credentials":
            return JSONResponse(self._aad_error("unsupported_grant_type", 70003,
                                "The app requested an unsupported grant type ."), status_code=400)
        client_id = form.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None:
            return JSONResponse(self._aad_error(
                "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
                "happen if the application has not been installed by the administrator of the tenant."),
                status_code=400)
        if not secrets.compare_digest(form.get("client_secret", ""), app[0]):
            return JSONResponse(self._aad_error(
                "invalid_client", 7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret "
                f"value, not the client secret ID, for a secret added to app '{client_id}'."), status_code=401)
        resource = (self.org_url or str(request.base_url)).rstrip("/").lower()
        scope = form.get("scope", "").strip()
        if not scope.endswith("/.default"):
            return JSONResponse(self._aad_error(
                "invalid_scope", 1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows must have a scope value "
                "with /.default suffixed to the resource identifier (application ID URI)."), status_code=400)
        if scope[: -len("/.default")].rstrip("/").lower() != resource:
            return JSONResponse(self._aad_error(
                "invalid_scope", 70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."),
                status_code=400)
        now = int(time.time())
        claims = {"aud": resource, "iss": f"https://sts.windows.net/{self.tenant_id}/", "iat": now, "nbf": now,
                  "exp": now + self.token_lifetime_seconds, "appid": client_id, "oid": app[1],
                  "tid": self.tenant_id, "idtyp": "app", "jti": secrets.token_hex(8)}

        def b64(obj: Any) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        token = ".".join([b64({"typ": "JWT", "alg": "RS256", "kid": "sim"}), b64(claims),
                          base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()])
        with self._lock:
            self._tokens[token] = (client_id, time.time() + self.token_lifetime_seconds)
        return JSONResponse({"token_type": "Bearer", "expires_in": self.token_lifetime_seconds,
                             "ext_expires_in": self.token_lifetime_seconds, "access_token": token})

    def _authenticate(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return None
        with self._lock:
            entry = self._tokens.get(auth[7:])
        if entry is None or entry[1] <= time.time():
            return None
        return self._apps[entry[0]][1]
