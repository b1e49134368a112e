"""Telemetry adapter: Azure Monitor export, Syncline's OpenTelemetry metrics, correlation ids in logs, log redaction."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

from opentelemetry import metrics as otel_metrics

from shared.core.observe import current_correlation_id

if TYPE_CHECKING:
    import httpx

    from shared.core.controller import CycleReport
    from shared.core.engine import Outcome
    from shared.mapping.spec import FlowSet
    from shared.settings import Settings

log = logging.getLogger(__name__)

METER_NAME = "syncline"
REDACTED = "***"
CLIENT_REQUEST_ID_HEADER = "x-ms-client-request-id"

# ============================================================================================ correlation headers


def dataverse_correlation_hook() -> Callable[[httpx.Request], Awaitable[None]]:
    """httpx request hook: send the current correlation id as Dataverse's client request id.

    Dataverse records `x-ms-client-request-id` with the request, so a support case can be matched to
    our audit rows. The header is documented as a GUID, so other ids are not sent (no risk of a 400).
    """

    async def _hook(request: httpx.Request) -> None:
        cid = current_correlation_id()
        if cid and CLIENT_REQUEST_ID_HEADER not in request.headers and _is_guid(cid):
            request.headers[CLIENT_REQUEST_ID_HEADER] = cid

    return _hook


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# ============================================================================================ redaction

# Credentials that are not in settings but flow through URLs, headers and token responses: OAuth bearer
# tokens, token/secret/function-key query or form parameters, token fields of JSON or Python reprs, and
# the key parts of Azure connection strings and SAS URLs.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9\-._~+/]+=*"), r"\1" + REDACTED),
    (re.compile(r"(?i)(?<![A-Za-z0-9_])((?:access_|refresh_|id_)?token|client_secret|sig|api_?key|password)"
                r"=[^&\s'\",;)]+"), r"\1=" + REDACTED),
    # The Functions host's key in webhook URLs (`?code=`); only as a query parameter, "code=" is common prose.
    (re.compile(r"(?i)([?&]code=)[^&\s'\",;)]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)([\"']?(?:access_|refresh_|id_)?token[\"']?\s*:\s*[\"'])[^\"']+"), r"\1" + REDACTED),
    (re.compile(r"(?i)([\"']?client_secret[\"']?\s*:\s*[\"'])[^\"']+"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(SharedAccessKey|AccountKey|SharedAccessSignature)=[^;\s'\"]+"), r"\1=" + REDACTED),
)


class RedactingFilter(logging.Filter):
    """Replaces configured secret values and credential-shaped text in a record's message and traceback.

    The record is rewritten in place (message formatted, args dropped), so every handler and exporter that
    sees it afterwards gets the redacted text. A record is processed once.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._literal: re.Pattern[str] | None = None
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Redact these values too (their URL-encoded forms included); settings of every build accumulate."""
        variants = {v for s in secrets if s for v in (s, quote(s, safe=""), quote_plus(s))}
        with self._lock:
            merged = self._secrets | variants
            if merged == self._secrets:
                return
            # Longest first, so a secret containing another is replaced whole.
            ordered = sorted(merged, key=len, reverse=True)
            self._secrets = merged
            self._literal = re.compile("|".join(re.escape(s) for s in ordered))

    def redact(self, text: str) -> str:
        """`text` with every known secret and credential pattern replaced by ***."""
        literal = self._literal
        if literal is not None:
            text = literal.sub(REDACTED, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        prepare_record(record, self)
        return True


def prepare_record(record: logging.LogRecord, redactor: RedactingFilter) -> None:
    """Redact a record and tag it with the current correlation id (once per record).

    The id is also appended to the message text: the Functions host ships only the text of a log line to
    Application Insights, and a suffix keeps `message startswith '...'` queries of the alerts working.
    """
    if getattr(record, "_syncline_prepared", False):
        return
    record._syncline_prepared = True
    cid = current_correlation_id()
    if not hasattr(record, "correlation_id"):
        record.correlation_id = cid or ""
    try:
        message = record.getMessage()
    except Exception:  # a malformed call: leave it for the handler's own error reporting
        return
    message = redactor.redact(message)
    if cid and cid not in message:
        message = f"{message} [correlation_id={cid}]"
    record.msg, record.args = message, None
    if record.exc_info and not record.exc_text:
        # Formatters reuse exc_text when set: an exception message quoting a secret is redacted too.
        record.exc_text = redactor.redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redactor.redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redactor.redact(record.stack_info)


_redactor = RedactingFilter()
_logging_lock = threading.Lock()
_logging_installed = False


def redactor() -> RedactingFilter:
    """The process-wide redaction filter (installed by `configure_logging`)."""
    return _redactor


def configure_logging(settings: Settings) -> None:
    """Redact secrets and tag correlation ids on every log record of the process (idempotent).

    The redaction runs in the log-record factory, so records reach every handler already redacted —
    including handlers added later (the Functions worker's, pytest's); the filter is also put on the root
    logger's current handlers for records created outside the factory.
    """
    global _logging_installed
    _redactor.add_secrets(settings.secrets())
    with _logging_lock:
        if not _logging_installed:
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                prepare_record(record, _redactor)
                return record

            logging.setLogRecordFactory(factory)
            _logging_installed = True
        for handler in logging.getLogger().handlers:
            if _redactor not in handler.filters:
                handler.addFilter(_redactor)


# ============================================================================================ Azure Monitor

_telemetry_lock = threading.Lock()
_telemetry_configured = False


def configure_telemetry(settings: Settings) -> bool:
    """Export metrics (and traces) to Application Insights when its connection string is set; once per process.

    Returns whether export is on. Without a connection string nothing is imported and the OpenTelemetry
    API's no-op meter provider stays in place, so recording metrics costs next to nothing.
    """
    global _telemetry_configured
    connection_string = settings.applicationinsights_connection_string.get_secret_value()
    if not connection_string:
        return False
    with _telemetry_lock:
        if _telemetry_configured:
            return True
        from azure.monitor.opentelemetry import configure_azure_monitor

        # Log export stays off: the Functions host already ships every log line as a trace (exporting them
        # here too would duplicate each one); the correlation id travels in the line's text.
        configure_azure_monitor(connection_string=connection_string, disable_logging=True)
        _telemetry_configured = True
    log.info("telemetry: exporting OpenTelemetry metrics to Application Insights")
    return True


# ============================================================================================ metrics

SYNCED_STATUSES = frozenset({"written", "deleted"})


class Metrics:
    """Syncline's metrics, named as the workbook (infra/modules/workbook.json) queries them.

    - `syncline.records_synced` (counter; flow, direction e.g. "dataverse->arcgis"): written or deleted records
    - `syncline.failures` (counter; reason): failed attempts and unparseable messages by reason code
    - `syncline.api_calls` (counter; system): HTTP requests to each system
    - `syncline.cycle_duration` (histogram, s): controller cycle duration
    - `syncline.dead_letter_depth` (gauge): dead-lettered messages after a cycle
    - `syncline.reconcile_drift` (gauge; flow): drift the last reconciliation found per flow, also logged as
      "reconciliation drift <n> in flow <flow>", the line the drift alert (infra/modules/alerts.bicep) queries
    - `syncline.breaker_transitions` (counter; system, state): circuit breakers opening, half-opening, closing
    - `syncline.breaker_open` (gauge; system): 1 while a system's breaker is open or half-open, 0 once closed

    Callers aggregate per batch: one `add` per (flow, direction) or reason, never one per record.
    """

    def __init__(self, meter_provider: otel_metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider.get_meter(METER_NAME) if meter_provider is not None
                 else otel_metrics.get_meter(METER_NAME))
        self.records_synced = meter.create_counter(
            "syncline.records_synced", unit="{record}", description="Records written or deleted in a target system")
        self.failures = meter.create_counter(
            "syncline.failures", unit="{failure}", description="Failed sync attempts by reason code")
        self.api_calls = meter.create_counter(
            "syncline.api_calls", unit="{request}", description="HTTP requests sent to each connected system")
        self.cycle_duration = meter.create_histogram(
            "syncline.cycle_duration", unit="s", description="Duration of a controller cycle")
        self.dead_letter_depth = meter.create_gauge(
            "syncline.dead_letter_depth", unit="{message}", description="Dead-lettered messages after a cycle")
        self.reconcile_drift = meter.create_gauge(
            "syncline.reconcile_drift", unit="{record}", description="Drift found by the last reconciliation")
        self.breaker_transitions = meter.create_counter(
            "syncline.breaker_transitions", unit="{transition}", description="Circuit breaker state changes")
        self.breaker_open = meter.create_gauge(
            "syncline.breaker_open", unit="1", description="1 while a system's circuit breaker is not closed")
        self._directions: dict[str, str] = {}
        self._api_lock = threading.Lock()
        self._api_seen: dict[str, int] = {}

    def record_outcomes(self, outcomes: Sequence[Outcome], flowset: FlowSet) -> None:
        """Records synced per flow/direction and failures per reason of one engine batch."""
        synced: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for outcome in outcomes:
            if outcome.status in SYNCED_STATUSES:
                synced[outcome.envelope.flow] += 1
            elif outcome.status == "failed":
                failed[outcome.error.reason if outcome.error is not None else "UNKNOWN"] += 1
        for flow, count in synced.items():
            self.records_synced.add(count, {"flow": flow, "direction": self._direction(flow, flowset)})
        self.record_failures(failed)

    def record_failures(self, reasons: Mapping[str, int]) -> None:
        """Failures by reason code (for failures that are not engine outcomes, e.g. an unparseable message)."""
        for reason, count in reasons.items():
            if count:
                self.failures.add(count, {"reason": reason})

    def record_cycle(self, report: CycleReport, dead_letter_depth: int | None) -> None:
        """A finished controller cycle: its duration and the dead-letter depth after it.

        A failed cycle is not a `failures` reason: the controller alerts watch the invocation and its log line.
        """
        self.cycle_duration.record(report.duration_seconds)
        if dead_letter_depth is not None:
            self.dead_letter_depth.set(dead_letter_depth)

    def record_api_calls(self, counts_delta: Mapping[str, int]) -> None:
        """HTTP requests per system since the last recording."""
        for system, count in counts_delta.items():
            if count > 0:
                self.api_calls.add(count, {"system": system})

    def record_api_call_totals(self, totals: Mapping[str, int]) -> None:
        """Record the increase of running per-system totals (`CallCounter.snapshot()`) since the last call.

        The controller and the webhook path both report from one process-wide counter; the lock keeps two
        concurrent reports from counting the same requests twice.
        """
        with self._api_lock:
            delta = {system: total - self._api_seen.get(system, 0) for system, total in totals.items()}
            self._api_seen.update(totals)
        self.record_api_calls(delta)

    def record_drift(self, flow: str, count: int) -> None:
        """Drift of one flow found by a reconciliation: the gauge, and the log line the drift alert queries."""
        self.reconcile_drift.set(count, {"flow": flow})
        # INFO, like "controller cycle ok": the host ships it as a trace, a CLI run keeps its stderr quiet.
        log.info("reconciliation drift %d in flow %s", count, flow)

    def record_breaker(self, system: str, state: str) -> None:
        """A circuit breaker's transition (the breaker-open alert counts the "open" ones)."""
        self.breaker_transitions.add(1, {"system": system, "state": state})
        self.breaker_open.set(0 if state == "closed" else 1, {"system": system})

    def _direction(self, flow: str, flowset: FlowSet) -> str:
        direction = self._directions.get(flow)
        if direction is None:
            try:
                spec = flowset.flow(flow)
                direction = f"{spec.source.system}->{spec.target.system}"
            except Exception:  # an outcome for a flow the spec no longer has still counts
                direction = "unknown"
            self._directions[flow] = direction
        return direction
