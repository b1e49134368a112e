"""Runtime adapters of the core ports: `embedded` (SQLite) and `azure` (Table Storage, Service Bus)."""

from shared.runtime.common import MAX_DELIVERY_EXCEEDED, LockLostBatchError, to_utc

__all__ = ["MAX_DELIVERY_EXCEEDED", "LockLostBatchError", "to_utc"]
