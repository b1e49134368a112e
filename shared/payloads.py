"""Webhook payloads at the edge: bounded JSON decoding and the pydantic models every incoming body is validated with."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from shared.core.errors import EnvelopeError

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Default bound of a webhook body (the settings may lower or raise it)."""
MAX_JSON_DEPTH = 64
"""Default bound of JSON nesting: every real payload nests fewer than 15 levels."""

_STRING_RE = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
"""Every byte but the four brackets: deleted from the body to leave the nesting skeleton."""
_OPEN = frozenset(b"[{")
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_depth(raw: bytes, limit: int) -> int:
    """Nesting depth of a JSON text, scanned without recursion; stops counting once past `limit`.

    Strings are cut out first, so brackets inside them do not count. On invalid JSON the figure is an upper
    bound of what a parser reaches before it fails (the prefix it accepts is tokenised the same way here).
    """
    skeleton = _STRING_RE.sub(b"", raw).translate(None, _BRACKETS)
    depth = deepest = 0
    for byte in skeleton:
        if byte in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif depth:
            depth -= 1
    return deepest


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str | bytes) -> Any:
    """`json.loads` without Python's extensions: `NaN`, `Infinity` and numbers a double cannot hold (`1e400`) are
    not JSON (RFC 8259 §6) and raise ValueError, as ODataLib, Jackson and ArcGIS refuse them."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


def read_json(body: bytes | str, what: str, *, max_bytes: int = MAX_BODY_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body as strict JSON within bounds; EnvelopeError naming the problem otherwise.

    Bounds: size (`max_bytes`), nesting (`max_depth`, checked before parsing so a hostile body cannot exhaust
    the stack), finite numbers only (no NaN/Infinity, no float overflow) and no lone UTF-16 surrogates (they
    cannot be stored or forwarded as UTF-8).
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > max_bytes:
        raise EnvelopeError(f"{what} is too large: {len(raw)} bytes (the limit is {max_bytes})")
    depth = json_depth(raw, max_depth)
    if depth > max_depth:
        raise EnvelopeError(f"{what} nests JSON deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"{what} is not UTF-8: {exc}") from exc
    try:
        data = strict_loads(text)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError(f"{what} is not valid JSON: {exc}"[:500]) from exc
    if _SURROGATE_ESCAPE_RE.search(raw):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EnvelopeError(f"{what} holds a lone UTF-16 surrogate (\\u{ord(exc.object[exc.start]):04x}), "
                                "which is not text") from exc
    return data


@contextmanager
def bad_values(what: str) -> Iterator[None]:
    """Turn a value error raised while interpreting a payload (a date out of range, a number too big) into an
    EnvelopeError: parsers do no I/O, so such an error can only come from the client's input."""
    try:
        yield
    except (ValueError, OverflowError, OSError) as exc:
        raise EnvelopeError(f"{what} holds a value out of range: {exc}"[:500]) from exc


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<body>"


def problems(exc: PydanticValidationError, limit: int = 5) -> str:
    """A pydantic error as 'field.path: problem; ...' (the input values are not echoed)."""
    errors = exc.errors(include_url=False, include_input=False)
    text = "; ".join(f"{_loc(tuple(e['loc']))}: {e['msg']}" for e in errors[:limit])
    return text + (f" (and {len(errors) - limit} more)" if len(errors) > limit else "")


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any, what: str) -> M:
    """Validate decoded JSON with a payload model; EnvelopeError naming each wrong field otherwise."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise EnvelopeError(f"{what}: {problems(exc)}"[:1000]) from exc


class Payload(BaseModel):
    """Base of the payload models: JSON types checked strictly, unknown fields kept."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


Scalar = str | int | float | bool | None


# ------------------------------------------------------------------------------------------- Dataverse


class DataverseKeyValue(Payload):
    """One DataContract `{key, value}` pair."""

    key: str
    value: Any = None


DataverseKeyValues = list[DataverseKeyValue] | dict[str, Any] | None
"""A DataContract collection: `[{key, value}]` (the wire form), or an object (some relays)."""


