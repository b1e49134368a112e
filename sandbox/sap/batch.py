"""OData v2 $batch: multipart parsing, changesets run and rolled back as a whole, part answers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from sandbox.sap.codecs import _json_text
from sandbox.sap.gateway import SERVICE_PREFIX, GatewayError, _bad
from sandbox.sap.resources import SapResources
from sandbox.sap.rows import _Rows
from sandbox.sap.schema import (
    ENTITIES,
)


@dataclass
class _BatchRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    content_id: str | None = None


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


_REASONS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            412: "Precondition Failed", 428: "Precondition Required", 500: "Internal Server Error"}


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return m.group(1).strip() if m else None


def _multipart(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body (preamble and epilogue dropped, CRLF or LF line ends)."""
    parts: list[bytes] = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if chunk.endswith(b"\r\n"):
            chunk = chunk[:-2]
        elif chunk.endswith(b"\n"):
            chunk = chunk[:-1]
        parts.append(chunk)
    return parts


def _head(blob: bytes) -> tuple[dict[str, str], bytes]:
    """Header lines (lower-cased names) up to the first empty line, and the rest."""
    cuts = [(at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := blob.find(sep)) >= 0]
    if cuts:
        at, width = min(cuts)
        head, rest = blob[:at], blob[at + width:]
    else:
        head, rest = blob, b""
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _http_request(part: bytes) -> _BatchRequest:
    """An application/http batch part: its MIME headers, then the request line, headers and body."""
    mime, rest = _head(part)
    line, _, tail = rest.partition(b"\n")
    method, _, target = line.decode("utf-8", "replace").strip().partition(" ")
    url = target.rsplit(" HTTP/", 1)[0].strip()
    if not tail.strip():
        return _BatchRequest(method.upper(), url, {}, b"", mime.get("content-id"))
    headers, body = _head(tail)
    return _BatchRequest(method.upper(), url, headers, body, mime.get("content-id"))


def _error_answer(service: str, exc: GatewayError) -> _Answer:
    return _Answer(exc.status, {k.lower(): v for k, v in exc.headers.items()}, _json_text(exc.body(service)))


