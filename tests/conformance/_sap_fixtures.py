"""Fixtures of the SAP conformance suite: a seeded simulator over loopback and plain `requests` sessions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import requests

from sandbox.sap import SERVICE_PREFIX, SapSimulator, seed_sap
from sandbox.server import RunningServer

SO_ROOT = "API_SALES_ORDER_SRV"
BP_ROOT = "API_BUSINESS_PARTNER"


@dataclass
class SapGateway:
    """The simulator and where it listens."""

    sim: SapSimulator
    server: RunningServer

    def root(self, service: str) -> str:
        """The service root URL, with its trailing slash as SAP's guides write it."""
        return f"{self.server.url}{SERVICE_PREFIX}{service}/"

    def session(self) -> requests.Session:
        """An authenticated session without a CSRF token (reads only)."""
        session = requests.Session()
        session.auth = (self.sim.user, self.sim.password)
        return session

    def write_session(self, service: str) -> requests.Session:
        """A session set up as pyodata's guide does before writes: `HEAD <service root>` with
        `x-csrf-token: fetch`, the token kept as a default header and the session cookie in the jar
        (SAP/python-pyodata docs/usage/creating.rst)."""
        session = self.session()
        response = session.head(self.root(service), headers={"x-csrf-token": "fetch"})
        session.headers.update({"x-csrf-token": response.headers.get("x-csrf-token", "")})
        return session


@pytest.fixture(scope="module")
def sap_gateway() -> Iterator[SapGateway]:
    sim = SapSimulator()
    seed_sap(sim)
    server = RunningServer(sim.app).start()
    yield SapGateway(sim, server)
    server.stop()
    sim.close()


@pytest.fixture
def pyodata_client(sap_gateway: SapGateway) -> Callable[[str], object]:
    """`pyodata_client(service)`: SAP's pyodata client built from the served $metadata, with a CSRF session."""
    import pyodata

    def build(service: str) -> object:
        return pyodata.Client(sap_gateway.root(service), sap_gateway.write_session(service))

    return build
