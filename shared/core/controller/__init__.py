"""The controller: change feeds onto the queue, the queue through the engine, every message settled."""

from shared.core.controller.breakers import PAUSE_PREFIX, PAUSE_THRESHOLD_SECONDS, Breakers
from shared.core.controller.cycle import STALE_ROUNDS, Controller
from shared.core.controller.enqueue import (
    ENQUEUED,
    POLL_HINT,
    drop_duplicates,
    envelopes_for,
    remember_enqueued,
    split_duplicates,
    to_messages,
)
from shared.core.controller.locks import MAX_HELD
from shared.core.controller.polling import DEDUP_RETENTION, HOUSEKEEPING
from shared.core.controller.report import LAST_CYCLE, CycleReport
from shared.core.controller.settlement import BUSY_RETRY_SECONDS

__all__ = [
    "BUSY_RETRY_SECONDS",
    "DEDUP_RETENTION",
    "ENQUEUED",
    "HOUSEKEEPING",
    "LAST_CYCLE",
    "MAX_HELD",
    "PAUSE_PREFIX",
    "PAUSE_THRESHOLD_SECONDS",
    "POLL_HINT",
    "STALE_ROUNDS",
    "Breakers",
    "Controller",
    "CycleReport",
    "drop_duplicates",
    "envelopes_for",
    "remember_enqueued",
    "split_duplicates",
    "to_messages",
]
