"""Crash-and-fault proof: faults on every simulator, the controller killed mid-drain, then record-by-record checks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandbox import demo
from sandbox.dataverse_seed import seed_dataverse
from sandbox.faults import KINDS, FaultPlan, expire_all_tokens

ROOT = Path(__file__).resolve().parent.parent
FLOW_SETS = {"signs": "dot-signs.yaml", "lead-to-cash": "fno-salesforce.yaml", "customer-360": "customer-360.yaml",
             "sap": "sap.yaml"}
QUEUE = "syncline-inbound"
MAX_DELIVERY_COUNT = 10


@dataclass
class ChaosOptions:
    """Everything a run varies; the CLI maps one option to each field."""

    runtime: str = "embedded"
    flow_sets: tuple[str, ...] = tuple(FLOW_SETS)
    seed: int = 2026
    fault_rate: float = 0.2
    kinds: tuple[str, ...] = KINDS
    kills: int = 6
    rounds: int = 2
    signs: int = 300
    work_orders: int = 80
    changes: int = 300
    """Records changed per round and side in the sign program (other sets scale from it)."""
    customers: int = 40
    opportunities: int = 30
    sap_orders: int = 8
    client_timeout: float = 1.5
    """Read timeout of Syncline's API calls; a `timeout` fault holds a request one second longer."""
    lock_seconds: float = 6.0
    batch_size: int = 100
    faulted_cycles: int = 2
    """Full controller cycles with faults still on after the kills of each drain."""
    token_expiry_probability: float = 0.5
    """Chance per controller run that every simulator's tokens expire at a random moment of it."""
    max_cycles: int = 40
    cycle_timeout: float = 600.0
    workdir: Path = Path(".syncline/chaos")
    report: Path = Path("reports/chaos-report.json")
    quiet: bool = True


@dataclass
class Figures:
    """What the run did and what it found (the printed summary and the JSON report)."""

    activity: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    kills_with_locked_messages: int = 0
    kill_attempts: int = 0
    controller_runs: int = 0
    controller_failures: int = 0
    token_expiries: int = 0
    deliveries: dict[int, int] = field(default_factory=dict)
    """Sequence number -> highest delivery count seen for that message."""
    notes: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    hung: int = 0
    cycle_errors: Counter[str] = field(default_factory=Counter)
    """Why controller cycles ended "failed" (digits masked), with counts."""
    notes_once: set[str] = field(default_factory=set)


# ------------------------------------------------------------------------------------------ queue probe