class DataverseContext(Payload):
    """A serialized RemoteExecutionContext (the semantic checks stay with the parser, for precise messages)."""

    MessageName: str | None = None
    PrimaryEntityName: str | None = None
    PrimaryEntityId: str | None = None
    CorrelationId: str | None = None
    InitiatingUserId: str | None = None
    UserId: Any = None
    OperationCreatedOn: str | None = None
    Depth: Any = 1
    InputParameters: DataverseKeyValues = None
    PreEntityImages: DataverseKeyValues = None
    PostEntityImages: DataverseKeyValues = None
    SharedVariables: DataverseKeyValues = None


class DataverseEntity(Payload):
    """An Entity DataContract (a Target or an image)."""

    Attributes: DataverseKeyValues
    Id: str | None = None
    LogicalName: str | None = None
    RowVersion: str | int | None = None


# ------------------------------------------------------------------------------------------------- F&O


class FinOpsEvent(Payload):
    """A business event's standard envelope fields (the contract's own fields are extra)."""

    BusinessEventId: str | None = None
    ControlNumber: int | None = None
    LegalEntity: str | None = None
    BusinessEventLegalEntity: str | None = None
    EventTime: str | None = None
    EventTimeIso8601: str | None = None
    EventId: str | None = None


# ------------------------------------------------------------------------------------------ Salesforce


class SalesforceChangeHeader(Payload):
    """ChangeEventHeader of a CDC event."""

    entityName: str
    recordIds: list[str] = Field(min_length=1)
    changeType: str
    changedFields: list[str] | None = None
    commitTimestamp: int | str | None = None
    transactionKey: str | None = None
    changeOrigin: str | None = None
    commitUser: str | None = None


class SalesforceChangePayload(Payload):
    """The event payload: the header plus the changed field values."""

    ChangeEventHeader: SalesforceChangeHeader


class SalesforceCometdEvent(Payload):
    """CometD `data.event`."""

    replayId: int | str | None = None


class SalesforceCometdData(Payload):
    """CometD `data`."""

    payload: SalesforceChangePayload
    event: SalesforceCometdEvent | None = None


class SalesforceChangeEvent(Payload):
    """A CDC event relayed as JSON: Pub/Sub-shaped (`payload`, `replayId`) or a CometD envelope (`data`)."""

    replayId: int | str | None = None
    payload: SalesforceChangePayload | None = None
    data: SalesforceCometdData | None = None


# ------------------------------------------------------------------------------------------------- SAP


class SapCloudEvent(Payload):
    """An SAP business event (CloudEvents JSON); `data` carries the object's key fields."""

    type: str | None = None
    id: str | None = None
    source: str | None = None
    time: str | None = None
    data: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- ArcGIS


class ArcGISLayerChange(Payload):
    """One entry of a feature-service webhook payload."""

    layerId: int | str
    events: list[str]
    changesUrl: str = Field(min_length=1)
    serviceName: str | None = None
    lastUpdatedTime: int | float | None = None
    name: str | None = None
    orgId: str | None = None


class SurveyLayerInfo(Payload):
    """feature.layerInfo of a Survey123 webhook."""

    id: int | None = None
    name: str | None = None
    type: str | None = None
    globalIdField: str | None = None


class SurveyResult(Payload):
    """feature.result of a Survey123 webhook."""

    globalId: str | None = None
    objectId: int | None = None


class SurveyAttachment(Payload):
    """One attachment of a Survey123 submission."""

    id: int | str | None = None
    name: str | None = None
    contentType: str | None = None
    size: int | None = Field(default=None, ge=0)


class SurveyGeometry(Payload):
    """A submitted geometry (a point; other shapes are kept as sent)."""

    x: int | float | None = None
    y: int | float | None = None
    spatialReference: dict[str, Scalar] | None = None


class SurveyFeature(Payload):
    """feature of a Survey123 webhook."""

    attributes: dict[str, Any]
    geometry: SurveyGeometry | None = None
    layerInfo: SurveyLayerInfo | None = None
    result: SurveyResult | None = None
    attachments: dict[str, list[SurveyAttachment] | None] | None = None


class SurveyInfo(Payload):
    """surveyInfo of a Survey123 webhook."""

    serviceUrl: str | None = None


class SurveyUserInfo(Payload):
    """userInfo of a Survey123 webhook."""

    username: str | None = None


class SurveyWebhook(Payload):
    """A Survey123 webhook body."""

    eventType: str
    feature: SurveyFeature
    surveyInfo: SurveyInfo | None = None
    userInfo: SurveyUserInfo | None = None
