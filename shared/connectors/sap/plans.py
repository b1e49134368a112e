"""SAP write plans: the requests (deep inserts, PATCHes with ETags, POSTs) that bring a record to its wanted state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.connectors.sap.batch import _Req
from shared.connectors.sap.codecs import (
    _COMM_KEYS,
    ADDRESSES,
    AREA_KEYS,
    COMMUNICATION,
    CUSTOMER,
    CUSTOMER_ROLE,
    ITEM_MATCH_FIELD,
    ITEMS,
    ROLES,
    SALES_AREAS,
    SYSTEM,
    WRITABLE,
    _as_list,
    _blank,
    _diff,
    _entity,
    _find_item,
    _nav_rows,
    _plain_row,
    format_key,
    key_path,
    nest_dotted,
    wire_value,
)
from shared.core.errors import MappingError, RejectedError
from shared.core.ports import Lines, LineWrite, WriteOp


@dataclass
class _Plan:
    """The requests that bring one op's target to the wanted state, computed from its current state."""

    table: str
    what: str
    key: str | None
    requests: list[_Req] = field(default_factory=list)
    create: bool = False
    delete: bool = False
    incomplete: bool = False
    """More changes follow once SAP has reacted to these (a new customer role creates the customer): re-read."""


def _plan(op: WriteOp, current: dict[str, Any] | None) -> _Plan:
    _writable(op)
    if op.table == "A_SalesOrder":
        return _plan_order(op, current)
    return _plan_partner(op, current)


def _patch(table: str, key: Mapping[str, str], wanted: Mapping[str, Any], current: Mapping[str, Any],
           what: str) -> list[_Req]:
    """A PATCH of the fields of `wanted` that differ (none: no request), with the current ETag as If-Match."""
    changes = _diff(current, wanted, set(_entity(table).keys))
    if not changes:
        return []
    meta = current.get("__metadata")
    etag = meta.get("etag") if isinstance(meta, dict) else None
    return [_Req("PATCH", key_path(table, key), what, wire_value("", changes), str(etag or "*"))]


def _line_values(line: LineWrite, lines: Lines, header: Mapping[str, Any]) -> dict[str, Any]:
    values = {k: v for k, v in line.values.items() if k != "SalesOrder"}
    values.update(line.match)
    for line_field, header_field in lines.parent_fields.items():
        if header.get(header_field) not in (None, ""):
            values[line_field] = header[header_field]
    return values


def _plan_order(op: WriteOp, current: dict[str, Any] | None) -> _Plan:
    what = f"A_SalesOrder create (op {op.op_id})"
    if op.lines is not None and op.lines.table != ITEMS:
        raise RejectedError(f"{SYSTEM}: order lines are written through the navigation property {ITEMS}, not "
                            f"{op.lines.table!r}; fix lines.target_table in the flow spec")
    dotted = sorted(k for k in op.values if "." in k)
    if dotted:
        raise RejectedError(f"{SYSTEM}: A_SalesOrder takes no dotted paths ({', '.join(dotted)}); items come "
                            f"as lines through {ITEMS}")
    if op.action == "delete":
        if current is None:
            return _Plan("A_SalesOrder", f"A_SalesOrder delete (op {op.op_id})", op.key, delete=True)
        number = format_key("A_SalesOrder", current)
        meta = current.get("__metadata")
        etag = meta.get("etag") if isinstance(meta, dict) else None
        what = f"A_SalesOrder {number} delete (op {op.op_id})"
        return _Plan("A_SalesOrder", what, number, [_Req("DELETE", key_path("A_SalesOrder", {"SalesOrder": number}),
                                                         what, etag=str(etag or "*"))], delete=True)
    header = {k: v for k, v in op.values.items() if k not in ("SalesOrder", ITEMS)}
    if current is None:
        if op.action == "update":
            raise RejectedError(f"SAP rejected A_SalesOrder update (op {op.op_id}): sales order "
                                f"{op.key or op.match} does not exist (use 'upsert' to create it)")
        body: dict[str, Any] = {**header, **(op.match or {})}
        if op.lines is not None:
            items = []
            for n, line in enumerate(op.lines.items, start=1):
                item = _line_values(line, op.lines, body)
                item.setdefault("SalesOrderItem", str(n * 10))
                items.append(item)
            body[ITEMS] = {"results": items}
        return _Plan("A_SalesOrder", what, None, [_Req("POST", "A_SalesOrder", what, wire_value("", body))],
                     create=True)
    number = format_key("A_SalesOrder", current)
    what = f"A_SalesOrder {number} update (op {op.op_id})"
    requests = _patch("A_SalesOrder", {"SalesOrder": number}, header, current, what)
    if op.lines is not None:
        requests += _plan_items(number, op.lines, {**_plain_row(current), **header}, current, what)
    return _Plan("A_SalesOrder", what, number, requests)


