"""Tokens for the feature service: an API key, or OAuth2 app credentials cached until they expire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import httpx

from shared.connectors._http import RetryPolicy, send_with_retry
from shared.connectors.arcgis.codecs import SYSTEM
from shared.connectors.arcgis.errors import _error_text, _json_body
from shared.core.errors import AuthError

DEFAULT_POLICY = RetryPolicy()


@runtime_checkable
class ArcGISAuth(Protocol):
    """Supplies the token sent with every request (as `X-Esri-Authorization: Bearer <token>`).

    An implementation whose token cannot be renewed sets `refreshable = False`: a rejected token is then
    an AuthError at once instead of a refresh-and-replay.
    """

    async def token(self, force_refresh: bool = False) -> str:
        """A valid token; `force_refresh=True` after the service rejected the current one (498/499)."""
        ...


class ApiKeyAuth:
    """An ArcGIS API key (long-lived access token): nothing to refresh, so a rejected key is an AuthError."""

    refreshable = False

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("an ArcGIS API key is required")
        self._key = key

    async def token(self, force_refresh: bool = False) -> str:
        return self._key


class AppCredentialsAuth:
    """OAuth2 client credentials (`POST {portal}/sharing/rest/oauth2/token`); the token is cached until expiry."""

    refreshable = True

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        http: httpx.AsyncClient,
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        expiration_minutes: int | None = None,
        refresh_margin_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._http = http
        self._policy = policy
        self._expiration_minutes = expiration_minutes
        self._margin = refresh_margin_seconds
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0
        """Tokens obtained so far (observability and tests)."""

    async def token(self, force_refresh: bool = False) -> str:
        async with self._lock:
            if not force_refresh and self._token is not None and self._clock() < self._expires_at:
                return self._token
            self._token, self._expires_at = await self._fetch()
            return self._token

    async def _fetch(self) -> tuple[str, float]:
        if not self._client_id or not self._client_secret:
            raise AuthError("arcgis: app credentials are not configured (set ARCGIS__CLIENT_ID and "
                            "ARCGIS__CLIENT_SECRET, or ARCGIS__API_KEY)")
        form = {"client_id": self._client_id, "client_secret": self._client_secret,
                "grant_type": "client_credentials", "f": "json"}
        if self._expiration_minutes:
            form["expiration"] = str(self._expiration_minutes)
        response = await send_with_retry(lambda: self._http.post(self.token_url, data=form), system=SYSTEM,
                                         policy=self._policy)
        body = _json_body(response)
        error = body.get("error") if isinstance(body, dict) else None
        if response.status_code >= 400 or not isinstance(body, dict) or error is not None:
            what = _error_text(error) if isinstance(error, Mapping) else f"HTTP {response.status_code}"
            raise AuthError(f"arcgis: the token endpoint {self.token_url} refused client {self._client_id!r}: {what}; "
                            f"check ARCGIS__CLIENT_ID / ARCGIS__CLIENT_SECRET and that the app is registered")
        token = body.get("access_token") or body.get("token")
        if not isinstance(token, str) or not token:
            raise AuthError(f"arcgis: the token endpoint {self.token_url} answered without an access_token")
        now = self._clock()
        if isinstance(body.get("expires_in"), int | float):
            lifetime = float(body["expires_in"])
        elif isinstance(body.get("expires"), int | float):  # generateToken style: epoch milliseconds
            lifetime = float(body["expires"]) / 1000 - time.time()
        else:
            lifetime = 3600.0
        self.fetches += 1
        # Refresh ahead of expiry so a token never dies mid-batch; short-lived tokens keep half their life.
        return token, now + max(lifetime - self._margin, lifetime / 2)


# ============================================================================================ metadata
