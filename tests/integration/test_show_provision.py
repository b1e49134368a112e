"""The demo's provisioning hook prints the dry-run plan against the demo's ArcGIS service and changes nothing."""

from __future__ import annotations

import io
import sys

import pytest
from rich.console import Console

from sandbox.demo.show_provision import show_provision
from shared.ops.provision import ADMIN_EXTRA_MISSING

pytestmark = pytest.mark.filterwarnings("ignore:Unverified HTTPS request:urllib3.exceptions.InsecureRequestWarning")


async def test_show_provision_prints_the_plan_and_applies_nothing(seeded, monkeypatch):
    box, _summary, services = seeded
    out = io.StringIO()
    report = await show_provision(Console(file=out, width=200), services, box)
    text = out.getvalue()
    assert "ArcGIS provisioning plan: 1 change(s) on 1 layer(s)" in text
    assert "Assignments │ priority │ create domain │ 1 Low, 2 Normal, 3 High, 4 Emergency" in text
    assert report["changes"] == 1
    assert [(s["layer"], s["field"], s["action"]) for s in report["steps"]] == \
        [("Assignments", "priority", "create domain")]
    assert box.ag.request_count["admin.updateDefinition"] + box.ag.request_count["admin.addToDefinition"] == 0

    for name in ("arcgis", "arcgis.gis", "arcgis.features"):
        monkeypatch.setitem(sys.modules, name, None)
    out = io.StringIO()
    assert await show_provision(Console(file=out, width=200), services, box) == {"skipped": ADMIN_EXTRA_MISSING}
    assert f"skipped: {ADMIN_EXTRA_MISSING}" in out.getvalue()
