"""Fixtures of the ArcGIS conformance tests: the feature-service simulator and raw REST calls (no Syncline code)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.arcgis_sim import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ArcGISSimulator
from sandbox.server import RunningServer


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
