"""Atom/XML answers (the Gateway's default format): feeds, entries, service documents, errors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

from starlette.responses import Response

from sandbox.sap.codecs import _parse_resource
from sandbox.sap.gateway import SERVICE_PREFIX, GatewayError
from sandbox.sap.schema import (
    DATA_NS,
    DT,
    DTO,
    ENTITIES,
    FUNCTION_IMPORTS,
    METADATA_NS,
    SAP_NS,
    SERVICE_SETS,
    TYPES,
)


@dataclass(frozen=True)
class _Count:
    """The answer of `<collection>/$count`: a bare number, served as text/plain."""

    value: int


def _negotiate(fmt: str | None, accept: str) -> bool:
    """True when the answer is Atom/XML: `$format` decides, else the Accept header; the Gateway's default (no
    `$format`, Accept without JSON, `*/*` or none) is Atom/XML as in OData v2 (MS-ODATA 2.2.5.1, [MS-ODATA]
    "Accept Request Header to Content-Type Response Header Mapping")."""
    if fmt:
        if fmt.lower() == "json":
            return False
        if fmt.lower() in ("xml", "atom"):
            return True
        raise GatewayError(406, "/IWBEP/CM_MGW_RT/031", f"Format '{fmt}' is not supported: use json, xml or atom")
    return "json" not in accept.lower()


_ATOM_NS = "http://www.w3.org/2005/Atom"
_SET_OF_TYPE = {f"{e.service}.{e.type_name}": name for name, e in ENTITIES.items()}
_WIRE_DATE_RE = re.compile(r"^/Date\((?P<ms>-?\d+)(?:[+-]\d{4})?\)/$")


def _atom_value(name: str, value: Any) -> tuple[str, str]:
    """(m:type attribute or "", literal text) of one JSON wire value, as the Atom format writes it."""
    kind = TYPES.get(name)
    if isinstance(value, bool):
        return ' m:type="Edm.Boolean"', "true" if value else "false"
    if kind in (DT, DTO) and isinstance(value, str) and (m := _WIRE_DATE_RE.match(value)):
        moment = datetime.fromtimestamp(int(m.group("ms")) / 1000, tz=UTC)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if kind == DTO else "")
        return f' m:type="{kind}"', text
    if kind is not None:
        return f' m:type="{kind}"', xml_escape(str(value))
    return "", xml_escape(str(value))


def _atom_properties(names: Iterable[str], public: Mapping[str, Any]) -> str:
    out = []
    for name in names:
        if name not in public:
            continue
        value = public[name]
        if value is None:
            out.append(f'<d:{name} m:null="true"/>')
            continue
        mtype, text = _atom_value(name, value)
        out.append(f"<d:{name}{mtype}>{text}</d:{name}>")
    return "".join(out)


def _atom_entry(root: str, public: Mapping[str, Any], now: str) -> str:
    meta = public["__metadata"]
    entity = _SET_OF_TYPE[meta["type"]]
    definition = ENTITIES[entity]
    href = str(meta["uri"]).removeprefix(root)
    etag = f" m:etag={quoteattr(meta['etag'])}" if meta.get("etag") else ""
    links = [f'<link href={quoteattr(href)} rel="edit" title="{definition.type_name}"/>']
    for nav_name, nav in definition.navs.items():
        if nav_name not in public:
            continue
        value = public[nav_name]
        kind = "feed" if nav.many else "entry"
        head = (f'<link href={quoteattr(href + "/" + nav_name)} rel="{DATA_NS}/related/{nav_name}" '
                f'type="application/atom+xml;type={kind}" title="{xml_escape(nav_name)}"')
        if isinstance(value, dict) and "__deferred" in value:
            links.append(head + "/>")
        elif isinstance(value, dict) and "results" in value:
            links.append(head + "><m:inline>" + _atom_feed(root, nav.target, value, now, href + "/" + nav_name)
                         + "</m:inline></link>")
        else:
            inline = _atom_entry(root, value, now) if isinstance(value, dict) else ""
            links.append(head + f"><m:inline>{inline}</m:inline></link>")
    return (f"<entry{etag}><id>{xml_escape(str(meta['id']))}</id><title type=\"text\">{xml_escape(href)}</title>"
            f"<updated>{now}</updated><category term=\"{meta['type']}\" "
            f"scheme=\"{DATA_NS}/scheme\"/>{''.join(links)}<content type=\"application/xml\"><m:properties>"
            f"{_atom_properties(definition.fields, public)}</m:properties></content></entry>")


def _atom_feed(root: str, entity: str, data: Mapping[str, Any], now: str, href: str) -> str:
    parts = [f"<feed><id>{xml_escape(root + href)}</id><title type=\"text\">{xml_escape(entity)}</title>"
             f"<updated>{now}</updated><author><name/></author><link href={quoteattr(href)} rel=\"self\" "
             f"title={quoteattr(entity)}/>"]
    if "__count" in data:
        parts.append(f"<m:count>{data['__count']}</m:count>")
    parts.extend(_atom_entry(root, item, now) for item in data.get("results", []))
    if data.get("__next"):
        parts.append(f'<link href={quoteattr(str(data["__next"]))} rel="next"/>')
    parts.append("</feed>")
    return "".join(parts)


_ROOT_NS = f'xmlns="{_ATOM_NS}" xmlns:m="{METADATA_NS}" xmlns:d="{DATA_NS}"'


def _atom(service: str, rest: str, payload: Any, base: str) -> tuple[bytes, str]:
    """An Atom/XML answer (body, media type) for what `_dispatch` answered as OData v2 JSON: the service
    document (AtomPub), a feed, an entry, or a function import's complex value. No body for a null entity."""
    root = f"{base}{SERVICE_PREFIX}{service}/"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = '<?xml version="1.0" encoding="utf-8"?>'
    data = payload.get("d") if isinstance(payload, dict) else None
    path = rest.strip("/")
    if path == "":
        collections = "".join(
            f'<app:collection sap:creatable="{str(ENTITIES[n].creatable).lower()}" '
            f'sap:updatable="{str(ENTITIES[n].updatable).lower()}" '
            f'sap:deletable="{str(ENTITIES[n].deletable).lower()}" sap:content-version="1" href="{n}">'
            f'<atom:title type="text">{n}</atom:title><sap:member-title>{xml_escape(ENTITIES[n].label or n)}'
            "</sap:member-title></app:collection>" for n in SERVICE_SETS[service])
        body = (f'{head}<app:service xml:lang="en" xml:base={quoteattr(root)} xmlns:app="http://www.w3.org/2007/app" '
                f'xmlns:atom="{_ATOM_NS}" xmlns:sap="{SAP_NS}"><app:workspace><atom:title type="text">Data'
                f"</atom:title>{collections}</app:workspace><atom:link rel=\"self\" href={quoteattr(root)}/>"
                f"<atom:link rel=\"latest-version\" href={quoteattr(root)}/></app:service>")
        return body.encode(), "application/atomsvc+xml"
    if data is None:
        return b"", "application/atom+xml"
    function = next((f for f in FUNCTION_IMPORTS.get(service, ()) if f.name == path), None)
    if function is not None:
        value = data[function.name]
        body = (f'{head}<d:{function.name} xmlns:d="{DATA_NS}" xmlns:m="{METADATA_NS}" '
                f'm:type="{service}.{function.returns}">'
                f"{_atom_properties((p.name for p in function.result), value)}</d:{function.name}>")
        return body.encode(), "application/xml"
    if "results" in data:
        entity, _, nav = _parse_resource(rest)
        target = ENTITIES[entity].navs[nav].target if nav else entity
        feed = _atom_feed(root, target, data, now, path)
        return (head + feed.replace("<feed>", f"<feed xml:base={quoteattr(root)} {_ROOT_NS}>", 1)).encode(), \
            "application/atom+xml;type=feed"
    entry = _atom_entry(root, data, now)
    return (head + entry.replace("<entry", f"<entry xml:base={quoteattr(root)} {_ROOT_NS}", 1)).encode(), \
        "application/atom+xml;type=entry"


