"""Composition root: builds settings, connectors, state, queue, engine and controller into one `Services`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from shared.connectors._http import CallCounter, RetryPolicy
from shared.core.breaker import BreakerPolicy
from shared.core.controller import Controller
from shared.core.engine import SyncEngine
from shared.core.errors import SpecError
from shared.core.ports import ChangeSource, InboundQueue, RecordSink, StateStore
from shared.mapping.spec import FlowSet, load_spec, parse_spec
from shared.runtime.telemetry import Metrics, configure_logging, configure_telemetry, dataverse_correlation_hook
from shared.settings import DataverseSettings, Settings, queue_max_delivery_count

if TYPE_CHECKING:
    from shared.connectors.dataverse import AzureIdentityTokenProvider

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a trigger or the CLI needs, built once per process."""

    settings: Settings
    flowset: FlowSet
    state: StateStore
    queue: InboundQueue
    engine: SyncEngine
    controller: Controller
    sinks: dict[str, RecordSink]
    sources: dict[str, ChangeSource]
    counter: CallCounter
    metrics: Metrics = field(default_factory=Metrics)
    clients: list[httpx.AsyncClient] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    async def aclose(self) -> None:
        """Close HTTP clients, token providers, the queue and the state store."""
        for client in self.clients:
            await client.aclose()
        for close in self.closers:
            close()
        await self.queue.close()
        await self.state.close()


def load_flows(path: str | Path) -> FlowSet:
    """Load a spec file, or merge every *.yaml of a directory into one flow set."""
    p = Path(path)
    if p.is_file():
        return load_spec(p)
    files = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
    if not files:
        raise SpecError(f"{p}: no flow spec (*.yaml) found")
    if len(files) == 1:
        return load_spec(files[0])
    specs = [load_spec(f) for f in files]
    merged = {
        "spec_version": 1,
        "name": "+".join(s.name for s in specs),
        "systems": sorted({sys for s in specs for sys in s.systems}),
        "value_maps": {k: v for s in specs for k, v in s.value_maps.items()},
        "flows": [f.model_dump(by_alias=True) for s in specs for f in s.flows],
        "cascades": [c.model_dump() for s in specs for c in s.cascades],
    }
    import yaml

    return parse_spec(yaml.safe_dump(merged), source=str(p))


def _client(system: str, counter: CallCounter, settings: Settings,
            transports: Mapping[str, httpx.AsyncBaseTransport] | None) -> httpx.AsyncClient:
    transport = (transports or {}).get(system)
    verify: str | bool = settings.syncline_ca_bundle or True
    hooks: list[Callable[[httpx.Request], Awaitable[None]]] = [counter.hook(system)]
    if system == "dataverse":
        hooks.append(dataverse_correlation_hook())
    # ArcGIS records no client request id, and an unknown header is one more thing a proxy or the service could
    # reject: its requests carry nothing extra (the correlation id is in our logs and audit rows instead).
    return httpx.AsyncClient(
        transport=transport,
        verify=verify,
        timeout=httpx.Timeout(settings.syncline_http_timeout_seconds,
                              connect=min(10.0, settings.syncline_http_timeout_seconds)),
        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        event_hooks={"request": hooks},
        trust_env=False,
    )


def dataverse_token_provider(
    settings: DataverseSettings, *, ca_bundle: str | None = None
) -> AzureIdentityTokenProvider:
    """Dataverse's (and F&O's) Entra ID tokens: client secret when configured, else DefaultAzureCredential.

    The scope is `{settings.url}/.default`; `settings.authority_host` (the sandbox's https token endpoint) and
    `ca_bundle` (its test CA) are passed through for local runs.
    """
    # Imported here, like every connector: a function instance loads only the systems it is configured for.
    from shared.connectors.dataverse import AzureIdentityTokenProvider, client_secret_token_provider

    scope = settings.url.rstrip("/") + "/.default"
    authority = settings.authority_host or None
    secret = settings.client_secret.get_secret_value()
    if secret:
        return client_secret_token_provider(settings.tenant_id, settings.client_id, secret, scope,
                                            authority_host=authority, ca_bundle=ca_bundle)
    from azure.identity import DefaultAzureCredential

    kwargs: dict[str, Any] = {}
    if authority is not None:
        kwargs["authority"] = authority
    if ca_bundle is not None:
        kwargs["connection_verify"] = ca_bundle
    if settings.client_id:
        kwargs["managed_identity_client_id"] = settings.client_id
    return AzureIdentityTokenProvider(DefaultAzureCredential(**kwargs), scope)


