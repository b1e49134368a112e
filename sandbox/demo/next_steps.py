"""What the demo leaves for a newcomer: the settings file of its state, the next commands, and `--serve`."""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from shared.ops.commands import write_state_env


def leave_settings(workdir: Path, env: dict[str, str]) -> Path:
    """Write the demo's settings next to its state, so `syncline --state <workdir>` works on what it left."""
    return write_state_env(workdir, env)


def _syncline() -> str:
    """How to call the CLI from here: the venv's script when the demo runs from a venv, else the module."""
    script = Path(sys.executable).parent / "syncline"
    if script.exists():
        try:
            return str(script.relative_to(Path.cwd()))
        except ValueError:
            return str(script)
    return f"{Path(sys.executable).name} -m shared.cli"


def next_commands(workdir: Path, dead_letters: list[dict[str, Any]], sources: dict[str, str]) -> list[tuple[str, str]]:
    """(command, why) pairs a newcomer can try next on the demo's state; `sources` maps a flow to its source
    system (a trace starts from the dead-lettered record's own side)."""
    cli = f"{_syncline()} --state {shlex.quote(str(workdir))}"
    commands = [(f"{cli} dlq list", "the dead letters, each with the reason an operator acts on")]
    if dead_letters:
        first = dead_letters[0]
        system = sources.get(str(first["flow"]), "dataverse")
        commands.append((f"{cli} trace {system} {shlex.quote(str(first['key']))}",
                         "every hop and decision of one dead-lettered record"))
        commands.append((f"{cli} dlq replay {first['message_id']}",
                         "send it back to the queue once fixed; the next cycle takes it idempotently"))
    commands += [
        (f"{cli} status", "systems, breakers, queue depths, the last cycle and reconciliation"),
        (f"{cli} reconcile", "compare both sides of every linked pair (needs the simulators: --serve)"),
        (f"{cli} check", "live option sets and coded-value domains against every value map (--serve)"),
    ]
    return commands


def print_next_steps(console: Console, commands: list[tuple[str, str]], *, serving: bool, runtime: str) -> None:
    console.rule("next: try the operator's toolkit on what the demo left")
    for command, why in commands:
        console.print(f"  [bold]{command}[/bold]\n      {why}", soft_wrap=True)
    if serving:
        console.print("the simulators keep running for these commands (in another shell); Ctrl-C stops them")
    elif runtime == "azure":
        console.print("the azure runtime's emulators stop with the demo: run it with --serve to use these")
    else:
        console.print("trace and dlq work on the state left behind; for status, reconcile and check, run the "
                      "demo with --serve (the simulators then keep running until Ctrl-C)")


async def serve_until_stopped() -> None:
    """Block until SIGINT or SIGTERM (the simulators and the functions host keep serving meanwhile)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("stopping the simulators", file=sys.stderr)
