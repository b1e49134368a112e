"""The embedded runtime: `StateStore` and `InboundQueue` on one local SQLite file."""

from shared.runtime.common import MAX_DELIVERY_EXCEEDED, LockLostBatchError
from shared.runtime.embedded.database import SqliteDatabase
from shared.runtime.embedded.queue import SqliteQueue
from shared.runtime.embedded.state import SqliteStateStore

__all__ = ["MAX_DELIVERY_EXCEEDED", "LockLostBatchError", "SqliteDatabase", "SqliteQueue", "SqliteStateStore"]
