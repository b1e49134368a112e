"""The demo's operator-toolkit tour: a trace, a drift caught by `check`, a breaker opening and closing, a plan."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from rich.console import Console

from sandbox.demo.box import Sandbox
from shared.bootstrap import Services

Hook = Callable[[Console, Services, Sandbox], Awaitable[dict[str, Any]]]
Expect = Callable[[dict[str, Any]], str | None]
"""What a part must have shown, or why it did not (the demo is not OK then)."""


def _check_caught(figures: dict[str, Any]) -> str | None:
    if not figures.get("caught"):
        return "check caught no drift"
    if not (figures.get("clean_before") and figures.get("clean_after")):
        return "check was not clean before the option was added or after it was removed"
    if figures.get("records_carrying"):
        return "a record carried the new option before the check ran"
    return None


def _traced(figures: dict[str, Any]) -> str | None:
    if not figures.get("traced"):
        return "no dead-lettered record was traced"
    return None if figures.get("hops") else "the trace found no hop of the dead-lettered record"


def _breaker_cycled(figures: dict[str, Any]) -> str | None:
    if not figures.get("opened"):
        return "the outage did not open the breaker"
    if not figures.get("closed"):
        return "the breaker did not close after the outage"
    if figures.get("synced") != figures.get("edits"):
        return f"{figures.get('synced')} of {figures.get('edits')} changes held during the outage synced"
    return None


def _hooks() -> list[tuple[str, str, Hook, Expect]]:
    from sandbox.demo.show_breaker import show_breaker
    from sandbox.demo.show_check import show_check
    from sandbox.demo.show_provision import show_provision
    from sandbox.demo.show_trace import show_trace

    return [
        ("trace", "one dead-lettered record, hop by hop (syncline trace)", show_trace, _traced),
        ("check", "choice-domain drift caught before a record fails (syncline check)", show_check, _check_caught),
        ("breaker", "a circuit breaker during an ArcGIS outage (syncline status shows it)", show_breaker,
         _breaker_cycled),
        ("provision", "ArcGIS layers against the flows' value maps (syncline arcgis provision --dry-run)",
         show_provision, lambda figures: None),
    ]


async def tour(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Run each part in turn; each returns its figures for the report, or {"error": ...} when it failed.

    A part that fails does not stop the others (the report says which failed and why); the demo is then not OK.
    """
    figures: dict[str, Any] = {}
    for name, title, hook, expect in _hooks():
        console.rule(title)
        started = time.monotonic()
        try:
            figures[name] = await hook(console, services, box)
        except Exception as exc:  # the demo reports it, and the rest of the tour still runs
            console.print(f"[red]{name} failed[/red]: {type(exc).__name__}: {exc}")
            figures[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" not in figures[name] and (why := expect(figures[name])) is not None:
            console.print(f"[red]{name}[/red]: {why}")
            figures[name]["error"] = why
        figures[name]["seconds"] = round(time.monotonic() - started, 1)
    return figures
