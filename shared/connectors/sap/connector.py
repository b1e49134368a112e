"""SAP S/4HANA OData v2 connector (business partners, sales orders, product read model): RecordSink + ChangeSource.

Addressing
    Tables are entity sets; the service is chosen per set (`ENTITY_SETS`): `A_BusinessPartner` (with its
    addresses, their phone numbers and e-mail addresses, roles and customer / sales-area data) in
    API_BUSINESS_PARTNER, `A_SalesOrder` (with `to_Item`) and `A_SalesOrderItem` in API_SALES_ORDER_SRV,
    `A_Product` in API_PRODUCT_SRV, the PR00 condition records in API_SLSPRICINGCONDITIONRECORD_SRV, all under
    `{base_url}/sap/opu/odata/sap/<service>/`; plus the composed `ProductAvailability` (below). Keys are SAP's
    numbers as strings (`17100001`, `4000043`); composite keys join their parts with `|` (`A_SalesOrderItem`
    `4000043|10`). `sap_client` adds `sap-client=<n>` to every request (on-premise).

Auth and sessions
    `BasicAuth` (communication user) or `OAuthClientCredentials` (token URL, client id / secret; one refresh and
    replay on 401). Before the first write (or $batch) a GET of the service root with `x-csrf-token: Fetch`
    returns the CSRF token and session cookies; both go on every modifying request and every $batch. A 403
    answered `x-csrf-token: Required` (expired session or token) fetches a new token once and replays; a second
    one is an AuthError.

Reads
    `Accept: application/json`, collections `{"d": {"results", "__next"}}`: `$top`/`$skip` windows of
    `page_size`, inside which server paging (`__next`, rebased onto our host so credentials never leave it) is
    followed. `$filter` literals are escaped (strings with `''` doubling, `datetime'...'`, `datetimeoffset'...'`
    for Edm.DateTimeOffset fields, `time'PT..'`, decimals `1.5M`); OData v2 has no `in`, so a list in `equals`
    becomes an `or` chain and `not_in` an `and` chain of `ne`.
    Values are converted so that a value written and read back compares equal: `\\/Date(ms)\\/` -> ISO-8601
    (`2026-01-05` for a date at midnight, `2026-01-05T14:30:05Z` otherwise), Edm.Time `PT14H30M05S` ->
    `14:30:05`, Edm.Decimal text (`DECIMAL_FIELDS`) -> float (`"4.000"` -> 4.0); `__metadata` and unexpanded
    navigation are dropped; `version` is `__metadata.etag`.

Nested values and dotted paths (reads and writes use the same names)
    Nested: A_BusinessPartner `to_BusinessPartnerAddress` = list of address dicts (each with `to_PhoneNumber`
    / `to_EmailAddress` lists of A_AddressPhoneNumber / A_AddressEmailAddress dicts), `to_BusinessPartnerRole`
    = list of role dicts (or role codes such as "FLCU01" on writes), `to_Customer` = a dict of A_Customer
    fields with `to_CustomerSalesArea` = list of sales-area dicts. A_SalesOrder: `to_Item` = list of item dicts.
    Dotted: a flat key `to_X.to_Y.Field` addresses Field of the FIRST entry of each collection on the way
    (`to_Customer` is a single entity): `to_BusinessPartnerAddress.CityName`,
    `to_BusinessPartnerAddress.to_PhoneNumber.PhoneNumber`, `to_Customer.OrderIsBlockedForCustomer`,
    `to_Customer.to_CustomerSalesArea.CustomerPaymentTerms`. Reads of A_BusinessPartner (scan, fetch, select,
    changes_since) expand every navigation and add the dotted names of the first entries next to the nested
    values. Writes turn dotted keys into the nested form (`nest_dotted`): on create the entries are made in
    the deep insert (an entry whose values are all empty is not created); on update the first existing entry
    is PATCHed, or created when there is none. A sales area given with organisation, channel and division is
    the one with that key; one without them (a dotted path) is the first.

Writes
    Every number is sent as a string (Edm.Decimal travels as text in OData v2 JSON); ISO dates of Edm.DateTime
    fields (`DATE_FIELDS`, e.g. RequestedDeliveryDate "2026-12-15") as `\\/Date(ms)\\/`. SAP has no upsert, so an
    op is located first (by key, else by its `match` fields) and planned from what SAP holds:
    - A_SalesOrder create: ONE deep-insert POST with `to_Item: {"results": [...]}` (item numbers 10, 20, ...
      unless given; each item carries its `LineWrite.match` field). Update: header PATCH with
      `If-Match: <etag>` when a field differs, then each line found by its match field is PATCHed when
      different, or POSTed to `A_SalesOrder('<n>')/to_Item`. The item match field is whatever the flow's
      `link_field` names; `ITEM_MATCH_FIELD` (`PurchaseOrderByCustomer`, a writable CHAR 35 of
      A_SalesOrderItem) is the recommended one: `ExternalItemID` is read-only and `UnderlyingPurchaseOrderItem`
      is only 6 characters, too short for source line ids.
    - A_BusinessPartner create: one deep-insert POST with addresses (and their phone numbers / e-mail
      addresses), roles and customer data (role FLCU01 is added when `to_Customer` is given without roles).
      Update: only the entities with a differing field are PATCHed (each with its ETag as If-Match): header,
      addresses paired by `AddressID` (else by position), phone numbers / e-mail addresses by position,
      customer, sales areas; missing entries are POSTed to their parent's navigation, missing roles too
      (FLCU01 creates the customer, whose data follows after a re-read). `PARTNER_MATCH_FIELD`
      (`BusinessPartnerIDByExtSystem`, CHAR 20) is the recommended match field. Partners cannot be deleted.
    - delete: A_SalesOrder DELETE with If-Match (404 = already gone).
    A 412 (changed in SAP since it was read) re-reads, re-plans and retries once. The match values are written
    into the created record, so a replay finds it and creates nothing. A create whose answer is lost (read
    timeout, dropped connection) is re-located by its match before it is reported as AmbiguousWriteError.

$batch (`batch_size`, default 100)
    When one `write()` call has two or more ops for the same service and `batch_size` > 1: the targets are
    looked up with one `$filter` per 40 ops (`PurchaseOrderByCustomer eq 'a' or ...`), sent as retrieve parts
    of one `POST <service>/$batch` when there are several such queries; then every op's requests form ONE
    changeset (an order create is its single deep insert; a partner update its PATCHes and POSTs, atomic in
    SAP), `batch_size` changesets per $batch call, the calls `max_concurrency` at a time. A failed changeset
    fails only its op, with the Gateway message of the failing request; a changeset answered 412 and a plan
    that needs SAP's reaction first (a new customer role) run again on their own, request by request. A $batch
    whose answer is lost re-locates its creates by match (found = created; the rest AmbiguousWriteError).
    10,000 new orders written 100 per `write()` take 100 look-up $batch calls (3 queries each) and 100 write
    $batch calls (plus one CSRF fetch).
    `batch_size=1` sends every request on its own: per op one look-up GET and one deep-insert POST.

ProductAvailability (read model, table `PRODUCT_AVAILABILITY`, key `Product`)
    Fields: Product, ProductDescription (language `product_language`, EN), BaseUnit, NetPrice (float, PR00
    rate per condition quantity valid today in `price_sales_organization` / `price_distribution_channel`, None
    without a price), Currency (the condition currency), AvailableQuantity (float, sum over
    `availability_plants`, default "1710" alone, of the plants the product is maintained in; 0.0 in none).
    Calls per read (scan, fetch, changes_since): ceil(P / page_size) A_Product pages (`$expand=to_Description,
    to_Plant`), ceil(V / page_size) pages of PR00 validities (`A_SlsPrcgCndnRecdValidity` filtered by condition
    type, sales area and today, `$expand=to_SlsPrcgConditionRecord`), and one `DetermineAvailabilityAt`
    (API_PRODUCT_AVAILY_INFO_BASIC, SupplyingPlant / Material / ATPCheckingRule / RequestedUTCDateTime) per
    product and plant, sent as retrieve parts of ceil(P x plants / batch_size) $batch calls (alone with
    `batch_size=1`). fetch reads 40 products per round. A product SAP refuses availability for is left out.

Errors
    The Gateway body `{"error": {"code", "message": {"value"}, "innererror": {"errordetails": [...]}}}` becomes
    `RejectedError("SAP rejected A_SalesOrder create (op ..): V1/320: Sales organization 9999 is not defined
    (field SalesOrganization)")`; lock messages (`LOCK_MESSAGES`) and 5xx are TransientError, 401/403
    AuthError, a write answered 504 AmbiguousWriteError. 429 and 503 are retried in-call honouring
    Retry-After (writes too: SAP refused them before processing); when they persist, or ask for more than
    `RetryPolicy.max_retry_after`, they become ThrottledError (429) / TransientError (503).

Change detection (`changes_since`)
    A_SalesOrder: `LastChangeDateTime ge datetimeoffset'<checkpoint>'` (UTC; set on create and every change).
    A_BusinessPartner has no such timestamp: it has `LastChangeDate` + `LastChangeTime` (empty until the first
    change) and `CreationDate` + `CreationTime`, kept in the system time zone (`system_time_zone`, UTC in
    S/4HANA Cloud), so the filter compares date and time pairs of both. The checkpoint is the newest change
    time seen (`2026-01-05T14:30:05.123Z`), followed by `;` and the keys changed at exactly that time, which
    the next poll (`ge`) skips; intermediate pages carry the previous checkpoint (a crash replays, never skips).
    Deletions are not visible. ProductAvailability has no change time at all: every poll reads it whole and
    reports the products whose content hash differs from the checkpoint's (and the ones gone); see
    `_HashCheckpoint` for its size bound. SAP event-mesh CloudEvents are parsed by `parse_event`.
"""

from __future__ import annotations

from shared.connectors.sap.changes import SapChanges
from shared.connectors.sap.codecs import SYSTEM
from shared.connectors.sap.writes import SapWrites
from shared.core.errors import RejectedError


class SapClient(SapChanges, SapWrites):
    """SAP S/4HANA OData v2 client implementing `RecordSink` and `ChangeSource` (see the module docstring)."""

    async def fetch_attachment(self, table: str, key: str, attachment_id: str) -> bytes:
        """SAP attachments (API_CV_ATTACHMENT_SRV) are not synced by Syncline."""
        raise RejectedError(f"{SYSTEM}: attachments are not supported for {table} ({key}, {attachment_id})")
