"""Valid webhook payloads of every kind and hypothesis strategies that break them (for the fuzz tests)."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any
from urllib.parse import quote_from_bytes

from hypothesis import strategies as st

USER = "75c2dd85-e89e-e711-8122-000d3aa2331c"


def dataverse_body(entity: str = "dot_signasset", key: str | None = None, values: dict[str, Any] | None = None,
                   message: str = "Update") -> dict[str, Any]:
    """A RemoteExecutionContext as Dataverse posts it (DataContract key/value lists, typed values)."""
    key = key or str(uuid.uuid4())
    attrs: list[dict[str, Any]] = [{"key": f"{entity}id", "value": key}]
    for name, value in (values or {"dot_name": "R2-1 US-460", "modifiedon": "/Date(1765895400000)/"}).items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 100000000:
            value = {"__type": "OptionSetValue:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": value}
        attrs.append({"key": name, "value": value})
    target = {"__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts", "Attributes": attrs,
              "EntityState": None, "FormattedValues": [], "Id": key, "KeyAttributes": [], "LogicalName": entity,
              "RelatedEntities": [], "RowVersion": "1042"}
    return {
        "BusinessUnitId": str(uuid.uuid4()), "CorrelationId": str(uuid.uuid4()), "Depth": 1,
        "InitiatingUserId": USER, "InputParameters": [{"key": "Target", "value": target}],
        "IsExecutingOffline": False, "IsInTransaction": False, "IsOfflinePlayback": False, "IsolationMode": 1,
        "MessageName": message, "Mode": 1, "OperationCreatedOn": "/Date(1765895400000)/",
        "OperationId": str(uuid.uuid4()), "OrganizationId": str(uuid.uuid4()), "OrganizationName": "org",
        "OutputParameters": [], "OwningExtension": None, "ParentContext": None, "PostEntityImages": [],
        "PreEntityImages": [], "PrimaryEntityId": key, "PrimaryEntityName": entity, "RequestId": None,
        "SecondaryEntityName": "none", "SharedVariables": [], "Stage": 40, "UserId": USER,
    }


def sign_values(row: dict[str, Any]) -> dict[str, Any]:
    """A seeded Dataverse sign row as webhook attribute values (dates as /Date(ms)/ are not needed here)."""
    return {k: v for k, v in row.items() if k not in ("dot_signassetid", "versionnumber")}


def fno_event(account: str = "US-001", company: str = "usmf", control: int = 5637985363) -> dict[str, Any]:
    """A customer-changed business event (the flat JSON F&O posts to an HTTPS endpoint)."""
    return {"Account": account, "Name": "Keystone Mining 001", "BusinessEventId": "CustCustomerChangedBusinessEvent",
            "BusinessEventLegalEntity": company, "ContextRecordSubject": "", "ControlNumber": control,
            "EventId": str(uuid.uuid4()).upper(), "EventTime": "/Date(1697470966000)/",
            "EventTimeIso8601": "2023-10-16T15:42:46.0000000Z",
            "InitiatingUserAADObjectId": "{C600136F-6814-41D9-8642-40CA0EC4EDD4}", "LegalEntity": company,
            "MajorVersion": 0, "MinorVersion": 0, "ParentContextRecordSubjects": []}


def sap_event(order: str = "4000001", operation: str = "Changed", event_id: str | None = None) -> dict[str, Any]:
    """An Event Mesh CloudEvent about a sales order."""
    return {"type": f"sap.s4.beh.salesorder.v1.SalesOrder.{operation}.v1", "specversion": "1.0",
            "source": "/default/sap.s4.beh/S4HCLNT100", "id": event_id or str(uuid.uuid4()),
            "time": "2026-01-05T14:30:05Z", "datacontenttype": "application/json",
            "data": {"SalesOrder": order, "SalesOrderType": "OR", "SalesOrganization": "1710"}}


def salesforce_event(record_id: str = "0015g0000000001AAA", replay: int = 1000) -> dict[str, Any]:
    """A Pub/Sub-shaped Account change event."""
    return {"schema": "AccountChangeEvent", "replayId": replay, "payload": {
        "ChangeEventHeader": {"entityName": "Account", "recordIds": [record_id], "changeType": "UPDATE",
                              "changeOrigin": "com/salesforce/ui", "transactionKey": str(uuid.uuid4()),
                              "sequenceNumber": 1, "commitTimestamp": 1796625339291, "commitNumber": 2000,
                              "commitUser": "0055g00000OfficAAA", "nulledFields": [], "diffFields": [],
                              "changedFields": ["Name"]},
        "Name": "Equipment Customer 001", "LastModifiedDate": 1796625339291}}


def survey123_body(layer: str = "Inspections", gid: str | None = None) -> dict[str, Any]:
    """A Survey123 addData webhook body (the shape the form posts)."""
    gid = gid or "{" + str(uuid.uuid4()).upper() + "}"
    return {
        "feature": {
            "attributes": {"GlobalID": gid, "OBJECTID": 11, "Condition": "GOOD", "EditDate": 1765895400000},
            "geometry": {"x": -78.07, "y": 37.55, "spatialReference": {"wkid": 4326}},
            "layerInfo": {"id": 4, "name": layer, "type": "Feature Layer", "globalIdField": "GlobalID",
                          "objectIdField": "OBJECTID", "relationships": []},
            "result": {"globalId": gid, "objectId": 11, "uniqueId": 11, "success": True},
            "attachments": {"photo": [{"id": 1, "globalId": gid, "name": "p.jpg", "contentType": "image/jpeg",
                                       "size": 10}]},
        },
        "eventType": "addData",
        "userInfo": {"username": "surveyor1"},
        "surveyInfo": {"serviceUrl": "https://example.org/arcgis/rest/services/DOT/FeatureServer"},
    }


def feature_service_body(layer_id: int = 0) -> list[dict[str, Any]]:
    """A feature-service webhook payload (one layer changed)."""
    return [{"name": "syncline", "layerId": layer_id, "orgId": "org", "serviceName": "DOT",
             "lastUpdatedTime": 1765895400000, "events": ["FeaturesCreated", "FeaturesUpdated"],
             "changesUrl": "https://example.org/arcgis/rest/services/DOT/FeatureServer/extractChanges?"
                           "serverGens=%5B1%2C2%5D&async=true&returnUpdates=true"}]


def form_encoded(payload: str | bytes) -> bytes:
    """A form-encoded feature-service webhook body."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    return b"payload=" + quote_from_bytes(raw).encode()


