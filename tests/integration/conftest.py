"""Fixtures for end-to-end tests: both simulators over loopback TLS, settings pointing Syncline at them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandbox.dataverse import seed_dataverse
from sandbox.demo import Sandbox, environment, start_sandbox
from shared.bootstrap import Services, build_services
from shared.settings import Settings


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = start_sandbox(tmp_path / "sandbox")
    try:
        with environment(box.env):
            yield box
    finally:
        box.stop()


@pytest.fixture
async def seeded(sandbox: Sandbox) -> AsyncIterator[tuple[Sandbox, dict, Services]]:
    """Dataverse seeded (with the two bad signs), services built on the sandbox settings."""
    summary = seed_dataverse(sandbox.dv, signs=40, work_orders=8)
    services = build_services(Settings())
    try:
        yield sandbox, summary, services
    finally:
        await services.aclose()
