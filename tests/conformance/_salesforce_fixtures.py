"""Fixtures of the Salesforce conformance tests: the simulator over TLS and a raw REST session (no Syncline code)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sandbox.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SalesforceSimulator
from sandbox.server import TestCA as SandboxCA
from tests.served import Served, serve

VERSION = "63.0"


class SalesforceOrg(Served[SalesforceSimulator]):
    """The Salesforce simulator over TLS (its My Domain and instance on one server)."""


class Rest:
    """REST calls as the REST API Developer Guide writes them: Bearer token, JSON bodies, `/services/data/vXX.X`."""

    def __init__(self, org: SalesforceOrg) -> None:
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = str(org.ca.ca_path)
        # OAuth 2.0 client credentials flow on My Domain ("OAuth 2.0 Client Credentials Flow for Server-to-Server")
        token = self.session.post(f"{org.server.url}/services/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET}, timeout=10)
        token.raise_for_status()
        body = token.json()
        self.instance_url = body["instance_url"]
        self.token = body["access_token"]
        self.session.headers["Authorization"] = f"Bearer {self.token}"

    def url(self, path: str) -> str:
        return f"{self.instance_url}/services/data/v{VERSION}/{path.lstrip('/')}"

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.url(path), params=params, timeout=10)

    def query(self, soql: str) -> requests.Response:
        return self.get("query/", q=soql)

    def send(self, method: str, path: str, body: Any = None, **params: Any) -> requests.Response:
        return self.session.request(method, self.url(path), json=body, params=params or None, timeout=10)

    def close(self) -> None:
        self.session.close()


@pytest.fixture(scope="module")
def sf_org(sandbox_ca: SandboxCA) -> Iterator[SalesforceOrg]:
    sim = SalesforceSimulator()
    with serve(sim.app, sandbox_ca) as server:
        yield SalesforceOrg(sim, server, sandbox_ca)


@pytest.fixture
def rest(sf_org: SalesforceOrg) -> Iterator[Rest]:
    sf_org.sim.reset()
    client = Rest(sf_org)
    try:
        yield client
    finally:
        client.close()
