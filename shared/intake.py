"""Application services behind the triggers: webhook intake, outbound direct writes, health, DLQ replay."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.bootstrap import Services
from shared.core.controller import ENQUEUED, LAST_CYCLE, POLL_HINT, envelopes_for, to_messages
from shared.core.envelope import ChangeEnvelope, QueueMessage
from shared.core.errors import AuthError, EnvelopeError, RejectedError, SyncError, TransientError
from shared.core.observe import correlated
from shared.core.ports import AuditEntry, SourceRecord
from shared.payloads import read_json

log = logging.getLogger(__name__)


class Unauthorized(Exception):
    """The caller did not present the configured shared secret."""


def check_shared_secret(services: Services, presented: str | None) -> None:
    """Constant-time check of the x-syncline-key header when a webhook secret is configured.

    With no secret configured the Functions host's function key (auth level FUNCTION) is the guard.
    """
    expected = services.settings.syncline_webhook_secret.get_secret_value()
    if expected and not hmac.compare_digest(expected.encode(), (presented or "").encode("utf-8", "surrogatepass")):
        raise Unauthorized("missing or wrong x-syncline-key header")


@dataclass
class IntakeResult:
    """What a webhook invocation did, returned to the caller as JSON."""

    accepted: int = 0
    written: int = 0
    skipped: int = 0
    queued: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    correlation_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "written": self.written, "skipped": self.skipped,
                "queued": self.queued, "statuses": self.statuses, "correlation_id": self.correlation_id}


AUTH_RETRY_SECONDS = 120
"""Delay before the queue retries a direct write refused for credentials (time for a rotation to land)."""


def _json_body(body: bytes) -> Any:
    # Bounded (size, nesting, finite numbers, real text) for every endpoint; see shared.payloads.
    return read_json(body, "request body")


async def enqueue_new(services: Services, envelopes: list[ChangeEnvelope], *,
                      delay_seconds: float = 0) -> list[ChangeEnvelope]:
    """Enqueue the envelopes whose change was never enqueued before; returns those sent.

    The message ids are remembered only once the messages are durably on the queue, so a failed send (or a
    crash before it) leaves nothing behind (a claim is not a remembered key) and the sender's retry goes
    through. Two deliveries racing past the check both enqueue: harmless, the engine finds the second one a no-op.
    """
    if not envelopes:
        return []
    ids = [e.message_id() for e in envelopes]
    known = await services.state.claim(ENQUEUED, ids)
    fresh: list[ChangeEnvelope] = []
    batch: set[str] = set()
    dropped: list[AuditEntry] = []
    now = datetime.now(UTC)
    for env, mid in zip(envelopes, ids, strict=True):
        if mid in known or mid in batch:
            dropped.append(AuditEntry(now, env.correlation_id, env.flow, "duplicate_dropped", env.source_system,
                                      env.source_table, env.source_key, f"change already enqueued as {mid}"))
            continue
        batch.add(mid)
        fresh.append(env)
    if fresh:
        await enqueue(services, fresh, delay_seconds=delay_seconds)
        await services.state.confirm(ENQUEUED, [e.message_id() for e in fresh])
    if dropped:
        await services.state.append_audit(dropped)
    return fresh


async def handle_dataverse_webhook(services: Services, body: bytes) -> IntakeResult:
    """Dataverse RemoteExecutionContext -> direct writes for direct flows, queue for the rest.

    A transient failure is retried briefly in the invocation, then scheduled on the queue; a permanent
    one is put on the queue too, where the controller dead-letters it with its reason. Nothing is lost.
    """
    from shared.connectors.dataverse import DataverseClient, parse_remote_execution_context

    change = parse_remote_execution_context(_json_body(body), date_only=_dataverse_date_columns(services))
    dv = services.sinks.get("dataverse")
    if not isinstance(dv, DataverseClient):
        raise EnvelopeError("Dataverse is not configured (DATAVERSE__URL is empty)")
    table = await _entity_set(services, dv, change.entity)
    operation = {"Create": "create", "Update": "update", "Delete": "delete"}[change.message_name]
    correlation = change.correlation_id or None
    result = IntakeResult(correlation_id=correlation)
    direct = envelopes_for(services.flowset, "dataverse", table, [change.record], origin="webhook", mode="direct",
                           operation=operation, correlation_id=correlation)
    queued = envelopes_for(services.flowset, "dataverse", table, [change.record], origin="webhook", mode="queue",
                           operation=operation, correlation_id=correlation)
    result.accepted = len(direct) + len(queued)
    # One Dataverse change, one correlation id: on every log line and Dataverse request of this invocation.
    with correlated([correlation]):
        result.queued += len(await enqueue_new(services, queued))
        if direct:
            await write_direct(services, direct, result)
    return result


async def _entity_set(services: Services, dv: Any, logical_name: str) -> str:
    """The entity set of a webhook's table: from metadata, or (when Dataverse cannot answer now) from the flow
    whose source key is the table's primary id, so an authenticated change is not refused for our trouble."""
    try:
        return str(await dv.entity_set_for(logical_name))
    except RejectedError:
        raise  # not a table of this environment (or not a valid name): the body is wrong
    except SyncError as exc:
        tables = {f.source.table for f in services.flowset.flows
                  if f.source.system == "dataverse" and f.source.key_field == f"{logical_name}id"}
        if len(tables) == 1:
            log.warning("dataverse webhook: metadata of %s unavailable (%s); using the flows' table %s",
                        logical_name, exc.reason, next(iter(tables)))
            return tables.pop()
        if isinstance(exc, AuthError):
            raise TransientError(f"Dataverse refused Syncline's credentials reading the metadata of "
                                 f"{logical_name}: {exc.detail}") from exc
        raise


