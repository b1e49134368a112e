"""The ArcGIS provisioning plan: the fields and coded values the flows need against the layers' current definitions."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.arcgis import ArcGISSimulator
from shared.bootstrap import load_flows
from shared.mapping.spec import FlowSet, parse_spec
from shared.ops.provision import LayerInfo, Plan, desired_fields, plan, updates


def spec(codes: list[Any], *, more_fields: list[dict[str, Any]] | None = None) -> FlowSet:
    """One Dataverse -> ArcGIS flow mapping `dv_kind` to Layer.KIND through a value map with `codes`."""
    return parse_spec(yaml.safe_dump({
        "spec_version": 1, "name": "t", "systems": ["dataverse", "arcgis"],
        "value_maps": {"kind_map": [{"label": f"L{c}", "dataverse": 100 + i, "arcgis": c}
                                    for i, c in enumerate(codes)]},
        "flows": [{
            "name": "out", "entity": "thing", "mode": "direct",
            "source": {"system": "dataverse", "table": "things", "key_field": "thingid"},
            "target": {"system": "arcgis", "table": "Layer", "key_field": "GlobalID", "modified_field": "EditDate"},
            "link": {"target_field": "DV_ID"},
            "fields": [{"source": "dv_kind", "target": "KIND", "transform": "choice", "value_map": "kind_map"},
                       *(more_fields or [])],
        }],
    }), source="test")


def text_field(name: str, length: int = 50, codes: list[Any] | None = None, dname: str = "Kind") -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": "esriFieldTypeString", "length": length, "domain": None}
    if codes is not None:
        out["domain"] = {"type": "codedValue", "name": dname,
                         "codedValues": [{"name": f"old {c}", "code": c} for c in codes]}
    return out


SYSTEM = [{"name": "OBJECTID", "type": "esriFieldTypeOID"}, {"name": "GlobalID", "type": "esriFieldTypeGlobalID"},
          {"name": "EditDate", "type": "esriFieldTypeDate"}, text_field("DV_ID", 38)]


def layer(*fields: dict[str, Any]) -> list[LayerInfo]:
    return [LayerInfo(0, "Layer", (*SYSTEM, *fields))]


def rows(p: Plan) -> list[tuple[str, str, str, list[Any]]]:
    return [(s.layer, s.field, s.action, [c for c, _ in s.values]) for s in p.steps]


def applied(layers: list[LayerInfo], p: Plan) -> list[LayerInfo]:
    """What the service holds after the plan's changes (addToDefinition appends, updateDefinition replaces)."""
    out = []
    for lyr in layers:
        fields = [copy.deepcopy(dict(f)) for f in lyr.fields]
        adds, domains = updates(p.changes).get(lyr.id, ([], []))
        fields.extend({**f, "domain": None} for f in adds)
        for d in domains:
            target = next(f for f in fields if f["name"].lower() == d["name"].lower())
            target["domain"] = d["domain"]
        out.append(LayerInfo(lyr.id, lyr.name, tuple(fields)))
    return out


# ------------------------------------------------------------------------------------------- examples


def test_the_dot_flows_against_the_simulators_layers_need_only_the_assignment_priority_domain() -> None:
    sim = ArcGISSimulator()
    try:
        layers = [LayerInfo(lyr.d.id, lyr.d.name, tuple(sim._layer_json(lyr)["fields"]))
                  for lyr in sim._layers.values()]
    finally:
        sim.close()
    result = plan(load_flows("flows/dot-signs.yaml"), layers)
    assert rows(result) == [("Assignments", "priority", "create domain", [1, 2, 3, 4])]
    [step] = result.steps
    assert step.definition == {"name": "priority", "domain": {
        "type": "codedValue", "name": "Priority",
        "codedValues": [{"name": "Low", "code": 1}, {"name": "Normal", "code": 2}, {"name": "High", "code": 3},
                        {"name": "Emergency", "code": 4}]}}
    assert result.problems == []
    assert plan(load_flows("flows/dot-signs.yaml"), applied(layers, result)).steps == []


def test_a_missing_field_is_added_with_a_type_from_the_codes_then_given_its_domain() -> None:
    result = plan(spec(["A", "BB"]), layer())
    assert rows(result) == [("Layer", "KIND", "add field", []), ("Layer", "KIND", "create domain", ["A", "BB"])]
    add, domain = result.steps
    assert add.definition == {"name": "KIND", "type": "esriFieldTypeString", "alias": "KIND", "nullable": True,
                              "editable": True, "length": 50}
    assert "kind_map: text codes (longest 2)" in add.detail
    assert domain.definition["domain"]["codedValues"] == [{"name": "LA", "code": "A"}, {"name": "LBB", "code": "BB"}]
    assert plan(spec([1, 2]), layer()).steps[0].definition["type"] == "esriFieldTypeInteger"


def test_field_types_come_from_the_transforms_lookups_and_link() -> None:
    fields = [{"source": "dv_when", "target": "WHEN", "transform": "date_to_epoch_ms"},
              {"source": "dv_size", "target": "SIZE_M", "transform": "feet_to_meters"},
              {"source": "dv_n", "target": "N", "transform": "integer"},
              {"source": "dv_note", "target": "NOTE", "transform": "truncate", "args": {"length": 400}},
              {"source": "dv_name", "target": "NAME"}]
    wanted = desired_fields(spec(["A"], more_fields=fields))["Layer"]
    assert {k: (v.type, v.length) for k, v in wanted.items()} == {
        "kind": ("esriFieldTypeString", 50), "when": ("esriFieldTypeDate", None),
        "size_m": ("esriFieldTypeDouble", None),
        "n": ("esriFieldTypeInteger", None), "note": ("esriFieldTypeString", 400),
        "name": ("esriFieldTypeString", 255), "dv_id": ("esriFieldTypeString", 38)}
    assert wanted["dv_id"].why == "link: the dataverse key"


