"""Fixtures of the ArcGIS conformance tests: the simulator, raw REST calls and Esri's `arcgis` package."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from sandbox.arcgis import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ArcGISSimulator
from sandbox.server import RunningServer, TestCA


class FeatureService:
    """ArcGIS REST calls as Esri's services reference writes them: form posts with `f=json` and `token`."""

    def __init__(self, sim: ArcGISSimulator, server: RunningServer) -> None:
        self.sim = sim
        self.http = httpx.Client(trust_env=False, timeout=10.0)
        self.url = sim.service_url(server.url)
        # "Generate token: client credentials" (developers.arcgis.com/rest/users-groups-and-items/token/)
        answer = self.http.post(sim.token_url(server.url), data={
            "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET,
            "grant_type": "client_credentials", "f": "json"})
        self.token = str(answer.json()["access_token"])

    def layer(self, layer_id: int) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get(f"{self.url}/{layer_id}", params={"f": "json",
                                                                               "token": self.token}).json()
        return body

    def apply_edits(self, layer_id: int, **form: Any) -> Any:
        data = {"f": "json", "token": self.token, **{k: str(v) for k, v in form.items()}}
        return self.http.post(f"{self.url}/{layer_id}/applyEdits", data=data).json()

    def query(self, layer_id: int, **params: Any) -> Any:
        data = {"f": "json", "token": self.token, **{k: str(v) for k, v in params.items()}}
        return self.http.post(f"{self.url}/{layer_id}/query", data=data).json()

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def service() -> Iterator[FeatureService]:
    sim = ArcGISSimulator()
    server = RunningServer(sim.app).start()
    sim.base_url = server.url
    client = FeatureService(sim, server)
    try:
        yield client
    finally:
        client.close()
        server.stop()
        sim.close()


# ------------------------------------------------------------------------------------------- the arcgis package

ARCGIS_MISSING = (
    "Esri's `arcgis` package is not installed. It is a test requirement of the ArcGIS conformance suite, installed by "
    "`make venv` / `make test` (a `--no-deps` install: see the Makefile and docs/simulators/arcgis.md)."
)


def require_arcgis() -> Any:
    """The `arcgis` module; a missing package fails the test (never skips it: the suite must run in `make test`)."""
    try:
        import arcgis
    except ImportError as exc:  # pragma: no cover - the failure path
        pytest.fail(f"{ARCGIS_MISSING} ({exc})")
    return arcgis


@dataclass
class Portal:
    """A TLS-served simulator (org, portal and feature service) and what the `arcgis` package needs to reach it."""

    sim: ArcGISSimulator
    url: str
    ca: TestCA
    signed_in: list[Any] = field(default_factory=list)

    @property
    def service_url(self) -> str:
        return self.sim.service_url(self.url)

    def layer_url(self, layer_id: int) -> str:
        return f"{self.service_url}/{layer_id}"

    def gis(self, **credentials: Any) -> Any:
        """`arcgis.gis.GIS` signed in to the simulator (default: the app's client credentials), trusting the test CA.

        `ca_bundles` is the package's documented way to trust a private CA (GIS docstring, "Usage Example 10");
        the package's own pre-flight probes use plain `requests`, which trust REQUESTS_CA_BUNDLE (set by the fixture).
        """
        from arcgis.gis import GIS

        if not credentials:
            credentials = {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
        gis = GIS(self.url, ca_bundles=str(self.ca.ca_path), set_active=False, **credentials)
        self.signed_in.append(gis)
        return gis

    def close(self) -> None:
        # The package keeps its connections alive; closing them lets the server stop without its grace period.
        for gis in self.signed_in:
            gis._con._session.close()


@pytest.fixture
def portal(sandbox_ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> Iterator[Portal]:
    require_arcgis()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(sandbox_ca.ca_path))
    sim = ArcGISSimulator()
    server = RunningServer(sim.app, ca=sandbox_ca).start()
    sim.base_url = server.url
    sandbox = Portal(sim, server.url, sandbox_ca)
    try:
        yield sandbox
    finally:
        sandbox.close()
        server.stop()
        sim.close()
