"""`make bench`: K changes over R records drained by the controller, Azure runtime beside embedded (prints figures).

The parent serves the Dataverse simulator (TLS, `--latency-ms` per request), Azurite behind
`sandbox.latency_proxy` and the local Service Bus broker (tests/sbbroker), both at `--latency-ms` per request and
per operation, so the Azure runtime pays a modelled cloud round trip rather than loopback. For each scenario
(K changes spread over R existing records, change i on record i mod R, in order) and each runtime, a child
process builds the services, queues the K ArcGIS edits and links the records (untimed), then waits for the parent
to read its counters; it then drains through `Controller.drain` (again while changes are unsettled, all timed)
and reports. The parent counts Service Bus operations at the broker and Table Storage requests at the proxy, between
the child's "ready" and "done" (the drain alone: queueing is set-up). Peak memory is the child's VmHWM; drain CPU is
the child's own CPU time during the drain (`time.process_time`: this process only, not the emulators' or the
simulators'), the floor of a runtime's speed on one core whatever the latency.

`--variant NAME:KEY=VALUE,...` adds an Azure column run with extra environment (e.g. a session setting), so the
old and new session shapes can be printed side by side in one run; `--baseline NAME` names the variant that is
today's path, for the 20x target. Issue 14's targets are printed (met or not) and kept in the report; the exit
code is 1 only for wrong results (a change dead-lettered, left on the queue, or neither written nor skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUEUE_LOCK_SECONDS = 60.0
MAX_DRAIN_CYCLES = 50
"""A drain that still leaves changes behind is repeated (timed); past this many it is a failure to report."""
FULL_CHANGES = 10_000
FULL_RECORDS = (10_000, 100)
READY, GO = "ready", "go"
SB_OPERATIONS_PER_CHANGE = 0.1
TABLE_REQUESTS_PER_CHANGE = 0.1
PEAK_RSS_MB = 300
EMBEDDED_RATIO = 3
BASELINE_RATIO = 20


# ------------------------------------------------------------------------------------------ child


def _envelopes(changes: int, records: list[Any]) -> tuple[list[Any], list[Any]]:
    """The links of `records` (ArcGIS features already linked to Dataverse signs) and `changes` field edits."""
    from shared.core.envelope import ChangeEnvelope
    from shared.core.ports import GEOMETRY_KEY, Link

    gids = [f"{{{i:08X}-0000-4000-8000-{i:012X}}}" for i in range(len(records))]
    links = [Link("sign_asset", "arcgis", gid, "dataverse", sign.key) for gid, sign in zip(gids, records, strict=True)]
    t0 = datetime(2026, 11, 20, 12, tzinfo=UTC)
    envelopes = []
    for i in range(changes):
        n = i % len(records)
        sign = records[n]
        payload = {"ASSET_TAG": sign.values["dot_assettag"], "MUTCD_CODE": sign.values["dot_mutcdcode"],
                   "SIGN_TYPE": "REG", "CONDITION": ("GOOD", "FAIR", "POOR", "DAMAGED")[i % 4],
                   "RETRO_READING": float(100 + i % 300), "DV_ID": sign.key, "EditDate": 0,
                   GEOMETRY_KEY: {"x": -8735000.0 + n, "y": 4584000.0, "spatialReference": {"wkid": 102100}}}
        envelopes.append(ChangeEnvelope(flow="sign_assets_from_field", operation="update", source_system="arcgis",
                                        source_table="SignAssets", source_key=gids[n], payload=payload,
                                        origin="bench", source_modified=t0 + timedelta(seconds=i),
                                        source_version=str(i)))
    return links, envelopes


async def _good_signs(services: Any, records: int) -> list[Any]:
    """The first `records` signs of the Dataverse simulator that map cleanly (the seeds' bad ones left out)."""
    signs: list[Any] = []
    async for page in services.sources["dataverse"].scan("dot_signassets"):
        signs.extend(page)
    signs = [s for s in signs if s.values.get("dot_mutcdcode") and s.values.get("dot_signtype") != 100000009]
    if len(signs) < records:
        raise SystemExit(f"the simulator holds {len(signs)} good signs, {records} needed")
    return signs[:records]


async def _drain(services: Any, changes: int) -> tuple[dict[str, int], dict[str, int], int, int, float]:
    """Drain cycles until every change is written, skipped or dead-lettered, or a cycle receives nothing.

    Returns statuses, dead-letter reasons, messages received, cycles and the seconds they took."""
    statuses: dict[str, int] = {}
    dead: dict[str, int] = {}
    received = cycles = 0
    started = time.perf_counter()
    while cycles < MAX_DRAIN_CYCLES:
        report = await services.controller.drain()
        cycles += 1
        received += report.received
        for key, count in report.statuses.items():
            statuses[key] = statuses.get(key, 0) + count
        for key, count in report.dead_lettered.items():
            dead[key] = dead.get(key, 0) + count
        done = sum(n for status, n in statuses.items() if status.startswith(("written", "skipped")))
        if report.received == 0 or done + sum(dead.values()) >= changes:
            break
    return statuses, dead, received, cycles, time.perf_counter() - started


async def child(changes: int, records: int) -> dict[str, Any]:
    """Queue the work, tell the parent, wait for its go, drain, and return the figures."""
    from sandbox.bench_sap import peak_rss_mb
    from shared.bootstrap import build_services

    services = build_services()
    signs = await _good_signs(services, records)
    links, envelopes = _envelopes(changes, signs)
    await services.state.put_links(links)
    for start in range(0, len(envelopes), 500):
        await services.queue.send([e.to_message() for e in envelopes[start:start + 500]])
    del envelopes, signs
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        raise SystemExit("the parent did not say go")
    before = services.counter.snapshot().get("dataverse", 0)
    cpu = time.process_time()
    statuses, dead, received, cycles, seconds = await _drain(services, changes)
    cpu = time.process_time() - cpu
    dataverse = services.counter.snapshot().get("dataverse", 0) - before
    peak = peak_rss_mb()
    depth = await services.queue.depth()
    await services.aclose()
    return {"changes": changes, "records": records, "seconds": round(seconds, 3),
            "changes_per_second": round(changes / seconds, 1) if seconds else 0.0, "cycles": cycles,
            "received": received, "statuses": statuses, "dead_lettered": dead,
            "left_on_queue": {"active": depth.active, "scheduled": depth.scheduled,
                              "dead_letter": depth.dead_letter},
            "dataverse_requests": dataverse, "dataverse_requests_per_change": round(dataverse / changes, 4),
            "cpu_ms_per_change": round(cpu * 1000 / changes, 3), "peak_rss_mb": round(peak, 1)}


# ------------------------------------------------------------------------------------------ parent


@dataclass
class Emulators:
    """Azurite behind the latency proxy and the local broker, both at the same latency; stopped by `stop()`."""

    latency_ms: float
    azurite: Any = None
    proxy: Any = None
    broker: Any = None
    stoppers: list[Any] = field(default_factory=list)

    def start(self) -> Emulators:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from sandbox.latency_proxy import LatencyProxy
        from tests.azurite import AzuriteTable, ensure_installed
        from tests.sbbroker import start_broker

        self.azurite = AzuriteTable(ensure_installed())
        self.azurite.start()
        self.stoppers.append(self.azurite.stop)
        self.proxy = LatencyProxy(self.azurite.port, latency_ms=self.latency_ms).start()
        self.stoppers.append(self.proxy.stop)
        self.broker = start_broker(latency_ms=self.latency_ms)
        self.stoppers.append(self.broker.stop)
        return self

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                stop()
            except (RuntimeError, TimeoutError) as exc:  # a slow shutdown must not hide the figures
                print(f"warning: emulator shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)
        self.stoppers.clear()

    def environment(self, max_delivery_count: int) -> dict[str, str]:
        """A fresh queue and table prefix for one run (nothing left over from the previous one)."""
        from shared.runtime.azure import azurite_connection_string

        name = f"bench-{uuid.uuid4().hex[:10]}"
        self.broker.create_queue(name, requires_session=True, lock_duration=QUEUE_LOCK_SECONDS,
                                 max_delivery_count=max_delivery_count)
        return {"SYNCLINE_RUNTIME": "azure", "SYNCLINE_INBOUND_QUEUE": name,
                "SYNCLINE_TABLES__connectionString": azurite_connection_string(self.proxy.port),
                "SYNCLINE_TABLES__tablePrefix": f"b{uuid.uuid4().hex[:12]}",
                "SYNCLINE_SERVICEBUS__connectionString": self.broker.connection_string}

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """Service Bus operations by kind and Table Storage HTTP requests by method, so far."""
        return self.broker.operations(), self.proxy.requests()


def run_child(changes: int, records: int, env: dict[str, str], emulators: Emulators | None,
              timeout: float) -> dict[str, Any]:
    """One child run; Service Bus and Table Storage counted around its drain when on the Azure runtime."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.bench_azure", "--child", "--changes", str(changes), "--records",
         str(records)], env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdin is not None
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    try:
        line = ""
        while line != READY and (raw := process.stdout.readline()):  # anything before READY is the child's noise
            line = raw.strip()
        if line != READY:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
            raise SystemExit(f"bench child ({changes} over {records}) failed before its drain (exit "
                             f"{process.returncode}); its output: {line!r}")
        before = emulators.counters() if emulators else ({}, {})
        process.stdin.write(GO + "\n")
        process.stdin.flush()
        out, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise SystemExit(f"bench child ({changes} over {records}) did not finish within {timeout:.0f} s") from None
    if process.returncode != 0:
        raise SystemExit(f"bench child ({changes} over {records}) failed with exit code {process.returncode}")
    figures = dict(json.loads(out.strip().splitlines()[-1]))
    if emulators:
        after = emulators.counters()
        operations, requests = (_delta(later, earlier) for later, earlier in zip(after, before, strict=True))
        # a connection is not a round trip of its own here: its CBS put-token and attaches are counted
        figures["servicebus_operations"] = sum(n for kind, n in operations.items() if kind != "connect")
        figures["servicebus_operations_by_kind"] = operations
        figures["table_requests"] = sum(requests.values())
        figures["table_requests_by_method"] = requests
        figures["servicebus_operations_per_change"] = round(figures["servicebus_operations"] / changes, 4)
        figures["table_requests_per_change"] = round(figures["table_requests"] / changes, 4)
    return figures


def _delta(later: dict[str, int], earlier: dict[str, int]) -> dict[str, int]:
    return {key: later[key] - earlier.get(key, 0) for key in sorted(later) if later[key] != earlier.get(key, 0)}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME:KEY=VALUE,KEY=VALUE` -> (NAME, {KEY: VALUE})."""
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"a variant is NAME:KEY=VALUE[,KEY=VALUE...], not {text!r}")
    values = {}
    for pair in rest.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{pair!r} in variant {name!r} is not KEY=VALUE")
        values[key.strip()] = value
    return name, values


def _record_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--records takes numbers separated by commas, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--records needs at least one positive number")
    return counts


ROWS = (("changes/second", "changes_per_second"), ("seconds", "seconds"), ("drain cycles", "cycles"),
        ("SB operations/change", "servicebus_operations_per_change"),
        ("Table requests/change", "table_requests_per_change"),
        ("Dataverse requests/change", "dataverse_requests_per_change"), ("dead-lettered", "dead"),
        ("left on queue", "left"), ("drain CPU (ms/change)", "cpu_ms_per_change"), ("peak RSS (MB)", "peak_rss_mb"))


def _cell(figures: dict[str, Any], key: str) -> str:
    if key == "dead":
        return str(sum(figures["dead_lettered"].values()))
    if key == "left":
        return str(figures["left_on_queue"]["active"] + figures["left_on_queue"]["scheduled"])
    value = figures.get(key)
    return "-" if value is None else str(value)


def print_table(scenario: str, columns: dict[str, dict[str, Any]]) -> None:
    print(f"\n{scenario}")
    print(f"{'':28}" + "".join(f"{name:>16}" for name in columns))
    for label, key in ROWS:
        print(f"{label:28}" + "".join(f"{_cell(figures, key):>16}" for figures in columns.values()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=200, help="changes per scenario (default 200)")
    parser.add_argument("--records", type=_record_counts, default=[200, 2],
                        help="records the changes are spread over, one scenario each (default 200,2)")
    parser.add_argument("--full", action="store_true",
                        help=f"the issue's sizes: {FULL_CHANGES} changes over {FULL_RECORDS[0]} and over "
                             f"{FULL_RECORDS[1]} records")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="per Dataverse request, Table Storage request and Service Bus operation (default 20)")
    parser.add_argument("--runtimes", default="embedded,azure", help="which runtimes (default embedded,azure)")
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        help="an extra Azure column NAME:KEY=VALUE,... run with that environment added")
    parser.add_argument("--baseline", default="",
                        help="the variant that stands for today's path, for the 20x target (e.g. one whose "
                             "environment restores one session per record)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per child run")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "bench-azure.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true",
                        help=f"peak memory of drains of --memory-sizes changes over --memory-records records, per "
                             f"runtime, no latency (issue 14: the largest <= {MEMORY_RATIO}x the smallest, "
                             f"< {PEAK_RSS_MB} MB)")
    parser.add_argument("--memory-sizes", type=_record_counts, default=list(MEMORY_SIZES),
                        help="drain sizes for --memory (default 10000,100000)")
    parser.add_argument("--memory-records", type=int, default=MEMORY_RECORDS,
                        help=f"records the --memory changes are spread over (default {MEMORY_RECORDS})")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(asyncio.run(memory_child(args.changes, args.records[0]))))
        return 0
    if args.memory:
        return memory_main(args.memory_sizes, args.memory_records,
                           [r.strip() for r in args.runtimes.split(",") if r.strip()], args.timeout,
                           args.report if args.report != ROOT / "reports" / "bench-azure.json"
                           else ROOT / "reports" / "bench-memory.json")
    if args.full:
        args.changes, args.records = FULL_CHANGES, list(FULL_RECORDS)
    if args.child:
        print(json.dumps(asyncio.run(child(args.changes, args.records[0]))))
        return 0
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not set(runtimes) <= {"embedded", "azure"} or not runtimes:
        parser.error("--runtimes takes embedded and/or azure")
    if args.baseline and args.baseline not in {name for name, _ in args.variant}:
        parser.error(f"--baseline {args.baseline!r} is not one of the --variant names")

    from sandbox import dataverse as dvs
    from sandbox.bench import dataverse_only_environment
    from sandbox.dataverse import seed_dataverse
    from sandbox.server import RunningServer, TestCA
    from shared.settings import queue_max_delivery_count

    scenarios: dict[str, dict[str, dict[str, Any]]] = {}
    targets: dict[str, dict[str, bool]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ca = TestCA.create(Path(tmp) / "tls")
        sim = dvs.DataverseSimulator(latency_ms=args.latency_ms)
        seed_dataverse(sim, signs=max(args.records), work_orders=0)
        server = RunningServer(sim.app, ca=ca).start()
        emulators = Emulators(args.latency_ms).start() if "azure" in runtimes or args.variant else None
        base = {**os.environ, **dataverse_only_environment(str(ca.ca_path), server.url)}
        max_count = queue_max_delivery_count(int(base.get("SYNCLINE_MAX_DELIVERY_COUNT", "10")))
        print(f"{args.latency_ms:.0f} ms per Dataverse request, Table Storage request and Service Bus operation; "
              f"{args.changes} changes over {', '.join(map(str, args.records))} records; runtimes: "
              f"{', '.join(runtimes + [name for name, _ in args.variant])}", flush=True)
        try:
            for records in args.records:
                scenario = f"{args.changes} changes over {records} records"
                columns: dict[str, dict[str, Any]] = {}
                runs: list[tuple[str, dict[str, str]]] = [(r, {}) for r in runtimes]
                runs += [(name, extra) for name, extra in args.variant]
                for name, extra in runs:
                    env = {**base, "SYNCLINE_STATE_DIR": str(Path(tmp) / f"{name}-{records}")}
                    azure = name != "embedded"
                    if azure:
                        assert emulators is not None
                        env.update(emulators.environment(max_count))
                    env.update(extra)
                    print(f"  {scenario}: {name} ...", flush=True)
                    columns[name] = run_child(args.changes, records, env, emulators if azure else None,
                                              args.timeout)
                    columns[name]["environment"] = extra
                scenarios[scenario] = columns
                print_table(scenario, columns)
                targets[scenario] = _targets(columns, args.baseline)
                for name, met in targets[scenario].items():
                    print(f"target {name}: {'met' if met else 'NOT met'}")
        finally:
            if emulators is not None:
                emulators.stop()
            server.stop()
            sim.close()
    problems = [f"{scenario}, {name}: {what}" for scenario, columns in scenarios.items()
                for name, figures in columns.items()
                for what in _problems(figures)]
    for problem in problems:
        print(f"problem: {problem}")
    out = args.report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m sandbox.bench_azure " + " ".join(sys.argv[1:] if argv is None else argv),
        "latency_ms": args.latency_ms, "changes": args.changes, "records": args.records,
        "wall_seconds": round(time.perf_counter() - started, 1), "scenarios": scenarios, "targets": targets,
        "problems": problems,
    }, indent=2))
    print(f"figures written to {out}")
    return 1 if problems else 0