def _xml_error(exc: GatewayError, service: str) -> Response:
    """The Gateway's error document in XML (the answer to a request that negotiated Atom/XML)."""
    error = exc.body(service)["error"]
    inner = error["innererror"]
    app = "".join(f"<{k}>{xml_escape(str(v))}</{k}>" for k, v in inner["application"].items())
    resolution = "".join(f"<{k}>{xml_escape(str(v))}</{k}>" for k, v in inner["Error_Resolution"].items())
    details = "".join(
        "<errordetail>" + "".join(f"<{k}>{xml_escape(str(v).lower() if isinstance(v, bool) else str(v))}</{k}>"
                                  for k, v in detail.items()) + "</errordetail>"
        for detail in inner["errordetails"])
    body = (f'<?xml version="1.0" encoding="utf-8"?><error xmlns="{METADATA_NS}"><code>{xml_escape(error["code"])}'
            f'</code><message xml:lang="en">{xml_escape(error["message"]["value"])}</message><innererror>'
            f"<application>{app}</application><transactionid>{inner['transactionid']}</transactionid>"
            f"<timestamp>{inner['timestamp']}</timestamp><Error_Resolution>{resolution}</Error_Resolution>"
            f"<errordetails>{details}</errordetails></innererror></error>")
    return Response(body.encode(), status_code=exc.status, media_type="application/xml")
