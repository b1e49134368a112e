"""Fixtures of the Dataverse conformance tests: the simulator over TLS, a raw Web API client, Microsoft's SDK."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import httpx
import pytest

from sandbox.dataverse import API_PREFIX, DataverseSimulator
from sandbox.fno import FinOpsSimulator
from sandbox.server import TestCA as SandboxCA
from tests.served import Served, serve

WEB_API_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                   "If-None-Match": "null", "Content-Type": "application/json; charset=utf-8"}
"""The request headers of Microsoft's Web API guide ("Compose HTTP requests and handle errors": HTTP headers)."""


@dataclass
class DataverseEnv(Served[DataverseSimulator]):
    @property
    def api(self) -> str:
        return self.server.url + API_PREFIX.rstrip("/")


def entra_token(url: str, sim: DataverseSimulator | FinOpsSimulator, ca: SandboxCA) -> str:
    """An access token from a simulator's Entra ID endpoint (OAuth 2.0 client credentials, v2.0 endpoint), scope
    `{environment URL}/.default` (Dataverse and F&O alike)."""
    resp = httpx.post(f"{url}/{sim.tenant_id}/oauth2/v2.0/token", verify=str(ca.ca_path), data={
        "client_id": sim.client_id, "client_secret": sim.client_secret,
        "grant_type": "client_credentials", "scope": f"{url}/.default"})
    resp.raise_for_status()
    return str(resp.json()["access_token"])


def client_credentials_token(env: DataverseEnv) -> str:
    """An access token for the Dataverse simulator."""
    return entra_token(env.url, env.sim, env.ca)


@pytest.fixture(scope="module")
def dataverse_env(sandbox_ca: SandboxCA) -> Iterator[DataverseEnv]:
    sim = DataverseSimulator()
    with closing(sim), serve(sim.app, sandbox_ca) as server:
        yield DataverseEnv(sim, server, sandbox_ca)


@pytest.fixture
def dataverse(dataverse_env: DataverseEnv) -> DataverseEnv:
    dataverse_env.sim.reset()
    return dataverse_env


@pytest.fixture
def web_api(dataverse: DataverseEnv) -> Iterator[httpx.Client]:
    """Raw OData v4 requests written from Microsoft's Web API guide (no Syncline code involved)."""
    token = client_credentials_token(dataverse)
    with httpx.Client(base_url=dataverse.api + "/", verify=str(dataverse.ca.ca_path), timeout=30.0,
                      headers={**WEB_API_HEADERS, "Authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.fixture
def sdk(dataverse: DataverseEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Microsoft's `PowerPlatform-Dataverse-Client` pointed at the simulator's TLS URL.

    The SDK builds every URL as `{base_url}/api/data/v9.2/...` on `requests`; `REQUESTS_CA_BUNDLE` makes requests
    trust the simulator's test CA. Tokens come from azure-identity's ClientSecretCredential with the simulator as
    its authority (instance discovery off: login.microsoftonline.com cannot vouch for a local authority).
    """
    from azure.identity import ClientSecretCredential
    from PowerPlatform.Dataverse.client import DataverseClient

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(dataverse.ca.ca_path))
    credential = ClientSecretCredential(dataverse.sim.tenant_id, dataverse.sim.client_id,
                                        dataverse.sim.client_secret, authority=dataverse.url,
                                        disable_instance_discovery=True,
                                        connection_verify=str(dataverse.ca.ca_path))
    client = DataverseClient(dataverse.url, credential)
    yield client
    client.close()
    credential.close()