def test_missing_codes_are_added_and_codes_no_map_has_are_kept_unless_pruned() -> None:
    current = layer(text_field("KIND", codes=["A", "OLD"]))
    result = plan(spec(["A", "B"]), current)
    assert rows(result) == [("Layer", "KIND", "add values", ["B"]), ("Layer", "KIND", "keep values", ["OLD"])]
    assert [s.action for s in result.changes] == ["add values"]
    assert result.steps[0].definition["domain"]["codedValues"] == [
        {"name": "old A", "code": "A"}, {"name": "old OLD", "code": "OLD"}, {"name": "LB", "code": "B"}]
    assert "--prune removes them" in result.steps[1].detail

    pruned = plan(spec(["A", "B"]), current, prune=True)
    assert rows(pruned) == [("Layer", "KIND", "add values", ["B"]), ("Layer", "KIND", "remove values", ["OLD"])]
    [(_, [domain])] = [(adds, domains) for adds, domains in updates(pruned.changes).values()]
    assert domain["domain"]["name"] == "Kind"  # the layer's domain keeps its name (and labels)
    assert domain["domain"]["codedValues"] == [{"name": "old A", "code": "A"}, {"name": "LB", "code": "B"}]


def test_a_field_that_cannot_hold_the_codes_is_a_problem_not_a_change() -> None:
    result = plan(spec([1, 2]), layer(text_field("KIND")))
    assert result.steps == []
    assert result.problems == ["Layer.KIND: a String(50) field cannot hold the codes 1, 2 of kind_map: fix the field "
                               "or the value map"]
    short = plan(spec(["LONG_CODE"]), layer(text_field("KIND", length=4)))
    assert "cannot hold the codes LONG_CODE" in short.problems[0]


def test_a_layer_the_service_lacks_is_reported() -> None:
    result = plan(spec(["A"]), [LayerInfo(0, "Other", tuple(SYSTEM))])
    assert result.steps == []
    assert result.problems == ["layer 'Layer' (flows out) is not in the feature service: provisioning adds fields and "
                               "domains, it does not create layers"]


# ------------------------------------------------------------------------------------------- properties

codes_text = st.lists(st.text("ABCDEFGHIJ_", min_size=1, max_size=8), min_size=1, max_size=8, unique=True)
codes_int = st.lists(st.integers(-5, 300), min_size=1, max_size=8, unique=True)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Any], list[LayerInfo]]:
    codes = draw(st.one_of(codes_text, codes_int))
    textual = isinstance(codes[0], str)
    pool = codes + (["ZZ", "YY"] if textual else [997, 998])
    existing = draw(st.none() | st.lists(st.sampled_from(pool), unique=True))
    state = draw(st.sampled_from(["missing", "plain", "domain"]))
    if state == "missing":
        return codes, layer()
    field = text_field("KIND") if textual else {"name": "KIND", "type": "esriFieldTypeInteger", "domain": None}
    if state == "domain" and existing:
        field["domain"] = {"type": "codedValue", "name": "Kind",
                           "codedValues": [{"name": f"old {c}", "code": c} for c in existing]}
    return codes, layer(field)


def domain_codes(layers: list[LayerInfo]) -> list[Any]:
    field = next(f for f in layers[0].fields if f["name"] == "KIND")
    return [c["code"] for c in (field.get("domain") or {}).get("codedValues", [])]


@settings(max_examples=200, deadline=None)
@given(case=cases(), prune=st.booleans())
def test_applying_the_plan_leaves_nothing_to_do_and_never_drops_a_code_unless_pruned(
        case: tuple[list[Any], list[LayerInfo]], prune: bool) -> None:
    codes, layers = case
    flowset = spec(codes)
    before = domain_codes(layers) if any(f["name"] == "KIND" for f in layers[0].fields) else []
    result = plan(flowset, layers, prune=prune)
    assert result.problems == []
    after = applied(layers, result)
    again = plan(flowset, after, prune=prune)
    assert again.changes == []  # idempotent: a second run is up to date
    assert all(s.action == "keep values" for s in again.steps)
    final = domain_codes(after)
    assert set(codes) <= set(final)  # every mapped code is in the domain
    if prune:
        assert sorted(map(str, final)) == sorted(map(str, codes))
    else:
        assert set(before) <= set(final)  # nothing a record may hold is removed
    assert len(final) == len(set(final))


def test_a_value_map_without_arcgis_codes_adds_a_text_field_and_no_domain() -> None:
    flowset = parse_spec(yaml.safe_dump({
        "spec_version": 1, "name": "t", "systems": ["dataverse", "arcgis"],
        "value_maps": {"dv_only": [{"label": "A", "dataverse": 1}]},
        "flows": [{"name": "out", "entity": "thing", "mode": "direct",
                   "source": {"system": "dataverse", "table": "things", "key_field": "thingid"},
                   "target": {"system": "arcgis", "table": "Layer", "key_field": "GlobalID"},
                   "link": {"target_field": "DV_ID"},
                   "fields": [{"source": "dv_kind", "target": "KIND", "transform": "choice",
                               "value_map": "dv_only"}]}],
    }), source="test")
    result = plan(flowset, layer())
    assert rows(result) == [("Layer", "KIND", "add field", [])]
    assert result.steps[0].detail == "String(255): value map dv_only (no arcgis codes)"
