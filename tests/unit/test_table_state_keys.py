"""Pure tests of the Table Storage adapter's key escaping, long-string parts and transaction planning."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from shared.core.ports import AuditEntry, Link, Snapshot
from shared.runtime.azure.tables import (
    MAX_KEY_UNITS,
    MAX_STRING_UNITS,
    MAX_TRANSACTION_OPS,
    PART_UNITS,
    TableOp,
    TableStateStore,
    audit_keys,
    escape_key,
    join_string,
    plan_transactions,
    prefix_range,
    split_key,
    split_string,
    table_key,
    unescape_key,
)

#: What the service forbids in PartitionKey / RowKey, plus "%" (breaks point operations on the real
#: service), "'" (breaks Azurite) and our own separator "|".
FORBIDDEN = {"/", "\\", "#", "?", "%", "'", "|", *map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0))}
ALLOWED_ASCII = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


# ------------------------------------------------------------------------------------------ escaping


def test_every_forbidden_character_is_escaped_away() -> None:
    every_low_character = "".join(map(chr, range(0x100)))

    escaped = escape_key(every_low_character)

    assert not FORBIDDEN & set(escaped)
    assert {ch for ch in escaped if ch < "\u00a0"} <= ALLOWED_ASCII
    assert unescape_key(escaped) == every_low_character


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}", "~7B3F2504E0-4F89-11D3-9A0C-0305E82C3301~7D"),
        ("arcgis:parcels", "arcgis~3Aparcels"),
        ("a/b\\c#d?e", "a~2Fb~5Cc~23d~3Fe"),
        ("100%", "100~25"),
        ("~7E", "~7E7E"),  # the escape character itself is escaped, so decoding is unambiguous
        ("tab\there\x7f\x9f", "tab~09here~7F~9F"),
        ("Zürich Süd ✓ 😀", "Z\u00fcrich~20S\u00fcd~20\u2713~20\U0001f600"),  # readable, non-ASCII kept
        ("plain-key_1.2", "plain-key_1.2"),
        ("", ""),
    ],
)
def test_escape_examples(raw: str, escaped: str) -> None:
    assert escape_key(raw) == escaped
    assert unescape_key(escaped) == raw


def test_lone_surrogates_are_escaped_too() -> None:
    raw = "a\ud800b\udfff"

    escaped = escape_key(raw)

    assert escaped == "a~uD800b~uDFFF"
    escaped.encode("utf-8")  # sendable
    assert unescape_key(escaped) == raw


def test_random_strings_round_trip_and_stay_distinct() -> None:
    rng = random.Random(20250301)
    alphabet = [*map(chr, range(0x100)), "€", "😀", "\u2028", "\ufffe", "~7E", "~", "|"]
    samples = {"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(3000)}

    escaped = {escape_key(sample) for sample in samples}

    assert len(escaped) == len(samples)  # injective
    for sample in samples:
        assert unescape_key(escape_key(sample)) == sample


@pytest.mark.parametrize("bad", ["~", "~4", "~4g", "~4f", "a|b", "a/b", "~u12", "~uD80g", "%2F"])
def test_unescape_refuses_what_escape_cannot_produce(bad: str) -> None:
    with pytest.raises(ValueError, match="not an escaped table key"):
        unescape_key(bad)


def test_composite_keys_split_back_into_their_parts() -> None:
    parts = ["parcel|x", "arc/gis", "", "d~1"]

    key = table_key(*parts)

    assert key.count("|") == len(parts) - 1
    assert split_key(key) == parts


def test_key_length_is_checked_in_utf16_units_after_escaping() -> None:
    assert table_key("k" * MAX_KEY_UNITS) == "k" * MAX_KEY_UNITS
    with pytest.raises(ValueError, match="at most 512"):
        table_key("k" * (MAX_KEY_UNITS + 1))
    with pytest.raises(ValueError, match="at most 512"):
        table_key("/" * 171)  # 171 characters, 513 once escaped
    assert len(table_key("😀" * 256)) == 256  # 512 UTF-16 units: fits
    with pytest.raises(ValueError, match="at most 512"):
        table_key("😀" * 257)
    with pytest.raises(ValueError, match="at most 512"):
        table_key("a" * 300, "b" * 300)  # the whole composite key counts


def test_prefix_range_holds_exactly_the_keys_of_that_prefix() -> None:
    low, high = prefix_range("arc")
    keys = [table_key("arc", "1"), table_key("arc", "~"), table_key("arc", "zz" * 10), table_key("arc", "")]
    others = [table_key("arcgis", "1"), table_key("ar"), table_key("arc"), table_key("arc-x", "1"), "arc}"]

    assert all(low <= key < high for key in keys)
    assert not any(low <= key < high for key in others)


# ------------------------------------------------------------------------------------ long strings


@pytest.mark.parametrize(
    "text",
    ["", "short", "x" * PART_UNITS, "x" * (PART_UNITS + 1), "é" * 70_000, "😀" * 40_000, "a" * 100_000 + "ü"],
)
def test_long_strings_are_split_into_legal_parts_and_joined_back(text: str) -> None:
    parts = split_string("values", text, what="test")

    assert list(parts) == ["values", *(f"values_{i}" for i in range(1, len(parts)))]
    assert all(utf16_units(part) <= 32_768 for part in parts.values())
    assert join_string({"other": "x", **parts}, "values") == text


def test_a_string_beyond_one_entity_is_refused_with_the_reason() -> None:
    assert len(split_string("v", "x" * MAX_STRING_UNITS, what="snapshot a/b/c")) == 15
    with pytest.raises(ValueError, match=r"snapshot a/b/c is 480,001 UTF-16 units .* at most 480,000"):
        split_string("v", "x" * (MAX_STRING_UNITS + 1), what="snapshot a/b/c")
    with pytest.raises(ValueError, match="480,002 UTF-16 units"):
        split_string("v", "😀" * (MAX_STRING_UNITS // 2 + 1), what="x")


# ----------------------------------------------------------------------------------- transactions


def op(partition: str, row: str | int, kind: str = "upsert", **props: Any) -> TableOp:
    return TableOp(kind, {"PartitionKey": partition, "RowKey": str(row), **props})  # type: ignore[arg-type]


def shape(chunks: list[list[TableOp]]) -> list[tuple[str, list[str]]]:
    return [(chunk[0].partition, [o.row for o in chunk]) for chunk in chunks]


def test_one_partition_is_cut_every_100_operations() -> None:
    chunks = plan_transactions([op("p", i)] for i in range(250))

    assert [len(chunk) for chunk in chunks] == [100, 100, 50]
    assert [o.row for chunk in chunks for o in chunk] == [str(i) for i in range(250)]


def test_no_transaction_mixes_partitions_and_each_keeps_its_order() -> None:
    ops = [op(f"p{i % 3}", i) for i in range(330)]

    chunks = plan_transactions([o] for o in ops)

    assert all(len({o.partition for o in chunk}) == 1 for chunk in chunks)
    assert all(len(chunk) <= MAX_TRANSACTION_OPS for chunk in chunks)
    assert [len(chunk) for chunk in chunks] == [100, 10, 100, 10, 100, 10]
    for partition in ("p0", "p1", "p2"):
        planned = [o.row for chunk in chunks for o in chunk if o.partition == partition]
        assert planned == [o.row for o in ops if o.partition == partition]


def test_a_group_stays_in_one_transaction_when_it_fits_in_one() -> None:
    groups = [[op("p", f"{i}a"), op("p", f"{i}b")] for i in range(51)] + [[op("p", "x"), op("p", "y"), op("p", "z")]]
    groups.insert(49, [op("p", "single")])  # leaves 1 free slot in the first transaction

    chunks = plan_transactions(groups)

    assert [len(chunk) for chunk in chunks] == [99, 7]
    for group in groups:
        assert sum(any(o in chunk for o in group) for chunk in chunks) == 1


def test_a_group_larger_than_a_transaction_is_cut_in_order() -> None:
    chunks = plan_transactions([[op("p", i) for i in range(230)]])

    assert [len(chunk) for chunk in chunks] == [100, 100, 30]
    assert [o.row for chunk in chunks for o in chunk] == [str(i) for i in range(230)]


def test_a_row_never_appears_twice_in_one_transaction() -> None:
    chunks = plan_transactions([[op("p", "a")], [op("p", "b")], [op("p", "a")], [op("p", "c"), op("p", "c")]])

    assert shape(chunks) == [("p", ["a", "b"]), ("p", ["a", "c"]), ("p", ["c"])]


def test_the_byte_budget_cuts_transactions_too() -> None:
    big = "x" * 300_000
    ops = [op("p", i, values=big) for i in range(25)]

    chunks = plan_transactions([o] for o in ops)

    assert all(sum(o.size for o in chunk) <= 3 * 1024 * 1024 for chunk in chunks)
    assert [len(chunk) for chunk in chunks] == [10, 10, 5]
    assert ops[0].size > 300_000


def test_one_operation_above_the_byte_budget_still_gets_a_transaction_of_its_own() -> None:
    chunks = plan_transactions([[op("p", 1)], [op("p", 2, v="x" * 5000)], [op("p", 3)]], max_bytes=4000)

    assert shape(chunks) == [("p", ["1"]), ("p", ["2"]), ("p", ["3"])]


def test_a_group_across_partitions_is_refused() -> None:
    with pytest.raises(ValueError, match="one partition"):
        plan_transactions([[op("p", 1), op("q", 1)]])


def test_empty_input_plans_nothing() -> None:
    assert plan_transactions([]) == []
    assert plan_transactions([[]]) == []
    with pytest.raises(ValueError, match="at least one"):
        plan_transactions([[op("p", 1)]], max_ops=0)


def test_operations_become_conditional_sdk_tuples() -> None:
    assert op("p", 1).to_sdk() == ("upsert", {"PartitionKey": "p", "RowKey": "1"}, {"mode": UpdateMode.REPLACE})
    assert op("p", 1, "create").to_sdk()[2] == {}
    guarded = TableOp("delete", {"PartitionKey": "p", "RowKey": "1"}, etag="W/x").to_sdk()
    assert guarded[2] == {"etag": "W/x", "match_condition": MatchConditions.IfNotModified}
    updated = TableOp("update", {"PartitionKey": "p", "RowKey": "1"}, etag="W/x").to_sdk()
    assert updated[2]["mode"] is UpdateMode.REPLACE


# --------------------------------------------------------------------------------------- audit keys


def test_audit_keys_sort_newest_first_across_days_and_instants() -> None:
    t0 = datetime(2025, 3, 1, 23, 59, 59, 999_999, tzinfo=UTC)
    ordered = [  # newest first
        audit_keys(t0 + timedelta(microseconds=1), 10),  # next day
        audit_keys(t0, 12),  # same instant, appended later
        audit_keys(t0, 11),
        audit_keys(t0 - timedelta(microseconds=1), 99),
        audit_keys(datetime(2024, 12, 31, tzinfo=UTC), 1),
    ]

    assert sorted(ordered) == ordered
    assert ordered[1][0] == "79749698_2025-03-01"  # readable day after the inverted one


def test_audit_partition_follows_the_utc_day() -> None:
    late_evening_in_new_york = datetime(2025, 3, 1, 21, 0, tzinfo=UTC) + timedelta(hours=5)

    assert audit_keys(late_evening_in_new_york.astimezone(UTC), 1)[0].endswith("_2025-03-02")


# ------------------------------------------------------- the store never sends an illegal transaction


class RecordingTable:
    """A TableClient stand-in: every point read misses and every transaction is recorded."""

    def __init__(self) -> None:
        self.transactions: list[list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]] = []

    async def get_entity(self, partition_key: str, row_key: str) -> Any:
        raise ResourceNotFoundError("not found")

    async def submit_transaction(self, operations: Sequence[Any]) -> list[Mapping[str, Any]]:
        self.transactions.append(list(operations))
        return [{} for _ in operations]


class RecordingService:
    def __init__(self) -> None:
        self.table = RecordingTable()

    async def create_table_if_not_exists(self, name: str) -> RecordingTable:
        return self.table

    async def close(self) -> None:
        return None


async def test_big_batches_reach_the_service_as_legal_transactions() -> None:
    service = RecordingService()
    store = TableStateStore(cast(Any, service))
    t0 = datetime(2025, 3, 1, tzinfo=UTC)

    await store.put_snapshots([Snapshot("arcgis", f"t{i % 3}", f"k{i}", {"i": i}, "h", None) for i in range(450)])
    await store.put_links([Link(f"e{i % 2}", "arcgis", f"g{i}", "dataverse", f"d{i}") for i in range(1000)])
    await store.append_audit([AuditEntry(t0 + timedelta(hours=i), "c", "f", "written", "s", "t", "k")
                              for i in range(300)])
    await store.remember("webhook", [f"m{i}" for i in range(777)])
    await store.close()

    sent = service.table.transactions
    assert sum(len(t) for t in sent) == 450 + 2000 + 2 * 300 + 777  # each audit entry has its index copy
    for transaction in sent:
        assert 1 <= len(transaction) <= MAX_TRANSACTION_OPS
        assert len({entity["PartitionKey"] for _, entity, _ in transaction}) == 1
        assert len({entity["RowKey"] for _, entity, _ in transaction}) == len(transaction)
