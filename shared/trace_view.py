"""Rich rendering of a record's trace (`shared.ops.trace.Trace`), shared by `syncline trace` and the demo."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from shared.ops.trace import Trace

_COLOURS = {"written": "green", "deleted": "green", "id_propagated": "cyan", "cascaded": "cyan",
            "cascade_triggered": "cyan", "conflict_resolved": "magenta", "deferred": "yellow",
            "retry_scheduled": "yellow", "rejected": "red", "dead_lettered": "red", "skipped_echo": "dim",
            "skipped_noop": "dim",
            "duplicate_dropped": "dim"}


def not_found_line(trace: Trace) -> str:
    """The one line `syncline trace` prints for a key nothing knows (exit code 1)."""
    return (f"nothing known of {trace.system} key {trace.key!r}: no audit entry, no link and no message on the "
            "queue or the dead-letter queue")


def render_trace(console: Console, trace: Trace) -> None:
    """Print a trace: a summary line, the timeline (oldest first), then `now:` and `links:`."""
    if not trace.found:
        console.print(escape(not_found_line(trace)), soft_wrap=True)
        return
    sides = ", ".join(f"{s} {k}" for s, k in trace.records)
    correlations = len({h.correlation_id for h in trace.hops})
    console.print(escape(f"trace of {trace.system} {trace.key}: {sides}; flows {', '.join(trace.flows) or '-'}; "
                         f"{len(trace.hops)} hop(s) in {correlations} change(s)"), soft_wrap=True)
    # A timeline rather than a table: keys and details are long, and a table squeezes them into slivers.
    console.print("hops (oldest first): time  decision  flow  system key  origin  correlation, then the detail")
    for hop in trace.hops:
        colour = _COLOURS.get(hop.decision, "default")
        detail = f"{hop.reason}: {hop.detail}" if hop.reason else hop.detail
        head = (f"  {hop.at:%Y-%m-%d %H:%M:%S}.{hop.at.microsecond // 1000:03d}  [{colour}]{hop.decision:<17}"
                f"[/{colour}] {escape(hop.flow)}  {hop.system} {escape(hop.key)}  origin {hop.origin or '?'}  "
                f"correlation {escape(hop.correlation_id)}")
        console.print(head, soft_wrap=True, highlight=False)
        if detail:
            console.print(f"      {escape(detail)}", soft_wrap=True, highlight=False)
    console.print("now:")
    for note in trace.notes:
        console.print(f"  note: {escape(note)}", soft_wrap=True, highlight=False)
    if not trace.now:
        console.print("  not on the queue nor in the dead-letter queue (every change about it is settled)"
                      if not trace.notes else "  not in the dead-letter queue")
    for place in trace.now:
        line = f"  {place.where}: message {place.message_id} ({place.flow}, {place.system} {place.key}), " \
               f"enqueued {place.enqueued_at:%Y-%m-%d %H:%M:%S}, {place.delivery_count} deliveries"
        if place.scheduled_at is not None:
            line += f", due {place.scheduled_at:%Y-%m-%d %H:%M:%S}"
        if place.where == "dead_letter":
            line += f"; reason {place.reason}: {place.description}"
        console.print(escape(line), soft_wrap=True)
    console.print("links:")
    if not trace.links:
        console.print("  none (the record was never written to another system)")
    for link in trace.links:
        console.print(escape(f"  {link.entity}: {link.system} {link.key} <-> {link.other_system} {link.other_key}"),
                      soft_wrap=True)
