"""The OData v2 $batch wire format: retrieve parts and changesets out, multipart/mixed answers back."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx

from shared.connectors._odata import json_object
from shared.connectors.sap.codecs import SYSTEM
from shared.core.errors import TransientError


@dataclass
class _Req:
    """One request of a write plan; `path` is relative to the service root."""

    method: str
    path: str
    what: str
    body: dict[str, Any] | None = None
    etag: str | None = None
    """If-Match value (None: no precondition)."""


@dataclass
class _Part:
    """One answer inside a $batch response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def response(self) -> httpx.Response:
        return httpx.Response(self.status, headers=self.headers, content=self.body)

    def json(self, what: str) -> dict[str, Any]:
        return json_object(self.response(), system=SYSTEM, what=what)


@dataclass
class _Answer:
    """The answer to one batch item: a retrieve, or a changeset (committed: one part per request)."""

    ok: bool
    parts: list[_Part]


def _query(params: Mapping[str, str]) -> str:
    # OData expects %20, not the form encoding's "+", between the words of $filter.
    return urlencode(params, quote_via=quote, safe="$',()/:*")


def _encode_request(req: _Req, content_id: str | None = None) -> bytes:
    mime = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        mime.append(f"Content-ID: {content_id}")
    body = json.dumps(req.body).encode() if req.body is not None else b""
    lines = [f"{req.method} {req.path} HTTP/1.1", "Accept: application/json"]
    if req.etag is not None:
        lines.append(f"If-Match: {req.etag}")
    if req.body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(mime) + "\r\n\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode() + body


def encode_batch(items: Sequence[_Req | Sequence[_Req]], boundary: str) -> bytes:
    """A multipart/mixed $batch body: a `_Req` is a retrieve part, a sequence of them one changeset."""
    out: list[bytes] = []
    for number, item in enumerate(items, start=1):
        out.append(f"--{boundary}\r\n".encode())
        if isinstance(item, _Req):
            out.append(_encode_request(item) + b"\r\n")
            continue
        changeset = f"changeset_{boundary[6:]}_{number}"
        out.append(f"Content-Type: multipart/mixed; boundary={changeset}\r\n\r\n".encode())
        for position, req in enumerate(item, start=1):
            out.append(f"--{changeset}\r\n".encode() + _encode_request(req, str(position)) + b"\r\n")
        out.append(f"--{changeset}--\r\n".encode())
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return m.group(1).strip() if m else None


def _multipart(body: bytes, boundary: str) -> list[bytes]:
    parts: list[bytes] = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        chunk = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1] if chunk.endswith(b"\n") else chunk
        parts.append(chunk)
    return parts


def _head(blob: bytes) -> tuple[dict[str, str], bytes]:
    cuts = [(at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := blob.find(sep)) >= 0]
    head, rest = (blob[:min(cuts)[0]], blob[min(cuts)[0] + min(cuts)[1]:]) if cuts else (blob, b"")
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _decode_part(blob: bytes) -> _Part:
    """An application/http part: MIME headers, status line, headers, body."""
    _, rest = _head(blob)
    line, _, tail = rest.partition(b"\n")
    fields = line.decode("utf-8", "replace").split()
    try:
        status = int(fields[1])
    except (IndexError, ValueError):
        raise TransientError(f"{SYSTEM}: malformed $batch answer part {line[:80]!r}") from None
    headers, body = _head(tail) if tail.strip() else ({}, b"")
    return _Part(status, headers, body)


def decode_batch(response: httpx.Response, items: Sequence[_Req | Sequence[_Req]], what: str) -> list[_Answer]:
    """One answer per item of the request, in order (a failed changeset is answered by its one error part)."""
    boundary = _boundary(response.headers.get("content-type", ""))
    if boundary is None:
        raise TransientError(f"{SYSTEM} {what}: $batch answer is not multipart/mixed "
                             f"({response.headers.get('content-type')!r})")
    answers: list[_Answer] = []
    for blob in _multipart(response.content, boundary):
        headers, body = _head(blob)
        inner = _boundary(headers.get("content-type", "")) \
            if headers.get("content-type", "").lower().startswith("multipart/mixed") else None
        if inner is not None:
            answers.append(_Answer(True, [_decode_part(p) for p in _multipart(body, inner)]))
        else:
            part = _decode_part(blob)
            answers.append(_Answer(part.status < 400, [part]))
    if len(answers) != len(items):
        raise TransientError(f"{SYSTEM} {what}: $batch answered {len(answers)} parts for {len(items)} requests")
    return answers
