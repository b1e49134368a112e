"""What the seeded SAP simulator serves keeps the promises of its own $metadata (names, types, MaxLength)."""

from __future__ import annotations

from datetime import datetime, time
from decimal import Decimal

import pytest

from sandbox.sap import SapSimulator, seed_sap
from sandbox.sap.schema import BOOL, DEC, DT, DTO, ENTITIES, GUID, STRING, TM

PYTHON_TYPES: dict[str, tuple[type, ...]] = {STRING: (str,), DT: (datetime,), DTO: (datetime,), TM: (time,),
                                             DEC: (str,), BOOL: (bool,), GUID: (str,)}


@pytest.fixture(scope="module")
def seeded() -> SapSimulator:
    sim = SapSimulator()
    seed_sap(sim, partners=14, orders=12)
    sim.close()
    return sim


@pytest.mark.parametrize("entity", sorted(ENTITIES))
def test_seeded_rows_fit_the_schema(seeded: SapSimulator, entity: str) -> None:
    rows = seeded.all(entity)
    assert rows, f"the seed has no {entity}"
    definition = ENTITIES[entity]
    for row in rows:
        assert set(definition.fields) <= set(row)
        assert {name for name in row if not name.startswith("_")} <= set(definition.fields)
        for prop in definition.props:
            value = row[prop.name]
            if value is None:
                assert prop.name not in definition.keys
                continue
            assert isinstance(value, PYTHON_TYPES[prop.type]), (entity, prop.name, value)
            if prop.max_length is not None:
                assert len(value) <= prop.max_length, (entity, prop.name, value)
            if prop.type == DEC:
                assert -Decimal(value).as_tuple().exponent == prop.scale, (entity, prop.name, value)
