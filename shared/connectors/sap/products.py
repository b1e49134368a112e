"""The ProductAvailability read model: A_Product joined with PR00 prices and availability per plant."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.connectors.sap.batch import _Part, _query, _Req
from shared.connectors.sap.client import SapHttp
from shared.connectors.sap.codecs import (
    _FETCH_CHUNK,
    AVAILABILITY_FUNCTION,
    AVAILABILITY_SERVICE,
    SYSTEM,
    _nav_rows,
    filter_literal,
    plain_value,
    quote_string,
    same_value,
)
from shared.connectors.sap.errors import error_for
from shared.core.errors import AuthError, TransientError
from shared.core.ports import SourceRecord

log = logging.getLogger(__name__)


class SapProducts(SapHttp):
    """ProductAvailability records, composed from three services."""

    async def _product_pages(self, products: Sequence[str] | None, unread: set[str] | None = None
                             ) -> AsyncIterator[list[SourceRecord]]:
        """ProductAvailability records: A_Product pages joined with PR00 prices and availability per plant.

        Products whose availability SAP refused are left out and added to `unread`.
        """
        what = "read of ProductAvailability"
        prices = await self._prices(products)
        params: dict[str, str] = {}
        if products is not None:
            params["$filter"] = " or ".join(f"Product eq {filter_literal(p, 'Product')}" for p in products)
        async for rows in self._raw_pages("A_Product", params, what):
            live = [r for r in rows if not r.get("IsMarkedForDeletion") and r.get("Product")]
            available = await self._availability(live)
            page: list[SourceRecord] = []
            for row in live:
                product = str(row["Product"])
                if product not in available:
                    if unread is not None:
                        unread.add(product)
                    continue
                price = prices.get(product)
                values = {
                    "Product": product, "ProductDescription": self._description(row),
                    "BaseUnit": row.get("BaseUnit"), "NetPrice": price[0] if price else None,
                    "Currency": price[1] if price else None, "AvailableQuantity": available[product]}
                digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
                page.append(SourceRecord(product, values, None, digest))
            yield page

    def _description(self, row: Mapping[str, Any]) -> str | None:
        texts = _nav_rows(row.get("to_Description"))
        chosen = next((t for t in texts if t.get("Language") == self.product_language), texts[0] if texts else None)
        return str(chosen.get("ProductDescription") or "") or None if chosen else None

    async def _prices(self, products: Sequence[str] | None) -> dict[str, tuple[float, str | None]]:
        """Material -> (PR00 price per base unit, currency) valid today in the pricing sales area."""
        today = datetime.now(UTC).date()
        text = (f"ConditionType eq 'PR00' and SalesOrganization eq "
                f"{filter_literal(self.price_sales_organization)} and DistributionChannel eq "
                f"{filter_literal(self.price_distribution_channel)} and ConditionValidityStartDate le "
                f"{filter_literal(today)} and ConditionValidityEndDate ge {filter_literal(today)}")
        if products is not None:
            text += " and (" + " or ".join(f"Material eq {filter_literal(p)}" for p in products) + ")"
        best: dict[str, tuple[str, float, str | None]] = {}
        async for rows in self._raw_pages("A_SlsPrcgCndnRecdValidity", {"$filter": text}, "read of PR00 prices"):
            for validity in rows:
                record = validity.get("to_SlsPrcgConditionRecord")
                material = str(validity.get("Material") or "")
                if not isinstance(record, dict) or not material or record.get("ConditionIsDeleted"):
                    continue
                try:
                    rate = Decimal(str(record.get("ConditionRateValue") or "0"))
                    per = Decimal(str(record.get("ConditionQuantity") or "1")) or Decimal(1)
                except InvalidOperation:
                    log.warning("%s: PR00 record %s has no readable rate", SYSTEM, record.get("ConditionRecord"))
                    continue
                start = str(plain_value(validity.get("ConditionValidityStartDate")) or "")
                # Several valid records: the one that started last is the one pricing uses.
                if material not in best or start > best[material][0]:
                    best[material] = (start, float(rate / per), record.get("ConditionCurrency") or None)
        return {m: (price, currency) for m, (_, price, currency) in best.items()}

    async def _availability(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Product -> available quantity summed over `availability_plants` the product is maintained in.

        Products that SAP refuses to answer for are left out (and kept as they were by change detection).
        """
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S") + "Z"
        pairs: list[tuple[str, str]] = []
        totals: dict[str, float] = {}
        for row in rows:
            product = str(row["Product"])
            totals[product] = 0.0
            plants = {str(p.get("Plant")) for p in _nav_rows(row.get("to_Plant")) if not p.get("IsMarkedForDeletion")}
            pairs += [(product, plant) for plant in self.availability_plants if plant in plants]
        if not pairs:
            return totals

        def request(product: str, plant: str) -> _Req:
            params = {"SupplyingPlant": quote_string(plant), "Material": quote_string(product),
                      "ATPCheckingRule": quote_string(self.atp_checking_rule),
                      "RequestedUTCDateTime": f"datetimeoffset'{now}'"}
            return _Req("GET", f"{AVAILABILITY_FUNCTION}?{_query(params)}", f"availability of {product} in {plant}")

        root = self._root_of(AVAILABILITY_SERVICE)
        answers: list[_Part] = []
        if self.batch_size > 1 and len(pairs) > 1:
            for start in range(0, len(pairs), self.batch_size):
                chunk = [request(*pair) for pair in pairs[start:start + self.batch_size]]
                answers += [a.parts[0] for a in await self._batch(root, chunk, what="availability read")]
        else:
            for pair in pairs:
                req = request(*pair)
                response = await self._send("GET", root + req.path, what=req.what)
                answers.append(_Part(response.status_code, dict(response.headers), response.content))
        for (product, plant), part in zip(pairs, answers, strict=True):
            what = f"availability of {product} in plant {plant}"
            if part.status >= 400:
                error = error_for(part.response(), what)
                if error.retriable or isinstance(error, AuthError):
                    raise error
                log.warning("%s %s", SYSTEM, error)
                totals.pop(product, None)
                continue
            data = part.json(what).get("d")
            record = data.get(AVAILABILITY_FUNCTION, data) if isinstance(data, dict) else None
            quantity = record.get("AvailableQuantityInBaseUnit") if isinstance(record, dict) else None
            if product in totals:
                try:
                    totals[product] += float(Decimal(str(quantity)))
                except InvalidOperation:
                    raise TransientError(f"{SYSTEM} {what}: no AvailableQuantityInBaseUnit in the answer") from None
        return totals

    async def _select_products(self, equals: Mapping[str, Any],
                               not_in: Mapping[str, Sequence[Any]] | None) -> list[SourceRecord]:
        def accepts(record: SourceRecord) -> bool:
            for name, value in equals.items():
                allowed = value if isinstance(value, list | tuple | set | frozenset) else [value]
                if not any(same_value(name, record.values.get(name), v) for v in allowed):
                    return False
            return not any(any(same_value(name, record.values.get(name), v) for v in values)
                           for name, values in (not_in or {}).items())

        wanted = equals.get("Product")
        if wanted is not None:
            keys = [str(k) for k in (wanted if isinstance(wanted, list | tuple | set | frozenset) else [wanted])]
            records = list((await self._fetch_products(keys)).values())
        else:
            records = [r async for page in self._product_pages(None) for r in page]
        return [r for r in records if accepts(r)]

    async def _fetch_products(self, keys: Sequence[str]) -> dict[str, SourceRecord]:
        """ProductAvailability records by product, `_FETCH_CHUNK` products per round."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, SourceRecord] = {}
        for start in range(0, len(wanted), _FETCH_CHUNK):
            async for page in self._product_pages(wanted[start:start + _FETCH_CHUNK]):
                found.update((r.key, r) for r in page)
        return found
