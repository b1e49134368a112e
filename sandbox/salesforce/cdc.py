"""Change Data Capture: one Pub/Sub-shaped event per committed change, kept and delivered to registered webhooks."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import httpx

from sandbox.salesforce.model import SCHEMAS


class ChangeEvents:
    """The org's change event stream; mixed into the store, whose transactions append to it."""

    # set by the store's reset(): the stream lives and dies with the org's records
    _lock: threading.RLock
    webhook_verify: Any
    _events: list[dict[str, Any]]
    _pending: list[dict[str, Any]]
    _webhooks: list[tuple[str, dict[str, str]]]
    _replay: Iterator[int]
    _seq: Iterator[int]

    def events(self) -> list[dict[str, Any]]:
        """Every CDC event generated so far (Pub/Sub-shaped JSON)."""
        with self._lock:
            return [json.loads(json.dumps(e)) for e in self._events]

    def register_cdc_webhook(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        """POST future change events to `url` (delivered by `flush_events`)."""
        with self._lock:
            self._webhooks.append((url, dict(headers or {})))

    def flush_events(self, timeout: float = 10.0) -> int:
        """Deliver pending events to the registered webhooks (from a background thread); returns the count."""
        with self._lock:
            pending, self._pending = self._pending, []
            hooks = list(self._webhooks)
        if not hooks or not pending:
            return 0
        errors: list[BaseException] = []

        def deliver() -> None:
            try:
                with httpx.Client(verify=self.webhook_verify, timeout=timeout) as client:
                    for event in pending:
                        for url, headers in hooks:
                            client.post(url, json=event, headers=headers).raise_for_status()
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)

        thread = threading.Thread(target=deliver, name="salesforce-sim-cdc", daemon=True)
        thread.start()
        thread.join(timeout)
        if errors:
            raise errors[0]
        return len(pending)

    def _record_event(self, sobject: str, ids: list[str], change_type: str, changed: list[str],
                      values: Mapping[str, Any], origin: str, user: str, when: datetime,
                      transaction: str | None = None) -> str:
        """Append one CDC event; returns its transactionKey (pass it on for changes of the same transaction)."""
        header = {
            "entityName": sobject, "recordIds": ids, "changeType": change_type, "changeOrigin": origin,
            "transactionKey": transaction or str(uuid.uuid4()), "sequenceNumber": next(self._seq),
            "commitTimestamp": int(when.timestamp() * 1000), "commitNumber": next(self._seq) * 1000,
            "commitUser": user, "nulledFields": [k for k in changed if values.get(k) is None],
            "diffFields": [], "changedFields": changed,
        }
        payload: dict[str, Any] = {"ChangeEventHeader": header}
        for name in SCHEMAS[sobject]:
            payload[name] = values.get(name) if name in changed or change_type == "CREATE" else None
        payload["LastModifiedDate"] = header["commitTimestamp"]
        event = {"schema": f"{sobject}ChangeEvent", "replayId": next(self._replay), "payload": payload}
        self._events.append(event)
        if self._webhooks:
            self._pending.append(event)
        return str(header["transactionKey"])
