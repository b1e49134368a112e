"""The `syncline` command line: run, status, dlq list/replay, validate, docs, webhook registration (over shared.ops)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

import typer
from rich.console import Console
from rich.table import Table

from shared.core.errors import SyncError
from shared.progress import progress_bar

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
def run(no_poll: bool = typer.Option(False, "--no-poll", help="Only drain the queue.")) -> None:
    """Run one controller cycle against the configured systems."""
    from shared.ops import run_cycle

    with progress_bar(console) as progress:
        task = progress.add_task("messages", total=None)
        result = _run(lambda: run_cycle(
            poll=not no_poll, progress=lambda phase, n: progress.update(task, advance=n, description=phase)))
    console.print_json(json.dumps(result))
    raise typer.Exit(0 if result["outcome"] == "ok" else 1)


@app.command()
def status() -> None:
    """Health of the configured systems, queue depths and the last cycle."""
    from shared.ops import system_status

    console.print_json(json.dumps(_run(system_status), default=str))


@dlq_app.command("list")
def dlq_list(limit: int = typer.Option(50, min=1, max=1000)) -> None:
    """List dead-lettered messages with their reasons."""
    from shared.ops import list_dead_letters

    rows = _run(lambda: list_dead_letters(limit))
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

    from shared.ops import replay

    replayed = _run(lambda: replay(None if all_ else message_id))
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


@app.command()
def docs(
    flows: Path = typer.Option(Path("flows"), "--flows", help="A spec file or a directory of specs."),
    output: Path = typer.Option(Path("docs/flows.md"), "--output", help="The Markdown file to write."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 when the file is not current."),
) -> None:
    """Generate the flow inventory (docs/flows.md) from the flow specs."""
    from shared.ops.inventory import generate

    try:
        text = generate(flows)
    except SyncError as exc:
        console.print(f"[red]error[/red] {exc.reason}: {exc.detail}", soft_wrap=True)
        raise typer.Exit(2) from None
    if check:
        current = output.read_text(encoding="utf-8") if output.is_file() else None
        if current != text:
            console.print(f"{output} is not current: run `syncline docs --flows {flows} --output {output}`",
                          soft_wrap=True)
            raise typer.Exit(1)
        console.print(f"{output} is current")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    console.print(f"wrote {output} ({text.count(chr(10))} lines)")


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

    from shared.ops import register_dataverse

    _print_registration(_run(lambda: register_dataverse(
        endpoint_url=endpoint_url, auth=cast("DataverseAuth", auth), secret_from_env=secret_from_env, name=name,
        warn=lambda text: console.print(f"[yellow]warning[/yellow] {text}"))))


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
    from shared.ops import register_arcgis

    _print_registration(_run(lambda: register_arcgis(endpoint_url=endpoint_url, secret_from_env=secret_from_env,
                                                     name=name, change_types=change_type)))


@app.command()
def trace(
    system: str = typer.Argument(..., help="The system the key belongs to: dataverse, arcgis, fno, salesforce, sap."),
    key: str = typer.Argument(..., help="The record's key there (a Dataverse id, an ArcGIS GlobalID, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the trace as JSON (see README, syncline trace)."),
    limit: int = typer.Option(200, "--limit", min=1, max=10_000, help="The newest N hops at most."),
) -> None:
    """Every hop and decision for one record, oldest first; where it is now; its keys on every side."""
    from rich.markup import escape

    from shared.ops.trace import TraceInputError, trace_command
    from shared.trace_view import not_found_line, render_trace

    try:
        found = _run(lambda: trace_command(system, key, limit=limit))
    except TraceInputError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        console.print_json(json.dumps(found.to_json()))
    else:
        render_trace(console, found)
    if not found.found:
        if as_json:
            print(not_found_line(found), file=sys.stderr)
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
