"""Fixtures of the F&O conformance tests: the simulator over TLS and a raw OData client written from the guides."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from sandbox.fno import FinOpsSimulator, seed_fno
from sandbox.server import RunningServer
from sandbox.server import TestCA as SandboxCA
from tests.conformance._dataverse_fixtures import entra_token
from tests.served import Served

HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
           "Content-Type": "application/json"}


class FnoEnv(Served[FinOpsSimulator]):
    """The F&O simulator over TLS."""


def fno_token(env: FnoEnv) -> str:
    """Entra ID client credentials against the simulator's authority, scope `{environment URL}/.default`."""
    return entra_token(env.url, env.sim, env.ca)


def serve(sim: FinOpsSimulator, ca: SandboxCA) -> FnoEnv:
    return FnoEnv(sim, RunningServer(sim.app, ca=ca).start(), ca)


def odata_client(env: FnoEnv) -> httpx.Client:
    """Raw OData v4 against `{environment}/data/` (Microsoft Learn: "Open Data Protocol (OData)" for F&O)."""
    return httpx.Client(base_url=f"{env.url}/data/", verify=str(env.ca.ca_path), timeout=30.0,
                        headers={**HEADERS, "Authorization": f"Bearer {fno_token(env)}"})


@pytest.fixture
def fno(sandbox_ca: SandboxCA) -> Iterator[FnoEnv]:
    """A seeded environment with Syncline's extension deployed (what a Syncline installation requires)."""
    sim = FinOpsSimulator()
    seed_fno(sim, customers=3, products=3)
    env = serve(sim, sandbox_ca)
    yield env
    env.server.stop()
    sim.close()


@pytest.fixture
def fno_http(fno: FnoEnv) -> Iterator[httpx.Client]:
    with odata_client(fno) as client:
        yield client
