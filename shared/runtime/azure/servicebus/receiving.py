"""Receiving: reading held sessions, accepting more, and handing out messages in record order."""

from __future__ import annotations

import asyncio
import time

from azure.servicebus import NEXT_AVAILABLE_SESSION, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import OperationTimeoutError

from shared.core.envelope import ReceivedMessage
from shared.runtime.azure.servicebus.holds import _LOCK_LOST, _buffered, _Holds, _keep_late_arrivals, _Session
from shared.runtime.azure.servicebus.wire import _own_session

_PENDING_CAP = 500
"""A session with this many messages received but not handed out is not read further until some are."""


class _Receiving(_Holds):
    """`receive`: session reads and accepts, with the per-record ordering guarantee."""

    async def receive(self, max_messages: int, *, max_wait_seconds: float = 0.0) -> list[ReceivedMessage]:
        """Peek-lock up to `max_messages`, waiting up to `max_wait_seconds` (at least the session wait) for one."""
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        wait = max(max_wait_seconds, self._wait)
        if self._session_client is None:
            async with self._receive_lock:
                receiver = await self._open(self._main_receiver())
                got = await receiver.receive_messages(max_message_count=max_messages, max_wait_time=wait)
            return [self._hold(m, receiver, dead=False) for m in got]
        async with self._receive_lock:
            return await self._receive_sessions(self._session_client, max_messages, wait)

    async def _receive_sessions(
        self, client: ServiceBusClient, max_messages: int, wait: float
    ) -> list[ReceivedMessage]:
        # Held sessions are read first (no accept, no new connection); further sessions are accepted only
        # while fewer than the bound are being read. Reads of several sessions run concurrently.
        await self._refresh_idle()
        waited = False
        while (short := max_messages - len(self._eligible(max_messages))) > 0:
            # A drained session is read again when messages of its last read's credit arrived after it returned.
            readers = [s for s in self._sessions.values()
                       if (not s.drained or _buffered(s.receiver)) and len(s.pending) < _PENDING_CAP]
            # No read-ahead past the receive's share: a message read is a delivery counted if its session is
            # released unread (what arrives on a read's credit after it returned is kept for the next read,
            # `_keep_late_arrivals`, but counted all the same).
            if readers and await self._read(readers, -(-short // len(readers))):
                continue
            # A session read ahead still takes its slot while it has messages to hand out (not those behind a
            # record being worked or held: a failing record does not take a slot to the end of the cycle).
            ready = {id(s) for _, s in self._eligible(len(self._sessions) * _PENDING_CAP)}
            reading = sum(1 for s in self._sessions.values() if not s.drained or id(s) in ready)
            # A probe that finds no free session costs a connection, a token and two links: after a round that
            # found fewer than it tried, try fewer at once.
            slots = min(self.max_concurrent_sessions - reading, short, self._probe)
            if slots <= 0:
                break  # every slot holds a session that still has messages, behind records being worked
            # When the caller waits longer than a probe does, one session first takes that wait (the rest
            # would all wait it out), then further ones are probed.
            long = wait > self._wait and not waited and not self._eligible(1)
            waited = waited or long
            tried = 1 if long else slots
            accepted = await self._accept_sessions(client, tried, wait if long else self._wait)
            if len(accepted) < tried:
                self._probe = max(1, len(accepted))
            else:
                self._probe = min(self.max_concurrent_sessions, self._probe * 2)
            if not accepted:
                break
            for receiver in accepted:
                self._adopt(receiver)
        return self._hand_out(max_messages)

    async def _refresh_idle(self) -> None:
        """Renew the sessions nobody renews (nothing of theirs is outstanding) once half their lock has passed.

        Their pending messages are about to be handed out under that lock, and the controller renews it from
        then on; a lock renewed less than half a lock ago is good for longer than the controller's period."""
        now = time.monotonic()
        idle = [s for s in self._sessions.values() if not s.outstanding and now - s.renewed_at >= s.lock_span / 2]

        async def renew(session: _Session) -> None:
            try:
                self._renewed(session, await session.receiver.session.renew_lock())
            except _LOCK_LOST:
                self._lose(session)

        await asyncio.gather(*(renew(s) for s in idle))

    def _adopt(self, receiver: ServiceBusReceiver) -> None:
        session_id = str(receiver.session.session_id)
        for stale in [s for s in self._sessions.values() if s.session_id == session_id]:
            self._lose(stale)  # Service Bus gave its session to us again: that receiver's lock is gone
        session = _Session(receiver, session_id)
        self._renewed(session, receiver.session.locked_until_utc)
        self._sessions[receiver] = session

    async def _read(self, readers: list[_Session], budget: int) -> bool:
        """Read up to `budget` more messages from each of `readers` at once; True if any brought some."""
        # A drained session is read for what its SDK buffer holds, exactly: the call takes it from the buffer and
        # returns at once, with no new credit and no wait.
        asks = {id(s): _buffered(s.receiver) if s.drained else budget for s in readers}

        async def read(session: _Session) -> list[ServiceBusReceivedMessage]:
            try:
                return await session.receiver.receive_messages(max_message_count=asks[id(session)],
                                                               max_wait_time=self._wait)
            finally:
                _keep_late_arrivals(session.receiver)  # at once: the other reads may take a while yet

        results = await asyncio.gather(*(read(s) for s in readers), return_exceptions=True)
        progressed = False
        failure: BaseException | None = None
        for session, result in zip(readers, results, strict=True):
            if isinstance(result, BaseException):
                self._lose(session)
                if not isinstance(result, _LOCK_LOST):
                    failure = failure or result
            else:
                session.pending.extend(result)
                progressed = progressed or bool(result)
                # Fewer than asked: the session had no more for now (a read of an empty one would only wait).
                session.drained = session.drained or len(result) < asks[id(session)]
                if session.drained and not session.outstanding and not session.pending \
                        and not _buffered(session.receiver):
                    self._close_session(session)
        if failure is not None:
            raise failure
        return progressed

    def _eligible(self, limit: int) -> list[tuple[ServiceBusReceivedMessage, _Session]]:
        """Pending messages that may be handed out, oldest first: none behind a busy or held-back record."""
        busy = {key for key, count in self._busy.items() if count > 0}
        busy.update(key for s in self._sessions.values() for key in s.released if key is not None)
        candidates = sorted(((m, s) for s in self._sessions.values() for m in s.pending),
                            key=lambda pair: pair[0].sequence_number or 0)
        held_back: set[str] = set()
        out: list[tuple[ServiceBusReceivedMessage, _Session]] = []
        for message, session in candidates:
            key = _own_session(message)
            if len(out) >= limit or (key is not None and (key in busy or key in held_back)):
                if key is not None:
                    held_back.add(key)  # nothing later of that record may overtake it
                continue
            out.append((message, session))
        return out

    def _hand_out(self, max_messages: int) -> list[ReceivedMessage]:
        chosen = self._eligible(max_messages)
        taken = {id(m) for m, _ in chosen}
        for session in {id(s): s for _, s in chosen}.values():
            session.pending = [m for m in session.pending if id(m) not in taken]
        return [self._hold(m, s.receiver, dead=False) for m, s in chosen]

    async def _accept_sessions(self, client: ServiceBusClient, count: int, wait: float) -> list[ServiceBusReceiver]:
        """Accept up to `count` sessions at once; fewer (or none) when no more are offered within `wait`."""
        receivers = [
            client.get_queue_receiver(self.name, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=wait)
            for _ in range(count)
        ]
        try:
            results = await asyncio.gather(*(r.__aenter__() for r in receivers), return_exceptions=True)
        except BaseException:  # cancelled: none of them will be used
            for receiver in receivers:
                self._close_later(receiver)
            raise
        accepted: list[ServiceBusReceiver] = []
        failure: BaseException | None = None
        for receiver, result in zip(receivers, results, strict=True):
            if isinstance(result, BaseException):
                self._close_later(receiver)
                if not isinstance(result, OperationTimeoutError):  # a timeout only means: no session free
                    failure = failure or result
            else:
                accepted.append(receiver)
        if failure is not None:
            for receiver in accepted:
                self._close_later(receiver)
            raise failure
        return accepted
