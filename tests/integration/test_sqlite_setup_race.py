"""Processes opening one new SQLite state file at the same instant all start (a webhook and the controller on a
fresh state directory): switching a new file to WAL used to fail one of them with "database is locked"."""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

PROCESSES = 6
ROUNDS = 8

pytestmark = pytest.mark.integration


def _open_together(path: str, barrier: Barrier, results: mp.Queue[str]) -> None:
    from shared.runtime.embedded import SqliteStateStore  # imported before the barrier: only the open races

    barrier.wait(timeout=60)
    try:
        SqliteStateStore(path)
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")
    else:
        results.put("ok")


def test_processes_opening_a_new_state_file_at_once_all_start(tmp_path: Path) -> None:
    spawn = mp.get_context("spawn")  # no fork of a process with running threads
    failures: list[str] = []
    for n in range(ROUNDS):
        barrier = spawn.Barrier(PROCESSES)
        results: mp.Queue[str] = spawn.Queue()
        workers = [spawn.Process(target=_open_together, args=(str(tmp_path / f"state-{n}.db"), barrier, results))
                   for _ in range(PROCESSES)]
        for worker in workers:
            worker.start()
        outcomes = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        failures += [outcome for outcome in outcomes if outcome != "ok"]
    assert failures == []
