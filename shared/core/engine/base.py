"""What every part of the engine shares: its configuration and state, and its audit of outcomes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from shared.core.engine.outcome import Outcome, _Parent, _Work
from shared.core.engine.snapshots import OldLayout
from shared.core.envelope import ChangeEnvelope
from shared.core.ports import Attachment, AuditEntry, Bind, ChangeSource, Lines, RecordSink, Snapshot, StateStore
from shared.mapping.engine import Mapper
from shared.mapping.spec import FlowSet, FlowSpec


class _EngineBase:
    """The engine's state (set by `SyncEngine.__init__`); each concern of the engine is a mixin over it."""

    flowset: FlowSet
    mapper: Mapper
    sinks: Mapping[str, RecordSink]
    sources: Mapping[str, ChangeSource]
    state: StateStore
    clock: Callable[[], datetime]
    max_parent_waits: int
    lease_seconds: float
    _locks: dict[str, asyncio.Lock]
    _line_flows: dict[str, FlowSpec]
    _lock_users: Counter[str]
    _old_layout: OldLayout

    if TYPE_CHECKING:
        # Implemented by the mixin of each concern; declared here so the others can call them.
        async def _process_flow(self, flow: FlowSpec, envelopes: Sequence[ChangeEnvelope], indexes: list[int],
                                outcomes: list[Outcome | None]) -> None: ...

        def _parents_locked(self, parent: FlowSpec, keys: Sequence[str],
                            ) -> AbstractAsyncContextManager[tuple[list[str], set[str]]]: ...

        def _projection(self, flow: FlowSpec, env: ChangeEnvelope, work: _Work) -> dict[str, Any]: ...

        def _map_lines(self, flow: FlowSpec, env: ChangeEnvelope, work: _Work) -> Lines: ...

        async def _attachments(self, flow: FlowSpec, env: ChangeEnvelope,
                               snap: Snapshot | None) -> list[Attachment]: ...

        @staticmethod
        def _match_value(flow: FlowSpec, env: ChangeEnvelope) -> str: ...

        def _resolve_lookups(self, flow: FlowSpec, source_key: str, payload: Mapping[str, Any],
                             parents: Mapping[str, Mapping[str, str]], values: dict[str, Any], *, is_create: bool,
                             waits: int) -> dict[str, Bind]: ...

        async def _cascade(self, flow: FlowSpec, parents: Sequence[_Parent], outcomes: list[Outcome | None],
                           audit: list[AuditEntry], now: datetime) -> None: ...

    async def _record_skips(self, flow: FlowSpec, outcomes: Sequence[Outcome]) -> None:
        audit = [self._audit_for(o) for o in outcomes if o.status in ("skipped_echo", "skipped_noop")]
        if audit:
            await self.state.append_audit(audit)

    def _audit_for(self, outcome: Outcome) -> AuditEntry:
        env = outcome.envelope
        decision = {
            "skipped_echo": "skipped_echo",
            "skipped_noop": "skipped_noop",
            "deferred": "deferred",
            # A permanent failure of this attempt: where the change goes next (the queue, then its dead-letter
            # sub-queue) is the caller's decision, audited by the caller with the message it concerns.
            "failed": "retry_scheduled" if outcome.error is not None and outcome.error.retriable else "rejected",
        }.get(outcome.status, "written")
        detail = outcome.error.detail if outcome.error is not None else outcome.detail
        return AuditEntry(
            self.clock(), env.correlation_id, env.flow, decision,  # type: ignore[arg-type]
            env.source_system, env.source_table, env.source_key, detail,
            outcome.error.reason if outcome.error is not None else None,
        )
