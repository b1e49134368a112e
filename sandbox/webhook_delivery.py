"""Background webhook delivery shared by the simulators: own loop thread, bounded parallelism, flush, close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

Job = Callable[[httpx.AsyncClient], Awaitable[None]]


class Deliverer:
    """Runs delivery jobs on a private event loop so API requests never wait for the receiver.

    Like the real services, deliveries go out with bounded parallelism; `flush` waits for every job
    submitted so far (delivered or failed) and `close` stops the thread.
    """

    def __init__(self, name: str, *, verify: Any = True, timeout: float = 30.0, parallelism: int = 8) -> None:
        self._name = name
        self._verify = verify
        self._timeout = timeout
        self._parallelism = parallelism
        self._lock = threading.Lock()
        self._pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, job: Job) -> None:
        """Queue one delivery; `job` receives the shared HTTP client."""
        with self._lock:
            self._pending += 1
        asyncio.run_coroutine_threadsafe(self._run(job), self._ensure_loop())

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every queued delivery has finished (delivered or failed)."""
        deadline = time.monotonic() + timeout
        while self._pending > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._pending} webhook deliveries still pending after {timeout}s")
            await asyncio.sleep(0.005)

    def close(self) -> None:
        """Stop the delivery thread (a later submit starts a new one)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        self._loop = self._thread = self._client = None
        self._slots = None

    async def _run(self, job: Job) -> None:
        try:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self._parallelism)
            async with self._slots:
                if self._client is None:
                    self._client = httpx.AsyncClient(verify=self._verify, timeout=self._timeout, trust_env=False)
                await job(self._client)
        finally:
            with self._lock:
                self._pending -= 1

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()
                    loop.close()

                thread = threading.Thread(target=run, name=self._name, daemon=True)
                thread.start()
                ready.wait(5)
                self._loop, self._thread = loop, thread
            return self._loop
