"""The per-record snapshot layout of earlier versions is probed once per table while empty, not read per key."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from shared.core.engine import OLD_LAYOUT_RECHECK_SECONDS, OldLayout, SyncEngine
from shared.core.envelope import ChangeEnvelope
from shared.core.ports import Snapshot
from shared.runtime.embedded import SqliteStateStore
from tests.fakes import FakeSystem
from tests.unit.test_engine import SPEC, T0, sign_payload


class CountingState(SqliteStateStore):
    """SQLite state that counts the probes and the reads of the old layout (a table without `@entity`)."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.probes: Counter[tuple[str, str]] = Counter()
        self.old_reads = 0

    async def has_snapshots(self, system: str, table: str) -> bool:
        self.probes[(system, table)] += 1
        return await super().has_snapshots(system, table)

    async def get_snapshots(self, system: str, table: str, keys: Sequence[str]) -> dict[str, Snapshot]:
        if "@" not in table:
            self.old_reads += len(keys)
        return await super().get_snapshots(system, table, keys)


def sign(n: int) -> ChangeEnvelope:
    key = f"00000000-0000-4000-8000-{n:012d}"
    return ChangeEnvelope(flow="sign_assets_to_field", operation="upsert", source_system="dataverse",
                          source_table="dot_signassets", source_key=key, source_modified=T0,
                          payload=sign_payload(dot_signassetid=key, dot_assettag=f"SGN-{n:06d}"))


async def test_batches_of_new_records_probe_the_old_layout_once() -> None:
    state = CountingState()
    systems = {"dataverse": FakeSystem("dataverse"), "arcgis": FakeSystem("arcgis", key_style="globalid")}
    engine = SyncEngine(SPEC, sinks=systems, sources=systems, state=state, clock=lambda: T0)
    try:
        for start in range(0, 30, 10):
            batch = [sign(n) for n in range(start, start + 10)]
            for change in batch:  # the source record exists (the id is written back to it)
                systems["dataverse"].put("dot_signassets", change.source_key, dict(change.payload))
            outcomes = await engine.process(batch)
            assert {o.status for o in outcomes} == {"written"}
        assert state.probes == {("dataverse", "dot_signassets"): 1}
        assert state.old_reads == 0
    finally:
        await state.close()


async def test_an_old_layout_with_rows_is_read_and_an_empty_one_probed_again_later() -> None:
    state = CountingState()
    now = [0.0]
    layout = OldLayout(clock=lambda: now[0])
    try:
        assert not await layout.holds(state, "arcgis", "SignAssets")
        assert not await layout.holds(state, "arcgis", "SignAssets")
        assert state.probes[("arcgis", "SignAssets")] == 1
        # an instance of an earlier version wrote one meanwhile: seen once the recheck is due
        await state.put_snapshots([Snapshot("arcgis", "SignAssets", "k", {"a": 1}, "h", None)])
        now[0] += OLD_LAYOUT_RECHECK_SECONDS + 1
        assert await layout.holds(state, "arcgis", "SignAssets")
        assert await layout.holds(state, "arcgis", "SignAssets")  # rows there: probed every time, never cached
        assert state.probes[("arcgis", "SignAssets")] == 3
    finally:
        await state.close()
