"""The S/4HANA data: stored rows and their stamps, relations, number ranges, customizing and stock knobs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import Any

from sandbox.odata import next_stamp
from sandbox.sap.codecs import _decimal_text, _sort_key
from sandbox.sap.events import SapEvents
from sandbox.sap.gateway import (
    _CONDITION_FIELDS,
    _PRODUCT_FIELDS,
    _VALIDITY_FIELDS,
    DISTRIBUTION_CHANNEL,
    DIVISION,
    PARTNER_CHANGED,
    PARTNER_CREATED,
    SALES_ORDER_CHANGED,
    SALES_ORDER_CREATED,
    SALES_ORG,
)
from sandbox.sap.rows import _blank
from sandbox.sap.schema import (
    ENTITIES,
)
from sandbox.sap.state import Material


class SapStore(SapEvents):
    """Rows by entity set, the customizing they are validated against, and the knobs tests use."""

    def add_sales_area(self, sales_org: str, channel: str, division: str) -> None:
        self.customizing.sales_areas.add((sales_org, channel, division))

    def add_material(self, number: str, text: str, base_unit: str, *, units: Iterable[str] = (),
                     plants: Iterable[str], price: str | Decimal, group: str = "P001",
                     stock: Mapping[str, str | int | Decimal] | None = None) -> None:
        """Customizing of a material plus what the product, pricing and availability APIs serve for it.

        Creates the A_Product with its English (and German) description and one A_ProductPlant per plant, a
        PR00 condition record with the list price for every sales organisation / distribution channel known
        so far (1710/10 when none is), and the unrestricted stock per plant (`stock`, default 0).
        """
        plants = list(plants)
        self.customizing.plants.update(plants)
        material = Material(number, text, base_unit, frozenset({base_unit, *units}), frozenset(plants),
                            Decimal(price), group)
        with self._lock:
            self.customizing.materials[number] = material
            today = datetime.combine(datetime.now(UTC).date(), time(), UTC)
            self._rows["A_Product"][(number,)] = {
                **_blank(_PRODUCT_FIELDS), "Product": number, "ProductType": "FERT", "CrossPlantStatus": "",
                "CreationDate": today, "CreatedByUser": "CB9980000010", "LastChangeDate": today,
                "LastChangedByUser": "CB9980000010", "LastChangeDateTime": self._now(), "IsMarkedForDeletion": False,
                "GrossWeight": "0.000", "NetWeight": "0.000", "WeightUnit": "KG", "ProductGroup": group,
                "BaseUnit": base_unit, "Division": DIVISION, "ItemCategoryGroup": "NORM"}
            self._rows["A_ProductDescription"][(number, "EN")] = {"Product": number, "Language": "EN",
                                                                  "ProductDescription": text}
            self._rows["A_ProductDescription"][(number, "DE")] = {"Product": number, "Language": "DE",
                                                                  "ProductDescription": f"{text} (DE)"}
            for plant in plants:
                self._rows["A_ProductPlant"][(number, plant)] = {
                    "Product": number, "Plant": plant, "AvailabilityCheckType": "02", "MRPType": "PD",
                    "ProcurementType": "E", "ProfitCenter": f"YB{plant[:2]}0", "IsMarkedForDeletion": False}
                self.stock[(number, plant)] = Decimal(str((stock or {}).get(plant, 0)))
            areas = sorted({a[:2] for a in self.customizing.sales_areas}) or [(SALES_ORG, DISTRIBUTION_CHANNEL)]
            for org, channel in areas:
                self._set_condition(number, org, channel, material.price)

    def set_stock(self, material: str, plant: str, qty: str | int | float | Decimal) -> None:
        """Unrestricted stock of `material` in `plant` (base unit): DetermineAvailabilityAt answers it from now."""
        with self._lock:
            if material not in self.customizing.materials:
                raise KeyError(f"unknown material {material!r}")
            if plant not in self.customizing.materials[material].plants:
                raise KeyError(f"material {material} is not maintained in plant {plant}")
            self.stock[(material, plant)] = Decimal(str(qty))

    def set_price(self, material: str, price: str | int | float | Decimal, *, sales_org: str | None = None,
                  channel: str | None = None) -> None:
        """Change the PR00 list price of `material` (all its condition records, or the one of org/channel).

        Without org/channel the material's order pricing (item NetAmount) follows too, as it would in SAP.
        """
        with self._lock:
            if material not in self.customizing.materials:
                raise KeyError(f"unknown material {material!r}")
            value = Decimal(str(price))
            if sales_org is None and channel is None:
                self.customizing.materials[material].price = value
                areas = {(v["SalesOrganization"], v["DistributionChannel"])
                         for v in self._rows["A_SlsPrcgCndnRecdValidity"].values()
                         if v["Material"] == material and v["ConditionType"] == "PR00"} or \
                    {(SALES_ORG, DISTRIBUTION_CHANNEL)}
            else:
                areas = {(sales_org or SALES_ORG, channel or DISTRIBUTION_CHANNEL)}
            for org, chan in sorted(areas):
                self._set_condition(material, org, chan, value)

    def _set_condition(self, material: str, org: str, channel: str, price: Decimal) -> None:
        """The PR00 record of material/org/channel valid today: changed in place, or created."""
        for validity in self._rows["A_SlsPrcgCndnRecdValidity"].values():
            if (validity["Material"], validity["SalesOrganization"], validity["DistributionChannel"],
                    validity["ConditionType"]) == (material, org, channel, "PR00"):
                record = self._rows["A_SlsPrcgConditionRecord"][(validity["ConditionRecord"],)]
                record["ConditionRateValue"] = _decimal_text("ConditionRateValue", price)
                return
        number = f"{int(self._next_number('ConditionRecord')):010d}"
        start, end = datetime(2020, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)
        unit = self.customizing.materials[material].base_unit
        self._rows["A_SlsPrcgConditionRecord"][(number,)] = {
            **_blank(_CONDITION_FIELDS), "ConditionRecord": number, "ConditionSequentialNumber": "01",
            "ConditionTable": "304", "ConditionApplication": "V", "ConditionType": "PR00",
            "ConditionValidityStartDate": start, "ConditionValidityEndDate": end, "CreatedByUser": "CB9980000010",
            "CreationDate": datetime(2020, 1, 1, tzinfo=UTC), "ConditionCalculationType": "C",
            "ConditionRateValue": _decimal_text("ConditionRateValue", price), "ConditionRateValueUnit": "USD",
            "ConditionQuantity": "1", "ConditionQuantityUnit": unit, "BaseUnit": unit, "ConditionIsDeleted": False,
            "ConditionCurrency": "USD"}
        self._rows["A_SlsPrcgCndnRecdValidity"][(number, str(end))] = {
            **_blank(_VALIDITY_FIELDS), "ConditionRecord": number, "ConditionValidityEndDate": end,
            "ConditionValidityStartDate": start, "ConditionApplication": "V", "ConditionType": "PR00",
            "ConditionReleaseStatus": "", "SalesOrganization": org, "DistributionChannel": channel, "Division": "",
            "Customer": "", "Material": material, "MaterialGroup": "", "Plant": ""}

    def get(self, entity: str, *key: str) -> dict[str, Any] | None:
        """A stored row (internal form: dates as datetime) by key values, or None."""
        with self._lock:
            row = self._rows[entity].get(tuple(key))
            return dict(row) if row is not None else None

    def all(self, entity: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._rows[entity].values()]

    def items_of(self, sales_order: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._children("A_SalesOrder", self._rows["A_SalesOrder"][(sales_order,)],
                                                    "to_Item")]

    def insert(self, entity: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Add a row directly (seeding: no validation, no event); values in stored form."""
        definition = ENTITIES[entity]
        with self._lock:
            row = _blank(definition.fields)
            row.update(values)
            key = tuple(str(row[k]) for k in definition.keys)
            if entity == "A_SalesOrder":
                row["LastChangeDateTime"] = row.get("LastChangeDateTime") or self._now()
            if entity == "A_SalesOrderItem":
                row["_stamp"] = self._now()
            if entity == "A_BusinessPartner":
                self._bp_stamp(row, created=True)
            self._rows[entity][key] = row
            return row

    def apply_change(self, entity: str, key: tuple[str, ...], changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change a sales order or business partner as a user in the SAP UI would (stamps, ETag, event)."""
        with self._lock:
            row = self._rows[entity][key]
            row.update(changes)
            self._touch(entity, row)
            return dict(row)

    def advance_order(self, sales_order: str, stage: str) -> dict[str, Any]:
        """Move an order on: "delivered" (outbound delivery created), "goods_issued", "billed".

        Delivered: OverallDeliveryStatus and the items' DeliveryStatus become C, processing B. Goods issued:
        OverallTotalDeliveryStatus C. Billed: OverallOrdReltdBillgStatus and the items' OrderRelatedBillingStatus
        C, OverallSDProcessStatus C (completed). LastChangeDateTime moves and a Changed event is raised.
        """
        with self._lock:
            order = self._rows["A_SalesOrder"][(sales_order,)]
            items = self._children("A_SalesOrder", order, "to_Item")
            if stage == "delivered":
                order.update(OverallDeliveryStatus="C", OverallSDProcessStatus="B")
                for item in items:
                    item.update(DeliveryStatus="C", SDProcessStatus="B")
            elif stage == "goods_issued":
                order.update(OverallDeliveryStatus="C", OverallTotalDeliveryStatus="C", OverallSDProcessStatus="B")
                for item in items:
                    item.update(DeliveryStatus="C", SDProcessStatus="B")
            elif stage == "billed":
                order.update(OverallOrdReltdBillgStatus="C", OverallSDProcessStatus="C")
                for item in items:
                    item.update(OrderRelatedBillingStatus="C", SDProcessStatus="C")
            else:
                raise ValueError(f"unknown stage {stage!r} (delivered, goods_issued, billed)")
            for item in items:
                item["_stamp"] = self._now()
            self._touch("A_SalesOrder", order)
            return dict(order)

    def _now(self) -> datetime:
        self._last_stamp = next_stamp(self._last_stamp)
        return self._last_stamp

    def _bp_stamp(self, row: dict[str, Any], *, created: bool) -> None:
        # BUT000 keeps dates and times to the second. The ETag adds the milliseconds of the (strictly increasing)
        # change clock so that two changes within one second still differ; clients treat it as opaque anyway.
        moment = self._now()
        now = moment.replace(microsecond=0)
        if created:
            row["CreationDate"] = row.get("CreationDate") or datetime.combine(now.date(), time(), UTC)
            row["CreationTime"] = row.get("CreationTime") or now.time()
            row["CreatedByUser"] = row.get("CreatedByUser") or self.user
        else:
            row["LastChangeDate"] = datetime.combine(now.date(), time(), UTC)
            row["LastChangeTime"] = now.time()
            row["LastChangedByUser"] = self.user
        by = self.user if not created else str(row.get("CreatedByUser") or self.user)
        row["ETag"] = f"{by}{moment.strftime('%Y%m%d%H%M%S')}{moment.microsecond // 1000:03d}"

    def _touch(self, entity: str, row: dict[str, Any], *, created: bool = False) -> None:
        if entity == "A_SalesOrder":
            row["LastChangeDateTime"] = self._now()
            if not created:
                row["LastChangeDate"] = datetime.combine(row["LastChangeDateTime"].date(), time(), UTC)
            self._event(SALES_ORDER_CREATED if created else SALES_ORDER_CHANGED, {
                "SalesOrder": row["SalesOrder"], "SalesOrderType": row.get("SalesOrderType"),
                "SalesOrganization": row.get("SalesOrganization"),
                "DistributionChannel": row.get("DistributionChannel"),
                "OrganizationDivision": row.get("OrganizationDivision"), "SoldToParty": row.get("SoldToParty")})
        elif entity == "A_BusinessPartner":
            self._bp_stamp(row, created=created)
            self._event(PARTNER_CREATED if created else PARTNER_CHANGED, {
                "BusinessPartner": row["BusinessPartner"],
                "BusinessPartnerCategory": row.get("BusinessPartnerCategory")})

    def _children(self, entity: str, parent: Mapping[str, Any], nav_name: str) -> list[dict[str, Any]]:
        nav = ENTITIES[entity].navs[nav_name]
        table = self._rows[nav.target]
        if len(nav.link) == 1 and nav.link[0][0] == ENTITIES[nav.target].keys[0]:
            value = parent.get(nav.link[0][1])
            rows = table.with_first(str(value)) if value is not None else []
        else:
            rows = [r for r in table.values()
                    if all(r.get(child) == parent.get(par) and parent.get(par) is not None for child, par in nav.link)]
        return sorted(rows, key=lambda r: _sort_key(nav.target, r))

    def _next_number(self, kind: str) -> str:
        self._numbers[kind] += 1
        return str(self._numbers[kind])
