"""Business events: customer and sales-order events POSTed to registered endpoints, with retries."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from sandbox.fno.odata import CUSTOMER_EVENT, SALES_STATUS_EVENT, _wcf_date
from sandbox.fno.state import FnoState, _Delivery


class FnoEvents(FnoState):
    """Business events out: a background thread delivers them, 3 attempts each."""

    def register_business_event_endpoint(self, url: str) -> None:
        """Activate the customer-changed and sales-order-status events to an HTTPS endpoint."""
        self.event_endpoints.append(url)

    def _emit(self, entity: str, row: Mapping[str, Any], before: Mapping[str, Any] | None) -> None:
        if entity == "CustomersV3":
            event_id, fields = CUSTOMER_EVENT, {"Account": row["CustomerAccount"],
                                                "Name": row.get("OrganizationName", "")}
        elif entity == "SalesOrderHeadersV2" and before is not None and \
                before.get("SalesOrderStatus") != row.get("SalesOrderStatus"):
            event_id, fields = SALES_STATUS_EVENT, {"SalesOrderNumber": row["SalesOrderNumber"],
                                                    "SalesOrderStatus": row.get("SalesOrderStatus", "")}
        else:
            return
        self._post_event(event_id, str(row["dataAreaId"]), fields)

    def _post_event(self, event_id: str, legal: str, fields: Mapping[str, Any]) -> None:
        if not self.event_endpoints:
            return
        self._control_number += self._rng.randint(2, 9)  # upward, with gaps
        now = datetime.now(UTC)
        body = json.dumps({
            **fields, "BusinessEventId": event_id, "BusinessEventLegalEntity": legal, "ContextRecordSubject": "",
            "ControlNumber": self._control_number, "EventId": str(uuid.uuid4()).upper(),
            "EventTime": _wcf_date(now),
            "EventTimeIso8601": now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z",
            "InitiatingUserAADObjectId": "{C600136F-6814-41D9-8642-40CA0EC4EDD4}", "LegalEntity": legal,
            "MajorVersion": 0, "MinorVersion": 0, "ParentContextRecordSubjects": []}).encode()
        for url in self.event_endpoints:
            self._queue(_Delivery(url, body))

    def _queue(self, delivery: _Delivery) -> None:
        with self._lock:
            self._last_event = delivery
            self._pending += 1
            if self._worker is None:
                self._worker = threading.Thread(target=self._deliver_loop, name="fno-sim-events", daemon=True)
                self._worker.start()
        self._outbox.put(delivery)

    def _deliver_loop(self) -> None:
        with httpx.Client(verify=self._event_verify, timeout=30.0) as client:
            while (delivery := self._outbox.get()) is not None:
                try:
                    for attempt in range(3):  # business events retry 3 times, 1 s apart (configurable)
                        try:
                            resp = client.post(delivery.url, content=delivery.body,
                                               headers={"Content-Type": "application/json"})
                            if resp.is_success:
                                self.events_delivered.append(delivery.body)
                                break
                            error = f"HTTP {resp.status_code}"
                        except httpx.HTTPError as exc:
                            error = f"{type(exc).__name__}: {exc}"
                        if attempt == 2:
                            self.event_failures.append(f"{delivery.url}: {error}")
                        else:
                            time.sleep(self.event_retry_delay)
                finally:
                    with self._lock:
                        self._pending -= 1

    def deliver_duplicate_last_event(self) -> None:
        """Post the last event again, unchanged (endpoints receive duplicates in real life)."""
        with self._lock:
            last = self._last_event
        if last is None:
            raise RuntimeError("no business event was posted yet")
        self._queue(last)

    async def flush_events(self, timeout: float = 10.0) -> None:
        """Wait until every queued business event was delivered (or failed)."""
        import asyncio

        deadline = time.monotonic() + timeout
        while self._pending > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._pending} business events still pending")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop the event delivery thread and the composed Entra simulator."""
        if self._worker is not None:
            self._outbox.put(None)
            self._worker.join(timeout=5)
            self._worker = None
        self.entra.close()
