"""`make bench`: initial load of F&O customers into Salesforce Accounts, batched vs naive (prints figures).

The parent process runs the F&O and Salesforce simulators over TLS, both with injected latency; each path runs
`controller.run_cycle()` (poll F&O -> queue -> drain -> Salesforce) in its own child process so its peak memory
(VmHWM, see `bench_sap.peak_rss_mb`; ru_maxrss is reported beside it) is Syncline's alone. Both paths use the
same engine, flow and mapping; only the Salesforce write differs: sObject Collections / Bulk API 2.0 vs one
`PATCH /sobjects/Account/Dynamics_Account__c/<id>` per record. Salesforce API calls are counted by the simulator
(token and describe included).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
CALLS_PER_RECORD_TARGET = 1 / 200

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ------------------------------------------------------------------------------------------ child


class NaiveSalesforceSink:
    """One upsert request per record, sequentially: what a simple per-record flow does."""

    system = "salesforce"

    def __init__(self, client: Any) -> None:
        self.client = client

    async def write(self, ops: Sequence[Any]) -> list[Any]:
        from shared.connectors.salesforce.codecs import jsonable as _jsonable
        from shared.core.errors import RejectedError, SyncError
        from shared.core.ports import WriteResult

        results = []
        for op in ops:
            if not op.match or len(op.match) != 1:
                results.append(WriteResult(op.op_id, False, error=RejectedError("naive path upserts by External ID")))
                continue
            ((ext_field, ext_value),) = op.match.items()
            path = f"sobjects/{op.table}/{ext_field}/{quote(str(ext_value), safe='')}"
            try:
                body = await self.client._ajson("PATCH", path, what=f"upsert {op.table}", json=_jsonable(op.values))
            except SyncError as error:
                results.append(WriteResult(op.op_id, False, error=error))
                continue
            body = body or {}
            results.append(WriteResult(op.op_id, True, key=body.get("id"), created=bool(body.get("created"))))
        return results

    async def select(self, *a: Any, **k: Any) -> list[Any]:
        return []

    async def fetch(self, *a: Any, **k: Any) -> dict[str, Any]:
        return {}


async def child(path: str, batch: int) -> dict[str, Any]:
    """Run one path against the simulators named in the environment; return its figures."""
    from sandbox.bench_sap import peak_rss_mb
    from shared.bootstrap import build_services
    from shared.settings import Settings

    settings = Settings(syncline_batch_size=batch)
    services = build_services(settings)
    if path == "naive":
        naive = NaiveSalesforceSink(services.sinks["salesforce"])
        services.engine.sinks = {**services.sinks, "salesforce": naive}
    started = time.perf_counter()
    report = await services.controller.run_cycle()
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    await services.aclose()
    if report.outcome != "ok":
        raise SystemExit(f"cycle failed: {report.error}")
    written = report.statuses.get("written", 0)
    return {
        "path": path, "polled": report.polled, "written": written, "seconds": round(seconds, 3),
        "records_per_second": round(written / seconds, 1) if seconds else 0.0,
        "peak_rss_mb": round(peak, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "statuses": report.statuses, "dead_lettered": report.dead_lettered,
    }


# ------------------------------------------------------------------------------------------ parent


def with_latency(app: ASGIApp, latency_ms: float) -> ASGIApp:
    """The app, answering every HTTP request `latency_ms` later (a WAN round trip to the org)."""

    async def delayed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        await app(scope, receive, send)

    return delayed


def run_child(path: str, batch: int, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "sandbox.bench_sf", "--child", path, "--batch", str(batch)],
                         env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench child {path} failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_path(path: str, records: int, batch: int, latency_ms: float, tmp: Path) -> dict[str, Any]:
    """Serve a fresh F&O (`records` good customers, two companies) and Salesforce org; run one child against them."""
    from sandbox.fno import FinOpsSimulator, seed_fno
    from sandbox.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SalesforceSimulator
    from sandbox.server import RunningServer, TestCA

    ca = TestCA.create(tmp / f"tls-{path}")
    fno, sf = FinOpsSimulator(latency_ms=latency_ms), SalesforceSimulator()
    sf.limits.daily_max = 10_000_000
    seed_fno(fno, customers=records // 2, products=0)  # per company: usmf and demf, plus one bad row each
    servers = [RunningServer(fno.app, ca=ca).start(), RunningServer(with_latency(sf.app, latency_ms), ca=ca).start()]
    sf.instance_url = servers[1].url
    env = {**os.environ, "SYNCLINE_STATE_DIR": str(tmp / path), "SYNCLINE_CA_BUNDLE": str(ca.ca_path),
           "SYNCLINE_FLOWS": str(ROOT / "flows" / "fno-salesforce.yaml"),
           "DATAVERSE__URL": "", "ARCGIS__SERVICE_URL": "",
           "FNO__ENVIRONMENT_URL": servers[0].url, "FNO__AUTHORITY_HOST": servers[0].url,
           "FNO__TENANT_ID": fno.tenant_id, "FNO__CLIENT_ID": fno.client_id, "FNO__CLIENT_SECRET": fno.client_secret,
           "SALESFORCE__MY_DOMAIN_URL": servers[1].url, "SALESFORCE__CLIENT_ID": DEFAULT_CLIENT_ID,
           "SALESFORCE__CLIENT_SECRET": DEFAULT_CLIENT_SECRET}
    try:
        before = sf.request_count
        figures = run_child(path, batch, env)
        calls = sf.request_count - before
        accounts = sf.count("Account")
    finally:
        for server in servers:
            server.stop()
        fno.close()
    written = figures["written"]
    return {**figures, "records": records, "accounts_in_org": accounts, "salesforce_calls": calls,
            "calls_per_record": round(calls / max(written, 1), 5)}


def main(argv: Sequence[str] | None = None) -> int:
    from sandbox.bench import bench_parser

    parser = bench_parser(__doc__, records=100_000, naive_records=2_000, batch=5000, report="bench-salesforce.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.batch))))
        return 0

    print(f"F&O and Salesforce simulators with {args.latency_ms:.0f} ms per request; batched path: {args.records} "
          f"customers (SYNCLINE_BATCH_SIZE={args.batch}), naive path: {args.naive_records} customers (one request "
          "per record is linear, so a smaller run gives its rate)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        batched = run_path("batched", args.records, args.batch, args.latency_ms, Path(tmp))
        naive = run_path("naive", args.naive_records, args.batch, args.latency_ms, Path(tmp))
    speedup = batched["records_per_second"] / max(naive["records_per_second"], 1e-9)
    rows = [("customers polled", "polled"), ("Accounts written", "written"), ("seconds (whole cycle)", "seconds"),
            ("records/second", "records_per_second"), ("Salesforce API calls", "salesforce_calls"),
            ("calls/record", "calls_per_record"), ("peak RSS (MB)", "peak_rss_mb")]
    print(f"{'':28}{'batched':>14}{'naive':>14}")
    for label, key in rows:
        print(f"{label:28}{batched[key]!s:>14}{naive[key]!s:>14}")
    print(f"throughput ratio (batched / naive): {speedup:.1f}x")
    targets = {"calls/record <= 0.005 (one call per 200 records)":
               batched["calls_per_record"] <= CALLS_PER_RECORD_TARGET,
               "every good customer written": batched["written"] == args.records == batched["accounts_in_org"]}
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    out = args.report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"latency_ms": args.latency_ms, "batch_size": args.batch, "batched": batched,
                               "naive": naive, "ratio": round(speedup, 1), "targets": targets}, indent=2))
    print(f"figures written to {out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
