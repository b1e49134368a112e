"""Record holds: this process's locks and the cross-process leases, for a batch and for ensured parents."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Sequence

from shared.core.engine.base import _EngineBase
from shared.core.envelope import ChangeEnvelope
from shared.mapping.spec import FlowSpec

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
"""How long a record lease lasts without renewal: a crashed holder blocks its records at most this long."""

PARENT_LOCK_WAIT_SECONDS = 10.0
"""How long ensuring a parent waits for another call of this process that is writing it (then the child is busy)."""

_LEASED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("syncline_leased", default=frozenset())
"""Record ids the current `process` call holds (locked and leased), so ensuring a parent never waits for itself."""


class _Holds(_EngineBase):
    """The engine's holding of records while it works them."""

    @contextlib.asynccontextmanager
    async def hold(self, envelopes: Sequence[ChangeEnvelope], *, wait: bool = True) -> AsyncIterator[None]:
        """Hold the records of `envelopes` (this process's locks and the cross-process leases) for the block.

        `process` calls inside it (in the same task) neither lock nor lease those records again, so a caller that
        processes a batch flow group by flow group takes and releases the batch's leases once, not per group.
        A record leased elsewhere is not held (its lock is let go at once): `process` tries it again and reports
        it busy. With `wait=False` only the leases are taken: another call of this process that wants one of the
        records finds it busy at once instead of waiting for the whole block (a webhook behind a long batch).
        """
        own = _LEASED.get()
        keys = sorted({e.record_id for e in envelopes} - own)
        if not keys:
            yield
            return
        locks = {k: self._locks.setdefault(k, asyncio.Lock()) for k in keys} if wait else {}
        self._lock_users.update(list(locks))
        locked: list[str] = []
        try:
            for k, lock in locks.items():  # in key order, so two calls never wait for each other crosswise
                await lock.acquire()
                locked.append(k)
            owner = uuid.uuid4().hex
            held = await self.state.acquire_leases(keys, owner, self.lease_seconds)
            for k in reversed([k for k in locked if k not in held]):
                locks[k].release()
            locked = [k for k in locked if k in held]
            renewer = asyncio.create_task(self._renew_leases(sorted(held), owner))
            token = _LEASED.set(own | frozenset(held))
            try:
                yield
            finally:
                _LEASED.reset(token)
                await self._end_leases(renewer, held, owner, "record")
        finally:
            for k in reversed(locked):
                locks[k].release()
            self._lock_users.subtract(list(locks))
            for k in locks:
                if self._lock_users[k] <= 0:
                    del self._lock_users[k]
                    self._locks.pop(k, None)

    async def _end_leases(
        self, renewer: asyncio.Task[None] | None, keys: Collection[str], owner: str, kind: str
    ) -> None:
        """Stop renewing and release the leases; a failed release is logged (they expire by themselves, and the
        outcomes stand)."""
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if keys:
            try:
                await self.state.release_leases(sorted(keys), owner)
            except Exception as exc:
                log.warning("releasing %d %s leases failed (%s); they expire in %ss",
                            len(keys), kind, type(exc).__name__, self.lease_seconds)

    async def _renew_leases(self, keys: list[str], owner: str) -> None:
        """Extend the batch's leases while it runs (a batch may outlast one lease period)."""
        while keys:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                kept = await self.state.acquire_leases(keys, owner, self.lease_seconds)
            except Exception as exc:  # the next round tries again; the lease is still valid for a while
                log.warning("renewing %d record leases failed: %s", len(keys), type(exc).__name__)
                continue
            if len(kept) < len(keys):
                log.warning("%d record leases expired and were taken over during a long batch",
                            len(keys) - len(kept))
                keys = sorted(kept)

    @contextlib.asynccontextmanager
    async def _parents_locked(self, parent: FlowSpec, keys: Sequence[str],
                              ) -> AsyncIterator[tuple[list[str], set[str]]]:
        """Hold parent records as `process` holds its own: this process's lock (waiting a little for another call
        of this process) and the cross-process lease (never waiting). Yields the keys held and the keys busy.

        Without it an ensured parent and the parent's own change (a webhook, another instance, the same batch
        elsewhere) could both find no target record and both create one: twin SAP business partners.
        """
        ids = {k: f"{parent.source.system}:{parent.source.table}:{k}" for k in keys}
        own = _LEASED.get()
        wanted = sorted(k for k in keys if ids[k] not in own)
        locks: list[tuple[str, asyncio.Lock]] = []
        busy: set[str] = set()
        self._lock_users.update(ids[k] for k in wanted)
        owner = uuid.uuid4().hex
        leased: set[str] = set()
        renewer: asyncio.Task[None] | None = None
        try:
            deadline = asyncio.get_running_loop().time() + PARENT_LOCK_WAIT_SECONDS
            for k in wanted:  # in key order, as `process` takes its locks
                lock = self._locks.setdefault(ids[k], asyncio.Lock())
                try:
                    async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                        await lock.acquire()
                except TimeoutError:
                    busy.add(k)
                    continue
                locks.append((k, lock))
            if locks:
                leased = await self.state.acquire_leases([ids[k] for k, _ in locks], owner, self.lease_seconds)
                busy.update(k for k, _ in locks if ids[k] not in leased)
                renewer = asyncio.create_task(self._renew_leases(sorted(leased), owner))
            yield [k for k in keys if k not in busy], busy
        finally:
            await self._end_leases(renewer, leased, owner, "parent")
            for _, lock in reversed(locks):
                lock.release()
            for k in wanted:
                self._lock_users[ids[k]] -= 1
                if self._lock_users[ids[k]] <= 0:
                    del self._lock_users[ids[k]]
                    self._locks.pop(ids[k], None)
