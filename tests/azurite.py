"""Azurite's Table service for tests: installed once under .cache/azurite, run on a free loopback port.

Use it as a pytest plugin (`pytest_plugins = ["tests.azurite"]`, or `-p tests.azurite`) for the session
fixture `azurite_tables_connection_string`; the contract suite's azure-tables builder registers the plugin
itself when it first needs it. Without pytest: `with running_azurite() as azurite: azurite.connection_string`.
With `SYNCLINE_EMULATOR_LATENCY_MS` set, the fixture's connection string leads through `sandbox.latency_proxy`,
which delays every request by that much (a cloud round trip rather than loopback).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.latency_proxy import LatencyProxy, latency_from_environment
from shared.runtime.azure import azurite_connection_string

#: 3.36+ needs Node >= 21; CI machines have Node 20.
AZURITE_VERSION = "3.35.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_DIR = REPO_ROOT / ".cache" / "azurite"
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 30.0
AZURITE_KEEP_ALIVE_SECONDS = 120
"""Longer than any client keeps an idle connection (aiohttp: 15 s), so the server never closes one under a request."""
KEEP_ALIVE_PRELOAD = Path(__file__).with_name("azurite_keepalive.cjs")
INSTALL_TIMEOUT_SECONDS = 600


class AzuriteUnavailableError(RuntimeError):
    """Azurite cannot be installed or started here (the message says why and what to do)."""


def installed_version(install_dir: Path = INSTALL_DIR) -> str | None:
    """The Azurite version installed under `install_dir`, or None."""
    manifest = install_dir / "node_modules" / "azurite" / "package.json"
    try:
        return str(json.loads(manifest.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError):
        return None


def ensure_installed(install_dir: Path = INSTALL_DIR, version: str = AZURITE_VERSION) -> Path:
    """Install Azurite with npm into `install_dir` unless that version is there; return `azurite-table`."""
    executable = install_dir / "node_modules" / ".bin" / "azurite-table"
    if installed_version(install_dir) == version and executable.exists():
        return executable
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise AzuriteUnavailableError(
            "Azurite (the Azure Table Storage emulator) needs Node.js 20+ and npm on PATH to install, and"
            " `npm` or `node` is missing. Install Node.js (e.g. `apt-get install nodejs npm`), or set"
            " SYNCLINE_TEST_TABLES_CONNECTION_STRING to a storage account to test against instead."
        )
    install_dir.mkdir(parents=True, exist_ok=True)
    # A lock, so that parallel test processes (pytest-xdist, two terminals) do not install on top of each other.
    with (install_dir / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(install_dir) == version and executable.exists():
            return executable
        command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(install_dir), f"azurite@{version}"]
        print(f"\ninstalling Azurite {version} into {install_dir} (once; ~15 s) ...", file=sys.stderr)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise AzuriteUnavailableError(f"`{' '.join(command)}` did not finish in {error.timeout} s") from error
        if done.returncode != 0 or not executable.exists():
            raise AzuriteUnavailableError(
                f"`{' '.join(command)}` failed with exit code {done.returncode}:\n{done.stderr[-3000:]}"
            )
    return executable


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (another process may still take it before Azurite does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, so a killed test run leaves no Azurite."""
    if _PRCTL is not None:
        with contextlib.suppress(Exception):
            _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Resolved in the parent: the child between fork and exec should do as little as possible.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


class AzuriteTable:
    """One `azurite-table` process with in-memory storage, bound to 127.0.0.1."""

    def __init__(self, executable: Path) -> None:
        self.executable = executable
        self.log_path = executable.parents[2] / "azurite-table.log"  # <install dir>/, next to node_modules
        self.port = 0
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(self.port, HOST)

    def start(self) -> None:
        """Start on a free port and return once it accepts connections; a few tries if the port was taken."""
        problems: list[str] = []
        for _ in range(3):
            try:
                self._start_once(free_port())
                return
            except AzuriteUnavailableError as error:
                problems.append(str(error))
        raise AzuriteUnavailableError("Azurite did not start:\n" + "\n".join(problems))

    def _start_once(self, port: int) -> None:
        command = [
            str(self.executable), "--tableHost", HOST, "--tablePort", str(port),
            "--inMemoryPersistence",  # nothing on disk, and nothing to clean up
            "--disableTelemetry",  # on by default: never phone home from tests
        ]
        # Azurite closes an idle connection after 5 s, aiohttp reuses one for 15 s: a request sent as it closes is
        # reset, and azure-core retries no POST, so an entity group transaction ($batch) failed outright (the
        # demo's cycles crashed on it). Azure's own front ends keep idle connections for minutes. Azurite's option
        # for it is not read by azurite-table 3.35, hence the preloaded script.
        env = {**os.environ, "SYNCLINE_AZURITE_KEEP_ALIVE_SECONDS": str(AZURITE_KEEP_ALIVE_SECONDS),
               "NODE_OPTIONS": f"{os.environ.get('NODE_OPTIONS', '')} --require {KEEP_ALIVE_PRELOAD}".strip()}
        started = time.monotonic()
        self.log_path = self.log_path.with_name(f"azurite-table-{port}.log")
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                # PR_SET_PDEATHSIG follows the *thread* that forks: start Azurite from a long-lived thread
                # (pytest's main thread), never from a short-lived worker such as asyncio.to_thread.
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
            )
        self.port = port
        while time.monotonic() - started < START_TIMEOUT_SECONDS:
            if self._process.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
                self.startup_seconds = time.monotonic() - started
                return
            time.sleep(0.05)
        self.stop()
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise AzuriteUnavailableError(f"azurite-table on port {port} did not accept connections; its log:\n{tail}")

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s); safe to call more than once."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def running_azurite(install_dir: Path = INSTALL_DIR) -> Iterator[AzuriteTable]:
    """Install if needed, start, yield, and always stop."""
    azurite = AzuriteTable(ensure_installed(install_dir))
    azurite.start()
    try:
        yield azurite
    finally:
        azurite.stop()


@pytest.fixture(scope="session")
def azurite_tables_connection_string() -> Iterator[str]:
    """Connection string of one Azurite Table service shared by the whole test session (stopped at its end)."""
    try:
        azurite = AzuriteTable(ensure_installed())
        azurite.start()
    except AzuriteUnavailableError as error:
        pytest.fail(str(error), pytrace=False)
    proxy: LatencyProxy | None = None
    try:
        latency = latency_from_environment()
        if latency > 0:
            proxy = LatencyProxy(azurite.port, latency_ms=latency).start()
            yield azurite_connection_string(proxy.port, HOST)
        else:
            yield azurite.connection_string
    finally:
        if proxy is not None:
            proxy.stop()
        azurite.stop()
