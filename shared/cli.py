"""The `syncline` command line: demo, run, status, dlq list/replay, validate, webhook registration."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shared.core.errors import SyncError

if TYPE_CHECKING:
    from shared.ops import DataverseAuth, RegistrationReport

app = typer.Typer(help="Syncline: governed sync between Dynamics 365, ArcGIS Online, Salesforce and SAP.",
                  no_args_is_help=True, add_completion=False)
dlq_app = typer.Typer(help="Inspect and replay the dead-letter queue.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
dataverse_app = typer.Typer(help="Dataverse (Dynamics 365) administration.", no_args_is_help=True)
app.add_typer(dataverse_app, name="dataverse")
arcgis_app = typer.Typer(help="ArcGIS Online feature-service administration.", no_args_is_help=True)
app.add_typer(arcgis_app, name="arcgis")
console = Console()
T = TypeVar("T")


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine; a SyncError or a settings error becomes a one-line message and exit code 2."""
    try:
        return asyncio.run(factory())  # type: ignore[arg-type]
    except SyncError as exc:
        console.print(f"[red]error[/red] {exc.reason}: {exc.detail}")
        raise typer.Exit(2) from None
    except ValueError as exc:  # pydantic settings errors are ValueErrors
        console.print(f"[red]configuration error[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def demo(
    report: Path = typer.Option(Path("reports/demo-report.json"), help="Where to write the JSON report."),
    signs: int = typer.Option(2000, min=10, help="Sign assets to seed."),
    work_orders: int = typer.Option(500, min=5, help="Work orders to seed."),
    runtime: str = typer.Option("embedded", help="embedded (SQLite) or azure (Azurite + local Service Bus broker)."),
    customers: int = typer.Option(1000, min=5, help="F&O customers per legal entity (products: half as many)."),
    opportunities: int = typer.Option(300, min=5, help="Salesforce opportunities (orders: a fifth as many)."),
    sap_orders: int = typer.Option(40, min=1, help="Dynamics orders for SAP."),
    sales: bool = typer.Option(True, help="Include F&O, Salesforce and Customer 360."),
    sap: bool = typer.Option(True, help="Include SAP S/4HANA."),
) -> None:
    """Start the simulators, seed, deliver webhooks, run controller cycles, reconcile and report."""
    from sandbox.demo import run_demo

    if runtime not in ("embedded", "azure"):
        console.print(f"[red]error[/red] --runtime must be embedded or azure, not {runtime!r}")
        raise typer.Exit(2)
    ok = asyncio.run(run_demo(console, report_path=report, signs=signs, work_orders=work_orders, runtime=runtime,
                              customers=customers, opportunities=opportunities, sap_orders=sap_orders, sales=sales,
                              sap=sap))
    raise typer.Exit(0 if ok else 1)


@app.command()
def run(no_poll: bool = typer.Option(False, "--no-poll", help="Only drain the queue.")) -> None:
    """Run one controller cycle against the configured systems."""

    async def go() -> dict[str, Any]:
        from shared.bootstrap import build_services

        services = build_services()
        with _progress() as progress:
            task = progress.add_task("messages", total=None)
            services.controller.progress = lambda phase, n: progress.update(task, advance=n, description=phase)
            try:
                report = await services.controller.run_cycle(poll=not no_poll)
            finally:
                await services.aclose()
        return report.__dict__

    result = _run(go)
    console.print_json(json.dumps(result))
    raise typer.Exit(0 if result["outcome"] == "ok" else 1)


@app.command()
def status() -> None:
    """Health of the configured systems, queue depths and the last cycle."""

    async def go() -> dict[str, Any]:
        from shared.bootstrap import build_services
        from shared.ops import health

        services = build_services()
        try:
            return await health(services)
        finally:
            await services.aclose()

    console.print_json(json.dumps(_run(go), default=str))


@dlq_app.command("list")
def dlq_list(limit: int = typer.Option(50, min=1, max=1000)) -> None:
    """List dead-lettered messages with their reasons."""

    async def go() -> list[dict[str, Any]]:
        from shared.bootstrap import build_services

        services = build_services()
        try:
            messages = await services.queue.peek_dead_letters(limit)
        finally:
            await services.aclose()
        return [{"message_id": m.message_id, "flow": m.application_properties.get("flow"),
                 "key": m.application_properties.get("key"), "reason": m.dead_letter_reason,
                 "description": m.dead_letter_description, "enqueued_at": m.enqueued_at.isoformat()}
                for m in messages]

    rows = _run(go)
    table = Table("message id", "flow", "key", "reason", "description", title=f"dead letters ({len(rows)})")
    for r in rows:
        table.add_row(r["message_id"], str(r["flow"]), str(r["key"]), str(r["reason"]), str(r["description"]))
    console.print(table)


@dlq_app.command("replay")
def dlq_replay(
    message_id: str = typer.Argument(None, help="Replay one message by id."),
    all_: bool = typer.Option(False, "--all", help="Replay every dead-lettered message."),
) -> None:
    """Send dead-lettered messages back to the queue; the next cycle processes them idempotently."""
    if not message_id and not all_:
        console.print("[red]error[/red] give a message id or --all")
        raise typer.Exit(2)

    async def go() -> list[str]:
        from shared.bootstrap import build_services
        from shared.ops import replay_dead_letters

        services = build_services()
        try:
            return await replay_dead_letters(services, message_id=None if all_ else message_id)
        finally:
            await services.aclose()

    replayed = _run(go)
    if message_id and not all_ and not replayed:
        console.print(f"[red]error[/red] no dead-lettered message with id {message_id}")
        raise typer.Exit(2)
    console.print(f"replayed {len(replayed)} message(s): {', '.join(replayed) or '-'}")


