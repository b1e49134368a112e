"""Writes and their business rules: validation against customizing, deep inserts, updates, deletes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

from sandbox.sap.codecs import _decimal_text, from_wire
from sandbox.sap.gateway import (
    _ADDRESS_FIELDS,
    _CUSTOMER_FIELDS,
    _ITEM_FIELDS,
    _SALES_AREA_FIELDS,
    COMMUNICATION,
    DELETABLE,
    DIALING_CODES,
    GatewayError,
    _bad,
)
from sandbox.sap.rows import _blank
from sandbox.sap.schema import (
    ENTITIES,
)
from sandbox.sap.store import SapStore


class SapRules(SapStore):
    """What S/4HANA checks and derives on each create, update and delete."""

    def _fields(self, entity: str, values: Mapping[str, Any]) -> dict[str, Any]:
        definition = ENTITIES[entity]
        out: dict[str, Any] = {}
        for name, raw in values.items():
            if name in definition.navs:
                continue
            if name not in definition.fields:
                raise _bad("/IWBEP/CM_MGW_RT/022", f"Property '{name}' is invalid: it is not part of "
                                                   f"'{definition.type_name}'", target=name)
            if name in definition.computed:
                continue
            out[name] = from_wire(entity, name, raw)
        return out

    # ------------------------------------------------------------------------------------ writes: orders

    def _validate_header(self, order: Mapping[str, Any]) -> None:
        cust = self.customizing
        for name in ("SalesOrderType", "SalesOrganization", "DistributionChannel", "OrganizationDivision",
                     "SoldToParty"):
            if not order.get(name):
                raise _bad("V1/390", f"Enter a value in field {name}", target=name)
        if order["SalesOrderType"] not in cust.order_types:
            raise _bad("V1/391", f"Sales document type {order['SalesOrderType']} is not defined", "SalesOrderType")
        org, channel, division = order["SalesOrganization"], order["DistributionChannel"], order["OrganizationDivision"]
        if org not in {a[0] for a in cust.sales_areas}:
            raise _bad("V1/320", f"Sales organization {org} is not defined", "SalesOrganization")
        if (org, channel) not in {a[:2] for a in cust.sales_areas}:
            raise _bad("V1/321", f"Distribution channel {channel} is not defined for sales organization {org}",
                       "DistributionChannel")
        if (org, channel, division) not in cust.sales_areas:
            raise _bad("V1/322", f"Division {division} is not defined for sales organization {org}, distribution "
                                 f"channel {channel}", "OrganizationDivision")
        sold_to = order["SoldToParty"]
        if (sold_to,) not in self._rows["A_Customer"]:
            raise _bad("V1/302", f"Sold-to party {sold_to} does not exist", "SoldToParty")
        area = self._rows["A_CustomerSalesArea"].get((sold_to, org, channel, division))
        if area is None:
            raise _bad("VP/200", f"Sold-to party {sold_to} is not maintained for sales area {org} {channel} "
                                 f"{division}", "SoldToParty")
        if area.get("OrderIsBlockedForCustomer"):
            raise _bad("V1/462", f"Sold-to party {sold_to} is blocked for sales orders in sales area {org} "
                                 f"{channel} {division}", "SoldToParty")

    def _validate_item(self, item: dict[str, Any], order: Mapping[str, Any]) -> None:
        cust = self.customizing
        number = item.get("SalesOrderItem")
        material_no = item.get("Material")
        if not material_no:
            raise _bad("V1/123", f"Item {number}: enter a material", "Material")
        material = cust.materials.get(material_no)
        if material is None:
            raise _bad("M3/305", f"Material {material_no} does not exist (item {number})", "Material")
        unit = item.get("RequestedQuantityUnit") or material.base_unit
        if unit not in cust.units:
            raise _bad("CUNI/005", f"Unit {unit} is not defined; check your entry (item {number})",
                       "RequestedQuantityUnit")
        if unit not in material.units:
            raise _bad("M3/201", f"Unit {unit} is not defined for material {material_no} (allowed: "
                                 f"{', '.join(sorted(material.units))})", "RequestedQuantityUnit")
        item["RequestedQuantityUnit"] = unit
        plant = item.get("ProductionPlant") or sorted(material.plants)[0]
        if plant not in cust.plants:
            raise _bad("M3/300", f"Plant {plant} does not exist (item {number})", "ProductionPlant")
        if plant not in material.plants:
            raise _bad("M3/351", f"Material {material_no} is not maintained in plant {plant}", "ProductionPlant")
        item["ProductionPlant"] = plant
        quantity = Decimal(item.get("RequestedQuantity") or "0")
        if quantity <= 0:
            raise _bad("V1/455", f"Item {number}: enter a quantity greater than zero", "RequestedQuantity")
        item.setdefault("SalesOrderItemCategory", "TAN")
        item["SalesOrderItemText"] = item.get("SalesOrderItemText") or material.text
        item["MaterialGroup"] = material.group
        item["TransactionCurrency"] = order.get("TransactionCurrency")
        item["NetAmount"] = _decimal_text("NetAmount", quantity * material.price)

    def _totals(self, order: dict[str, Any]) -> None:
        items = self._children("A_SalesOrder", order, "to_Item")
        order["TotalNetAmount"] = _decimal_text("TotalNetAmount",
                                                sum((Decimal(i.get("NetAmount") or "0") for i in items), Decimal(0)))

    def _create_order(self, values: dict[str, Any]) -> dict[str, Any]:
        raw_items = values.pop("to_Item", None)
        values.pop("to_Partner", None)
        for name in list(values):
            if name in ENTITIES["A_SalesOrder"].navs:
                raise _bad("/IWBEP/CM_MGW_RT/024", f"Deep insert of '{name}' is not supported with A_SalesOrder")
        if values.get("SalesOrder"):
            raise _bad("V1/008", f"External number {values['SalesOrder']} is not allowed: sales document numbers are "
                                 "assigned internally", "SalesOrder")
        header = self._fields("A_SalesOrder", values)
        header.setdefault("SalesOrderType", "OR")
        self._validate_header(header)
        org, channel, division = header["SalesOrganization"], header["DistributionChannel"], \
            header["OrganizationDivision"]
        area = self._rows["A_CustomerSalesArea"][(header["SoldToParty"], org, channel, division)]
        header["TransactionCurrency"] = header.get("TransactionCurrency") or area.get("Currency")
        if header["TransactionCurrency"] not in self.customizing.currencies:
            raise _bad("V1/410", f"Currency {header['TransactionCurrency']} is not defined", "TransactionCurrency")
        header.setdefault("CustomerPaymentTerms", area.get("CustomerPaymentTerms"))
        header.setdefault("IncotermsClassification", area.get("IncotermsClassification"))
        items_list = raw_items.get("results") if isinstance(raw_items, dict) else raw_items
        if not isinstance(items_list, list) or not items_list:
            raise _bad("V1/555", "The sales document contains no items; send to_Item with at least one item")
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, raw in enumerate(items_list, start=1):
            if not isinstance(raw, dict):
                raise _bad("/IWBEP/CM_MGW_RT/013", "Each to_Item entry must be a JSON object")
            raw = {k: v for k, v in raw.items() if k not in ("__metadata", "SalesOrder")}
            item = self._fields("A_SalesOrderItem", {k: v for k, v in raw.items()
                                                     if k not in ENTITIES["A_SalesOrderItem"].navs})
            item["SalesOrderItem"] = str(int(item.get("SalesOrderItem") or i * 10))
            if item["SalesOrderItem"] in seen:
                raise _bad("V1/047", f"Item {item['SalesOrderItem']} occurs more than once", "SalesOrderItem")
            seen.add(item["SalesOrderItem"])
            self._validate_item(item, header)
            items.append(item)
        number = self._next_number("SalesOrder")
        now = self._now()
        order = _blank(ENTITIES["A_SalesOrder"].fields)
        order.update(header, SalesOrder=number, CreationDate=datetime.combine(now.date(), time(), UTC),
                     CreatedByUser=self.user, OverallSDProcessStatus="A", OverallTotalDeliveryStatus="A",
                     OverallDeliveryStatus="A", OverallOrdReltdBillgStatus="A", TotalBlockStatus="",
                     OverallSDDocumentRejectionSts="A", TotalCreditCheckStatus="")
        order["SalesOrderDate"] = order.get("SalesOrderDate") or order["CreationDate"]
        self._rows["A_SalesOrder"][(number,)] = order
        for item in items:
            row = _blank(ENTITIES["A_SalesOrderItem"].fields)
            row.update(item, SalesOrder=number, SDProcessStatus="A", DeliveryStatus="A", OrderRelatedBillingStatus="A",
                       _stamp=self._now())
            self._rows["A_SalesOrderItem"][(number, row["SalesOrderItem"])] = row
        self._totals(order)
        self._touch("A_SalesOrder", order, created=True)
        return order

    def _update_order(self, order: dict[str, Any], values: Mapping[str, Any]) -> None:
        changes = self._fields("A_SalesOrder", values)
        if "SalesOrder" in changes and changes.pop("SalesOrder") != order["SalesOrder"]:
            raise _bad("/IWBEP/CM_MGW_RT/025", "Key property SalesOrder cannot be changed", "SalesOrder")
        for name in ("SalesOrganization", "DistributionChannel", "OrganizationDivision"):
            if name in changes and changes[name] != order.get(name):
                raise _bad("V1/041", f"{name} cannot be changed in an existing sales document ({order[name]})", name)
        merged = {**order, **changes}
        self._validate_header(merged)
        order.update(changes)

    def _item_change(self, order: dict[str, Any], item: dict[str, Any], changes: Mapping[str, Any]) -> None:
        if order.get("OverallDeliveryStatus") == "C" and any(
                k in changes for k in ("Material", "RequestedQuantity", "RequestedQuantityUnit", "ProductionPlant")):
            raise _bad("V1/036", f"Item {item['SalesOrderItem']} of sales document {order['SalesOrder']} has been "
                                 "delivered and can no longer be changed")
        merged = {**item, **changes}
        self._validate_item(merged, order)
        item.update(merged)
        item["_stamp"] = self._now()
        self._totals(order)

    # ------------------------------------------------------------------------------------ writes: partners

    def _partner_names(self, bp: dict[str, Any]) -> None:
        if bp.get("BusinessPartnerCategory") == "1":
            name = " ".join(p for p in (bp.get("FirstName"), bp.get("LastName")) if p)
        else:
            name = " ".join(p for p in (bp.get("OrganizationBPName1"), bp.get("OrganizationBPName2")) if p)
        bp["BusinessPartnerFullName"] = bp["BusinessPartnerName"] = name

    def _validate_partner(self, bp: Mapping[str, Any]) -> None:
        category = bp.get("BusinessPartnerCategory")
        if category not in ("1", "2", "3"):
            raise _bad("R11/201", f"Business partner category {category!r} is not valid (1 person, 2 organization, "
                                  "3 group)", "BusinessPartnerCategory")
        if bp.get("BusinessPartnerGrouping") not in self.customizing.groupings:
            raise _bad("R11/124", f"Grouping {bp.get('BusinessPartnerGrouping')} is not defined",
                       "BusinessPartnerGrouping")
        if category == "2" and not bp.get("OrganizationBPName1"):
            raise _bad("R11/401", "Enter a name for the organization (OrganizationBPName1)", "OrganizationBPName1")
        if category == "1" and not bp.get("LastName"):
            raise _bad("R11/402", "Enter a last name for the person", "LastName")

    def _validate_address(self, address: Mapping[str, Any]) -> None:
        country = address.get("Country")
        if not country:
            raise _bad("AM/215", "Enter a country for the address", "Country")
        if country not in self.customizing.countries:
            raise _bad("AM/216", f"Country {country} is not defined", "Country")

    def _validate_sales_area(self, area: Mapping[str, Any]) -> None:
        key = (area.get("SalesOrganization"), area.get("DistributionChannel"), area.get("Division"))
        if key not in self.customizing.sales_areas:
            raise _bad("F2/609", f"Sales area {' '.join(str(k) for k in key)} is not defined", "SalesOrganization")
        currency = area.get("Currency")
        if currency and currency not in self.customizing.currencies:
            raise _bad("F2/165", f"Currency {currency} is not defined", "Currency")

    @staticmethod
    def _nav_list(raw: Any, name: str) -> list[dict[str, Any]]:
        if raw is None:
            return []
        items = raw.get("results") if isinstance(raw, dict) and "results" in raw else raw
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise _bad("/IWBEP/CM_MGW_RT/013", f"'{name}' must be {{\"results\": [ ... ]}} of JSON objects")
        return items

    def _create_partner(self, values: dict[str, Any]) -> dict[str, Any]:
        addresses = self._nav_list(values.pop("to_BusinessPartnerAddress", None), "to_BusinessPartnerAddress")
        roles = self._nav_list(values.pop("to_BusinessPartnerRole", None), "to_BusinessPartnerRole")
        customer_raw = values.pop("to_Customer", None)
        if customer_raw is not None and not isinstance(customer_raw, dict):
            raise _bad("/IWBEP/CM_MGW_RT/013", "'to_Customer' must be a JSON object")
        if values.get("BusinessPartner"):
            raise _bad("R11/084", f"Business partner number {values['BusinessPartner']} cannot be specified: the "
                                  "grouping uses internal number assignment", "BusinessPartner")
        bp = _blank(ENTITIES["A_BusinessPartner"].fields)
        bp.update(self._fields("A_BusinessPartner", values))
        bp["BusinessPartnerGrouping"] = bp.get("BusinessPartnerGrouping") or "BP01"
        bp["BusinessPartnerIsBlocked"] = bool(bp.get("BusinessPartnerIsBlocked"))
        bp["IsMarkedForArchiving"] = bool(bp.get("IsMarkedForArchiving"))
        self._validate_partner(bp)
        self._partner_names(bp)
        parsed_addresses = []
        for raw in addresses:
            address = self._fields("A_BusinessPartnerAddress", {k: v for k, v in raw.items() if k != "__metadata"})
            self._validate_address(address)
            parsed_addresses.append((address, self._communication(raw, address)))
        role_names = []
        for raw in roles:
            role = self._fields("A_BusinessPartnerRole", {k: v for k, v in raw.items() if k != "__metadata"})
            if role.get("BusinessPartnerRole") not in self.customizing.roles:
                raise _bad("R11/657", f"Business partner role {role.get('BusinessPartnerRole')} is not defined",
                           "BusinessPartnerRole")
            role_names.append(str(role["BusinessPartnerRole"]))
        customer: dict[str, Any] | None = None
        areas: list[dict[str, Any]] = []
        if customer_raw is not None:
            if not {"FLCU00", "FLCU01"} & set(role_names):
                raise _bad("R11/658", "Customer data (to_Customer) needs business partner role FLCU01 or FLCU00 in "
                                      "to_BusinessPartnerRole", "to_BusinessPartnerRole")
            area_list = self._nav_list(customer_raw.get("to_CustomerSalesArea"), "to_CustomerSalesArea")
            customer = self._fields("A_Customer", {k: v for k, v in customer_raw.items()
                                                   if k not in ("__metadata", "to_CustomerSalesArea")})
            for raw in area_list:
                area = self._fields("A_CustomerSalesArea", {k: v for k, v in raw.items() if k != "__metadata"})
                self._validate_sales_area(area)
                areas.append(area)
        number = self._next_number("BusinessPartner")
        bp["BusinessPartner"] = number
        bp["BusinessPartnerUUID"] = str(uuid.uuid4())
        self._rows["A_BusinessPartner"][(number,)] = bp
        for address, communication in parsed_addresses:
            self._add_communication(self._add_address(number, address), communication)
        for role_name in role_names:
            self._add_role(number, role_name)
        if customer is not None:
            self._ensure_customer(bp, customer)
            for area in areas:
                self._add_sales_area(number, area)
        self._touch("A_BusinessPartner", bp, created=True)
        return bp

    def _add_address(self, partner: str, address: Mapping[str, Any]) -> dict[str, Any]:
        row = _blank(_ADDRESS_FIELDS)
        row.update(address, BusinessPartner=partner, AddressID=self._next_number("AddressID"))
        row["Language"] = row.get("Language") or "EN"
        row["ValidityStartDate"] = row.get("ValidityStartDate") or datetime(2000, 1, 1, tzinfo=UTC)
        row["ValidityEndDate"] = row.get("ValidityEndDate") or datetime(9999, 12, 31, tzinfo=UTC)
        self._rows["A_BusinessPartnerAddress"][(partner, row["AddressID"])] = row
        return row

    def _communication(self, raw: Mapping[str, Any], address: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
        """Phone numbers and e-mail addresses deep-inserted with an address, parsed and validated."""
        out: dict[str, list[dict[str, Any]]] = {}
        for nav, entity in COMMUNICATION.items():
            entries = []
            for item in self._nav_list(raw.get(nav), nav):
                values = self._fields(entity, {k: v for k, v in item.items()
                                               if k not in ("__metadata", "AddressID", "OrdinalNumber")})
                self._validate_communication(entity, values, address)
                entries.append(values)
            out[nav] = entries
        return out

    def _validate_communication(self, entity: str, values: dict[str, Any], address: Mapping[str, Any]) -> None:
        if entity == "A_AddressPhoneNumber":
            number = str(values.get("PhoneNumber") or "")
            if not number.strip():
                raise _bad("AM/171", "Enter a telephone number", "PhoneNumber")
            if not re.fullmatch(r"[+0-9 ()/\-]{3,30}", number):
                raise _bad("AM/172", f"Telephone number {number} contains invalid characters", "PhoneNumber")
            country = values.get("DestinationLocationCountry") or address.get("Country")
            if country and country not in self.customizing.countries:
                raise _bad("AM/216", f"Country {country} is not defined", "DestinationLocationCountry")
            values["DestinationLocationCountry"] = country
        else:
            email = str(values.get("EmailAddress") or "")
            if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
                raise _bad("AM/176", f"E-mail address {email!r} is not valid", "EmailAddress")

    def _add_communication(self, address: Mapping[str, Any], entries: Mapping[str, list[dict[str, Any]]]) -> None:
        for nav, items in entries.items():
            for values in items:
                self._add_comm_row(COMMUNICATION[nav], address, values)

    def _add_comm_row(self, entity: str, address: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        existing = self._rows[entity].with_first(str(address["AddressID"]))
        row = _blank(ENTITIES[entity].fields)
        row.update(values, AddressID=address["AddressID"], Person=str(values.get("Person") or ""),
                   OrdinalNumber=str(max((int(r["OrdinalNumber"]) for r in existing), default=0) + 1))
        if entity == "A_AddressPhoneNumber":
            row["IsDefaultPhoneNumber"] = not existing or bool(values.get("IsDefaultPhoneNumber"))
            row["PhoneNumberType"] = row.get("PhoneNumberType") or "1"
            self._international(row)
        else:
            row["IsDefaultEmailAddress"] = not existing or bool(values.get("IsDefaultEmailAddress"))
            row["SearchEmailAddress"] = str(row.get("EmailAddress") or "").upper()[:20]
        self._rows[entity][(row["AddressID"], row["Person"], row["OrdinalNumber"])] = row
        return row

    @staticmethod
    def _international(row: dict[str, Any]) -> None:
        number = str(row.get("PhoneNumber") or "")
        digits = re.sub(r"[^0-9]", "", number)
        prefix = DIALING_CODES.get(str(row.get("DestinationLocationCountry") or ""), "")
        national = digits[len(prefix) - 1:] if number.startswith("+") and prefix else digits.lstrip("0")
        row["InternationalPhoneNumber"] = (prefix + national + (row.get("PhoneNumberExtension") or "")) \
            if prefix else number

    def _add_role(self, partner: str, role: str) -> dict[str, Any]:
        row = {"BusinessPartner": partner, "BusinessPartnerRole": role,
               "ValidFrom": datetime(2000, 1, 1, tzinfo=UTC), "ValidTo": datetime(9999, 12, 31, tzinfo=UTC)}
        self._rows["A_BusinessPartnerRole"][(partner, role)] = row
        bp = self._rows["A_BusinessPartner"][(partner,)]
        if role in ("FLCU00", "FLCU01"):
            self._ensure_customer(bp, {})
        return row

    def _ensure_customer(self, bp: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        number = bp["BusinessPartner"]
        row = self._rows["A_Customer"].get((number,))
        if row is None:
            row = _blank(_CUSTOMER_FIELDS)
            row.update(Customer=number, CustomerAccountGroup="CUST", CreatedByUser=self.user,
                       CreationDate=datetime.combine(self._now().date(), time(), UTC), DeletionIndicator=False,
                       OrderIsBlockedForCustomer=False)
            self._rows["A_Customer"][(number,)] = row
            bp["Customer"] = number
        row.update(values)
        row["CustomerName"] = row.get("CustomerName") or bp.get("BusinessPartnerName")
        row["CustomerFullName"] = bp.get("BusinessPartnerFullName")
        return row

    def _add_sales_area(self, customer: str, area: Mapping[str, Any]) -> dict[str, Any]:
        row = _blank(_SALES_AREA_FIELDS)
        row.update(area, Customer=customer)
        row["DeletionIndicator"] = bool(row.get("DeletionIndicator"))
        row["OrderIsBlockedForCustomer"] = bool(row.get("OrderIsBlockedForCustomer"))
        key = (customer, str(row["SalesOrganization"]), str(row["DistributionChannel"]), str(row["Division"]))
        if key in self._rows["A_CustomerSalesArea"]:
            raise _bad("F2/610", f"Customer {customer} already exists in sales area {' '.join(key[1:])}")
        self._rows["A_CustomerSalesArea"][key] = row
        return row

    # ------------------------------------------------------------------------------------ writes: dispatch

    def _owner(self, entity: str, row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The document a row belongs to (its change stamps move when the row changes)."""
        if entity in ("A_SalesOrder", "A_SalesOrderItem"):
            return "A_SalesOrder", self._rows["A_SalesOrder"][(str(row["SalesOrder"]),)]
        if entity == "A_Customer" or entity == "A_CustomerSalesArea":
            return "A_BusinessPartner", self._rows["A_BusinessPartner"][(str(row["Customer"]),)]
        if entity in ("A_AddressPhoneNumber", "A_AddressEmailAddress"):
            address = next(a for a in self._rows["A_BusinessPartnerAddress"].values()
                           if a["AddressID"] == row["AddressID"])
            return "A_BusinessPartner", self._rows["A_BusinessPartner"][(str(address["BusinessPartner"]),)]
        return "A_BusinessPartner", self._rows["A_BusinessPartner"][(str(row["BusinessPartner"]),)]

    def _create_child(self, entity: str, parent: dict[str, Any], nav: str, values: dict[str, Any]) -> dict[str, Any]:
        target = ENTITIES[entity].navs[nav].target
        for child_field, parent_field in ENTITIES[entity].navs[nav].link:
            if values.get(child_field) not in (None, "", parent.get(parent_field)):
                raise _bad("/IWBEP/CM_MGW_RT/025", f"{child_field} must be {parent.get(parent_field)} (the parent)")
            values.pop(child_field, None)
        fields = self._fields(target, values)
        if target == "A_SalesOrderItem":
            existing = self._children(entity, parent, nav)
            number = str(int(fields.get("SalesOrderItem") or
                             (max((int(i["SalesOrderItem"]) for i in existing), default=0) + 10)))
            if any(i["SalesOrderItem"] == number for i in existing):
                raise _bad("V1/047", f"Item {number} already exists in sales document {parent['SalesOrder']}")
            item = _blank(_ITEM_FIELDS)
            item.update(fields, SalesOrder=parent["SalesOrder"], SalesOrderItem=number, SDProcessStatus="A",
                        DeliveryStatus="A", OrderRelatedBillingStatus="A")
            self._validate_item(item, parent)
            item["_stamp"] = self._now()
            self._rows[target][(parent["SalesOrder"], number)] = item
            self._totals(parent)
            self._touch("A_SalesOrder", parent)
            return item
        if target == "A_BusinessPartnerAddress":
            self._validate_address(fields)
            communication = self._communication(values, fields)
            row = self._add_address(parent["BusinessPartner"], fields)
            self._add_communication(row, communication)
        elif target in ("A_AddressPhoneNumber", "A_AddressEmailAddress"):
            fields.pop("OrdinalNumber", None)
            self._validate_communication(target, fields, parent)
            row = self._add_comm_row(target, parent, fields)
        elif target == "A_BusinessPartnerRole":
            if fields.get("BusinessPartnerRole") not in self.customizing.roles:
                raise _bad("R11/657", f"Business partner role {fields.get('BusinessPartnerRole')} is not defined")
            row = self._add_role(parent["BusinessPartner"], str(fields["BusinessPartnerRole"]))
        elif target == "A_CustomerSalesArea":
            self._validate_sales_area(fields)
            row = self._add_sales_area(parent["Customer"], fields)
        else:
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Create of {target} is not supported")
        owner_entity, owner = self._owner(target, row)
        self._touch(owner_entity, owner)
        return row

    def _update(self, entity: str, row: dict[str, Any], values: Mapping[str, Any]) -> None:
        definition = ENTITIES[entity]
        for name in definition.keys:
            if name in values and str(values[name]) != str(row[name]):
                raise _bad("/IWBEP/CM_MGW_RT/025", f"Key property {name} cannot be changed", name)
        values = {k: v for k, v in values.items() if k not in definition.keys}
        if entity == "A_SalesOrder":
            self._update_order(row, values)
            self._totals(row)
        elif entity == "A_SalesOrderItem":
            order = self._rows["A_SalesOrder"][(row["SalesOrder"],)]
            self._item_change(order, row, self._fields(entity, values))
        elif entity == "A_BusinessPartner":
            changes = self._fields(entity, values)
            if "BusinessPartnerCategory" in changes and changes["BusinessPartnerCategory"] != \
                    row["BusinessPartnerCategory"]:
                raise _bad("R11/203", "The business partner category cannot be changed", "BusinessPartnerCategory")
            merged = {**row, **changes}
            self._validate_partner(merged)
            row.update(changes)
            self._partner_names(row)
            customer = self._rows["A_Customer"].get((row["BusinessPartner"],))
            if customer is not None:
                customer["CustomerFullName"] = row["BusinessPartnerFullName"]
        elif entity == "A_BusinessPartnerAddress":
            merged = {**row, **self._fields(entity, values)}
            self._validate_address(merged)
            row.update(merged)
        elif entity == "A_CustomerSalesArea":
            merged = {**row, **self._fields(entity, values)}
            self._validate_sales_area(merged)
            row.update(merged)
        elif entity in ("A_AddressPhoneNumber", "A_AddressEmailAddress"):
            address = next(a for a in self._rows["A_BusinessPartnerAddress"].values()
                           if a["AddressID"] == row["AddressID"])
            merged = {**row, **self._fields(entity, values)}
            self._validate_communication(entity, merged, address)
            row.update(merged)
            if entity == "A_AddressPhoneNumber":
                self._international(row)
        else:
            row.update(self._fields(entity, values))
        owner_entity, owner = self._owner(entity, row)
        self._touch(owner_entity, owner)

    def _delete(self, entity: str, key: tuple[str, ...], row: dict[str, Any]) -> None:
        if entity not in DELETABLE:
            raise GatewayError(405, "/IWBEP/CM_MGW_RT/004", f"Method '{entity.upper()}_DELETE_ENTITY' not "
                                                            "implemented in data provider class")
        if entity == "A_SalesOrder":
            if row.get("OverallDeliveryStatus") != "A":
                raise _bad("V1/018", f"Sales document {row['SalesOrder']} has subsequent documents and cannot be "
                                     "deleted")
            for item in self._children(entity, row, "to_Item"):
                del self._rows["A_SalesOrderItem"][(item["SalesOrder"], item["SalesOrderItem"])]
            del self._rows[entity][key]
            return
        owner_entity, owner = self._owner(entity, row)
        del self._rows[entity][key]
        if entity == "A_SalesOrderItem":
            self._totals(owner)
        self._touch(owner_entity, owner)
