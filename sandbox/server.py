"""Runs sandbox ASGI simulators on 127.0.0.1 in background threads (plain HTTP or TLS from a test CA)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn


def free_port() -> int:
    """Ask the kernel for a free loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TestCA:
    """A throwaway certificate authority (trustme) and a server certificate for 127.0.0.1/localhost."""

    ca_path: Path
    cert_path: Path
    key_path: Path

    @classmethod
    def create(cls, directory: Path) -> TestCA:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        ca_path = directory / "sandbox-ca.pem"
        cert_path = directory / "sandbox-server.pem"
        key_path = directory / "sandbox-server.key"
        ca.cert_pem.write_to_path(str(ca_path))
        server.cert_chain_pems[0].write_to_path(str(cert_path))
        for extra in server.cert_chain_pems[1:]:
            extra.write_to_path(str(cert_path), append=True)
        server.private_key_pem.write_to_path(str(key_path))
        return cls(ca_path=ca_path, cert_path=cert_path, key_path=key_path)


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the thread is not the main thread
        return None


class RunningServer:
    """One simulator served by uvicorn in a daemon thread; `stop()` shuts it down."""

    def __init__(self, app: Any, *, port: int | None = None, ca: TestCA | None = None) -> None:
        self.port = port or free_port()
        self.scheme = "https" if ca else "http"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",  # shutdown chatter would bury the demo output
            access_log=False,
            lifespan="off",
            ssl_certfile=str(ca.cert_path) if ca else None,
            ssl_keyfile=str(ca.key_path) if ca else None,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._thread = threading.Thread(target=self._run, name=f"sim-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout: float = 10.0) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"simulator on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
