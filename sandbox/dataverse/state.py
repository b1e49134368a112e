"""What the simulator's parts share: the state `DataverseSimulator` holds and the methods they call on each other."""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sandbox.dataverse.knobs import Faults, ServiceProtection
from sandbox.dataverse.platform import WebhookFailure, WebhookRegistration
from sandbox.dataverse.protocol import _ApiRequest, _ApiResponse, _Caller, _Event, _Txn
from sandbox.dataverse.rows import Row, _ColumnIndex
from sandbox.dataverse.schema import Rollup, TableSchema
from sandbox.faults import CountdownFault
from sandbox.webhook_delivery import Deliverer


class _State:
    """The base of every part of `DataverseSimulator` (app.py sets these in `__init__`).

    The method declarations are for the type checker only: each part calls methods another part defines.
    """

    schema: dict[str, TableSchema]
    tenant_id: str
    client_id: str
    client_secret: str
    app_user_id: str
    office_user_id: str
    org_url: str | None
    token_lifetime_seconds: int
    latency_ms: float
    clock: Callable[[], float]
    limits: ServiceProtection
    faults: Faults
    request_counts: Counter[str]
    status_counts: Counter[int]
    webhook_failures: list[WebhookFailure]
    webhooks_delivered: int
    _apps: dict[str, tuple[str, str]]
    _tokens: dict[str, tuple[str, float]]
    _lock: threading.RLock
    global_option_sets: dict[str, dict[int, str]]
    _tables: dict[str, dict[str, Row]]
    _key_index: dict[str, dict[tuple[str, ...], dict[tuple[Any, ...], str]]]
    _column_index: dict[str, dict[str, _ColumnIndex]]
    _deleted: dict[str, list[tuple[int, str]]]
    _child_links: dict[str, tuple[str, ...]]
    _rollup_links: dict[str, list[tuple[TableSchema, str]]]
    _children: dict[str, dict[str, dict[str, set[str]]]]
    _autonumbers: dict[tuple[str, str], int]
    _autonumber_rng: random.Random
    _version: int
    _window: deque[float]
    _in_flight: int
    _webhooks: list[WebhookRegistration]
    _webhook_verify: Any
    _deliveries: Deliverer

    if TYPE_CHECKING:
        def _check_registration(self, schema: TableSchema, values: Mapping[str, Any]) -> None: ...

        def _check_required(self, schema: TableSchema, values: Mapping[str, Any]) -> None: ...

        def _check_unique(self, schema: TableSchema, values: Mapping[str, Any], own_key: str | None) -> None: ...

        @staticmethod
        def _derives(schema: TableSchema) -> bool: ...

        def _dispatch(self, req: _ApiRequest, caller: _Caller, txn: _Txn) -> _ApiResponse: ...

        def _emit(self, events: Iterable[_Event]) -> None: ...

        def _fault_response(self, fault: CountdownFault) -> _ApiResponse: ...

        def _find(self, schema: TableSchema, key: str | dict[str, Any]) -> Row | None: ...

        def _json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> _ApiResponse: ...

        @staticmethod
        def _key_text(key: str | dict[str, Any]) -> str: ...

        def _next_version(self) -> int: ...

        def _platform_fixups(self, schema: TableSchema, values: dict[str, Any], lookup_types: Mapping[str, str], *,
                             written: Mapping[str, Any] | None = None, creating: bool = False) -> None: ...

        def _prepare(self, schema: TableSchema, body: Any, base: str) -> tuple[dict[str, Any], dict[str, str]]: ...

        def _put_row(self, schema: TableSchema, key: str, row: Row | None) -> None: ...

        def _refresh_rollups(self, parents: Iterable[tuple[TableSchema, str]], caller: _Caller, txn: _Txn) -> None: ...

        def _render(self, schema: TableSchema, row: Row, select: list[str] | None,
                    annotate: bool) -> dict[str, Any]: ...

        def _rollup_parents(self, schema: TableSchema,
                            values: Mapping[str, Any] | None) -> list[tuple[TableSchema, str]]: ...

        def _rollup_value(self, rollup: Rollup, parent: str) -> float: ...

        def _select(self, schema: TableSchema, req: _ApiRequest) -> list[str] | None: ...

        def _target_logical(self, schema: TableSchema, col: str, values: Mapping[str, Any]) -> str: ...

        def _update(self, schema: TableSchema, row: Row, values: dict[str, Any], lookup_types: dict[str, str],
                    caller: _Caller, txn: _Txn) -> Row: ...
