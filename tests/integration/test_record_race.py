"""Two processes write the same new record at the same moment: exactly one creates it in SAP (which numbers its
records itself and has no upsert), the other is told the record is busy, retries, and finds it synced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.demo import Sandbox, start_sandbox
from sandbox.sap import seed_sap

ROOT = Path(__file__).resolve().parents[2]
SAP_LATENCY_MS = 300  # the find-then-create of each writer takes >= 0.6 s: the two windows overlap
START_DELAY_SECONDS = 8.0  # both workers have imported and connected well before the start line


@pytest.fixture(params=["embedded", "azure"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    sandbox = start_sandbox(tmp_path / "box", sap=True, runtime=request.param)
    try:
        assert sandbox.sap is not None
        seed_sap(sandbox.sap, partners=2, orders=0)
        yield sandbox
    finally:
        sandbox.stop()


def worker(box: Sandbox, start: float, key: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **box.env, "SYNCLINE_FLOWS": str(ROOT / "flows" / "sap.yaml")}
    args = [sys.executable, "-m", "tests.integration.race_worker", str(start), "accounts_to_sap", "dataverse",
            "accounts", key]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_creating_one_record_make_one_target_record(box: Sandbox):
    number = "ACC-RACE-1"
    account = str(box.dv.insert("accounts", {
        "name": "Race Customer", "accountnumber": number, "address1_city": "Denver", "address1_country": "US",
        "paymenttermscode": 1, "syn_currencycode": "USD"}))
    assert box.sap is not None
    box.sap.latency_ms = SAP_LATENCY_MS
    start = time.time() + START_DELAY_SECONDS
    procs = [worker(box, start, account) for _ in range(2)]
    histories = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
        histories.append(json.loads(out.decode().strip().splitlines()[-1]))

    partners = [p for p in box.sap.all("A_BusinessPartner") if p.get("BusinessPartnerIDByExtSystem") == number]
    assert len(partners) == 1, f"{len(partners)} SAP business partners for one account: {histories}"
    first_outcomes = sorted((h[0]["status"], h[0]["reason"] or "") for h in histories)
    # One process created the partner; the other found the record leased, was not let near SAP, and retried.
    assert first_outcomes == [("failed", "RECORD_BUSY"), ("written", "")], histories
    [winner] = [h for h in histories if h[0]["status"] == "written"]
    [loser] = [h for h in histories if h[0]["status"] == "failed"]
    assert winner == [{"status": "written", "created": True, "target_key": partners[0]["BusinessPartner"],
                       "reason": None, "detail": None}]
    assert all(o["reason"] == "RECORD_BUSY" for o in loser[:-1])
    # Its retry meets the synced record: an echo (nothing to write) or an idempotent update, never a create.
    assert loser[-1]["status"] in ("skipped_echo", "skipped_noop", "written"), loser
    assert not loser[-1]["created"]
    assert box.dv.get("accounts", account)["syn_sapbusinesspartner"] == partners[0]["BusinessPartner"]
