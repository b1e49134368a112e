"""A newcomer's path: `python -m sandbox.demo --serve`, then `syncline --state <the demo's dir>` in another shell."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _syncline(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCLINE_", "DATAVERSE__", "ARCGIS__"))}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "shared.cli", "--state", ".syncline/demo", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_commands_the_demo_prints_work_on_what_it_left_while_it_serves(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCLINE_", "DATAVERSE__", "ARCGIS__"))}
    env.update(COLUMNS="200", PYTHONPATH=str(ROOT))
    demo = subprocess.Popen([sys.executable, "-m", "sandbox.demo", "--no-sales", "--no-sap", "--signs", "30",
                             "--work-orders", "10", "--report", "report.json", "--serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 240
        assert demo.stdout is not None
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops them" in line:
                break
        out = "".join(lines)
        assert "demo OK" in out, out[-3000:]
        assert "--state .syncline/demo trace" in out
        report = json.loads((tmp_path / "report.json").read_text())
        first = report["dead_letters"][0]
        assert f"dlq replay {first['message_id']}" in out

        listed = _syncline(tmp_path, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(r["message_id"] for r in json.loads(listed.stdout)) == \
            sorted(d["message_id"] for d in report["dead_letters"])

        status = _syncline(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        health = json.loads(status.stdout)
        # The simulators still serve: the demo's systems answer, and its dead letters are counted.
        assert health["systems"] == {"dataverse": {"reachable": True}, "arcgis": {"reachable": True}}
        assert health["queue"]["dead_letter"] == len(report["dead_letters"])
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, rest[-2000:]
    assert "stopping the simulators" in rest
