"""`syncline --state DIR`: the commands work on the state a demo (or an embedded runtime) left in DIR."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from shared.bootstrap import build_services
from shared.cli import app
from shared.core.envelope import ChangeEnvelope
from shared.ops.commands import use_state, write_state_env
from shared.settings import Settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def restore_environment(monkeypatch):
    # use_state sets process variables, as the CLI must; each test gets the environment back.
    saved = dict(os.environ)
    for name in ("SYNCLINE_STATE_DIR", "DATAVERSE__URL", "ARCGIS__SERVICE_URL", "SYNCLINE_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _dead_letter_one(state_dir) -> None:
    async def go() -> None:
        os.environ["SYNCLINE_STATE_DIR"] = str(state_dir)
        services = build_services(Settings())
        env = ChangeEnvelope(flow="nope", operation="update", source_system="arcgis", source_table="X",
                             source_key="{K-1}", payload={})
        await services.queue.send([env.to_message()])
        await services.controller.run_cycle(poll=False)
        await services.aclose()
        del os.environ["SYNCLINE_STATE_DIR"]

    asyncio.run(go())


def test_a_demo_directory_s_settings_file_points_the_commands_at_its_state(tmp_path):
    demo = tmp_path / "demo"
    _dead_letter_one(demo / "state")
    written = write_state_env(demo, {"SYNCLINE_RUNTIME": "embedded", "SYNCLINE_STATE_DIR": str(demo / "state")})
    assert stat.S_IMODE(written.stat().st_mode) == 0o600  # it carries credentials in a real demo

    without = runner.invoke(app, ["dlq", "list", "--json"])
    assert without.exit_code == 0
    assert json.loads(without.stdout) == []  # the default state knows nothing of the demo

    listed = runner.invoke(app, ["--state", str(demo), "dlq", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)  # the "state: ..." remark goes to stderr, stdout stays JSON
    assert [(r["flow"], r["key"], r["reason"]) for r in rows] == [("nope", "{K-1}", "UNKNOWN_FLOW")]
    assert "settings from syncline.env" in listed.stderr

    text = runner.invoke(app, ["--state", str(demo), "dlq", "list"])
    assert rows[0]["message_id"] in text.stdout
    assert "UNKNOWN_FLOW" in text.stdout


def test_a_plain_directory_is_an_embedded_state(tmp_path):
    _dead_letter_one(tmp_path / "state")
    status = runner.invoke(app, ["--state", str(tmp_path / "state"), "status"])
    assert json.loads(status.stdout)["queue"]["dead_letter"] == 1
    assert "(embedded runtime)" in status.stderr


def test_a_missing_directory_or_a_broken_settings_file_is_one_line_and_changes_nothing(tmp_path):
    missing = runner.invoke(app, ["--state", str(tmp_path / "nope"), "status"])
    assert missing.exit_code == 2
    assert "no such directory" in missing.output
    assert "Traceback" not in missing.output
    assert not (tmp_path / "nope").exists()

    (tmp_path / "syncline.env").write_text("# fine\nSYNCLINE_RUNTIME=embedded\nthis line has no equals sign\n")
    broken = runner.invoke(app, ["--state", str(tmp_path), "status"])
    assert broken.exit_code == 2
    assert "syncline.env:3: expected NAME=VALUE" in broken.output
    assert "SYNCLINE_RUNTIME" not in os.environ  # nothing applied from a file that is not whole


def test_a_multi_line_value_is_refused_rather_than_written_half(tmp_path):
    with pytest.raises(ValueError, match="spans lines"):
        write_state_env(tmp_path, {"A": "one\ntwo"})
    assert use_state(tmp_path).endswith("(embedded runtime)")  # nothing was written
