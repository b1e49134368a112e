"""The daily choice-domain drift check timer, invoked through azure-functions against every simulator."""

from __future__ import annotations

import json
import logging

import pytest
from azure.functions.timer import TimerRequest

from shared.ops.check import CHECK_LAST
from shared.ops.status import health
from tests.functions.harness import Harness


def test_the_check_timer_is_registered_on_its_schedule_setting(functions):
    trigger = functions["choice_check"].get_trigger().get_dict_repr()
    assert trigger["type"] == "timerTrigger"
    assert trigger["schedule"] == "%SYNCLINE_CHECK_SCHEDULE%"


def test_the_timer_stores_logs_and_status_shows_the_last_check(harness: Harness, caplog: pytest.LogCaptureFixture):
    box = harness.box
    box.dv.set_choice_option("dot_signassets", "dot_signtype", 100000009, "Detour")
    fn = harness.functions["choice_check"].get_user_function()
    try:
        with caplog.at_level(logging.INFO, logger="syncline.ops.check"):
            harness.loop.run_until_complete(fn(TimerRequest(past_due=True)))  # drift does not fail the invocation
    finally:
        box.dv.remove_choice_option("dot_signassets", "dot_signtype", 100000009)
    lines = [r.getMessage() for r in caplog.records if r.name == "syncline.ops.check"]
    assert any(line.startswith("choice drift: dataverse dot_signassets.dot_signtype value 100000009: unmapped "
                               "(sign_assets_to_field)") for line in lines), lines
    summary = [line for line in lines if line.startswith("choice check: ")]
    assert len(summary) == 1
    assert "unreachable: none" in summary[0]
    stored = harness.loop.run_until_complete(harness.services.state.get_checkpoint(CHECK_LAST))
    assert stored is not None
    last = json.loads(stored.value)
    assert last["exit_code"] == 1
    assert "error dataverse dot_signassets.dot_signtype 100000009: unmapped" in last["findings"]
    status = harness.loop.run_until_complete(health(harness.services))
    assert status["last_check"]["errors"] == last["errors"] > 0
    assert status["last_check"]["checked_at"] == last["checked_at"]
