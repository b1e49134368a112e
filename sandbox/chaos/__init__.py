"""Crash-and-fault proof: faults on every simulator, the controller killed mid-drain, then record-by-record checks."""

from sandbox.chaos.checks import duplicates, half_applied_cascades, lost_changes
from sandbox.chaos.cli import main, parse_args, print_summary
from sandbox.chaos.options import ChaosOptions, Figures
from sandbox.chaos.run import Chaos, run_chaos

__all__ = ["Chaos", "ChaosOptions", "Figures", "duplicates", "half_applied_cascades", "lost_changes", "main",
           "parse_args", "print_summary", "run_chaos"]
