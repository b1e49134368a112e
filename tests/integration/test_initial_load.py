"""`syncline load` against the simulators over loopback: output and exit codes of every case, a paused target, a
second load refused, and a `kill -9` mid-load resumed without duplicates and without starting from zero."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from sandbox.dataverse import seed_dataverse
from sandbox.demo import Sandbox
from shared.bootstrap import build_services
from shared.cli import app
from shared.ops.load import LOAD_PREFIX, LoadState
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FLOW = "sign_assets_to_field"
runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


async def read_checkpoint(name: str) -> LoadState | None:
    services = build_services(Settings())
    try:
        point = await services.state.get_checkpoint(name)
        return LoadState.from_json(point.value) if point else None
    finally:
        await services.aclose()


def checkpoint(name: str) -> LoadState | None:
    return asyncio.run(read_checkpoint(name))


def put_checkpoint(name: str, value: str) -> None:
    async def put() -> None:
        services = build_services(Settings())
        try:
            point = await services.state.get_checkpoint(name)
            await services.state.put_checkpoint(name, value, expected_etag=point.etag if point else None)
        finally:
            await services.aclose()

    asyncio.run(put())


def breaker(system: str, until: datetime | None) -> None:
    """Open `system`'s circuit breaker until `until` (as a spent allocation does), or close it (None)."""
    async def go() -> None:
        services = build_services(Settings())
        try:
            if until is None:
                await services.controller.breakers.close(system)
            else:
                await services.controller.breakers.trip(system, "allocation spent", until=until)
        finally:
            await services.aclose()

    asyncio.run(go())


def signs_in_field(box: Sandbox) -> list[str]:
    return [str(f["DV_ID"]).lower() for f in box.ag.all("SignAssets")]


def good_signs(box: Sandbox, summary: dict[str, object]) -> list[str]:
    bad = {str(k).lower() for k in summary["bad_sign_ids"]}  # type: ignore[attr-defined]
    return sorted(k for r in box.dv.all("dot_signassets") if (k := str(r["dot_signassetid"]).lower()) not in bad)


