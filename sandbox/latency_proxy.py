"""A loopback HTTP/1.1 reverse proxy that delays and counts each request (Azurite at a cloud round trip)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator

LATENCY_VARIABLE = "SYNCLINE_EMULATOR_LATENCY_MS"
"""Milliseconds added to each Azurite request by this proxy and to each operation of the test Service Bus broker."""
HOST = "127.0.0.1"
_MAX_HEAD = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


def latency_from_environment() -> float:
    """`SYNCLINE_EMULATOR_LATENCY_MS` in milliseconds (0 when unset); a bad value is an error, not a silent 0."""
    raw = os.environ.get(LATENCY_VARIABLE, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{LATENCY_VARIABLE} must be a number of milliseconds, not {raw!r}") from None
    return check_latency(value)


def check_latency(value: float) -> float:
    if not 0 <= value < 60_000:
        raise ValueError(f"{LATENCY_VARIABLE}: the latency must be between 0 and 60000 ms, not {value!r}")
    return float(value)


class _Closed(Exception):
    """The peer closed the connection between messages (the normal end of a keep-alive connection)."""


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            raise _Closed from None
        raise
    except asyncio.LimitOverrunError:
        raise ValueError(f"an HTTP head longer than {_MAX_HEAD} bytes") from None


async def _read_body(reader: asyncio.StreamReader, fields: dict[str, str], *, until_eof: bool) -> bytes:
    """The body exactly as sent (chunked framing kept), so that it can be forwarded byte for byte."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    parts.append(trailer)
                parts.append(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
    if "content-length" in fields:
        return await reader.readexactly(int(fields["content-length"]))
    return await reader.read() if until_eof else b""


class LatencyProxy:
    """Forwards loopback HTTP to `upstream_port`, each request `latency_ms` later; counts requests by method.

    One upstream connection per client connection, requests in order: what the Azure SDKs' keep-alive clients
    do (no pipelining). `latency_ms` may be changed while running. Start with `start()` or `with running(...)`.
    """

    def __init__(self, upstream_port: int, *, upstream_host: str = HOST, latency_ms: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_ms = check_latency(latency_ms)
        self.port = 0
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def requests(self) -> dict[str, int]:
        """Requests forwarded so far, by HTTP method."""
        with self._lock:
            return dict(self._counts)

    def request_count(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def start(self) -> LatencyProxy:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, HOST, 0, limit=_MAX_HEAD))
                self.port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as error:
                failure.append(error)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="latency-proxy", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise RuntimeError(f"the latency proxy did not start: {failure[0]!r}")
        return self

    def stop(self) -> None:
        """Close the listener and every connection; safe to call more than once."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), loop)
        thread.join(10)

    async def _forward(
        self, upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, request: bytes
    ) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], bytes]:
        """Send `request` upstream and read the head of the answer, on a new connection if the kept one closed.

        Azurite (Node) closes a keep-alive connection after 5 idle seconds while the client's connection to us
        stays open: such a request is sent again, once, on a fresh connection. It never reached Azurite, which
        closes only idle connections.
        """
        for attempt in (1, 2):
            if upstream is None or upstream[1].is_closing() or upstream[0].at_eof():
                if upstream is not None:
                    upstream[1].close()
                upstream = await asyncio.open_connection(*self.upstream, limit=_MAX_HEAD)
            reader, writer = upstream
            try:
                writer.write(request)
                await writer.drain()
                return upstream, await _read_head(reader)
            except (_Closed, ConnectionError):
                writer.close()
                upstream = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(client_reader)
                request_line, fields = _headers(head)
                body = await _read_body(client_reader, fields, until_eof=False)
                method = request_line.split(" ", 1)[0].upper()
                with self._lock:
                    self._counts[method] += 1
                if self.latency_ms > 0:
                    await asyncio.sleep(self.latency_ms / 1000)
                upstream, answer = await self._forward(upstream, head + body)
                up_reader = upstream[0]
                while True:  # interim 1xx answers come before the real one
                    status_line, answer_fields = _headers(answer)
                    status = int(status_line.split(" ")[1])
                    if status >= 200:
                        break
                    client_writer.write(answer)
                    answer = await _read_head(up_reader)
                no_body = method == "HEAD" or status in _NO_BODY_STATUSES
                closes = answer_fields.get("connection", "").lower() == "close"
                answer_body = b"" if no_body else await _read_body(up_reader, answer_fields, until_eof=True)
                client_writer.write(answer + answer_body)
                await client_writer.drain()
                if closes or fields.get("connection", "").lower() == "close":
                    break
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            for writer in (client_writer, upstream[1] if upstream else None):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()


@contextlib.contextmanager
def running(upstream_port: int, *, latency_ms: float = 0.0) -> Iterator[LatencyProxy]:
    """A started proxy in front of `upstream_port`, always stopped afterwards."""
    proxy = LatencyProxy(upstream_port, latency_ms=latency_ms).start()
    try:
        yield proxy
    finally:
        proxy.stop()