class QueueProbe:
    """Reads and nudges the queue from outside Syncline: delivery counts, locks, scheduled messages."""

    def __init__(self, box: demo.Sandbox, figures: Figures) -> None:
        self.box = box
        self.figures = figures
        self.path = box.workdir / "state" / "queue.db"
        self.what: dict[int, str] = {}
        """sequence number -> "flow key" of the messages seen, to name the most delivered ones."""
        if box.broker is not None:
            self._hook_broker()

    # The embedded queue keeps a delivery count per row and deletes the row on completion; a trigger keeps the
    # highest count of every message, exactly, whoever delivered it.
    def install(self) -> None:
        if self.box.broker is not None:
            return
        with sqlite3.connect(self.path, timeout=30) as conn:
            conn.executescript("""
            CREATE TABLE IF NOT EXISTS chaos_deliveries (seq INTEGER PRIMARY KEY, max_count INTEGER NOT NULL,
                                                         properties TEXT);
            CREATE TRIGGER IF NOT EXISTS chaos_delivery_count AFTER UPDATE OF delivery_count ON queue_messages
            BEGIN
              INSERT INTO chaos_deliveries (seq, max_count, properties)
              VALUES (NEW.seq, NEW.delivery_count, NEW.properties)
              ON CONFLICT (seq) DO UPDATE SET max_count = max(max_count, excluded.max_count);
            END;
            """)

    def _hook_broker(self) -> None:
        broker = self.box.broker
        deliveries = self.figures.deliveries

        def hook() -> None:
            queue = broker._broker.queues[QUEUE]
            original = queue.lock

            def lock(message: Any, consumer: Any, now: float) -> Any:
                token = original(message, consumer, now)
                seq = message.sequence_number
                deliveries[seq] = max(deliveries.get(seq, 0), message.delivery_count)
                self.what[seq] = f"session {message.session_id}"  # the broker keeps the message encoded
                return token

            queue.lock = lock

        broker._call(hook)

    def read_deliveries(self) -> dict[int, int]:
        if self.box.broker is None:
            with sqlite3.connect(self.path, timeout=30) as conn:
                rows = conn.execute("SELECT seq, max_count, properties FROM chaos_deliveries").fetchall()
            self.figures.deliveries = {int(s): int(c) for s, c, _ in rows}
            for s, _, props in rows:
                with contextlib.suppress(ValueError, TypeError):
                    p = json.loads(props)
                    # a change names its flow and record; a poll hint its system and table
                    self.what[int(s)] = (f"{p.get('flow') or p.get('kind', '?')} "
                                         f"{p.get('key') or p.get('system', '?') + ' ' + p.get('table', '?')}")
        return dict(self.figures.deliveries)

    def locked(self) -> int:
        """Messages under a lock right now (a kill with some is a kill mid-drain)."""
        if self.box.broker is not None:
            return int(self.box.broker._call(lambda: sum(
                1 for m in self.box.broker._broker.queues[QUEUE].active.values() if m.lock_token is not None)))
        now = int(time.time() * 1_000_000)
        with sqlite3.connect(self.path, timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM queue_messages WHERE entity = ? AND locked_until_us > ?",
                                    (QUEUE, now)).fetchone()[0])

    def release(self) -> None:
        """Let time pass: the dead controller's locks expire and scheduled messages (parent waits) come due."""
        if self.box.broker is not None:
            self.box.broker.advance(3600)
            return
        now = int(time.time() * 1_000_000)
        with sqlite3.connect(self.path, timeout=30) as conn:
            conn.execute("UPDATE queue_messages SET locked_until_us = ? WHERE entity = ? AND locked_until_us > ?",
                         (now - 1, QUEUE, now))
            conn.execute("UPDATE queue_messages SET visible_us = ? WHERE entity = ? AND visible_us > ?",
                         (now - 1, QUEUE, now))

    def depth(self) -> tuple[int, int]:
        """(active, scheduled) main-queue messages."""
        if self.box.broker is not None:
            broker = self.box.broker

            def count() -> tuple[int, int]:
                queue = broker._broker.queues[QUEUE]
                now = broker.clock.now() if callable(getattr(broker.clock, "now", None)) else time.time()
                scheduled = sum(1 for m in queue.active.values() if m.visible_at > now)
                return len(queue.active) - scheduled, scheduled

            return broker._call(count)  # type: ignore[no-any-return]
        now = int(time.time() * 1_000_000)
        with sqlite3.connect(self.path, timeout=30) as conn:
            active, scheduled = conn.execute(
                "SELECT sum(visible_us <= ?), sum(visible_us > ?) FROM queue_messages WHERE entity = ?",
                (now, now, QUEUE)).fetchone()
        return int(active or 0), int(scheduled or 0)


# ------------------------------------------------------------------------------------------ webhooks


async def flush(box: demo.Sandbox, figures: Figures) -> None:
    """Wait until every simulator delivered what it queued; each sender retries as its real service does, and a
    delivery it gives up on is counted (the change may still arrive by a change-feed poll)."""
    for _ in range(3):  # deliveries cause writes that cause deliveries
        await box.dv.flush_webhooks(timeout=300)
        await box.ag.flush_webhooks(timeout=300)
        if box.fno is not None:
            await box.fno.flush_events(timeout=300)
        if box.sf is not None:
            try:
                await asyncio.to_thread(box.sf.flush_events, 300)
            except Exception as exc:  # the simulator stops its batch at the first refused event
                figures.refused["salesforce"] += 1
                figures.notes_once.add(f"salesforce CDC delivery refused: {type(exc).__name__}: {str(exc)[:120]}")
        if box.sap is not None:
            await box.sap.flush_events(timeout=300)


def refused_deliveries(box: demo.Sandbox, figures: Figures) -> dict[str, int]:
    """Webhook and event deliveries each simulator finally gave up on (after its own retries)."""
    out = {"dataverse": len(box.dv.webhook_failures),
           "arcgis": sum(1 for d in box.ag.webhook_deliveries if d.status is None or d.status >= 300)}
    if box.fno is not None:
        out["fno"] = len(box.fno.event_failures)
    if box.sap is not None:
        out["sap"] = len(box.sap.event_failures)
    if box.sf is not None:
        out["salesforce"] = figures.refused["salesforce"]
    return out


# ------------------------------------------------------------------------------------------ activity


