"""One record with a value no transform can translate fails alone, with its field named; the batch goes on."""

from __future__ import annotations

import pytest

from shared.core.ports import GEOMETRY_KEY
from shared.mapping.engine import Mapper
from tests.unit.test_engine import SIGN_ID, SPEC, env, sign_payload, world  # noqa: F401 - world is a fixture

OTHERS = ["11111111-2222-3333-4444-555555555555", "22222222-3333-4444-5555-666666666666"]


@pytest.mark.parametrize("bad", [
    "0001-01-01T00:00:00+01:00",  # OverflowError out of the transform before: the whole batch failed
    "9999-12-31T23:30:00-01:00",
    "99999-01-01T00:00:00Z",
    "0000-01-01T00:00:00Z",
    "not a date",
])
async def test_a_batch_with_one_out_of_range_date_fails_that_record_only(world, bad: str) -> None:  # noqa: F811
    engine, _, ag, _ = world
    outs = await engine.process([
        env("sign_assets_to_field", OTHERS[0], sign_payload(dot_signassetid=OTHERS[0], dot_assettag="SGN-A")),
        env("sign_assets_to_field", SIGN_ID, sign_payload(dot_lastinspectedon=bad)),
        env("sign_assets_to_field", OTHERS[1], sign_payload(dot_signassetid=OTHERS[1], dot_assettag="SGN-B")),
    ])
    assert [o.status for o in outs] == ["written", "failed", "written"]
    error = outs[1].error
    assert error is not None
    assert not error.retriable
    assert error.reason == "MAPPING_FAILED"
    assert "field dot_lastinspectedon" in error.detail
    assert "sign_assets_to_field" in error.detail
    assert SIGN_ID in error.detail
    assert "not an ISO-8601 date/time in range" in error.detail
    assert len(ag.tables["SignAssets"]) == 2


async def test_a_geometry_no_transform_can_handle_fails_that_record_only(world) -> None:  # noqa: F811
    engine, dv, ag, _ = world
    gids = ["{AAAAAAAA-0000-0000-0000-000000000001}", "{AAAAAAAA-0000-0000-0000-000000000002}"]

    def feature(gid: str, tag: str, y: float) -> dict[str, object]:
        values = {"GlobalID": gid, "ASSET_TAG": tag, "MUTCD_CODE": "R1-1", "SIGN_TYPE": "REG", "ROUTE": "US-29",
                  GEOMETRY_KEY: {"x": -8735986.28, "y": y, "spatialReference": {"wkid": 102100}}}
        ag.put("SignAssets", gid, values)
        return values

    outs = await engine.process([
        env("sign_assets_from_field", gids[0], feature(gids[0], "SGN-F1", 1e10), system="arcgis", table="SignAssets"),
        env("sign_assets_from_field", gids[1], feature(gids[1], "SGN-F2", 4.6e6), system="arcgis",
            table="SignAssets"),
    ])
    assert [o.status for o in outs] == ["failed", "written"]
    error = outs[0].error
    assert error is not None
    assert error.reason == "MAPPING_FAILED"
    assert f"flow sign_assets_from_field record arcgis:SignAssets:{gids[0]}: field {GEOMETRY_KEY}" in error.detail
    assert len(dv.tables["dot_signassets"]) == 1


def test_the_mapper_turns_any_transform_exception_into_the_record_s_mapping_error(monkeypatch) -> None:
    from shared.core.errors import MappingError
    from shared.mapping import transforms

    def broken(value: object, args: object) -> object:
        raise TypeError("unsupported operand")

    monkeypatch.setitem(transforms.TRANSFORMS, "upper", broken)
    flow = SPEC.flow("sign_assets_to_field")
    with pytest.raises(MappingError) as err:
        Mapper(SPEC).map_values(flow, sign_payload(), is_create=True, target_newer=False, record="dv:1")
    assert err.value.reason == "MAPPING_FAILED"
    assert "flow sign_assets_to_field record dv:1: field dot_mutcdcode: value 'r1-1' cannot be translated" \
        in err.value.detail
    assert "TypeError: unsupported operand" in err.value.detail
