"""Azurite keeps an idle connection longer than the SDK's HTTP client does, so no request meets a closing one."""

from __future__ import annotations

import http.client

import aiohttp

from tests.azurite import HOST, running_azurite


async def test_azurite_keeps_idle_connections_longer_than_aiohttp_reuses_them():
    # With Azurite's 5 s against aiohttp's 15 s, a transaction sent on a connection the server was closing was
    # reset, and azure-core retries no POST: the demo's controller cycle crashed on a ServiceRequestError.
    reuse = aiohttp.TCPConnector()._keepalive_timeout  # what the Tables SDK's default transport keeps
    with running_azurite() as azurite:
        connection = http.client.HTTPConnection(HOST, azurite.port, timeout=10)
        try:
            connection.request("GET", "/devstoreaccount1/Tables")
            response = connection.getresponse()
            response.read()
            header = response.getheader("Keep-Alive") or ""
        finally:
            connection.close()
    assert header.startswith("timeout="), header
    assert int(header.removeprefix("timeout=")) > reuse, header
