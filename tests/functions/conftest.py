"""Fixtures to invoke the registered functions through the azure-functions API with real request objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.dataverse import seed_dataverse
from sandbox.demo import Sandbox, environment, start_sandbox
from sandbox.fno import seed_fno
from sandbox.funchost import registered_functions
from sandbox.salesforce import seed_salesforce
from sandbox.sap import seed_sap
from shared.bootstrap import Services, build_services, set_services
from shared.settings import Settings
from tests.functions.harness import Harness

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def functions() -> dict[str, Any]:
    """name -> Function; app.get_functions() may run only once per FunctionApp, so it is cached."""
    return registered_functions()


@pytest.fixture
def user_function(functions):
    def get(name: str):
        return functions[name].get_user_function()

    return get


@pytest.fixture
async def bare_services(tmp_path) -> AsyncIterator[Services]:
    """Services with no external system configured (embedded state/queue in a temp dir)."""
    settings = Settings(syncline_state_dir=str(tmp_path / "state"), syncline_flows=str(ROOT / "flows"),
                        syncline_webhook_secret="s3cret-webhook-key")  # type: ignore[arg-type]
    services = build_services(settings)
    set_services(services)
    yield services
    set_services(None)
    await services.aclose()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, dict[str, Any]]]:
    """Every simulator, seeded small; module-scoped (starting them is the slow part)."""
    sandbox = start_sandbox(tmp_path_factory.mktemp("fuzz") / "sandbox", sales=True, sap=True)
    try:
        with environment(sandbox.env):
            seed_dataverse(sandbox.dv, signs=3, work_orders=1)
            seed_fno(sandbox.fno, customers=2, products=2)
            seed_sap(sandbox.sap, partners=2, orders=1)
            made = {"salesforce": seed_salesforce(sandbox.sf, accounts=2, opportunities=1)}
            yield sandbox, made
    finally:
        sandbox.stop()


@pytest.fixture
def harness(box: tuple[Sandbox, dict[str, Any]], tmp_path: Path, functions: dict[str, Any]) -> Iterator[Harness]:
    """One services object per test on its own state directory, reused by every example of the test."""
    sandbox, _ = box
    loop = asyncio.new_event_loop()
    state_dir = tmp_path / "state"
    services = build_services(Settings(syncline_state_dir=str(state_dir)))  # type: ignore[call-arg]
    set_services(services)
    try:
        yield Harness(loop, services, state_dir, sandbox, functions)
    finally:
        set_services(None)
        loop.run_until_complete(services.aclose())
        loop.close()