@app.command()
def validate(path: Path = typer.Argument(Path("flows"), help="A spec file or a directory of specs.")) -> None:
    """Check flow specs: schema, references, transforms, value maps and field ownership."""
    from shared.bootstrap import load_flows

    try:
        flowset = load_flows(path)
    except SyncError as exc:
        console.print(f"[red]invalid[/red]\n{exc.detail}")
        raise typer.Exit(1) from None
    table = Table("flow", "entity", "source", "target", "mode", "fields", title=f"{flowset.name}: valid")
    for f in flowset.flows:
        table.add_row(f.name, f.entity, f"{f.source.system}:{f.source.table}", f"{f.target.system}:{f.target.table}",
                      f.mode, str(len(f.fields)))
    console.print(table)


def _secret(env_name: str | None, configured: str, what: str) -> str:
    """A secret from the named environment variable, else the configured setting; secrets are never CLI args."""
    if env_name:
        value = os.environ.get(env_name, "")
        if not value:
            raise ValueError(f"environment variable {env_name} (--secret-from-env) is not set or empty")
        return value
    if not configured:
        raise ValueError(f"no {what} configured; set it or pass --secret-from-env NAME")
    return configured


def _print_registration(report: RegistrationReport) -> None:
    colours = {"created": "green", "updated": "yellow", "unchanged": "dim"}
    counts = report.counts()
    table = Table("kind", "name", "action", "detail", title=f"{report.system} webhook registration: "
                  f"{counts['created']} created, {counts['updated']} updated, {counts['unchanged']} unchanged")
    for item in report.items:
        colour = colours[item.action]
        table.add_row(item.kind, item.name, f"[{colour}]{item.action}[/{colour}]", item.detail)
    console.print(table)


@dataverse_app.command("register-webhook")
def dataverse_register_webhook(
    endpoint_url: str = typer.Option(..., "--endpoint-url", help="The function URL including the route, e.g. "
                                     "https://<app>.azurewebsites.net/api/webhooks/dataverse?code=<function key>."),
    auth: str = typer.Option("header", "--auth", help="header: x-syncline-key header (SYNCLINE_WEBHOOK_SECRET); "
                             "webhookkey or querystring: ?code=<secret> (the function key)."),
    secret_from_env: str = typer.Option(None, "--secret-from-env", metavar="NAME",
                                        help="Environment variable holding the secret. Default with --auth header: "
                                             "the SYNCLINE_WEBHOOK_SECRET setting."),
    name: str = typer.Option("Syncline", "--name", help="Service endpoint name and step name prefix."),
) -> None:
    """Register (or bring up to date) the Dataverse webhook: service endpoint, steps and images per source table."""
    if auth not in ("header", "webhookkey", "querystring"):
        console.print(f"[red]error[/red] --auth must be header, webhookkey or querystring, not {auth!r}")
        raise typer.Exit(2)

    async def go() -> RegistrationReport:
        from shared.bootstrap import build_services
        from shared.ops import register_dataverse_webhook
        from shared.settings import Settings

        settings = Settings()
        configured = settings.syncline_webhook_secret.get_secret_value()
        if auth != "header" and not secret_from_env:
            raise ValueError(f"--auth {auth} sends the function key as ?code=: pass --secret-from-env NAME")
        secret = _secret(secret_from_env, configured if auth == "header" else "", "SYNCLINE_WEBHOOK_SECRET")
        if auth != "header" and configured:
            console.print("[yellow]warning[/yellow] SYNCLINE_WEBHOOK_SECRET is set, so the function also expects "
                          f"an x-syncline-key header, which --auth {auth} does not send")
        services = build_services(settings)
        try:
            return await register_dataverse_webhook(services, endpoint_url=endpoint_url,
                                                    auth=cast("DataverseAuth", auth), secret=secret, name=name)
        finally:
            await services.aclose()

    _print_registration(_run(go))


@arcgis_app.command("register-webhook")
def arcgis_register_webhook(
    endpoint_url: str = typer.Option(..., "--endpoint-url", help="The function URL including the route, e.g. "
                                     "https://<app>.azurewebsites.net/api/webhooks/arcgis?code=<function key>."),
    secret_from_env: str = typer.Option(None, "--secret-from-env", metavar="NAME",
                                        help="Environment variable holding the signature key. Default: the "
                                             "ARCGIS__WEBHOOK_SIGNATURE_KEY setting."),
    name: str = typer.Option("Syncline", "--name", help="Webhook name."),
    change_type: list[str] = typer.Option(None, "--change-type", help="Event to subscribe to (repeatable). "
                                          "Default: FeaturesCreated, FeaturesUpdated, FeaturesDeleted, "
                                          "AttachmentsCreated."),
) -> None:
    """Register (or bring up to date) the feature-service webhook, signed with the signature key."""

    async def go() -> RegistrationReport:
        from shared.bootstrap import build_services
        from shared.connectors.arcgis import ArcGISFeatureServiceClient
        from shared.ops import DEFAULT_CHANGE_TYPES, register_arcgis_webhook
        from shared.settings import Settings

        settings = Settings()
        key = _secret(secret_from_env, settings.arcgis.webhook_signature_key.get_secret_value(),
                      "ARCGIS__WEBHOOK_SIGNATURE_KEY")
        services = build_services(settings)
        try:
            client = services.sinks.get("arcgis")
            if not isinstance(client, ArcGISFeatureServiceClient):
                raise ValueError("ArcGIS is not configured (ARCGIS__SERVICE_URL is empty)")
            return await register_arcgis_webhook(client, hook_url=endpoint_url, signature_key=key, name=name,
                                                 change_types=tuple(change_type or DEFAULT_CHANGE_TYPES))
        finally:
            await services.aclose()

    _print_registration(_run(go))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