def _targets(columns: dict[str, dict[str, Any]], baseline: str) -> dict[str, bool]:
    """Issue 14's targets (set for 10,000 changes at 20 ms; printed at every size, met or not)."""
    azure, embedded = columns.get("azure"), columns.get("embedded")
    if azure is None:
        return {}
    found = {
        f"Service Bus operations/change <= {SB_OPERATIONS_PER_CHANGE}":
            azure["servicebus_operations_per_change"] <= SB_OPERATIONS_PER_CHANGE,
        f"Table Storage requests/change <= {TABLE_REQUESTS_PER_CHANGE}":
            azure["table_requests_per_change"] <= TABLE_REQUESTS_PER_CHANGE,
        f"azure peak RSS < {PEAK_RSS_MB} MB": azure["peak_rss_mb"] < PEAK_RSS_MB,
    }
    if embedded is not None:
        found[f"azure within {EMBEDDED_RATIO}x of embedded"] = (
            azure["changes_per_second"] * EMBEDDED_RATIO >= embedded["changes_per_second"])
    if baseline in columns:
        found[f"azure >= {BASELINE_RATIO}x {baseline}"] = (
            azure["changes_per_second"] >= BASELINE_RATIO * columns[baseline]["changes_per_second"])
    return found


def _problems(figures: dict[str, Any]) -> list[str]:
    """What makes a run wrong rather than slow: changes dead-lettered or left behind (every change is good)."""
    found = []
    if sum(figures["dead_lettered"].values()) or figures["left_on_queue"]["dead_letter"]:
        found.append(f"dead-lettered {figures['dead_lettered']} (dead-letter queue: "
                     f"{figures['left_on_queue']['dead_letter']})")
    left = figures["left_on_queue"]["active"] + figures["left_on_queue"]["scheduled"]
    if left:
        found.append(f"{left} changes left on the queue after {figures['cycles']} cycles")
    done = sum(n for status, n in figures["statuses"].items() if status.startswith(("written", "skipped")))
    if done < figures["changes"]:
        found.append(f"only {done} of {figures['changes']} changes written or skipped: {figures['statuses']}")
    return found


