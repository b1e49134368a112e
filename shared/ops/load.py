"""The resumable initial load of one flow (a new tenant's first sync): `syncline load` and the admin function.

How it pages and resumes (every connector's `ChangeSource.scan` reads in a stable key order: Dataverse by
primary id through its paging cookie, ArcGIS `ORDER BY objectId`, Salesforce `ORDER BY Id`, SAP `$orderby` key
with `$top`/`$skip`, F&O server paging by key): the checkpoint `load:<flow>` keeps the count of source records
consumed (`position`) and the key of the last one. A resume reads the source again from the start and skips
`position` records without writing them (reads only; no connector's scan has a continuation that survives a
crash: nextLinks and query locators expire, offsets shift), then checks that the record it skipped last is
`last_key`. When the source changed order in between (a record created or deleted before that point), it
replays from the start instead: the engine's snapshots and links make every record already loaded a no-op, so
nothing is written twice. `--since` filters the scan on each record's modified time (see `_in_window`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from shared.bootstrap import Services, build_services
from shared.core.controller import envelopes_for
from shared.core.ports import Checkpoint, CheckpointConflictError, SourceRecord
from shared.mapping.spec import FlowSpec
from shared.ops.writes import IntakeResult, write_direct

log = logging.getLogger(__name__)

LOAD_PREFIX = "load:"
"""Checkpoint `load:<flow>` holds the JSON `LoadState` of that flow's initial load."""

LoadStatus = Literal["running", "stopped", "paused", "complete"]
STALE_SECONDS = 600.0
"""A load whose checkpoint has not moved for this long is taken as dead: another run may take it over (a load on
the same host whose process is gone is stale at once). Far longer than the slowest batch with its retries."""
DEFAULT_MAX_SECONDS = 180.0
"""Time budget of one admin-function call: the batch in flight when it runs out still finishes, and an HTTP
trigger must answer within 230 s (the front end's idle timeout, whatever the function timeout)."""
MAX_SECONDS = 200.0
"""The most time budget a caller may ask of one admin-function call (see DEFAULT_MAX_SECONDS)."""

Outcome = Literal["complete", "nothing", "already_complete", "partial", "paused", "interrupted"]


class LoadBusyError(Exception):
    """Another load of the same flow holds its checkpoint (not stale): two loads never run at once."""

    def __init__(self, flow: str, started_at: str, updated_at: str, owner: str) -> None:
        self.flow, self.started_at, self.updated_at, self.owner = flow, started_at, updated_at, owner
        super().__init__(f"a load of flow {flow} is already running (started at {started_at}, last progress "
                         f"{updated_at}, by {owner}); wait for it, or for it to go stale, then run it again")


@dataclass
class LoadState:
    """The checkpoint's JSON: where the load of one flow is, and who holds it."""

    flow: str
    since: str | None
    position: int = 0
    """Source records consumed in scan order (loaded or outside the --since window)."""
    last_key: str | None = None
    """Key of the record at `position - 1`: a resume checks the source still has it there."""
    loaded: int = 0
    """Records handed to the engine (inside the window)."""
    written: int = 0
    skipped: int = 0
    queued: int = 0
    status: LoadStatus = "running"
    owner: str = ""
    started_at: str = ""
    updated_at: str = ""
    completed_at: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoadState | None:
        try:
            data = json.loads(text)
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return None  # an unreadable checkpoint is started over, never trusted


@dataclass
class LoadProgress:
    """What the progress callback hears after each committed batch."""

    flow: str
    position: int
    loaded: int
    rate: float
    """Records consumed per second in this run."""


@dataclass
class LoadReport:
    """What one `load_flow` call did; the CLI prints it and the admin function answers it as JSON."""

    flow: str
    outcome: Outcome
    message: str
    since: str | None = None
    resumed_at: int | None = None
    """The record the run resumed at (None: it started from zero)."""
    position: int = 0
    loaded: int = 0
    written: int = 0
    skipped: int = 0
    queued: int = 0
    this_run: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    paused: dict[str, str] = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)
    """Same-direction parent flows whose load is not complete (children may defer, see `parent_note`)."""

    @property
    def complete(self) -> bool:
        return self.outcome in ("complete", "nothing", "already_complete")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["complete"] = self.complete
        out["resumed"] = self.resumed_at is not None
        out["next"] = None if self.complete else "call again to continue"
        return out


