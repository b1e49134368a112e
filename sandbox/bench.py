"""`make bench`: inbound ArcGIS edits -> Dataverse, batched vs naive, with injected latency (prints figures).

The parent process runs the Dataverse simulator (TLS, 20 ms per request); each path runs in its own child
process so its peak memory (VmHWM, see `bench_sap.peak_rss_mb`; ru_maxrss is reported beside it) is Syncline's
alone. Both paths use the same engine and mapping; only the write strategy differs: `$batch` of up to 1,000
upserts vs one PATCH request per record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def dataverse_only_environment(ca_bundle: str, dataverse_url: str) -> dict[str, str]:
    """Settings of a child that drains queued ArcGIS edits into the Dataverse simulator and nothing else."""
    from sandbox import dataverse as dvs

    return {"SYNCLINE_CA_BUNDLE": ca_bundle, "DATAVERSE__URL": dataverse_url,
            "DATAVERSE__AUTHORITY_HOST": dataverse_url, "DATAVERSE__TENANT_ID": dvs.DEFAULT_TENANT_ID,
            "DATAVERSE__CLIENT_ID": dvs.DEFAULT_CLIENT_ID, "DATAVERSE__CLIENT_SECRET": dvs.DEFAULT_CLIENT_SECRET,
            # ArcGIS is configured (never contacted: the edits are queued, the drain only writes Dataverse)
            # because a flow whose source system is not configured stays idle and its messages would fail.
            "ARCGIS__SERVICE_URL": "https://arcgis.invalid/arcgis/rest/services/Signs/FeatureServer",
            "ARCGIS__API_KEY": "never-used", "SYNCLINE_FLOWS": str(ROOT / "flows" / "dot-signs.yaml"),
            "FNO__ENVIRONMENT_URL": "", "SALESFORCE__MY_DOMAIN_URL": "", "SAP__BASE_URL": ""}


# ------------------------------------------------------------------------------------------ child


class NaiveDataverseSink:
    """One PATCH request per record, sequentially: what a simple per-record flow does."""

    system = "dataverse"

    def __init__(self, tokens: Any, http: httpx.AsyncClient, base_url: str) -> None:
        self.tokens = tokens
        self.http = http
        self.api = base_url.rstrip("/") + "/api/data/v9.2"

    async def write(self, ops: Sequence[Any]) -> list[Any]:
        from shared.core.errors import RejectedError
        from shared.core.ports import WriteResult

        results = []
        for op in ops:
            token = await self.tokens.get_token()
            body = dict(op.values)
            for nav, bind in op.binds.items():
                body[f"{nav}@odata.bind"] = f"/{bind.entity_set}({bind.key})"
            resp = await self.http.patch(f"{self.api}/{op.table}({op.key})", json=body,
                                         headers={"Authorization": f"Bearer {token}", "If-Match": "*"})
            ok = resp.status_code < 300
            results.append(WriteResult(op.op_id, ok, key=op.key,
                                       error=None if ok else RejectedError(f"HTTP {resp.status_code}")))
        return results

    async def select(self, *a: Any, **k: Any) -> list[Any]:
        return []

    async def fetch(self, *a: Any, **k: Any) -> dict[str, Any]:
        return {}


async def child(path: str, records: int, batch: int) -> dict[str, Any]:
    """Run one path against the simulator named in the environment; return its figures."""
    from sandbox.bench_sap import peak_rss_mb
    from shared.bootstrap import build_services
    from shared.core.envelope import ChangeEnvelope
    from shared.core.ports import GEOMETRY_KEY, Link
    from shared.settings import Settings

    settings = Settings(syncline_batch_size=batch)  # type: ignore[call-arg]
    settings.dataverse.batch_size = min(batch, 1000)
    services = build_services(settings)
    signs: list[Any] = []
    async for page in services.sources["dataverse"].scan("dot_signassets"):
        signs.extend(page)
    signs = [s for s in signs if s.values.get("dot_mutcdcode") and s.values.get("dot_signtype") != 100000009]
    signs = signs[:records]
    links, envelopes = [], []
    t0 = datetime(2026, 11, 20, 12, tzinfo=UTC)
    for i, sign in enumerate(signs):
        gid = f"{{{i:08X}-0000-4000-8000-{i:012X}}}"
        links.append(Link("sign_asset", "arcgis", gid, "dataverse", sign.key))
        payload = {"ASSET_TAG": sign.values["dot_assettag"], "MUTCD_CODE": sign.values["dot_mutcdcode"],
                   "SIGN_TYPE": "REG", "CONDITION": ("GOOD", "FAIR", "POOR", "DAMAGED")[i % 4],
                   "RETRO_READING": float(100 + i % 300), "DV_ID": sign.key, "EditDate": 0,
                   GEOMETRY_KEY: {"x": -8735000.0 + i, "y": 4584000.0, "spatialReference": {"wkid": 102100}}}
        envelopes.append(ChangeEnvelope(flow="sign_assets_from_field", operation="update", source_system="arcgis",
                                        source_table="SignAssets", source_key=gid, payload=payload, origin="bench",
                                        source_modified=t0 + timedelta(seconds=i), source_version=str(i)))
    await services.state.put_links(links)
    await services.queue.send([e.to_message() for e in envelopes])
    if path == "naive":
        from shared.bootstrap import dataverse_token_provider

        tokens = dataverse_token_provider(settings.dataverse, ca_bundle=settings.syncline_ca_bundle or None)
        naive = NaiveDataverseSink(tokens, services.clients[0], settings.dataverse.url)
        services.engine.sinks = {**services.sinks, "dataverse": naive}  # type: ignore[dict-item]
    before = services.counter.snapshot().get("dataverse", 0)
    started = time.perf_counter()
    report = await services.controller.drain()
    seconds = time.perf_counter() - started
    requests = services.counter.snapshot().get("dataverse", 0) - before
    peak = peak_rss_mb()
    await services.aclose()
    written = report.statuses.get("written", 0)
    return {
        "path": path, "records": len(envelopes), "written": written, "seconds": round(seconds, 3),
        "records_per_second": round(written / seconds, 1) if seconds else 0.0,
        "dataverse_requests": requests, "requests_per_record": round(requests / max(written, 1), 4),
        "peak_rss_mb": round(peak, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "statuses": report.statuses,
    }


# ------------------------------------------------------------------------------------------ parent


def run_child(path: str, records: int, batch: int, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "sandbox.bench", "--child", path, "--records", str(records), "--batch", str(batch)],
        env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench child {path} failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def bench_parser(description: str | None, *, records: int, naive_records: int, batch: int,
                 report: str) -> argparse.ArgumentParser:
    """The options a batched-vs-naive bench takes (this one and the Salesforce one), with its own defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--records", type=int, default=records)
    parser.add_argument("--naive-records", type=int, default=naive_records)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / report)
    parser.add_argument("--child", choices=["batched", "naive"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, records=10_000, naive_records=1_000, batch=1000, report="bench.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.records, args.batch))))
        return 0

    from sandbox import dataverse as dvs
    from sandbox.dataverse import seed_dataverse
    from sandbox.server import RunningServer, TestCA

    with tempfile.TemporaryDirectory() as tmp:
        ca = TestCA.create(Path(tmp) / "tls")
        sim = dvs.DataverseSimulator(latency_ms=args.latency_ms)
        seed_dataverse(sim, signs=max(args.records, args.naive_records), work_orders=0)
        server = RunningServer(sim.app, ca=ca).start()
        base = {**os.environ, **dataverse_only_environment(str(ca.ca_path), server.url)}
        try:
            print(f"Dataverse simulator with {args.latency_ms:.0f} ms per request; "
                  f"batched path: {args.records} records, naive path: {args.naive_records} records", flush=True)
            batched = run_child("batched", args.records, args.batch,
                                {**base, "SYNCLINE_STATE_DIR": str(Path(tmp) / "batched")})
            naive = run_child("naive", args.naive_records, args.batch,
                              {**base, "SYNCLINE_STATE_DIR": str(Path(tmp) / "naive")})
        finally:
            server.stop()
            sim.close()
    speedup = batched["records_per_second"] / max(naive["records_per_second"], 1e-9)
    rows = [("records written", "written"), ("seconds", "seconds"), ("records/second", "records_per_second"),
            ("Dataverse HTTP requests", "dataverse_requests"), ("requests/record", "requests_per_record"),
            ("peak RSS (MB)", "peak_rss_mb")]
    print(f"{'':28}{'batched':>14}{'naive':>14}")
    for label, key in rows:
        print(f"{label:28}{batched[key]!s:>14}{naive[key]!s:>14}")
    print(f"throughput ratio (batched / naive): {speedup:.1f}x")
    targets = {"ratio >= 50x": speedup >= 50, "requests/record <= 0.02": batched["requests_per_record"] <= 0.02,
               "peak RSS < 300 MB": batched["peak_rss_mb"] < 300}
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    out = args.report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"latency_ms": args.latency_ms, "batched": batched, "naive": naive,
                               "ratio": round(speedup, 1), "targets": targets}, indent=2))
    print(f"figures written to {out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
