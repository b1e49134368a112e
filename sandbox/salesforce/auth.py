"""OAuth 2.0 client credentials on My Domain: the token endpoint issuing the sessions the API accepts."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandbox.salesforce.model import ORG_ID, RUN_AS_USER_ID
from sandbox.salesforce.store import SalesforceStore


class TokenEndpoint(SalesforceStore):
    """`POST /services/oauth2/token` (client id and secret in the form or as HTTP Basic)."""

    async def _token(self, request: Request) -> Response:
        form = dict(await request.form())
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            import base64

            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type", "error_description": "grant type not supported"},
                                status_code=400)
        if client_id != self.client_id or secret != self.client_secret:
            return JSONResponse({"error": "invalid_client", "error_description": "invalid client credentials"},
                                status_code=400)
        token = f"{ORG_ID}!{secrets.token_urlsafe(24)}"
        with self._lock:
            self._tokens.add(token)
            self.request_count += 1
        base = self.instance_url or f"{request.url.scheme}://{request.url.netloc}"
        return JSONResponse({
            "access_token": token, "signature": secrets.token_urlsafe(16), "token_format": "opaque",
            "instance_url": base, "id": f"{base}/id/{ORG_ID}/{RUN_AS_USER_ID}", "token_type": "Bearer",
            "issued_at": str(int(datetime.now(UTC).timestamp() * 1000)), "scope": "api",
        })
