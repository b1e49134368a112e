"""The simulated org's records: validation, references, rules, roll-ups, External ID indexes and transactions."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.responses import JSONResponse, Response

import sandbox.salesforce.schema as schema
from sandbox.salesforce.cdc import ChangeEvents
from sandbox.salesforce.faults import Faults, Limits
from sandbox.salesforce.model import (
    API_PREFIX,
    CALCULATED,
    CREATE_ONLY,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    EXTERNAL_IDS,
    KEY_PREFIX,
    ORDER_STATUSES,
    REFERENCES,
    REQUIRED,
    ROLLUPS,
    SCHEMAS,
    SF_ID_RE,
    SYSTEM_FIELDS,
    UI_ORIGIN,
    UI_USER_ID,
    BulkJob,
    SalesforceFault,
    sf_datetime,
    to_18,
)
from sandbox.salesforce.soql import Soql
from sandbox.salesforce.values import as_number, check_value, ext_key

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


class SalesforceStore(ChangeEvents):
    """In-memory org state and its write paths; every public method takes the lock."""

    def __init__(self, *, client_id: str = DEFAULT_CLIENT_ID, client_secret: str = DEFAULT_CLIENT_SECRET,
                 webhook_verify: Any = True) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self._lock = threading.RLock()
        self.limits = Limits()
        self.faults = Faults(sim=self)
        self.webhook_verify = webhook_verify
        self.instance_url: str | None = None
        """When set, the token endpoint answers this `instance_url` instead of its own base URL."""
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.records: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SCHEMAS}
            self._tokens: set[str] = set()
            self.faults.expired = set()
            self.faults.reject_sessions = False
            self.faults.clear()
            self.limits.used = 0
            self.request_count = 0
            self.requests: list[tuple[str, str, dict[str, str]]] = []
            self._events: list[dict[str, Any]] = []
            self._pending: list[dict[str, Any]] = []
            self._replay = itertools.count(1000)
            self._seq = itertools.count(1)
            self._jobs: dict[str, BulkJob] = {}
            self._cursors: dict[str, list[dict[str, Any]]] = {}
            self._webhooks: list[tuple[str, dict[str, str]]] = []
            self.picklists: dict[tuple[str, str], list[dict[str, Any]]] = {}
            """Picklists changed in Setup since the seed, (sObject, field) -> picklistValues (what describe shows)."""
            # (sObject, External ID field) -> lower-cased value -> ids; several ids when a user copied a value
            self._ext_index: dict[tuple[str, str], dict[str, dict[str, None]]] = {
                (name, ext): {} for name in SCHEMAS for ext in EXTERNAL_IDS[name]}
            # (line sObject, header id) -> line ids, for roll-ups and master-detail cascades
            self._children: dict[tuple[str, str], dict[str, None]] = {}
            self._id_seq = {name: itertools.count(1) for name in SCHEMAS}
            self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
            self._last_tick = datetime(2000, 1, 1, tzinfo=UTC)

    def reset_allocation(self) -> None:
        with self._lock:
            self.limits.used = 0

    def _now(self) -> datetime:
        # strictly increasing millisecond timestamps, so SystemModstamp orders changes
        now = self.clock()
        now = now.replace(microsecond=(now.microsecond // 1000) * 1000)
        if now <= self._last_tick:
            now = self._last_tick + timedelta(milliseconds=1)
        self._last_tick = now
        return now

    def _new_id(self, sobject: str) -> str:
        # like the org: key prefix, pod, reserved digit, then a base-62 counter; sequential so seeds reproduce ids
        number, digits = next(self._id_seq[sobject]), ""
        for _ in range(9):
            number, rest = divmod(number, 62)
            digits = _BASE62[rest] + digits
        return to_18(KEY_PREFIX[sobject] + "5g0" + digits)

    def ui_create(self, sobject: str, values: Mapping[str, Any]) -> str:
        """A record a user creates in the Lightning UI (changeOrigin without our client id); returns its id."""
        with self._lock:
            return self._create(sobject, dict(values), origin=UI_ORIGIN, user=UI_USER_ID)

    def ui_change(self, sobject: str, record_id: str, values: Mapping[str, Any]) -> None:
        """An edit a user makes in the Lightning UI (changeOrigin without our client id)."""
        with self._lock:
            self._update(sobject, record_id, dict(values), origin=UI_ORIGIN, user=UI_USER_ID)

    def ui_delete(self, record_id: str) -> None:
        """A record a user deletes in the Lightning UI (a header's lines go with it)."""
        with self._lock:
            self._delete(record_id, origin=UI_ORIGIN, user=UI_USER_ID)

    def get(self, sobject: str, record_id: str) -> dict[str, Any] | None:
        with self._lock:
            rec = self.records[sobject].get(record_id)
            return dict(rec) if rec else None

    def find(self, sobject: str, **equals: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.records[sobject].values()
                    if all(r.get(k) == v for k, v in equals.items())]

    def count(self, sobject: str) -> int:
        with self._lock:
            return len(self.records[sobject])

    def _canonical(self, sobject: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Field names made canonical (API names are case-insensitive) and values checked against the schema."""
        obj = schema.BY_NAME[sobject]
        out: dict[str, Any] = {}
        for name, value in values.items():
            f = obj.field(name)
            if f is None:
                raise SalesforceFault(400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}",
                                      [name])
            if f.name in SYSTEM_FIELDS and f.name != "Id":
                raise SalesforceFault(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                                      f"Unable to create/update fields: {f.name}. Please check the security settings "
                                      "of this field and verify that it is read/write for your profile or permission "
                                      "set.", [f.name])
            changed = self.picklists.get((sobject, f.name))
            if changed is not None:  # a picklist changed in Setup: its active values are what a write may use
                f = dataclasses.replace(f, picklist=tuple(e["value"] for e in changed if e["active"]))
            check_value(f, value)
            out[f.name] = value
        return out

    @staticmethod
    def _check_writable(sobject: str, values: Mapping[str, Any], record: Mapping[str, Any] | None) -> None:
        bad = sorted(n for n in values if n in CALCULATED.get(sobject, ()))
        if record is not None:
            bad += sorted(n for n in values if n in CREATE_ONLY.get(sobject, ()) and values[n] != record.get(n))
        if bad:
            raise SalesforceFault(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                                  f"Unable to create/update fields: {', '.join(bad)}. Please check the security "
                                  "settings of this field and verify that it is read/write for your profile or "
                                  "permission set.", bad)

    def _resolve_references(self, sobject: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Lookup values checked against the org and stored as 18-character ids (15-character ids are accepted)."""
        out = dict(values)
        for name, value in values.items():
            target = REFERENCES.get(name) if SCHEMAS[sobject].get(name) == "reference" else None
            if target is None:
                continue
            if value in (None, ""):
                out[name] = None
                continue
            text = str(value)
            if not SF_ID_RE.fullmatch(text) or text[:3] != KEY_PREFIX[target]:
                raise SalesforceFault(400, "MALFORMED_ID", f"{target} ID: id value of incorrect type: {text}", [name])
            rid = to_18(text[:15])
            if rid not in self.records[target]:
                raise SalesforceFault(400, "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [name])
            out[name] = rid
        return out

    @staticmethod
    def _derive(sobject: str, record: dict[str, Any]) -> None:
        """Formula fields: a line's TotalPrice is Quantity x UnitPrice, rounded to the currency's 2 decimals."""
        if sobject not in ROLLUPS:
            return
        quantity, price = record.get("Quantity"), record.get("UnitPrice")
        record["TotalPrice"] = (None if quantity is None or price is None
                                else round(as_number("Quantity", quantity) * as_number("UnitPrice", price), 2))

    def _check_rules(self, sobject: str, before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> None:
        if sobject == "Order":
            status = after.get("Status")
            if status not in ORDER_STATUSES:
                raise SalesforceFault(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                                      f"Status: bad value for restricted picklist field: {status}", ["Status"])
            activating = status == "Activated" and (before is None or before.get("Status") != "Activated")
            # orders are activated once they have products (the usual org rule), so never created activated
            if activating and (before is None or not self._children.get(("OrderItem", str(before["Id"])))):
                raise SalesforceFault(400, "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                                      "An order needs at least one order product before it can be activated.",
                                      ["Status"])
        elif sobject == "OrderItem":
            priced = ("Quantity", "UnitPrice", "Product2Id")
            if before is None or any(before.get(n) != after.get(n) for n in priced):
                self._check_order_open(after)

    def _check_complete(self, sobject: str, before: Mapping[str, Any] | None, after: dict[str, Any]) -> None:
        """What every create and update passes: formula fields derived, required fields set, the org's rules."""
        self._derive(sobject, after)
        missing = [f for f in REQUIRED[sobject] if after.get(f) in (None, "")]
        if missing:
            raise SalesforceFault(400, "REQUIRED_FIELD_MISSING",
                                  f"Required fields are missing: [{', '.join(missing)}]", missing)
        self._check_rules(sobject, before, after)

    def _check_order_open(self, item: Mapping[str, Any]) -> None:
        order = self.records["Order"].get(str(item.get("OrderId") or ""))
        if order is not None and order.get("Status") == "Activated":
            raise SalesforceFault(400, "FIELD_INTEGRITY_EXCEPTION",
                                  "You can't add, change or delete order products on an activated order.", ["OrderId"])

    def _index_add(self, sobject: str, rid: str, record: Mapping[str, Any]) -> None:
        for name in EXTERNAL_IDS[sobject]:
            key = ext_key(record.get(name))
            if key is not None:
                self._ext_index[(sobject, name)].setdefault(key, {})[rid] = None
        rollup = ROLLUPS.get(sobject)
        if rollup is not None and record.get(rollup[0]):
            self._children.setdefault((sobject, str(record[rollup[0]])), {})[rid] = None

    def _index_remove(self, sobject: str, rid: str, record: Mapping[str, Any]) -> None:
        for name in EXTERNAL_IDS[sobject]:
            key = ext_key(record.get(name))
            holders = self._ext_index[(sobject, name)].get(key or "")
            if key is not None and holders is not None:
                holders.pop(rid, None)
                if not holders:
                    del self._ext_index[(sobject, name)][key]
        rollup = ROLLUPS.get(sobject)
        if rollup is not None and record.get(rollup[0]):
            lines = self._children.get((sobject, str(record[rollup[0]])))
            if lines is not None:
                lines.pop(rid, None)

    def _roll_up(self, sobject: str, line: Mapping[str, Any], *, origin: str, user: str, when: datetime,
                 transaction: str) -> None:
        """Recompute the header's total after a line change, in the line's transaction (like the platform).

        The header is touched (LastModifiedDate, SystemModstamp, an UPDATE change event attributed to the line's
        user and client) only when its total changes.
        """
        rollup = ROLLUPS.get(sobject)
        if rollup is None:
            return
        parent_field, parent_sobject, total_field = rollup
        parent = self.records[parent_sobject].get(str(line.get(parent_field) or ""))
        if parent is None:
            return
        lines = self.records[sobject]
        total = round(sum(float(lines[i]["TotalPrice"] or 0) for i in self._children.get((sobject, parent["Id"]), {})
                          if i in lines), 2)
        if parent.get(total_field) == total:
            return
        parent[total_field] = total
        parent["LastModifiedDate"] = parent["SystemModstamp"] = sf_datetime(when)
        self._record_event(parent_sobject, [parent["Id"]], "UPDATE", [total_field, "LastModifiedDate"], parent,
                           origin, user, when, transaction)

    def _create(self, sobject: str, values: dict[str, Any], *, origin: str, user: str) -> str:
        values = self._canonical(sobject, values)
        values.pop("Id", None)
        values = self._resolve_references(sobject, values)
        self._check_writable(sobject, values, None)
        record: dict[str, Any] = dict.fromkeys(SCHEMAS[sobject])
        record.update(values)
        self._check_complete(sobject, None, record)
        now = self._now()
        rid = self._new_id(sobject)
        stamp = sf_datetime(now)
        record.update(Id=rid, CreatedDate=stamp, LastModifiedDate=stamp, SystemModstamp=stamp, IsDeleted=False)
        self.records[sobject][rid] = record
        self._index_add(sobject, rid, record)
        transaction = self._record_event(sobject, [rid], "CREATE", sorted(values), record, origin, user, now)
        self._roll_up(sobject, record, origin=origin, user=user, when=now, transaction=transaction)
        return rid

    def _update(self, sobject: str, rid: str, values: dict[str, Any], *, origin: str, user: str) -> None:
        values = self._canonical(sobject, values)
        record = self.records[sobject].get(rid)
        if record is None:
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        values = self._resolve_references(sobject, {k: v for k, v in values.items() if k != "Id"})
        self._check_writable(sobject, values, record)
        merged = {**record, **values}
        self._check_complete(sobject, record, merged)
        changed = sorted(k for k in SCHEMAS[sobject] if record.get(k) != merged.get(k))
        now = self._now()
        self._index_remove(sobject, rid, record)
        record.update(merged)
        record["LastModifiedDate"] = record["SystemModstamp"] = sf_datetime(now)
        self._index_add(sobject, rid, record)
        transaction = self._record_event(sobject, [rid], "UPDATE", [*changed, "LastModifiedDate"], record, origin,
                                         user, now)
        self._roll_up(sobject, record, origin=origin, user=user, when=now, transaction=transaction)

    def _delete(self, rid: str, *, origin: str, user: str) -> None:
        for sobject, table in self.records.items():
            if rid not in table:
                continue
            record = table[rid]
            if sobject == "OrderItem":
                self._check_order_open(record)
            now = self._now()
            transaction = str(uuid.uuid4())
            # master-detail: the header's lines are deleted with it, in the same transaction
            for line_sobject, (_, header_sobject, _) in ROLLUPS.items():
                if header_sobject != sobject:
                    continue
                for line_id in list(self._children.pop((line_sobject, rid), {})):
                    line = self.records[line_sobject].pop(line_id)
                    self._index_remove(line_sobject, line_id, line)
                    self._record_event(line_sobject, [line_id], "DELETE", [], line, origin, user, now, transaction)
            del table[rid]
            self._index_remove(sobject, rid, record)
            self._record_event(sobject, [rid], "DELETE", [], record, origin, user, now, transaction)
            self._roll_up(sobject, record, origin=origin, user=user, when=now, transaction=transaction)
            return
        raise SalesforceFault(404, "ENTITY_IS_DELETED", "entity is deleted")

    def _upsert(self, sobject: str, ext_field: str, ext_value: str, values: dict[str, Any], *, origin: str,
                user: str) -> tuple[str, bool]:
        known = schema.BY_NAME[sobject].field(ext_field)
        if known is None or not (known.external_id or known.name == "Id"):
            raise SalesforceFault(404, "NOT_FOUND", "The requested resource does not exist")
        ext_field = known.name
        values = {k: v for k, v in values.items() if k.lower() != ext_field.lower()}
        key = ext_key(ext_value)
        if ext_field == "Id":
            matches = self._ids_for(sobject, [ext_value])
        else:
            matches = list(self._ext_index[(sobject, ext_field)].get(key or "", {})) if key is not None else []
        if len(matches) > 1:
            raise SalesforceFault(300, "MULTIPLE_CHOICES", f"Multiple records with {ext_field} = {ext_value}",
                                  [f"{API_PREFIX}sobjects/{sobject}/{rid}" for rid in matches])
        if matches:
            self._update(sobject, matches[0], values, origin=origin, user=user)
            return matches[0], False
        return self._create(sobject, {**values, ext_field: ext_value}, origin=origin, user=user), True

    def _ids_for(self, sobject: str, values: Iterable[Any]) -> list[str]:
        """Existing record ids among `values` (15- or 18-character)."""
        table = self.records[sobject]
        found = []
        for value in values:
            text = str(value)
            if SF_ID_RE.fullmatch(text):
                rid = text if text in table else to_18(text[:15])
                if rid in table and rid not in found:
                    found.append(rid)
        return found

    def _candidates(self, parsed: Soql) -> list[dict[str, Any]]:
        """The rows a query must look at: an index lookup when the WHERE clause pins Id or an External ID."""
        table = self.records[parsed.sobject]
        for name, values in parsed.hints:
            if any(v is None for v in values):
                continue
            if name == "Id":
                ids = self._ids_for(parsed.sobject, values)
            elif name in EXTERNAL_IDS[parsed.sobject]:
                index = self._ext_index[(parsed.sobject, name)]
                ids = list(dict.fromkeys(rid for v in values for rid in index.get(str(v).lower(), {})))
            else:
                continue
            # creation order, the order a full scan would give
            return sorted((table[i] for i in ids), key=lambda r: str(r["CreatedDate"]))
        return list(table.values())

    def _snapshot(self) -> tuple[Any, ...]:
        """What a rolled-back transaction must restore: records, indexes, and the change events not yet kept."""
        return ({s: {rid: dict(r) for rid, r in table.items()} for s, table in self.records.items()},
                {k: {v: dict(ids) for v, ids in index.items()} for k, index in self._ext_index.items()},
                {k: dict(v) for k, v in self._children.items()}, len(self._events), len(self._pending))

    def _restore(self, snap: tuple[Any, ...]) -> None:
        self.records, self._ext_index, self._children = snap[0], snap[1], snap[2]
        del self._events[snap[3]:]
        del self._pending[snap[4]:]


    # every API answer carries the allocation's usage, as the org's do
    def _limit_header(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.limits.used}/{self.limits.daily_max}"}

    def _json(self, body: Any, status: int = 200) -> Response:
        return JSONResponse(body, status_code=status, headers=self._limit_header())

    # ------------------------------------------------------------------ drift (as an admin would cause it in Setup)

    def _picklist(self, sobject: str, field_name: str) -> list[dict[str, Any]]:
        obj = schema.sobject(sobject)
        f = obj.field(field_name) if obj is not None else None
        if obj is None or f is None or f.type != "picklist":
            raise KeyError(f"{sobject}.{field_name} is not a picklist of the simulated org")
        key = (obj.name, f.name)
        if key not in self.picklists:
            self.picklists[key] = f.describe()["picklistValues"]
        return self.picklists[key]

    def set_picklist_value(self, sobject: str, field_name: str, value: str, label: str | None = None, *,
                           active: bool = True) -> None:
        """Add a picklist value, relabel it, or (de)activate it; `describe` shows it from now on."""
        with self._lock:
            values = self._picklist(sobject, field_name)
            for entry in values:
                if entry["value"] == value:
                    entry.update(label=label or entry["label"], active=active)
                    return
            values.append({"active": active, "defaultValue": False, "label": label or value, "validFor": None,
                           "value": value})

    def remove_picklist_value(self, sobject: str, field_name: str, value: str) -> None:
        """Delete a picklist value (Setup's Delete: the value is gone from `describe`)."""
        with self._lock:
            values = self._picklist(sobject, field_name)
            if not any(e["value"] == value for e in values):
                raise KeyError(f"{sobject}.{field_name} has no picklist value {value!r}")
            values[:] = [e for e in values if e["value"] != value]

    def describe(self, obj: schema.SObjectDef, version: str) -> dict[str, Any]:
        """`GET /sobjects/<name>/describe`, with the picklists as changed since the seed."""
        out = schema.describe(obj, version)
        for f in out["fields"]:
            changed = self.picklists.get((obj.name, f["name"]))
            if changed is not None:
                f["picklistValues"] = [dict(e) for e in changed]
        return out
