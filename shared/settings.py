"""Application settings (pydantic-settings), shaped like Azure app settings with `__` nesting."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

DELIVERY_BACKSTOP_FACTOR = 10
"""The queue's own max delivery count is this many times the attempts (infra/modules/servicebus.bicep too)."""
MAX_QUEUE_DELIVERY_COUNT = 2000
"""Upper bound of the queue's max delivery count (the most the settings model and the Bicep accept)."""


def queue_max_delivery_count(attempts: int) -> int:
    """The queue's (broker's) max delivery count for `attempts` failed attempts: a backstop well above them.

    The controller dead-letters a change after `attempts` failures of its own; deliveries whose lock a crashed
    or killed process lost count at the broker only, so they must not reach its limit first.
    """
    return min(attempts * DELIVERY_BACKSTOP_FACTOR, MAX_QUEUE_DELIVERY_COUNT)


class DataverseSettings(BaseModel):
    """Dynamics 365 CE / Dataverse Web API."""

    url: str = ""
    """Organisation URL, e.g. https://contoso.crm.dynamics.com (empty: Dataverse not configured)."""
    tenant_id: str = ""
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    """Leave empty to use the managed identity / DefaultAzureCredential chain."""
    authority_host: str = ""
    """Entra ID authority (default login.microsoftonline.com); the sandbox points it at its token endpoint."""
    batch_size: int = Field(default=500, ge=1, le=1000)
    max_concurrency: int = Field(default=4, ge=1, le=52)


class ArcGISSettings(BaseModel):
    """ArcGIS Online hosted feature service."""

    service_url: str = ""
    """FeatureServer URL (empty: ArcGIS not configured)."""
    token_url: str = "https://www.arcgis.com/sharing/rest/oauth2/token"  # noqa: S105 - a URL, not a secret
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    api_key: SecretStr = SecretStr("")
    """Used instead of app credentials when set."""
    webhook_signature_key: SecretStr = SecretStr("")
    """Shared secret of feature-service webhooks (x-esriHook-Signature)."""
    batch_size: int = Field(default=250, ge=1, le=2000)
    max_concurrency: int = Field(default=2, ge=1, le=16)


class SalesforceSettings(BaseModel):
    """Salesforce REST (client-credentials flow against the org's My Domain)."""

    my_domain_url: str = ""
    """e.g. https://contoso.my.salesforce.com (empty: Salesforce not configured). The API base URL comes from
    the token response's instance_url, never from here."""
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    api_version: str = "63.0"
    collection_size: int = Field(default=200, ge=1, le=200)
    """Records per sObject Collections call (the API's limit is 200)."""
    bulk_threshold: int = Field(default=2000, ge=1)
    """Batches of one object above this size go through Bulk API 2.0."""
    call_options_client: str = "syncline"
    """Sforce-Call-Options client id: Syncline's own writes are recognised by it in change events."""


class FinOpsSettings(BaseModel):
    """Dynamics 365 Finance & Operations OData (per-customer environment host)."""

    environment_url: str = ""
    """e.g. https://contoso.operations.dynamics.com (empty: F&O not configured)."""
    tenant_id: str = ""
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    """Leave empty to use the managed identity / DefaultAzureCredential chain."""
    authority_host: str = ""
    """Entra ID authority override (the sandbox's token endpoint); empty in Azure."""
    max_concurrency: int = Field(default=4, ge=1, le=52)


class SapSettings(BaseModel):
    """SAP S/4HANA OData v2 (API_BUSINESS_PARTNER, API_SALES_ORDER_SRV and the product/pricing/availability APIs)."""

    base_url: str = ""
    """The API host, e.g. https://my300000-api.s4hana.cloud.sap (empty: SAP not configured)."""
    auth: Literal["basic", "oauth"] = "basic"
    """basic: a communication user and password; oauth: client credentials against `token_url`."""
    user: str = ""
    password: SecretStr = SecretStr("")
    token_url: str = ""
    """OAuth token endpoint (S/4HANA Cloud: https://<host>/sap/bc/sec/oauth2/token, or the XSUAA URL)."""
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    scope: str = ""
    sap_client: str = ""
    """sap-client (on-premise systems with several clients); empty in S/4HANA Cloud."""
    system_time_zone: str = "UTC"
    """Time zone of the system's LastChangeDate/Time fields of business partners (local time in SAP)."""
    page_size: int = Field(default=1000, ge=1, le=5000)
    max_concurrency: int = Field(default=4, ge=1, le=32)
    batch_size: int = Field(default=100, ge=1, le=1000)
    """Changesets per OData $batch call (1 sends every request alone)."""


