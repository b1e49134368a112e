"""Offline checks of infra/: every template parses, and the templates agree with the app (settings, queue, tables,
schedule, function names), keep secrets out, grant roles only from the one role table, and wire the alerts and
the workbook to what the app emits."""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path

import annotated_types
import pytest
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from tree_sitter import Node

from shared.settings import DELIVERY_BACKSTOP_FACTOR, MAX_QUEUE_DELIVERY_COUNT, Settings, queue_max_delivery_count
from tests.infra.bicep import (
    BicepFile,
    Module,
    Resource,
    call_arguments,
    calls,
    literal,
    obj,
    parse_file,
    parse_text,
    string_value,
    template,
    text,
    walk,
)

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"

# Settings the model reads that are deliberately NOT set in Azure (with the reason).
NOT_SET_IN_AZURE = {
    "SYNCLINE_STATE_DIR": "embedded runtime only (SQLite files on local disk)",
    "SYNCLINE_CA_BUNDLE": "the sandbox's test CA; production trusts the public CAs",
    "SYNCLINE_SERVICEBUS__CONNECTIONSTRING": "emulators only; Azure connects with the managed identity",
    "SYNCLINE_TABLES__CONNECTIONSTRING": "Azurite only; Azure connects with the managed identity",
    "DATAVERSE__AUTHORITY_HOST": "the sandbox's token endpoint; Azure uses the default Entra authority",
    "FNO__AUTHORITY_HOST": "the sandbox's token endpoint; Azure uses the default Entra authority",
    "SYNCLINE_FLOWS": "the default is the flows/ folder of the deployed package itself",
    "SYNCLINE_HTTP_TIMEOUT_SECONDS": "the chaos harness shortens it to inject timeouts; the default suits Azure",
}
# Must never appear as app settings in Azure: identity replaces them, or Flex Consumption refuses them.
FORBIDDEN_SETTINGS = {
    "SYNCLINE_SERVICEBUS__CONNECTIONSTRING", "SYNCLINE_TABLES__CONNECTIONSTRING", "AZUREWEBJOBSSTORAGE",
    "FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "WEBSITE_CONTENTSHARE",
}
# App settings the Functions host reads (the app does not).
HOST_SETTINGS = {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential"}
# SecretStr fields that are not secrets in Azure: the platform hands the App Insights connection string out.
NOT_KEY_VAULT = {"APPLICATIONINSIGHTS_CONNECTION_STRING"}

# main.bicep parameter -> (Settings field path, the app setting it feeds).
PARAM_SETTINGS = {
    "syncSchedule": ("syncline_schedule", "SYNCLINE_SCHEDULE"),
    "reconcileSchedule": ("syncline_reconcile_schedule", "SYNCLINE_RECONCILE_SCHEDULE"),
    "reconcileDailyAllowance": ("syncline_reconcile_daily_allowance", "SYNCLINE_RECONCILE_DAILY_ALLOWANCE"),
    "checkSchedule": ("syncline_check_schedule", "SYNCLINE_CHECK_SCHEDULE"),
    "batchSize": ("syncline_batch_size", "SYNCLINE_BATCH_SIZE"),
    "maxDeliveryCount": ("syncline_max_delivery_count", "SYNCLINE_MAX_DELIVERY_COUNT"),
    "lockSeconds": ("syncline_lock_seconds", "SYNCLINE_LOCK_SECONDS"),
    "inlineRetries": ("syncline_inline_retries", "SYNCLINE_INLINE_RETRIES"),
    "sessionBuckets": ("syncline_session_buckets", "SYNCLINE_SESSION_BUCKETS"),
    "maxConcurrentSessions": ("syncline_max_concurrent_sessions", "SYNCLINE_MAX_CONCURRENT_SESSIONS"),
    "leasePartitions": ("syncline_lease_partitions", "SYNCLINE_LEASE_PARTITIONS"),
    "inboundQueueName": ("syncline_inbound_queue", "SYNCLINE_INBOUND_QUEUE"),
    "tablePrefix": ("syncline_tables.tablePrefix", "SYNCLINE_TABLES__tablePrefix"),
    "dataverseBatchSize": ("dataverse.batch_size", "DATAVERSE__BATCH_SIZE"),
    "dataverseMaxConcurrency": ("dataverse.max_concurrency", "DATAVERSE__MAX_CONCURRENCY"),
    "arcgisTokenUrl": ("arcgis.token_url", "ARCGIS__TOKEN_URL"),
    "arcgisBatchSize": ("arcgis.batch_size", "ARCGIS__BATCH_SIZE"),
    "arcgisMaxConcurrency": ("arcgis.max_concurrency", "ARCGIS__MAX_CONCURRENCY"),
    "sapSystemTimeZone": ("sap.system_time_zone", "SAP__SYSTEM_TIME_ZONE"),
    "sapPageSize": ("sap.page_size", "SAP__PAGE_SIZE"),
    "sapMaxConcurrency": ("sap.max_concurrency", "SAP__MAX_CONCURRENCY"),
    "sapBatchSize": ("sap.batch_size", "SAP__BATCH_SIZE"),
}

# Built-in role definition ids (identical in every tenant), to catch a typo in the Bicep role table.
BUILT_IN_ROLES = {
    "Azure Service Bus Data Sender": "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
    "Azure Service Bus Data Receiver": "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
    "Azure Service Bus Data Owner": "090c5cfd-751d-490a-894a-3ce6f1109419",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
}
APP_ROLES = {
    "Azure Service Bus Data Sender", "Azure Service Bus Data Receiver", "Storage Table Data Contributor",
    "Storage Blob Data Owner", "Storage Queue Data Contributor", "Key Vault Secrets User",
}

# Resource types and the API versions reviewed for them.
API_VERSIONS = {
    "Microsoft.OperationalInsights/workspaces": "2022-10-01",
    "Microsoft.Insights/components": "2020-02-02",
    "Microsoft.Storage/storageAccounts": "2023-05-01",
    "Microsoft.Storage/storageAccounts/tableServices/tables": "2023-05-01",
    "Microsoft.ServiceBus/namespaces": "2022-10-01-preview",
    "Microsoft.KeyVault/vaults": "2023-07-01",
    "Microsoft.Web/serverfarms": "2024-04-01",
    "Microsoft.Web/sites": "2024-04-01",
    "Microsoft.Web/sites/config": "2024-04-01",
    "Microsoft.Authorization/roleAssignments": "2022-04-01",
    "Microsoft.Insights/metricAlerts": "2018-03-01",
    "Microsoft.Insights/scheduledQueryRules": "2022-06-15",
    "Microsoft.Insights/workbooks": "2022-04-01",
}

METRICS = {  # the custom metrics the telemetry emits, with their dimensions
    "syncline.records_synced": {"flow", "direction"},
    "syncline.failures": {"reason"},
    "syncline.dead_letter_depth": set(),
    "syncline.cycle_duration": set(),
    "syncline.api_calls": {"system"},
    "syncline.breaker_transitions": {"system", "state"},
    "syncline.breaker_open": {"system"},
}

SECRET_TEXT = re.compile(
    r"AccountKey=|SharedAccessKey=|SharedAccessSignature|DefaultEndpointsProtocol=|InstrumentationKey=|"
    r"password\s*[=:]|sig=[A-Za-z0-9%]", re.IGNORECASE)
KEY_LISTING = re.compile(r"(^|\.)list[A-Za-z]*(Keys|Key|KeyValue|Secrets|ConnectionStrings|Credentials?)$")
SECRET_PARAM = re.compile(r"secret|password|apikey|connectionstring|accesskey|signaturekey", re.IGNORECASE)
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
KEY_VAULT_REF = re.compile(r"^@Microsoft\.KeyVault\(SecretUri=\$\{secretsUri\}\$\{secretNames\.(\w+)\}\)$")


# ----------------------------------------------------------------------------------------------------- loading


def template_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep")) + sorted(INFRA.rglob("*.bicepparam"))


@cache
def load(relative: str) -> BicepFile:
    return parse_file(INFRA / relative)


def main() -> BicepFile:
    return load("main.bicep")


def all_templates() -> list[BicepFile]:
    return [load(str(p.relative_to(INFRA))) for p in sorted(INFRA.rglob("*.bicep"))]


def resources_of(type_: str) -> list[tuple[BicepFile, Resource]]:
    return [(f, r) for f in all_templates() for r in f.resources() if r.full_type == type_]


def one(type_: str, *, existing: bool = False) -> tuple[BicepFile, Resource]:
    found = [(f, r) for f, r in resources_of(type_) if r.existing == existing]
    assert len(found) == 1, f"expected one {'existing ' if existing else ''}{type_}, found {len(found)}"
    return found[0]


def prop(resource: Resource, path: str) -> Node | None:
    node = resource.body
    for key in path.split("."):
        node = obj(node).get(key)
    return node


def app_settings() -> dict[str, Node]:
    configs = [(f, r) for f, r in resources_of("Microsoft.Web/sites/config")
               if literal(prop(r, "name")) == "appsettings"]
    assert len(configs) == 1, "the app settings must be defined once, in one sites/config 'appsettings'"
    return obj(prop(configs[0][1], "properties"))


# -------------------------------------------------------------------------------------------- the settings model


def model_settings() -> dict[str, tuple[str, type | None, object]]:
    """ENV_NAME (upper case) -> (field path, annotation, default), derived like tests/unit/test_settings.py."""
    out: dict[str, tuple[str, type | None, object]] = {}
    defaults = Settings.model_construct()
    for name, info in Settings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, sub_info in annotation.model_fields.items():
                default = getattr(getattr(defaults, name), sub)
                out[f"{name}__{sub}".upper()] = (f"{name}.{sub}", sub_info.annotation, default)
        else:
            out[name.upper()] = (name, annotation, getattr(defaults, name))
    return out


def model_field(path: str) -> FieldInfo:
    head, _, tail = path.partition(".")
    info = Settings.model_fields[head]
    if tail:
        assert isinstance(info.annotation, type)
        return info.annotation.model_fields[tail]
    return info


def model_default(path: str) -> object:
    return next(default for field, _, default in model_settings().values() if field == path)


def sample_values() -> dict[str, str]:
    return json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]


