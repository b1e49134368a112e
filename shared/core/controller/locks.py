"""Holding a cycle's messages: their locks renewed while they are worked or held, released at its end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from shared.core.controller.base import _ControllerBase
from shared.core.envelope import ReceivedMessage
from shared.core.ports import LockLostError

log = logging.getLogger(__name__)

MAX_HELD = 500
"""Failed changes a cycle holds (locked) until it ends; past that it ends early. On Service Bus each keeps its
session (bucket) held, and its record's later messages waiting (docs/sessions.md)."""


class _Locks(_ControllerBase):
    """The controller's holding of message locks through a cycle."""

    async def _renew_locks(self, current: Callable[[], Sequence[ReceivedMessage]]) -> None:
        """Keep the locks (Service Bus: their sessions' locks) of the messages the cycle holds: the batch being
        worked and the failed changes held to its end."""
        many = getattr(self.queue, "renew_many", None)
        while True:
            await asyncio.sleep(self.lock_renew_seconds)
            messages = list(current())
            if not messages:
                continue
            try:
                if many is not None:
                    with contextlib.suppress(LockLostError):
                        await many(messages)
                    continue
                for m in messages:
                    with contextlib.suppress(LockLostError):
                        await self.queue.renew_lock(m)
            except Exception as exc:  # a failed round must not end the renewals (or fail the batch)
                log.warning("lock renewal failed (%s: %s); trying again in %ss", type(exc).__name__, exc,
                            self.lock_renew_seconds)

    @staticmethod
    def _warn_hold_full(held: int) -> None:
        log.warning("%d failed changes held until the end of the cycle (the most allowed); the rest of the queue "
                    "waits for the next cycle", held)

    async def _release(self, held: Sequence[ReceivedMessage]) -> None:
        """Abandon the messages held to the end of the cycle (their next delivery is their next attempt)."""
        if not held:
            return
        many = getattr(self.queue, "abandon_many", None)
        try:
            if many is not None:
                await many(held)
                return
            for m in held:
                await self._settle_quietly(self.queue.abandon, m)
        except LockLostError as exc:
            log.warning("locks lost before release (the messages will be redelivered): %s", exc)
        except Exception as exc:  # never hide why the cycle ended (this runs in drain's finally)
            log.warning("releasing %d failed changes failed (%s: %s); they come back when their locks expire",
                        len(held), type(exc).__name__, exc)

    async def _release_sessions(self) -> None:
        """Let other processes take the sessions this cycle held open for its next receive (Service Bus)."""
        release = getattr(self.queue, "release_sessions", None)
        if release is None:
            return
        try:
            await release()
        except Exception as exc:  # never hide why the cycle ended; their locks expire anyway
            log.warning("releasing the held sessions failed (%s: %s)", type(exc).__name__, exc)
