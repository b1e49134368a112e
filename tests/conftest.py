"""Fixtures every test package shares: the throwaway certificate authority the TLS-served simulators use."""

from __future__ import annotations

import pytest

from sandbox.server import TestCA as SandboxCA


@pytest.fixture(scope="session")
def sandbox_ca(tmp_path_factory: pytest.TempPathFactory) -> SandboxCA:
    """One CA (and its 127.0.0.1/localhost server certificate) for every TLS simulator of the session."""
    return SandboxCA.create(tmp_path_factory.mktemp("sandbox-ca"))