# ------------------------------------------------------------------------------------------- data-flow helper


def origins(file: BicepFile, node: Node | None) -> set[str]:
    """The main.bicep parameters an expression is computed from, following module parameters, module outputs,
    `string(...)`, interpolations and `resource.name` (enough to prove two places share one parameter)."""
    if node is None:
        return set()
    if node.type == "string":
        return set().union(*(origins(file, i.named_children[0]) for i in node.named_children
                             if i.type == "interpolation"))
    if node.type == "call_expression" and text(node.child_by_field_name("function")) == "string":
        return origins(file, call_arguments(node)[0])
    if node.type == "identifier":
        name = text(node)
        if file is main():
            return {name} if name in main().params() else set()
        caller = module_call(file)
        return origins(main(), caller.params.get(name)) if name in file.params() else set()
    if node.type == "member_expression":
        parts = text(node).split(".")
        if file is main() and len(parts) == 3 and parts[1] == "outputs":
            module = next(m for m in main().modules() if m.name == parts[0])
            target = load(module.path)
            return origins(target, target.outputs().get(parts[2]))
        if len(parts) == 2 and parts[1] == "name":
            symbol = parts[0].split("::")[-1]
            res = next(r for r in file.resources() if r.name == symbol)
            return origins(file, prop(res, "name"))
    return set()


