"""`python -m sandbox.chaos`: options parsed, the run, its summary printed."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from sandbox.chaos.options import DESCRIPTION, FLOW_SETS, ChaosOptions
from sandbox.chaos.run import run_chaos
from sandbox.faults import KINDS


def print_summary(doc: dict[str, Any]) -> None:
    f = doc["failures"]
    dl = doc["dead_letters"]
    lines = [
        f"chaos run ({doc['options']['runtime']}, flow sets {', '.join(doc['options']['flow_sets'])}, "
        f"seed {doc['options']['seed']}): {doc['duration_seconds']}s",
        f"  records changed          {doc['records_changed']}",
        f"  API calls                {doc['api_calls_total']}  "
        + ", ".join(f"{k} {v['calls']} ({v['faults']} faulted)" for k, v in doc["api_calls"].items()),
        "  faults injected          " + (", ".join(f"{k} {v}" for k, v in sorted(doc["faults_injected"].items()))
                                        or "none") + f"; token expiries {doc['token_expiries']}",
        f"  controller kills         {doc['kills']} (with messages locked: {doc['kills_with_locked_messages']}); "
        f"runs {doc['controller_runs']}, not ok {doc['controller_runs_not_ok']}",
        "  cycle errors             " + ("; ".join(f"{n}x {e}" for e, n in doc["controller_cycle_errors"].items())
                                        or "none"),
        f"  deliveries refused       {doc['deliveries_refused']} (webhooks/events the senders gave up on)",
        f"  lost                     {f['lost']}",
        f"  duplicates               {f['duplicates']}",
        f"  drift                    {f['drift']}",
        f"  half-applied cascades    {f['half_applied_cascades']}",
        f"  dead letters             {dl['count']} (expected {dl['expected']}; unexpected "
        f"{f['unexpected_dead_letters']}, missing {f['missing_dead_letters']})",
        f"  max delivery count (good messages) {doc['max_delivery_count_good_message']} "
        f"(failed attempts allowed {doc['max_delivery_count_allowed']}; the queue's own backstop is 10x that)"
        + "".join(f"\n    {m['deliveries']}x {m['message']}" for m in doc["most_delivered_good_messages"][:3]),
        f"  queue left               {doc['queue']}",
        "  per flow set             " + "; ".join(f"{k}: {dict(v) or 'clean'}" for k, v in doc["per_flow_set"].items()),
    ]
    for note in doc["notes"]:
        lines.append(f"  note: {note}")
    lines.append("CHAOS OK" if doc["ok"] else "CHAOS FAILED: " + ", ".join(f"{k} {v}" for k, v in f.items() if v))
    print("\n".join(lines), flush=True)


def parse_args(argv: list[str] | None = None) -> ChaosOptions:
    p = argparse.ArgumentParser(prog="python -m sandbox.chaos", description=DESCRIPTION)
    d = ChaosOptions()
    p.add_argument("--runtime", choices=("embedded", "azure"), default=d.runtime)
    p.add_argument("--flow-sets", default=",".join(d.flow_sets),
                   help=f"comma-separated, of: {', '.join(FLOW_SETS)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fault-rate", type=float, default=d.fault_rate)
    p.add_argument("--kinds", default=",".join(d.kinds), help=f"fault kinds, of: {', '.join(KINDS)}")
    p.add_argument("--kills", type=int, default=d.kills)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--signs", type=int, default=d.signs)
    p.add_argument("--work-orders", type=int, default=d.work_orders)
    p.add_argument("--changes", type=int, default=d.changes, help="sign-program records changed per round and side")
    p.add_argument("--customers", type=int, default=d.customers)
    p.add_argument("--opportunities", type=int, default=d.opportunities)
    p.add_argument("--sap-orders", type=int, default=d.sap_orders)
    p.add_argument("--client-timeout", type=float, default=d.client_timeout)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--faulted-cycles", type=int, default=d.faulted_cycles)
    p.add_argument("--token-expiry-probability", type=float, default=d.token_expiry_probability)
    p.add_argument("--max-cycles", type=int, default=d.max_cycles)
    p.add_argument("--cycle-timeout", type=float, default=d.cycle_timeout,
                   help="watchdog: seconds before a controller run that has not exited is killed and reported")
    p.add_argument("--workdir", type=Path, default=d.workdir)
    p.add_argument("--report", type=Path, default=d.report)
    a = p.parse_args(argv)
    sets = tuple(s.strip() for s in a.flow_sets.split(",") if s.strip())
    unknown = set(sets) - set(FLOW_SETS)
    if unknown:
        p.error(f"unknown flow sets {sorted(unknown)}")
    return ChaosOptions(runtime=a.runtime, flow_sets=sets, seed=a.seed, fault_rate=a.fault_rate,
                        kinds=tuple(k.strip() for k in a.kinds.split(",") if k.strip()), kills=a.kills,
                        rounds=a.rounds, signs=a.signs, work_orders=a.work_orders, changes=a.changes,
                        customers=a.customers, opportunities=a.opportunities, sap_orders=a.sap_orders,
                        client_timeout=a.client_timeout, batch_size=a.batch_size, faulted_cycles=a.faulted_cycles,
                        token_expiry_probability=a.token_expiry_probability, max_cycles=a.max_cycles,
                        cycle_timeout=a.cycle_timeout,
                        workdir=a.workdir, report=a.report)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    doc = asyncio.run(run_chaos(options))
    print_summary(doc)
    print(f"report written to {options.report}")
    return 0 if doc["ok"] else 1
