"""The reconciliation job (CLI, timer, demo): API budget, DLQ exclusions, repair, stored report, metrics."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from shared.bootstrap import Services
from shared.core.controller import envelopes_for
from shared.core.ports import CheckpointConflictError, SourceRecord
from shared.mapping.spec import FlowSpec
from shared.ops.reconciliation import ApiBudget, Reconciliation, Resync, reconcile_report
from shared.ops.writes import enqueue_new

log = logging.getLogger(__name__)

LAST_RECONCILIATION = "reconcile:last"
"""Checkpoint holding the summary of the last reconciliation (JSON: when, status, total drift, per-flow counts)."""


async def dead_lettered(services: Services, limit: int = 5000) -> dict[str, set[str]]:
    """Entity -> keys of records whose change sits in the dead-letter queue now (peeked, nothing received)."""
    exclude: dict[str, set[str]] = {}
    for msg in await services.queue.peek_dead_letters(limit):
        flow_name, key = msg.application_properties.get("flow"), msg.application_properties.get("key")
        if flow_name is None or key is None:
            continue
        # A dead letter of a flow the spec no longer has excludes nothing.
        entity = next((f.entity for f in services.flowset.flows if f.name == flow_name), None)
        if entity is not None:
            exclude.setdefault(entity, set()).add(str(key))
    return exclude


def _resync(services: Services, enqueued: list[int]) -> Resync:
    async def resync(flow: FlowSpec, records: list[tuple[SourceRecord, str]]) -> int:
        envelopes = []
        for record, drift in records:
            # The correlation id names this drift: the same drift re-enqueues nothing (the message id includes it).
            digest = hashlib.sha256(f"{flow.name}|{record.key}|{drift}".encode("utf-8", "surrogatepass")).hexdigest()
            envelopes += [e for e in envelopes_for(services.flowset, flow.source.system, flow.source.table, [record],
                                                   origin="reconcile", correlation_id=f"reconcile:{digest[:32]}")
                          if e.flow == flow.name]
        sent = await enqueue_new(services, envelopes)
        enqueued[0] += len(sent)
        return len(sent)
    return resync


async def run_reconciliation(services: Services, *, flow: str | None = None, repair: bool = False,
                             progress: Callable[[str, int], None] | None = None) -> Reconciliation:
    """Reconcile every flow (or the entity of `flow`) within the API budget, leaving dead-lettered records out.

    `repair=True` re-enqueues drifted and missing records from their owning side (origin "reconcile", through the
    intake's dedup: a repeat enqueues nothing new) and completes half-applied cascades. The summary is stored as
    the `reconcile:last` checkpoint and each flow's drift is recorded as a metric.
    """
    entities = {services.flowset.flow(flow).entity} if flow is not None else None  # unknown: SpecError
    budget = ApiBudget({s: services.settings.reconcile_max_calls(s) for s in services.sources},
                       services.counter.snapshot)
    enqueued = [0]
    report = await reconcile_report(
        services.flowset, services.sources, services.state, exclude=await dead_lettered(services), repair=repair,
        engine=services.engine, entities=entities, budget=budget,
        resync=_resync(services, enqueued) if repair else None, progress=progress)
    report.enqueued = enqueued[0]
    services.metrics.record_api_call_totals(services.counter.snapshot())
    for entity in report.entities:
        services.metrics.record_drift(entity.flow, entity.drift)
    await _store(services, report)
    log.info("reconciliation %s: drift %d in %d flow(s), %d re-enqueued, calls %s",
             "partial" if report.partial else "complete", report.total_drift, len(report.entities), report.enqueued,
             report.calls)
    return report


async def _store(services: Services, report: Reconciliation) -> None:
    current = await services.state.get_checkpoint(LAST_RECONCILIATION)
    try:
        await services.state.put_checkpoint(LAST_RECONCILIATION, json.dumps(report.summary(), default=str),
                                            expected_etag=current.etag if current else None)
    except CheckpointConflictError:
        log.info("another reconciliation stored its report concurrently")


async def last_reconciliation(services: Services) -> dict[str, Any] | None:
    """The stored summary of the last reconciliation, if any ran."""
    stored = await services.state.get_checkpoint(LAST_RECONCILIATION)
    if stored is None:
        return None
    summary: dict[str, Any] = json.loads(stored.value)
    return summary


async def reconcile_command(*, flow: str | None, repair: bool,
                            progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """`syncline reconcile`: build the services from the settings, reconcile, close them; the full report."""
    from shared.bootstrap import build_services

    services = build_services()
    try:
        return (await run_reconciliation(services, flow=flow, repair=repair, progress=progress)).as_dict()
    finally:
        await services.aclose()
