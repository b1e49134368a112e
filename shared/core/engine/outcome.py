"""What the engine returns per change, and the plans and loaded state it works with on the way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from shared.core.envelope import ChangeEnvelope
from shared.core.errors import SyncError
from shared.core.ports import Snapshot, SourceRecord, WriteOp
from shared.mapping.engine import MappedValues
from shared.mapping.spec import FlowSpec

Status = Literal["written", "skipped_echo", "skipped_noop", "deferred", "failed", "deleted"]


@dataclass
class Outcome:
    """What happened to one envelope."""

    envelope: ChangeEnvelope
    status: Status
    target_key: str | None = None
    created: bool = False
    error: SyncError | None = None
    detail: str = ""


@dataclass
class _Plan:
    index: int
    env: ChangeEnvelope
    flow: FlowSpec
    target_key: str | None
    op: WriteOp
    mapped: MappedValues | None = None
    is_create: bool = False


@dataclass
class _Parent:
    """A parent record whose cascades are due: its key and values per side, and its snapshots to mark done."""

    index: int
    env: ChangeEnvelope
    sides: list[tuple[str, str, Mapping[str, Any]]]
    snaps: list[Snapshot]


@dataclass
class _Work:
    """Everything one flow group of a batch loads once from state."""

    links: dict[str, str] = field(default_factory=dict)
    stored_links: dict[str, str] = field(default_factory=dict)
    """The links read from state (`links` adds those a record names itself): re-putting one is a no-op, skipped."""
    src_snaps: dict[str, Snapshot] = field(default_factory=dict)
    tgt_snaps: dict[str, Snapshot] = field(default_factory=dict)
    parents: dict[str, dict[str, str]] = field(default_factory=dict)
    lines: dict[str, list[SourceRecord]] = field(default_factory=dict)
    """Header source key -> its document lines, read from the source in one query per 100 headers."""
    line_parents: dict[str, dict[str, str]] = field(default_factory=dict)
    read_errors: dict[str, SyncError] = field(default_factory=dict)
    """Source key -> why something it needs (its lines, its parent) could not be read: it fails alone."""
