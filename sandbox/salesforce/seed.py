"""Seed data made as a UI user: a small equipment org, the lead-to-cash pipeline and Customer 360 accounts."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.salesforce.app import SalesforceSimulator


def seed_salesforce(sim: SalesforceSimulator, *, accounts: int = 12, opportunities: int = 8) -> dict[str, list[str]]:
    """A small, deterministic org of an equipment maker, with a few bad records.

    Bad records: the last account has a blank BillingCountry, the second account's name carries a quote
    (`O'Brien Machining`, exercises SOQL escaping), and the last opportunity has no Amount.
    """
    cities = ["Lyon", "Toulouse", "Hamburg", "Torino", "Gdansk", "Porto"]
    made: dict[str, list[str]] = {"Account": [], "Opportunity": [], "Product2": []}
    with sim._lock:
        for i in range(accounts):
            name = "O'Brien Machining" if i == 1 else f"Equipment Customer {i + 1:03d}"
            values = {"Name": name, "AccountNumber": f"AC-{1000 + i}",
                      "Type": "Customer - Direct", "Industry": "Manufacturing",
                      "BillingCity": cities[i % len(cities)], "BillingCountry": "" if i == accounts - 1 else "FR",
                      "NumberOfEmployees": 50 + 10 * i}
            made["Account"].append(sim.ui_create("Account", values))
        for i, (name, family) in enumerate([("Hydraulic press HP-200", "Presses"), ("Conveyor CV-12", "Conveyors"),
                                            ("Spare seal kit", "Spares")]):
            made["Product2"].append(sim.ui_create("Product2", {"Name": name, "ProductCode": f"EQ-{i:03d}",
                                                               "Family": family, "IsActive": True}))
        for i in range(opportunities):
            account = made["Account"][i % max(1, len(made["Account"]))] if made["Account"] else None
            made["Opportunity"].append(sim.ui_create(
                "Opportunity", {"Name": f"Line retrofit {i + 1}", "StageName": "Prospecting",
                                "CloseDate": f"2026-{(i % 12) + 1:02d}-15",
                                "Amount": None if i == opportunities - 1 else 25000.0 + 5000 * i,
                                "AccountId": account}))
    return made


LEGAL_ENTITY_COMPANY = {"US01": "usmf", "DE01": "demf"}
"""Legal_Entity__c -> F&O company (the company part of Product2.Dynamics_Item__c), as flows/fno-salesforce maps it."""
LEGAL_ENTITY_HOME = {"US01": ("USD", "US"), "DE01": ("EUR", "DE")}
"""Legal entity -> (its currency, its country) for accounts sales creates."""
MAPPED_CURRENCIES = frozenset({"USD", "EUR", "GBP", "CHF"})
"""Currencies the fno-salesforce flow maps; accounts in any other one get no pipeline (they are the bad ones)."""
UNMAPPED_LEGAL_ENTITY = "BR01"
UNMAPPED_CURRENCY = "JPY"
UNMAPPED_PAYMENT_TERMS = "Net 90"
OPEN_STAGES = ("Prospecting", "Qualification", "Proposal/Price Quote", "Negotiation/Review")

_FIRMS = ("Allegheny", "Ridgeway", "Lakeshore", "Granite Valley", "Ironbridge", "Northfield", "Keystone",
          "Bluewater", "Summit", "Riverside", "Harbor Point", "Redstone")
_TRADES = ("Fabrication", "Machine Works", "Tooling", "Industrial Supply", "Precision Parts", "Automation")
_CITIES = {"US01": ("Pittsburgh", "Columbus", "Milwaukee", "Houston", "Charlotte"),
           "DE01": ("Stuttgart", "Hamburg", "Dortmund", "Leipzig", "Augsburg")}
_DEALS = ("Press line retrofit", "Conveyor expansion", "Spare parts agreement", "Robotic welding cell",
          "Hydraulic upgrade", "Packaging line", "Service kit renewal")


def _firm_name(i: int, suffix: str = "") -> str:
    """Distinct, readable company names for i < 72 (then numbered)."""
    base = f"{_FIRMS[i % len(_FIRMS)]} {_TRADES[(i // len(_FIRMS)) % len(_TRADES)]}"
    return base + (f" {i // (len(_FIRMS) * len(_TRADES)) + 1}" if i >= len(_FIRMS) * len(_TRADES) else "") + suffix


def seed_new_accounts(sim: SalesforceSimulator, n: int = 20, *, seed: int = 5) -> dict[str, list[str]]:
    """Accounts sales creates for the ERP (they become F&O customers): `n` good ones and one bad one.

    Good: Type "Customer - Direct" (about one in five "Customer - Channel"), Legal_Entity__c US01 (USD, US) or DE01
    (EUR, DE), a BillingCity, no Dynamics_Account__c yet. Bad: US01 in JPY, a currency the flow does not map.
    Returns {"good": [...], "bad_currency": [id]}.
    """
    rng = random.Random(seed)
    made: dict[str, list[str]] = {"good": [], "bad_currency": []}
    for i in range(n):
        entity = "US01" if rng.random() < 0.6 else "DE01"
        currency, country = LEGAL_ENTITY_HOME[entity]
        made["good"].append(sim.ui_create("Account", {
            "Name": _firm_name(i, " GmbH" if entity == "DE01" else " Inc."),
            "Type": "Customer - Channel" if rng.random() < 0.2 else "Customer - Direct",
            "Legal_Entity__c": entity, "CurrencyIsoCode": currency, "BillingCountry": country,
            "BillingCity": rng.choice(_CITIES[entity]), "Industry": "Manufacturing"}))
    made["bad_currency"].append(sim.ui_create("Account", {
        "Name": "Osaka Machinery Imports Inc.", "Type": "Customer - Direct", "Legal_Entity__c": "US01",
        "CurrencyIsoCode": UNMAPPED_CURRENCY, "BillingCountry": "US", "BillingCity": "Seattle",
        "Industry": "Manufacturing"}))
    return made


def _add_lines(sim: SalesforceSimulator, rng: random.Random, sobject: str, header: tuple[str, str],
               pool: Sequence[Mapping[str, Any]], count: int, prices: Mapping[str, float]) -> list[str]:
    parent_field, parent_id = header
    return [sim.ui_create(sobject, {parent_field: parent_id, "Product2Id": product["Id"],
                                    "Quantity": float(rng.randint(1, 25)), "UnitPrice": prices[str(product["Id"])]})
            for product in rng.sample(list(pool), min(count, len(pool)))]


def seed_sales_pipeline(sim: SalesforceSimulator, *, accounts: Sequence[Mapping[str, Any]],
                        products: Sequence[Mapping[str, Any]], opportunities: int = 300, orders: int = 60,
                        seed: int = 7) -> dict[str, list[str]]:
    """Sales work on existing Accounts and Product2 records, made through the UI (so it emits change events).

    `opportunities` good opportunities across the stages (40 % Closed Won), each with the account's
    Legal_Entity__c and CurrencyIsoCode and 1-4 line items of products of the same company (US01 <-> usmf,
    DE01 <-> demf, the company part of Dynamics_Item__c); closed ones are created open, given their lines, then
    closed, as a rep would. `orders` good orders with 1-3 order products, created Draft, 80 % then
    activated. Only accounts in a mapped legal entity and currency are used. On top, three bad records that sync
    and must dead-letter: a Closed Won opportunity in BR01, a Closed Won opportunity in JPY and an activated
    order in BR01.

    Returns ids under "won", "open", "lost", "activated", "draft", "bad_legal_entity", "bad_currency",
    "bad_order_legal_entity", "opportunity_line_items" and "order_items" (the bad records are only in theirs).
    """
    rng = random.Random(seed)
    by_company: dict[str, list[Mapping[str, Any]]] = {}
    for product in products:
        company = str(product.get("Dynamics_Item__c") or "").partition("|")[0].lower()
        if company:
            by_company.setdefault(company, []).append(product)
    eligible = [a for a in accounts if LEGAL_ENTITY_COMPANY.get(str(a.get("Legal_Entity__c"))) in by_company
                and a.get("CurrencyIsoCode") in MAPPED_CURRENCIES]
    if not eligible:
        raise ValueError("seed_sales_pipeline needs accounts in a mapped legal entity and currency, and products "
                         "of their company")
    prices = {str(p["Id"]): float(rng.randrange(40, 12_000)) + rng.choice((0.0, 0.5, 0.99)) for p in products}
    made: dict[str, list[str]] = {k: [] for k in (
        "won", "open", "lost", "activated", "draft", "bad_legal_entity", "bad_currency", "bad_order_legal_entity",
        "opportunity_line_items", "order_items")}

    def pool(account: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return by_company[LEGAL_ENTITY_COMPANY[str(account["Legal_Entity__c"])]]

    def opportunity(account: Mapping[str, Any], stage: str, **override: Any) -> str:
        closed = stage.startswith("Closed")
        month, day = rng.randint(1, 12), rng.randint(1, 28)
        rid = sim.ui_create("Opportunity", {
            "Name": f"{account.get('Name') or 'Account'} - {rng.choice(_DEALS)}",
            "StageName": "Proposal/Price Quote" if closed else stage,
            "CloseDate": f"{2025 if closed else 2026}-{month:02d}-{day:02d}", "AccountId": account["Id"],
            "Legal_Entity__c": account["Legal_Entity__c"], "CurrencyIsoCode": account["CurrencyIsoCode"],
            **override})
        made["opportunity_line_items"] += _add_lines(sim, rng, "OpportunityLineItem", ("OpportunityId", rid),
                                                     pool(account), rng.randint(1, 4), prices)
        if closed:
            sim.ui_change("Opportunity", rid, {"StageName": stage})
        return rid

    def order(account: Mapping[str, Any], number: int, activate: bool, **override: Any) -> str:
        rid = sim.ui_create("Order", {
            "AccountId": account["Id"], "Status": "Draft",
            "EffectiveDate": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            "Legal_Entity__c": account["Legal_Entity__c"], "CurrencyIsoCode": account["CurrencyIsoCode"],
            "OrderReferenceNumber": f"PO-{number:05d}", **override})
        made["order_items"] += _add_lines(sim, rng, "OrderItem", ("OrderId", rid), pool(account),
                                          rng.randint(1, 3), prices)
        if activate:
            sim.ui_change("Order", rid, {"Status": "Activated"})
        return rid

    # exact shares (40 % won, the rest spread over the other stages; 80 % of orders activated), shuffled
    won = round(opportunities * 0.4)
    others = (*OPEN_STAGES, "Closed Lost")
    stages = ["Closed Won"] * won + [others[i % len(others)] for i in range(opportunities - won)]
    rng.shuffle(stages)
    for stage in stages:
        kind = "won" if stage == "Closed Won" else "lost" if stage == "Closed Lost" else "open"
        made[kind].append(opportunity(rng.choice(eligible), stage))
    activated = round(orders * 0.8)
    plan = [True] * activated + [False] * (orders - activated)
    rng.shuffle(plan)
    for i, activate in enumerate(plan):
        made["activated" if activate else "draft"].append(order(rng.choice(eligible), 40_000 + i, activate))
    # the bad ones sit on an ordinary US account: a rep picked the wrong picklist value
    home = next((a for a in eligible if a["Legal_Entity__c"] == "US01"), eligible[0])
    made["bad_legal_entity"].append(opportunity(home, "Closed Won", Legal_Entity__c=UNMAPPED_LEGAL_ENTITY))
    made["bad_currency"].append(opportunity(home, "Closed Won", CurrencyIsoCode=UNMAPPED_CURRENCY))
    made["bad_order_legal_entity"].append(order(home, 49_999, True, Legal_Entity__c=UNMAPPED_LEGAL_ENTITY))
    return made


_FIRST = ("Anna", "Ben", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kara", "Luis")
_LAST = ("Baker", "Fischer", "Gomez", "Hansen", "Ivanova", "Kowalski", "Meyer", "Novak", "Okafor", "Rossi")
_TITLES = ("Purchasing Manager", "Plant Manager", "Maintenance Lead", "CFO", "Operations Director", "Buyer")
_PLACES = (("Pittsburgh", "15222", "US"), ("Cleveland", "44114", "US"), ("Lyon", "69002", "FR"),
           ("Stuttgart", "70173", "DE"), ("Leeds", "LS1 4DY", "GB"), ("Basel", "4051", "CH"))
_STREETS = ("Market Street", "Industrial Parkway", "Harbor Road", "Mill Lane", "Station Avenue")
PAYMENT_TERMS = ("Net 30", "2% 10 Net 30", "Net 45", "Net 60")
CRM_TYPES = ("Prospect", "Customer - Direct", "Customer - Channel")


def seed_customer360(sim: SalesforceSimulator, *, accounts: int = 40, contacts_per_account: int = 2,
                     seed: int = 11) -> dict[str, list[str]]:
    """Sales-owned accounts and contacts for Customer 360 (Salesforce <-> Dynamics 365 Sales), made in the UI.

    `accounts` good accounts typed Prospect / Customer - Direct / Customer - Channel with no Legal_Entity__c (they
    are not ERP customers), with phone, website, revenue, billing address, payment terms and credit limit, each with
    `contacts_per_account` contacts (one contact is an O'Connor, for SOQL escaping). One bad account more has
    Payment_Terms__c "Net 90", which the flow does not map; it has no contacts, so it is the only record that
    dead-letters. Returns ids under "accounts", "prospect", "direct", "channel", "contacts", "bad_payment_terms".
    """
    rng = random.Random(seed)
    made: dict[str, list[str]] = {k: [] for k in ("accounts", "prospect", "direct", "channel", "contacts",
                                                  "bad_payment_terms")}

    def account_values(i: int, terms: str) -> dict[str, Any]:
        city, postal, country = rng.choice(_PLACES)
        name = _firm_name(i + 24)  # other names than seed_new_accounts' first ones
        return {"Name": name, "Type": rng.choice(CRM_TYPES), "Phone": f"+1 412 555 {rng.randrange(10_000):04d}",
                "Website": "https://www." + "".join(ch for ch in name.lower() if ch.isalnum()) + ".example",
                "AnnualRevenue": float(rng.randrange(5, 500) * 100_000), "Payment_Terms__c": terms,
                "BillingStreet": f"{rng.randint(1, 999)} {rng.choice(_STREETS)}", "BillingCity": city,
                "BillingPostalCode": postal, "BillingCountry": country,
                "Credit_Limit__c": float(rng.choice((25_000, 50_000, 100_000, 250_000))),
                "Industry": "Manufacturing"}

    for i in range(accounts):
        values = account_values(i, rng.choice(PAYMENT_TERMS))
        rid = sim.ui_create("Account", values)
        made["accounts"].append(rid)
        made[{"Prospect": "prospect", "Customer - Direct": "direct"}.get(values["Type"], "channel")].append(rid)
        domain = values["Website"].removeprefix("https://www.")
        for j in range(contacts_per_account):
            first = rng.choice(_FIRST)
            last = "O'Connor" if (i, j) == (1, 0) else rng.choice(_LAST)
            made["contacts"].append(sim.ui_create("Contact", {
                "FirstName": first, "LastName": last,
                "Email": f"{first}.{last}".lower().replace("'", "") + f"@{domain}",
                "Phone": f"+1 412 555 {rng.randrange(10_000):04d}", "Title": rng.choice(_TITLES),
                "MailingCity": values["BillingCity"], "AccountId": rid}))
    bad = account_values(accounts, UNMAPPED_PAYMENT_TERMS) | {"Type": "Customer - Direct"}
    made["bad_payment_terms"].append(sim.ui_create("Account", bad))
    return made
