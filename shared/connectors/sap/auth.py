"""SAP authentication: Basic (communication user) or OAuth client credentials, as an Authorization header."""

from __future__ import annotations

import asyncio
import base64
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from shared.connectors.sap.codecs import SYSTEM
from shared.core.errors import AuthError, TransientError


class SapAuth(Protocol):
    """Produces the Authorization header; `refreshable` auth gets one refresh-and-replay on 401."""

    refreshable: bool

    async def authorization(self, http: httpx.AsyncClient, *, force_refresh: bool = False) -> str:
        ...


@dataclass
class BasicAuth:
    """Basic authentication of a communication user."""

    user: str
    password: str = field(repr=False)
    refreshable: bool = False

    async def authorization(self, http: httpx.AsyncClient, *, force_refresh: bool = False) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()


class OAuthClientCredentials:
    """OAuth 2.0 client credentials against SAP's token endpoint (`/sap/bc/sec/oauth2/token` or XSUAA)."""

    refreshable = True

    def __init__(self, token_url: str, client_id: str, client_secret: str, *, scope: str | None = None,
                 refresh_margin: float = 60.0, clock: Callable[[], float] = _time.monotonic) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self._margin = refresh_margin
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def authorization(self, http: httpx.AsyncClient, *, force_refresh: bool = False) -> str:
        async with self._lock:
            if force_refresh or self._token is None or self._clock() >= self._expires:
                await self._fetch(http)
            assert self._token is not None
            return f"Bearer {self._token}"

    async def _fetch(self, http: httpx.AsyncClient) -> None:
        form = {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}
        try:
            response = await http.post(self.token_url, data=form, auth=(self.client_id, self._secret),
                                       headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise TransientError(f"{SYSTEM}: token request to {self.token_url} failed ({type(exc).__name__})") from exc
        self.fetches += 1
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(f"{SYSTEM}: token endpoint answered HTTP {response.status_code}")
        if not response.is_success or not isinstance(body, dict) or not body.get("access_token"):
            reason = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise AuthError(f"{SYSTEM}: OAuth client {self.client_id} was refused by {self.token_url} "
                            f"(HTTP {response.status_code}: {reason or response.text[:200]}); check the client id "
                            "and secret of the communication arrangement")
        self._token = str(body["access_token"])
        self._expires = self._clock() + max(0.0, float(body.get("expires_in") or 600) - self._margin)
