"""Fixtures to invoke the registered functions through the azure-functions API with real request objects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.funchost import registered_functions
from shared.bootstrap import Services, build_services, set_services
from shared.settings import Settings

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