def main_module(name: str) -> Module:
    return next(m for m in main().modules() if m.name == name)


def module_call(file: BicepFile) -> Module:
    relative = file.path.relative_to(INFRA).as_posix()
    found = [m for m in main().modules() if m.path == relative]
    assert len(found) == 1, f"{relative} must be used by exactly one module in main.bicep"
    return found[0]


# ======================================================================================================= parsing


def test_the_infra_folder_has_the_expected_templates():
    names = {p.relative_to(INFRA).as_posix() for p in template_files()}
    assert {"main.bicep", "main.bicepparam", "modules/functionapp.bicep", "modules/servicebus.bicep",
            "modules/storage.bicep", "modules/keyvault.bicep", "modules/monitoring.bicep", "modules/rbac.bicep",
            "modules/alerts.bicep", "modules/workbook.bicep"} <= names
    # Every module file is used by main.bicep (no dead template), and every module path exists.
    used = {m.path for m in main().modules()}
    assert used == {n for n in names if n.startswith("modules/")}


@pytest.mark.parametrize("path", template_files(), ids=lambda p: p.relative_to(INFRA).as_posix())
def test_template_parses_without_errors(path: Path):
    parsed = parse_file(path)
    assert parsed.root.type == "infrastructure"
    assert parsed.root.named_child_count > 0
    assert parsed.syntax_errors() == []


@pytest.mark.parametrize("broken", [
    "resource sa 'Microsoft.Storage/storageAccounts@2023-05-01' = {\n  name: 'x'\n",  # unclosed object
    "param count int = \n",                                                          # missing value
    "var x = foo(1, \n",                                                             # unclosed call
    "output o string 'x'\n",                                                         # missing '='
])
def test_the_parser_reports_broken_bicep(broken: str):
    assert parse_text(broken).syntax_errors()


def test_the_parameter_file_is_for_main_and_sets_only_its_parameters():
    params_file = load("main.bicepparam")
    assert params_file.using() == "main.bicep"
    assigned = params_file.params()
    # The lowering touched exactly the parameter assignments, nothing else.
    assert params_file.lowered_params == len(assigned) > 0
    declared = main().params()
    assert set(assigned) <= set(declared), f"unknown parameters: {set(assigned) - set(declared)}"
    required = {name for name, p in declared.items() if p.default is None}
    assert required <= set(assigned), f"required parameters missing from main.bicepparam: {required - set(assigned)}"
    for name in assigned:
        assert not declared[name].has_decorator("secure"), f"{name} is @secure(): keep it out of the example file"
    # The example repeats the Syncline defaults; they must not drift from main.bicep.
    for name, p in assigned.items():
        if name in PARAM_SETTINGS and declared[name].default is not None:
            assert literal(p.default) == literal(declared[name].default), name


# =================================================================================================== app settings


def test_every_setting_the_app_reads_is_set_in_the_function_app():
    model = set(model_settings())
    assert set(NOT_SET_IN_AZURE) <= model, f"stale entries: {set(NOT_SET_IN_AZURE) - model}"
    in_bicep = {name.upper() for name in app_settings()}
    missing = model - set(NOT_SET_IN_AZURE) - in_bicep
    assert not missing, f"settings the app reads but the Bicep does not set: {sorted(missing)}"


def test_every_app_setting_is_read_by_the_app_or_the_host():
    model = set(model_settings())
    settings = app_settings()
    unknown = {name for name in settings if name.upper() not in model} - HOST_SETTINGS
    assert not unknown, f"app settings nobody reads (typo?): {sorted(unknown)}"
    assert set(settings) >= HOST_SETTINGS
    assert not {n.upper() for n in settings} & {n.upper() for n in NOT_SET_IN_AZURE}
    assert not {n.upper() for n in settings} & FORBIDDEN_SETTINGS


def test_app_setting_names_are_spelled_as_in_the_sample():
    sample = {key.upper(): key for key in sample_values()}
    for name in app_settings():
        if name.upper() in sample:
            assert name == sample[name.upper()], f"{name} is spelled {sample[name.upper()]} in the sample"


