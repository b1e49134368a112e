"""Timer trigger: the daily choice-domain drift check (schedule from the SYNCLINE_CHECK_SCHEDULE app setting)."""

from __future__ import annotations

import logging

import azure.functions as func

from shared.bootstrap import get_services
from shared.ops.check import log_report, run_check

log = logging.getLogger("syncline.triggers.check")

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("choice_check")
@bp.timer_trigger(schedule="%SYNCLINE_CHECK_SCHEDULE%", arg_name="timer", run_on_startup=False, use_monitor=True)
async def choice_check(timer: func.TimerRequest) -> None:
    """Compare every system's live choice domains with the flows' value maps; store and log what was found.

    Drift does not fail the invocation (the check did its job): the "choice drift" alert counts its error lines.
    """
    if timer.past_due:
        log.warning("choice check timer is past due; running now")
    log_report(await run_check(get_services()))
