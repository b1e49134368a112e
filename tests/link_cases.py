"""Re-linking cases every state store passes; test modules import them to run them against their own `store`."""

from __future__ import annotations

from shared.core.ports import Link, StateStore


async def test_count_and_iter_links(store: StateStore) -> None:
    await store.put_links([
        Link("parcel", "arcgis", "g-2", "dataverse", "d-2"),
        Link("parcel", "dataverse", "d-1", "arcgis", "g-1"),
        Link("owner", "arcgis", "o-1", "dataverse", "x-1"),
    ])
    await store.put_links([Link("parcel", "arcgis", "g-1", "dataverse", "d-1")])  # again: no new link

    assert await store.count_links() == 3
    assert await store.count_links("parcel") == 2
    assert await store.count_links("nothing") == 0
    assert await store.iter_links("parcel", "arcgis", "dataverse") == [("g-1", "d-1"), ("g-2", "d-2")]
    assert await store.iter_links("parcel", "dataverse", "arcgis") == [("d-1", "g-1"), ("d-2", "g-2")]
    assert await store.iter_links("parcel", "arcgis", "salesforce") == []


async def test_relinking_a_key_replaces_the_old_link_in_both_directions(store: StateStore) -> None:
    await store.put_links([Link("parcel", "arcgis", "g-1", "dataverse", "d-old")])

    await store.put_links([Link("parcel", "arcgis", "g-1", "dataverse", "d-new")])

    assert await store.get_links("parcel", "arcgis", ["g-1"], "dataverse") == {"g-1": "d-new"}
    assert await store.get_links("parcel", "dataverse", ["d-old", "d-new"], "arcgis") == {"d-new": "g-1"}
    assert await store.count_links("parcel") == 1


async def test_relinking_across_two_links_keeps_the_mapping_one_to_one(store: StateStore) -> None:
    await store.put_links([
        Link("parcel", "arcgis", "g-1", "dataverse", "d-1"),
        Link("parcel", "arcgis", "g-2", "dataverse", "d-2"),
    ])

    await store.put_links([Link("parcel", "arcgis", "g-1", "dataverse", "d-2")])

    assert await store.iter_links("parcel", "arcgis", "dataverse") == [("g-1", "d-2")]
    assert await store.iter_links("parcel", "dataverse", "arcgis") == [("d-2", "g-1")]


async def test_the_last_link_of_a_key_in_one_batch_wins(store: StateStore) -> None:
    await store.put_links([
        Link("parcel", "arcgis", "g-1", "dataverse", "d-1"),
        Link("parcel", "arcgis", "g-1", "dataverse", "d-2"),
    ])

    assert await store.iter_links("parcel", "arcgis", "dataverse") == [("g-1", "d-2")]
    assert await store.iter_links("parcel", "dataverse", "arcgis") == [("d-2", "g-1")]
