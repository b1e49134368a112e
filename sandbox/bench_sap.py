"""`make bench`: submitted Dynamics orders into SAP S/4HANA by initial load, batched vs naive (prints figures).

The parent process serves the Dataverse and SAP simulators over TLS and prepares each path untimed (SAP seeded,
Dynamics ERP accounts, one controller cycle so SAP materials become Dynamics products, the accounts made SAP
partners through accounts_to_sap, then `bulk_sap_orders` without webhooks); then it injects latency (per HTTP
request on both, plus per SAP operation: every $batch part pays it, as a real Gateway's backend work does) and
runs `initial_load(services)` with flows/sap.yaml in a child process, so its peak memory (VmHWM) is Syncline's
alone. Both paths use the same engine and flow; only `SAP__BATCH_SIZE` differs (100: OData $batch, one changeset
per order; 1: one look-up GET and one deep-insert POST per order). SAP and Dataverse calls are counted by the
simulators, and every order is checked in SAP (exactly one sales order with all its items) afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLOWS = ROOT / "flows" / "sap.yaml"
CALLS_PER_ORDER_TARGET = 0.05
ORDER_FLOW = "orders_to_sap"
UNITS = {100000000: "PC", 100000001: "EA", 100000002: "KG"}
"""syn_unit options -> SAP units (the unit value map of flows/sap.yaml)."""
PLANTS = {100000000: "1710", 100000001: "1720"}
"""syn_plant options -> SAP plants (the plant value map of flows/sap.yaml)."""


# ------------------------------------------------------------------------------------------ child


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over exec from the image
    the child was forked from, so a child of a parent holding 10,000 orders would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def child(path: str) -> dict[str, Any]:
    """Run one initial load against the simulators named in the environment; return its figures."""
    from shared.bootstrap import build_services
    from shared.ops import initial_load
    from shared.settings import Settings

    settings = Settings()
    services = build_services(settings)
    accepted: Counter[str] = Counter()

    def progress(flow: str, n: int) -> None:
        accepted[flow] += n

    try:
        since = datetime.now(UTC)
        started = time.perf_counter()
        result = await initial_load(services, progress=progress)
        seconds = time.perf_counter() - started
        peak = peak_rss_mb()
        audit = await services.state.read_audit(limit=10_000_000, decision="written")
        written = Counter(a.flow for a in audit if a.at >= since)  # not the preparation's writes
    finally:
        await services.aclose()
    orders = written.get(ORDER_FLOW, 0)
    return {
        "path": path, "sap_batch_size": settings.sap.batch_size, "load_chunk": settings.syncline_batch_size,
        "seconds": round(seconds, 3), "orders_written": orders,
        "orders_per_second": round(orders / seconds, 1) if seconds else 0.0,
        "peak_rss_mb": round(peak, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "statuses": result.statuses, "queued": result.queued,
        "accepted_per_flow": dict(accepted), "written_per_flow": dict(written),
    }


# ------------------------------------------------------------------------------------------ parent


def run_child(path: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "sandbox.bench_sap", "--child", path],
                         env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench child {path} failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def order_catalogue(dv: Any, sap: Any) -> dict[str, tuple[list[int], list[int]]]:
    """productid -> (syn_unit options, syn_plant options) SAP accepts for its material (as the demo scenario does)."""
    materials = sap.customizing.materials
    combos: dict[str, tuple[list[int], list[int]]] = {}
    for product in dv.all("products"):
        material = materials.get(str(product.get("productnumber")))
        if material is None:
            continue
        units = [v for v, u in UNITS.items() if u in material.units]
        plants = [v for v, p in PLANTS.items() if p in material.plants]
        if units and plants:
            combos[product["productid"]] = (units, plants)
    return combos


async def prepare(env: dict[str, str], dv: Any, sap: Any, orders: int) -> dict[str, Any]:
    """Untimed: SAP seed, ERP accounts, products from SAP, accounts made partners, then the bulk orders."""
    from sandbox.dataverse import bulk_sap_orders, seed_sap_accounts
    from sandbox.demo import environment
    from sandbox.sap import seed_sap
    from shared.bootstrap import build_services
    from shared.ops import initial_load
    from shared.settings import Settings

    seed_sap(sap)
    seed_sap_accounts(dv)
    # The seeds' deliberately bad partners are dead-lettered in the preparation cycle; not this report's subject.
    logger = logging.getLogger("shared")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with environment(env):
            services = build_services(Settings())
            try:
                report = await services.controller.run_cycle()  # materials -> products, SAP partners -> accounts
                if report.outcome != "ok":
                    raise SystemExit(f"preparation cycle failed: {report.error}")
                await initial_load(services)  # Dynamics ERP accounts -> SAP business partners (no orders yet)
            finally:
                await services.aclose()
    finally:
        logger.setLevel(level)
    accounts = [a["accountid"] for a in dv.all("accounts")
                if a.get("syn_sapbusinesspartner") and a.get("syn_currencycode") in ("USD", "CAD")]
    products = order_catalogue(dv, sap)
    if not accounts or not products:
        raise SystemExit(f"preparation left {len(accounts)} partner accounts and {len(products)} products")
    ids = bulk_sap_orders(dv, accounts=accounts, products=products, orders=orders)
    return {"order_ids": ids, "accounts": len(accounts), "products": len(products)}


def verify(dv: Any, sap: Any, order_ids: Sequence[str]) -> dict[str, int]:
    """Every submitted order in SAP exactly once, with the SAP number written back and all its items."""
    numbers = {str(dv.get("salesorders", oid)["ordernumber"]): oid for oid in order_ids}
    in_sap: dict[str, list[dict[str, Any]]] = {}
    for row in sap.all("A_SalesOrder"):
        po = str(row.get("PurchaseOrderByCustomer") or "")
        if po in numbers:
            in_sap.setdefault(po, []).append(row)
    material_of = {p["productid"]: str(p.get("productnumber")) for p in dv.all("products")}
    wanted: dict[str, Counter[tuple[str, float]]] = {oid: Counter() for oid in order_ids}
    for line in dv.all("salesorderdetails"):
        parent = str(line.get("_salesorderid_value") or line.get("salesorderid"))
        if parent in wanted:
            wanted[parent][(material_of.get(str(line.get("productid"))) or "", float(line["quantity"]))] += 1
    figures = Counter({"orders_submitted": len(order_ids), "order_lines_in_dynamics": sum(
        sum(c.values()) for c in wanted.values())})
    for number, oid in numbers.items():
        rows = in_sap.get(number, [])
        figures["orders_in_sap"] += len(rows)
        if len(rows) != 1:
            figures["orders_missing" if not rows else "orders_duplicated"] += 1
            continue
        sap_number = rows[0]["SalesOrder"]
        if dv.get("salesorders", oid).get("syn_sapsalesorder") != sap_number:
            figures["orders_without_write_back"] += 1
        items = sap.items_of(sap_number)
        figures["items_in_sap"] += len(items)
        got = Counter((str(i.get("Material")), float(i.get("RequestedQuantity") or 0)) for i in items)
        if got != wanted[oid]:
            figures["orders_whose_items_differ"] += 1
    for key in ("orders_missing", "orders_duplicated", "orders_without_write_back", "orders_whose_items_differ"):
        figures.setdefault(key, 0)
    return dict(figures)


def run_path(path: str, orders: int, sap_batch: int, latency_ms: float, op_latency_ms: float,
             tmp: Path) -> dict[str, Any]:
    """Fresh simulators, prepared with `orders` submitted orders; one timed child against them."""
    from sandbox import dataverse as dvs
    from sandbox.sap import SapSimulator
    from sandbox.server import RunningServer, TestCA

    ca = TestCA.create(tmp / f"tls-{path}")
    dv = dvs.DataverseSimulator(webhook_verify=str(ca.ca_path))
    sap = SapSimulator(event_verify=str(ca.ca_path))
    servers = [RunningServer(dv.app, ca=ca).start(), RunningServer(sap.app, ca=ca).start()]
    env = {**os.environ, "SYNCLINE_RUNTIME": "embedded", "SYNCLINE_STATE_DIR": str(tmp / f"state-{path}"),
           "SYNCLINE_CA_BUNDLE": str(ca.ca_path), "SYNCLINE_FLOWS": str(FLOWS),
           "DATAVERSE__URL": servers[0].url, "DATAVERSE__AUTHORITY_HOST": servers[0].url,
           "DATAVERSE__TENANT_ID": dvs.DEFAULT_TENANT_ID, "DATAVERSE__CLIENT_ID": dvs.DEFAULT_CLIENT_ID,
           "DATAVERSE__CLIENT_SECRET": dvs.DEFAULT_CLIENT_SECRET,
           "SAP__BASE_URL": servers[1].url, "SAP__AUTH": "basic", "SAP__USER": sap.user,
           "SAP__PASSWORD": sap.password, "SAP__BATCH_SIZE": str(sap_batch),
           "ARCGIS__SERVICE_URL": "", "FNO__ENVIRONMENT_URL": "", "SALESFORCE__MY_DOMAIN_URL": ""}
    try:
        started = time.perf_counter()
        prepared = asyncio.run(prepare(env, dv, sap, orders))
        prep_seconds = time.perf_counter() - started
        dv.latency_ms, sap.latency_ms, sap.operation_latency_ms = latency_ms, latency_ms, op_latency_ms
        sap_before, dv_before = Counter(sap.request_counts), Counter(dv.request_counts)
        figures = run_child(path, env)
        sap_delta = Counter(sap.request_counts)
        sap_delta.subtract(sap_before)
        dv_delta = Counter(dv.request_counts)
        dv_delta.subtract(dv_before)
        dv.latency_ms = sap.latency_ms = sap.operation_latency_ms = 0.0
        checked = verify(dv, sap, prepared["order_ids"])
    finally:
        for server in servers:
            server.stop()
        for sim in (dv, sap):
            sim.close()
    calls = sap_delta["api"]
    batches = sap_delta["batch"]
    operations = calls - batches + sap_delta["batch_parts"]
    written = figures["orders_written"]
    return {
        **figures, "orders": orders, "prep_seconds": round(prep_seconds, 1),
        "partner_accounts": prepared["accounts"], "products": prepared["products"],
        "sap_calls": calls, "sap_batch_calls": batches, "sap_csrf_fetches": sap_delta["csrf_fetch"],
        "sap_operations": operations, "sap_calls_per_order": round(calls / max(written, 1), 4),
        "dataverse_calls": dv_delta["api"], "dataverse_calls_per_order": round(dv_delta["api"] / max(written, 1), 4),
        "sap_request_counts": {k: v for k, v in sap_delta.items() if v},
        "dataverse_request_counts": {k: v for k, v in dv_delta.items() if v},
        "verified": checked,
    }


def complete(figures: dict[str, Any]) -> bool:
    """Every submitted order written exactly once, with its SAP number written back and all its items."""
    v = figures["verified"]
    return (figures["orders_written"] == figures["orders"] == v["orders_in_sap"] and not v["orders_missing"]
            and not v["orders_duplicated"] and not v["orders_without_write_back"]
            and not v["orders_whose_items_differ"] and v["items_in_sap"] == v["order_lines_in_dynamics"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--naive-orders", type=int, default=1_000)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per HTTP request, both simulators")
    parser.add_argument("--op-latency-ms", type=float, default=2.0,
                        help="per SAP operation: each request alone, each part of a $batch")
    parser.add_argument("--batch", type=int, default=100, help="SAP__BATCH_SIZE of the batched path")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "bench-sap.json")
    parser.add_argument("--child", choices=["batched", "naive"])
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child(args.child))))
        return 0

    print(f"Dataverse and SAP simulators with {args.latency_ms:g} ms per HTTP request, SAP also "
          f"{args.op_latency_ms:g} ms per operation (a request alone or a $batch part); initial_load of "
          f"flows/sap.yaml. Batched path: {args.orders} orders (SAP__BATCH_SIZE={args.batch}: $batch, one "
          f"changeset per order); naive path: {args.naive_orders} orders (SAP__BATCH_SIZE=1: one look-up and one "
          "deep insert per order; linear, so a smaller run gives its rate)", flush=True)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        batched = run_path("batched", args.orders, args.batch, args.latency_ms, args.op_latency_ms, Path(tmp))
        naive = run_path("naive", args.naive_orders, 1, args.latency_ms, args.op_latency_ms, Path(tmp))
    speedup = batched["orders_per_second"] / max(naive["orders_per_second"], 1e-9)
    rows = [("orders submitted", "orders"), ("orders written", "orders_written"),
            ("order items in SAP", None), ("seconds (initial load)", "seconds"),
            ("orders/second", "orders_per_second"), ("SAP HTTP calls", "sap_calls"),
            ("  of which $batch", "sap_batch_calls"), ("  of which CSRF fetch", "sap_csrf_fetches"),
            ("SAP operations", "sap_operations"), ("SAP calls/order", "sap_calls_per_order"),
            ("Dataverse calls", "dataverse_calls"), ("Dataverse calls/order", "dataverse_calls_per_order"),
            ("peak RSS (MB)", "peak_rss_mb")]
    print(f"{'':26}{'batched':>14}{'naive':>14}")
    for label, key in rows:
        b, n = (batched["verified"]["items_in_sap"], naive["verified"]["items_in_sap"]) if key is None else \
            (batched[key], naive[key])
        print(f"{label:26}{b!s:>14}{n!s:>14}")
    print(f"throughput ratio (batched / naive): {speedup:.1f}x; both paths load {batched['load_chunk']} orders per "
          "engine call (SYNCLINE_BATCH_SIZE)")
    targets = {
        "batched: every submitted order written exactly once with all its items": complete(batched),
        "naive: every submitted order written exactly once with all its items": complete(naive),
        f"batched: SAP calls/order <= {CALLS_PER_ORDER_TARGET}":
            batched["sap_calls_per_order"] <= CALLS_PER_ORDER_TARGET,
    }
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({
        "latency_ms": args.latency_ms, "sap_operation_latency_ms": args.op_latency_ms, "sap_batch_size": args.batch,
        "batched": batched, "naive": naive, "ratio": round(speedup, 1), "targets": targets,
        "wall_seconds": round(time.perf_counter() - wall, 1)}, indent=2))
    print(f"figures written to {args.report} ({time.perf_counter() - wall:.0f} s in all)")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
