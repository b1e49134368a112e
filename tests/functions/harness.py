"""A sync harness around the function app: services on a private event loop and a fingerprint of all state."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import azure.functions as func

from sandbox.demo import Sandbox
from shared.bootstrap import Services


class Harness:
    """Services on a private event loop (hypothesis drives a sync test), plus the means to fingerprint them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, services: Services, state_dir: Path, box: Sandbox,
                 functions: dict[str, Any]) -> None:
        self.loop, self.services, self.state_dir, self.box, self.functions = loop, services, state_dir, box, functions

    def __repr__(self) -> str:
        return "Harness()"

    def call(self, name: str, req: func.HttpRequest) -> func.HttpResponse:
        response: func.HttpResponse = self.loop.run_until_complete(
            self.functions[name].get_user_function()(req))
        return response

    def fingerprint(self) -> dict[str, Any]:
        """Queue (depth + message ids), every state table (links, snapshots, checkpoints, dedup, audit), and
        the simulators' write counters."""
        out: dict[str, Any] = {}
        with sqlite3.connect(self.state_dir / "state.db") as conn:
            for table in ("links", "snapshots", "checkpoints", "dedup", "audit"):
                digest = hashlib.sha256()
                for row in sorted(repr(r) for r in conn.execute(f"SELECT * FROM {table}")):
                    digest.update(row.encode("utf-8", "surrogatepass"))
                out[table] = digest.hexdigest()
        with sqlite3.connect(self.state_dir / "queue.db") as conn:
            out["queue"] = sorted(conn.execute("SELECT message_id, visible_us FROM queue_messages"))
        box = self.box
        out["arcgis.serverGen"] = box.ag.server_gen
        out["dataverse.version"] = box.dv._version
        writes = ("POST", "PATCH", "PUT", "DELETE", "MERGE")
        out["fno.writes"] = sum(1 for m, p in box.fno.requests if m in writes and "token" not in p.lower())
        out["sap.writes"] = sum(1 for m, p in [*box.sap.requests, *box.sap.batch_requests] if m in writes)
        out["salesforce.writes"] = sum(1 for m, p, _ in box.sf.requests if m in writes and "token" not in p.lower())
        return out
