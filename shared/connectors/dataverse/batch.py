"""The Dataverse `$batch` wire format: one change set per write out, multipart responses back in."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from shared.connectors.dataverse.codecs import SYSTEM, TableInfo
from shared.core.errors import TransientError
from shared.core.ports import WriteOp


@dataclass
class PartResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    content_id: str | None


def _boundary(content_type: str) -> str | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    return m.group(1) if m else None


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    delim = b"--" + boundary.encode()
    parts: list[tuple[dict[str, str], bytes]] = []
    for piece in body.split(delim)[1:]:
        if piece.startswith(b"--"):
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece[1:] if piece.startswith(b"\n") else piece
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = piece.partition(b"\n\n")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        parts.append((headers, content))
    return parts


def _parse_http_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    lines = head.decode("latin-1").splitlines()
    m = re.match(r"^HTTP/\d\.\d\s+(\d{3})", lines[0].strip()) if lines else None
    if m is None:
        raise TransientError(f"{SYSTEM}: malformed $batch response part (no status line): {data[:120]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(m.group(1)), headers, body.strip(b"\r\n")


def parse_batch_response(body: bytes, content_type: str) -> list[list[PartResponse]]:
    """Split a $batch response into one list of responses per top-level part (a change set or a request)."""
    boundary = _boundary(content_type)
    if boundary is None:
        raise TransientError(f"{SYSTEM}: $batch response has no multipart boundary ({content_type!r})")
    out: list[list[PartResponse]] = []
    for headers, content in _split_multipart(body, boundary):
        ctype = headers.get("content-type", "")
        if ctype.lower().startswith("multipart/mixed"):
            inner = _boundary(ctype)
            if inner is None:
                raise TransientError(f"{SYSTEM}: $batch change set response has no boundary")
            group = []
            for inner_headers, inner_content in _split_multipart(content, inner):
                status, resp_headers, resp_body = _parse_http_response(inner_content)
                group.append(PartResponse(status, resp_headers, resp_body, inner_headers.get("content-id")))
            out.append(group)
        else:
            status, resp_headers, resp_body = _parse_http_response(content)
            out.append([PartResponse(status, resp_headers, resp_body, headers.get("content-id"))])
    return out


@dataclass
class PreparedWrite:
    index: int
    op: WriteOp
    info: TableInfo
    method: str
    url: str
    """Path + query from the host root (what goes on the request line inside the batch)."""
    headers: dict[str, str]
    body: bytes | None
    key_desc: str


def batch_body(items: Sequence[PreparedWrite], boundary: str) -> bytes:
    chunks: list[bytes] = []
    for n, item in enumerate(items, start=1):
        changeset = f"changeset_{uuid.uuid4().hex}"
        lines = [f"--{boundary}", f"Content-Type: multipart/mixed; boundary={changeset}", "",
                 f"--{changeset}", "Content-Type: application/http", "Content-Transfer-Encoding: binary",
                 f"Content-ID: {n}", "", f"{item.method} {item.url} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in item.headers.items()]
        lines += [""]
        text = "\r\n".join(lines) + "\r\n"
        chunks.append(text.encode() + (item.body or b"") + f"\r\n--{changeset}--\r\n".encode())
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)