def test_the_app_runs_the_azure_runtime_on_identity():
    settings = app_settings()
    assert literal(settings["SYNCLINE_RUNTIME"]) == "azure"
    assert literal(settings["AzureWebJobsStorage__credential"]) == "managedidentity"
    assert text(settings["AzureWebJobsStorage__accountName"]) == "storage.name"
    assert text(settings["SYNCLINE_TABLES__endpoint"]) == "storage.properties.primaryEndpoints.table"
    assert text(settings["APPLICATIONINSIGHTS_CONNECTION_STRING"]) == "appInsights.properties.ConnectionString"
    fa = load("modules/functionapp.bicep")
    assert text(settings["SYNCLINE_SERVICEBUS__fullyQualifiedNamespace"]) == "serviceBusFullyQualifiedNamespace"
    assert text(main_module("functionApp").params["serviceBusFullyQualifiedNamespace"]) == \
        "serviceBus.outputs.fullyQualifiedNamespace"
    sb_file = load("modules/servicebus.bicep")
    assert "namespace.properties.serviceBusEndpoint" in text(sb_file.outputs()["fullyQualifiedNamespace"])
    assert not fa.params()["serviceBusFullyQualifiedNamespace"].default


def key_vault_references(node: Node) -> tuple[list[str], bool]:
    """(secret keys referenced, whether every possible value is a Key Vault reference or '')."""
    if node.type == "ternary_expression":
        consequence = node.child_by_field_name("consequence")
        alternative = node.child_by_field_name("alternative")
        assert consequence is not None
        assert alternative is not None
        refs_a, ok_a = key_vault_references(consequence)
        refs_b, ok_b = key_vault_references(alternative)
        return refs_a + refs_b, ok_a and ok_b
    if node.type == "string":
        if string_value(node) == "":
            return [], True
        match = KEY_VAULT_REF.match(template(node))
        return ([match.group(1)], True) if match else ([], False)
    return [], False


def secret_settings() -> set[str]:
    return {env for env, (_, annotation, _) in model_settings().items() if annotation is SecretStr}


def test_secret_settings_are_key_vault_references():
    settings = {name.upper(): node for name, node in app_settings().items()}
    secrets = secret_settings() - NOT_KEY_VAULT - set(NOT_SET_IN_AZURE)
    assert secrets == {"SYNCLINE_WEBHOOK_SECRET", "DATAVERSE__CLIENT_SECRET", "ARCGIS__CLIENT_SECRET",
                       "ARCGIS__API_KEY", "ARCGIS__WEBHOOK_SIGNATURE_KEY", "SALESFORCE__CLIENT_SECRET",
                       "FNO__CLIENT_SECRET", "SAP__PASSWORD", "SAP__CLIENT_SECRET"}
    secret_names = obj(load("modules/functionapp.bicep").variables()["secretNames"])
    referenced: set[str] = set()
    for env in secrets:
        refs, ok = key_vault_references(settings[env])
        assert ok, f"{env} must be a Key Vault reference (or '' when its auth mode is off)"
        assert refs, f"{env} never references Key Vault"
        referenced.update(refs)
    assert referenced == set(secret_names), "every secret name is referenced, and only those"
    for env, node in settings.items():
        if env not in secrets:
            assert "@Microsoft.KeyVault" not in text(node), f"{env} is not a secret setting"


def test_every_referenced_key_vault_secret_is_documented():
    operations = (ROOT / "docs" / "operations.md").read_text()
    secret_names = obj(load("modules/functionapp.bicep").variables()["secretNames"])
    for key, node in secret_names.items():
        name = literal(node)
        assert isinstance(name, str)
        assert re.fullmatch(r"[0-9a-zA-Z-]{1,127}", name), f"{key}: invalid Key Vault secret name {name!r}"
        assert f"--name {name}" in operations, f"docs/operations.md does not say how to set the secret {name}"


# ========================================================================== one value, everywhere it is used


@pytest.mark.parametrize("param", sorted(PARAM_SETTINGS))
def test_main_parameter_defaults_equal_the_settings_model_and_the_sample(param: str):
    field_path, setting = PARAM_SETTINGS[param]
    declared = main().params()[param]
    default = literal(declared.default)
    expected = model_default(field_path)
    assert default == expected, f"{param} defaults to {default!r}, the app to {expected!r}"
    assert str(default) == sample_values()[setting].removesuffix(".0"), f"local.settings.sample.json {setting}"
    # Any value the template accepts, the model accepts.
    info = model_field(field_path)
    low_args = declared.decorator("minValue")
    high_args = declared.decorator("maxValue")
    low = literal(low_args[0]) if low_args else None
    high = literal(high_args[0]) if high_args else None
    for constraint in info.metadata:
        if isinstance(constraint, annotated_types.Ge):
            assert isinstance(low, int), f"{param} needs @minValue({constraint.ge}) or more"
            assert low >= constraint.ge, f"{param}: @minValue({low}) lets through what the app refuses"
        if isinstance(constraint, annotated_types.Gt):
            assert isinstance(low, int), f"{param} needs a @minValue above {constraint.gt}"
            assert low > constraint.gt, f"{param}: @minValue({low}) lets through what the app refuses"
        if isinstance(constraint, annotated_types.Le):
            assert isinstance(high, int), f"{param} needs @maxValue({constraint.le}) or less"
            assert high <= constraint.le, f"{param}: @maxValue({high}) lets through what the app refuses"


