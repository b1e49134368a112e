"""`python -m sandbox.bench_azure` end to end on a tiny load: both runtimes drain it, counters read, report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox import bench_azure


def test_tiny_bench_drains_on_both_runtimes_and_counts_the_azure_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "bench-azure.json"
    code = bench_azure.main(["--changes", "6", "--records", "3", "--latency-ms", "0", "--report", str(report),
                             "--variant", "small-batches:SYNCLINE_BATCH_SIZE=2", "--baseline", "small-batches"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = json.loads(report.read_text())
    assert doc["problems"] == []
    assert list(doc["scenarios"]) == ["6 changes over 3 records"]
    for records, columns in zip((3,), doc["scenarios"].values(), strict=True):
        embedded, azure = columns["embedded"], columns["azure"]
        assert sum(azure["statuses"].values()) == 6  # each change settled once, in one drain
        assert azure["statuses"].get("written", 0) >= records  # every record's latest change written
        for figures in (embedded, azure):
            assert figures["dead_lettered"] == {}
            assert figures["left_on_queue"] == {"active": 0, "scheduled": 0, "dead_letter": 0}
            assert figures["peak_rss_mb"] > 0
        assert embedded["statuses"] == azure["statuses"]  # the same work, the same outcome
        assert "servicebus_operations" not in embedded
        # the drain must at least receive and settle on the broker, and read or write Table Storage
        assert azure["servicebus_operations_by_kind"].get("receive", 0) >= 1
        assert azure["servicebus_operations_by_kind"].get("settle", 0) + azure["servicebus_operations_by_kind"].get(
            "management:update-disposition", 0) >= 1
        assert azure["table_requests"] >= 1
    assert "SB operations/change" in printed
    variant = doc["scenarios"]["6 changes over 3 records"]["small-batches"]
    assert variant["environment"] == {"SYNCLINE_BATCH_SIZE": "2"}
    assert variant["servicebus_operations"] > 0
    assert set(doc["targets"]["6 changes over 3 records"]) == {
        "Service Bus operations/change <= 0.1", "Table Storage requests/change <= 0.1", "azure peak RSS < 300 MB",
        "azure within 3x of embedded", "azure >= 20x small-batches"}
    assert "target azure within 3x of embedded: " in printed