def _dataverse_date_columns(services: Services) -> frozenset[str]:
    """Date-only Dataverse columns per the specs (webhooks send them as midnight timestamps)."""
    cols = {fm.source for f in services.flowset.flows if f.source.system == "dataverse"
            for fm in f.fields if fm.transform == "date_to_epoch_ms"}
    cols |= {fm.target for f in services.flowset.flows if f.target.system == "dataverse"
             for fm in f.fields if fm.transform == "epoch_ms_to_date"}
    return frozenset(cols)


async def write_direct(services: Services, envelopes: list[ChangeEnvelope], result: IntakeResult) -> None:
    """Outbound direct write with short inline retries; leftovers go to the queue (never lost).

    Whatever the failure (a target's refusal, our credentials refused after a refresh, even a fault of ours),
    the change ends up on the queue; only a queue that cannot take it makes the caller answer 503.
    """
    pending = envelopes
    statuses: Counter[str] = Counter()
    for attempt in range(services.settings.syncline_inline_retries + 1):
        try:
            outcomes = await services.engine.process(pending)
        except Exception as exc:  # a fault of ours must not lose the change: the queue keeps it
            log.error("direct write failed unexpectedly (%s); the changes go to the queue", type(exc).__name__,
                      exc_info=exc)
            for env in pending:
                await enqueue(services, [env.model_copy(update={"origin": "resubmit"})], delay_seconds=30)
                result.queued += 1
                statuses["failed"] += 1
            break
        services.metrics.record_outcomes(outcomes, services.flowset)
        retry: list[ChangeEnvelope] = []
        for o in outcomes:
            statuses[o.status] += 1
            if o.status in ("written", "deleted"):
                result.written += 1
            elif o.status in ("skipped_echo", "skipped_noop"):
                result.skipped += 1
            elif o.status == "failed" and o.error is not None and o.error.retriable and \
                    not isinstance(o.error, AuthError) and attempt < services.settings.syncline_inline_retries:
                # Credentials refused after a refresh will not heal in a second: those wait on the queue instead.
                retry.append(o.envelope)
            else:
                env = o.envelope.model_copy(update={"origin": "resubmit"})
                await enqueue(services, [env], delay_seconds=_queue_delay(o.status, o.error))
                result.queued += 1
        if not retry:
            break
        pending = retry
        await asyncio.sleep(0.2 * (attempt + 1))
    for name, count in statuses.items():
        result.statuses[name] = result.statuses.get(name, 0) + count
    services.metrics.record_api_call_totals(services.counter.snapshot())


def _queue_delay(status: str, error: SyncError | None) -> float:
    """When the queue should try a change the direct write left over.

    Deferred (parent pending) and permanent failures go now: the controller re-checks the parent or
    dead-letters with the reason. Transient failures wait a little; credentials refused even after a token
    refresh wait longer (a secret rotation or a consent takes minutes to land), then the controller tries
    again like any delivery, so only a sustained refusal dead-letters it (AUTH_FAILED, alarmed on).
    """
    if status != "failed" or error is None:
        return 0
    if isinstance(error, AuthError):
        return AUTH_RETRY_SECONDS
    return 30 if error.retriable else 0


