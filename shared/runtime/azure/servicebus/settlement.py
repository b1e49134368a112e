"""Settlement: complete, abandon, dead-letter and renew, one by one or batched on the management link."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from azure.servicebus.aio import ServiceBusReceiver
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    ServiceBusError,
    SessionLockLostError,
)

from shared.core.envelope import ReceivedMessage, wire_text
from shared.core.ports import LockLostError
from shared.runtime.azure.servicebus.holds import _LOCK_LOST, _Holds
from shared.runtime.common import LockLostBatchError

SETTLE_BATCH = 250
"""Lock tokens per `com.microsoft:update-disposition` request (docs/sessions.md, "Batched settlement")."""
BATCH_SETTLEMENT_CHECKED = "7.15.0"
"""azure-servicebus release whose private `_settle_message_via_mgmt_link` `_settle_batch` was checked against."""
_MANAGEMENT_DISPOSITIONS = {"complete": "completed", "dead-letter": "suspended"}
"""Our settlements as the management operation's `disposition-status` values (the protocol guide's)."""

_log = logging.getLogger(__name__)


class _Settling(_Holds):
    """Settling and renewing what `receive` handed out; batches through the private management-link call."""

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message (from the queue or the DLQ); `LockLostError` if its lock is gone."""
        held = self._lookup(message)
        await self._settle(message, held.receiver.complete_message(held.message))

    async def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock; Service Bus redelivers the message (or dead-letters it at the max count).

        A session message is released with its session: when nothing else the session delivered is
        outstanding, its receiver detaches, which frees the session (for any process) and releases its
        unsettled messages (a delivery counted once, as an abandon); until then the message stays locked, and
        its record's later messages wait. (Abandoning on the session's link instead would hand the message
        straight back to that link, locking and counting it once more if the link is closed before reading it.)
        """
        await self._abandon_group([message])

    async def _abandon_group(self, messages: Sequence[ReceivedMessage]) -> None:
        """Abandon messages of one receiver (the caller groups them); `LockLostError` on the first lost lock."""
        helds = [self._lookup(m) for m in messages]
        session = self._sessions.get(helds[0].receiver)
        if session is None:
            for message, held in zip(messages, helds, strict=True):
                await self._settle(message, held.receiver.abandon_message(held.message))
            return
        try:  # the lock must still be ours, as for any settlement
            self._renewed(session, await session.receiver.session.renew_lock())
        except _LOCK_LOST as exc:
            self._lose(session)
            raise LockLostError(f"lock lost for message {messages[0].sequence_number}: {exc}") from exc
        session.released.extend(held.logical for held in helds)
        for message in messages:
            self._forget(message.lock_token)

    async def dead_letter(self, message: ReceivedMessage, *, reason: str, description: str) -> None:
        """Move the message to the DLQ; a message received from the DLQ cannot be (`ValueError`)."""
        held = self._lookup(message)
        if held.dead:
            raise ValueError(
                f"message {message.sequence_number} is in the dead-letter sub-queue already; "
                "complete or abandon it instead"
            )
        await self._settle(
            message, held.receiver.dead_letter_message(
                held.message, reason=wire_text(reason), error_description=wire_text(description))
        )

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        """Extend the lock (for a session message: its session's lock); returns and sets `locked_until`."""
        held = self._lookup(message)
        session = self._sessions.get(held.receiver)
        try:
            if session is not None:
                until = await held.receiver.session.renew_lock()
                self._renewed(session, until)
            else:
                until = await held.receiver.renew_message_lock(held.message)
        except _LOCK_LOST as exc:
            self._lost(message.lock_token, session_lost=isinstance(exc, SessionLockLostError))
            raise LockLostError(f"lock lost for message {message.sequence_number}: {exc}") from exc
        message.locked_until = until
        return until

    async def renew_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """Renew a batch's locks concurrently: each session once (its lock covers all its messages), each
        sessionless message by itself; lost locks are raised afterwards as `LockLostBatchError`."""
        by_session: dict[ServiceBusReceiver, list[ReceivedMessage]] = {}
        singles: list[ReceivedMessage] = []
        lost: list[ReceivedMessage] = []
        for message in messages:
            held = self._held.get(message.lock_token)
            if held is None:
                lost.append(message)
            elif held.receiver in self._sessions:
                by_session.setdefault(held.receiver, []).append(message)
            else:
                singles.append(message)

        async def renew(first: ReceivedMessage, others: Sequence[ReceivedMessage]) -> None:
            try:
                until = await self.renew_lock(first)
            except LockLostError:
                lost.extend([first, *others])
                return
            for message in others:
                message.locked_until = until

        await asyncio.gather(*(renew(group[0], group[1:]) for group in by_session.values()),
                             *(renew(message, ()) for message in singles))
        if lost:
            raise LockLostBatchError(lost)

    async def complete_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """Complete the messages with one management request per receiver (session) and `SETTLE_BATCH` of
        them, the sessions' in parallel (`_settle_batch`); the ones whose lock was lost are raised together as
        `LockLostBatchError`, the others are completed."""
        lost: list[ReceivedMessage] = []
        await asyncio.gather(*(self._settle_group(group, "complete", lost) for group in self._by_receiver(messages)))
        if lost:
            raise LockLostBatchError(lost)

    async def dead_letter_many(self, messages: Sequence[ReceivedMessage], *, reason: str, description: str) -> None:
        """Dead-letter the messages with one reason, batched like `complete_many` (lost locks likewise); a
        message received from the DLQ cannot be (`ValueError`, and nothing is settled)."""
        for message in messages:
            held = self._held.get(message.lock_token)
            if held is not None and held.dead:
                raise ValueError(f"message {message.sequence_number} is in the dead-letter sub-queue already; "
                                 "complete or abandon it instead")
        lost: list[ReceivedMessage] = []
        details = (wire_text(reason), wire_text(description))
        await asyncio.gather(*(self._settle_group(group, "dead-letter", lost, details)
                               for group in self._by_receiver(messages)))
        if lost:
            raise LockLostBatchError(lost)

    async def _settle_group(self, group: Sequence[ReceivedMessage], outcome: str, lost: list[ReceivedMessage],
                            details: tuple[str, str] | None = None) -> None:
        """Settle messages of one receiver, `SETTLE_BATCH` per request; lost locks are added to `lost`.

        A request refused for a lost message lock is repeated message by message to tell which (the service
        answers for the whole request; whether it applied the others first is not documented, so one it did
        apply is reported lost too, which only costs a log line: it is gone either way). A lost session lock
        loses every message of the session. Without the SDK's internal call, each message is settled on its
        link as before.
        """
        for start in range(0, len(group), SETTLE_BATCH):
            # (settled or lost meanwhile, e.g. with its session by the chunk before)
            lost.extend(m for m in group[start:start + SETTLE_BATCH] if m.lock_token not in self._held)
            chunk = [m for m in group[start:start + SETTLE_BATCH] if m.lock_token in self._held]
            if not chunk:
                continue
            if len(chunk) > 1 and await self._settle_batch(chunk, outcome, details, lost):
                continue
            for message in chunk:
                try:
                    if outcome == "complete":
                        await self.complete(message)
                    else:
                        assert details is not None
                        await self.dead_letter(message, reason=details[0], description=details[1])
                except LockLostError:
                    lost.append(message)

    async def _settle_batch(self, chunk: Sequence[ReceivedMessage], outcome: str, details: tuple[str, str] | None,
                            lost: list[ReceivedMessage]) -> bool:
        """One `update-disposition` request for `chunk` (all of one receiver); False: settle it one by one."""
        helds = [self._held[m.lock_token] for m in chunk]
        receiver = helds[0].receiver
        settle = self._management_settlement(receiver)
        if settle is None:
            return False
        dead_letter = {"deadletter-reason": details[0], "deadletter-description": details[1]} if details else None
        try:
            # The session receiver adds its `session-id`, as the service requires for session messages.
            await settle(_MANAGEMENT_DISPOSITIONS[outcome], [h.message.lock_token for h in helds],
                         dead_letter_details=dead_letter)
        except SessionLockLostError:
            session = self._sessions.get(receiver)
            if session is not None:
                self._lose(session)
            for message in chunk:
                self._forget(message.lock_token)
            lost.extend(chunk)
            return True
        except (MessageLockLostError, MessageAlreadySettled):
            return False  # which of them: one by one
        except ServiceBusError as exc:  # e.g. a timeout: one by one (with the SDK's own retries)
            _log.info("a batched settlement of %d messages failed (%s); settling them one by one", len(chunk), exc)
            return False
        for message in chunk:
            self._forget(message.lock_token)
        return True

    def _management_settlement(self, receiver: ServiceBusReceiver) -> Any:
        """The receiver's private `_settle_message_via_mgmt_link(settlement, lock_tokens, dead_letter_details)`
        (azure-servicebus, checked against `BATCH_SETTLEMENT_CHECKED`), or None if this SDK has no such call.

        The SDK has no public batch settlement; it uses this call for deferred messages and as the fallback
        when a message cannot be settled on its link. Looked up in this one place, with its parameters checked,
        so an SDK that renames or reshapes it settles one message at a time instead of failing.
        """
        settle = getattr(receiver, "_settle_message_via_mgmt_link", None)
        if self._batch_settlement is None:
            try:
                parameters = list(inspect.signature(settle).parameters) if callable(settle) else []
            except (TypeError, ValueError):
                parameters = []
            self._batch_settlement = parameters[:3] == ["settlement", "lock_tokens", "dead_letter_details"]
            if not self._batch_settlement:
                _log.warning("azure-servicebus has no `_settle_message_via_mgmt_link(settlement, lock_tokens, "
                             "dead_letter_details)` (checked against %s): settling one message per request",
                             BATCH_SETTLEMENT_CHECKED)
        return settle if self._batch_settlement else None

    async def abandon_many(self, messages: Sequence[ReceivedMessage]) -> None:
        """Abandon each message (e.g. at the end of a cycle), the sessions' in parallel; a session whose every
        outstanding message is among them is released whole (see `abandon`); lost locks as in `complete_many`."""
        lost: list[ReceivedMessage] = []

        async def abandon(group: Sequence[ReceivedMessage]) -> None:
            try:
                await self._abandon_group(group)
                return
            except LockLostError:
                pass
            for message in group:  # one at a time, to tell which locks were lost
                try:
                    await self._abandon_group([message])
                except LockLostError:
                    lost.append(message)

        await asyncio.gather(*(abandon(group) for group in self._by_receiver(messages)))
        if lost:
            raise LockLostBatchError(lost)

    def _by_receiver(self, messages: Sequence[ReceivedMessage]) -> list[list[ReceivedMessage]]:
        """Messages grouped by the receiver holding them (unknown ones alone, to fail as lost locks)."""
        groups: dict[object, list[ReceivedMessage]] = {}
        for message in messages:
            held = self._held.get(message.lock_token)
            groups.setdefault(held.receiver if held is not None else object(), []).append(message)
        return list(groups.values())
