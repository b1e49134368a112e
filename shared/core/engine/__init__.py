"""The sync engine: change envelopes in, governed writes and one outcome per change out."""

from shared.core.engine.cascades import cascade_pending, cascade_triggered
from shared.core.engine.holds import LEASE_SECONDS, PARENT_LOCK_WAIT_SECONDS
from shared.core.engine.isolation import isolate, with_detail
from shared.core.engine.outcome import Outcome, Status
from shared.core.engine.planning import ECHO_DETAIL, HOLDS_DETAIL, UNACKNOWLEDGED_DETAIL
from shared.core.engine.rules import in_scope
from shared.core.engine.snapshots import (
    CASCADED,
    OLD_LAYOUT_RECHECK_SECONDS,
    SEEN_MODIFIED,
    UNCONFIRMED,
    OldLayout,
    forget_snapshots,
    read_snapshots,
    snapshot_table,
)
from shared.core.engine.sync import SyncEngine
from shared.core.ports import split_key as key_parts  # the engine's name for it

__all__ = [
    "CASCADED",
    "ECHO_DETAIL",
    "HOLDS_DETAIL",
    "LEASE_SECONDS",
    "OLD_LAYOUT_RECHECK_SECONDS",
    "PARENT_LOCK_WAIT_SECONDS",
    "SEEN_MODIFIED",
    "UNACKNOWLEDGED_DETAIL",
    "UNCONFIRMED",
    "OldLayout",
    "Outcome",
    "Status",
    "SyncEngine",
    "cascade_pending",
    "cascade_triggered",
    "forget_snapshots",
    "in_scope",
    "isolate",
    "key_parts",
    "read_snapshots",
    "snapshot_table",
    "with_detail",
]
