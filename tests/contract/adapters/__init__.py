"""Registry of contract-suite backends: every adapter module adds its queue and/or state builder here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

Builder = Callable[[pytest.FixtureRequest, Path], AbstractAsyncContextManager[Any]]

QUEUE_BUILDERS: dict[str, Builder] = {}
STATE_BUILDERS: dict[str, Builder] = {}


def _load() -> None:
    # Import order is the registration order; each module registers itself on import.
    from tests.contract.adapters import azure_tables, embedded, servicebus  # noqa: F401


_load()
__all__ = ["QUEUE_BUILDERS", "STATE_BUILDERS", "AsyncIterator", "Builder"]