@pytest.mark.parametrize("param", sorted(PARAM_SETTINGS))
def test_each_setting_is_fed_by_its_main_parameter(param: str):
    _, setting = PARAM_SETTINGS[param]
    assert origins(load("modules/functionapp.bicep"), app_settings()[setting]) == {param}


def _walk(node: Node) -> list[Node]:
    return [node, *(n for child in node.named_children for n in _walk(child))]


def test_the_queue_uses_the_same_parameters_as_the_app_settings():
    sb_file, queue = one("Microsoft.ServiceBus/namespaces/queues")
    assert origins(sb_file, prop(queue, "name")) == {"inboundQueueName"}
    # The queue's own count is a backstop above the attempts, computed as shared/settings.py computes it.
    backstop = prop(queue, "properties.maxDeliveryCount")
    assert backstop is not None
    assert text(backstop) == f"min(maxDeliveryCount * {DELIVERY_BACKSTOP_FACTOR}, {MAX_QUEUE_DELIVERY_COUNT})"
    [attempts] = [n for n in _walk(backstop) if n.type == "identifier" and text(n) == "maxDeliveryCount"]
    assert origins(sb_file, attempts) == {"maxDeliveryCount"}
    assert queue_max_delivery_count(model_default("syncline_max_delivery_count")) == 10 * 10  # type: ignore[arg-type]
    assert origins(sb_file, prop(queue, "properties.lockDuration")) == {"lockSeconds"}
    assert template(prop(queue, "properties.lockDuration")) == "PT${lockSeconds}S"


def test_the_tables_use_the_table_prefix():
    storage_file, tables = one("Microsoft.Storage/storageAccounts/tableServices/tables")
    assert origins(storage_file, prop(tables, "name")) >= {"tablePrefix"}
    assert tables.loop is not None
    suffixes = {literal(n) for n in storage_file.variables()["tableSuffixes"].named_children}
    # docs/state-tables.md names the tables TableStateStore uses.
    documented = set(re.findall(r"`\{prefix\}(\w+)`", (ROOT / "docs" / "state-tables.md").read_text()))
    assert suffixes == documented
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,51}", str(literal(main().params()["tablePrefix"].default)))


def _host_json_values(data: object, wanted: set[str], path: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if key.lower() in wanted:
                found[f"{path}{key}"] = value
            found |= _host_json_values(value, wanted, f"{path}{key}.")
    return found


def test_host_json_agrees_where_it_configures_the_queue():
    host = json.loads((ROOT / "host.json").read_text())
    expected = {"queuename": model_default("syncline_inbound_queue"),
                "maxdeliverycount": model_default("syncline_max_delivery_count"),
                "tableprefix": model_default("syncline_tables.tablePrefix")}
    for key, value in _host_json_values(host, set(expected)).items():
        assert value in (expected[key.rsplit(".", 1)[-1].lower()], "%SYNCLINE_INBOUND_QUEUE%"), key


def trigger_decorators() -> dict[str, dict[str, object]]:
    """Function name -> keyword arguments of its trigger decorator, read from shared/triggers/*.py."""
    out: dict[str, dict[str, object]] = {}
    for module in (ROOT / "shared" / "triggers").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                continue
            name, kwargs = None, {}
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute):
                    if dec.func.attr == "function_name" and dec.args:
                        name = ast.literal_eval(dec.args[0])
                    elif dec.func.attr.endswith("_trigger") or dec.func.attr == "route":
                        kwargs = {k.arg: ast.literal_eval(k.value) for k in dec.keywords
                                  if k.arg and isinstance(k.value, ast.Constant)}
                        kwargs["trigger"] = dec.func.attr
            if name:
                out[name] = kwargs
    return out


def test_the_timer_schedule_comes_from_the_setting_with_the_same_default():
    functions = trigger_decorators()
    assert functions["sync_controller"]["trigger"] == "timer_trigger"
    assert functions["sync_controller"]["schedule"] == "%SYNCLINE_SCHEDULE%"
    default = literal(main().params()["syncSchedule"].default)
    assert default == model_default("syncline_schedule") == sample_values()["SYNCLINE_SCHEDULE"] == "0 */15 * * * *"
    # The "controller missing" alert waits for more than two scheduled cycles.
    minute_field = str(default).split()[1]
    period = int(minute_field.removeprefix("*/")) if minute_field.startswith("*/") else 60
    silence = literal(main().params()["controllerSilenceMinutes"].default)
    assert isinstance(silence, int)
    assert 2 * period < silence <= 3 * period


# ============================================================================================ no secret literals


def secret_problems(files: list[BicepFile]) -> list[str]:
    problems: list[str] = []
    for f in files:
        for node in walk(f.root):
            for found in SECRET_TEXT.finditer(template(node)) if node.type == "string" else ():
                problems.append(f"{f.path}:{node.start_point[0] + 1}: secret-looking text {found.group(0)!r}")
        for function, _ in calls(f.root):
            if KEY_LISTING.search(function):
                problems.append(f"{f.path}: {function}() reads keys")
        for name, p in f.params().items():
            if p.has_decorator("secure") and p.default is not None:
                problems.append(f"{f.path}: @secure() param {name} has a default")
            if SECRET_PARAM.search(name) and not p.has_decorator("secure"):
                problems.append(f"{f.path}: param {name} looks secret but is not @secure()")
        secure = {name for name, p in f.params().items() if p.has_decorator("secure")}
        for name, node in f.outputs().items():
            used = {text(n) for n in walk(node) if n.type == "identifier"}
            if used & secure or "ConnectionString" in text(node) or KEY_LISTING.search(text(node).split("(")[0]):
                problems.append(f"{f.path}: output {name} exposes a secret")
    return problems


