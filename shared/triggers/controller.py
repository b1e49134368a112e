"""Timer trigger: the sync controller (default every 15 minutes, from the SYNCLINE_SCHEDULE app setting)."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import get_services

log = logging.getLogger("syncline.triggers.controller")

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("sync_controller")
@bp.timer_trigger(schedule="%SYNCLINE_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def sync_controller(timer: func.TimerRequest) -> None:
    """Backfill-poll the change feeds, drain the inbound queue, settle every message."""
    if timer.past_due:
        log.warning("controller timer is past due; running now")
    report = await get_services().controller.run_cycle()
    log.info("controller cycle %s in %.1fs: received=%d statuses=%s dead_lettered=%s", report.outcome,
             report.duration_seconds, report.received, report.statuses, report.dead_lettered)
    if report.outcome != "ok":
        # Raising marks the invocation failed, which is what the "controller failing" alert watches.
        raise RuntimeError(f"controller cycle failed: {report.error}")
