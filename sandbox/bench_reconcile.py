"""Peak memory of a reconciliation against its table size: lazily paged fake systems, tracemalloc's peak.

    python -m sandbox.bench_reconcile [--records 10000 100000] [--page 1000]

Each system generates its pages when read (nothing is held between reads), so the peak is what reconciliation
keeps alive; drift in every 7th record and a missing one in every 11th make it keep its samples and counts too.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import tracemalloc
from collections.abc import AsyncIterator, Sequence

from shared.core.ports import SourceRecord
from shared.mapping.spec import parse_spec
from shared.ops.reconciliation import reconcile_report

SPEC = parse_spec("""
spec_version: 1
name: bench
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
      - {source: Note, target: Note, owner: a}
""")


class Lazy:
    """System "a" holds A0..A<n-1>; "b" holds B<i> for each (but every 11th), every 7th with another title."""

    def __init__(self, system: str, count: int, page: int) -> None:
        self.system, self.count, self.page = system, count, page

    def _record(self, i: int) -> SourceRecord | None:
        note = "x" * 200  # a realistic record weighs something
        if self.system == "a":
            return SourceRecord(f"A{i:08d}", {"Id": f"A{i:08d}", "Name": f"item {i}", "Note": note})
        if i % 11 == 0:
            return None
        title = f"item {i}" + (" (edited)" if i % 7 == 0 else "")
        return SourceRecord(f"B{i:08d}", {"Id": f"B{i:08d}", "Title": title, "Note": note, "A_ID": f"A{i:08d}"})

    async def scan(self, table: str) -> AsyncIterator[list[SourceRecord]]:
        for start in range(0, self.count, self.page):
            yield [r for i in range(start, min(start + self.page, self.count)) if (r := self._record(i))]

    async def fetch(self, table: str, keys: Sequence[str]) -> dict[str, SourceRecord]:
        return {k: r for k in keys if (r := self._record(int(k[1:]))) is not None}


class Links:
    async def get_links(self, entity: str, system: str, keys: Sequence[str], other_system: str) -> dict[str, str]:
        other = "B" if system == "a" else "A"
        return {k: other + k[1:] for k in keys}


async def measure(count: int, page: int) -> tuple[float, float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    report = await reconcile_report(SPEC, {"a": Lazy("a", count, page), "b": Lazy("b", count, page)}, Links())
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 1e6, elapsed, report.total_drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--page", type=int, default=1000)
    args = parser.parse_args()
    for count in args.records:
        peak, elapsed, drift = asyncio.run(measure(count, args.page))
        print(f"{count:>9,} records, pages of {args.page}: peak {peak:6.2f} MB traced, drift {drift:,}, "
              f"{elapsed:.1f} s")


if __name__ == "__main__":
    main()
