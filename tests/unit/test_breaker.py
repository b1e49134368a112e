"""The circuit breaker's pure state machine (shared/core/breaker.py) and the store-backed board's transitions,
on a fake clock: when it opens, how long it stays open, who probes, and what it does to nobody else."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.breaker import BREAKER_PREFIX, Breaker, BreakerPolicy, FailureCounter, counts_against, opened, probing
from shared.core.controller import PAUSE_PREFIX, Breakers
from shared.core.errors import (
    AmbiguousWriteError,
    AuthError,
    MappingError,
    ParentPendingError,
    RecordBusyError,
    RejectedError,
    RetriableError,
    ThrottledError,
    TransientError,
    ValidationError,
)
from shared.runtime.embedded import SqliteStateStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RATE_OFF = {"min_calls": 10**9}


# ================================================================================================ pure logic


def test_only_failures_of_the_system_count_against_it():
    for error in (TransientError("arcgis: HTTP 503"), ThrottledError("429"), AmbiguousWriteError("504"),
                  RetriableError("reset")):
        assert counts_against(error), error
    for error in (ValidationError("missing"), MappingError("unmapped"), RejectedError("400"), AuthError("401"),
                  ParentPendingError("parent"), RecordBusyError("busy")):
        assert not counts_against(error), error


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=60), st.integers(min_value=1, max_value=8))
def test_consecutive_failures_open_exactly_at_the_threshold(calls: list[bool], threshold: int):
    counter = FailureCounter(BreakerPolicy(consecutive_failures=threshold, **RATE_OFF))  # type: ignore[arg-type]
    run = 0
    for n, failed in enumerate(calls):
        why = counter.record(T0 + timedelta(seconds=n), failed=failed)
        run = run + 1 if failed else 0
        assert (why is not None) == (run >= threshold), (calls[:n + 1], why)
        if why is not None:
            assert why == f"{run} consecutive failure{'s' if run != 1 else ''}"
            counter.reset()
            run = 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=30, allow_nan=False), st.booleans()), max_size=50),
       st.floats(min_value=0.1, max_value=1.0), st.integers(min_value=1, max_value=12),
       st.floats(min_value=1, max_value=90))
def test_the_error_rate_opens_within_its_window_with_enough_calls(steps, rate, min_calls, window):
    policy = BreakerPolicy(consecutive_failures=10**9, error_rate=rate, min_calls=min_calls, window_seconds=window)
    counter = FailureCounter(policy)
    now = T0
    seen: list[tuple[datetime, bool]] = []
    for gap, failed in steps:
        now += timedelta(seconds=gap)
        seen.append((now, failed))
        inside = [f for t, f in seen if t >= now - timedelta(seconds=window)]
        expected = failed and len(inside) >= min_calls and sum(inside) / len(inside) >= rate
        why = counter.record(now, failed=failed)
        assert (why is not None) == expected
        if why is not None:
            assert why.startswith(f"error rate {sum(inside)}/{len(inside)}")
            counter.reset()
            seen.clear()


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=12), st.floats(min_value=1, max_value=600),
       st.floats(min_value=1, max_value=5000), st.floats(min_value=1, max_value=4))
def test_failed_probes_grow_the_cool_down_up_to_its_cap(failed_probes, cooldown, cap, backoff):
    policy = BreakerPolicy(cooldown_seconds=cooldown, max_cooldown_seconds=max(cap, cooldown), backoff=backoff)
    now = T0
    breaker = opened(None, now, "outage", 5, policy)
    assert breaker.cooldown_seconds == cooldown
    for _ in range(failed_probes):
        now = breaker.probe_at or now
        assert breaker.probe_due(now)
        half = probing(breaker, now, policy)
        assert half.state == "half_open"
        assert not half.probe_due(now)
        assert half.blocked_until(now) == now + timedelta(seconds=policy.probe_lease_seconds)
        again = opened(half, now, "probe failed", 0, policy)
        assert cooldown <= again.cooldown_seconds <= policy.max_cooldown_seconds
        assert again.cooldown_seconds == min(max(breaker.cooldown_seconds * backoff, cooldown),
                                             policy.max_cooldown_seconds)
        assert again.probe_at == now + timedelta(seconds=again.cooldown_seconds)
        breaker = again


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["closed", "open", "half_open"]), st.integers(min_value=-600, max_value=600),
       st.integers(min_value=0, max_value=99), st.text(max_size=40))
def test_a_breaker_is_either_callable_blocked_or_due_and_survives_its_json(state, offset, failures, cause):
    probe_at = None if state == "closed" else T0 + timedelta(seconds=offset)
    breaker = Breaker(state, T0, cause, failures, probe_at, 60.0)  # type: ignore[arg-type]
    assert Breaker.from_json(breaker.to_json()) == breaker
    blocked, due = breaker.blocked_until(T0), breaker.probe_due(T0)
    assert not (blocked and due)
    if state == "closed":
        assert blocked is None
        assert not due
    else:
        assert (blocked is not None) == (offset > 0)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"state": "melted"}', '{"state": "open", "probe_at": 5}', "null"])
def test_an_unreadable_breaker_is_a_closed_one(text):
    assert Breaker.from_json(text) == Breaker()


# ===================================================================================== the store-backed board


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Sink:
    """A target whose ping fails while `down` (as ArcGIS's service definition read fails in an outage)."""

    def __init__(self) -> None:
        self.down = True
        self.pings = 0
        self.gate: asyncio.Event | None = None

    async def ping(self) -> None:
        self.pings += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise TransientError("arcgis answered 503")


@pytest.fixture
async def store(tmp_path: Path):
    state = SqliteStateStore(tmp_path / "state.db")
    try:
        yield state
    finally:
        await state.close()


class Spy:
    def __init__(self) -> None:
        self.transitions: list[tuple[str, str]] = []

    def record_breaker(self, system: str, state: str) -> None:
        self.transitions.append((system, state))


def board(store, clock, sink, spy=None, **policy):
    return Breakers(store, clock=clock, policy=replace(BreakerPolicy(cooldown_seconds=30, **RATE_OFF), **policy),
                    metrics=spy, sinks={"arcgis": sink})


async def test_a_healthy_system_costs_no_state_write_and_an_outage_opens_it_once(store, caplog):
    caplog.set_level(logging.WARNING, logger="shared")  # whatever an earlier test in the process left
    clock, sink, spy = Clock(), Sink(), Spy()
    breakers = board(store, clock, sink, spy, consecutive_failures=3)
    for _ in range(20):
        await breakers.record("arcgis", failed=False)
    assert await store.get_checkpoint(BREAKER_PREFIX + "arcgis") is None  # counted in the process only
    assert await breakers.paused_until("arcgis") is None
    for _ in range(2):
        await breakers.record("arcgis", failed=True, cause="TRANSIENT: arcgis answered 503")
    assert await breakers.paused_until("arcgis") is None
    await breakers.record("arcgis", failed=True, cause="TRANSIENT: arcgis answered 503")
    assert await breakers.paused_until("arcgis") == T0 + timedelta(seconds=30)
    stored = Breaker.from_json((await store.get_checkpoint(BREAKER_PREFIX + "arcgis")).value)  # type: ignore[union-attr]
    assert (stored.state, stored.failures, stored.since) == ("open", 3, T0)
    assert stored.cause == "3 consecutive failures; last: TRANSIENT: arcgis answered 503"
    assert spy.transitions == [("arcgis", "open")]
    assert "circuit breaker of arcgis opened until 2026-03-01T12:00:30+00:00" in caplog.text
    assert sink.pings == 0  # nobody called it while open


async def test_the_probe_after_the_cool_down_reopens_longer_then_closes(store, caplog):
    caplog.set_level(logging.INFO, logger="shared.core.controller.breakers")
    clock, sink, spy = Clock(), Sink(), Spy()
    breakers = board(store, clock, sink, spy, consecutive_failures=1)
    await breakers.record("arcgis", failed=True, cause="outage")
    clock.advance(29)
    assert await breakers.paused_until("arcgis") == T0 + timedelta(seconds=30)
    assert sink.pings == 0
    clock.advance(1)
    # still down: the one probe fails and the breaker re-opens for twice the cool-down
    assert await breakers.paused_until("arcgis") == clock.now + timedelta(seconds=60)
    assert sink.pings == 1
    assert (await breakers.get("arcgis")).cause.startswith("probe failed: TRANSIENT: arcgis answered 503")
    clock.advance(60)
    sink.down = False
    assert await breakers.paused_until("arcgis") is None
    assert sink.pings == 2
    assert (await breakers.get("arcgis")).state == "closed"
    assert spy.transitions == [("arcgis", "open"), ("arcgis", "half_open"), ("arcgis", "open"),
                               ("arcgis", "half_open"), ("arcgis", "closed")]
    assert "circuit breaker of arcgis closed: probe ping answered" in caplog.text
    # closed: calls go without a probe, and the next opening starts from the base cool-down again
    assert await breakers.paused_until("arcgis") is None
    assert sink.pings == 2
    await breakers.record("arcgis", failed=True, cause="outage")
    assert (await breakers.get("arcgis")).cooldown_seconds == 30


async def test_without_a_ping_the_first_call_is_the_probe(store):
    clock = Clock()
    breakers = Breakers(store, clock=clock, policy=BreakerPolicy(consecutive_failures=1, cooldown_seconds=10))
    await breakers.record("sap", failed=True, cause="SAP answered 503")
    clock.advance(10)
    assert await breakers.paused_until("sap") is None  # this caller probes with its own call
    other = Breakers(store, clock=clock)
    assert await other.paused_until("sap") == clock.now + timedelta(seconds=60)  # the probe's lease
    await breakers.record("sap", failed=False)
    assert await other.paused_until("sap") is None
    assert (await other.get("sap")).state == "closed"


async def test_two_instances_race_for_the_probe_and_only_one_probes(store):
    clock, sink = Clock(), Sink()
    sink.down, sink.gate = False, asyncio.Event()
    first, second = board(store, clock, sink), board(store, clock, sink)
    await first.trip("arcgis", "outage")
    clock.advance(30)
    racing = [asyncio.create_task(first.paused_until("arcgis")), asyncio.create_task(second.paused_until("arcgis"))]
    await asyncio.sleep(0.05)
    sink.gate.set()
    answers = await asyncio.gather(*racing)
    assert sink.pings == 1
    assert sorted(answers, key=lambda a: a is not None) == [None, clock.now + timedelta(seconds=60)]
    assert (await first.get("arcgis")).state == "closed"


async def test_a_spent_allocation_opens_until_the_advice_and_the_old_pause_is_migrated(store):
    clock = Clock()
    breakers = Breakers(store, clock=clock)
    until = T0 + timedelta(hours=6)
    assert await breakers.trip("salesforce", "API allocation spent", until=until) == until
    assert await breakers.paused_until("salesforce") == until
    # the same advice again, seconds later, writes nothing
    before = await store.get_checkpoint(BREAKER_PREFIX + "salesforce")
    clock.advance(2)
    await breakers.trip("salesforce", "API allocation spent", until=until + timedelta(seconds=2))
    assert (await store.get_checkpoint(BREAKER_PREFIX + "salesforce")).etag == before.etag  # type: ignore[union-attr]
    # A pause stored by an earlier version is honoured (migrated into the breaker), a past one ignored.
    await store.put_checkpoint(PAUSE_PREFIX + "fno", (T0 + timedelta(hours=1)).isoformat(), expected_etag=None)
    await store.put_checkpoint(PAUSE_PREFIX + "sap", (T0 - timedelta(hours=1)).isoformat(), expected_etag=None)
    fresh = Breakers(store, clock=clock)
    assert await fresh.paused_until("fno") is None  # the per-call check reads the breaker only
    await fresh.migrate_pauses(["fno", "sap"])  # the controller's first cycle in a process does this
    assert await fresh.paused_until("fno") == T0 + timedelta(hours=1)
    assert (await fresh.get("fno")).state == "open"
    assert await fresh.paused_until("sap") is None
    assert await store.get_checkpoint(BREAKER_PREFIX + "sap") is None


async def test_a_snapshot_reports_every_breaker_without_probing(store):
    clock, sink = Clock(), Sink()
    breakers = board(store, clock, sink, consecutive_failures=1)
    await breakers.record("arcgis", failed=True, cause="outage")
    clock.advance(300)  # long past the cool-down: a snapshot still does not probe
    snap = await breakers.snapshot(["arcgis", "dataverse"])
    assert snap == {
        "arcgis": {"state": "open", "since": T0.isoformat(), "cause": "1 consecutive failure; last: outage",
                   "failures": 1, "probe_at": (T0 + timedelta(seconds=30)).isoformat()},
        "dataverse": {"state": "closed", "since": None, "cause": "", "failures": 0, "probe_at": None},
    }
    assert sink.pings == 0


def test_the_settings_make_the_policy(monkeypatch):
    from shared.bootstrap import breaker_policy
    from shared.settings import Settings

    assert breaker_policy(Settings()) == BreakerPolicy()  # the settings' defaults are the policy's
    for name, value in {"FAILURES": "3", "ERROR_RATE": "0.25", "WINDOW_SECONDS": "120", "MIN_CALLS": "20",
                        "COOLDOWN_SECONDS": "30", "MAX_COOLDOWN_SECONDS": "600"}.items():
        monkeypatch.setenv(f"SYNCLINE_BREAKER_{name}", value)
    assert breaker_policy(Settings()) == BreakerPolicy(consecutive_failures=3, error_rate=0.25, window_seconds=120,
                                                       min_calls=20, cooldown_seconds=30, max_cooldown_seconds=600)
    monkeypatch.setenv("SYNCLINE_BREAKER_ERROR_RATE", "1.5")
    with pytest.raises(ValueError, match="syncline_breaker_error_rate"):
        Settings()


async def test_the_webhook_path_reads_a_closed_breaker_once_every_few_seconds(store, monkeypatch):
    clock = Clock()
    breakers = Breakers(store, clock=clock)
    other = Breakers(store, clock=clock)
    reads: list[str] = []
    real = store.get_checkpoint

    async def counted(name: str):
        reads.append(name)
        return await real(name)

    monkeypatch.setattr(store, "get_checkpoint", counted)
    for _ in range(10):
        assert await breakers.paused_until("arcgis", max_age_seconds=5) is None
    assert reads == [BREAKER_PREFIX + "arcgis"]
    await other.trip("arcgis", "outage seen by another instance")
    clock.advance(4)
    assert await breakers.paused_until("arcgis", max_age_seconds=5) is None  # seen up to 5 s late
    clock.advance(1)
    assert await breakers.paused_until("arcgis", max_age_seconds=5) == T0 + timedelta(seconds=60)
    assert await breakers.paused_until("arcgis", max_age_seconds=5) == T0 + timedelta(seconds=60)  # open: read
    assert await breakers.paused_until("arcgis") == T0 + timedelta(seconds=60)  # the default never trusts memory


OPS = st.lists(st.tuples(st.sampled_from(["fail", "ok", "ask", "advance", "toggle"]), st.integers(0, 1),
                         st.integers(1, 40)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_any_interleaving_of_two_instances_keeps_the_breaker_honest(ops):
    """Two instances share one store; whatever they do, in any order: the system is pinged only when a probe is
    due and only by the instance that took it, a closed answer is never given while the stored breaker blocks,
    and a probe that succeeds leaves the breaker closed."""
    import tempfile

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStateStore(Path(tmp) / "state.db")
            try:
                clock, sink = Clock(), Sink()
                boards = [board(store, clock, sink, consecutive_failures=2), board(store, clock, sink,
                                                                                consecutive_failures=2)]
                for op, who, amount in ops:
                    me = boards[who]
                    stored = Breaker.from_json(p.value) if (p := await store.get_checkpoint(
                        BREAKER_PREFIX + "arcgis")) else Breaker()
                    if op == "advance":
                        clock.advance(amount)
                    elif op == "toggle":
                        sink.down = not sink.down
                    elif op in ("fail", "ok"):
                        await me.record("arcgis", failed=op == "fail", cause="test")
                    else:
                        pings = sink.pings
                        answer = await me.paused_until("arcgis")
                        after = await me.get("arcgis")
                        if sink.pings > pings:  # it probed: only when due, once, and the answer is the outcome
                            assert stored.probe_due(clock.now), stored
                            assert sink.pings == pings + 1
                            assert after.state == ("open" if sink.down else "closed")
                            assert (answer is None) == (not sink.down)
                        elif answer is None:
                            assert stored.blocked_until(clock.now) is None, stored
                        else:
                            assert answer > clock.now
                    now_stored = await boards[0].get("arcgis")
                    if now_stored.state != "closed":
                        assert now_stored.probe_at is not None
                        assert now_stored.since is not None
                        assert now_stored.probe_at >= now_stored.since
            finally:
                await store.close()

    asyncio.run(run())