def owner_id() -> str:
    """host:pid:random: a load on this host whose process is gone is stale at once (kill -9, a crash)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _stale(state: LoadState, now: datetime, stale_seconds: float) -> bool:
    host, _, rest = state.owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
    try:
        updated = datetime.fromisoformat(state.updated_at)
    except ValueError:
        return True
    return (now - updated).total_seconds() > stale_seconds


def parse_since(text: str | None) -> datetime | None:
    """A date or ISO date-time (UTC when no offset); ValueError with a one-line message otherwise."""
    if text is None or not text.strip():
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is not a date (YYYY-MM-DD or an ISO date-time)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _in_window(record: SourceRecord, since: datetime | None) -> bool:
    """Inside the --since window: modified at or after it. A record whose modified time the connector could not
    read (modified None) is loaded: re-pushing an in-sync record is a no-op, skipping a changed one is a loss.
    Modified times per system: Dataverse `modifiedon`, ArcGIS editor tracking `EditDate`, Salesforce
    `SystemModstamp`, F&O the entity's modified field where it has one (else None), SAP sales orders'
    LastChangeDateTime and business partners' LastChangeDate+Time (else None). docs/operations.md says why the
    change feeds do not serve here."""
    if record.deleted:
        return False
    return since is None or record.modified is None or record.modified >= since


def same_direction_parents(services: Services, flow: FlowSpec) -> list[FlowSpec]:
    """The flows whose records this flow's lookups bind (same source system), nearest first."""
    return [p for lk in flow.lookups if (p := services.flowset.flow(lk.parent_flow)).source.system ==
            flow.source.system]


class _Load:
    """One run of one flow's load: holds the checkpoint (CAS on its etag) while it writes."""

    def __init__(self, services: Services, flow: FlowSpec, *, clock: Callable[[], datetime],
                 stale_seconds: float) -> None:
        self.services, self.flow, self.clock, self.stale_seconds = services, flow, clock, stale_seconds
        self.name = LOAD_PREFIX + flow.name
        self.owner = owner_id()
        self.etag: str | None = None
        self.state = LoadState(flow.name, None)

    async def claim(self, since: datetime | None, restart: bool) -> tuple[LoadState | None, Checkpoint | None]:
        """Read the checkpoint; raise LoadBusyError when a live load holds it. Returns (previous state, point)."""
        point = await self.services.state.get_checkpoint(self.name)
        previous = LoadState.from_json(point.value) if point is not None else None
        if previous is not None and previous.status == "running" and \
                not _stale(previous, self.clock(), self.stale_seconds):
            raise LoadBusyError(self.flow.name, previous.started_at, previous.updated_at, previous.owner)
        return (None if restart else previous), point

    async def save(self, status: LoadStatus) -> None:
        self.state.status = status
        self.state.owner = self.owner
        self.state.updated_at = self.clock().isoformat()
        try:
            point = await self.services.state.put_checkpoint(self.name, self.state.to_json(),
                                                             expected_etag=self.etag)
        except CheckpointConflictError:
            current = await self.services.state.get_checkpoint(self.name)
            other = LoadState.from_json(current.value) if current else None
            raise LoadBusyError(self.flow.name, other.started_at if other else "?",
                                other.updated_at if other else "?", other.owner if other else "?") from None
        self.etag = point.etag


async def _paused(services: Services, flow: FlowSpec) -> dict[str, str]:
    """The flow's systems (target, then source: lines and id write-back call it) that are paused, with until when."""
    out: dict[str, str] = {}
    for system in dict.fromkeys((flow.target.system, flow.source.system)):
        until = await services.controller.paused_until(system)
        if until is not None:
            out[system] = until.isoformat()
    return out


async def _records(services: Services, flow: FlowSpec) -> AsyncIterator[SourceRecord]:
    source = services.sources[flow.source.system]
    async for page in source.scan(flow.source.table):
        for record in page:
            yield record