# ----------------------------------------------------------------------------------------- memory

MEMORY_SIZES = (10_000, 100_000)
MEMORY_RECORDS = 1_000
MEMORY_RATIO = 1.2
"""Issue 14: the peak memory of a 100,000-message drain is at most this times a 10,000-message drain's."""


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux: `5` into clear_refs), so the drain's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def memory_child(changes: int, records: int) -> dict[str, Any]:
    """Queue `changes` edits over `records` records in chunks (set-up memory stays flat), then drain them all
    and report the drain's peak RSS (VmHWM reset after the set-up) beside the RSS it started from."""
    from shared.bootstrap import build_services

    services = build_services()
    signs = await _good_signs(services, records)
    links, first = _envelopes(len(signs), signs)
    await services.state.put_links(links)
    chunk = 1_000
    for start in range(0, changes, chunk):
        # The throughput bench's edits (change i on record i mod R, version i), built a chunk at a time.
        envelopes = [first[i % records].model_copy(update={
            "source_version": str(i), "source_modified": first[0].source_modified + timedelta(seconds=i),
            "payload": {**first[i % records].payload, "CONDITION": ("GOOD", "FAIR", "POOR", "DAMAGED")[i % 4],
                        "RETRO_READING": float(100 + i % 300)}})
            for i in range(start, min(start + chunk, changes))]
        await services.queue.send([e.to_message() for e in envelopes])
        del envelopes
    del signs, links, first
    import gc

    gc.collect()
    before_mb = _rss_kb("VmRSS") / 1024
    reset = _reset_peak_rss()
    statuses, dead, received, cycles, seconds = await _drain(services, changes)
    peak_mb = _rss_kb("VmHWM") / 1024
    depth = await services.queue.depth()
    await services.aclose()
    return {"changes": changes, "records": records, "seconds": round(seconds, 1),
            "changes_per_second": round(changes / seconds, 1) if seconds else 0.0, "cycles": cycles,
            "received": received, "statuses": statuses, "dead_lettered": dead,
            "left_on_queue": {"active": depth.active, "scheduled": depth.scheduled, "dead_letter": depth.dead_letter},
            "rss_before_drain_mb": round(before_mb, 1), "drain_peak_rss_mb": round(peak_mb, 1),
            "peak_is_the_drains_own": reset}


