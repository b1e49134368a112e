"""Logon: Basic and OAuth client-credentials tokens, CSRF tokens and their sessions."""

from __future__ import annotations

import base64
import secrets
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandbox.sap.gateway import MODIFYING, SAP_CLIENT, SESSION_COOKIE, SYSTEM_ID, GatewayError
from sandbox.sap.state import SapState, _Session


class SapAuth(SapState):
    """Who is calling, and whether a modifying request carries its session's CSRF token."""

    def expire_csrf_tokens(self) -> None:
        """End every session: its CSRF token and session cookie are no longer valid (next write gets 403)."""
        with self._lock:
            self._sessions.clear()

    def expire_oauth_tokens(self) -> None:
        """Invalidate every OAuth access token issued so far (the next API call gets 401)."""
        with self._lock:
            self._tokens.clear()

    def _authenticate(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                user = password = ""
            if user.upper() == self.user.upper() and password == self.password:
                return self.user
        elif scheme.lower() == "bearer":
            with self._lock:
                owner = self._tokens.get(value)
            if owner is not None:
                return owner
        raise GatewayError(401, "/IWFND/CM_CONSUMER/101", "Logon failed: user, password or token is not valid",
                           headers={"WWW-Authenticate": f'Basic realm="SAP NetWeaver Application Server '
                                                        f'[{SYSTEM_ID}/{SAP_CLIENT}]"'})

    async def _token(self, request: Request) -> Response:
        self.request_counts["token"] += 1
        form = dict(parse_qsl((await request.body()).decode()))
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                client_id, _, secret = base64.b64decode(value).decode().partition(":")
            except ValueError:
                client_id = secret = ""
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type",
                                 "error_description": "grant_type must be client_credentials"}, status_code=400)
        if client_id != self.client_id or secret != self.client_secret:
            return JSONResponse({"error": "invalid_client", "error_description": "Client authentication failed"},
                                status_code=401)
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self.user
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                             "scope": "API_BUSINESS_PARTNER_0001 API_SALES_ORDER_SRV_0001"})

    def _csrf(self, request: Request, method: str, user: str, out: dict[str, str]) -> dict[str, str] | None:
        """Cookies to set (empty dict: none), or None when a modifying request fails CSRF validation."""
        sid = request.cookies.get(SESSION_COOKIE)
        with self._lock:
            session = self._sessions.get(sid or "")
            if session is not None and session.user != user:
                session = None
            if method in MODIFYING:
                token = request.headers.get("x-csrf-token", "")
                if session is None or not token or not secrets.compare_digest(token, session.token):
                    return None
                return {}
            if request.headers.get("x-csrf-token", "").lower() != "fetch":
                return {}
            self.request_counts["csrf_fetch"] += 1
            cookies: dict[str, str] = {}
            if session is None:
                sid = secrets.token_urlsafe(24)
                session = _Session(user, secrets.token_urlsafe(18))
                self._sessions[sid] = session
                cookies = {SESSION_COOKIE: sid, "sap-usercontext": f"sap-client={SAP_CLIENT}"}
            out["x-csrf-token"] = session.token
            return cookies