def _plan_items(number: str, lines: Lines, header: Mapping[str, Any], order: Mapping[str, Any],
                what: str) -> list[_Req]:
    items = _nav_rows(order.get(ITEMS))
    next_number = max((int(str(i.get("SalesOrderItem") or 0)) for i in items
                       if str(i.get("SalesOrderItem") or "").isdigit()), default=0)
    requests: list[_Req] = []
    for line in lines.items:
        if not line.match:
            raise RejectedError(f"{SYSTEM} {what}: line {line.source_key} has no match field, so it cannot be "
                                "found again and would be added twice; set lines.link_field in the flow spec "
                                f"(e.g. {ITEM_MATCH_FIELD})")
        wanted = _line_values(line, lines, header)
        existing = _find_item(items, line.match)
        item_what = f"{what}, item for line {line.source_key}"
        if existing is None:
            next_number = (next_number // 10 + 1) * 10
            body = {**wanted, "SalesOrderItem": wanted.get("SalesOrderItem") or str(next_number)}
            requests.append(_Req("POST", f"{key_path('A_SalesOrder', {'SalesOrder': number})}/{ITEMS}",
                                 item_what, wire_value("", body)))
            continue
        key = {"SalesOrder": number, "SalesOrderItem": str(existing["SalesOrderItem"])}
        requests += _patch("A_SalesOrderItem", key, {k: v for k, v in wanted.items()
                                                          if k != "SalesOrderItem"}, existing, item_what)
    return requests


def _partner_values(op: WriteOp) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]],
                                            dict[str, Any] | None, list[dict[str, Any]]]:
    """(header fields, addresses, roles, customer fields, sales areas) of a partner op, dotted paths nested."""
    values = nest_dotted(op.values)
    addresses = [dict(a) for a in _as_list(values.pop(ADDRESSES, None), ADDRESSES)]
    roles = [dict(r) if isinstance(r, Mapping) else {"BusinessPartnerRole": str(r)}
             for r in _as_list(values.pop(ROLES, None), ROLES, allow_scalars=True)]
    customer_raw = values.pop(CUSTOMER, None)
    if customer_raw is not None and not isinstance(customer_raw, Mapping):
        raise MappingError(f"{SYSTEM}: {CUSTOMER} must be a dict of A_Customer fields (op {op.op_id})")
    customer = dict(customer_raw) if customer_raw is not None else None
    areas = [dict(a) for a in _as_list(customer.pop(SALES_AREAS, None), SALES_AREAS)] if customer else []
    values.pop("BusinessPartner", None)
    for name in [k for k in values if k.startswith("to_")]:
        raise RejectedError(f"{SYSTEM}: navigation {name} of A_BusinessPartner is not written by Syncline (op "
                            f"{op.op_id}); addresses, roles and customer data are")
    return values, addresses, roles, customer, areas


def _address_body(address: Mapping[str, Any]) -> dict[str, Any]:
    """An address for a deep insert: its phone numbers and e-mail addresses as `{"results": [...]}`."""
    body: dict[str, Any] = {}
    for name, value in address.items():
        if name in COMMUNICATION:
            entries = [dict(e) for e in _as_list(value, name) if not _blank(e)]
            if entries:
                body[name] = {"results": entries}
        elif name.startswith("to_"):
            raise RejectedError(f"{SYSTEM}: address navigation {name} is not written by Syncline (known: "
                                f"{', '.join(COMMUNICATION)})")
        else:
            body[name] = value
    return body


