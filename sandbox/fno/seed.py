"""Seed data: companies' customers, products, sales orders and lines."""

from __future__ import annotations

import random

from sandbox.fno.app import FinOpsSimulator

_CITIES = [("Chicago", "IL", "USA"), ("Houston", "TX", "USA"), ("Detroit", "MI", "USA"), ("Pittsburgh", "PA", "USA"),
           ("Munich", "BY", "DEU"), ("Stuttgart", "BW", "DEU"), ("Hamburg", "HH", "DEU"), ("Cologne", "NW", "DEU")]
_NAMES = ["Atlas Fabrication", "Keystone Mining", "Northwind Hydraulics", "Granite Construction", "Prairie Agri",
          "Summit Steelworks", "Harbor Logistics", "Ridge Energy", "Blue River Paper", "Ironclad Foundry",
          "Cascade Utilities", "Vulcan Forge"]
_PRODUCTS = ["Hydraulic pump", "Gearbox", "Conveyor drive", "Industrial compressor", "Boom cylinder", "Control valve",
             "Track roller", "Hydraulic hose kit", "Excavator bucket", "PLC control cabinet"]
UNMAPPED_CURRENCY = "XAU"
"""Currency of the deliberately bad customer (no currency map entry in any flow)."""


def seed_fno(sim: FinOpsSimulator, *, customers: int = 40, products: int = 30,
             companies: tuple[str, ...] = ("usmf", "demf")) -> None:
    """Deterministic data of a mid-sized industrial equipment maker, plus a couple of deliberately bad rows.

    Bad rows: customer `<company>|<PREFIX>-BAD1` uses currency `UNMAPPED_CURRENCY`; product `<company>|P-BAD1`
    has no name.
    """
    rng = random.Random(42)
    for company in companies:
        prefix = company[:2].upper()
        currency = "USD" if company.startswith("us") else "EUR"
        for gid, desc in (("10", "Wholesale customers"), ("20", "Major accounts"), ("30", "Dealers"),
                          ("90", "Intercompany")):
            sim.insert("CustomerGroups", {"dataAreaId": company, "CustomerGroupId": gid, "Description": desc,
                                          "PaymentTermId": "Net30"})
        for i in range(1, customers + 1):
            city, state, country = _CITIES[(i + (4 if currency == "EUR" else 0)) % len(_CITIES)]
            name = f"{_NAMES[i % len(_NAMES)]} {i:03d}"
            sim.insert("CustomersV3", {
                "dataAreaId": company, "CustomerAccount": f"{prefix}-{i:03d}", "OrganizationName": name,
                "CustomerGroupId": rng.choice(["10", "20", "30"]), "SalesCurrencyCode": currency,
                "AddressCity": city, "AddressState": state, "AddressCountryRegionId": country,
                "CreditLimit": float(rng.randrange(10, 500) * 1000), "IsCustomerOnHold": "No",
                "PrimaryContactEmail": f"ap{i:03d}@{name.split()[0].lower()}.example"})
        sim.insert("CustomersV3", {
            "dataAreaId": company, "CustomerAccount": f"{prefix}-BAD1", "OrganizationName": "Goldleaf Trading",
            "CustomerGroupId": "10", "SalesCurrencyCode": UNMAPPED_CURRENCY, "AddressCity": "Zurich",
            "AddressState": "", "AddressCountryRegionId": "CHE", "CreditLimit": 0.0, "IsCustomerOnHold": "Yes",
            "PrimaryContactEmail": ""})
        for i in range(1, products + 1):
            sim.insert("ReleasedProductsV2", {
                "dataAreaId": company, "ItemNumber": f"P-{1000 + i}",
                "ProductName": f"{_PRODUCTS[i % len(_PRODUCTS)]} {chr(65 + i % 26)}{i}",
                "ProductType": "Item", "ItemModelGroupId": "FIFO", "SalesPrice": float(rng.randrange(50, 9000)),
                "IsPhantom": "No"})
        sim.insert("ReleasedProductsV2", {"dataAreaId": company, "ItemNumber": "P-BAD1", "ProductName": "",
                                          "ProductType": "Item", "ItemModelGroupId": "", "SalesPrice": 0.0,
                                          "IsPhantom": "No"})
        lot = 0
        for o in range(1, 6):
            number = f"{prefix}SO-{o:05d}"
            sim.insert("SalesOrderHeadersV2", {
                "dataAreaId": company, "SalesOrderNumber": number, "CurrencyCode": currency,
                "OrderingCustomerAccountNumber": f"{prefix}-{o:03d}", "SalesOrderStatus": "Backorder"})
            for line in range(1, 3):
                lot += 1
                sim.insert("SalesOrderLines", {
                    "dataAreaId": company, "InventoryLotId": f"{prefix}L{lot:06d}", "SalesOrderNumber": number,
                    "ItemNumber": f"P-{1000 + line + o}", "OrderedSalesQuantity": float(line * o),
                    "SalesPrice": float(rng.randrange(50, 900)), "LineNumber": line})