def memory_main(sizes: Sequence[int], records: int, runtimes: Sequence[str], timeout: float, report: Path) -> int:
    """Peak memory of a drain of each size, per runtime, side by side, and the issue's ratio and ceiling."""
    from sandbox import dataverse as dvs
    from sandbox.bench import dataverse_only_environment
    from sandbox.dataverse import seed_dataverse
    from sandbox.server import RunningServer, TestCA
    from shared.settings import queue_max_delivery_count

    started = time.perf_counter()
    columns: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ca = TestCA.create(Path(tmp) / "tls")
        sim = dvs.DataverseSimulator(latency_ms=0)
        seed_dataverse(sim, signs=records + 10, work_orders=0)
        server = RunningServer(sim.app, ca=ca).start()
        emulators = Emulators(0).start() if "azure" in runtimes else None
        base = {**os.environ, **dataverse_only_environment(str(ca.ca_path), server.url),
                "SYNCLINE_EMULATOR_LATENCY_MS": "0"}
        max_count = queue_max_delivery_count(int(base.get("SYNCLINE_MAX_DELIVERY_COUNT", "10")))
        print(f"memory: drains of {', '.join(map(str, sizes))} changes over {records} records, no latency; "
              f"runtimes: {', '.join(runtimes)}", flush=True)
        try:
            for runtime in runtimes:
                for size in sizes:
                    env = {**base, "SYNCLINE_STATE_DIR": str(Path(tmp) / f"{runtime}-{size}")}
                    if runtime == "azure":
                        assert emulators is not None
                        env.update(emulators.environment(max_count))
                    print(f"  {runtime}, {size} changes ...", flush=True)
                    columns[f"{runtime} {size}"] = _memory_child_run(size, records, env, timeout)
        finally:
            if emulators is not None:
                emulators.stop()
            server.stop()
            sim.close()
    rows = (("drain peak RSS (MB)", "drain_peak_rss_mb"), ("RSS before the drain (MB)", "rss_before_drain_mb"),
            ("seconds", "seconds"), ("changes/second", "changes_per_second"), ("drain cycles", "cycles"),
            ("dead-lettered", "dead"), ("left on queue", "left"))
    print(f"\n{'':28}" + "".join(f"{name:>18}" for name in columns))
    for label, key in rows:
        print(f"{label:28}" + "".join(f"{_cell(figures, key):>18}" for figures in columns.values()))
    targets: dict[str, bool] = {}
    small, large = min(sizes), max(sizes)
    for runtime in runtimes:
        low, high = columns[f"{runtime} {small}"], columns[f"{runtime} {large}"]
        ratio = high["drain_peak_rss_mb"] / low["drain_peak_rss_mb"]
        print(f"{runtime}: peak of {large} / peak of {small} = {ratio:.2f}")
        targets[f"{runtime}: {large} peak <= {MEMORY_RATIO}x {small} peak"] = ratio <= MEMORY_RATIO
        targets[f"{runtime}: {large} peak < {PEAK_RSS_MB} MB"] = high["drain_peak_rss_mb"] < PEAK_RSS_MB
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    problems = [f"{name}: {what}" for name, figures in columns.items() for what in _problems(figures)]
    for problem in problems:
        print(f"problem: {problem}")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "command": "python -m sandbox.bench_azure --memory " + " ".join(sys.argv[2:]),
        "wall_seconds": round(time.perf_counter() - started, 1), "columns": columns, "targets": targets,
        "problems": problems}, indent=2))
    print(f"figures written to {report}")
    return 1 if problems else 0


def _memory_child_run(changes: int, records: int, env: dict[str, str], timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sandbox.bench_azure", "--memory-child", "--changes", str(changes), "--records",
             str(records)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"memory child ({changes} changes) did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise SystemExit(f"memory child ({changes} changes) failed with exit code {done.returncode}: "
                         f"{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    raise SystemExit(main())
