"""Webhook intake behind the HTTP triggers: authenticate, parse, deduplicate, then write directly or enqueue."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from shared.bootstrap import Services
from shared.core.controller import POLL_HINT, envelopes_for
from shared.core.envelope import ChangeEnvelope, QueueMessage
from shared.core.errors import AuthError, EnvelopeError, RejectedError, SyncError, TransientError
from shared.core.observe import correlated
from shared.core.ports import SourceRecord
from shared.ops.writes import IntakeResult, enqueue_new, write_direct
from shared.payloads import read_json

log = logging.getLogger(__name__)
T = TypeVar("T")


class Unauthorized(Exception):
    """The caller did not present the configured shared secret."""


def check_shared_secret(services: Services, presented: str | None) -> None:
    """Constant-time check of the x-syncline-key header when a webhook secret is configured.

    With no secret configured the Functions host's function key (auth level FUNCTION) is the guard.
    """
    expected = services.settings.syncline_webhook_secret.get_secret_value()
    if expected and not hmac.compare_digest(expected.encode(), (presented or "").encode("utf-8", "surrogatepass")):
        raise Unauthorized("missing or wrong x-syncline-key header")


def _json_body(body: bytes) -> Any:
    # Bounded (size, nesting, finite numbers, real text) for every endpoint; see shared.payloads.
    return read_json(body, "request body")


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

    events = _json_objects(body, "sap event: the array is empty", "sap event", parse_event)
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


def _json_objects(body: bytes, empty: str, what: str, parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """A JSON object or an array of them, each parsed; an empty array or a non-object item refuses the body."""
    data = _json_body(body)
    items = data if isinstance(data, list) else [data]
    if not items:
        raise EnvelopeError(empty)
    return [parse(item) if isinstance(item, dict) else _not_an_object(what, index, item)
            for index, item in enumerate(items)]


def _not_an_object(what: str, index: int, item: Any) -> Any:
    raise EnvelopeError(f"{what} [{index}]: expected a JSON object, got {type(item).__name__}")


async def handle_salesforce_change_events(services: Services, body: bytes) -> IntakeResult:
    """Salesforce Change Data Capture events relayed as JSON: own writes dropped, duplicates dropped (replay
    id, or transaction key), the records read back in full, enqueued for the flows reading that object."""
    from shared.connectors.salesforce import SalesforceClient, parse_cdc_event

    changes = _json_objects(body, "salesforce: the array of CDC events is empty", "salesforce: CDC event",
                            parse_cdc_event)
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
