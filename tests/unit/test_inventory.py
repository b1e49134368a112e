"""The flow inventory: docs/flows.md is what `syncline docs` generates now, and says what the specs and code say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.bootstrap import load_flows
from shared.cli import app
from shared.core.controller.polling import _Polling
from shared.core.errors import REASONS
from shared.mapping.spec import load_spec
from shared.ops import intake
from shared.ops.inventory import POLLS, RUNBOOK, WEBHOOKS, generate, reasons, render_inventory, spec_files, trigger

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "flows"
DOC = ROOT / "docs" / "flows.md"
runner = CliRunner()


@pytest.fixture(scope="module")
def doc() -> str:
    return generate(FLOWS)


def _section(doc: str, flow: str) -> str:
    """The text of one flow's section (up to the next flow, flow set or value-map heading)."""
    start = doc.index(f"\n### {flow}\n")
    end = doc.find("\n### ", start + 1)
    return doc[start:end if end != -1 else len(doc)]


def test_committed_inventory_is_current(doc: str) -> None:
    assert DOC.read_text(encoding="utf-8") == doc, "docs/flows.md is stale: run `syncline docs`"


def test_a_changed_flow_makes_the_committed_inventory_stale(tmp_path: Path) -> None:
    for path in spec_files(FLOWS):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    spec = tmp_path / "dot-signs.yaml"
    text = spec.read_text(encoding="utf-8")
    changed = text.replace("{source: dot_route, target: ROUTE, owner: dataverse}",
                           "{source: dot_route, target: ROUTE, transform: upper, owner: dataverse}", 1)
    assert changed != text
    spec.write_text(changed, encoding="utf-8")
    regenerated = generate(tmp_path)
    assert regenerated != DOC.read_text(encoding="utf-8")
    assert "| `dot_route` | `ROUTE` | upper | - | - | dataverse | no |" in regenerated


def test_output_is_deterministic_and_in_spec_order(doc: str) -> None:
    assert generate(FLOWS) == doc
    files = spec_files(FLOWS)
    assert [f.name for f in files] == sorted(f.name for f in files)
    names = [f.name for path in files for f in load_spec(path).flows]
    positions = [doc.index(f"\n### {name}\n") for name in names]
    assert positions == sorted(positions)
    assert len(names) == len(load_flows(FLOWS).flows)  # every flow of the merged set, once


def test_a_field_shows_its_transform_args_value_map_and_owner(doc: str) -> None:
    section = _section(doc, "sign_assets_to_field")
    assert "| `dot_mutcdcode` | `MUTCD_CODE` | upper | - | - | dataverse | yes |" in section
    assert "| `dot_milepost` | `MILEPOST` | round | digits=3 | - | dataverse | no |" in section
    assert "| `dot_condition` | `CONDITION` | choice | - | `sign_condition` | arcgis | no |" in section
    assert "| latlon_to_point | `dot_latitude` | `dot_longitude` | 102100 | shared | yes |" in section
    assert "target field `DV_ID`; write_back `dot_arcgisglobalid`" in section
    assert "| Mode | direct |" in section


def test_value_maps_and_cascades_appear(doc: str) -> None:
    assert "| Regulatory | `100000000` | `REG` |" in doc
    assert "| Unassigned | `100000006` | `0` |" in doc
    cascade = doc[doc.index("#### `close_tasks_with_work_order`"):]
    assert ("| arcgis | `STATUS` in ['COMPLETED', 'CLOSED'] | `WO_GUID` | `STATUS` = `CLOSED` | "
            "`STATUS` in ['DONE', 'CANCELLED', 'CLOSED'] |") in cascade


def test_lines_scope_and_ensure_appear(doc: str) -> None:
    section = _section(doc, "opportunities_to_fno")
    assert "| Scope (`when`) | StageName in ['Closed Won'] |" in section
    assert ("| `AccountId` | `OrderingCustomerAccountNumber` | [`accounts_to_fno`](#accounts_to_fno) | - | yes | yes "
            "| 1 |") in section
    assert "| Source lines | `OpportunityLineItem` (key `Id`, header in `OpportunityId`) |" in section


