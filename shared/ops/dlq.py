"""Dead-letter replay: dead-lettered messages sent back to the queue, to be processed again idempotently."""

from __future__ import annotations

from shared.bootstrap import Services
from shared.core.envelope import ChangeEnvelope, QueueMessage
from shared.core.errors import EnvelopeError


async def replay_dead_letters(services: Services, *, message_id: str | None = None,
                              limit: int = 1000) -> list[str]:
    """Send dead-lettered messages back to the queue (all, or one by message id); returns the ids replayed."""
    replayed: list[str] = []
    while len(replayed) < limit:
        batch = await services.queue.receive_dead_letters(min(100, limit - len(replayed)))
        if not batch:
            break
        keep = []
        for msg in batch:
            if message_id is not None and msg.message_id != message_id:
                keep.append(msg)
                continue
            try:
                env = ChangeEnvelope.from_body(msg.body)
                out = env.model_copy(update={"origin": "replay", "waits": 0}).to_message()
            except EnvelopeError:
                out = QueueMessage(body=msg.body, message_id=msg.message_id, session_id=msg.session_id,
                                   correlation_id=msg.correlation_id,
                                   application_properties=dict(msg.application_properties))
            await services.queue.send([out])
            await services.queue.complete(msg)
            replayed.append(msg.message_id)
        for msg in keep:
            await services.queue.abandon(msg)
        if message_id is not None and (replayed or keep):
            break
    return replayed