def _http_part(answer: _Answer, content_id: str | None = None) -> bytes:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id:
        lines.append(f"Content-ID: {content_id}")
    response = [f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, 'Status')}"]
    if answer.body:
        response.append("Content-Type: application/json")
    response += [f"{k}: {v}" for k, v in answer.headers.items() if k.lower() != "content-type"]
    response.append(f"Content-Length: {len(answer.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + "\r\n".join(response) + "\r\n\r\n").encode() + answer.body


class SapBatch(SapResources):
    """$batch requests: retrieve parts and changesets."""

    def _batch(self, service: str, headers: Mapping[str, str], body: bytes, base: str) -> tuple[bytes, str, int]:
        """Run an OData v2 $batch: (multipart/mixed response body, its content type, operations processed).

        Retrieve parts (GET) stand alone; every changeset is one unit of work: its requests run in order,
        `$<Content-ID>` at the start of a URL names an entity created earlier in the same changeset, and the
        first failing request rolls the whole changeset back and is its only answer. Numbers drawn by the
        rolled-back requests stay used, as SAP's buffered number ranges do.
        """
        content_type = headers.get("content-type", "")
        boundary = _boundary(content_type)
        if not content_type.lower().startswith("multipart/mixed") or not boundary:
            raise _bad("/IWBEP/CM_MGW_RT/015", "A $batch request needs Content-Type multipart/mixed with a boundary")
        self.request_counts["batch"] += 1
        out: list[bytes] = []
        operations = 0
        for part in _multipart(body, boundary):
            part_headers, part_body = _head(part)
            part_type = part_headers.get("content-type", "").lower()
            if part_type.startswith("multipart/mixed"):
                self.request_counts["batch_changesets"] += 1
                inner = _boundary(part_headers["content-type"])
                requests = [_http_request(p) for p in _multipart(part_body, inner)] if inner else []
                operations += len(requests)
                out.append(self._changeset(service, requests, base))
                continue
            operations += 1
            if not part_type.startswith("application/http"):
                out.append(_http_part(_error_answer(service, _bad(
                    "/IWBEP/CM_MGW_RT/015", f"Unexpected batch part of type {part_type or 'none'}"))))
                continue
            request = _http_request(part)
            if request.method != "GET":
                out.append(_http_part(_error_answer(service, _bad(
                    "/IWBEP/CM_MGW_RT/016", f"{request.method} is only allowed inside a changeset"))))
                continue
            out.append(_http_part(self._batch_operation(service, request, base, {})))
        answer_boundary = f"batch_{uuid.uuid4()}"
        content = b"".join(b"--" + answer_boundary.encode() + b"\r\n" + p + b"\r\n" for p in out)
        content += b"--" + answer_boundary.encode() + b"--\r\n"
        return content, f"multipart/mixed; boundary={answer_boundary}", operations

    def _changeset(self, service: str, requests: list[_BatchRequest], base: str) -> bytes:
        if not requests:
            return _http_part(_error_answer(service, _bad("/IWBEP/CM_MGW_RT/015", "Empty changeset")))
        # Single-request changesets behave as the request alone would; longer ones need a snapshot to undo.
        saved = self._snapshot(service) if len(requests) > 1 else None
        self._event_buffer = []
        created: dict[str, str] = {}
        answers: list[tuple[str | None, _Answer]] = []
        try:
            for request in requests:
                if request.method == "GET":
                    answer = _error_answer(service, _bad("/IWBEP/CM_MGW_RT/016",
                                                         "GET is not allowed inside a changeset"))
                else:
                    answer = self._batch_operation(service, request, base, created)
                if answer.status >= 400:
                    if saved is not None:
                        self._restore(saved)
                    self.request_counts["batch_changesets_failed"] += 1
                    return _http_part(answer)
                location = answer.headers.get("location")
                if request.content_id and location:
                    created[request.content_id] = location.split(f"{SERVICE_PREFIX}{service}/", 1)[-1]
                answers.append((request.content_id, answer))
            events = self._event_buffer
        finally:
            self._event_buffer = None
        for event in events:
            self._raise_event(event)
        inner = f"changeset_{uuid.uuid4()}"
        content = b"".join(b"--" + inner.encode() + b"\r\n" + _http_part(a, cid) + b"\r\n" for cid, a in answers)
        content += b"--" + inner.encode() + b"--"
        return f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode() + content

    def _batch_operation(self, service: str, request: _BatchRequest, base: str, created: Mapping[str, str]) -> _Answer:
        target = request.url
        if target.startswith("$"):
            ref, _, tail = target[1:].partition("/")
            if ref not in created:
                return _error_answer(service, _bad("/IWBEP/CM_MGW_RT/017", f"Content-ID ${ref} is not defined in "
                                                                          "this changeset"))
            target = created[ref] + ("/" + tail if tail else "")
        path, _, query_text = target.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[-1]
        # A part's request line is a request URI as on its own, so it is percent-decoded like a top-level one:
        # `A_BusinessPartner%28%2717100001%27%29` names A_BusinessPartner('17100001').
        path = unquote(path)
        prefix = f"{SERVICE_PREFIX}{service}/"
        if path.startswith("/"):
            if not path.startswith(prefix):
                return _error_answer(service, GatewayError(
                    400, "/IWBEP/CM_MGW_RT/018", f"Batch operation {path} is not in service {service}"))
            path = path[len(prefix):]
        self.request_counts["batch_parts"] += 1
        self.batch_requests.append((request.method, prefix + path + (f"?{query_text}" if query_text else "")))
        try:
            status, headers, payload = self._dispatch(service, request.method, path,
                                                      dict(parse_qsl(query_text, keep_blank_values=True)),
                                                      request.headers, request.body, base)
        except GatewayError as exc:
            self.request_counts[str(exc.status)] += 1
            return _error_answer(service, exc)
        self.request_counts[str(status)] += 1
        return _Answer(status, headers, _json_text(payload) if payload is not None else b"")

    def _snapshot(self, service: str) -> dict[str, dict[tuple[str, ...], dict[str, Any]]]:
        return {name: {k: dict(r) for k, r in self._rows[name].items()}
                for name, definition in ENTITIES.items() if definition.service == service}

    def _restore(self, saved: Mapping[str, dict[tuple[str, ...], dict[str, Any]]]) -> None:
        for name, rows in saved.items():
            self._rows[name] = _Rows(rows)
