"""What a chaos run varies (its options) and what it counts (its figures); the flow sets it can run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.faults import KINDS

DESCRIPTION = ("Crash-and-fault proof: faults on every simulator, the controller killed mid-drain, then "
               "record-by-record checks.")
"""The command's --help description."""
ROOT = Path(__file__).resolve().parents[2]
FLOW_SETS = {"signs": "dot-signs.yaml", "lead-to-cash": "fno-salesforce.yaml", "customer-360": "customer-360.yaml",
             "sap": "sap.yaml"}
QUEUE = "syncline-inbound"
MAX_DELIVERY_COUNT = 10


@dataclass
class ChaosOptions:
    """Everything a run varies; the CLI maps one option to each field."""

    runtime: str = "embedded"
    flow_sets: tuple[str, ...] = tuple(FLOW_SETS)
    seed: int = 2026
    fault_rate: float = 0.2
    kinds: tuple[str, ...] = KINDS
    kills: int = 6
    rounds: int = 2
    signs: int = 300
    work_orders: int = 80
    changes: int = 300
    """Records changed per round and side in the sign program (other sets scale from it)."""
    customers: int = 40
    opportunities: int = 30
    sap_orders: int = 8
    client_timeout: float = 1.5
    """Read timeout of Syncline's API calls; a `timeout` fault holds a request one second longer."""
    lock_seconds: float = 6.0
    batch_size: int = 100
    faulted_cycles: int = 2
    """Full controller cycles with faults still on after the kills of each drain."""
    token_expiry_probability: float = 0.5
    """Chance per controller run that every simulator's tokens expire at a random moment of it."""
    max_cycles: int = 40
    cycle_timeout: float = 600.0
    workdir: Path = Path(".syncline/chaos")
    report: Path = Path("reports/chaos-report.json")
    quiet: bool = True


@dataclass
class Figures:
    """What the run did and what it found (the printed summary and the JSON report)."""

    activity: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    kills_with_locked_messages: int = 0
    kill_attempts: int = 0
    controller_runs: int = 0
    controller_failures: int = 0
    token_expiries: int = 0
    deliveries: dict[int, int] = field(default_factory=dict)
    """Sequence number -> highest delivery count seen for that message."""
    notes: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    hung: int = 0
    cycle_errors: Counter[str] = field(default_factory=Counter)
    """Why controller cycles ended "failed" (digits masked), with counts."""
    notes_once: set[str] = field(default_factory=set)
