"""The latency knob in front of Azurite: every Table Storage request delayed and counted; off by default."""

from __future__ import annotations

import asyncio
import http.client
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from azure.data.tables.aio import TableServiceClient

from sandbox.latency_proxy import LATENCY_VARIABLE, LatencyProxy, latency_from_environment, running
from shared.runtime.azure import azurite_connection_string, default_transport
from tests.azurite import AzuriteTable, AzuriteUnavailableError, ensure_installed

LATENCY_MS = 50.0
REQUESTS = 10


@pytest.fixture(scope="module")
def azurite() -> Iterator[AzuriteTable]:
    try:
        table = AzuriteTable(ensure_installed())
        table.start()
    except AzuriteUnavailableError as error:
        pytest.fail(str(error), pytrace=False)
    yield table
    table.stop()


async def _upserts(port: int, table_name: str) -> float:
    """Seconds taken by REQUESTS sequential upserts through `port` (the table is created first, not timed)."""
    conn = azurite_connection_string(port)
    async with TableServiceClient.from_connection_string(conn, transport=default_transport()) as service:
        table = await service.create_table_if_not_exists(table_name)
        started = time.perf_counter()
        for n in range(REQUESTS):
            await table.upsert_entity({"PartitionKey": "p", "RowKey": f"r{n}", "n": n})
        seconds = time.perf_counter() - started
        rows = [entity async for entity in table.query_entities("PartitionKey eq 'p'")]
    assert sorted(int(row["n"]) for row in rows) == list(range(REQUESTS))  # forwarded intact, both ways
    return seconds


async def test_every_request_through_the_proxy_takes_at_least_the_latency(azurite: AzuriteTable) -> None:
    with running(azurite.port, latency_ms=LATENCY_MS) as proxy:
        async with asyncio.timeout(60):
            seconds = await _upserts(proxy.port, "slowtable")
        counted = proxy.requests()
    # a lower bound only: the knob must cost at least its delay per request (not a speed claim)
    assert seconds >= REQUESTS * LATENCY_MS / 1000
    # the upserts are PATCH (MERGE) requests; plus the create and the query
    assert counted.get("PATCH", 0) + counted.get("MERGE", 0) + counted.get("PUT", 0) == REQUESTS
    assert sum(counted.values()) >= REQUESTS + 2


async def test_the_proxy_is_off_by_default_and_read_from_the_environment(
    azurite: AzuriteTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(LATENCY_VARIABLE, raising=False)
    assert latency_from_environment() == 0.0
    proxy = LatencyProxy(azurite.port).start()
    try:
        assert proxy.latency_ms == 0.0
        async with asyncio.timeout(60):
            seconds = await _upserts(proxy.port, "fasttable")
        assert proxy.request_count() >= REQUESTS + 2  # counted even without a delay
    finally:
        proxy.stop()
    assert seconds < REQUESTS * LATENCY_MS / 1000  # what the knob at 50 ms would cost at least
    monkeypatch.setenv(LATENCY_VARIABLE, "12")
    assert latency_from_environment() == 12.0
    monkeypatch.setenv(LATENCY_VARIABLE, "-1")
    with pytest.raises(ValueError, match=LATENCY_VARIABLE):
        latency_from_environment()


def test_stop_closes_the_listener(azurite: AzuriteTable) -> None:
    proxy = LatencyProxy(azurite.port).start()
    port = proxy.port
    proxy.stop()
    proxy.stop()  # idempotent
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


class _ClosesWhenIdle(socketserver.BaseRequestHandler):
    """Answers each request, and closes a connection idle for 0.2 s (as Node closes idle keep-alive ones)."""

    def handle(self) -> None:
        self.request.settimeout(0.2)
        pending = b""
        while True:
            try:
                chunk = self.request.recv(65536)
            except TimeoutError:
                return
            if not chunk:
                return
            pending += chunk
            while b"\r\n\r\n" in pending:
                _, pending = pending.split(b"\r\n\r\n", 1)
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


def test_a_kept_client_connection_outlives_the_upstream_closing_its_idle_one() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ClosesWhenIdle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with running(server.server_address[1]) as proxy:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            for _ in range(2):
                connection.request("GET", "/")
                answer = connection.getresponse()
                assert (answer.status, answer.read()) == (200, b"ok")
                time.sleep(0.5)  # the upstream closes its side meanwhile; ours stays open
            connection.close()
            assert proxy.requests() == {"GET": 2}
    finally:
        server.shutdown()
        server.server_close()