def test_load_cases_output_and_exit_codes(sandbox: Sandbox):
    code, out = cli("load", "no_such_flow")
    assert code == 2
    assert out.strip() == ("error UNKNOWN_FLOW: no flow named 'no_such_flow' in spec "
                           "'customer-360+dot-signs+fno-salesforce+sap'")

    code, out = cli("load", FLOW)  # an empty source
    assert code == 0
    assert out.strip() == f"flow {FLOW}: nothing to load (0 records in the source)"

    summary = seed_dataverse(sandbox.dv, signs=12, work_orders=3)
    code, out = cli("load", FLOW, "--restart")
    assert code == 0, out
    assert f"flow {FLOW}: loaded 14 records (12 written, 0 already in sync, 2 queued)" in out  # 2 bad signs
    assert "records/s)" in out
    assert sorted(signs_in_field(sandbox)) == good_signs(sandbox, summary)

    tasks = summary["dot_workordertasks"]
    code, out = cli("load", "work_order_tasks_to_field")  # children before their parents: they wait on the queue
    assert code == 0
    assert "has parent flow(s) not loaded yet: work_orders_to_field" in out
    assert "deferred to the queue until the parent syncs" in out
    assert f"flow work_order_tasks_to_field: loaded {tasks} records (0 written, 0 already in sync, {tasks} queued)" \
        in out
    code, out = cli("load", "work_orders_to_field")
    assert "parent flow" not in out
    assert "flow work_orders_to_field: loaded 3 records (3 written, 0 already in sync, 0 queued)" in out

    code, out = cli("load", FLOW)
    assert code == 0
    assert out.strip().startswith(f"flow {FLOW}: already complete at ")
    assert out.strip().endswith("(14 records); use --restart to load it again")

    edits = sandbox.ag.request_count["applyEdits"]
    code, out = cli("load", FLOW, "--restart", "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["outcome"], report["written"], report["skipped"], report["complete"]) == \
        ("complete", 0, 12, True)
    assert sandbox.ag.request_count["applyEdits"] == edits  # a repeated load writes nothing

    code, out = cli("load", FLOW, "--restart", "--since", "2099-01-01")
    assert (code, out.strip()) == (0, f"flow {FLOW}: nothing to load (0 records since 2099-01-01T00:00:00+00:00)")
    code, out = cli("load", FLOW, "--since", "next tuesday")
    assert (code, out.strip()) == (2, "configuration error --since 'next tuesday' is not a date (YYYY-MM-DD or "
                                      "an ISO date-time)")


def test_a_paused_target_stops_the_load_and_a_running_load_refuses_a_second(sandbox: Sandbox):
    seed_dataverse(sandbox.dv, signs=6, work_orders=0)
    until_at = datetime.now(UTC) + timedelta(hours=2)
    until = until_at.isoformat()
    breaker("arcgis", until_at)
    code, out = cli("load", FLOW)
    assert code == 1
    assert out.strip() == f"arcgis is paused until {until}; stopped at record 0; resume with `syncline load {FLOW}`"
    assert signs_in_field(sandbox) == []
    state = checkpoint(LOAD_PREFIX + FLOW)
    assert state is not None
    assert state.status == "paused"
    breaker("arcgis", None)

    # A load of the flow running elsewhere (another host) that made progress a moment ago.
    now = datetime.now(UTC).isoformat()
    running = LoadState(FLOW, None, position=4, last_key="x", status="running", owner="other-host:1:abc",
                        started_at="2026-12-07T10:00:00+00:00", updated_at=now)
    put_checkpoint(LOAD_PREFIX + FLOW, running.to_json())
    code, out = cli("load", FLOW)
    assert code == 1
    assert out.strip() == (f"error a load of flow {FLOW} is already running (started at 2026-12-07T10:00:00+00:00, "
                           f"last progress {now}, by other-host:1:abc); wait for it, or for it to go stale, then "
                           "run it again")
    assert signs_in_field(sandbox) == []

    # Stale (no progress for longer than the stale time): taken over, resumed... from a key no longer there.
    running.updated_at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    put_checkpoint(LOAD_PREFIX + FLOW, running.to_json())
    code, out = cli("load", FLOW)
    assert code == 0, out
    assert f"flow {FLOW}: resuming at record 4" in out
    assert f"flow {FLOW}: loaded 8 records (6 written, 0 already in sync, 2 queued)" in out  # replayed from 0
    assert len(signs_in_field(sandbox)) == 6


def _interruptible() -> None:
    # A child inherits an ignored or blocked SIGINT from its parent (in the whole suite, the pytest process may
    # have one: the Ctrl-C test then saw the load run to completion); a user's shell never hands that on.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def load_process(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "load", FLOW], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible)


async def test_kill_9_mid_load_then_resume_loads_each_record_exactly_once(sandbox: Sandbox):
    summary = seed_dataverse(sandbox.dv, signs=60, work_orders=0)
    env = {**os.environ, **sandbox.env, "SYNCLINE_BATCH_SIZE": "5", "ARCGIS__BATCH_SIZE": "5", "COLUMNS": "200"}
    sandbox.ag.latency_ms = 120  # slow enough to be killed in the middle
    proc = load_process(env)
    deadline = time.monotonic() + 60
    while sandbox.ag.request_count["applyEdits"] < 4:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "load exited early"
        assert time.monotonic() < deadline, "the load never started writing"
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    first_edits = sandbox.ag.request_count["applyEdits"]
    assert len(signs_in_field(sandbox)) < 60, "the kill came after the load had finished"
    killed = await read_checkpoint(LOAD_PREFIX + FLOW)
    assert killed is not None
    assert killed.status == "running"
    assert killed.position > 0

    sandbox.ag.latency_ms = 0
    rerun = load_process(env)  # at once: the killed process is gone, so its claim is stale
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    assert f"flow {FLOW}: resuming at record {killed.position}" in text
    assert f"flow {FLOW}: loaded 62 records" in text

    loaded = signs_in_field(sandbox)
    assert sorted(loaded) == good_signs(sandbox, summary)  # every record of the source, none twice
    assert len(set(loaded)) == len(loaded) == 60
    resumed_edits = sandbox.ag.request_count["applyEdits"] - first_edits
    assert resumed_edits < 60 / 5, "the resume started from zero"
    done = await read_checkpoint(LOAD_PREFIX + FLOW)
    assert done is not None
    assert (done.status, done.position, done.loaded) == ("complete", 62, 62)


async def test_ctrl_c_stops_cleanly_and_the_rerun_resumes_at_once(sandbox: Sandbox):
    seed_dataverse(sandbox.dv, signs=40, work_orders=0)
    env = {**os.environ, **sandbox.env, "SYNCLINE_BATCH_SIZE": "5", "ARCGIS__BATCH_SIZE": "5", "COLUMNS": "200"}
    # Slow enough that the 5 batches left after the third take seconds: on a loaded machine the interrupt must
    # still land mid-load (at 120 ms the load once finished first, exit 0).
    sandbox.ag.latency_ms = 600
    proc = load_process(env)
    deadline = time.monotonic() + 60
    while sandbox.ag.request_count["applyEdits"] < 3:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "load exited early"
        assert time.monotonic() < deadline, "the load never started writing"
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, (f"SIGINT in the test process: {signal.getsignal(signal.SIGINT)!r}, blocked "
                                    f"{signal.pthread_sigmask(signal.SIG_BLOCK, set())}; {err.decode()[-2000:]}")
    stopped = await read_checkpoint(LOAD_PREFIX + FLOW)
    assert stopped is not None
    assert stopped.status == "stopped"
    assert 0 < stopped.position < 42
    assert out.decode().strip().endswith(f"interrupted after record {stopped.position}; resume with "
                                         f"`syncline load {FLOW}`")

    sandbox.ag.latency_ms = 0
    rerun = load_process(env)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err.decode()[-2000:]
    assert f"flow {FLOW}: resuming at record {stopped.position}" in out.decode()
    assert len(set(signs_in_field(sandbox))) == len(signs_in_field(sandbox)) == 40


def test_the_admin_function_over_http_steps_the_load_to_completion(sandbox: Sandbox):
    """The function served by the local host (route parameter, function key), called until it is complete."""
    import httpx

    from sandbox.funchost import build_app
    from sandbox.server import RunningServer
    from shared.bootstrap import set_services

    seed_dataverse(sandbox.dv, signs=8, work_orders=0)
    set_services(None)  # the host builds its own services from the sandbox settings
    host = RunningServer(build_app(function_key="admin-key")).start()
    try:
        url = f"{host.url}/api/admin/load/{FLOW}"
        with httpx.Client(timeout=60) as client:
            assert client.post(url, json={}).status_code == 401  # no key
            first = client.post(url, headers={"x-functions-key": "admin-key"}, json={"max_seconds": 1e-9})
            assert first.status_code == 202
            assert (first.json()["complete"], first.json()["next"]) == (False, "call again to continue")
            done = client.post(url, headers={"x-functions-key": "admin-key"})
            assert done.status_code == 200
            assert (done.json()["outcome"], done.json()["loaded"], done.json()["written"]) == ("complete", 10, 8)
            missing = client.post(f"{host.url}/api/admin/load/nope", headers={"x-functions-key": "admin-key"})
            assert (missing.status_code, missing.json()["error"]) == (404, "UNKNOWN_FLOW")
    finally:
        host.stop()
        set_services(None)
    assert len(signs_in_field(sandbox)) == 8