async def load_flow(services: Services, flow_name: str, *, since: str | None = None, restart: bool = False,
                    max_seconds: float | None = None, progress: Callable[[LoadProgress], None] | None = None,
                    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                    stale_seconds: float = STALE_SECONDS,
                    announce: Callable[[str], None] | None = None) -> LoadReport:
    """Load every record of `flow_name`'s source table (or those modified since `since`) through the engine.

    Resumes from the checkpoint `load:<flow>` (`restart` starts over); stops cleanly, checkpoint saved, when
    `max_seconds` have passed (outcome "partial") or the flow's target or source is paused ("paused").
    Raises SpecError(UNKNOWN_FLOW), ValueError (a bad `since`) and LoadBusyError.
    """
    flow = services.flowset.flow(flow_name)
    since_at = parse_since(since)
    if flow.source.system not in services.sources:
        raise ValueError(f"flow {flow.name}: {flow.source.system} is not configured")
    run = _Load(services, flow, clock=clock, stale_seconds=stale_seconds)
    previous, point = await run.claim(since_at, restart)
    if previous is not None and previous.status == "complete":
        return LoadReport(flow.name, "already_complete", f"flow {flow.name}: already complete at "
                          f"{previous.completed_at} ({previous.loaded} records); use --restart to load it again",
                          since=previous.since, position=previous.position, loaded=previous.loaded,
                          written=previous.written, skipped=previous.skipped, queued=previous.queued)
    if previous is not None and previous.position > 0 and since_at is not None \
            and previous.since != since_at.isoformat():
        raise ValueError(f"flow {flow.name}: the load in progress was started with --since {previous.since}; "
                         "resume it without --since, or use --restart")
    now = clock().isoformat()
    resumed_at: int | None = None
    if previous is not None and (previous.position > 0 or since_at is None):
        run.state = previous  # its --since too: a resume loads the same window
        resumed_at = previous.position or None
    else:
        run.state = LoadState(flow.name, since_at.isoformat() if since_at else None, started_at=now)
    if not run.state.started_at:
        run.state.started_at = now
    window = datetime.fromisoformat(run.state.since) if run.state.since else None
    run.etag = point.etag if point is not None else None
    await run.save("running")  # CAS: a second load racing this one loses here
    report = LoadReport(flow.name, "complete", "", since=run.state.since, resumed_at=resumed_at,
                        parents=await _unloaded_parents(services, flow))
    say = announce or (lambda _text: None)
    if resumed_at is not None:
        say(f"flow {flow.name}: resuming at record {resumed_at}"
            + (f" (since {run.state.since})" if run.state.since else ""))
    if report.parents:
        say(parent_note(flow.name, report.parents))
    started = time.monotonic()
    try:
        outcome = await _run(services, run, window, resumed_at or 0, report, started, max_seconds, progress)
        if outcome == "complete":
            run.state.completed_at = clock().isoformat()
            await run.save("complete")
    except asyncio.CancelledError:  # Ctrl-C: what was committed stays committed, the next run resumes there
        await asyncio.shield(_release(run))
        raise
    except LoadBusyError:
        raise
    except Exception:
        await _release(run)  # a failed run is resumable at once, not "running" until it goes stale
        raise
    return _finish(report, run.state, outcome, started)


async def _release(run: _Load) -> None:
    try:
        await run.save("stopped")
    except Exception as exc:  # the state store is down too: the checkpoint goes stale instead
        log.warning("flow %s: could not mark the load stopped (%s)", run.flow.name, type(exc).__name__)


async def _run(services: Services, run: _Load, window: datetime | None, skip: int, report: LoadReport,
               started: float, max_seconds: float | None, progress: Callable[[LoadProgress], None] | None) -> Outcome:
    flow, state = run.flow, run.state
    batch_size = services.settings.syncline_batch_size
    while True:  # at most twice: a resume whose source moved under it replays from the start
        index, buffer, key = 0, [], state.last_key
        replay = False
        async for record in _records(services, flow):
            index, key = index + 1, record.key
            if index <= skip:
                if index == skip and record.key != state.last_key:
                    replay = True
                    break
                if index == skip:
                    _tell(progress, state, started, skip)  # skipped up to the checkpoint: the bar starts there
                continue
            if _in_window(record, window):
                buffer.append(record)
            if len(buffer) >= batch_size:
                stop = await _before_batch(services, run, report, started, max_seconds)
                if stop:
                    return stop
                await _write(services, run, buffer, index, record.key)
                report.this_run += len(buffer)
                buffer = []
                _tell(progress, state, started, skip)
        if not replay and index < skip:
            replay = True  # the source shrank below the checkpoint: records were deleted before it
        if replay:
            log.warning("flow %s: the source changed order since the checkpoint (record %d is no longer %s); "
                        "replaying from the start (records already loaded are no-ops)", flow.name, skip,
                        state.last_key)
            skip, state.loaded = 0, 0
            report.resumed_at = None
            continue
        if buffer:
            stop = await _before_batch(services, run, report, started, max_seconds)
            if stop:
                return stop
            report.this_run += len(buffer)
            await _write(services, run, buffer, index, key)
        elif index > state.position:  # records outside the --since window at the end
            state.position, state.last_key = index, key
        _tell(progress, state, started, skip)
        return "complete"


async def _before_batch(services: Services, run: _Load, report: LoadReport, started: float,
                        max_seconds: float | None) -> Outcome | None:
    """Stop before a batch when a system is paused (breaker open) or the time budget is spent."""
    paused = await _paused(services, run.flow)
    if paused:
        report.paused = paused
        await run.save("paused")
        return "paused"
    if max_seconds is not None and time.monotonic() - started >= max_seconds:
        await run.save("stopped")
        return "partial"
    return None


