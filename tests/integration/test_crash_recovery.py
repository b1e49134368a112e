"""Killing the controller in the middle of a drain loses nothing and duplicates nothing in either system."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.ops import initial_load

ROOT = Path(__file__).resolve().parents[2]


def controller_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "run", "--no-poll"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def test_kill_mid_drain_then_rerun(seeded):
    box, _summary, services = seeded
    await initial_load(services)
    signs = box.ag.all("SignAssets")
    # Field activity: condition changes (updates) and new Survey123 inspections (creates + id write-back).
    expected_condition = {}
    for i, feature in enumerate(signs[:30]):
        condition = ("FAIR", "POOR", "DAMAGED")[i % 3]
        box.ag.field_edit("SignAssets", feature["GlobalID"], {"CONDITION": condition}, user="crew1")
        expected_condition[feature["DV_ID"]] = condition
    inspections = [box.ag.survey123_submit({"INSPECTION_DATE": 1795428900000 + i, "INSPECTOR": "K. Osei",
                                            "CONDITION": "POOR", "ASSET_GUID": signs[i]["GlobalID"]},
                                           attachments=[], geometry=signs[i].get("@geometry"))
                   for i in range(30)]
    enqueued = await services.controller.poll()
    assert enqueued >= 60
    await services.aclose()

    env = {**os.environ, **box.env, "SYNCLINE_LOCK_SECONDS": "1", "SYNCLINE_BATCH_SIZE": "8",
           "DATAVERSE__BATCH_SIZE": "4"}
    box.dv.latency_ms = 150  # slow enough to be killed in the middle
    writes_before = box.dv.request_counts["batch"]
    proc = controller_process(env)
    deadline = time.monotonic() + 60
    while box.dv.request_counts["batch"] < writes_before + 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "controller exited early"
        assert time.monotonic() < deadline, "controller never started writing"
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    partially = sum(1 for r in box.dv.all("dot_signassets")
                    if r["dot_signassetid"] in expected_condition and r.get("dot_condition") != 100000000)
    partial_inspections = len(box.dv.all("dot_inspections"))
    assert partially + partial_inspections < 60, "the kill came after the drain had finished"

    await asyncio.sleep(1.2)  # the killed controller's locks expire: Service Bus semantics
    box.dv.latency_ms = 0
    rerun = controller_process(env)
    _out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()[-2000:]

    codes = {"GOOD": 100000000, "FAIR": 100000001, "POOR": 100000002, "DAMAGED": 100000003}
    for dv_id, condition in expected_condition.items():
        assert box.dv.get("dot_signassets", dv_id)["dot_condition"] == codes[condition]
    dv_inspections = box.dv.all("dot_inspections")
    assert len(dv_inspections) == 30  # each created exactly once, though some were written twice
    assert {r["dot_arcgisglobalid"] for r in dv_inspections} == {g.upper() for g in inspections}
    assert len(box.ag.all("Inspections")) == 30
    assert all(f.get("DV_ID") for f in box.ag.all("Inspections"))  # every new id was propagated back
    assert len(box.ag.all("SignAssets")) == len(signs)

    from shared.bootstrap import build_services
    from shared.settings import Settings

    check = build_services(Settings())
    try:
        depth = await check.queue.depth()
        assert (depth.active, depth.scheduled) == (0, 0)
        dead = await check.queue.peek_dead_letters()
        # Only the two deliberately bad signs of the seed, from the initial load's resubmissions.
        assert {m.application_properties["flow"] for m in dead} <= {"sign_assets_to_field"}
    finally:
        await check.aclose()