def _pick(rng: random.Random, rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return rng.sample(rows, min(max(n, 0), len(rows)))


def office_activity(box: demo.Sandbox, rng: random.Random, n: int, rnd: int, activity: Counter[str]) -> None:
    """Office users in Dynamics: sign edits, new work orders with tasks and assignments, closed work orders."""
    signs = [s for s in box.dv.all("dot_signassets") if s.get("dot_arcgisglobalid")]
    for sign in _pick(rng, signs, n // 4):
        route = str(sign["dot_route"]).split(" ")[0]
        box.dv.apply_change("dot_signassets", {"dot_route": f"{route} R{rnd}"}, key=sign["dot_signassetid"])
        activity["office sign edits"] += 1
    # Closing work orders that existed before this round (the cascade closes their tasks on both sides).
    open_wos = [w for w in box.dv.all("dot_workorders") if w.get("dot_status") == 100000000
                and w.get("dot_arcgisglobalid")]
    for row in _pick(rng, open_wos, n // 25):
        box.dv.apply_change("dot_workorders", {"dot_status": 100000003}, key=row["dot_workorderid"])
        activity["office closed work orders"] += 1
    for k in range(max(1, n // 30)):
        sign = rng.choice(signs)
        demo.raise_knockdown(box, sign, f"WO-C{rnd:02d}-{k:05d}")
        activity["office new work orders"] += 1
        activity["office new work-order tasks"] += 2
        activity["office new field assignments"] += 1


def field_activity(box: demo.Sandbox, rng: random.Random, n: int, rnd: int, activity: Counter[str]) -> None:
    """Crews in ArcGIS: condition updates, completed and closed work orders (cascades), assignments, Survey123."""
    ag = box.ag
    signs = [s for s in ag.all("SignAssets") if s.get("DV_ID")]
    for feature in _pick(rng, signs, n // 3):
        ag.field_edit("SignAssets", feature["GlobalID"],
                      {"CONDITION": rng.choice(["GOOD", "FAIR", "POOR", "DAMAGED"]),
                       "RETRO_READING": round(rng.uniform(40, 400), 1),
                       "LAST_INSPECTED": int(datetime(2026, 11, 20, 15, rnd % 60, tzinfo=UTC).timestamp() * 1000)},
                      user="crew07")
        activity["field sign condition updates"] += 1
    open_wos = [w for w in ag.all("WorkOrders") if w.get("STATUS") in ("OPEN", "IN_PROGRESS") and w.get("DV_ID")]
    for wo in _pick(rng, open_wos, n // 12):
        status = rng.choice(["COMPLETED", "CLOSED"])
        ag.field_edit("WorkOrders", wo["GlobalID"], {"STATUS": status, "COMPLETION_NOTES": "Replaced and verified"},
                      user="crew02")
        activity["field work orders completed or closed"] += 1
    assignments = [a for a in ag.all("Assignments") if a.get("status") in (0, 1) and a.get("DV_ID")]
    for asg in _pick(rng, assignments, n // 12):
        ag.field_edit("Assignments", asg["GlobalID"], {"status": 2}, user="crew05")
        activity["field assignment status changes"] += 1
    photo = demo._tiny_jpeg()
    for sign in _pick(rng, signs, n // 6):
        ag.survey123_submit({"INSPECTION_DATE": int(datetime(2026, 11, 21, 10, tzinfo=UTC).timestamp() * 1000),
                             "INSPECTOR": rng.choice(["J. Alvarez", "K. Osei", "M. Chen"]),
                             "CONDITION": rng.choice(["GOOD", "FAIR", "POOR"]),
                             "RETRO_READING": round(rng.uniform(40, 400), 1),
                             "NOTES": f"Chaos round {rnd}", "ASSET_GUID": sign["GlobalID"]},
                            geometry=sign.get("@geometry") or sign.get("geometry"),
                            attachments=[("photo.jpg", "image/jpeg", photo)])
        activity["Survey123 inspections"] += 1
    if rnd == 0:
        ag.survey123_submit({"INSPECTION_DATE": int(datetime(2026, 11, 21, 11, tzinfo=UTC).timestamp() * 1000),
                             "INSPECTOR": None, "CONDITION": "POOR", "NOTES": "inspector left blank",
                             "ASSET_GUID": signs[0]["GlobalID"]}, geometry=signs[0].get("@geometry"), attachments=[])
        activity["Survey123 inspections (deliberately bad)"] += 1


def fno_activity(box: demo.Sandbox, rng: random.Random, n: int, rnd: int, activity: Counter[str]) -> None:
    """Finance renames customers in F&O (business events to Salesforce)."""
    from sandbox.fno import UNMAPPED_CURRENCY

    customers = [c for c in box.fno.all("CustomersV3") if c["SalesCurrencyCode"] != UNMAPPED_CURRENCY]
    for customer in _pick(rng, customers, n):
        base = str(customer["OrganizationName"]).split(" #")[0]
        box.fno.apply_change("CustomersV3", (customer["dataAreaId"], customer["CustomerAccount"]),
                             {"OrganizationName": f"{base} #{rnd}"})
        activity["F&O customer renames"] += 1


def sap_activity(box: demo.Sandbox, rng: random.Random, rnd: int, activity: Counter[str]) -> None:
    """SAP stock and price changes."""
    for material in list(box.sap.customizing.materials)[:3]:
        box.sap.set_stock(material, "1710", float(rng.randrange(10, 500)))
        activity["SAP stock changes"] += 1
    first = next(iter(box.sap.customizing.materials))
    box.sap.set_price(first, 1000.0 + rnd)
    activity["SAP price changes"] += 1


# ------------------------------------------------------------------------------------------ the controller


class Chaos:
    """One run: sandbox, activity rounds, controller runs killed at random moments, verification."""

    def __init__(self, options: ChaosOptions) -> None:
        self.o = options
        self.rng = random.Random(options.seed)
        self.plan = FaultPlan(rate=0.0, seed=options.seed + 1, kinds=options.kinds,
                              timeout_seconds=options.client_timeout + 1.0)
        self.figures = Figures()
        self.box: demo.Sandbox | None = None
        self.probe: QueueProbe | None = None
        self.env: dict[str, str] = {}
        self.cascade_baseline: set[str] = set()

    @property
    def sets(self) -> set[str]:
        return set(self.o.flow_sets)

    def sims(self) -> list[Any]:
        assert self.box is not None
        return [self.box.dv, self.box.ag, self.box.fno, self.box.sf, self.box.sap]

    async def run_controller(self, *, kill_after_calls: int | None = None, poll: bool = True,
                             ) -> dict[str, Any] | None:
        """One `syncline run` in a subprocess; SIGKILL once the simulators have served `kill_after_calls` more
        calls. Returns the cycle report, or None when killed (or when it printed none)."""
        assert self.box is not None
        assert self.probe is not None
        figures = self.figures
        figures.controller_runs += 1
        before = self.plan.total_calls()
        expire_at = (before + self.rng.randint(1, 400)
                     if self.plan.rate > 0 and self.rng.random() < self.o.token_expiry_probability else None)
        out_path = self.box.workdir / f"controller-{figures.controller_runs}.out"
        err_path = self.box.workdir / f"controller-{figures.controller_runs}.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            command = [sys.executable, "-m", "shared.cli", "run", *([] if poll else ["--no-poll"])]
            proc = subprocess.Popen(command, cwd=ROOT, env=self.env,
                                    stdout=out, stderr=err)
            deadline = time.monotonic() + self.o.cycle_timeout
            killed = hung = False
            try:
                while proc.poll() is None:
                    calls = self.plan.total_calls()
                    if expire_at is not None and calls >= expire_at:
                        expire_all_tokens(self.sims())
                        figures.token_expiries += 1
                        expire_at = None
                    if time.monotonic() > deadline:
                        active, scheduled = self.probe.depth()
                        evidence = (f"queue active {active}, scheduled {scheduled}, locked {self.probe.locked()}, "
                                    f"simulator calls during the run {self.plan.total_calls() - before}")
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=30)
                        figures.hung += 1
                        figures.notes.append(f"controller run {figures.controller_runs} "
                                             f"({'drain only' if not poll else 'full cycle'}) made no exit in "
                                             f"{self.o.cycle_timeout:.0f}s and was killed by the watchdog ({evidence})")
                        killed = hung = True
                        break
                    if kill_after_calls is not None and calls >= before + kill_after_calls:
                        # Past the call count, the kill waits for a batch under lock: a kill mid-drain, not
                        # mid-poll (the probe is read at most every 20 ms).
                        locked = self.probe.locked()
                        if not locked:
                            await asyncio.sleep(0.02)
                            continue
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=30)
                        killed = True
                        figures.kills += 1
                        figures.kills_with_locked_messages += locked > 0
                        break
                    await asyncio.sleep(0.005)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        await flush(self.box, self.figures)
        self.probe.release()
        if hung:
            return {"outcome": "hung"}
        if killed:
            return None
        if proc.returncode not in (0, 1):
            figures.controller_failures += 1
            figures.notes.append(f"controller run {figures.controller_runs} exited {proc.returncode}: "
                                 f"{err_path.read_text(errors='replace')[-400:]}")
        text = out_path.read_text(errors="replace")
        start = text.find("{")
        try:
            report: dict[str, Any] = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            return None
        if report.get("outcome") != "ok":
            figures.controller_failures += 1
            error = str(report.get("error") or "?")
            figures.cycle_errors[re.sub(r"\d+", "N", error.split("(")[0].split(":  ")[0])[:90].strip()] += 1
        return report

    async def drain(self, kills: int) -> None:
        """Kills mid-drain, then full cycles with faults on, then faults off until the queue is empty."""
        assert self.probe is not None
        rate = self.o.fault_rate
        self.plan.rate = rate
        calls_per_run = 40
        done = 0
        attempts = 0
        while done < kills and attempts < kills * 4:
            attempts += 1
            self.figures.kill_attempts += 1
            active, scheduled = self.probe.depth()
            if active + scheduled == 0 and attempts > 1:
                break  # nothing left to drain: a kill now would not be mid-drain
            before, kills_before = self.plan.total_calls(), self.figures.kills
            # Drain-only runs: under faults a full cycle often ends in its poll (see the report's notes), and the
            # kills are meant for the drain.
            report = await self.run_controller(kill_after_calls=self.rng.randint(3, max(4, calls_per_run)),
                                               poll=False)
            if self.figures.kills > kills_before:
                done += 1
            elif report is not None:
                calls_per_run = max(4, (self.plan.total_calls() - before) // 2)
        for _ in range(self.o.faulted_cycles):
            await self.run_controller()
        self.plan.rate = 0.0
        for _ in range(self.o.max_cycles):
            report = await self.run_controller()
            active, scheduled = self.probe.depth()
            if report is not None and active == 0 and scheduled == 0 and report.get("received", 1) == 0 \
                    and report.get("polled", 1) == 0:
                break
        else:
            self.figures.notes.append(f"queue not empty after {self.o.max_cycles} fault-free cycles")
        self.plan.rate = rate

    # ---------------------------------------------------------------------------------------- the run

    def _flows_dir(self, workdir: Path) -> Path:
        target = workdir / "flows"
        target.mkdir(parents=True, exist_ok=True)
        for name in self.o.flow_sets:
            shutil.copy(ROOT / "flows" / FLOW_SETS[name], target / FLOW_SETS[name])
        return target

    async def run(self) -> dict[str, Any]:
        from shared.bootstrap import build_services
        from shared.intake import initial_load
        from shared.settings import Settings

        o = self.o
        started = time.monotonic()
        if o.quiet:
            logging.getLogger("shared").setLevel(logging.CRITICAL)
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        sales = bool(self.sets & {"lead-to-cash", "customer-360"})
        sap = "sap" in self.sets
        workdir = o.workdir.resolve()
        box = demo.start_sandbox(workdir, runtime=o.runtime, sales=sales, sap=sap, faults=self.plan)
        self.box = box
        try:
            flows = self._flows_dir(workdir)
            box.env.update({
                "SYNCLINE_FLOWS": str(flows), "SYNCLINE_HTTP_TIMEOUT_SECONDS": str(o.client_timeout),
                "SYNCLINE_LOCK_SECONDS": str(o.lock_seconds), "SYNCLINE_BATCH_SIZE": str(o.batch_size),
                "SYNCLINE_MAX_DELIVERY_COUNT": str(MAX_DELIVERY_COUNT),
            })
            self.env = {**os.environ, **box.env}
            with demo.environment(box.env):
                if "signs" in self.sets:
                    seeded = seed_dataverse(box.dv, signs=o.signs, work_orders=o.work_orders)
                    self.figures.activity["seeded sign-program records"] = sum(
                        v for k, v in seeded.items() if k != "bad_signs" and isinstance(v, int))
                if sales:
                    demo.seed_sales_side(box, o.customers)
                if sap:
                    demo.seed_sap_side(box)
                demo.start_host(box)
                services = build_services(Settings())
                try:
                    services.controller.parent_wait_seconds = 0.2
                    self.probe = QueueProbe(box, self.figures)
                    self.probe.install()
                    load = await initial_load(services)
                    self.figures.activity["initial load written"] = load.written
                    await flush(box, self.figures)
                    await demo.settle(services, box, [], limit=20)
                    if "signs" in self.sets:
                        # Seeded work orders may be closed with open tasks (no change, no cascade): only
                        # cascades that the run's changes set off count.
                        self.cascade_baseline = {h["task"] for h in half_applied_cascades(box)}
                finally:
                    await services.aclose()
                await self.rounds()
                return await self.verify(time.monotonic() - started)
        finally:
            box.stop()

    async def rounds(self) -> None:
        """Activity with faults on, each step drained through killed and faulted controller runs."""
        box, o, rng, act = self.box, self.o, self.rng, self.figures.activity
        assert box is not None

        def first(rnd: int) -> None:
            if "signs" in self.sets:
                office_activity(box, rng, o.changes, rnd, act)
                field_activity(box, rng, o.changes, rnd, act)
            if "lead-to-cash" in self.sets:
                demo.sales_activity(box, act)
                demo.lead_to_cash_activity(box, act, o.opportunities)
            if "sap" in self.sets:
                demo.sap_order_activity(box, act, o.sap_orders)

        def second(rnd: int) -> None:
            if "lead-to-cash" in self.sets:
                demo.fulfilment_activity(box, rng, act)
            if "customer-360" in self.sets:
                demo.customer360_activity(box, rng, act)
            if "sap" in self.sets:
                demo.sap_fulfilment_activity(box, rng, act)

        def later(rnd: int) -> None:
            if "signs" in self.sets:
                office_activity(box, rng, o.changes, rnd, act)
                field_activity(box, rng, o.changes, rnd, act)
            if "lead-to-cash" in self.sets:
                fno_activity(box, rng, max(5, o.changes // 10), rnd, act)
            if "customer-360" in self.sets:
                demo.customer360_activity(box, rng, act)
            if "sap" in self.sets:
                sap_activity(box, rng, rnd, act)

        steps: list[Callable[[int], None]] = [first, second] + [later] * max(0, o.rounds - 1)
        per_step = [o.kills // len(steps) + (1 if i < o.kills % len(steps) else 0) for i in range(len(steps))]
        for rnd, (step, kills) in enumerate(zip(steps, per_step, strict=True)):
            self.plan.rate = o.fault_rate
            step(rnd)
            await flush(box, self.figures)
            await self.drain(kills)

    # ---------------------------------------------------------------------------------------- checks

    async def verify(self, elapsed: float) -> dict[str, Any]:
        from shared.bootstrap import build_services
        from shared.reconcile import reconcile
        from shared.settings import Settings

        box = self.box
        assert box is not None
        assert self.probe is not None
        self.plan.rate = 0.0
        services = build_services(Settings())
        try:
            dead = await services.queue.peek_dead_letters(100_000)
            names = {f.name for f in services.flowset.flows}
            expected = Counter({k: v for k, v in demo.expected_bad(box).items() if k[0] in names})
            got = Counter((flow, reason) for flow, _key, reason in {
                (str(m.application_properties.get("flow")), str(m.application_properties.get("key")),
                 str(m.dead_letter_reason)) for m in dead})
            exclude: dict[str, set[str]] = defaultdict(set)
            bad_seqs: set[int] = set()
            for m in dead:
                flow_name = str(m.application_properties.get("flow"))
                if (flow_name, str(m.dead_letter_reason)) in expected:
                    bad_seqs.add(m.sequence_number)
                if flow_name in names:
                    exclude[services.flowset.flow(flow_name).entity].add(str(m.application_properties.get("key")))
            drift = await reconcile(services.flowset, services.sources, services.state, exclude=exclude)
            lost = await lost_changes(services, exclude)
            dups = duplicates(box, services.flowset)
            cascades = [h for h in half_applied_cascades(box) if h["task"] not in self.cascade_baseline] \
                if "signs" in self.sets else []
            deliveries = self.probe.read_deliveries()
            good = {s: c for s, c in deliveries.items() if s not in bad_seqs}
            max_good = max(good.values(), default=0)
            active, scheduled = self.probe.depth()
        finally:
            await services.aclose()
        per_flow_set = flow_set_of(services.flowset)
        by_set: dict[str, dict[str, int]] = {s: Counter() for s in self.o.flow_sets}  # type: ignore[misc]
        for row in lost:
            by_set[per_flow_set[row["flow"]]]["lost"] += 1
        for row in dups:
            by_set[per_flow_set[row["flow"]]]["duplicates"] += 1
        for d in drift:
            by_set[per_flow_set[d.flow]]["drift"] += d.drift
        unexpected = got - expected
        missing = expected - got
        for (flow, _reason), n in unexpected.items():
            by_set[per_flow_set.get(flow, "?")]["unexpected dead letters"] += n  # type: ignore[index]
        by_set.setdefault("signs", Counter())["half-applied cascades"] += len(cascades)  # type: ignore[arg-type]
        total_drift = sum(d.drift for d in drift)
        refused = refused_deliveries(box, self.figures)
        l2c = demo.lead_to_cash_figures(box) if "lead-to-cash" in self.sets else {}
        sapf = demo.sap_figures(box) if "sap" in self.sets else {}
        if l2c.get("orders_whose_lines_differ"):
            by_set["lead-to-cash"]["orders whose lines differ"] += l2c["orders_whose_lines_differ"]
        if sapf.get("orders_whose_items_differ"):
            by_set["sap"]["orders whose items differ"] += sapf["orders_whose_items_differ"]
        failures = {
            "orders_whose_lines_differ": l2c.get("orders_whose_lines_differ", 0)
            + sapf.get("orders_whose_items_differ", 0),
            "lost": len(lost), "duplicates": len(dups), "drift": total_drift,
            "half_applied_cascades": len(cascades),
            "unexpected_dead_letters": sum(unexpected.values()), "missing_dead_letters": sum(missing.values()),
            "queue_not_empty": active + scheduled,
            "controller_hung": self.figures.hung,
        }
        ok = not any(failures.values())
        records_changed = sum(v for k, v in self.figures.activity.items()
                              if not k.startswith(("seeded", "initial load")))
        doc: dict[str, Any] = {
            "ok": ok,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in self.o.__dict__.items()},
            "duration_seconds": round(elapsed, 1),
            "records_changed": records_changed,
            "activity": dict(self.figures.activity),
            "api_calls": self.plan.per_system(),
            "api_calls_total": self.plan.total_calls(),
            "faults_injected": self.plan.per_kind(),
            "token_expiries": self.figures.token_expiries,
            "kills": self.figures.kills,
            "kills_with_locked_messages": self.figures.kills_with_locked_messages,
            "controller_runs": self.figures.controller_runs,
            "controller_runs_not_ok": self.figures.controller_failures,
            "controller_cycle_errors": dict(self.figures.cycle_errors.most_common(15)),
            "deliveries_refused": refused,
            "failures": failures,
            "per_flow_set": {k: dict(v) for k, v in by_set.items()},
            "dead_letters": {"count": sum(got.values()), "expected": sum(expected.values()),
                             "per_reason": {f"{f} {r}": n for (f, r), n in sorted(got.items())},
                             "unexpected": {f"{f} {r}": n for (f, r), n in sorted(unexpected.items())},
                             "missing": {f"{f} {r}": n for (f, r), n in sorted(missing.items())},
                             "messages": [{"flow": m.application_properties.get("flow"),
                                           "key": m.application_properties.get("key"),
                                           "reason": m.dead_letter_reason,
                                           "description": str(m.dead_letter_description)[:300],
                                           "delivery_count": m.delivery_count} for m in dead[:200]]},
            "lead_to_cash": l2c,
            "order_to_sap": sapf,
            "max_delivery_count_good_message": max_good,
            "max_delivery_count_allowed": MAX_DELIVERY_COUNT,
            "good_messages_tracked": len(good),
            "most_delivered_good_messages": [
                {"deliveries": c, "message": self.probe.what.get(s, "?")}
                for s, c in sorted(good.items(), key=lambda kv: -kv[1])[:10]],
            "lost_records": lost[:100],
            "duplicate_records": dups[:100],
            "half_applied_cascades": cascades[:100],
            "drift": [d.as_dict() for d in drift if d.drift],
            "queue": {"active": active, "scheduled": scheduled},
            "notes": self.figures.notes + sorted(self.figures.notes_once)[:20],
        }
        return doc


def flow_set_of(flowset: Any) -> dict[str, str]:
    """flow name -> flow set name (by the spec file each flow came from)."""
    import yaml

    out: dict[str, str] = {}
    for set_name, file in FLOW_SETS.items():
        spec = yaml.safe_load((ROOT / "flows" / file).read_text())
        for flow in spec.get("flows", []):
            out[str(flow["name"])] = set_name
    return out


async def lost_changes(services: Any, exclude: Mapping[str, set[str]]) -> list[dict[str, Any]]:
    """Every flow, both directions: each in-scope source record has its linked target, and every field the
    source masters (or shares) holds the source's value there. A difference is a change that never arrived."""
    from shared.core.engine import in_scope
    from shared.core.errors import SyncError
    from shared.mapping.engine import Mapper, same

    mapper = Mapper(services.flowset)
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    async def rows(system: str, table: str) -> dict[str, Any]:
        if (system, table) not in cache:
            out: dict[str, Any] = {}
            async for page in services.sources[system].scan(table):
                out.update({r.key: r for r in page})
            cache[(system, table)] = out
        return cache[(system, table)]

    lost: list[dict[str, Any]] = []
    for flow in services.flowset.flows:
        src, tgt = flow.source, flow.target
        if src.system not in services.sources or tgt.system not in services.sources:
            continue
        sources_rows = await rows(src.system, src.table)
        target_rows = await rows(tgt.system, tgt.table)
        links = await services.state.get_links(flow.entity, src.system, list(sources_rows), tgt.system)
        excluded = exclude.get(flow.entity, set())
        for key, record in sources_rows.items():
            if key in excluded or record.deleted or not all(in_scope(c, record.values) for c in flow.when):
                continue
            tkey = links.get(key)
            if tkey is None or tkey not in target_rows:
                if "create" in flow.operations:
                    lost.append({"flow": flow.name, "source": f"{src.system}:{src.table}:{key}",
                                 "what": "no linked target record"})
                continue
            try:
                mapped = mapper.map_values(flow, record.values, is_create=False, target_newer=False)
            except SyncError as exc:
                lost.append({"flow": flow.name, "source": f"{src.system}:{src.table}:{key}",
                             "what": f"unmappable: {exc.reason}"})
                continue
            differing = [f"{name}: {src.system} has {value!r}, {tgt.system} has {target_rows[tkey].values.get(name)!r}"
                         for name, value in mapped.values.items()
                         if not name.startswith("@") and not same(value, target_rows[tkey].values.get(name))]
            if differing:
                lost.append({"flow": flow.name, "source": f"{src.system}:{src.table}:{key}",
                             "target": f"{tgt.system}:{tgt.table}:{tkey}", "what": "; ".join(differing[:4])})
    return lost


def _sim_rows(box: demo.Sandbox, system: str, table: str) -> list[dict[str, Any]]:
    if system == "dataverse":
        return box.dv.all(table)
    if system == "arcgis":
        return box.ag.all(table)
    if system == "fno" and box.fno is not None:
        return box.fno.all(table)
    if system == "salesforce" and box.sf is not None:
        return box.sf.find(table)
    if system == "sap" and box.sap is not None:
        return box.sap.all(table)
    return []


def duplicates(box: demo.Sandbox, flowset: Any) -> list[dict[str, Any]]:
    """Read from the simulators: two target records holding one source record's link value (twins), or two
    source records pointing at one target through the write-back field."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, str]] = set()
    for flow in flowset.flows:
        for system, table, column, key_field in (
                (flow.target.system, flow.target.table, flow.link.target_field, flow.target.key_field),
                (flow.source.system, flow.source.table, flow.link.write_back, flow.source.key_field)):
            if not column or (system, table, column, "") in seen:
                continue
            seen.add((system, table, column, ""))
            groups: dict[str, list[str]] = defaultdict(list)
            for row in _sim_rows(box, system, table):
                value = row.get(column)
                if value not in (None, ""):
                    groups[str(value).lower()].append(str(row.get(key_field)))
            for value, keys in groups.items():
                if len(keys) > 1:
                    out.append({"flow": flow.name, "where": f"{system}:{table}.{column}", "value": value,
                                "records": keys[:10]})
    return out


def half_applied_cascades(box: demo.Sandbox) -> list[dict[str, Any]]:
    """Closed work orders whose tasks are not closed on one side (the cascade stopped part-way)."""
    out: list[dict[str, Any]] = []
    closed_dv = {w["dot_workorderid"] for w in box.dv.all("dot_workorders") if w.get("dot_status") in
                 (100000002, 100000003)}
    closed_ag = {w["GlobalID"].lower() for w in box.ag.all("WorkOrders") if w.get("STATUS") in ("COMPLETED", "CLOSED")}
    for task in box.dv.all("dot_workordertasks"):
        wo = task.get("_dot_workorderid_value") or task.get("dot_workorderid")
        if wo in closed_dv and task.get("dot_status") not in (100000001, 100000002, 100000003):
            out.append({"side": "dataverse", "task": task["dot_workordertaskid"], "work_order": wo,
                        "status": task.get("dot_status")})
    for task in box.ag.all("WorkOrderTasks"):
        wo = str(task.get("WO_GUID") or "").lower()
        if wo in closed_ag and task.get("STATUS") not in ("DONE", "CANCELLED", "CLOSED"):
            out.append({"side": "arcgis", "task": task["GlobalID"], "work_order": wo, "status": task.get("STATUS")})
    return out


# ------------------------------------------------------------------------------------------ CLI


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
    p = argparse.ArgumentParser(prog="python -m sandbox.chaos", description=__doc__)
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


async def run_chaos(options: ChaosOptions) -> dict[str, Any]:
    """The whole run; the report is written to `options.report` and returned."""
    doc = await Chaos(options).run()
    options.report.parent.mkdir(parents=True, exist_ok=True)
    options.report.write_text(json.dumps(doc, indent=2, default=str))
    return doc


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    doc = asyncio.run(run_chaos(options))
    print_summary(doc)
    print(f"report written to {options.report}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
