"""The sandbox's start-up: simulators, Azurite and the test broker, the local functions host, the settings."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox import dataverse as dvs
from sandbox.server import RunningServer, TestCA

WEBHOOK_SECRET = "demo-webhook-secret-7f3a"
FUNCTION_KEY = "demo-function-key-91c2"
SIGNATURE_KEY = "demo-esri-signature-key-55d0"


@dataclass
class Sandbox:
    """Running simulators, the local functions host and the settings that point Syncline at them."""

    workdir: Path
    dv: dvs.DataverseSimulator
    ag: Any
    fno: Any = None
    sf: Any = None
    sap: Any = None
    servers: list[RunningServer] = field(default_factory=list)
    stoppers: list[Any] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    host_url: str = ""
    sales: dict[str, Any] = field(default_factory=dict)
    """What the sales-side seeds made (ids by category), for the expected dead letters."""
    faults: Any = None
    """The `sandbox.faults.FaultPlan` every simulator is wrapped in (None: no injector)."""
    broker: Any = None
    """The local Service Bus broker's handle (runtime azure)."""

    def stop(self) -> None:
        # Best effort: a slow shutdown must never hide the outcome (or the error) of the run.
        for server in reversed(self.servers):
            server.stop()
        for stop in reversed(self.stoppers):
            stop()
        from shared.bootstrap import set_services

        set_services(None)
        for sim in (self.dv, self.ag, self.fno, self.sap):
            close = getattr(sim, "close", None)
            if close is not None:
                try:
                    close()
                except (TimeoutError, RuntimeError) as exc:
                    print(f"warning: simulator shutdown: {type(exc).__name__}")


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set process environment variables for the duration (the settings model reads them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_azure_emulators(box: Sandbox) -> None:
    """Azurite (Table Storage) and the local AMQP Service Bus test broker, for SYNCLINE_RUNTIME=azure."""
    import sys

    # The emulators live with the tests (never deployed); the console script does not put the repo on sys.path.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.azurite import AzuriteTable, ensure_installed
    from tests.sbbroker import start_broker

    azurite = AzuriteTable(ensure_installed())
    azurite.start()
    box.stoppers.append(azurite.stop)
    tables = azurite.connection_string
    # SYNCLINE_EMULATOR_LATENCY_MS: each Table Storage request and broker operation costs a cloud round trip
    from sandbox.latency_proxy import LatencyProxy, latency_from_environment
    from shared.runtime.azure import azurite_connection_string

    latency = latency_from_environment()
    if latency > 0:
        proxy = LatencyProxy(azurite.port, latency_ms=latency).start()
        box.stoppers.append(proxy.stop)
        tables = azurite_connection_string(proxy.port)
    from shared.settings import queue_max_delivery_count

    broker = start_broker({"syncline-inbound": {"requires_session": True, "lock_duration": 60.0,
                                                "max_delivery_count": queue_max_delivery_count(10)}})
    box.stoppers.append(broker.stop)
    box.broker = broker
    box.env.update({
        "SYNCLINE_RUNTIME": "azure",
        "SYNCLINE_TABLES__connectionString": tables,
        "SYNCLINE_SERVICEBUS__connectionString": broker.connection_string,
    })


def start_sales_side(box: Sandbox, ca: TestCA) -> None:
    """F&O and Salesforce simulators (the second seed's lead-to-cash reference data)."""
    from sandbox.fno import FinOpsSimulator
    from sandbox.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SalesforceSimulator

    box.fno, box.sf = FinOpsSimulator(), SalesforceSimulator()
    fno_server = RunningServer(_app(box, box.fno.app, "fno"), ca=ca).start()
    sf_server = RunningServer(_app(box, box.sf.app, "salesforce"), ca=ca).start()
    box.servers += [fno_server, sf_server]
    box.sf.instance_url = sf_server.url
    box.env.update({
        "FNO__ENVIRONMENT_URL": fno_server.url, "FNO__AUTHORITY_HOST": fno_server.url,
        "FNO__TENANT_ID": box.fno.tenant_id, "FNO__CLIENT_ID": box.fno.client_id,
        "FNO__CLIENT_SECRET": box.fno.client_secret,
        "SALESFORCE__MY_DOMAIN_URL": sf_server.url, "SALESFORCE__CLIENT_ID": DEFAULT_CLIENT_ID,
        "SALESFORCE__CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
    })


def start_sap_side(box: Sandbox, ca: TestCA) -> None:
    """The SAP S/4HANA simulator (the third seed's ERP), basic authentication with a communication user."""
    from sandbox.sap import SapSimulator

    box.sap = SapSimulator(event_verify=str(ca.ca_path))
    server = RunningServer(_app(box, box.sap.app, "sap"), ca=ca).start()
    box.servers.append(server)
    box.env.update({"SAP__BASE_URL": server.url, "SAP__AUTH": "basic", "SAP__USER": box.sap.user,
                    "SAP__PASSWORD": box.sap.password})


def _app(box: Sandbox, app: Any, name: str) -> Any:
    """The simulator's ASGI app, behind the sandbox's fault injector when it has one."""
    return app if box.faults is None else box.faults.wrap(app, name)


def start_sandbox(workdir: Path, *, latency_ms: float = 0.0, max_record_count: int = 2000,
                  runtime: str = "embedded", sales: bool = False, sap: bool = False, faults: Any = None) -> Sandbox:
    """Start both simulators (TLS from a throwaway CA) and return the settings that point at them.

    `faults` (a `sandbox.faults.FaultPlan`) wraps every simulator in one fault-injection middleware."""
    from sandbox.arcgis import ArcGISSimulator

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    ca = TestCA.create(workdir / "tls")
    dv = dvs.DataverseSimulator(latency_ms=latency_ms, webhook_verify=str(ca.ca_path))
    ag = ArcGISSimulator(max_record_count=max_record_count)
    ag.latency_ms = latency_ms
    box = Sandbox(workdir, dv, ag, faults=faults)
    dv_server = RunningServer(_app(box, dv.app, "dataverse"), ca=ca).start()
    ag_server = RunningServer(_app(box, ag.app, "arcgis"), ca=ca).start()
    box.servers += [dv_server, ag_server]
    box.env = {
        "SYNCLINE_RUNTIME": "embedded",
        "SYNCLINE_STATE_DIR": str(workdir / "state"),
        "SYNCLINE_CA_BUNDLE": str(ca.ca_path),
        "SYNCLINE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "DATAVERSE__URL": dv_server.url,
        "DATAVERSE__AUTHORITY_HOST": dv_server.url,
        "DATAVERSE__TENANT_ID": dvs.DEFAULT_TENANT_ID,
        "DATAVERSE__CLIENT_ID": dvs.DEFAULT_CLIENT_ID,
        "DATAVERSE__CLIENT_SECRET": dvs.DEFAULT_CLIENT_SECRET,
        "ARCGIS__SERVICE_URL": ag.service_url(ag_server.url),
        "ARCGIS__TOKEN_URL": ag.token_url(ag_server.url),
        "ARCGIS__CLIENT_ID": ag.client_id,
        "ARCGIS__CLIENT_SECRET": ag.client_secret,
        "ARCGIS__WEBHOOK_SIGNATURE_KEY": SIGNATURE_KEY,
    }
    if sales:
        start_sales_side(box, ca)
    if sap:
        start_sap_side(box, ca)
    if runtime == "azure":
        try:
            start_azure_emulators(box)
        except BaseException:
            box.stop()
            raise
    return box


def start_host(box: Sandbox) -> None:
    """Serve the function app's HTTP triggers on loopback and register both simulators' webhooks to it."""
    from sandbox.funchost import build_app
    from shared.bootstrap import set_services

    set_services(None)  # the host builds its services from this sandbox's settings on first use
    host = RunningServer(build_app(function_key=FUNCTION_KEY)).start()
    box.servers.append(host)
    box.host_url = host.url
    box.dv.register_webhook(f"{host.url}/api/webhooks/dataverse?code={FUNCTION_KEY}",
                            headers={"x-syncline-key": WEBHOOK_SECRET})
    box.ag.register_webhook(f"{host.url}/api/webhooks/arcgis?code={FUNCTION_KEY}", signature_key=SIGNATURE_KEY)
    if box.fno is not None:
        box.fno.register_business_event_endpoint(
            f"{host.url}/api/webhooks/fno?code={FUNCTION_KEY}&syncline-key={WEBHOOK_SECRET}")
    if box.sap is not None:
        box.sap.register_event_endpoint(f"{host.url}/api/webhooks/sap?code={FUNCTION_KEY}",
                                        headers={"x-syncline-key": WEBHOOK_SECRET})
    if box.sf is not None:
        box.sf.register_cdc_webhook(f"{host.url}/api/webhooks/salesforce?code={FUNCTION_KEY}",
                                    headers={"x-syncline-key": WEBHOOK_SECRET})