def test_no_secret_sits_in_the_templates():
    assert secret_problems([*all_templates(), load("main.bicepparam")]) == []


def test_the_secret_check_finds_secrets():
    bad = parse_text(
        "@secure()\nparam adminPassword string = 'hunter2'\n"
        "param arcgisApiKey string\n"
        "resource sa 'Microsoft.Storage/storageAccounts@2023-05-01' existing = { name: 'x' }\n"
        "var cs = 'DefaultEndpointsProtocol=https;AccountName=x;AccountKey=${sa.listKeys().keys[0].value}'\n"
        "var sb = 'Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=abc'\n"
        "output conn string = appInsights.properties.ConnectionString\n")
    problems = "\n".join(secret_problems([bad]))
    for expected in ("adminPassword has a default", "arcgisApiKey looks secret", "listKeys", "AccountKey",
                     "SharedAccessKey", "output conn"):
        assert expected in problems


def test_local_auth_is_off_everywhere():
    _, namespace = one("Microsoft.ServiceBus/namespaces")
    assert literal(prop(namespace, "properties.disableLocalAuth")) is True
    assert literal(prop(namespace, "sku.name")) == "Standard"
    _, account = one("Microsoft.Storage/storageAccounts")
    assert literal(prop(account, "properties.allowSharedKeyAccess")) is False
    assert literal(prop(account, "properties.allowBlobPublicAccess")) is False
    _, vault = one("Microsoft.KeyVault/vaults")
    assert literal(prop(vault, "properties.enableRbacAuthorization")) is True


# ============================================================================================== role assignments


def role_table() -> tuple[BicepFile, dict[str, str]]:
    holders = [(f, f.variables()["roleIds"]) for f in all_templates() if "roleIds" in f.variables()]
    assert len(holders) == 1, "the role name -> id table must live in exactly one file"
    f, node = holders[0]
    return f, {key: str(literal(value)) for key, value in obj(node).items()}


def assigned_roles(f: BicepFile, assignment: Resource, table: dict[str, str]) -> set[str]:
    """Role names an assignment grants; fails unless its roleDefinitionId is built from the role table."""
    role_def = prop(assignment, "properties.roleDefinitionId")
    assert role_def is not None, f"{assignment.name}: no roleDefinitionId"
    assert role_def.type == "call_expression", f"{assignment.name}: roleDefinitionId {text(role_def)}"
    assert text(role_def.child_by_field_name("function")) == "subscriptionResourceId"
    kind, index = call_arguments(role_def)
    assert literal(kind) == "Microsoft.Authorization/roleDefinitions"
    assert index.type == "subscript_expression", text(index)
    assert text(index.named_children[0]) == "roleIds", text(index)
    key = index.child_by_field_name("index")
    assert key is not None
    if key.type == "string":
        names = {str(literal(key))}
    else:  # the loop variable of `[for role in [...]: ...]`
        assert assignment.loop is not None
        assert text(assignment.loop.child_by_field_name("initializer")) == text(key)
        iterable = next(c for c in assignment.loop.named_children if c.type == "array")
        names = {str(literal(n)) for n in iterable.named_children}
    unknown = names - set(table)
    assert not unknown, f"{f.path}: {assignment.name} grants roles not in the role table: {unknown}"
    return names


def test_the_role_table_holds_the_built_in_ids():
    _, table = role_table()
    assert table == {name: BUILT_IN_ROLES[name] for name in table}
    assert set(table) >= APP_ROLES


def test_every_role_assignment_uses_a_role_from_the_table():
    table_file, table = role_table()
    assignments = resources_of("Microsoft.Authorization/roleAssignments")
    assert assignments
    for_app: set[str] = set()
    for f, assignment in assignments:
        roles = assigned_roles(f, assignment, table)
        assert text(prop(assignment, "name")).startswith("guid("), f"{assignment.name}: deterministic name"
        assert prop(assignment, "properties.principalType") is not None
        if text(prop(assignment, "properties.principalId")) == "appPrincipalId":
            for_app |= roles
    assert for_app >= APP_ROLES, f"the app identity lacks {APP_ROLES - for_app}"
    assert text(module_call(table_file).params["appPrincipalId"]) == "functionApp.outputs.principalId"
    assert text(load("modules/functionapp.bicep").outputs()["principalId"]) == "site.identity.principalId"


def test_no_role_id_outside_the_table():
    table_file, _table = role_table()
    table_node = table_file.variables()["roleIds"]
    for f in all_templates():
        for node in walk(f.root):
            if node.type == "string" and GUID.match(template(node)):
                inside = f is table_file and table_node.start_byte <= node.start_byte < table_node.end_byte
                assert inside, f"{f.path}: role or other id literal {template(node)} outside the role table"


