"""Simulators served on loopback for tests: a server's lifetime, TLS trust of the test CA, webhook receivers."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.server import RunningServer
from sandbox.server import TestCA as SandboxCA

S = TypeVar("S")


@dataclass
class Served(Generic[S]):
    """A simulator, the TLS server it is served by and the CA a client must trust to reach it."""

    sim: S
    server: RunningServer
    ca: SandboxCA

    @property
    def url(self) -> str:
        return self.server.url


@contextmanager
def serve(app: Any, ca: SandboxCA | None = None) -> Iterator[RunningServer]:
    """`app` served on loopback (HTTPS with `ca`, else plain HTTP) until the block ends."""
    server = RunningServer(app, ca=ca).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def endpoint(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Iterator[str]:
    """A plain-HTTP endpoint on loopback answering POSTs to `path` with `handler`; yields its URL."""
    with serve(Starlette(routes=[Route(path, handler, methods=["POST"])])) as server:
        yield f"{server.url}{path}"


def tls_context(ca: SandboxCA) -> ssl.SSLContext:
    """An SSL context trusting the test CA (what an httpx client needs to reach a TLS-served simulator)."""
    return ssl.create_default_context(cafile=str(ca.ca_path))


@dataclass
class Receiver:
    """A webhook endpoint that records the headers and body of every POST and answers statuses from a script
    (then 200)."""

    script: list[int] = field(default_factory=list)
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.posts.append(({k.lower(): v for k, v in request.headers.items()}, body))
            status = self.script.pop(0) if self.script else 200
        return Response(status_code=status)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]


@dataclass
class Recorder:
    """Injected sleep: records the delays a client asked for and advances a fake clock without waiting."""

    delays: list[float] = field(default_factory=list)
    now: float = 1000.0

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now
