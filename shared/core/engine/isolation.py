"""Reading many keys at once without letting one bad key fail them all, and naming what failed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from shared.core.errors import AuthError, PermanentError, RetriableError, SyncError, ThrottledError, TransientError

T = TypeVar("T")


async def isolate(read: Callable[[list[str]], Awaitable[Sequence[T]]], keys: list[str],
                  ) -> tuple[list[T], dict[str, SyncError]]:
    """Read `keys` in one call; when that fails, split the keys until the bad ones stand alone.

    One malformed or refused key must not fail every record of a batch: the others are read, and each key
    that still fails on its own gets its error. A retriable failure of both halves is the system's, not a
    key's: the split stops there (a struggling system gets three calls, not one per key), and throttling
    is never split.
    """
    if not keys:
        return [], {}
    try:
        return list(await read(keys)), {}
    except SyncError as exc:
        return await _split(read, keys, exc)


async def _split(read: Callable[[list[str]], Awaitable[Sequence[T]]], keys: list[str],
                 error: SyncError) -> tuple[list[T], dict[str, SyncError]]:
    if len(keys) == 1 or isinstance(error, ThrottledError):
        return [], dict.fromkeys(keys, error)
    mid = len(keys) // 2
    parts = [keys[:mid], keys[mid:]]
    tried: list[tuple[list[T], SyncError | None]] = []
    for part in parts:
        try:
            tried.append((list(await read(part)), None))
        except SyncError as exc:
            tried.append(([], exc))
    if error.retriable and all(e is not None and e.retriable for _, e in tried):
        return [], dict.fromkeys(keys, error)
    rows: list[T] = []
    failed: dict[str, SyncError] = {}
    for part, (got, part_error) in zip(parts, tried, strict=True):
        if part_error is None:
            rows += got
            continue
        more, bad = await _split(read, part, part_error)
        rows += more
        failed.update(bad)
    return rows, failed


def with_detail(error: SyncError, detail: str) -> SyncError:
    """The same kind of failure (class, reason, throttling advice) with a detail that names what failed."""
    if isinstance(error, ThrottledError):
        return ThrottledError(detail, retry_after=error.retry_after, reason=error.reason)
    try:
        return type(error)(detail, reason=error.reason)
    except TypeError:  # a subclass with its own constructor: keep the retry semantics, lose only the class
        return (TransientError if error.retriable else PermanentError)(detail, reason=error.reason)


def _maybe_applied(error: SyncError) -> bool:
    """Whether a failed write may still have been applied (sent, then no or a failed answer).

    Throttling and authentication are refused before anything is applied; a permanent rejection is the
    target refusing the record. Everything else (504, timeouts, dropped connections, 5xx) may have landed.
    """
    return isinstance(error, RetriableError) and not isinstance(error, ThrottledError | AuthError)