async def _write(services: Services, run: _Load, records: list[SourceRecord], position: int,
                 last_key: str | None) -> None:
    """One batch through the direct-write path, then the checkpoint (a crash between the two replays the batch,
    which the engine finds in sync: nothing is written twice)."""
    state, flow = run.state, run.flow
    if records:
        envelopes = [e for e in envelopes_for(services.flowset, flow.source.system, flow.source.table, records,
                                              origin="initial") if e.flow == flow.name]
        result = IntakeResult()
        await write_direct(services, envelopes, result)
        state.loaded += len(records)
        state.written += result.written
        state.skipped += result.skipped
        state.queued += result.queued
    state.position, state.last_key = position, last_key
    await run.save("running")


def _tell(progress: Callable[[LoadProgress], None] | None, state: LoadState, started: float, skip: int) -> None:
    if progress is not None:
        elapsed = max(time.monotonic() - started, 1e-6)
        progress(LoadProgress(state.flow, state.position, state.loaded, (state.position - skip) / elapsed))


def _finish(report: LoadReport, state: LoadState, outcome: Outcome, started: float) -> LoadReport:
    report.outcome = outcome
    report.seconds = round(time.monotonic() - started, 3)
    report.position, report.loaded = state.position, state.loaded
    report.written, report.skipped, report.queued = state.written, state.skipped, state.queued
    report.rate = round(report.this_run / report.seconds, 1) if report.seconds else 0.0
    window = f" since {state.since}" if state.since else ""
    if outcome == "complete" and state.loaded == 0:
        report.outcome = "nothing"
        report.message = f"flow {state.flow}: nothing to load (0 records{window or ' in the source'})"
    elif outcome == "complete":
        report.message = (f"flow {state.flow}: loaded {state.loaded} records{window} ({state.written} written, "
                          f"{state.skipped} already in sync, {state.queued} queued)")
    elif outcome == "paused":
        systems = ", ".join(f"{s} is paused until {u}" for s, u in report.paused.items())
        report.message = f"{systems}; stopped at record {state.position}; resume with `syncline load {state.flow}`"
    else:
        report.message = (f"flow {state.flow}: stopped at record {state.position} (time budget spent); "
                          "call again to continue")
    return report


def parent_note(flow: str, parents: list[str]) -> str:
    """What loading a child before its parents means (the engine's rules, unchanged by the load)."""
    names = ", ".join(parents)
    return (f"flow {flow} has parent flow(s) not loaded yet: {names}. A record whose parent is not linked is "
            "synced with its parent first where the lookup says `ensure`, otherwise deferred to the queue until "
            f"the parent syncs: load {names} first (`syncline load <parent>`) for a load without deferrals")


async def _unloaded_parents(services: Services, flow: FlowSpec) -> list[str]:
    out: list[str] = []
    for parent in same_direction_parents(services, flow):
        point = await services.state.get_checkpoint(LOAD_PREFIX + parent.name)
        state = LoadState.from_json(point.value) if point is not None else None
        if state is None or state.status != "complete":
            out.append(parent.name)
    return out


class LoadRequest(BaseModel):
    """The admin function's optional JSON body; anything else is refused (400)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    since: str | None = None
    restart: bool = False
    max_seconds: float = Field(default=DEFAULT_MAX_SECONDS, gt=0, le=MAX_SECONDS)

    @classmethod
    def parse(cls, body: bytes) -> LoadRequest:
        """The request from a body (empty: defaults); ValueError with one line on anything malformed."""
        if not body.strip():
            return cls()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("the body is not JSON; send {\"since\": \"YYYY-MM-DD\", \"restart\": false, "
                             "\"max_seconds\": 180} or nothing") from None
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        if isinstance(data.get("max_seconds"), int) and not isinstance(data.get("max_seconds"), bool):
            data["max_seconds"] = float(data["max_seconds"])  # strict mode takes no int for a float
        try:
            request = cls.model_validate(data)
        except PydanticValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ValueError(f"{where}: {first['msg']}") from None
        parse_since(request.since)
        return request


async def run_load(flow_name: str, *, since: str | None, restart: bool, max_seconds: float | None,
                   progress: Callable[[LoadProgress], None] | None = None,
                   announce: Callable[[str], None] | None = None) -> LoadReport:
    """The CLI's load: build the services from the settings, load, close them."""
    services = build_services()
    try:
        return await load_flow(services, flow_name, since=since, restart=restart, max_seconds=max_seconds,
                               progress=progress, announce=announce)
    finally:
        await services.aclose()