def _plan_partner(op: WriteOp, current: dict[str, Any] | None) -> _Plan:
    what = f"A_BusinessPartner create (op {op.op_id})"
    if op.action == "delete":
        raise RejectedError(f"{SYSTEM}: business partners cannot be deleted through API_BUSINESS_PARTNER "
                            f"(op {op.op_id}); block it (BusinessPartnerIsBlocked) or mark it for archiving "
                            "(IsMarkedForArchiving) instead")
    values, addresses, roles, customer, areas = _partner_values(op)
    if current is None:
        if op.action == "update":
            raise RejectedError(f"SAP rejected A_BusinessPartner update (op {op.op_id}): business partner "
                                f"{op.key or op.match} does not exist (use 'upsert' to create it)")
        body: dict[str, Any] = {**values, **(op.match or {})}
        bodies = [_address_body(a) for a in addresses if not _blank(a)]
        if bodies:
            body[ADDRESSES] = {"results": bodies}
        if customer is not None and not roles:
            roles = [{"BusinessPartnerRole": CUSTOMER_ROLE}]
        if roles:
            body[ROLES] = {"results": roles}
        if customer is not None:
            wanted_areas = [a for a in areas if not _blank(a)]
            body[CUSTOMER] = {**customer, **({SALES_AREAS: {"results": wanted_areas}} if wanted_areas else {})}
        return _Plan("A_BusinessPartner", what, None,
                     [_Req("POST", "A_BusinessPartner", what, wire_value("", body))], create=True)
    number = str(current["BusinessPartner"])
    what = f"A_BusinessPartner {number} update (op {op.op_id})"
    key = {"BusinessPartner": number}
    plan = _Plan("A_BusinessPartner", what, number,
                 _patch("A_BusinessPartner", key, values, current, what))
    plan.requests += _plan_addresses(number, addresses, _nav_rows(current.get(ADDRESSES)), what)
    current_roles = {str(r.get("BusinessPartnerRole")) for r in _nav_rows(current.get(ROLES))}
    existing = current.get(CUSTOMER)
    if customer is not None and not isinstance(existing, dict) and not roles and \
            not current_roles & {"FLCU00", CUSTOMER_ROLE}:
        roles = [{"BusinessPartnerRole": CUSTOMER_ROLE}]
    added: set[str] = set()
    for role in roles:
        name = str(role.get("BusinessPartnerRole"))
        if name in current_roles or name in added:
            continue
        added.add(name)
        plan.requests.append(_Req("POST", f"{key_path('A_BusinessPartner', key)}/{ROLES}",
                                  f"{what}, role {name}", wire_value("", role)))
    if customer is None:
        return plan
    if not isinstance(existing, dict):
        if added & {"FLCU00", CUSTOMER_ROLE}:
            # SAP creates the customer when the role arrives: its data follows after a re-read.
            plan.incomplete = True
            return plan
        raise RejectedError(f"SAP rejected {what}: business partner {number} has no customer data although it "
                            f"has a customer role; check the partner's roles in SAP")
    customer_key = {"Customer": str(existing.get("Customer") or number)}
    plan.requests += _patch("A_Customer", customer_key, customer, existing, f"{what}, customer data")
    current_areas = _nav_rows(existing.get(SALES_AREAS))
    for index, area in enumerate(areas):
        if all(area.get(f) not in (None, "") for f in AREA_KEYS):
            area_id = {f: str(area[f]) for f in AREA_KEYS}
            target = next((a for a in current_areas if all(str(a.get(f)) == v for f, v in area_id.items())),
                          None)
        else:
            # A dotted path names no sales area: it means the first one.
            target = current_areas[index] if index < len(current_areas) else None
        label = "/".join(str(area.get(f) or (target or {}).get(f) or "?") for f in AREA_KEYS)
        if target is None:
            if not _blank(area):
                plan.requests.append(_Req("POST", f"{key_path('A_Customer', customer_key)}/{SALES_AREAS}",
                                          f"{what}, sales area {label}", wire_value("", area)))
            continue
        target_key = {**customer_key, **{f: str(target.get(f)) for f in AREA_KEYS}}
        plan.requests += _patch("A_CustomerSalesArea", target_key, area, target,
                                     f"{what}, sales area {label}")
    return plan


def _plan_addresses(number: str, wanted: list[dict[str, Any]], current: list[dict[str, Any]],
                    what: str) -> list[_Req]:
    """Addresses paired by AddressID, else by position (a dotted path is the first address)."""
    requests: list[_Req] = []
    for index, address in enumerate(wanted):
        address_id = address.get("AddressID")
        target = next((a for a in current if str(a.get("AddressID")) == str(address_id)), None) if address_id \
            else (current[index] if index < len(current) else None)
        if target is None:
            if not _blank(address):
                body = _address_body({k: v for k, v in address.items()
                                           if k not in ("AddressID", "BusinessPartner")})
                requests.append(_Req("POST", f"{key_path('A_BusinessPartner', {'BusinessPartner': number})}/"
                                             f"{ADDRESSES}", f"{what}, new address", wire_value("", body)))
            continue
        address_key = {"BusinessPartner": number, "AddressID": str(target["AddressID"])}
        address_what = f"{what}, address {target['AddressID']}"
        fields = {k: v for k, v in address.items() if not k.startswith("to_")}
        requests += _patch("A_BusinessPartnerAddress", address_key, fields, target, address_what)
        for nav in (k for k in address if k.startswith("to_")):
            if nav not in COMMUNICATION:
                raise RejectedError(f"{SYSTEM}: address navigation {nav} is not written by Syncline (known: "
                                    f"{', '.join(COMMUNICATION)})")
            entity = COMMUNICATION[nav]
            existing = _nav_rows(target.get(nav))
            for position, entry in enumerate(_as_list(address[nav], nav)):
                entry_what = f"{address_what}, {nav} {position + 1}"
                if position >= len(existing):
                    if not _blank(entry):
                        requests.append(_Req("POST", f"{key_path('A_BusinessPartnerAddress', address_key)}/{nav}",
                                             entry_what, wire_value("", dict(entry))))
                    continue
                row = existing[position]
                entry_key = {f: str(row.get(f) if row.get(f) is not None else "") for f in _COMM_KEYS}
                requests += _patch(entity, entry_key, dict(entry), row, entry_what)
    return requests


def _writable(op: WriteOp) -> None:
    if op.table not in WRITABLE:
        raise RejectedError(f"{SYSTEM}: writes go to A_SalesOrder (with to_Item) or A_BusinessPartner (with "
                            f"addresses and customer data), not {op.table}")
