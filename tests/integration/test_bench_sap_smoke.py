"""`python -m sandbox.bench_sap` end to end on a small load: both paths, every order checked in SAP, report written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox import bench_sap


def test_small_bench_meets_its_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench-sap.json"
    code = bench_sap.main(["--orders", "200", "--naive-orders", "10", "--latency-ms", "0", "--op-latency-ms", "0",
                           "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = json.loads(report.read_text())
    assert all(doc["targets"].values()), doc["targets"]
    batched, naive = doc["batched"], doc["naive"]
    assert (batched["orders_written"], naive["orders_written"]) == (200, 10)
    # One CSRF fetch, one look-up $batch (5 queries of 40 numbers) and two write $batch calls of 100 changesets.
    assert (batched["sap_calls"], batched["sap_batch_calls"]) == (4, 3)
    # Naive: one CSRF fetch, then a look-up GET and a deep-insert POST per order.
    assert (naive["sap_calls"], naive["sap_batch_calls"]) == (21, 0)
    assert batched["verified"]["items_in_sap"] == batched["verified"]["order_lines_in_dynamics"]
    assert "throughput ratio" in printed
    assert "SAP calls/order <= 0.05: met" in printed
