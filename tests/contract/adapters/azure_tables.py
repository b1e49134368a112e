"""Contract-suite builder for the Azure Table Storage state adapter (Azurite, or a real account if configured)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
from azure.data.tables.aio import TableServiceClient

from shared.core.ports import StateStore
from shared.runtime.azure import TableStateStore, default_transport
from tests.contract.adapters import STATE_BUILDERS, opened_states

#: A storage account connection string to run the suite against instead of Azurite.
ACCOUNT_ENV = "SYNCLINE_TEST_TABLES_CONNECTION_STRING"
_PLUGIN = "tests.azurite"


def tables_connection_string(request: pytest.FixtureRequest) -> str:
    """The account to test against: SYNCLINE_TEST_TABLES_CONNECTION_STRING, else the session's Azurite."""
    configured = os.environ.get(ACCOUNT_ENV)
    if configured:
        return configured
    # The contract conftest is not ours to change: register tests.azurite as a plugin on first use, so its
    # session fixture (one Azurite for the whole run, stopped at the end) is available by name.
    manager = request.config.pluginmanager
    if not manager.has_plugin(_PLUGIN):
        import tests.azurite

        if not manager.is_registered(tests.azurite):
            manager.register(tests.azurite, _PLUGIN)
    return str(request.getfixturevalue("azurite_tables_connection_string"))


def fresh_prefix() -> str:
    """A table prefix no other test uses, so tests on one shared Azurite (or account) never meet."""
    return f"t{uuid.uuid4().hex[:20]}"


async def drop_tables(conn_str: str, names: Sequence[str]) -> None:
    """Delete a test's tables: Azurite forgets them when it stops, but a real account would keep them."""
    async with TableServiceClient.from_connection_string(conn_str, transport=default_transport()) as service:
        for name in names:
            await service.delete_table(name)


@asynccontextmanager
async def azure_tables_state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[object]:
    conn_str = tables_connection_string(request)
    prefix = fresh_prefix()

    async def drop(opened: list[StateStore]) -> None:
        if opened:
            await drop_tables(conn_str, cast(TableStateStore, opened[0]).table_names)

    async with opened_states(lambda: TableStateStore.from_connection_string(conn_str, table_prefix=prefix),
                             drop) as make:
        yield make


STATE_BUILDERS["azure-tables"] = azure_tables_state
