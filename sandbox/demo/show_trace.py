"""The demo's trace step: `syncline trace` of the first dead-lettered record, as the CLI prints it."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from sandbox.demo.box import Sandbox
from shared.bootstrap import Services
from shared.ops.trace import TraceInputError, trace_record
from shared.trace_view import render_trace


async def show_trace(console: Console, services: Services, box: Sandbox) -> dict[str, Any]:
    """Trace the first dead letter's record (its flow's source system and key) with the CLI's renderer."""
    del box  # the trace reads only Syncline's state and queue, as an operator's would
    dead = await services.queue.peek_dead_letters(1)
    if not dead:
        console.print("trace: no dead-lettered record to trace")
        return {"traced": None, "hops": 0}
    props = dead[0].application_properties
    system, key = str(props.get("system", "")), str(props.get("key", ""))
    console.print(f"[bold]syncline trace {system} {key}[/bold]", soft_wrap=True)
    try:
        trace = await trace_record(services.state, services.queue, services.flowset, system, key)
    except TraceInputError as exc:  # a dead letter that names no system of the flows (a foreign message)
        console.print(f"trace: message {dead[0].message_id} cannot be traced: {exc}")
        return {"traced": None, "hops": 0}
    render_trace(console, trace)
    return {"traced": f"{system} {key}", "hops": len(trace.hops)}
