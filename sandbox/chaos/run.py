"""One chaos run: the sandbox, activity rounds, controller runs killed at random moments, then verification."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox import demo
from sandbox.chaos.activity import field_activity, fno_activity, office_activity, sap_activity
from sandbox.chaos.checks import duplicates, flow_set_of, half_applied_cascades, lost_changes
from sandbox.chaos.options import FLOW_SETS, MAX_DELIVERY_COUNT, ROOT, ChaosOptions, Figures
from sandbox.chaos.probe import QueueProbe, flush, refused_deliveries
from sandbox.dataverse import seed_dataverse
from sandbox.faults import FaultPlan, expire_all_tokens


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
        from shared.ops import initial_load
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
        from shared.ops import reconcile
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


async def run_chaos(options: ChaosOptions) -> dict[str, Any]:
    """The whole run; the report is written to `options.report` and returned."""
    doc = await Chaos(options).run()
    options.report.parent.mkdir(parents=True, exist_ok=True)
    options.report.write_text(json.dumps(doc, indent=2, default=str))
    return doc
