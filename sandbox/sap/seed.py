"""Seed data: customizing, materials, stock, prices, business partners and sales orders."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal

from sandbox.sap.app import SapSimulator
from sandbox.sap.codecs import _decimal_text
from sandbox.sap.gateway import DISTRIBUTION_CHANNEL, DIVISION, SALES_ORG

BAD_PARTNER_NO_NAME = "17100090"
"""Seeded partner without a name (OrganizationBPName1 empty)."""
BAD_PARTNER_CURRENCY = "17100091"
"""Seeded partner whose sales-area currency is XAU (no currency map entry in any flow)."""
BAD_ORDER = "4000099"
"""Seeded order with a text item that has no material."""

_CUSTOMERS = [
    ("Great Lakes Water Authority", "Detroit", "MI", "48226", "Woodward Ave", "735"),
    ("Cascade Paper Mills", "Tacoma", "WA", "98402", "Pacific Ave", "1102"),
    ("Lone Star Refining", "Houston", "TX", "77002", "Louisiana St", "909"),
    ("Appalachian Mining Co", "Pittsburgh", "PA", "15222", "Liberty Ave", "410"),
    ("Prairie Ethanol Partners", "Des Moines", "IA", "50309", "Grand Ave", "218"),
    ("Gulf Coast Chemicals", "Baton Rouge", "LA", "70801", "Florida St", "55"),
    ("Rocky Mountain Breweries", "Denver", "CO", "80202", "Blake St", "1600"),
    ("Sunbelt Municipal Utilities", "Phoenix", "AZ", "85004", "Washington St", "200"),
    ("Hudson Valley Dairy", "Albany", "NY", "12207", "State St", "75"),
    ("Bayou Pulp & Fiber", "Shreveport", "LA", "71101", "Texas St", "501"),
    ("Mojave Desalination", "Las Vegas", "NV", "89101", "Fremont St", "333"),
    ("Northwoods Timber Products", "Duluth", "MN", "55802", "Superior St", "22"),
]
_MATERIALS = [
    ("PV-PUMP-100", "Centrifugal pump CP-100", "PC", (), ("1710", "1720"), "1250.00"),
    ("PV-PUMP-250", "Centrifugal pump CP-250", "PC", (), ("1710",), "2890.00"),
    ("PV-VALVE-50", "Ball valve DN50", "EA", ("PC",), ("1710", "1720"), "185.50"),
    ("PV-SEALKIT", "Mechanical seal kit", "PC", ("BOX",), ("1710", "1720"), "42.00"),
    ("PV-GREASE", "Bearing grease, food grade", "KG", ("G",), ("1720",), "12.75"),
    ("PV-IMPELLER-8", "Impeller 8 inch, stainless", "PC", (), ("1710",), "310.00"),
    ("PV-MOTOR-7K5", "Motor 7.5 kW, IE3", "EA", ("PC",), ("1720",), "890.00"),
]


def seed_sap(sim: SapSimulator, *, partners: int = 12, orders: int = 8) -> None:
    """Deterministic data of a pump and valve manufacturer (sales org 1710), with a few deliberately bad records.

    Customizing: sales areas 1710/10/00 and 1710/20/00, plants 1710 and 1720, the materials in `_MATERIALS`
    (units PC, EA, KG ...) with their products, PR00 prices (list price in channel 10, 8% less in 20) and
    stock in every plant they are maintained in. Partners 17100001.. are organizations with one address (a
    phone number and an e-mail address on it in the US), roles FLCU00/FLCU01 and customer sales-area data in
    1710/10/00; orders 4000001.. have 1-3 items and spread over the delivery and billing statuses. Bad
    records: `BAD_PARTNER_NO_NAME`, `BAD_PARTNER_CURRENCY`, `BAD_ORDER`.
    """
    sim.add_sales_area(SALES_ORG, DISTRIBUTION_CHANNEL, DIVISION)
    sim.add_sales_area(SALES_ORG, "20", DIVISION)
    for index, (number, text, unit, units, plants, price) in enumerate(_MATERIALS):
        sim.add_material(number, text, unit, units=units, plants=plants, price=price,
                         stock={plant: (40 + 15 * index) if plant == "1710" else (12 + 4 * index) for plant in plants})
        # Dealers (channel 20) buy at a discount: a second PR00 record per material.
        sim.set_price(number, (Decimal(price) * Decimal("0.92")).quantize(Decimal("0.01")), sales_org=SALES_ORG,
                      channel="20")
    midnight = datetime(2025, 11, 3, tzinfo=UTC)
    numbers: list[str] = []
    rows = [(f"171000{i:02d}", *_CUSTOMERS[(i - 1) % len(_CUSTOMERS)]) for i in range(1, partners + 1)]
    rows += [(BAD_PARTNER_NO_NAME, "", "Chicago", "IL", "60601", "Wacker Dr", "1"),
             (BAD_PARTNER_CURRENCY, "Goldleaf Trading AG", "Zurich", "", "8001", "Bahnhofstrasse", "10")]
    for number, name, city, region, postal, street, house in rows:
        numbers.append(number)
        sim.insert("A_BusinessPartner", {
            "BusinessPartner": number, "Customer": number, "BusinessPartnerCategory": "2",
            "BusinessPartnerGrouping": "BP02", "OrganizationBPName1": name, "BusinessPartnerFullName": name,
            "BusinessPartnerName": name, "SearchTerm1": name.split(" ")[0].upper()[:20] if name else "",
            "BusinessPartnerUUID": str(uuid.UUID(int=int(number))), "Language": "EN", "CorrespondenceLanguage": "EN",
            "BusinessPartnerIsBlocked": False, "IsMarkedForArchiving": False, "Industry": "1000",
            "CreationDate": midnight, "CreationTime": time(9, 30, 0), "CreatedByUser": "CB9980000010"})
        country = "CH" if number == BAD_PARTNER_CURRENCY else "US"
        sim.insert("A_BusinessPartnerAddress", {
            "BusinessPartner": number, "AddressID": str(27000 + int(number[-2:])), "CityName": city,
            "Country": country, "Region": region, "PostalCode": postal, "StreetName": street, "HouseNumber": house,
            "Language": "EN", "AddressTimeZone": "EST" if country == "US" else "CET",
            "ValidityStartDate": datetime(2000, 1, 1, tzinfo=UTC), "ValidityEndDate": datetime(9999, 12, 31,
                                                                                               tzinfo=UTC)})
        if country == "US":
            address_id = str(27000 + int(number[-2:]))
            area_code = 200 + int(number[-2:]) * 7
            phone = {"AddressID": address_id, "Person": "", "OrdinalNumber": "1", "DestinationLocationCountry": "US",
                     "IsDefaultPhoneNumber": True, "PhoneNumber": f"+1 {area_code} 555 01{number[-2:]}",
                     "PhoneNumberExtension": "", "PhoneNumberType": "1"}
            sim._international(phone)
            sim.insert("A_AddressPhoneNumber", phone)
            domain = "".join(ch for ch in (name or "example").lower() if ch.isalnum())[:20]
            sim.insert("A_AddressEmailAddress", {
                "AddressID": address_id, "Person": "", "OrdinalNumber": "1", "IsDefaultEmailAddress": True,
                "EmailAddress": f"purchasing@{domain}.com", "SearchEmailAddress": f"PURCHASING@{domain.upper()}"[:20]})
        for role in ("FLCU00", "FLCU01"):
            sim.insert("A_BusinessPartnerRole", {"BusinessPartner": number, "BusinessPartnerRole": role,
                                                 "ValidFrom": datetime(2000, 1, 1, tzinfo=UTC),
                                                 "ValidTo": datetime(9999, 12, 31, tzinfo=UTC)})
        sim.insert("A_Customer", {"Customer": number, "CustomerAccountGroup": "CUST", "CustomerName": name,
                                  "CustomerFullName": name, "DeletionIndicator": False,
                                  "OrderIsBlockedForCustomer": False, "CreationDate": midnight,
                                  "CreatedByUser": "CB9980000010"})
        sim.insert("A_CustomerSalesArea", {
            "Customer": number, "SalesOrganization": SALES_ORG, "DistributionChannel": DISTRIBUTION_CHANNEL,
            "Division": DIVISION, "Currency": "XAU" if number == BAD_PARTNER_CURRENCY else "USD",
            "CustomerPaymentTerms": "NT30", "IncotermsClassification": "FOB", "IncotermsLocation1": "Palo Alto",
            "ShippingCondition": "01", "CustomerPricingProcedure": "01", "CustomerAccountAssignmentGroup": "01",
            "CustomerGroup": "01", "SupplyingPlant": "1710", "DeletionIndicator": False,
            "OrderIsBlockedForCustomer": False})
    stages = [("A", "A", "A", "A"), ("B", "C", "A", "A"), ("B", "C", "C", "A"), ("C", "C", "C", "C")]
    for o in range(1, orders + 1):
        number = f"40000{o:02d}"
        process, delivery, total_delivery, billing = stages[o % len(stages)]
        sold_to = numbers[(o - 1) % partners]
        sim.insert("A_SalesOrder", {
            "SalesOrder": number, "SalesOrderType": "OR", "SalesOrganization": SALES_ORG,
            "DistributionChannel": DISTRIBUTION_CHANNEL, "OrganizationDivision": DIVISION, "SoldToParty": sold_to,
            "PurchaseOrderByCustomer": f"PO-{7300 + o}", "CustomerPurchaseOrderDate": midnight,
            "SalesOrderDate": midnight, "CreationDate": midnight, "CreatedByUser": "CB9980000010",
            "TransactionCurrency": "USD", "CustomerPaymentTerms": "NT30", "IncotermsClassification": "FOB",
            "RequestedDeliveryDate": midnight + timedelta(days=14), "OverallSDProcessStatus": process,
            "OverallDeliveryStatus": delivery, "OverallTotalDeliveryStatus": total_delivery,
            "OverallOrdReltdBillgStatus": billing, "TotalBlockStatus": "", "OverallSDDocumentRejectionSts": "A",
            "TotalCreditCheckStatus": "", "CompleteDeliveryIsDefined": False})
        total = Decimal(0)
        for line in range(1, (o % 3) + 2):
            material = sim.customizing.materials[_MATERIALS[(o + line) % len(_MATERIALS)][0]]
            quantity = Decimal(line * 2 + o % 4)
            net = quantity * material.price
            total += net
            sim.insert("A_SalesOrderItem", {
                "SalesOrder": number, "SalesOrderItem": str(line * 10), "SalesOrderItemCategory": "TAN",
                "SalesOrderItemText": material.text, "Material": material.number,
                "RequestedQuantity": _decimal_text("RequestedQuantity", quantity),
                "RequestedQuantityUnit": material.base_unit, "NetAmount": _decimal_text("NetAmount", net),
                "TransactionCurrency": "USD", "MaterialGroup": material.group,
                "ProductionPlant": sorted(material.plants)[0], "PurchaseOrderByCustomer": f"PO-{7300 + o}",
                "SDProcessStatus": process, "DeliveryStatus": delivery, "OrderRelatedBillingStatus": billing})
        order = sim._rows["A_SalesOrder"][(number,)]
        order["TotalNetAmount"] = _decimal_text("TotalNetAmount", total)
    sim.insert("A_SalesOrder", {
        "SalesOrder": BAD_ORDER, "SalesOrderType": "OR", "SalesOrganization": SALES_ORG,
        "DistributionChannel": DISTRIBUTION_CHANNEL, "OrganizationDivision": DIVISION, "SoldToParty": numbers[0],
        "PurchaseOrderByCustomer": "PO-TEXT-ONLY", "SalesOrderDate": midnight, "CreationDate": midnight,
        "CreatedByUser": "CB9980000010", "TransactionCurrency": "USD", "TotalNetAmount": "0.00",
        "OverallSDProcessStatus": "A", "OverallDeliveryStatus": "A", "OverallTotalDeliveryStatus": "A",
        "OverallOrdReltdBillgStatus": "A", "OverallSDDocumentRejectionSts": "A"})
    sim.insert("A_SalesOrderItem", {
        "SalesOrder": BAD_ORDER, "SalesOrderItem": "10", "SalesOrderItemCategory": "TATX",
        "SalesOrderItemText": "Please call before delivery", "Material": "", "RequestedQuantity": "0.000",
        "RequestedQuantityUnit": "", "NetAmount": "0.00", "TransactionCurrency": "USD", "SDProcessStatus": "A",
        "DeliveryStatus": "", "OrderRelatedBillingStatus": ""})
