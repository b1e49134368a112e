"""The drift check's comparison: live choice domains against value maps, both ways, with hypothesis domains."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.connectors._choices import ChoiceDomain
from shared.mapping.spec import FlowSet, parse_spec
from shared.ops.check import compare, field_uses, label_key


def flowset(entries: list[dict[str, Any]], *, when: list[int] | None = None, both_ways: bool = True) -> FlowSet:
    flows = [{"name": "to_field", "entity": "thing", "mode": "queue", "link": {"target_field": "DV_ID"},
              "source": {"system": "dataverse", "table": "things", "key_field": "thingid"},
              "target": {"system": "arcgis", "table": "Things", "key_field": "GlobalID"},
              "fields": [{"source": "kind", "target": "KIND", "transform": "choice", "value_map": "kind"}]}]
    if when is not None:
        flows[0]["when"] = [{"field": "kind", "in": when}]
    if both_ways:
        flows.append({"name": "from_field", "entity": "thing", "mode": "queue", "link": {"target_field": "ag_id"},
                      "source": {"system": "arcgis", "table": "Things", "key_field": "GlobalID"},
                      "target": {"system": "dataverse", "table": "things", "key_field": "thingid"},
                      "fields": [{"source": "KIND", "target": "kind", "transform": "choice", "value_map": "kind"}]})
    return parse_spec(yaml.safe_dump({"spec_version": 1, "name": "t", "systems": ["dataverse", "arcgis"],
                                      "value_maps": {"kind": entries}, "flows": flows}))


def uses_of(fs: FlowSet, system: str) -> list[Any]:
    return [u for u in field_uses(fs) if u.system == system]


ENTRIES = [{"label": "Red", "dataverse": 1, "arcgis": "R"}, {"label": "Green", "dataverse": 2, "arcgis": "G"}]


def test_a_domain_equal_to_the_map_is_clean():
    fs = flowset(ENTRIES)
    assert compare(ChoiceDomain({1: "Red", 2: "Green"}, "os"), uses_of(fs, "dataverse"), fs, {}) == []
    assert compare(ChoiceDomain({"R": "Red", "G": "Green"}, "dom"), uses_of(fs, "arcgis"), fs, {}) == []


def test_a_new_option_is_unmapped_for_the_flow_reading_it_and_a_removed_one_is_missing_for_both():
    fs = flowset(ENTRIES)
    found = compare(ChoiceDomain({1: "Red", 3: "Blue"}, "os"), uses_of(fs, "dataverse"), fs, {})
    by_problem = {(f.problem, f.value): f for f in found}
    assert set(by_problem) == {("unmapped", 3), ("missing", 2)}
    assert by_problem[("unmapped", 3)].flows == ("to_field",)  # only the flow reading dataverse dead-letters
    assert by_problem[("unmapped", 3)].label == "Blue"
    assert "dead-letters" in by_problem[("unmapped", 3)].detail
    assert by_problem[("missing", 2)].flows == ("from_field", "to_field")
    assert by_problem[("missing", 2)].label == "Green"  # the map's label: the system has none for it any more
    assert all(f.severity == "error" for f in found)


def test_values_outside_the_flows_when_scope_are_not_reported():
    fs = flowset(ENTRIES, when=[1, 2], both_ways=False)
    assert compare(ChoiceDomain({1: "Red", 2: "Green", 9: "Other"}, "os"), uses_of(fs, "dataverse"), fs, {}) == []


def test_a_field_only_written_does_not_need_every_value_mapped():
    fs = flowset(ENTRIES, both_ways=False)
    assert compare(ChoiceDomain({"R": "Red", "G": "Green", "X": "Extra"}, "dom"), uses_of(fs, "arcgis"), fs, {}) == []


def test_labels_changed_since_the_last_check_or_unlike_the_map_are_warnings():
    fs = flowset(ENTRIES)
    previous = {label_key("dataverse", "things", "kind", 1): "Red"}
    found = compare(ChoiceDomain({1: "Crimson", 2: "Verde"}, "os"), uses_of(fs, "dataverse"), fs, previous)
    assert {(f.problem, f.value, f.severity) for f in found} == {("label_changed", 1, "warning"),
                                                                ("label_differs", 2, "warning")}
    # A system whose labels are its codes (a Salesforce picklist) is not compared with the map's labels.
    assert compare(ChoiceDomain({"R": "R", "G": "G"}, "pick"), uses_of(fs, "arcgis"), fs, {}) == []


def test_a_deactivated_value_that_is_mapped_is_an_error_of_its_own():
    fs = flowset(ENTRIES)
    found = compare(ChoiceDomain({"R": "Red"}, "pick", inactive={"G": "Green"}), uses_of(fs, "arcgis"), fs, {})
    assert [(f.problem, f.value) for f in found] == [("inactive", "G")]


values = st.integers(min_value=0, max_value=30)


@settings(max_examples=200, deadline=None)
@given(mapped=st.sets(values, min_size=1, max_size=12), live=st.sets(values, max_size=12))
def test_the_findings_are_exactly_the_two_set_differences(mapped: set[int], live: set[int]):
    entries = [{"label": f"L{v}", "dataverse": v, "arcgis": f"C{v}"} for v in sorted(mapped)]
    fs = flowset(entries)
    domain = ChoiceDomain({v: f"L{v}" for v in live}, "os")
    found = compare(domain, uses_of(fs, "dataverse"), fs, {})
    assert {f.value for f in found if f.problem == "unmapped"} == live - mapped
    assert {f.value for f in found if f.problem == "missing"} == mapped - live
    assert not [f for f in found if f.severity == "warning"]  # same labels as the map
    # The other side alike, with codes (strings) instead of option values.
    codes = ChoiceDomain({f"C{v}": f"L{v}" for v in live}, "dom")
    found = compare(codes, uses_of(fs, "arcgis"), fs, {})
    assert {f.value for f in found if f.problem == "unmapped"} == {f"C{v}" for v in live - mapped}
    assert {f.value for f in found if f.problem == "missing"} == {f"C{v}" for v in mapped - live}


@settings(max_examples=100, deadline=None)
@given(live=st.dictionaries(values, st.text(min_size=1, max_size=8), max_size=10),
       relabel=st.dictionaries(values, st.text(min_size=1, max_size=8), max_size=10))
def test_a_label_change_is_reported_once_per_changed_value(live: dict[int, str], relabel: dict[int, str]):
    fs = flowset([{"dataverse": v, "arcgis": f"C{v}"} for v in live] or [{"dataverse": 999, "arcgis": "X"}])
    previous = {label_key("dataverse", "things", "kind", v): t for v, t in live.items()}
    now = {v: relabel.get(v, t) for v, t in live.items()}
    found = compare(ChoiceDomain(now, "os"), uses_of(fs, "dataverse"), fs, previous)
    assert {f.value for f in found if f.problem == "label_changed"} == {v for v in live if now[v] != live[v]}
