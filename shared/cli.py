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
from rich import box
from rich.console import Console
from rich.padding import Padding
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
notes = Console(stderr=True)
"""Side remarks (which state a command uses) go to stderr: stdout stays parseable with --json."""
T = TypeVar("T")


@app.callback()
def _options(
    state: Path | None = typer.Option(None, "--state", metavar="DIR", help="Work on the state in DIR: a directory the "
                               "demo left (its syncline.env points every command at the demo's state and "
                               "simulators), or an embedded runtime's state directory."),
) -> None:
    if state is None:
        return
    from shared.ops.commands import use_state

    try:
        notes.print(use_state(state), style="dim")
    except ValueError as exc:
        console.print(f"[red]error[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None


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
def dlq_list(limit: int = typer.Option(50, min=1, max=1000),
             as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table.")) -> None:
    """List dead-lettered messages with their reasons."""
    from shared.ops import list_dead_letters

    rows = _run(lambda: list_dead_letters(limit))
    if as_json:
        console.print_json(json.dumps(rows))
        return
    console.print(f"[bold]dead letters ({len(rows)})[/bold]")
    # One block per message, ids and keys whole: they are what an operator copies into `dlq replay` and `trace`,
    # and a five-column table squeezes the description into a sliver on an 80-column terminal.
    for r in rows:
        console.print(f"[bold]{r['message_id']}[/bold]  {r['reason']}  {r['enqueued_at']}", soft_wrap=True)
        console.print(f"  flow {r['flow']}  key {r['key']}", soft_wrap=True)
        console.print(Padding(str(r["description"]), (0, 0, 0, 4)))


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
    table = Table(title=f"{flowset.name}: valid", box=box.SIMPLE_HEAD)
    table.add_column("flow", no_wrap=True)  # the name an operator looks up: whole, on one line
    for column in ("entity", "source", "target", "mode", "fields"):
        table.add_column(column, overflow="fold")
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
def load(
    flow: str = typer.Argument(..., help="The flow to load (see `syncline validate`)."),
    since: str = typer.Option(None, "--since", metavar="DATE",
                              help="Only records modified on or after DATE (YYYY-MM-DD or an ISO date-time, UTC)."),
    restart: bool = typer.Option(False, "--restart", help="Start over instead of resuming from the checkpoint."),
    json_: bool = typer.Option(False, "--json", help="Print the report as JSON only (no progress bar)."),
) -> None:
    """Initial load of one flow: every source record (or those modified since DATE) through the engine, resumable."""
    from shared.ops.load import LoadBusyError, LoadProgress, run_load

    position = [0]

    def show(text: str) -> None:
        if not json_:
            console.print(text, soft_wrap=True)

    with progress_bar(console) as bar:
        task = bar.add_task(flow, total=None, visible=not json_)

        def advance(p: LoadProgress) -> None:
            position[0] = p.position
            bar.update(task, completed=p.position,
                       description=f"{p.flow}: {p.loaded} loaded, {p.rate:,.0f} records/s")

        try:
            report = _run(lambda: run_load(flow, since=since, restart=restart, max_seconds=None, progress=advance,
                                           announce=show))
        except LoadBusyError as exc:
            console.print(f"[red]error[/red] {exc}", soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print(f"interrupted after record {position[0]}; resume with `syncline load {flow}`",
                          soft_wrap=True)
            raise typer.Exit(130) from None
    if json_:
        console.print_json(json.dumps(report.as_dict()))
    else:
        console.print(report.message + (f" in {report.seconds:.1f} s ({report.rate:,.0f} records/s)"
                                        if report.this_run else ""), soft_wrap=True)
    raise typer.Exit(1 if report.outcome == "paused" else 0)


@arcgis_app.command("provision")
def arcgis_provision(
    flows: Path = typer.Option(None, "--flows", help="A spec file or a directory of specs (default: SYNCLINE_FLOWS)."),
    yes: bool = typer.Option(False, "--yes", help="Apply the plan without asking."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan and the outcome as JSON (needs --yes or "
                                  "--dry-run: a script cannot answer the prompt)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; change nothing."),
    prune: bool = typer.Option(False, "--prune", help="Also remove domain codes that no value map has (records may "
                               "hold them: without --prune they are kept)."),
) -> None:
    """Create or update the layers' coded-value domains from the flows' value maps and add the fields the flows need
    (Esri's `arcgis` package: pip install 'syncline[admin]')."""
    from rich.markup import escape

    from shared.ops.provision import ProvisionError, apply_plan, provisioning
    from shared.provision_view import print_plan

    if json_out and not (yes or dry_run):
        console.print("[red]error[/red] --json needs --yes or --dry-run (a script cannot answer the prompt)")
        raise typer.Exit(2)
    try:
        with provisioning(str(flows) if flows else None, prune=prune) as (admin, plan):
            report: dict[str, object] = {"plan": plan.to_json(), "applied": [], "outcome": "dry_run"}
            if not json_out:
                print_plan(console, plan)
            if not plan.changes:
                report["outcome"] = "up_to_date" if not plan.problems else "problems"
                if not json_out:
                    console.print("layers are up to date" if not plan.problems else "nothing else to change")
            elif not dry_run:
                if not yes and not typer.confirm(f"Apply {len(plan.changes)} change(s) to {admin.service_url}?"):
                    console.print("cancelled: nothing changed")
                    raise typer.Exit(1)
                with progress_bar(console) as progress:
                    task = progress.add_task("layers", total=len({s.layer_id for s in plan.changes}))
                    done = apply_plan(admin, plan.changes, progress=lambda _: progress.advance(task))
                report["applied"] = done
                report["outcome"] = "applied"
                if not json_out:
                    console.print(f"applied {len(plan.changes)} change(s) to {len(done)} layer(s)")
    except ProvisionError as exc:
        console.print(f"[red]error[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except SyncError as exc:
        console.print(f"[red]error[/red] {exc.reason}: {escape(exc.detail)}", soft_wrap=True)
        raise typer.Exit(2) from None
    except ValueError as exc:  # pydantic settings errors are ValueErrors
        console.print(f"[red]configuration error[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    if json_out:
        console.print_json(json.dumps(report, default=str))
    raise typer.Exit(1 if plan.problems else 0)


@app.command()
def reconcile(
    flow: str = typer.Option(None, "--flow", help="Only the entity this flow syncs."),
    repair: bool = typer.Option(False, "--repair", help="Re-enqueue drifted and missing records from their owning "
                                "side and complete half-applied cascades."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compare both sides of every linked pair through the flow maps; exit 0 without drift, 1 with, 2 on error."""
    from shared.ops.reconcile_run import reconcile_command

    with progress_bar(console) as progress:
        task = progress.add_task("reconciling", total=None)
        report = _run(lambda: reconcile_command(
            flow=flow, repair=repair,
            progress=lambda what, n: progress.update(task, advance=n, description=f"pages of {what}")))
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        from shared.ops.reconcile_view import print_reconciliation

        print_reconciliation(console, report)
    raise typer.Exit(0 if report["total_drift"] == 0 else 1)


@app.command()
def check(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (for scripts)."),
    system: list[str] = typer.Option(None, "--system", help="Check only this system (repeatable)."),
    flow: list[str] = typer.Option(None, "--flow", help="Check only the fields of this flow (repeatable)."),
) -> None:
    """Compare the live choice domains (option sets, coded values, picklists, enums) with every flow's value maps.

    Exit code 1 when a value would fail, 2 when a system could not be read (and nothing else failed), 0 when clean.
    """
    from shared.ops.commands import choice_check

    with progress_bar(console) as progress:
        task = progress.add_task("choice domains", total=None)
        report = _run(lambda: choice_check(
            systems=system or None, flows=flow or None,
            progress=lambda done, total: progress.update(task, completed=done, total=total)))
    if as_json:
        console.print_json(json.dumps(report.to_dict(), default=str))
        raise typer.Exit(report.exit_code)
    if report.findings:
        from shared.ops.check_view import findings_table

        console.print(findings_table(report))
    for name, info in report.systems.items():
        if info["status"] == "unreachable":
            console.print(f"[red]unreachable[/red] {name}: {info.get('error')}")
        elif info["status"] in ("skipped", "not configured"):
            console.print(f"[dim]{info['status']}[/dim] {name}{': ' + info['reason'] if 'reason' in info else ''}")
    checked = ", ".join(f"{n} ({i['fields']} fields)" for n, i in report.systems.items() if i["status"] == "ok")
    if not report.systems:
        console.print("nothing to check: no flow of a configured system maps values (configure a system's settings)")
    elif not report.findings and report.exit_code == 0:
        console.print(f"[green]no drift[/green]: {checked or 'no system checked'}")
    else:
        console.print(f"checked: {checked or 'none'}")
    raise typer.Exit(report.exit_code)


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
