"""The demo: every simulator started, seeded and worked on, Syncline syncing it all, then a report."""

from sandbox.demo.box import (
    FUNCTION_KEY,
    SIGNATURE_KEY,
    WEBHOOK_SECRET,
    Sandbox,
    environment,
    start_host,
    start_sandbox,
)
from sandbox.demo.cli import main
from sandbox.demo.run import run_demo
from sandbox.demo.scenario import (
    customer360_activity,
    expected_bad,
    field_activity,
    fulfilment_activity,
    lead_to_cash_activity,
    lead_to_cash_figures,
    office_activity,
    raise_knockdown,
    sales_activity,
    sap_figures,
    sap_fulfilment_activity,
    sap_order_activity,
    seed_sales_side,
    seed_sap_side,
    settle,
)

__all__ = [
    "FUNCTION_KEY", "SIGNATURE_KEY", "WEBHOOK_SECRET", "Sandbox", "customer360_activity", "environment",
    "expected_bad", "field_activity", "fulfilment_activity", "lead_to_cash_activity",
    "lead_to_cash_figures", "main", "office_activity", "raise_knockdown", "run_demo", "sales_activity", "sap_figures",
    "sap_fulfilment_activity", "sap_order_activity", "seed_sales_side", "seed_sap_side", "settle",
    "start_host", "start_sandbox",
]
