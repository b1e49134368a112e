"""Flow spec loading: shipped specs are valid, broken specs get errors naming file, path and problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shared.bootstrap import load_flows
from shared.core.errors import SpecError
from shared.mapping.spec import load_spec, parse_spec
from shared.mapping.transforms import TRANSFORMS

FLOWS = Path(__file__).resolve().parents[2] / "flows"
DOT = FLOWS / "dot-signs.yaml"


def dot_data() -> dict:
    return yaml.safe_load(DOT.read_text())


def broken(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.detail


def test_every_shipped_spec_loads_and_uses_known_transforms():
    flowset = load_flows(FLOWS)
    assert {f.name for f in flowset.flows} >= {"sign_assets_to_field", "inspections_from_field"}
    for flow in flowset.flows:
        for fm in flow.fields:
            assert fm.transform in TRANSFORMS


def test_dot_signs_covers_what_the_seed_moves():
    flowset = load_spec(DOT)
    entities = {f.entity for f in flowset.flows}
    assert entities == {"sign_asset", "work_order", "work_order_task", "field_assignment", "inspection"}
    assert {f.mode for f in flowset.flows} == {"direct", "queue"}
    assert flowset.flow("inspections_from_field").attachments is not None
    assert flowset.cascades[0].name == "close_tasks_with_work_order"


def test_unknown_key_is_rejected_with_file_and_path(tmp_path):
    data = dot_data()
    data["flows"][2]["fields"][1]["tranform"] = "upper"
    detail = broken(tmp_path, data)
    assert "broken.yaml" in detail
    assert "flows[2] (work_orders_to_field).fields[1] (dot_worktype).tranform" in detail
    assert "Extra inputs are not permitted" in detail


def test_unknown_transform_names_the_known_ones(tmp_path):
    data = dot_data()
    data["flows"][0]["fields"][0]["transform"] = "eval"
    detail = broken(tmp_path, data)
    assert "unknown transform 'eval'" in detail
    assert "feet_to_meters" in detail


def test_unknown_value_map_and_bad_owner(tmp_path):
    data = dot_data()
    data["flows"][0]["fields"][2]["value_map"] = "sign_kind"
    assert "unknown value_map 'sign_kind'" in broken(tmp_path, data)
    data = dot_data()
    data["flows"][0]["fields"][0]["owner"] = "salesforce"
    assert "owner 'salesforce' must be one of" in broken(tmp_path, data)


def test_ownership_must_agree_between_directions(tmp_path):
    data = dot_data()
    data["flows"][1]["fields"][3]["owner"] = "dataverse"  # CONDITION is arcgis-owned in the outbound flow
    detail = broken(tmp_path, data)
    assert "CONDITION" in detail or "dot_condition" in detail
    assert "owned by" in detail


def test_lookup_to_unknown_flow_and_cycles(tmp_path):
    data = dot_data()
    data["flows"][2]["lookups"][0]["parent_flow"] = "nope"
    assert "unknown parent_flow 'nope'" in broken(tmp_path, data)
    data = dot_data()
    data["flows"][0]["lookups"] = [{"source": "x", "target": "Y", "parent_flow": "work_order_tasks_to_field"}]
    assert "lookup cycle" in broken(tmp_path, data)


def test_a_diamond_of_lookups_is_not_a_cycle(tmp_path):
    # inspection -> sign asset, and inspection -> work order -> sign asset: two paths to one parent.
    data = dot_data()
    data["flows"][8]["lookups"].append({"source": "WO_GUID", "target": "dot_workorderid",
                                        "parent_flow": "work_orders_from_field"})
    path = tmp_path / "diamond.yaml"
    path.write_text(yaml.safe_dump(data))
    flowset = load_spec(path)
    assert [lk.parent_flow for lk in flowset.flow("inspections_from_field").lookups] == [
        "sign_assets_from_field", "work_orders_from_field"]


def test_a_longer_cycle_is_named_with_its_flows(tmp_path):
    data = dot_data()
    data["flows"][1]["lookups"] = [{"source": "x", "target": "Y", "parent_flow": "work_order_tasks_from_field"}]
    detail = broken(tmp_path, data)
    assert "lookup cycle" in detail
    assert "work_orders_from_field" in detail
    assert "sign_assets_from_field" in detail


def test_ambiguous_value_map_is_rejected(tmp_path):
    data = dot_data()
    data["value_maps"]["sign_type"][1]["arcgis"] = "REG"
    assert "duplicate arcgis values" in broken(tmp_path, data)


def test_not_yaml_and_not_a_mapping():
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("flows: [", source="x.yaml")
    with pytest.raises(SpecError, match="mapping at the top level"):
        parse_spec("- a\n- b\n", source="x.yaml")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read flow spec"):
        load_spec(tmp_path / "absent.yaml")