async def initial_load(services: Services, *, progress: Callable[[str, int], None] | None = None) -> IntakeResult:
    """Push every record of the direct flows' source tables through the engine, parents first.

    This is the bulk form of the outbound direct write (first go-live, or after a long outage): the
    same engine, batched; anything that fails lands on the queue exactly like a webhook would.
    """
    result = IntakeResult()
    flows = sorted((f for f in services.flowset.flows if f.mode == "direct"), key=services.flowset.depth)
    for flow in flows:
        source = services.sources.get(flow.source.system)
        if source is None:
            continue
        async for page in source.scan(flow.source.table):
            envelopes = [e for e in envelopes_for(services.flowset, flow.source.system, flow.source.table, page,
                                                  origin="initial", mode="direct") if e.flow == flow.name]
            for start in range(0, len(envelopes), services.settings.syncline_batch_size):
                chunk = envelopes[start:start + services.settings.syncline_batch_size]
                result.accepted += len(chunk)
                await write_direct(services, chunk, result)
                if progress:
                    progress(flow.name, len(chunk))
    return result


async def enqueue(services: Services, envelopes: list[ChangeEnvelope], *, delay_seconds: float = 0) -> None:
    """Put envelopes on the inbound queue (optionally scheduled) and audit it."""
    when = datetime.now(UTC) + timedelta(seconds=delay_seconds) if delay_seconds > 0 else None
    messages = await to_messages(services.flowset, services.state, envelopes)
    try:
        await services.queue.send(messages, scheduled_at=when)
    except Exception as exc:  # the queue is down: nothing was accepted, the sender must try again (503)
        log.error("the inbound queue refused %d message(s): %s", len(messages), type(exc).__name__, exc_info=exc)
        raise TransientError(f"the inbound queue is unavailable ({type(exc).__name__}); nothing was accepted, "
                             "send the change again") from exc
    now = datetime.now(UTC)
    await services.state.append_audit([
        AuditEntry(now, e.correlation_id, e.flow, "enqueued", e.source_system, e.source_table, e.source_key,
                   f"origin {e.origin}" + (f", due in {delay_seconds:.0f}s" if delay_seconds else ""))
        for e in envelopes])


async def handle_arcgis_webhook(services: Services, body: bytes, content_type: str,
                                signature: str | None, shared_key: str | None) -> IntakeResult:
    """Feature-service and Survey123 webhooks: authenticate, validate, enqueue. Nothing more."""
    from shared.connectors.arcgis import parse_webhook, verify_signature

    sig_key = services.settings.arcgis.webhook_signature_key.get_secret_value()
    if signature is not None and sig_key:
        if not verify_signature(body, signature, sig_key):
            raise Unauthorized("x-esriHook-Signature does not match the body")
    else:
        check_shared_secret(services, shared_key)
        if not services.settings.syncline_webhook_secret.get_secret_value() and sig_key:
            raise Unauthorized("a signed feature-service webhook (x-esriHook-Signature) is required")
    hook = parse_webhook(body, content_type)
    result = IntakeResult()
    if hook.record is not None and hook.table is not None:
        envelopes = envelopes_for(services.flowset, "arcgis", hook.table, [hook.record], origin="webhook",
                                  mode="queue")
        result.accepted = result.queued = len(await enqueue_new(services, envelopes))
        return result
    arcgis = services.sinks.get("arcgis")
    tables_for = getattr(arcgis, "tables_for", None)
    # Feature-service webhooks name layers by id; the connector maps ids to the names the flows use.
    tables = await tables_for(hook) if tables_for is not None else list(hook.tables)
    hints = [QueueMessage(
        body=json.dumps({"kind": POLL_HINT, "system": "arcgis", "table": table, "detail": hook.describe()}).encode(),
        session_id=f"poll:arcgis:{table}",
        application_properties={"kind": POLL_HINT, "system": "arcgis", "table": table},
    ) for table in tables]
    if hints:
        try:
            await services.queue.send(hints)
        except Exception as exc:  # the queue is down: nothing accepted, the sender tries again
            log.error("the inbound queue refused %d poll hint(s): %s", len(hints), type(exc).__name__, exc_info=exc)
            raise TransientError(f"the inbound queue is unavailable ({type(exc).__name__}); nothing was "
                                 "accepted, send the webhook again") from exc
    result.accepted = result.queued = len(hints)
    return result


