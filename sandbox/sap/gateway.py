"""Gateway basics every module shares: paths, system ids, event types, entity shortcuts, the error."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sandbox.sap.schema import (
    AVAILABILITY_SERVICE,
    BP_SERVICE,
    ENTITIES,
    ITEM_STATUS,
    ORDER_STATUS,
    PRICING_SERVICE,
    PRODUCT_SERVICE,
    SO_SERVICE,
)

SERVICE_PREFIX = "/sap/opu/odata/sap/"
TOKEN_PATH = "/sap/bc/sec/oauth2/token"
SYSTEM_ID = "S4H"
SAP_CLIENT = "100"
SESSION_COOKIE = f"SAP_SESSIONID_{SYSTEM_ID}_{SAP_CLIENT}"
EVENT_SOURCE = f"/default/sap.s4.beh/{SYSTEM_ID}CLNT{SAP_CLIENT}"
SALES_ORG = "1710"
DISTRIBUTION_CHANNEL = "10"
DIVISION = "00"
"""The sales area the seed data and price defaults use."""
MODIFYING = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})

SALES_ORDER_CHANGED = "sap.s4.beh.salesorder.v1.SalesOrder.Changed.v1"
SALES_ORDER_CREATED = "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1"
PARTNER_CHANGED = "sap.s4.beh.businesspartner.v1.BusinessPartner.Changed.v1"
PARTNER_CREATED = "sap.s4.beh.businesspartner.v1.BusinessPartner.Created.v1"

# ============================================================================================ schema

# Entities, properties, Edm types and facets live in sandbox.sap.schema: requests are validated against it and
# $metadata is generated from it.
_PRODUCT_FIELDS = ENTITIES["A_Product"].fields
_ADDRESS_FIELDS = ENTITIES["A_BusinessPartnerAddress"].fields
_CUSTOMER_FIELDS = ENTITIES["A_Customer"].fields
_SALES_AREA_FIELDS = ENTITIES["A_CustomerSalesArea"].fields
_ITEM_FIELDS = ENTITIES["A_SalesOrderItem"].fields
_CONDITION_FIELDS = ENTITIES["A_SlsPrcgConditionRecord"].fields
_VALIDITY_FIELDS = ENTITIES["A_SlsPrcgCndnRecdValidity"].fields
_ORDER_STATUS = ORDER_STATUS
_ITEM_STATUS = ITEM_STATUS
IF_MATCH_REQUIRED = frozenset({"A_BusinessPartner", "A_SalesOrder"})
DELETABLE = frozenset(name for name, entity in ENTITIES.items() if entity.deletable)
READ_ONLY = frozenset(name for name, entity in ENTITIES.items() if not entity.creatable and not entity.updatable)
"""Served for reading only here (the real APIs can also maintain products and prices)."""
COMMUNICATION = {"to_PhoneNumber": "A_AddressPhoneNumber", "to_EmailAddress": "A_AddressEmailAddress"}
DIALING_CODES = {"US": "+1", "CA": "+1", "MX": "+52", "DE": "+49", "GB": "+44", "FR": "+33", "NL": "+31", "CH": "+41",
                 "JP": "+81"}


# ============================================================================================ errors


class GatewayError(Exception):
    """An SAP Gateway error response: HTTP status, message code ("V1/320") and text, optional details."""

    def __init__(self, status: int, code: str, message: str, *, target: str = "",
                 details: list[tuple[str, str]] | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.target = target
        self.details = details
        self.headers = dict(headers or {})

    def body(self, service: str) -> dict[str, Any]:
        details = self.details if self.details is not None else [(self.code, self.message)]
        now = datetime.now(UTC)
        return {"error": {
            "code": self.code, "message": {"lang": "en", "value": self.message},
            "innererror": {
                "application": {"component_id": COMPONENTS.get(service, "LO-MD-BP"),
                                "service_namespace": "/SAP/", "service_id": service, "service_version": "0001"},
                "transactionid": uuid.uuid4().hex.upper(),
                "timestamp": now.strftime("%Y%m%d%H%M%S.") + f"{now.microsecond:06d}0",
                "Error_Resolution": {
                    "SAP_Transaction": "For backend administrators: use ADT feed reader \"SAP Gateway Error Log\" "
                                       "or run transaction /IWFND/ERROR_LOG on SAP Gateway hub system and search "
                                       "for entries with the timestamp above for more details",
                    "SAP_Note": "See SAP Note 1797736 for error analysis (https://service.sap.com/sap/support/notes/"
                                "1797736)"},
                "errordetails": [{"code": c, "message": m, "longtext_url": "/sap/opu/odata/iwbep/message_text;o=LOCAL/",
                                  "propertyref": "", "severity": "error", "transition": False,
                                  "target": self.target} for c, m in details]}}}


COMPONENTS = {SO_SERVICE: "SD-SLS-API", BP_SERVICE: "LO-MD-BP", PRODUCT_SERVICE: "LO-MD-MM",
              PRICING_SERVICE: "SD-MD-CM", AVAILABILITY_SERVICE: "CA-ATP"}


def _bad(code: str, message: str, target: str = "") -> GatewayError:
    return GatewayError(400, code, message, target=target)
