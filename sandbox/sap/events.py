"""Event-mesh style CloudEvents: raised on creates and changes, POSTed to registered URLs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from sandbox.sap.gateway import EVENT_SOURCE
from sandbox.sap.state import SapState


class SapEvents(SapState):
    """CloudEvents out: endpoints, buffering inside a changeset, background delivery."""

    def register_event_endpoint(self, url: str, *, headers: Mapping[str, str] | None = None) -> None:
        """CloudEvents of every create/change are POSTed to `url` (like an Event Mesh webhook subscription),
        with `headers` on each delivery (the subscription's configured authentication header, say)."""
        self.event_endpoints.append(url)
        self._endpoint_headers[url] = dict(headers or {})

    async def flush_events(self, timeout: float = 10.0) -> None:
        """Wait until every queued event delivery has finished (delivered or failed)."""
        await self._deliveries.flush(timeout)

    def close(self) -> None:
        """Stop the event delivery thread."""
        self._deliveries.close()

    def _event(self, event_type: str, data: dict[str, Any]) -> None:
        if not self.emit_events:
            return
        now = datetime.now(UTC)
        event = {"type": event_type, "specversion": "1.0", "source": EVENT_SOURCE, "id": str(uuid.uuid4()),
                 "time": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "datacontenttype": "application/json",
                 "data": {**data, "EventRaisedDateTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
        if self._event_buffer is not None:
            # Inside a $batch changeset: raised only when the changeset commits.
            self._event_buffer.append(event)
            return
        self._raise_event(event)

    def _raise_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        body = json.dumps(event).encode()
        for url in list(self.event_endpoints):
            self._deliveries.submit(self._delivery(url, body))

    def _delivery(self, url: str, body: bytes) -> Callable[[httpx.AsyncClient], Any]:
        async def deliver(client: httpx.AsyncClient) -> None:
            try:
                response = await client.post(url, content=body, headers={
                    **self._endpoint_headers.get(url, {}), "Content-Type": "application/cloudevents+json"})
                if response.status_code >= 300:
                    self.event_failures.append(f"{url}: HTTP {response.status_code}")
            except httpx.HTTPError as exc:
                self.event_failures.append(f"{url}: {type(exc).__name__}: {exc}")

        return deliver