def _event_token(text: str) -> str:
    """An event's dedup key: kept as sent when short, else its digest (state stores bound key sizes)."""
    return text if len(text) <= 200 else "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


async def _accept_events(services: Services, namespace: str, pending: list[tuple[str, list[ChangeEnvelope]]],
                         result: IntakeResult) -> None:
    """Enqueue the envelopes of every new event, then remember the events (never before: a refused or failed
    request must leave nothing behind, or the sender's retry would be dropped as a duplicate)."""
    envelopes = [env for _, envs in pending for env in envs]
    result.queued += len(await enqueue_new(services, envelopes))
    if pending:
        await services.state.remember(namespace, [token for token, _ in pending])


async def handle_fno_business_events(services: Services, body: bytes) -> IntakeResult:
    """F&O business events: stubs deduplicated on ControlNumber, read back in full through OData, enqueued."""
    from shared.connectors.fno import FinOpsClient, parse_business_events

    events = parse_business_events(_json_body(body))
    fno = services.sinks.get("fno")
    if not isinstance(fno, FinOpsClient):
        raise EnvelopeError("F&O is not configured (FNO__ENVIRONMENT_URL is empty)")
    result = IntakeResult()
    namespace = "fno-business-event"
    seen = await services.state.seen(namespace, [_event_token(str(e.control_number)) for e in events])
    pending: list[tuple[str, list[ChangeEnvelope]]] = []
    for event in events:
        token = _event_token(str(event.control_number))
        if token in seen:
            result.skipped += 1  # the endpoint received this event before (F&O retries deliveries)
            continue
        seen.add(token)
        # Every read happens before anything is stored: a read that fails refuses the whole delivery.
        record = await fno.read_event_record(event)
        pending.append((token, envelopes_for(services.flowset, "fno", event.entity_set, [record], origin="webhook",
                                             mode="queue")))
        result.accepted += 1
    await _accept_events(services, namespace, pending, result)
    return result


async def handle_sap_events(services: Services, body: bytes) -> IntakeResult:
    """SAP business events (Event Mesh CloudEvents relayed as JSON, one or a list): deduplicated on the event id,
    the record read back in full through OData, enqueued for the flows reading it."""
    from shared.connectors.sap import SapClient, parse_event

    data = _json_body(body)
    items = data if isinstance(data, list) else [data]
    if not items:
        raise EnvelopeError("sap event: the array is empty")
    events = [parse_event(item) if isinstance(item, dict) else _not_an_object("sap event", index, item)
              for index, item in enumerate(items)]
    sap = services.sinks.get("sap")
    if not isinstance(sap, SapClient):
        raise EnvelopeError("SAP is not configured (SAP__BASE_URL is empty)")
    result = IntakeResult()
    namespace = "sap-event"
    tokens = [_event_token(e.event_id) for e in events]
    seen = await services.state.seen(namespace, tokens)
    pending: list[tuple[str, list[ChangeEnvelope]]] = []
    for event, token in zip(events, tokens, strict=True):
        if token in seen:
            result.skipped += 1  # delivered before (Event Mesh delivers at least once)
            continue
        seen.add(token)
        result.accepted += 1
        if not services.flowset.flows_from("sap", event.entity_set):
            pending.append((token, []))
            continue
        if event.operation.lower() == "deleted":
            records = [SourceRecord(key=event.key, values={}, deleted=True)]
        else:
            records = list((await sap.fetch(event.entity_set, [event.key])).values())
            if not records:
                raise RejectedError(f"sap event {event.event_id}: {event.entity_set} {event.key} cannot be read "
                                    "(not found); nothing was accepted, the event may be sent again")
        pending.append((token, envelopes_for(services.flowset, "sap", event.entity_set, records, origin="webhook",
                                             mode="queue")))
    await _accept_events(services, namespace, pending, result)
    return result


def _not_an_object(what: str, index: int, item: Any) -> Any:
    raise EnvelopeError(f"{what} [{index}]: expected a JSON object, got {type(item).__name__}")