class ServiceBusSettings(BaseModel):
    """The inbound queue on Azure Service Bus (runtime "azure")."""

    fullyQualifiedNamespace: str = ""  # Azure's identity-based connection setting name
    """e.g. contoso-sync.servicebus.windows.net: connect with the managed identity (DefaultAzureCredential)."""
    connectionString: SecretStr = SecretStr("")
    """For local emulators and the test broker only; identity-based connections are preferred in Azure."""


class TableSettings(BaseModel):
    """Cross-references, snapshots, checkpoints and the audit ledger on Azure Table Storage (runtime "azure")."""

    endpoint: str = ""
    """Table service endpoint, e.g. https://contososync.table.core.windows.net (managed identity)."""
    connectionString: SecretStr = SecretStr("")
    """For Azurite; identity-based connections are preferred in Azure."""
    tablePrefix: str = "syncline"


class Settings(BaseSettings):
    """Every setting Syncline reads. Names map to app settings: `DATAVERSE__URL`, `SYNCLINE_RUNTIME`, ..."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore", case_sensitive=False)

    syncline_runtime: Literal["embedded", "azure"] = "embedded"
    """embedded: SQLite state and queue on local disk; azure: Service Bus and Table Storage."""
    syncline_state_dir: str = ".syncline"
    """Directory of the embedded runtime's SQLite files."""
    syncline_flows: str = str(REPO_ROOT / "flows")
    """A flow spec file, or a directory of *.yaml specs."""
    syncline_schedule: str = "0 */15 * * * *"
    """NCRONTAB schedule of the controller timer (the trigger reads it as %SYNCLINE_SCHEDULE%)."""
    syncline_webhook_secret: SecretStr = SecretStr("")
    """Shared secret the webhooks must present in the x-syncline-key header (function keys work too)."""
    syncline_batch_size: int = Field(default=500, ge=1, le=5000)
    syncline_max_delivery_count: int = Field(default=10, ge=1, le=2000)
    """Failed attempts before a change is dead-lettered (MAX_DELIVERY_EXCEEDED). Lost locks (crashes) do not
    count; the queue's own max delivery count is `queue_max_delivery_count` of this, a backstop."""
    syncline_lock_seconds: float = Field(default=60.0, gt=0, le=300)
    """Peek-lock duration of the embedded queue (Service Bus: the queue's LockDuration)."""
    syncline_session_buckets: int = Field(default=64, ge=0, le=4096)
    """Service Bus sessions the records are hashed into (docs/sessions.md); 0: one session per record, the shape
    of releases before it (messages in either shape drain whatever it is)."""
    syncline_max_concurrent_sessions: int = Field(default=8, ge=1, le=64)
    """Service Bus sessions (one connection each) a controller reads at once."""
    syncline_lease_partitions: int = Field(default=16, ge=1, le=100)
    """Table Storage partitions the record leases are spread over (docs/state-tables.md, "Lease partitions"): a
    batch takes and releases its leases in one transaction per partition it touches (per 100 records), so fewer
    cost fewer requests. Every instance must use the same value: change it only with every instance stopped."""
    syncline_inline_retries: int = Field(default=2, ge=0, le=5)
    """Short retries of an outbound direct write before it is scheduled on the queue."""
    syncline_http_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    """Read timeout of every outbound API call (the chaos harness makes it short to inject timeouts)."""
    syncline_ca_bundle: str = ""
    """Extra CA bundle to trust (the sandbox's test CA); empty in production."""
    syncline_inbound_queue: str = "syncline-inbound"
    syncline_servicebus: ServiceBusSettings = Field(default_factory=ServiceBusSettings)
    syncline_tables: TableSettings = Field(default_factory=TableSettings)
    applicationinsights_connection_string: SecretStr = SecretStr("")
    """Set by the platform when Application Insights is attached; enables OpenTelemetry export."""
    dataverse: DataverseSettings = Field(default_factory=DataverseSettings)
    arcgis: ArcGISSettings = Field(default_factory=ArcGISSettings)
    salesforce: SalesforceSettings = Field(default_factory=SalesforceSettings)
    fno: FinOpsSettings = Field(default_factory=FinOpsSettings)
    sap: SapSettings = Field(default_factory=SapSettings)

    # ---- issue 17 item 4: the choice-domain drift check
    syncline_check_schedule: str = "0 30 5 * * *"
    """NCRONTAB schedule of the choice-domain drift check timer (daily 05:30 UTC; read as
    %SYNCLINE_CHECK_SCHEDULE%)."""
    # --- issue 17 item 3: circuit breakers per system (shared/core/breaker.py)
    syncline_breaker_failures: int = Field(default=5, ge=1, le=1000)
    """Retriable failures in a row (outage, 5xx, timeout, throttling; not a record's own error) that open a
    system's breaker. Counted per function instance, per change outcome or poll."""
    syncline_breaker_error_rate: float = Field(default=0.5, gt=0, le=1)
    """Share of failed calls within SYNCLINE_BREAKER_WINDOW_SECONDS that opens the breaker (given
    SYNCLINE_BREAKER_MIN_CALLS calls at least)."""
    syncline_breaker_window_seconds: float = Field(default=60.0, gt=0, le=3600)
    """The sliding window of the error rate."""
    syncline_breaker_min_calls: int = Field(default=10, ge=1, le=100000)
    """Calls within the window before the error rate may open the breaker."""
    syncline_breaker_cooldown_seconds: float = Field(default=60.0, gt=0, le=86400)
    """How long an opened breaker waits before one probe; its changes are scheduled on the queue for then."""
    syncline_breaker_max_cooldown_seconds: float = Field(default=900.0, gt=0, le=86400)
    """Each failed probe doubles the cool-down, up to this."""

    @field_validator("syncline_flows")
    @classmethod
    def _flows_exist(cls, value: str) -> str:
        if not Path(value).exists():
            raise ValueError(f"flow spec path {value!r} does not exist")
        return value

    def secrets(self) -> list[str]:
        """Every configured secret value (for log-redaction checks)."""
        values = [
            self.syncline_webhook_secret, self.dataverse.client_secret, self.arcgis.client_secret,
            self.arcgis.api_key, self.arcgis.webhook_signature_key, self.syncline_servicebus.connectionString,
            self.syncline_tables.connectionString, self.salesforce.client_secret, self.fno.client_secret,
            self.sap.password, self.sap.client_secret,
        ]
        return [v.get_secret_value() for v in values if v.get_secret_value()]

    # --- issue 17 item 2: scheduled reconciliation -------------------------------------------------------------
    syncline_reconcile_schedule: str = "0 0 2 * * *"
    """NCRONTAB schedule of the reconciliation timer (daily at 02:00 UTC by default); read by the host as
    %SYNCLINE_RECONCILE_SCHEDULE%, listed here so the setting is documented in one place."""
    syncline_reconcile_api_share: float = Field(default=0.1, gt=0, le=1)
    """Share of each system's daily API allowance one reconciliation may spend; once spent it stops reading that
    system and stores a partial report naming it."""
    syncline_reconcile_daily_allowance: int = Field(default=100_000, ge=1)
    """A system's daily API allowance when `SYNCLINE_RECONCILE_DAILY_ALLOWANCES` does not name it (requests per
    24 h; Salesforce's is per org and edition, Dataverse's per licensed user)."""
    syncline_reconcile_daily_allowances: dict[str, int] = Field(default_factory=dict)
    """Per-system daily API allowances, JSON, e.g. `{"salesforce": 150000, "sap": 50000}`."""

    def reconcile_max_calls(self, system: str) -> int:
        """The requests one reconciliation may send to `system`: its allowance times the share (at least 1)."""
        allowance = self.syncline_reconcile_daily_allowances.get(system, self.syncline_reconcile_daily_allowance)
        return max(1, int(allowance * self.syncline_reconcile_api_share))
