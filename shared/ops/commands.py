"""Operator commands as the CLI runs them: each builds the services from the settings, does one job, closes them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.bootstrap import build_services
from shared.ops.check import CheckReport, run_check
from shared.ops.dlq import replay_dead_letters
from shared.ops.registration import (
    DEFAULT_CHANGE_TYPES,
    DataverseAuth,
    RegistrationReport,
    register_arcgis_webhook,
    register_dataverse_webhook,
)
from shared.ops.status import health
from shared.settings import Settings

STATE_ENV_FILE = "syncline.env"
"""The settings file a state directory may carry (the demo writes one): KEY=VALUE lines, # comments."""


def use_state(directory: Path) -> str:
    """Point this process's settings at the state in `directory`; returns a line saying what it did.

    A directory with a `syncline.env` (the demo's) gets every setting from it, so the commands reach the same
    state, queue and systems the demo used; any other directory is taken as an embedded runtime's state.
    """
    if not directory.is_dir():
        raise ValueError(f"--state {directory}: no such directory")
    env_file = directory / STATE_ENV_FILE
    if not env_file.is_file():
        os.environ["SYNCLINE_STATE_DIR"] = str(directory)
        return f"state: {directory} (embedded runtime)"
    values: dict[str, str] = {}
    for number, line in enumerate(env_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{env_file}:{number}: expected NAME=VALUE")
        values[name.strip()] = value.strip()
    os.environ.update(values)
    return f"state: {directory} (settings from {env_file.name}, runtime {values.get('SYNCLINE_RUNTIME', 'embedded')})"


def write_state_env(directory: Path, values: dict[str, str]) -> Path:
    """Write `values` as the directory's syncline.env, readable by its owner only (it holds credentials)."""
    for name, value in values.items():
        if "\n" in value or "\n" in name:
            raise ValueError(f"setting {name} spans lines; syncline.env holds one line per setting")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("# Written by the Syncline demo: `syncline --state DIR ...` reads it.\n")
        out.writelines(f"{name}={value}\n" for name, value in sorted(values.items()))
    return path


async def run_cycle(*, poll: bool, progress: Callable[[str, int], None]) -> dict[str, Any]:
    """One controller cycle against the configured systems; `progress` hears (phase, messages) as it drains."""
    services = build_services()
    services.controller.progress = progress
    try:
        report = await services.controller.run_cycle(poll=poll)
    finally:
        await services.aclose()
    return report.__dict__


async def system_status() -> dict[str, Any]:
    """Health of the configured systems, queue depths and the last cycle."""
    services = build_services()
    try:
        return await health(services)
    finally:
        await services.aclose()


async def list_dead_letters(limit: int) -> list[dict[str, Any]]:
    """Dead-lettered messages with their reasons, one row each."""
    services = build_services()
    try:
        messages = await services.queue.peek_dead_letters(limit)
    finally:
        await services.aclose()
    return [{"message_id": m.message_id, "flow": m.application_properties.get("flow"),
             "key": m.application_properties.get("key"), "reason": m.dead_letter_reason,
             "description": m.dead_letter_description, "enqueued_at": m.enqueued_at.isoformat()}
            for m in messages]


async def replay(message_id: str | None) -> list[str]:
    """Send one dead-lettered message (by id), or all of them (None), back to the queue; the ids replayed."""
    services = build_services()
    try:
        return await replay_dead_letters(services, message_id=message_id)
    finally:
        await services.aclose()


def secret(env_name: str | None, configured: str, what: str) -> str:
    """A secret from the named environment variable, else the configured setting; secrets are never CLI args."""
    if env_name:
        value = os.environ.get(env_name, "")
        if not value:
            raise ValueError(f"environment variable {env_name} (--secret-from-env) is not set or empty")
        return value
    if not configured:
        raise ValueError(f"no {what} configured; set it or pass --secret-from-env NAME")
    return configured


async def register_dataverse(*, endpoint_url: str, auth: DataverseAuth, secret_from_env: str | None, name: str,
                             warn: Callable[[str], None]) -> RegistrationReport:
    """Register (or bring up to date) the Dataverse webhook; `warn` hears a setting that contradicts `auth`."""
    settings = Settings()
    configured = settings.syncline_webhook_secret.get_secret_value()
    if auth != "header" and not secret_from_env:
        raise ValueError(f"--auth {auth} sends the function key as ?code=: pass --secret-from-env NAME")
    value = secret(secret_from_env, configured if auth == "header" else "", "SYNCLINE_WEBHOOK_SECRET")
    if auth != "header" and configured:
        warn("SYNCLINE_WEBHOOK_SECRET is set, so the function also expects "
             f"an x-syncline-key header, which --auth {auth} does not send")
    services = build_services(settings)
    try:
        return await register_dataverse_webhook(services, endpoint_url=endpoint_url, auth=auth, secret=value,
                                                name=name)
    finally:
        await services.aclose()


async def register_arcgis(*, endpoint_url: str, secret_from_env: str | None, name: str,
                          change_types: list[str] | None) -> RegistrationReport:
    """Register (or bring up to date) the feature-service webhook, signed with the signature key."""
    from shared.connectors.arcgis import ArcGISFeatureServiceClient

    settings = Settings()
    key = secret(secret_from_env, settings.arcgis.webhook_signature_key.get_secret_value(),
                 "ARCGIS__WEBHOOK_SIGNATURE_KEY")
    services = build_services(settings)
    try:
        client = services.sinks.get("arcgis")
        if not isinstance(client, ArcGISFeatureServiceClient):
            raise ValueError("ArcGIS is not configured (ARCGIS__SERVICE_URL is empty)")
        return await register_arcgis_webhook(client, hook_url=endpoint_url, signature_key=key, name=name,
                                             change_types=tuple(change_types or DEFAULT_CHANGE_TYPES))
    finally:
        await services.aclose()


async def choice_check(*, systems: list[str] | None, flows: list[str] | None,
                       progress: Callable[[int, int], None]) -> CheckReport:
    """The choice-domain drift check against the configured systems (see `shared.ops.check.run_check`)."""
    services = build_services()
    try:
        return await run_check(services, systems=systems, flows=flows, progress=progress)
    finally:
        await services.aclose()
