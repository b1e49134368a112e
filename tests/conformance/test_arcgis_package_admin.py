"""The simulator's layer admin API driven by Esri's `arcgis` package (FeatureLayer.manager), over TLS, no Syncline code.

What the package sends was read from its requests to the simulator (arcgis 2.4.4, a request log around the app):
- `FeatureLayer(url, gis).manager`: POST `<...>/rest/admin/services/<service>/FeatureServer/<layer>?f=json` (the
  manager hydrates from the admin resource: the URL is the layer's with `admin/` inserted after `/rest/`).
- `manager.add_to_definition(d)`: POST `<admin layer>/addToDefinition` (form: `addToDefinition`=JSON, `async`=false,
  `f`=json), then POST `<admin layer>/refresh`, the admin layer again and the public layer (`FeatureLayer._refresh`).
- `manager.update_definition(d)`: the same with `updateDefinition`.
Each request takes a fresh client-credentials token first (POST `/sharing/rest/oauth2/token`), as for edits.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance import _arcgis_fixtures as fx
from tests.conformance._arcgis_fixtures import Portal

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Unverified HTTPS request:urllib3.exceptions.InsecureRequestWarning"),
]

portal = fx.portal

ASSIGNMENTS = 3


def assignments(portal: Portal) -> Any:
    from arcgis.features import FeatureLayer

    return FeatureLayer(portal.layer_url(ASSIGNMENTS), gis=portal.gis())


def served_field(portal: Portal, name: str) -> dict[str, Any] | None:
    fields = assignments(portal).properties.fields
    return next((dict(f) for f in fields if f["name"] == name), None)


def test_manager_add_to_definition_adds_a_field(portal: Portal) -> None:
    layer = assignments(portal)
    answer = layer.manager.add_to_definition({"fields": [
        {"name": "CREW_NOTE", "type": "esriFieldTypeString", "alias": "Crew note", "length": 80,
         "nullable": True, "editable": True}]})
    assert answer == {"success": True}
    assert portal.sim.request_count["admin.addToDefinition"] == 1
    assert portal.sim.request_count["admin.refresh"] == 1
    assert "CREW_NOTE" in [f["name"] for f in layer.properties.fields]  # the package refreshed its properties
    got = served_field(portal, "CREW_NOTE")
    assert got is not None
    assert (got["type"], got["length"], got["alias"]) == ("esriFieldTypeString", 80, "Crew note")
    [added] = layer.edit_features(adds=[{"attributes": {"CREW_NOTE": "ladder"},
                                         "geometry": {"x": -93.1, "y": 44.9,
                                                      "spatialReference": {"wkid": 4326}}}])["addResults"]
    assert added["success"] is True


def test_manager_update_definition_sets_a_coded_value_domain(portal: Portal) -> None:
    domain = {"type": "codedValue", "name": "Priority",
              "codedValues": [{"name": "Low", "code": 1}, {"name": "Normal", "code": 2}]}
    answer = assignments(portal).manager.update_definition({"fields": [{"name": "priority", "domain": domain}]})
    assert answer == {"success": True}
    got = served_field(portal, "priority")
    assert got is not None
    assert got["domain"]["codedValues"] == domain["codedValues"]


def test_a_refused_definition_surfaces_the_services_error_and_changes_nothing(portal: Portal) -> None:
    manager = assignments(portal).manager
    with pytest.raises(Exception, match=r"Field 'status' already exists[\s\S]*\(Error Code: 400\)"):
        manager.add_to_definition({"fields": [{"name": "status", "type": "esriFieldTypeInteger"}]})
    bad = {"type": "codedValue", "name": "X", "codedValues": [{"name": "a", "code": "A"}]}
    with pytest.raises(Exception, match=r"code 'A' does not match the field type[\s\S]*\(Error Code: 400\)"):
        manager.update_definition({"fields": [{"name": "priority", "domain": bad}]})
    with pytest.raises(Exception, match="Field 'NOPE' does not exist"):
        manager.update_definition({"fields": [{"name": "NOPE", "alias": "x"}]})
    assert served_field(portal, "priority")["domain"] is None  # type: ignore[index]