def test_parent_missing_only_for_flows_with_lookups(doc: str) -> None:
    flowset = load_flows(FLOWS)
    with_lookups = [f for f in flowset.flows if f.lookups or (f.lines and f.lines.lookups)]
    without = [f for f in flowset.flows if f not in with_lookups]
    assert with_lookups
    assert without
    for flow in with_lookups:
        assert "PARENT_MISSING" in reasons(flow)
        assert "(operations.md#parent_missing)" in _section(doc, flow.name)
    for flow in without:
        assert "PARENT_MISSING" not in reasons(flow)
        assert "PARENT_MISSING" not in _section(doc, flow.name)
    # The generic reasons are listed for every flow; a flow without choices has no UNMAPPED_CHOICE.
    for flow in flowset.flows:
        assert {"TARGET_REJECTED", "MAX_DELIVERY_EXCEEDED"} <= set(reasons(flow))
        has_choice = any(fm.value_map for fm in [*flow.fields, *(flow.lines.fields if flow.lines else [])])
        assert ("UNMAPPED_CHOICE" in reasons(flow)) == has_choice


def _slug(heading: str) -> str:
    # GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_runbook_link_has_its_anchor(doc: str) -> None:
    runbook = (ROOT / "docs" / RUNBOOK).read_text(encoding="utf-8")
    anchors = {_slug(m) for m in re.findall(r"^#+ (.+)$", runbook, flags=re.MULTILINE)}
    links = set(re.findall(rf"\]\({re.escape(RUNBOOK)}#([^)]+)\)", doc))
    assert links, "no runbook links"
    assert links <= anchors, f"missing anchors in docs/{RUNBOOK}: {sorted(links - anchors)}"
    assert all(code in REASONS for code in (link.upper() for link in links))


def test_every_flow_link_in_the_inventory_resolves(doc: str) -> None:
    headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", doc, flags=re.MULTILINE)}
    assert set(re.findall(r"\]\(#([^)]+)\)", doc)) <= headings


def test_trigger_tables_match_the_code() -> None:
    # Webhooks: one intake handler per system; polls: every system the composition root registers as a
    # ChangeSource implements changes_since, and the controller polls queue-mode flows only.
    for system in WEBHOOKS:
        handlers = [name for name in dir(intake) if name.startswith("handle_") and system in name]
        assert handlers, f"no intake handler for {system}"
    bootstrap = (ROOT / "shared" / "bootstrap.py").read_text(encoding="utf-8")
    assert set(re.findall(r'sources\["(\w+)"\]', bootstrap)) == set(POLLS)
    assert 'f.mode == "queue"' in Path(_Polling.poll.__code__.co_filename).read_text(encoding="utf-8")
    flowset = load_flows(FLOWS)
    direct = next(f for f in flowset.flows if f.mode == "direct")
    queued = next(f for f in flowset.flows if f.mode == "queue" and f.source.system == "sap")
    assert "poll" not in trigger(direct)
    assert "webhook" in trigger(direct)
    assert POLLS["sap"] in trigger(queued)
    assert WEBHOOKS["sap"] in trigger(queued)


def test_render_escapes_pipes_in_cells() -> None:
    flowset = load_spec(FLOWS / "dot-signs.yaml")
    flow = flowset.flows[0].model_copy(update={"description": "x"})
    odd = flowset.model_copy(update={"flows": [flow], "cascades": [],
                                     "value_maps": {"m": [{"label": "a|b", "dataverse": 1, "arcgis": "A"}]}})
    text = render_inventory([("odd.yaml", odd)])
    assert "| a\\|b | `1` | `A` |" in text
    assert "### Cascades\n\nNone." in text


def test_cli_check_and_write(tmp_path: Path) -> None:
    out = tmp_path / "flows.md"
    missing = runner.invoke(app, ["docs", "--flows", str(FLOWS), "--output", str(out), "--check"])
    assert missing.exit_code == 1
    assert "is not current" in missing.output
    assert not out.exists()
    wrote = runner.invoke(app, ["docs", "--flows", str(FLOWS), "--output", str(out)])
    assert wrote.exit_code == 0, wrote.output
    assert out.read_text(encoding="utf-8") == DOC.read_text(encoding="utf-8")
    current = runner.invoke(app, ["docs", "--flows", str(FLOWS), "--output", str(out), "--check"])
    assert current.exit_code == 0
    assert "is current" in current.output
    out.write_text(out.read_text(encoding="utf-8").replace("| Mode | direct |", "| Mode | queue |", 1))
    stale = runner.invoke(app, ["docs", "--flows", str(FLOWS), "--output", str(out), "--check"])
    assert stale.exit_code == 1
    assert "is not current" in stale.output
    assert "syncline docs" in stale.output


def test_cli_unknown_flows_path_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["docs", "--flows", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.md")])
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "SPEC_INVALID" in result.output
    assert "no flow spec" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.md").exists()
