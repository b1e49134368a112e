"""OData `$batch`: multipart parts and changesets (all or nothing), Content-ID references."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

from sandbox.dataverse.protocol import (
    _REASONS,
    API_PREFIX,
    MAX_BATCH_REQUESTS,
    ODataError,
    _ApiRequest,
    _ApiResponse,
    _Caller,
    _error_response,
    _Event,
    _prefer,
    _Txn,
)
from sandbox.dataverse.query import _SEGMENT_RE, _split_segments
from sandbox.dataverse.state import _State


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    return m.group(1) if m else None


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body into (headers, content) parts; tolerant of CRLF or LF line ends."""
    delim = b"--" + boundary.encode()
    pieces = body.split(delim)
    parts: list[tuple[dict[str, str], bytes]] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece[1:] if piece.startswith(b"\n") else piece
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = piece.partition(b"\n\n")
        if not sep:
            raise ODataError(400, "0x80060888", "A $batch part has no blank line after its headers.")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            if ":" in line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        parts.append((headers, content))
    return parts


def _parse_http_message(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """`METHOD url HTTP/1.1` + headers + blank line + body (an embedded request or response)."""
    text = data
    head, sep, body = text.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = text.partition(b"\n\n")
    lines = head.decode("utf-8").splitlines()
    if not lines:
        raise ODataError(400, "0x80060888", "A $batch part has no request line.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip()] = v.strip()
    return lines[0].strip(), headers, body.strip(b"\r\n")


def _http_response_bytes(resp: _ApiResponse) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + resp.body


def _part_bytes(http_message: bytes, content_id: str | None) -> bytes:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id:
        head += f"Content-ID: {content_id}\r\n"
    return (head + "\r\n").encode() + http_message + b"\r\n"


class _Batch(_State):
    """A `$batch` request: its parts run in order; a changeset's writes commit or roll back together.

    A part of `DataverseSimulator` (app.py), which holds the state these methods use.
    """

    def _batch(self, req: _ApiRequest, caller: _Caller, events: list[_Event]) -> _ApiResponse:
        ctype = req.headers.get("content-type", "")
        boundary = _boundary(ctype)
        if not ctype.lower().startswith("multipart/mixed") or boundary is None:
            return _error_response(ODataError(400, "0x80060888", "The content type of the $batch request must be "
                                              "multipart/mixed with a boundary."))
        try:
            parts = _split_multipart(req.body, boundary)
            items: list[tuple[bool, list[tuple[dict[str, str], bytes]]]] = []
            total = 0
            for headers, body in parts:
                inner_ct = headers.get("content-type", "")
                if inner_ct.lower().startswith("multipart/mixed"):
                    cs_boundary = _boundary(inner_ct)
                    if cs_boundary is None:
                        raise ODataError(400, "0x80060888", "A change set is missing its boundary.")
                    cs_parts = _split_multipart(body, cs_boundary)
                    total += len(cs_parts)
                    items.append((True, cs_parts))
                else:
                    total += 1
                    items.append((False, [(headers, body)]))
        except ODataError as err:
            return _error_response(err)
        if total > MAX_BATCH_REQUESTS:
            return _error_response(ODataError(
                400, "0x8006088a", f"The number of requests in the batch ({total}) exceeds the maximum of "
                f"{MAX_BATCH_REQUESTS}. A $batch request can contain up to {MAX_BATCH_REQUESTS} requests."))
        self.request_counts["batch_op"] += total
        continue_on_error = "odata.continue-on-error" in _prefer(req.headers)
        out_boundary = f"batchresponse_{uuid.uuid4()}"
        chunks: list[bytes] = []
        failed = False
        for is_changeset, item_parts in items:
            txn = _Txn()
            refs: dict[str, str] = {}
            responses: list[bytes] = []
            error_part: bytes | None = None
            for headers, body in item_parts:
                status, text = self._batch_part(req, headers, body, caller, txn, refs, in_changeset=is_changeset)
                part = _part_bytes(text, headers.get("content-id"))
                if status >= 400:
                    txn.rollback()
                    error_part = part
                    break
                responses.append(part)
            failed = error_part is not None
            if error_part is not None:
                # A failed change set answers with the single failing response (OData 4.0 section 11.7.4).
                chunks.append(error_part)
            elif not is_changeset:
                events.extend(txn.events)
                chunks.extend(responses)
            else:
                events.extend(txn.events)
                cs_boundary = f"changesetresponse_{uuid.uuid4()}"
                inner = b"".join(f"--{cs_boundary}\r\n".encode() + r for r in responses)
                inner += f"--{cs_boundary}--\r\n".encode()
                chunks.append(f"Content-Type: multipart/mixed; boundary={cs_boundary}\r\n\r\n".encode() + inner)
            if failed and not continue_on_error:
                break
        payload_bytes = b"".join(f"--{out_boundary}\r\n".encode() + c for c in chunks)
        payload_bytes += f"--{out_boundary}--\r\n".encode()
        status = 400 if failed and not continue_on_error else 200
        return _ApiResponse(status, {"Content-Type": f"multipart/mixed; boundary={out_boundary}",
                                     "OData-Version": "4.0"}, payload_bytes)

    def _batch_part(self, outer: _ApiRequest, headers: Mapping[str, str], body: bytes, caller: _Caller, txn: _Txn,
                    refs: dict[str, str], *, in_changeset: bool) -> tuple[int, bytes]:
        """Run one embedded request; the caller commits (emits txn.events) or rolls back."""
        try:
            request_line, part_headers, part_body = _parse_http_message(body)
            method, _, rest = request_line.partition(" ")
            url = rest.rsplit(" ", 1)[0] if rest.endswith(("HTTP/1.1", "HTTP/1.0")) else rest
            method = method.upper()
            if in_changeset and method == "GET":
                raise ODataError(400, "0x80060888", "GET requests are not allowed inside a change set.")
            for ref, target in refs.items():
                if url == ref or url.startswith(ref + "/"):
                    url = target + url[len(ref):]
            if url.startswith("$"):
                raise ODataError(400, "0x80060888", f"Content-ID Reference: '{url.split('/')[0]}' does not exist in "
                                 "the batch context.")
            split = urlsplit(url)
            path = split.path
            if path.startswith(API_PREFIX):
                path = path[len(API_PREFIX):]
            elif path.startswith("/"):
                raise ODataError(400, "0x80060888", f"The URL '{url}' is not a Web API v9.2 URL.")
            text_body = part_body.decode("utf-8") if part_body else ""
            for ref, target in refs.items():
                text_body = text_body.replace(f'"{ref}"', json.dumps(target))
            sub = _ApiRequest(method, unquote(path), dict(parse_qsl(split.query, keep_blank_values=True)),
                              {k.lower(): v for k, v in part_headers.items()}, text_body.encode(), outer.base)
            fault = self.faults._take(self.faults._fail, API_PREFIX + sub.path, aimed_only=True)
            if fault is not None:
                resp = self._fault_response(fault)
            else:
                try:
                    with self._lock:
                        resp = self._dispatch(sub, caller, txn)
                except ODataError as err:
                    resp = _error_response(err)
            cid = headers.get("content-id")
            if cid and resp.status < 400:
                entity = resp.headers.get("OData-EntityId") or self._entity_url_from_body(outer, sub, resp)
                if entity:
                    refs[f"${cid}"] = entity
        except ODataError as err:
            resp = _error_response(err)
        return resp.status, _http_response_bytes(resp)

    def _entity_url_from_body(self, outer: _ApiRequest, sub: _ApiRequest, resp: _ApiResponse) -> str | None:
        if not resp.body or sub.method not in ("POST", "PATCH"):
            return None
        head = _SEGMENT_RE.match(_split_segments(sub.path)[0]) if sub.path else None
        if head is None or head.group("name") not in self.schema:
            return None
        schema = self.schema[head.group("name")]
        try:
            key = json.loads(resp.body)[schema.primary_id]
        except (ValueError, KeyError):
            return None
        return f"{outer.base}{API_PREFIX}{schema.entity_set}({key})"