# ------------------------------------------------------------------------------------------ strategies

DEEP = "@@deep@@"
"""Marker replaced by a deep `[[[...]]]` after encoding."""

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, -(2**63), 10**30, 10**300, 99999999999999999, -99999999999999999]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "", "/Date(99999999999999999)/", "/Date(-99999999999999)/",
                     "\\/Date(1)\\/", "0000-00-00", "99999-12-31T00:00:00Z", "{00000000-0000-0000-0000-000000000000}",
                     "\x00", "' or 1=1 --", "Changed", "Deleted", "DELETE", "x" * 300]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
bad_values = st.one_of(scalars, json_values, st.just(DEEP), st.just([]), st.just({}))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _set(node: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    root = copy.deepcopy(node)
    parent = root
    for part in path[:-1]:
        parent = parent[part]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    elif delete:
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return root


@st.composite
def mutated(draw: st.DrawFn, sample: Any, mutations: int = 3) -> Any:
    """`sample` with up to `mutations` nodes replaced by wrong types, extreme values, or removed."""
    value = sample
    for _ in range(draw(st.integers(min_value=1, max_value=mutations))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths[1:] if len(paths) > 1 else paths))
        delete = bool(path) and draw(st.booleans()) and draw(st.booleans())
        value = _set(value, path, None if delete else draw(bad_values), delete)
    return value


def encode(value: Any, *, ascii_only: bool = True, deep: int = 100_000) -> bytes:
    """JSON bytes; lone surrogates become `\\udXXX` escapes (ascii) or invalid UTF-8; DEEP becomes nesting."""
    text = json.dumps(value, ensure_ascii=ascii_only)
    if DEEP in text:
        text = text.replace(json.dumps(DEEP), "[" * deep + "]" * deep, 1)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def bodies(draw: st.DrawFn, samples: list[Any]) -> bytes:
    """Request bodies: near-valid mutations of `samples` (most), any JSON, deep nesting, random bytes."""
    kind = draw(st.sampled_from(["mutated"] * 6 + ["valid", "json", "deep", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.sampled_from([65, 1000, 100_000]))
        return draw(st.sampled_from([b"[" * depth, b"[" * depth + b"]" * depth,
                                     b'{"a":' * depth + b"1" + b"}" * depth]))
    if kind == "json":
        value = draw(json_values)
    else:
        value = draw(st.sampled_from(samples))
        if kind == "mutated":
            value = draw(mutated(value))
    ascii_only = draw(st.booleans()) if kind == "mutated" else True
    return encode(value, ascii_only=ascii_only, deep=draw(st.sampled_from([65, 100_000])))
