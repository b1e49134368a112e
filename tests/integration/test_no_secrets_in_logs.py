"""A full small demo with every logger at DEBUG: no secret, key or issued token appears in any log line."""

from __future__ import annotations

import base64
import json
import logging
import re
from io import StringIO

from rich.console import Console

import sandbox.demo as demo
from sandbox import dataverse as dvs
from sandbox import salesforce as sfs

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"


async def test_a_debug_logged_demo_run_leaks_no_secret(tmp_path, monkeypatch):
    boxes: list[demo.Sandbox] = []
    real_start = demo.start_sandbox

    def start_and_keep(*args, **kwargs):
        box = real_start(*args, **kwargs)
        boxes.append(box)
        return box

    monkeypatch.setattr("sandbox.demo.run.start_sandbox", start_and_keep)
    buffer = StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    old_level = root.level
    # Every logger at DEBUG: the root's level, and no library logger left quieter by an earlier test.
    touched = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
               if isinstance(lg, logging.Logger) and lg.level > logging.DEBUG}
    for name in touched:
        logging.getLogger(name).setLevel(logging.NOTSET)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        report_path = tmp_path / "report.json"
        ok = await demo.run_demo(Console(file=open(tmp_path / "out.txt", "w")),  # noqa: SIM115
                                 report_path=report_path, signs=12, work_orders=3, workdir=tmp_path / "demo",
                                 quiet_logs=False, customers=10, opportunities=10, sap_orders=8)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for name, level in touched.items():
            logging.getLogger(name).setLevel(level)
    assert ok, json.loads(report_path.read_text())
    text = buffer.getvalue()
    (box,) = boxes
    issued = [*box.dv._tokens, *box.ag._tokens]
    assert box.dv._tokens, "the Dataverse simulator issued no bearer token to check for"
    assert box.ag._tokens, "the ArcGIS simulator issued no bearer token to check for"
    secrets = {
        "webhook secret": demo.WEBHOOK_SECRET,
        "function key": demo.FUNCTION_KEY,
        "ArcGIS webhook signature key": demo.SIGNATURE_KEY,
        "Dataverse client secret": dvs.DEFAULT_CLIENT_SECRET,
        "ArcGIS client secret": box.ag.client_secret,
        "F&O client secret": box.fno.client_secret,
        "Salesforce client secret": sfs.DEFAULT_CLIENT_SECRET,
        "SAP password": box.sap.password,
        "SAP basic credentials": base64.b64encode(f"{box.sap.user}:{box.sap.password}".encode()).decode(),
        **{f"issued token {n}": token for n, token in enumerate(issued)},
    }
    leaked = [what for what, value in secrets.items() if value in text]
    assert not leaked, f"secrets in the logs: {leaked}"
    lines = text.splitlines()
    # The capture is real: library debug output, our own lines, and correlation ids on change processing.
    assert len(lines) > 500, len(lines)
    assert any(line.split(" ", 4)[3].startswith("httpcore") for line in lines if line.count(" ") >= 4)
    assert any(" shared." in line for line in lines)
    assert re.search(r"\[correlation_id=[0-9a-f-]{36}\]", text)
    assert "?code=***" in text  # the webhook URLs' function key was there, and was redacted
