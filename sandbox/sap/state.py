"""The state every part of the SAP simulator shares (set by `SapSimulator.__init__`), customizing included."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sandbox.faults import FaultKnobs
from sandbox.sap.rows import _Rows
from sandbox.webhook_delivery import Deliverer


@dataclass
class _Session:
    user: str
    token: str


@dataclass
class Material:
    """Customizing of one material: allowed sales units, plants, list price."""

    number: str
    text: str
    base_unit: str
    units: frozenset[str]
    plants: frozenset[str]
    price: Decimal
    group: str = "P001"


@dataclass
class Customizing:
    """The organisational data validation checks against."""

    sales_areas: set[tuple[str, str, str]] = field(default_factory=set)
    plants: set[str] = field(default_factory=set)
    materials: dict[str, Material] = field(default_factory=dict)
    units: set[str] = field(default_factory=lambda: {"PC", "EA", "KG", "G", "L", "M", "ST", "BOX"})
    countries: set[str] = field(default_factory=lambda: {"US", "CA", "MX", "DE", "GB", "FR", "NL", "CH", "JP"})
    currencies: set[str] = field(default_factory=lambda: {"USD", "EUR", "CAD", "MXN", "GBP", "CHF", "JPY"})
    order_types: set[str] = field(default_factory=lambda: {"OR", "TA", "CBFD"})
    groupings: set[str] = field(default_factory=lambda: {"BP01", "BP02", "BP03"})
    roles: set[str] = field(default_factory=lambda: {"FLCU00", "FLCU01", "FLVN00", "FLVN01", "BUP001", "BUP002"})


class SapState:
    """Attribute declarations only: each part (auth, store, rules, ...) is a base class of `SapSimulator`."""

    page_size: int
    latency_ms: float
    operation_latency_ms: float
    user: str
    password: str
    client_id: str
    client_secret: str
    customizing: Customizing
    faults: FaultKnobs
    request_counts: Counter[str]
    requests: list[tuple[str, str]]
    batch_requests: list[tuple[str, str]]
    stock: dict[tuple[str, str], Decimal]
    events: list[dict[str, Any]]
    event_endpoints: list[str]
    event_failures: list[str]
    emit_events: bool
    _event_buffer: list[dict[str, Any]] | None
    _endpoint_headers: dict[str, dict[str, str]]
    _lock: threading.RLock
    _rows: dict[str, _Rows]
    _sessions: dict[str, _Session]
    _tokens: dict[str, str]
    _numbers: dict[str, int]
    _last_stamp: datetime
    _deliveries: Deliverer
    _metadata_cache: dict[str, bytes]
