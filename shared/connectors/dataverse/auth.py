"""Dataverse bearer tokens: Entra ID through azure-identity, refreshed early and on a 401's demand."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Protocol

from shared.connectors.dataverse.codecs import SYSTEM
from shared.core.errors import AuthError, SyncError, TransientError

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential



class TokenProvider(Protocol):
    """Source of bearer tokens for the Dataverse environment."""

    async def get_token(self, *, force_refresh: bool = False) -> str:
        """A valid access token; `force_refresh` bypasses every cache (after the API answered 401)."""
        ...


class AzureIdentityTokenProvider:
    """Wraps a sync azure-identity credential (ClientSecretCredential, DefaultAzureCredential...) for async use.

    Tokens are cached until `refresh_margin` seconds before expiry. `force_refresh` skips this cache *and*
    MSAL's: the request carries an `nbf` claims challenge (the same mechanism as a CAE challenge), which MSAL
    never answers from its cache.
    """

    def __init__(self, credential: TokenCredential, scope: str, *, refresh_margin: float = 300.0) -> None:
        self._credential = credential
        self._scope = scope
        self._refresh_margin = refresh_margin
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    async def get_token(self, *, force_refresh: bool = False) -> str:
        async with self._lock:
            now = time.time()
            if not force_refresh and self._token is not None and self._expires_on - self._refresh_margin > now:
                return self._token
            claims = None
            if force_refresh:
                claims = json.dumps({"access_token": {"nbf": {"essential": True, "value": str(int(now))}}})
            try:
                access = await asyncio.to_thread(self._acquire, claims)
            except SyncError:
                raise
            except Exception as exc:
                raise _token_error(exc, self._scope) from exc
            token = str(access.token)
            self._token, self._expires_on = token, float(access.expires_on)
            return token

    def close(self) -> None:
        """Close the credential's HTTP session (its keep-alive connection to the token endpoint)."""
        closer = getattr(self._credential, "close", None)
        if callable(closer):
            closer()

    def _acquire(self, claims: str | None) -> Any:
        if claims is None:
            return self._credential.get_token(self._scope)
        try:
            return self._credential.get_token(self._scope, claims=claims)
        except TypeError:  # a credential without claims support: a plain fetch is the best we can do
            return self._credential.get_token(self._scope)


def _token_error(exc: BaseException, scope: str) -> SyncError:
    """Map an azure-identity failure: network problems are transient, rejected credentials are not."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ServiceRequestError | ServiceResponseError | OSError):
            return TransientError(f"{SYSTEM}: cannot reach the Entra ID token endpoint for scope {scope}: {cause}")
        cause = cause.__cause__
    message = str(getattr(exc, "message", None) or exc).strip()
    return AuthError(
        f"{SYSTEM}: Entra ID refused the token request for scope {scope}: {message} (check tenant id, client id, "
        "client secret and that the scope is '<org url>/.default')"
    )


def client_secret_token_provider(
    tenant_id: str,
    client_id: str,
    client_secret: str,
    scope: str,
    *,
    authority_host: str | None = None,
    ca_bundle: str | None = None,
) -> AzureIdentityTokenProvider:
    """Client-credentials provider over `azure.identity.ClientSecretCredential`.

    Args:
        tenant_id: Entra ID tenant (directory) id.
        client_id: Application (client) id of the app registration behind the Dataverse application user.
        client_secret: The secret *value*.
        scope: `https://<org>.crm.dynamics.com/.default`.
        authority_host: Custom authority (e.g. the simulator's https URL). MSAL accepts only https; instance
            discovery is disabled for a custom authority because login.microsoftonline.com cannot vouch for it.
        ca_bundle: PEM file to trust for the authority (azure-core `connection_verify`).
    """
    from azure.identity import ClientSecretCredential

    kwargs: dict[str, Any] = {}
    if authority_host is not None:
        kwargs["authority"] = authority_host
        kwargs["disable_instance_discovery"] = True
    if ca_bundle is not None:
        kwargs["connection_verify"] = ca_bundle
    credential = ClientSecretCredential(tenant_id, client_id, client_secret, **kwargs)
    return AzureIdentityTokenProvider(credential, scope)