def test_the_check_rejects_a_role_outside_the_table():
    bad = parse_text(
        "resource ra 'Microsoft.Authorization/roleAssignments@2022-04-01' = {\n"
        "  name: guid('x')\n"
        "  properties: {\n"
        "    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds['Owner'])\n"
        "    principalId: appPrincipalId\n"
        "    principalType: 'ServicePrincipal'\n"
        "  }\n"
        "}\n")
    with pytest.raises(AssertionError, match="not in the role table"):
        assigned_roles(bad, bad.resources()[0], dict(BUILT_IN_ROLES))


# ============================================================================================= resources, alerts


def test_resource_types_use_reviewed_api_versions():
    for f in all_templates():
        for res in f.resources():
            if res.parent is not None and "@" not in text(res.node.named_children[1]):
                continue  # nested child resource: the parent's API version
            assert API_VERSIONS.get(res.type) == res.api_version, f"{f.path}: {res.type}@{res.api_version}"


def test_the_function_app_is_flex_consumption_python_311_with_its_own_identity():
    _, plan = one("Microsoft.Web/serverfarms")
    assert literal(prop(plan, "sku.name")) == "FC1"
    assert literal(prop(plan, "sku.tier")) == "FlexConsumption"
    assert literal(prop(plan, "properties.reserved")) is True
    _, site = one("Microsoft.Web/sites")
    assert literal(prop(site, "kind")) == "functionapp,linux"
    assert literal(prop(site, "identity.type")) == "SystemAssigned"
    assert literal(prop(site, "properties.functionAppConfig.runtime.name")) == "python"
    assert literal(prop(site, "properties.functionAppConfig.runtime.version")) == "3.11"
    storage = prop(site, "properties.functionAppConfig.deployment.storage")
    assert literal(obj(storage)["type"]) == "blobContainer"
    assert literal(obj(obj(storage)["authentication"])["type"]) == "SystemAssignedIdentity"
    assert "appSettings" not in obj(prop(site, "properties.siteConfig"))  # one source: sites/config


def test_the_queue_is_session_enabled_and_dead_letters_expired_messages():
    _, queue = one("Microsoft.ServiceBus/namespaces/queues")
    assert literal(prop(queue, "properties.requiresSession")) is True
    assert literal(prop(queue, "properties.deadLetteringOnMessageExpiration")) is True
    # Duplicate detection would swallow a replay that re-sends a dead-lettered message with its own id.
    duplicate_detection = prop(queue, "properties.requiresDuplicateDetection")
    assert duplicate_detection is None or literal(duplicate_detection) is False


def test_the_alerts_watch_dead_letters_and_the_controller():
    alerts_file = load("modules/alerts.bicep")
    assert text(module_call(alerts_file).params["actionGroupId"]) == "actionGroupId"
    assert main().params()["actionGroupId"].default is None  # required: every alert goes somewhere

    metric_alerts = [r for f, r in resources_of("Microsoft.Insights/metricAlerts")]
    assert len(metric_alerts) == 1
    criterion = prop(metric_alerts[0], "properties.criteria.allOf").named_children[0]
    criterion_props = obj(criterion)
    assert literal(criterion_props["metricName"]) == "DeadletteredMessages"
    assert literal(criterion_props["operator"]) == "GreaterThan"
    assert literal(criterion_props["threshold"]) == 0
    dimension = obj(criterion_props["dimensions"].named_children[0])
    assert literal(dimension["name"]) == "EntityName"
    assert origins(alerts_file, dimension["values"].named_children[0]) == {"inboundQueueName"}
    actions = prop(metric_alerts[0], "properties.actions")
    assert text(obj(actions.named_children[0])["actionGroupId"]) == "actionGroupId"

    rules = {template(prop(r, "name")): r for _, r in resources_of("Microsoft.Insights/scheduledQueryRules")}
    assert {"${namePrefix}-controller-missing", "${namePrefix}-controller-failed",
            "${namePrefix}-function-failures"} <= set(rules)
    variables = alerts_file.variables()
    function_name = literal(alerts_file.params()["controllerFunctionName"].default)
    assert function_name in trigger_decorators()
    assert trigger_decorators()[str(function_name)]["trigger"] == "timer_trigger"
    function_params = {"${namePrefix}-choice-drift": "checkFunctionName"}
    for name, rule in rules.items():
        if name == "${namePrefix}-breaker-opened":
            continue  # not the controller's: test_an_alert_fires_when_a_circuit_breaker_opens
        assert [text(n) for n in prop(rule, "properties.actions.actionGroups").named_children] == ["actionGroupId"]
        if name == "${namePrefix}-reconcile-drift":
            continue  # watches the reconcile timer's drift, not the controller (its own test)
        query = obj(prop(rule, "properties.criteria.allOf").named_children[0])["query"]
        query_vars = {text(n) for n in walk(query) if n.type == "identifier" and text(n) in variables}
        assert len(query_vars) == 1, text(query)
        kql = template(variables[query_vars.pop()])
        # The function name is substituted from the parameter, not typed into the query.
        param = function_params.get(name, "controllerFunctionName")
        assert "'{FUNCTION}'" in kql
        assert param in text(query)
        assert str(literal(alerts_file.params()[param].default)) not in kql
    # The choice drift alert counts the check's own error lines, written by the timer function it names.
    drift = template(variables["choiceDriftQuery"])
    assert "startswith 'choice drift:'" in drift
    assert trigger_decorators()[str(literal(alerts_file.params()["checkFunctionName"].default))]["trigger"] == \
        "timer_trigger"
    assert '"choice drift: %s' in (ROOT / "shared" / "ops" / "check.py").read_text()
    silent = template(variables["controllerSilentQuery"])
    assert "success == true" in silent
    assert "ago(silence)" in silent
    assert "succeeded == 0" in silent
    failed = template(variables["controllerFailedQuery"])
    assert "success == false" in failed
    assert "controller cycle failed" in failed
    # The log lines the queries look for are the ones the controller writes.
    controller_source = (ROOT / "shared" / "triggers" / "controller.py").read_text()
    core_source = (ROOT / "shared" / "core" / "controller" / "cycle.py").read_text()
    assert '"controller cycle %s in' in controller_source
    assert "controller cycle failed" in core_source


