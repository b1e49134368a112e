"""Reconciliation reads page by page: bounded memory, exact counts with the first keys, and an API budget."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Sequence

import pytest

from shared.core.ports import SourceRecord
from shared.mapping.spec import parse_spec
from shared.ops.reconciliation import SAMPLE, ApiBudget, reconcile_report

SPEC = parse_spec("""
spec_version: 1
name: paging
systems: [a, b]
flows:
  - name: items_out
    entity: item
    source: {system: a, table: Items, key_field: Id}
    target: {system: b, table: Things, key_field: Id}
    mode: queue
    link: {target_field: A_ID}
    fields:
      - {source: Name, target: Title, owner: a}
""")


class Live:
    """Counts the records alive right now (a weakref finaliser per record) and the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def made(self, record: SourceRecord) -> SourceRecord:
        self.now += 1
        self.peak = max(self.peak, self.now)
        weakref.finalize(record, self._gone)
        return record

    def _gone(self) -> None:
        self.now -= 1


class LazySystem:
    """A system of `count` records whose pages are generated when read (nothing held between reads).

    In system "a" record i is `A{i}`, in "b" it is `B{i}`; `drift(i)` says whether "b" holds another title,
    `missing(i)` whether "b" lacks it; "b" also holds `orphans` records nobody links to.
    """

    def __init__(self, system: str, count: int, page: int, live: Live, *, drift=lambda i: False,
                 missing=lambda i: False, orphans: int = 0) -> None:
        self.system, self.count, self.page, self.live = system, count, page, live
        self.drift, self.missing, self.orphans = drift, missing, orphans
        self.calls = 0

    def _record(self, i: int) -> SourceRecord | None:
        if self.system == "a":
            return self.live.made(SourceRecord(f"A{i}", {"Id": f"A{i}", "Name": f"item {i}"}))
        if i >= self.count:
            return self.live.made(SourceRecord(f"B{i}", {"Id": f"B{i}", "Title": "stray"}))
        if self.missing(i):
            return None
        title = f"item {i}" + (" (edited)" if self.drift(i) else "")
        return self.live.made(SourceRecord(f"B{i}", {"Id": f"B{i}", "Title": title, "A_ID": f"A{i}"}))

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        total = self.count + (self.orphans if self.system == "b" else 0)
        for start in range(0, total, self.page):
            self.calls += 1
            page = [r for i in range(start, min(start + self.page, total)) if (r := self._record(i)) is not None]
            yield page
            del page

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        self.calls += 1
        out: dict[str, SourceRecord] = {}
        for key in keys:
            record = self._record(int(key[1:]))
            if record is not None:
                out[key] = record
        return out


class Links:
    """Every A<i> is linked to B<i> (i < count), both ways; only get_links is used by reconciliation."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def get_links(self, entity: str, system: str, keys: Sequence[str], other_system: str) -> dict[str, str]:
        other = "B" if system == "a" else "A"
        return {k: f"{other}{k[1:]}" for k in keys if int(k[1:]) < self.count}


async def test_at_most_two_pages_of_records_are_alive_at_once_and_the_counts_are_exact():
    live = Live()
    count, page = 5000, 100
    a = LazySystem("a", count, page, live)
    b = LazySystem("b", count, page, live, drift=lambda i: i % 7 == 0, missing=lambda i: i % 11 == 0, orphans=250)
    report = await reconcile_report(SPEC, {"a": a, "b": b}, Links(count))
    [items] = report.entities
    assert live.peak <= 2 * page  # a page and the records it links to, never more (5,250 records were read)
    assert (items.source_records, items.target_records) == (count, count - len(range(0, count, 11)) + 250)
    missing = len(range(0, count, 11))
    drifted = len([i for i in range(count) if i % 7 == 0 and i % 11 != 0])
    assert (items.missing_count, items.field_drift_count, items.orphan_count) == (missing, drifted, 250)
    assert items.linked == count - missing
    assert items.drift == missing + drifted == report.total_drift
    # Only the first keys are kept, in reading order.
    assert items.missing_in_target == [f"A{i}" for i in range(0, 11 * SAMPLE, 11)]
    assert len(items.field_drift) == SAMPLE
    assert items.field_drift["A7"] == ["Title: expected 'item 7', found 'item 7 (edited)'"]
    assert items.orphans_in_target == [f"B{i}" for i in range(count, count + SAMPLE)]
    summary = report.summary()
    assert summary["status"] == "complete"
    assert summary["flows"]["items_out"]["missing"] == missing
    assert summary["flows"]["items_out"]["drifted"] == drifted
    assert summary["flows"]["items_out"]["orphaned"] == 250
    assert report.calls == {"a": a.calls, "b": b.calls}  # counted by reconciliation without a call counter


async def test_the_peak_does_not_grow_with_the_table():
    peaks = []
    for count in (1000, 10_000):
        live = Live()
        await reconcile_report(SPEC, {"a": LazySystem("a", count, 50, live), "b": LazySystem("b", count, 50, live)},
                               Links(count))
        peaks.append(live.peak)
    assert peaks[0] == peaks[1] <= 100


async def test_a_tiny_budget_stops_paging_that_system_and_marks_the_report_partial():
    live = Live()
    a = LazySystem("a", 1000, 100, live)
    b = LazySystem("b", 1000, 100, live, drift=lambda i: True)
    report = await reconcile_report(SPEC, {"a": a, "b": b}, Links(1000), budget=ApiBudget({"b": 3}))
    [items] = report.entities
    assert report.partial
    assert items.partial
    assert report.partial_reasons == ["items_out: stopped, b: API budget of 3 calls reached (3 spent)"]
    assert b.calls == 3  # not one call more than the budget
    assert items.source_records == 300
    assert items.field_drift_count == 300
    summary = report.summary()
    assert summary["status"] == "partial"
    assert summary["reasons"] == report.partial_reasons
    assert summary["calls"] == {"a": 4, "b": 3}  # the fourth page of "a" was read, its targets were not


async def test_a_budget_counted_by_the_call_counter_of_the_process():
    totals = {"a": 0, "b": 0}

    class Counted(LazySystem):
        async def fetch(self, table, keys):
            totals[self.system] += 2  # say, a token request and the query
            return await super().fetch(table, keys)

    live = Live()
    report = await reconcile_report(SPEC, {"a": LazySystem("a", 500, 100, live), "b": Counted("b", 500, 100, live)},
                                    Links(500), budget=ApiBudget({"b": 4}, lambda: dict(totals)))
    assert report.partial_reasons == ["items_out: stopped, b: API budget of 4 calls reached (4 spent)"]
    assert report.calls == {"b": 4}


@pytest.mark.parametrize("budget", [ApiBudget({"a": 0})])
async def test_a_spent_system_is_not_read_at_all(budget):
    live = Live()
    a = LazySystem("a", 10, 5, live)
    report = await reconcile_report(SPEC, {"a": a, "b": LazySystem("b", 10, 5, live)}, Links(10), budget=budget)
    assert a.calls == 0
    assert report.partial_reasons == ["items_out: stopped, a: API budget of 0 calls reached (0 spent)"]