def build_services(
    settings: Settings | None = None,
    *,
    transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    state: StateStore | None = None,
    queue: InboundQueue | None = None,
) -> Services:
    """Wire the application. Tests pass their own transports, state or queue; nothing else is patched."""
    settings = settings or Settings()
    configure_logging(settings)
    configure_telemetry(settings)
    flowset = load_flows(settings.syncline_flows)
    counter = CallCounter()
    metrics = Metrics()
    clients: list[httpx.AsyncClient] = []
    closers: list[Callable[[], None]] = []
    sinks: dict[str, RecordSink] = {}
    sources: dict[str, ChangeSource] = {}
    policy = RetryPolicy()

    if settings.dataverse.url:
        from shared.connectors.dataverse import DataverseClient

        http = _client("dataverse", counter, settings, transports)
        clients.append(http)
        tokens = dataverse_token_provider(settings.dataverse, ca_bundle=settings.syncline_ca_bundle or None)
        closers.append(tokens.close)
        dv = DataverseClient(
            settings.dataverse.url,
            http,
            tokens,
            batch_size=settings.dataverse.batch_size,
            policy=policy,
            max_concurrency=settings.dataverse.max_concurrency,
        )
        sinks["dataverse"] = dv
        sources["dataverse"] = dv

    if settings.arcgis.service_url:
        from shared.connectors.arcgis import (
            ApiKeyAuth,
            AppCredentialsAuth,
            ArcGISAuth,
            ArcGISFeatureServiceClient,
        )

        http = _client("arcgis", counter, settings, transports)
        clients.append(http)
        auth: ArcGISAuth
        if settings.arcgis.api_key.get_secret_value():
            auth = ApiKeyAuth(settings.arcgis.api_key.get_secret_value())
        else:
            auth = AppCredentialsAuth(settings.arcgis.token_url, settings.arcgis.client_id,
                                      settings.arcgis.client_secret.get_secret_value(), http)
        ag = ArcGISFeatureServiceClient(settings.arcgis.service_url, http, auth,
                                        batch_size=settings.arcgis.batch_size, policy=policy,
                                        max_concurrency=settings.arcgis.max_concurrency)
        sinks["arcgis"] = ag
        sources["arcgis"] = ag

    if settings.salesforce.my_domain_url:
        import requests

        from shared.connectors.salesforce import SalesforceClient

        session = requests.Session()
        # requests lets REQUESTS_CA_BUNDLE override `verify` unless trust_env is off (see local-runtime notes).
        session.trust_env = False
        session.verify = settings.syncline_ca_bundle or True
        closers.append(session.close)
        sf = SalesforceClient(
            settings.salesforce.my_domain_url,
            settings.salesforce.client_id,
            settings.salesforce.client_secret.get_secret_value(),
            session=session,
            version=settings.salesforce.api_version,
            collection_size=settings.salesforce.collection_size,
            bulk_threshold=settings.salesforce.bulk_threshold,
            call_options_client=settings.salesforce.call_options_client,
            timeout=settings.syncline_http_timeout_seconds,
        )
        sinks["salesforce"] = sf
        sources["salesforce"] = sf

    if settings.fno.environment_url:
        from shared.connectors.fno import FinOpsClient

        http = _client("fno", counter, settings, transports)
        clients.append(http)
        # F&O takes the same Entra ID client-credentials token, scoped to the environment host.
        entra = DataverseSettings(url=settings.fno.environment_url, tenant_id=settings.fno.tenant_id,
                                  client_id=settings.fno.client_id, client_secret=settings.fno.client_secret,
                                  authority_host=settings.fno.authority_host)
        fno_tokens = dataverse_token_provider(entra, ca_bundle=settings.syncline_ca_bundle or None)
        closers.append(fno_tokens.close)
        fno = FinOpsClient(settings.fno.environment_url, http, fno_tokens, policy=policy,
                           max_concurrency=settings.fno.max_concurrency)
        sinks["fno"] = fno
        sources["fno"] = fno

    if settings.sap.base_url:
        from shared.connectors.sap import BasicAuth, OAuthClientCredentials, SapAuth, SapClient

        http = _client("sap", counter, settings, transports)
        clients.append(http)
        sap_auth: SapAuth
        if settings.sap.auth == "oauth":
            sap_auth = OAuthClientCredentials(settings.sap.token_url, settings.sap.client_id,
                                              settings.sap.client_secret.get_secret_value(),
                                              scope=settings.sap.scope or None)
        else:
            sap_auth = BasicAuth(settings.sap.user, settings.sap.password.get_secret_value())
        sap = SapClient(settings.sap.base_url, sap_auth, http=http, sap_client=settings.sap.sap_client or None,
                        policy=policy, page_size=settings.sap.page_size,
                        max_concurrency=settings.sap.max_concurrency,
                        system_time_zone=settings.sap.system_time_zone, batch_size=settings.sap.batch_size)
        sinks["sap"] = sap
        sources["sap"] = sap

    if settings.syncline_runtime == "azure":
        state, queue = _azure_runtime(settings, state, queue, closers)
    if state is None or queue is None:
        from shared.runtime.embedded import SqliteQueue, SqliteStateStore

        state_dir = Path(settings.syncline_state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        state = state or SqliteStateStore(state_dir / "state.db")
        queue = queue or SqliteQueue(state_dir / "queue.db", name=settings.syncline_inbound_queue,
                                     max_delivery_count=queue_max_delivery_count(settings.syncline_max_delivery_count),
                                     lock_duration_seconds=settings.syncline_lock_seconds)

    active = flowset.restricted_to(set(sinks))
    idle = sorted({f.name for f in flowset.flows} - {f.name for f in active.flows})
    if idle:
        log.info("flows without a configured system are idle: %s", ", ".join(idle))
    flowset = active
    # A record lease lasts as long as a message lock: a killed instance's records are free again by the time its
    # messages are redelivered, so those never meet their own stale leases.
    engine = SyncEngine(flowset, sinks=sinks, state=state, sources=sources,
                        lease_seconds=settings.syncline_lock_seconds)
    controller = Controller(flowset, engine=engine, queue=queue, state=state, sources=sources,
                            batch_size=settings.syncline_batch_size,
                            # three renewals per lock period: one late or failed round still keeps the lock
                            lock_renew_seconds=settings.syncline_lock_seconds / 3,
                            metrics=metrics, api_calls=counter.snapshot,
                            max_attempts=settings.syncline_max_delivery_count,
                            breaker_policy=breaker_policy(settings))
    return Services(settings, flowset, state, queue, engine, controller, sinks, sources, counter, metrics, clients,
                    closers)


def breaker_policy(settings: Settings) -> BreakerPolicy:
    """The circuit breakers' thresholds and cool-downs from the SYNCLINE_BREAKER_* settings."""
    return BreakerPolicy(consecutive_failures=settings.syncline_breaker_failures,
                         error_rate=settings.syncline_breaker_error_rate,
                         window_seconds=settings.syncline_breaker_window_seconds,
                         min_calls=settings.syncline_breaker_min_calls,
                         cooldown_seconds=settings.syncline_breaker_cooldown_seconds,
                         max_cooldown_seconds=max(settings.syncline_breaker_max_cooldown_seconds,
                                                  settings.syncline_breaker_cooldown_seconds))


def _azure_runtime(settings: Settings, state: StateStore | None, queue: InboundQueue | None,
                   closers: list[Callable[[], None]]) -> tuple[StateStore, InboundQueue]:
    """Table Storage state and Service Bus queue: identity-based in Azure, connection strings for emulators."""
    from shared.runtime.azure import ServiceBusQueue, TableStateStore

    tables, bus = settings.syncline_tables, settings.syncline_servicebus
    credential = None
    if state is None:
        if tables.connectionString.get_secret_value():
            state = TableStateStore.from_connection_string(tables.connectionString.get_secret_value(),
                                                           table_prefix=tables.tablePrefix,
                                                           lease_partitions=settings.syncline_lease_partitions)
        elif tables.endpoint:
            state = TableStateStore.from_endpoint(tables.endpoint, table_prefix=tables.tablePrefix,
                                                  lease_partitions=settings.syncline_lease_partitions)
        else:
            raise SpecError("SYNCLINE_RUNTIME=azure needs SYNCLINE_TABLES__endpoint (or a connectionString for "
                            "Azurite)", reason="SPEC_INVALID")
    if queue is None:
        name = settings.syncline_inbound_queue
        max_count = queue_max_delivery_count(settings.syncline_max_delivery_count)
        buckets, concurrent = settings.syncline_session_buckets, settings.syncline_max_concurrent_sessions
        if bus.connectionString.get_secret_value():
            queue = ServiceBusQueue.from_connection_string(bus.connectionString.get_secret_value(), name,
                                                           max_delivery_count=max_count, sessions=True,
                                                           session_buckets=buckets,
                                                           max_concurrent_sessions=concurrent)
        elif bus.fullyQualifiedNamespace:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential()
            queue = ServiceBusQueue.from_namespace(bus.fullyQualifiedNamespace, credential, name,
                                                   max_delivery_count=max_count, sessions=True,
                                                   session_buckets=buckets, max_concurrent_sessions=concurrent)
        else:
            raise SpecError("SYNCLINE_RUNTIME=azure needs SYNCLINE_SERVICEBUS__fullyQualifiedNamespace (or a "
                            "connectionString for an emulator)", reason="SPEC_INVALID")
    return state, queue


_services: Services | None = None


def get_services() -> Services:
    """The process-wide services (built on first use, reused across invocations)."""
    global _services
    if _services is None:
        _services = build_services()
    return _services


def set_services(services: Services | None) -> None:
    """Install (or clear) the process-wide services; used by tests and the local host."""
    global _services
    _services = services
