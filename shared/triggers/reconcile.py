"""Timer trigger: reconciliation (daily by default, from the SYNCLINE_RECONCILE_SCHEDULE app setting)."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import get_services
from shared.ops.reconcile_run import run_reconciliation

log = logging.getLogger("syncline.triggers.reconcile")

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("reconcile")
@bp.timer_trigger(schedule="%SYNCLINE_RECONCILE_SCHEDULE%", arg_name="timer", run_on_startup=False,
                  use_monitor=True)
async def reconcile_timer(timer: func.TimerRequest) -> None:
    """Compare both sides of every flow within the API budget; store the report, emit drift per flow.

    Drift is not a failure of the function (the drift alert watches the metric's log line); repairs are the
    operator's call (`syncline reconcile --repair`), so the timer only reports.
    """
    if timer.past_due:
        log.warning("reconcile timer is past due; running now")
    report = await run_reconciliation(get_services())
    log.info("reconciliation %s: total drift %d, calls %s", "partial" if report.partial else "complete",
             report.total_drift, report.calls)
