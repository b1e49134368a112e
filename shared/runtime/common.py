"""What both runtimes share: UTC normalising, the max-delivery dead-letter reason and the batch lock-lost error."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from shared.core.envelope import ReceivedMessage
from shared.core.ports import LockLostError

MAX_DELIVERY_EXCEEDED = "MAX_DELIVERY_EXCEEDED"


def to_utc(value: datetime) -> datetime:
    """Return `value` in UTC; a naive datetime is taken to be UTC already (the code base's convention)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class LockLostBatchError(LockLostError):
    """Some messages of a batch settlement had lost their lock; `lost` lists them, the rest were settled."""

    def __init__(self, lost: Sequence[ReceivedMessage]) -> None:
        self.lost = tuple(lost)
        numbers = ", ".join(str(m.sequence_number) for m in self.lost)
        super().__init__(
            f"{len(self.lost)} message(s) had lost their lock (sequence numbers {numbers}); they will be "
            "redelivered, every other message of the batch was settled"
        )