def test_an_alert_fires_when_a_circuit_breaker_opens():
    alerts_file = load("modules/alerts.bicep")
    rules = {template(prop(r, "name")): r for _, r in resources_of("Microsoft.Insights/scheduledQueryRules")}
    rule = rules["${namePrefix}-breaker-opened"]
    assert [text(n) for n in prop(rule, "properties.actions.actionGroups").named_children] == ["actionGroupId"]
    criterion = obj(prop(rule, "properties.criteria.allOf").named_children[0])
    assert text(criterion["query"]) == "breakerOpenedQuery"
    assert literal(criterion["operator"]) == "GreaterThan"
    assert literal(criterion["threshold"]) == 0
    dimension = obj(criterion["dimensions"].named_children[0])
    assert literal(dimension["name"]) == "system"  # one alert per system
    kql = template(alerts_file.variables()["breakerOpenedQuery"])
    assert "'circuit breaker of '" in kql
    assert "' opened until '" in kql
    assert "system" in kql
    # The log line the query parses is the one the breakers write.
    source = (ROOT / "shared" / "core" / "controller" / "breakers.py").read_text()
    assert '"circuit breaker of %s opened until %s: %s' in source
    assert "breakerOpened.id" in text(alerts_file.outputs()["alertIds"])


# ====================================================================================================== workbook


def test_the_workbook_is_loaded_from_its_json_and_charts_every_metric():
    wb_file, workbook = one("Microsoft.Insights/workbooks")
    serialized = prop(workbook, "properties.serializedData")
    assert serialized is not None
    assert serialized.type == "call_expression"
    assert text(serialized.child_by_field_name("function")) == "loadTextContent"
    json_path = wb_file.path.parent / str(literal(call_arguments(serialized)[0]))
    data = json.loads(json_path.read_text())
    assert data["version"] == "Notebook/1.0"
    queries = [item["content"]["query"] for item in data["items"] if item.get("type") == 3]
    for metric, dimensions in METRICS.items():
        using = [q for q in queries if f"name == '{metric}'" in q]
        assert using, f"no chart for {metric}"
        for dim in dimensions:
            assert any(f"customDimensions['{dim}']" in q for q in using), f"{metric}: dimension {dim} not used"
    assert any(q.startswith("traces") for q in queries)
    assert all(item["content"].get("timeContextFromParameter") == "TimeRange"
               for item in data["items"] if item.get("type") == 3)


def test_the_drift_alert_fires_on_the_drift_the_reconcile_timer_records():
    alerts_file = load("modules/alerts.bicep")
    rules = {template(prop(r, "name")): r for _, r in resources_of("Microsoft.Insights/scheduledQueryRules")}
    rule = rules["${namePrefix}-reconcile-drift"]
    criterion = obj(prop(rule, "properties.criteria.allOf").named_children[0])
    assert text(criterion["query"]) == "reconcileDriftQuery"
    assert literal(criterion["operator"]) == "GreaterThan"
    assert literal(criterion["threshold"]) == 0
    assert literal(obj(criterion["dimensions"].named_children[0])["name"]) == "flow"
    kql = template(alerts_file.variables()["reconcileDriftQuery"])
    # What the query reads is what the telemetry adapter writes (metric name, dimension, log line).
    telemetry = (ROOT / "shared" / "runtime" / "telemetry.py").read_text()
    assert "name == 'syncline.reconcile_drift'" in kql
    assert '"syncline.reconcile_drift"' in telemetry
    assert "customDimensions['flow']" in kql
    assert '{"flow": flow}' in telemetry
    assert "parse message with 'reconciliation drift ' drift:int ' in flow ' flow:string" in kql
    assert '"reconciliation drift %d in flow %s"' in telemetry
    assert "arg_max(timestamp, drift) by flow" in kql  # the latest run per flow: a clean run resolves it
    assert "drift > 0" in kql
    # The timer's schedule comes from its setting, daily by default.
    functions = trigger_decorators()
    assert functions["reconcile"]["trigger"] == "timer_trigger"
    assert functions["reconcile"]["schedule"] == "%SYNCLINE_RECONCILE_SCHEDULE%"
    default = literal(main().params()["reconcileSchedule"].default)
    assert default == model_default("syncline_reconcile_schedule") == sample_values()["SYNCLINE_RECONCILE_SCHEDULE"]
    assert default == "0 0 2 * * *"
