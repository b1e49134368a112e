"""Protocol-faithful simulator of the Salesforce REST API v63.0: the app, its org store, SOQL, CDC and seeds."""

from sandbox.faults import DROP
from sandbox.salesforce.app import SalesforceSimulator
from sandbox.salesforce.faults import Faults, Limits
from sandbox.salesforce.model import (
    API_VERSION,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    ORG_ID,
    RUN_AS_USER_ID,
    UI_USER_ID,
    SalesforceFault,
    to_18,
)
from sandbox.salesforce.seed import (
    CRM_TYPES,
    LEGAL_ENTITY_COMPANY,
    LEGAL_ENTITY_HOME,
    MAPPED_CURRENCIES,
    OPEN_STAGES,
    PAYMENT_TERMS,
    UNMAPPED_CURRENCY,
    UNMAPPED_LEGAL_ENTITY,
    UNMAPPED_PAYMENT_TERMS,
    seed_customer360,
    seed_new_accounts,
    seed_sales_pipeline,
    seed_salesforce,
)
from sandbox.salesforce.soql import Soql, parse_soql

__all__ = [
    "API_VERSION", "CRM_TYPES", "DEFAULT_CLIENT_ID", "DEFAULT_CLIENT_SECRET", "DROP", "LEGAL_ENTITY_COMPANY",
    "LEGAL_ENTITY_HOME", "MAPPED_CURRENCIES", "OPEN_STAGES", "ORG_ID", "PAYMENT_TERMS", "RUN_AS_USER_ID",
    "UI_USER_ID", "UNMAPPED_CURRENCY", "UNMAPPED_LEGAL_ENTITY", "UNMAPPED_PAYMENT_TERMS", "Faults", "Limits",
    "SalesforceFault", "SalesforceSimulator", "Soql", "parse_soql", "seed_customer360", "seed_new_accounts",
    "seed_sales_pipeline", "seed_salesforce", "to_18",
]
