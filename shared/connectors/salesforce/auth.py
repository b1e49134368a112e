"""Salesforce OAuth 2.0 client credentials against the org's My Domain -> a simple-salesforce session.

The API base URL is the token response's `instance_url`. simple-salesforce is used in "direct" mode (token
injected, no login call), so an expired session (401 INVALID_SESSION_ID) is handled by the client: one
re-authentication, then the call is replayed once.
"""

from __future__ import annotations

import requests
from simple_salesforce.api import Salesforce

from shared.connectors.salesforce.codecs import SYSTEM
from shared.connectors.salesforce.errors import first_error
from shared.core.errors import AuthError, TransientError


def request_token(session: requests.Session, my_domain_url: str, client_id: str, client_secret: str,
                  timeout: float) -> requests.Response:
    """POST the client-credentials grant; a network failure is transient."""
    url = f"{my_domain_url}/services/oauth2/token"
    try:
        return session.post(
            url, data={"grant_type": "client_credentials", "client_id": client_id,
                       "client_secret": client_secret}, timeout=timeout)
    except requests.RequestException as exc:
        raise TransientError(f"{SYSTEM}: cannot reach the token endpoint {url}: {exc}") from exc


def open_session(response: requests.Response, session: requests.Session, *, version: str,
                 call_options_client: str) -> tuple[Salesforce, str]:
    """The session the token response grants, and its `instance_url`; a refusal is an AuthError."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.status_code >= 500:
        raise TransientError(f"{SYSTEM}: token endpoint answered HTTP {response.status_code}")
    if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        code, message = first_error(body)
        raise AuthError(f"{SYSTEM}: token request refused ({code}: {message}); check the My Domain URL "
                        "(not login.salesforce.com), client id/secret and the app's client-credentials run-as user")
    instance_url = body.get("instance_url")
    if not isinstance(instance_url, str) or not instance_url:
        raise AuthError(f"{SYSTEM}: token response has no instance_url")
    sf = Salesforce(instance_url=instance_url, session_id=str(body["access_token"]), session=session,
                    version=version)
    sf.headers["Sforce-Call-Options"] = f"client={call_options_client}"
    return sf, instance_url