async def handle_salesforce_change_events(services: Services, body: bytes) -> IntakeResult:
    """Salesforce Change Data Capture events relayed as JSON: own writes dropped, duplicates dropped (replay
    id, or transaction key), the records read back in full, enqueued for the flows reading that object."""
    from shared.connectors.salesforce import SalesforceClient, parse_cdc_event

    data = _json_body(body)
    bodies = data if isinstance(data, list) else [data]
    if not bodies:
        raise EnvelopeError("salesforce: the array of CDC events is empty")
    changes = [parse_cdc_event(raw) if isinstance(raw, dict) else _not_an_object("salesforce: CDC event", i, raw)
               for i, raw in enumerate(bodies)]
    sf = services.sinks.get("salesforce")
    if not isinstance(sf, SalesforceClient):
        raise EnvelopeError("Salesforce is not configured (SALESFORCE__MY_DOMAIN_URL is empty)")
    result = IntakeResult()
    namespace = "salesforce-cdc"
    tokens = [_event_token(str(c.replay_id) if c.replay_id is not None else
                           f"{c.transaction_key}:{','.join(c.record_ids)}") for c in changes]
    seen = await services.state.seen(namespace, tokens)
    pending: list[tuple[str, list[ChangeEnvelope]]] = []
    for change, token in zip(changes, tokens, strict=True):
        if change.is_own_write(services.settings.salesforce.call_options_client):
            result.skipped += 1  # Syncline's own write coming back: an echo by origin
            continue
        if token in seen:
            result.skipped += 1
            continue
        seen.add(token)
        result.accepted += 1
        if not services.flowset.flows_from("salesforce", change.entity):
            pending.append((token, []))
            continue
        if change.change_type.upper() == "DELETE":
            records = [SourceRecord(key=rid, values={}, deleted=True) for rid in change.record_ids]
        else:
            found = await sf.fetch(change.entity, change.record_ids)
            missing = [rid for rid in change.record_ids if rid not in found]
            if missing:
                raise RejectedError(f"salesforce: {change.entity} {', '.join(missing[:5])} of a {change.change_type} "
                                    "event cannot be read (not found); nothing was accepted, the event may be sent "
                                    "again")
            records = list(found.values())
        pending.append((token, envelopes_for(services.flowset, "salesforce", change.entity, records,
                                             origin="webhook", mode="queue")))
    await _accept_events(services, namespace, pending, result)
    return result


async def health(services: Services) -> dict[str, Any]:
    """Reachability of each configured system, queue and dead-letter depth, the last cycle.

    A paused system (its API allocation spent) is reported with the time it resumes and is not pinged:
    a health probe must not spend the allocation the pause is saving.
    """
    systems: dict[str, Any] = {}
    paused: dict[str, str] = {}
    for name, sink in services.sinks.items():
        until = await services.controller.paused_until(name)
        if until is not None:
            paused[name] = until.isoformat()
            systems[name] = {"reachable": None, "paused_until": until.isoformat()}
            continue
        ping = getattr(sink, "ping", None)
        try:
            if ping is not None:
                await asyncio.wait_for(ping(), timeout=10)
            systems[name] = {"reachable": True}
        except (SyncError, TimeoutError) as exc:
            systems[name] = {"reachable": False, "error": str(exc)}
    depth = await services.queue.depth()
    last = await services.state.get_checkpoint(LAST_CYCLE)
    last_cycle = json.loads(last.value) if last else None
    healthy = (all(s["reachable"] for s in systems.values() if "paused_until" not in s) and not paused
               and (last_cycle is None or last_cycle["outcome"] == "ok"))
    return {
        "status": "healthy" if healthy else "degraded",
        "systems": systems,
        "queue": {"active": depth.active, "scheduled": depth.scheduled, "dead_letter": depth.dead_letter},
        "last_cycle": last_cycle,
    }


async def replay_dead_letters(services: Services, *, message_id: str | None = None,
                              limit: int = 1000) -> list[str]:
    """Send dead-lettered messages back to the queue (all, or one by message id); returns the ids replayed."""
    replayed: list[str] = []
    while len(replayed) < limit:
        batch = await services.queue.receive_dead_letters(min(100, limit - len(replayed)))
        if not batch:
            break
        keep = []
        for msg in batch:
            if message_id is not None and msg.message_id != message_id:
                keep.append(msg)
                continue
            try:
                env = ChangeEnvelope.from_body(msg.body)
                out = env.model_copy(update={"origin": "replay", "waits": 0}).to_message()
            except EnvelopeError:
                out = QueueMessage(body=msg.body, message_id=msg.message_id, session_id=msg.session_id,
                                   correlation_id=msg.correlation_id,
                                   application_properties=dict(msg.application_properties))
            await services.queue.send([out])
            await services.queue.complete(msg)
            replayed.append(msg.message_id)
        for msg in keep:
            await services.queue.abandon(msg)
        if message_id is not None and (replayed or keep):
            break
    return replayed
