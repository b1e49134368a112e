"""The demo's operator-toolkit tour: a trace, a drift caught by `check`, a breaker opening and closing, a plan."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console

from sandbox.demo.box import Sandbox
from shared.bootstrap import Services

Hook = Callable[[Console, Services, Sandbox], Awaitable[dict[str, Any]]]


def _hooks() -> list[tuple[str, str, Hook]]:
    from sandbox.demo.show_provision import show_provision

    return [
        ("provision", "ArcGIS layers against the flows' value maps (syncline arcgis provision --dry-run)",
         show_provision),
    ]


async def tour(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Run each part in turn; each returns its figures for the report, or {"error": ...} when it failed.

    A part that fails does not stop the others (the report says which failed and why); the demo is then not OK.
    """
    figures: dict[str, Any] = {}
    for name, title, hook in _hooks():
        console.rule(title)
        started = time.monotonic()
        try:
            figures[name] = await hook(console, services, box)
        except Exception as exc:  # the demo reports it, and the rest of the tour still runs
            console.print(f"[red]{name} failed[/red]: {type(exc).__name__}: {exc}")
            figures[name] = {"error": f"{type(exc).__name__}: {exc}"}
        figures[name]["seconds"] = round(time.monotonic() - started, 1)
    return figures
